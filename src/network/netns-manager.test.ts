import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import { after, before, test } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { runCommand } from "../shared/exec.js";
import { createNetnsManager, oneShotNetworkHelper } from "./netns-manager.js";
import { readAll } from "../runtime/container/test-helpers.js";
import { openEgressPolicy } from "./egress-policy.js";
import { nftBatchArgs, policyOps, removePolicyOps } from "./nft-netlink.js";
import { policyChainName } from "./nft-ruleset.js";
import type { NetworkManager, SandboxNetwork } from "./types.js";

// Real namespaces, veths and an nftables table of its own (so a running server's table is left
// alone). Needs root. Every name carries this run's tag; `after` removes all of it.
const tag = `t${process.pid.toString(36)}${Date.now().toString(36).slice(-4)}`;
const tableName = `cubicle_test_${tag}`;
const subnet = `10.231.${process.pid % 250}.0/24`;
const netnsPrefix = `cubicle-${tag}-`;
const isRoot = process.getuid?.() === 0;

let manager: NetworkManager;
const children: ChildProcess[] = [];

before(async () => {
  if (!isRoot) return;
  manager = createNetnsManager({ subnet }, { tableName, netnsPrefix, interfacePrefix: "cbt" });
  await manager.init();
});

after(async () => {
  for (const child of children) if (child.exitCode === null) child.kill("SIGKILL");
  if (!isRoot) return;
  for (const id of await manager.listRuntimeIds()) await manager.release(id).catch(() => {});
  await runCommand(["nft", "delete", "table", "inet", tableName], { allowFailure: true });
  manager.close();
});

/** Runs `node -e script` inside a namespace; resolves with its stdout. */
async function nodeInNetns(netnsName: string, script: string): Promise<string> {
  const result = await runCommand(["ip", "netns", "exec", netnsName, process.execPath, "-e", script], { timeoutMs: 10_000 });
  return result.stdout.trim();
}

/** A TCP listener inside a namespace that answers "hello" and stays until the test ends. */
async function listenInNetns(netnsName: string, host: string, port: number): Promise<void> {
  const script = `require("net").createServer((s) => s.end("hello")).listen(${port}, ${JSON.stringify(host)}, () => console.log("up"))`;
  const child = spawn("ip", ["netns", "exec", netnsName, process.execPath, "-e", script], { stdio: ["ignore", "pipe", "inherit"] });
  children.push(child);
  await new Promise<void>((resolve, reject) => {
    child.stdout!.once("data", () => resolve());
    child.once("exit", (code) => reject(new Error(`listener exited with ${code}`)));
  });
}

const connectScript = (host: string, port: number) =>
  `const s = require("net").connect(${port}, ${JSON.stringify(host)}); s.setTimeout(700);` +
  `s.on("data", (d) => { console.log("got " + d); s.destroy(); });` +
  `s.on("timeout", () => { console.log("timeout"); s.destroy(); }); s.on("error", (e) => console.log(e.code));`;


/** The elements of one of the sandbox's sets (a: allowOut, d: denyOut, n: pinned). */
async function setOf(address: string, suffix: "a" | "d" | "n"): Promise<string> {
  const listing = (await runCommand(["nft", "list", "set", "inet", tableName, `${policyChainName(address)}_${suffix}`])).stdout;
  return /elements = \{([^}]*)\}/.exec(listing)?.[1]?.replace(/\s+/g, " ").trim() ?? "";
}

/** The sandbox's element of the verdict map and its chain ("" when it has none). */
async function policyOf(address: string): Promise<string> {
  const map = (await runCommand(["nft", "list", "map", "inet", tableName, "sandbox_policy"])).stdout;
  if (!new RegExp(`\\b${address.replaceAll(".", "\\.")} : goto`).test(map)) return "";
  const chain = await runCommand(["nft", "list", "chain", "inet", tableName, policyChainName(address)], { allowFailure: true });
  return chain.stdout;
}

test("allocates a namespace with a veth, addresses, a default route and low ports for everyone", { skip: !isRoot && "needs root" }, async () => {
  const started = performance.now();
  const network = await manager.allocate(`${tag}a`, { allowInternetAccess: true });
  const elapsedMs = performance.now() - started;
  try {
    assert.ok(existsSync(network.netnsPath));
    assert.ok(network.hostInterface.length <= 15);
    assert.ok(existsSync(`/sys/class/net/${network.hostInterface}`));
    const inside = await runCommand(["ip", "-n", network.netnsName, "-j", "-4", "route", "show", "default"]);
    assert.equal(JSON.parse(inside.stdout)[0].gateway, network.hostAddress);
    const sysctl = await runCommand(["ip", "netns", "exec", network.netnsName, "sysctl", "-n", "net.ipv4.ip_unprivileged_port_start"]);
    assert.equal(sysctl.stdout.trim(), "0");
    assert.match(await policyOf(network.sandboxAddress), /^\s*goto egress_allowed$/m);
    assert.equal(await setOf(network.sandboxAddress, "d"), "");
    await listenInNetns(network.netnsName, network.sandboxAddress, 49983);
    assert.equal(await readAll(network.sandboxAddress, 49983), "hello");
    console.log(`allocate took ${elapsedMs.toFixed(1)} ms`);
  } finally {
    await manager.release(`${tag}a`);
  }
  assert.ok(!existsSync(network.netnsPath));
  assert.ok(!existsSync(`/sys/class/net/${network.hostInterface}`));
  assert.equal(await policyOf(network.sandboxAddress), "");
});

test("a sandbox reaches neither the host nor another sandbox, but the host reaches both", { skip: !isRoot && "needs root" }, async () => {
  const a = await manager.allocate(`${tag}b`, { allowInternetAccess: true });
  const b = await manager.allocate(`${tag}c`, { allowInternetAccess: true });
  const hostServer = net.createServer((s) => s.end("host"));
  await new Promise<void>((resolve) => hostServer.listen(47001, a.hostAddress, resolve));
  try {
    await listenInNetns(b.netnsName, b.sandboxAddress, 47002);
    assert.equal(await readAll(b.sandboxAddress, 47002), "hello");
    // Sandbox TCP is redirected to the egress proxy (absent here: refused), never to the target.
    assert.match(await nodeInNetns(a.netnsName, connectScript(a.hostAddress, 47001)), /^(timeout|ECONNREFUSED|ECONNRESET)$/);
    assert.match(await nodeInNetns(a.netnsName, connectScript(b.sandboxAddress, 47002)), /^(timeout|ECONNREFUSED|ECONNRESET)$/);
    // Within its own namespace everything works, loopback included.
    assert.equal(await nodeInNetns(b.netnsName, connectScript(b.sandboxAddress, 47002)), "got hello");
  } finally {
    hostServer.close();
    await manager.release(`${tag}b`);
    await manager.release(`${tag}c`);
  }
});

test("policy changes refill the sandbox's sets atomically; its chain stays the same", { skip: !isRoot && "needs root" }, async () => {
  const network: SandboxNetwork = await manager.allocate(`${tag}d`, { allowInternetAccess: false });
  try {
    const chain = await policyOf(network.sandboxAddress);
    assert.match(chain, /ip daddr @p_[\d_]+_a goto egress_allowed/);
    assert.match(chain, /ip daddr @p_[\d_]+_n goto egress_allowed/);
    assert.match(chain, /ip daddr @p_[\d_]+_d goto egress_denied/);
    assert.match(chain, /^\s*goto egress_allowed$/m);
    assert.equal(await setOf(network.sandboxAddress, "d"), "0.0.0.0/0", "no internet: everything denied");
    assert.equal(await setOf(network.sandboxAddress, "a"), "");
    await manager.applyPolicy(`${tag}d`, { allowInternetAccess: true });
    assert.equal(await setOf(network.sandboxAddress, "d"), "", "open: nothing denied");
    await manager.applyPolicy(`${tag}d`, { allowInternetAccess: true, network: { denyOut: ["0.0.0.0/0"], allowOut: ["198.18.0.0/15", "example.com"] } });
    assert.equal(await setOf(network.sandboxAddress, "a"), "198.18.0.0/15");
    assert.equal(await setOf(network.sandboxAddress, "d"), "0.0.0.0/0");
    assert.equal(await policyOf(network.sandboxAddress), chain, "the chain did not change");
    // A DNS answer for an allowed name pins its address for the kernel (UDP, ICMP).
    await manager.pin(`${tag}d`, "example.com", ["198.51.100.7"], 60);
    const pinned = (await runCommand(["nft", "list", "set", "inet", tableName, `${policyChainName(network.sandboxAddress)}_n`])).stdout;
    assert.match(pinned, /198\.51\.100\.7 timeout 1m/);
    assert.deepEqual(manager.sandboxAt(network.sandboxAddress)?.policy.allowDomains, ["example.com"]);
    await manager.applyPolicy(`${tag}d`, { allowInternetAccess: false });
    assert.equal(await setOf(network.sandboxAddress, "d"), "0.0.0.0/0");
    assert.equal(await setOf(network.sandboxAddress, "n"), "", "no internet drops the pins too");
  } finally {
    await manager.release(`${tag}d`);
  }
  assert.equal(manager.sandboxAt(network.sandboxAddress), undefined);
});

test("the ruleset redirects DNS and TCP, masquerades, and drops the floor; re-init keeps policies", { skip: !isRoot && "needs root" }, async () => {
  const network = await manager.allocate(`${tag}e`, { allowInternetAccess: true });
  try {
    await manager.init();
    const table = (await runCommand(["nft", "list", "table", "inet", tableName])).stdout;
    assert.match(table, /ip saddr 10\.231\.\d+\.0\/24 ip daddr != 10\.231\.\d+\.0\/24 masquerade/);
    assert.match(table, /th dport 53 redirect to :\d+/);
    // Only this server's sandboxes (by subnet): another server's table on the host must not take them.
    assert.match(table, /iifname "cbt\*" ip saddr 10\.231\.\d+\.0\/24 meta l4proto tcp redirect to :\d+/);
    assert.match(table, /169\.254\.0\.0\/16/);
    assert.match(table, new RegExp(`${network.sandboxAddress.replaceAll(".", "\\.")} : goto`));
    assert.equal((await readFile("/proc/sys/net/ipv4/ip_forward", "utf8")).trim(), "1");
  } finally {
    await manager.release(`${tag}e`);
  }
});

test("release is idempotent and cleans a half-made network", { skip: !isRoot && "needs root" }, async () => {
  const id = `${tag}f`;
  await runCommand(["ip", "netns", "add", `${netnsPrefix}${id}`]);
  assert.deepEqual((await manager.listRuntimeIds()).includes(id), true);
  await manager.release(id);
  await manager.release(id);
  assert.equal((await manager.listRuntimeIds()).includes(id), false);
});

test("adopt marks the address used and restores the policy", { skip: !isRoot && "needs root" }, async () => {
  const first = await manager.allocate(`${tag}g`, { allowInternetAccess: false });
  try {
    const restarted = createNetnsManager({ subnet }, { tableName, netnsPrefix, interfacePrefix: "cbt" });
    await restarted.adopt(`${tag}g`, first, { allowInternetAccess: true });
    assert.match(await policyOf(first.sandboxAddress), /^\s*goto egress_allowed$/m);
    assert.equal(await setOf(first.sandboxAddress, "d"), "", "the adopted policy (internet) replaced the first (none)");
    const second = await restarted.allocate(`${tag}h`, { allowInternetAccess: false });
    assert.notEqual(second.sandboxAddress, first.sandboxAddress);
    await restarted.release(`${tag}h`);
    await restarted.release(`${tag}g`);
    restarted.close();
    assert.equal(await policyOf(first.sandboxAddress), "");
  } finally {
    await manager.release(`${tag}g`);
  }
});

test("namespaces and policies are made and removed through the injected helper runner, one call each for each", { skip: !isRoot && "needs root" }, async () => {
  const calls: string[][] = [];
  const real = oneShotNetworkHelper(path.join(import.meta.dirname, "..", "..", "dist", "sandbox-helper"));
  const counted = createNetnsManager({ subnet }, { tableName, netnsPrefix, interfacePrefix: "cbt", helper: (args) => (calls.push(args), real(args)) });
  const network = await counted.allocate(`${tag}i`, { allowInternetAccess: true });
  try {
    assert.deepEqual(calls, [
      ["net-setup", "--name", network.netnsName, "--host-if", network.hostInterface, "--host-addr", network.hostAddress, "--sandbox-addr", network.sandboxAddress, "--prefix", "30"],
      nftBatchArgs(tableName, policyOps(network.sandboxAddress, openEgressPolicy(), { fresh: true })),
    ]);
    const address = JSON.parse((await runCommand(["ip", "-n", network.netnsName, "-j", "-4", "addr", "show", "dev", "eth0"])).stdout);
    assert.equal(address[0].addr_info[0].local, network.sandboxAddress);
    await listenInNetns(network.netnsName, network.sandboxAddress, 47003);
    assert.equal(await readAll(network.sandboxAddress, 47003), "hello");
  } finally {
    await counted.release(`${tag}i`);
    counted.close();
  }
  assert.deepEqual(calls.slice(2), [["net-release", "--name", network.netnsName, "--host-if", network.hostInterface], nftBatchArgs(tableName, removePolicyOps(network.sandboxAddress))]);
  assert.ok(!existsSync(network.netnsPath));
  assert.ok(!existsSync(`/sys/class/net/${network.hostInterface}`));
  await counted.release(`${tag}i`);
  assert.equal(calls.length, 4, "nothing left to remove: no helper call");
});

test("a failed net-setup fails the allocate, and its address and policy are free again", { skip: !isRoot && "needs root" }, async () => {
  // One block only: the second allocate gets an address only if the failed one gave it back.
  const calls: string[] = [];
  const realHelper = oneShotNetworkHelper(path.join(import.meta.dirname, "..", "..", "dist", "sandbox-helper"));
  const oneBlock = subnet.replace(/\.0\/24$/, ".252/30");
  const failing = createNetnsManager({ subnet: oneBlock }, {
    tableName,
    netnsPrefix,
    interfacePrefix: "cbt",
    helper: async (args) => {
      calls.push(args[0]!);
      if (args[0] === "net-setup") throw new CubicleError("internal", "sandbox-helper: net-setup veth: creating the veth pair: File exists");
      // The policy's batches are real: made alongside the failing net-setup, then removed.
      return args[0] === "nft-batch" ? realHelper(args) : "";
    },
  });
  try {
    const first = failing.begin(`${tag}j`, { allowInternetAccess: true });
    await assert.rejects(first.ready, /creating the veth pair/);
    assert.deepEqual(calls.slice(0, 2), ["net-setup", "nft-batch"]);
    assert.equal((await failing.listRuntimeIds()).includes(`${tag}j`), false);
    assert.equal(await policyOf(first.network.sandboxAddress), "", "the policy made alongside was removed");
    assert.equal(failing.sandboxAt(first.network.sandboxAddress), undefined);
    const again = failing.begin(`${tag}k`, { allowInternetAccess: true });
    await assert.rejects(again.ready, /creating the veth pair/);
    assert.equal(again.network.sandboxAddress, first.network.sandboxAddress, "the only block was free again");
  } finally {
    failing.close();
  }
});

test("a leftover network of an earlier server is released by its namespace's address (net-address)", { skip: !isRoot && "needs root" }, async () => {
  const earlier = await manager.allocate(`${tag}l`, { allowInternetAccess: true });
  assert.notEqual(await policyOf(earlier.sandboxAddress), "");
  const restarted = createNetnsManager({ subnet }, { tableName, netnsPrefix, interfacePrefix: "cbt" });
  try {
    assert.ok((await restarted.listRuntimeIds()).includes(`${tag}l`));
    await restarted.release(`${tag}l`);
    assert.equal(await policyOf(earlier.sandboxAddress), "", "its policy went with it: the address was read from the namespace");
    assert.ok(!existsSync(earlier.netnsPath));
  } finally {
    restarted.close();
    await manager.release(`${tag}l`);
  }
});

test("init raises the host's neighbour table limits to what the subnet's sandboxes need (NEIGHBOUR_LIMIT_NOTE)", { skip: !isRoot && "needs root" }, async () => {
  const file = (name: string) => `/proc/sys/net/ipv4/neigh/default/${name}`;
  const read = async (name: string) => Number((await readFile(file(name), "utf8")).trim());
  const saved = { gc_thresh2: await read("gc_thresh2"), gc_thresh3: await read("gc_thresh3") };
  const bigTable = `${tableName}_n`;
  // From the kernel's defaults, for a /16 (16384 sandboxes, two entries each).
  await writeFile(file("gc_thresh3"), "1024\n");
  await writeFile(file("gc_thresh2"), "512\n");
  const big = createNetnsManager({ subnet: "10.232.0.0/16" }, { tableName: bigTable, netnsPrefix: `${netnsPrefix}n-`, interfacePrefix: "cbn" });
  try {
    await big.init();
    assert.ok((await read("gc_thresh3")) >= 2 * 16384 + 1024, `gc_thresh3 ${await read("gc_thresh3")}`);
    assert.ok((await read("gc_thresh2")) >= 2 * 16384 + 512, `gc_thresh2 ${await read("gc_thresh2")}`);
    // Never lowered: a smaller subnet leaves them.
    await manager.init();
    assert.ok((await read("gc_thresh3")) >= 2 * 16384 + 1024);
  } finally {
    big.close();
    await runCommand(["nft", "delete", "table", "inet", bigTable], { allowFailure: true });
    // Keep whichever is higher: a server on this host may rely on the values it set.
    for (const [name, value] of Object.entries(saved)) if ((await read(name)) < value) await writeFile(file(name), `${value}\n`);
  }
});
