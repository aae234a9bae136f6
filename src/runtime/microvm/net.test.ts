import assert from "node:assert/strict";
import { test } from "node:test";
import { runCommand } from "../../shared/exec.js";
import { attachGuestNetwork, releaseGuestNetwork } from "./net.js";
import { builtHelper, makeTestNetwork, releaseTestNetwork } from "./test-helpers.js";

interface Link {
  ifname: string;
  master?: string;
  operstate?: string;
  linkinfo?: { info_kind?: string };
  addr_info?: { family: string; local: string; prefixlen: number }[];
}

async function inNetns(netnsPath: string, args: string[]): Promise<string> {
  return (await runCommand(["nsenter", `--net=${netnsPath}`, "--", ...args])).stdout;
}

test("moves the sandbox address off eth0 into a bridge with a tap, for the guest to take", async (t) => {
  if (!builtHelper()) return t.skip("dist/sandbox-helper is missing: run `node scripts/build.mjs` first");
  const network = await makeTestNetwork("n", 218);
  try {
    const guest = await attachGuestNetwork(network, "02:00:00:00:00:01", { bridgeName: "cbmbr0", tapName: "cbmtap0" });
    assert.deepEqual(guest, { tapName: "cbmtap0", macAddress: "02:00:00:00:00:01", address: network.sandboxAddress, prefixLength: 30, gateway: network.hostAddress });
    const links = JSON.parse(await inNetns(network.netnsPath, ["ip", "-j", "-d", "address", "show"])) as Link[];
    const byName = new Map(links.map((link) => [link.ifname, link]));
    assert.equal(byName.get("eth0")?.master, "cbmbr0");
    assert.deepEqual(byName.get("eth0")?.addr_info?.filter((a) => a.family === "inet"), [], "eth0 keeps no IPv4 address");
    assert.equal(byName.get("cbmtap0")?.master, "cbmbr0");
    assert.equal(byName.get("cbmtap0")?.linkinfo?.info_kind, "tun");
    assert.equal(byName.get("cbmbr0")?.linkinfo?.info_kind, "bridge");
    for (const name of ["cbmbr0", "cbmtap0"]) assert.deepEqual(byName.get(name)?.addr_info ?? [], [], `${name} has no address (IPv6 off)`);
    assert.equal((await inNetns(network.netnsPath, ["ip", "-4", "route", "show"])).trim(), "", "no route left in the netns: the guest routes");
    // The host end is untouched: it still holds the gateway address.
    assert.match((await runCommand(["ip", "-4", "-o", "address", "show", "dev", network.hostInterface])).stdout, new RegExp(`${network.hostAddress.replace(/\./g, "\\.")}/30`));

    await releaseGuestNetwork(network.netnsPath, { bridgeName: "cbmbr0", tapName: "cbmtap0" });
    const after = (JSON.parse(await inNetns(network.netnsPath, ["ip", "-j", "link", "show"])) as Link[]).map((link) => link.ifname).sort();
    assert.deepEqual(after, ["eth0", "lo"]);
    await releaseGuestNetwork(network.netnsPath, { bridgeName: "cbmbr0", tapName: "cbmtap0" });
  } finally {
    await releaseTestNetwork(network);
  }
});

test("refuses interface names ip would read as something else", async () => {
  await assert.rejects(attachGuestNetwork({ netnsPath: "/nonexistent", sandboxAddress: "10.0.0.2", hostAddress: "10.0.0.1", prefixLength: 30 }, "02:00:00:00:00:01", { tapName: "tap0 type veth" }), /interface name/);
});
