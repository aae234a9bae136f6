import assert from "node:assert/strict";
import { test } from "node:test";
import { runCommand } from "../../shared/exec.js";
import { attachGuestNetwork, GUEST_ADDRESS, GUEST_GATEWAY, GUEST_MAC_ADDRESS, guestNatRuleset, releaseGuestNetwork } from "./net.js";
import { builtHelper, makeTestNetwork, releaseTestNetwork } from "./test-helpers.js";

interface Link {
  ifname: string;
  linkinfo?: { info_kind?: string };
  addr_info?: { family: string; local: string; prefixlen: number }[];
}

async function inNetns(netnsPath: string, args: string[]): Promise<string> {
  return (await runCommand(["nsenter", `--net=${netnsPath}`, "--", ...args])).stdout;
}

test("gives the guest its fixed address on a tap and translates it to the sandbox address; release removes both", async (t) => {
  if (!builtHelper()) return t.skip("dist/sandbox-helper is missing: run `node scripts/build.mjs` first");
  const network = await makeTestNetwork("n", 218);
  const names = { tapName: "cbmtap0", tableName: "cbm_guest" };
  try {
    const guest = await attachGuestNetwork(network, names);
    assert.deepEqual(guest, { tapName: "cbmtap0", macAddress: GUEST_MAC_ADDRESS, address: GUEST_ADDRESS, prefixLength: 30, gateway: GUEST_GATEWAY });
    const links = JSON.parse(await inNetns(network.netnsPath, ["ip", "-j", "-d", "address", "show"])) as Link[];
    const byName = new Map(links.map((link) => [link.ifname, link]));
    const inet = (name: string) => byName.get(name)?.addr_info?.filter((a) => a.family === "inet").map((a) => `${a.local}/${a.prefixlen}`);
    assert.deepEqual(inet("eth0"), [`${network.sandboxAddress}/30`], "eth0 keeps the sandbox address");
    assert.deepEqual(inet("cbmtap0"), [`${GUEST_GATEWAY}/30`]);
    assert.equal(byName.get("cbmtap0")?.linkinfo?.info_kind, "tun");
    assert.deepEqual(byName.get("cbmtap0")?.addr_info?.filter((a) => a.family === "inet6"), [], "no IPv6 on the tap");
    assert.equal((await inNetns(network.netnsPath, ["sysctl", "-n", "net.ipv4.ip_forward"])).trim(), "1");
    assert.equal((await inNetns(network.netnsPath, ["sysctl", "-n", "net.ipv4.conf.cbmtap0.send_redirects"])).trim(), "0");
    const table = await inNetns(network.netnsPath, ["nft", "list", "table", "ip", "cbm_guest"]);
    assert.match(table, new RegExp(`ip daddr ${network.sandboxAddress.replace(/\./g, "\\.")} dnat to ${GUEST_ADDRESS.replace(/\./g, "\\.")}`));
    assert.match(table, new RegExp(`snat to ${network.sandboxAddress.replace(/\./g, "\\.")}`));
    assert.match(table, /hook forward priority filter; policy drop;/);

    await releaseGuestNetwork(network.netnsPath, names);
    const after = (JSON.parse(await inNetns(network.netnsPath, ["ip", "-j", "link", "show"])) as Link[]).map((link) => link.ifname).sort();
    assert.deepEqual(after, ["eth0", "lo"]);
    assert.equal((await inNetns(network.netnsPath, ["nft", "list", "tables"])).trim(), "");
    await releaseGuestNetwork(network.netnsPath, names);
  } finally {
    await releaseTestNetwork(network);
  }
});

test("the netns's table forwards only the guest's own address, and DNS to the gateway goes to the host end", () => {
  const rules = guestNatRuleset({ tapName: "tap0", vethName: "eth0", tableName: "t", sandboxAddress: "10.88.0.2", hostAddress: "10.88.0.1" });
  assert.match(rules, /iifname "tap0" oifname "eth0" ip saddr 169\.254\.0\.2 accept/);
  assert.match(rules, /ip daddr 169\.254\.0\.1 meta l4proto \{ udp, tcp \} th dport 53 dnat to 10\.88\.0\.1/);
  assert.match(rules, /chain input \{[^}]*iifname "tap0" drop/);
  // Its own sandbox address from inside reaches the guest itself (hairpin), as a container's does.
  assert.match(rules, /iifname "tap0" ip saddr 169\.254\.0\.2 ip daddr 10\.88\.0\.2 dnat to 169\.254\.0\.2/);
  assert.match(rules, /iifname "tap0" oifname "tap0" ip daddr 169\.254\.0\.2 snat to 169\.254\.0\.1/);
});

test("refuses interface names ip would read as something else", async () => {
  await assert.rejects(attachGuestNetwork({ netnsPath: "/nonexistent", sandboxAddress: "10.0.0.2", hostAddress: "10.0.0.1", prefixLength: 30 }, { tapName: "tap0 type veth" }), /interface name/);
  await assert.rejects(attachGuestNetwork({ netnsPath: "/nonexistent", sandboxAddress: "10.0.0.2; flush ruleset", hostAddress: "10.0.0.1", prefixLength: 30 }), /not an IPv4 address/);
});
