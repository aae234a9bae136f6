import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { after, test } from "node:test";
import { readAll } from "./test-helpers.js";

// The helper's netlink subcommands (native/netlink.h), each run once as a process, on real
// namespaces and veths. `ip` only looks (and builds the reference network the helper replaces).
// Every name carries this run's tag and `after` removes all of it; addresses are in 10.215/16.
const binary = path.join(import.meta.dirname, "..", "..", "..", "dist", "sandbox-helper");
const skip = process.getuid?.() !== 0 ? "needs root" : existsSync(binary) ? false : "build the helper first (node scripts/build.mjs)";
const tag = `nl${process.pid.toString(36)}`;
const block = `10.215.${process.pid % 250}`;
const children: ChildProcess[] = [];
const made: { netns: string; hostIf: string }[] = [];

after(() => {
  for (const child of children) if (child.exitCode === null) child.kill("SIGKILL");
  for (const { netns, hostIf } of made) {
    spawnSync("ip", ["link", "del", hostIf], { stdio: "ignore" });
    spawnSync("ip", ["netns", "del", netns], { stdio: "ignore" });
  }
});

function helper(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const result = spawnSync(binary, args, { encoding: "utf8", timeout: 15_000 });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

function ip(...args: string[]): string {
  const result = spawnSync("ip", args, { encoding: "utf8", timeout: 15_000 });
  assert.equal(result.status, 0, `ip ${args.join(" ")}: ${result.stderr}`);
  return result.stdout;
}

interface TestNetwork {
  netns: string;
  hostIf: string;
  hostAddress: string;
  sandboxAddress: string;
}

function names(suffix: string, hostOctet: number): TestNetwork {
  const network = { netns: `${tag}-${suffix}`, hostIf: `${tag}${suffix}`, hostAddress: `${block}.${hostOctet}`, sandboxAddress: `${block}.${hostOctet + 1}` };
  made.push(network);
  return network;
}

function setUp(network: TestNetwork, prefix = "30") {
  return helper("net-setup", "--name", network.netns, "--host-if", network.hostIf, "--host-addr", network.hostAddress, "--sandbox-addr", network.sandboxAddress, "--prefix", prefix);
}

function release(network: TestNetwork) {
  return helper("net-release", "--name", network.netns, "--host-if", network.hostIf);
}

/** What the network manager ran before the helper: the two `ip -batch` runs. */
function setUpWithIp(network: TestNetwork): void {
  const hostSide = [
    `netns add ${network.netns}`,
    `link add ${network.hostIf} type veth peer name eth0 netns ${network.netns}`,
    `addr add ${network.hostAddress}/30 dev ${network.hostIf}`,
    `link set ${network.hostIf} up`,
    `netns exec ${network.netns} sysctl -qw net.ipv4.ip_unprivileged_port_start=0 net.ipv6.conf.eth0.disable_ipv6=1`,
  ];
  const sandboxSide = [`link set lo up`, `addr add ${network.sandboxAddress}/30 dev eth0`, `link set eth0 up`, `route add default via ${network.hostAddress}`];
  for (const [args, lines] of [[["-batch", "-"], hostSide], [["-n", network.netns, "-batch", "-"], sandboxSide]] as const) {
    const result = spawnSync("ip", args, { input: lines.join("\n") + "\n", encoding: "utf8", timeout: 15_000 });
    assert.equal(result.status, 0, result.stderr);
  }
}

/**
 * `ip -j` output without what differs between any two equal networks (indexes, MACs, link-local
 * addresses); addresses in the block become their offset from the /30's network address.
 */
function shape(json: string, network: TestNetwork): unknown {
  const base = Number(network.hostAddress.split(".")[3]) - 1;
  const text = json
    .replace(new RegExp(`"${block.replaceAll(".", "\\.")}\\.(\\d+)`, "g"), (_, octet: string) => `"block+${Number(octet) - base}`)
    .replaceAll(network.hostIf, "HOSTIF");
  const drop = new Set(["ifindex", "link_index", "address", "broadcast", "link_netnsid", "valid_life_time", "preferred_life_time", "tentative"]);
  return JSON.parse(text, (key, value) => (drop.has(key) ? undefined : value)).map((entry: { addr_info?: { family: string; scope: string }[] }) =>
    entry.addr_info ? { ...entry, addr_info: entry.addr_info.filter((a) => !(a.family === "inet6" && a.scope === "link")) } : entry,
  );
}

function sysctls(netns: string): string {
  const files = ["ipv4/ip_unprivileged_port_start", "ipv6/conf/eth0/disable_ipv6", "ipv6/conf/lo/disable_ipv6", "ipv4/ip_forward", "ipv4/conf/eth0/rp_filter"];
  return ip("netns", "exec", netns, "cat", ...files.map((file) => `/proc/sys/net/${file}`));
}

function mountsOf(netns: string): string[] {
  return readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .filter((line) => line.includes(`/netns/${netns} `));
}

function assertGone(network: TestNetwork): void {
  assert.ok(!existsSync(`/var/run/netns/${network.netns}`), "no namespace file");
  assert.deepEqual(mountsOf(network.netns), [], "no namespace mount");
  assert.ok(!existsSync(`/sys/class/net/${network.hostIf}`), "no host veth");
}

/** A TCP listener answering "hello" at host:port inside a namespace ("" = the host). */
async function listen(netns: string, host: string, port: number): Promise<void> {
  const script = `require("net").createServer((s) => s.end("hello")).listen(${port}, ${JSON.stringify(host)}, () => console.log("up"))`;
  const argv = netns ? ["ip", "netns", "exec", netns, process.execPath, "-e", script] : [process.execPath, "-e", script];
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "pipe", "inherit"] });
  children.push(child);
  await new Promise<void>((resolve, reject) => {
    child.stdout!.once("data", () => resolve());
    child.once("exit", (code) => reject(new Error(`listener exited with ${code}`)));
  });
}


test("net-setup makes what `ip netns add` and the ip batches made: same links, addresses, routes, sysctls", { skip }, () => {
  const hostPortStart = readFileSync("/proc/sys/net/ipv4/ip_unprivileged_port_start", "utf8");
  const ours = names("a", 1);
  const reference = names("r", 5);
  const result = setUp(ours);
  assert.equal(result.status, 0, result.stderr);
  setUpWithIp(reference);

  assert.match(ip("netns", "list"), new RegExp(`^${ours.netns}\\b`, "m"));
  for (const part of [["addr"], ["route", "show", "table", "all"], ["-6", "route", "show", "table", "all"], ["link"]]) {
    const mine = shape(ip("-n", ours.netns, "-j", ...part), ours);
    assert.deepEqual(mine, shape(ip("-n", reference.netns, "-j", ...part), reference), `ip -n NAME ${part.join(" ")}`);
    assert.ok((mine as unknown[]).length > 0);
  }
  assert.deepEqual(shape(ip("-j", "addr", "show", "dev", ours.hostIf), ours), shape(ip("-j", "addr", "show", "dev", reference.hostIf), reference));
  const inside = JSON.parse(ip("-n", ours.netns, "-j", "-4", "route", "show", "default"));
  assert.equal(inside[0].gateway, ours.hostAddress);
  assert.equal(inside[0].dev, "eth0");
  assert.equal(sysctls(ours.netns), sysctls(reference.netns));
  assert.match(sysctls(ours.netns), /^0\n1\n/, "low ports for everyone, no IPv6 on eth0");
  // Written from inside the namespace: the host's own value is untouched.
  assert.equal(readFileSync("/proc/sys/net/ipv4/ip_unprivileged_port_start", "utf8"), hostPortStart);
  // Joinable by path, as runc and nsenter do.
  const entered = spawnSync("nsenter", [`--net=/var/run/netns/${ours.netns}`, "ip", "-j", "-4", "addr", "show", "dev", "eth0"], { encoding: "utf8" });
  assert.equal(JSON.parse(entered.stdout)[0].addr_info[0].local, ours.sandboxAddress, entered.stderr);
  assert.equal(mountsOf(ours.netns).length, 1, "one nsfs bind mount");
  assert.match(mountsOf(ours.netns)[0]!, / - nsfs /);

  assert.equal(release(ours).status, 0);
  assertGone(ours);
});

test("packets flow between the host end and the sandbox end", { skip }, async () => {
  const network = names("b", 9);
  const result = setUp(network);
  assert.equal(result.status, 0, result.stderr);
  try {
    await listen(network.netns, network.sandboxAddress, 47101);
    assert.equal(await readAll(network.sandboxAddress, 47101), "hello", "host → sandbox");
    await listen("", network.hostAddress, 47102);
    const script = `const s = require("net").connect(47102, ${JSON.stringify(network.hostAddress)}); s.setTimeout(2000);` +
      `s.on("data", (d) => { console.log("got " + d); s.destroy(); }); s.on("timeout", () => { console.log("timeout"); s.destroy(); }); s.on("error", (e) => console.log(e.code));`;
    assert.equal(ip("netns", "exec", network.netns, process.execPath, "-e", script).trim(), "got hello", "sandbox → host");
  } finally {
    for (const child of children.splice(0)) child.kill("SIGKILL");
    assert.equal(release(network).status, 0);
  }
  assertGone(network);
});

test("net-address prints eth0's address, and nothing for a missing namespace or one without eth0", { skip }, () => {
  const network = names("c", 13);
  assert.equal(setUp(network).status, 0);
  try {
    assert.deepEqual(helper("net-address", "--name", network.netns), { status: 0, stdout: `${network.sandboxAddress}\n`, stderr: "" });
  } finally {
    release(network);
  }
  assert.deepEqual(helper("net-address", "--name", network.netns), { status: 0, stdout: "", stderr: "" });
  const bare = names("d", 17);
  ip("netns", "add", bare.netns);
  assert.deepEqual(helper("net-address", "--name", bare.netns), { status: 0, stdout: "", stderr: "" });
  assert.equal(release(bare).status, 0, "a namespace without a veth is released too");
  assertGone(bare);
});

test("net-release removes veth, namespace file and mount, and is fine when they are already gone", { skip }, () => {
  const network = names("e", 21);
  assert.equal(setUp(network).status, 0);
  assert.ok(existsSync(`/sys/class/net/${network.hostIf}`));
  assert.equal(mountsOf(network.netns).length, 1);
  const first = release(network);
  assert.equal(first.status, 0, first.stderr);
  assertGone(network);
  assert.deepEqual(release(network), { status: 0, stdout: "", stderr: "" });
  // The block can be handed out again at once: no route of the old veth lingers.
  assert.equal(setUp(network).status, 0);
  assert.equal(release(network).status, 0);
  assertGone(network);
});

test("bad arguments are refused with exit 2 before anything is made", { skip }, () => {
  const network = names("f", 25);
  const good = ["--name", network.netns, "--host-if", network.hostIf, "--host-addr", network.hostAddress, "--sandbox-addr", network.sandboxAddress, "--prefix", "30"];
  const withValue = (option: string, value: string) => {
    const args = [...good];
    args[args.indexOf(option) + 1] = value;
    return ["net-setup", ...args];
  };
  const cases: [string[], RegExp][] = [
    [["net-setup", ...good.slice(0, 8)], /needs --prefix/],
    [withValue("--name", "../etc"), /--name must be/],
    [withValue("--name", "-x"), /--name must be/],
    [withValue("--name", "a".repeat(129)), /--name must be/],
    [withValue("--name", "a b"), /--name must be/],
    [withValue("--host-if", "a".repeat(16)), /--host-if must be/],
    [withValue("--host-if", "Cb1"), /--host-if must be/],
    [withValue("--host-if", "cb-1"), /--host-if must be/],
    [withValue("--host-if", ""), /--host-if must be/],
    [withValue("--host-if", "eth0"), /may not be eth0 or lo/],
    [withValue("--host-addr", "10.215.0"), /not a dotted-quad/],
    [withValue("--host-addr", "10.215.0.256"), /not a dotted-quad/],
    [withValue("--host-addr", "010.215.0.1"), /not a dotted-quad/],
    [withValue("--sandbox-addr", "::1"), /not a dotted-quad/],
    [withValue("--prefix", "33"), /--prefix must be 0-32/],
    [withValue("--prefix", "-1"), /--prefix is not a number/],
    [withValue("--sandbox-addr", network.hostAddress), /must differ/],
    [withValue("--sandbox-addr", `${block}.100`), /must share the prefix/],
    [["net-setup", ...good, "--mtu", "9000"], /does not take --mtu/],
    [["net-release", "--name", network.netns], /needs --host-if/],
    [["net-release", "--name", "x/y", "--host-if", "cb1"], /--name must be/],
    [["net-address", "--name", ".."], /--name must be/],
    [["net-address", "--name", network.netns, "--host-if", "cb1"], /does not take --host-if/],
  ];
  for (const [args, message] of cases) {
    const result = helper(...args);
    assert.equal(result.status, 2, `${args.join(" ")}: ${result.stderr}`);
    assert.match(result.stderr, message, args.join(" "));
  }
  assertGone(network);
});

test("a failed net-setup leaves nothing it made, and nothing it did not make is removed", { skip }, () => {
  // The host name is taken: the namespace was made first and must go again.
  const taken = names("g", 29);
  ip("link", "add", taken.hostIf, "type", "veth", "peer", "name", `${taken.hostIf}p`);
  try {
    const result = setUp(taken);
    assert.equal(result.status, 1);
    assert.match(result.stderr, /creating the veth pair: File exists/);
    assert.ok(!existsSync(`/var/run/netns/${taken.netns}`));
    assert.deepEqual(mountsOf(taken.netns), []);
    assert.ok(existsSync(`/sys/class/net/${taken.hostIf}`), "the interface that was there stays");
  } finally {
    spawnSync("ip", ["link", "del", taken.hostIf]);
  }

  // The namespace name is taken: it stays, and no veth is made.
  const existing = names("h", 33);
  ip("netns", "add", existing.netns);
  const refused = setUp(existing);
  assert.equal(refused.status, 1);
  assert.match(refused.stderr, /File exists/);
  assert.ok(existsSync(`/var/run/netns/${existing.netns}`));
  assert.ok(!existsSync(`/sys/class/net/${existing.hostIf}`));
  ip("netns", "del", existing.netns);

  // The kernel refuses the default route (the gateway is the /30's broadcast address): by then
  // the namespace, the veth and both addresses exist, and all of it must go.
  const late = { ...names("i", 37) };
  late.hostAddress = `${block}.39`;
  late.sandboxAddress = `${block}.38`;
  const failed = setUp(late);
  assert.equal(failed.status, 1);
  assert.match(failed.stderr, /adding the default route/);
  assert.match(failed.stderr, /kernel says: Nexthop has invalid gateway/);
  assertGone(late);
  assert.equal(JSON.parse(ip("-j", "-4", "route", "show", `${block}.36/30`)).length, 0, "no host route of the removed veth");
});
