import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { SandboxHelper } from "../container/sandbox-helper.js";
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

/**
 * Both ways the runtime does it: processes started from Node (nsenter: sysctl, ip, nft), and the
 * resident helper's net-guest-tap / net-guest-release (one process, which becomes nft).
 */
for (const way of ["processes", "resident helper"] as const) {
test(`gives the guest its fixed address on a tap and translates it to the sandbox address; release removes both (${way})`, async (t) => {
  if (!builtHelper()) return t.skip("dist/sandbox-helper is missing: run `node scripts/build.mjs` first");
  const network = await makeTestNetwork(way === "processes" ? "n" : "r", 218);
  const names = { tapName: "cbmtap0", tableName: "cbm_guest" };
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-net-"));
  const helper = way === "resident helper" ? new SandboxHelper(builtHelper()!) : undefined;
  const through = helper ? { helper, rulesetFile: path.join(dir, "guest-nat.nft") } : undefined;
  try {
    const guest = await attachGuestNetwork(network, names, through);
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
    if (through) {
      // Attached again in the same netns (a restore into an earlier guest's network): one tap, each rule once.
      await attachGuestNetwork(network, names, through);
      const again = await inNetns(network.netnsPath, ["nft", "list", "table", "ip", "cbm_guest"]);
      assert.equal(again.match(/dnat to /g)?.length, table.match(/dnat to /g)?.length);
      const taps = (JSON.parse(await inNetns(network.netnsPath, ["ip", "-j", "link", "show"])) as Link[]).filter((link) => link.ifname === "cbmtap0");
      assert.equal(taps.length, 1);
    }

    await releaseGuestNetwork(network.netnsPath, names, helper);
    const after = (JSON.parse(await inNetns(network.netnsPath, ["ip", "-j", "link", "show"])) as Link[]).map((link) => link.ifname).sort();
    assert.deepEqual(after, ["eth0", "lo"]);
    assert.equal((await inNetns(network.netnsPath, ["nft", "list", "tables"])).trim(), "");
    await releaseGuestNetwork(network.netnsPath, names, helper);
  } finally {
    helper?.close();
    await releaseTestNetwork(network);
    await rm(dir, { recursive: true, force: true });
  }
});
}

test("a spare QEMU's tap (SPARE_QEMU_NOTE) is moved into the sandbox's netns, renamed and addressed there, not made anew", async (t) => {
  if (!builtHelper()) return t.skip("dist/sandbox-helper is missing: run `node scripts/build.mjs` first");
  const network = await makeTestNetwork("s", 219);
  const spareNetns = `cbm-spare-${process.pid}`;
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-net-"));
  const helper = new SandboxHelper(builtHelper()!);
  const names = { tapName: "cbmtap0", tableName: "cbm_guest" };
  try {
    await runCommand(["ip", "netns", "add", spareNetns]);
    // What a spare's QEMU leaves there: a tap of its own, down, without an address.
    await runCommand(["ip", "-n", spareNetns, "tuntap", "add", "dev", "qs7", "mode", "tap"]);
    const spareMac = (JSON.parse((await runCommand(["ip", "-n", spareNetns, "-j", "link", "show", "qs7"])).stdout) as { address: string }[])[0]!.address;
    const through = { helper, rulesetFile: path.join(dir, "guest-nat.nft"), spareTap: { netnsName: spareNetns, tapName: "qs7" } };
    await attachGuestNetwork(network, names, through);
    const links = JSON.parse(await inNetns(network.netnsPath, ["ip", "-j", "address", "show"])) as (Link & { address: string })[];
    const tap = links.find((link) => link.ifname === "cbmtap0");
    assert.ok(tap, "the tap is in the sandbox's netns under the guest's tap name");
    assert.equal(tap.address, spareMac, "the very tap the spare opened, moved");
    assert.deepEqual(tap.addr_info?.filter((a) => a.family === "inet").map((a) => `${a.local}/${a.prefixlen}`), [`${GUEST_GATEWAY}/30`]);
    assert.deepEqual(tap.addr_info?.filter((a) => a.family === "inet6"), [], "no IPv6 on the moved tap");
    assert.ok(!links.some((link) => link.ifname === "qs7"));
    assert.deepEqual((JSON.parse((await runCommand(["ip", "-n", spareNetns, "-j", "link", "show"])).stdout) as Link[]).map((link) => link.ifname), ["lo"], "nothing is left in the spares' namespace");
    assert.match(await inNetns(network.netnsPath, ["nft", "list", "table", "ip", "cbm_guest"]), /dnat to 169\.254\.0\.2/);
    // Its tap gone (taken twice, or its QEMU ended): an error, and the sandbox's netns has no tap of that name left half made.
    await assert.rejects(attachGuestNetwork(network, names, through), /finding the spare's tap/);
    const call = (args: string[]) => helper.call("net-guest-tap", args, { what: "net-guest-tap" });
    const base = ["--name", network.netnsPath.split("/").pop()!, "--tap", "tap0", "--gateway", "169.254.0.1", "--prefix", "30", "--nft-file", through.rulesetFile];
    await assert.rejects(call([...base, "--from", spareNetns]), /--from and --from-tap go together/);
    await assert.rejects(call([...base, "--from", "../x", "--from-tap", "qs7"]), /--from must be/);
    await assert.rejects(call([...base, "--from", spareNetns, "--from-tap", "eth0"]), /--from-tap may not be eth0 or lo/);
    await assert.rejects(call([...base, "--from", network.netnsPath.split("/").pop()!, "--from-tap", "qs7"]), /another namespace/);
    await assert.rejects(call([...base, "--from", "cbm-absent-ns", "--from-tap", "qs7"]), /the spare's namespace/);
  } finally {
    helper.close();
    await runCommand(["ip", "netns", "del", spareNetns], { allowFailure: true });
    await releaseTestNetwork(network);
    await rm(dir, { recursive: true, force: true });
  }
});

test("the resident helper refuses a guest tap it cannot make safely, and a namespace that is not there", async (t) => {
  if (!builtHelper()) return t.skip("dist/sandbox-helper is missing: run `node scripts/build.mjs` first");
  const helper = new SandboxHelper(builtHelper()!);
  try {
    const call = (args: string[]) => helper.call("net-guest-tap", args, { what: "net-guest-tap" });
    const good = { "--name": "cbm-absent-ns", "--tap": "tap0", "--gateway": "169.254.0.1", "--prefix": "30", "--nft-file": "/nonexistent.nft" };
    const argv = (over: Record<string, string>) => Object.entries({ ...good, ...over }).flat();
    await assert.rejects(call(argv({ "--tap": "eth0" })), /may not be eth0 or lo/);
    await assert.rejects(call(argv({ "--tap": "Tap0" })), /--tap must be/);
    await assert.rejects(call(argv({ "--tap": "tap0123456789abc" })), /--tap must be/);
    await assert.rejects(call(argv({ "--name": "../etc" })), /--name must be/);
    await assert.rejects(call(argv({ "--gateway": "169.254.0.1; flush ruleset" })), /not a dotted-quad/);
    await assert.rejects(call(argv({ "--prefix": "33" })), /--prefix must be 1-32/);
    await assert.rejects(call(argv({ "--nft-file": "relative.nft" })), /absolute path/);
    await assert.rejects(call(argv({})), /the namespace/);
    await assert.rejects(helper.call("net-guest-release", ["--name", "cbm-absent-ns", "--tap", "tap0", "--table", "bad;table"], { what: "net-guest-release" }), /--table must be/);
    // A namespace that is gone has nothing to release.
    assert.equal(await helper.call("net-guest-release", ["--name", "cbm-absent-ns", "--tap", "tap0", "--table", "cubicle_guest"], { what: "net-guest-release" }), "");
  } finally {
    helper.close();
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
