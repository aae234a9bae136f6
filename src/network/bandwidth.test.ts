import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { randomInt } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { runCommand } from "../shared/exec.js";
import { applyBandwidthLimits, bandwidthCommands, bandwidthIfbName, parseBandwidthLimits, tokenBucket, type BandwidthLimits } from "./bandwidth.js";

const isInvalid = (pattern: RegExp) => (err: unknown) => err instanceof CubicleError && err.code === "invalid_argument" && pattern.test(err.message);

describe("parseBandwidthLimits", () => {
  test("reads egress and ingress rates, either alone", () => {
    assert.deepEqual(parseBandwidthLimits({ egressMbps: 20, ingressMbps: 40 }, "cubicle.bandwidth"), { egressMbps: 20, ingressMbps: 40 });
    assert.deepEqual(parseBandwidthLimits({ egressMbps: 0.1 }, "b"), { egressMbps: 0.1 });
    assert.deepEqual(parseBandwidthLimits({ ingressMbps: 100_000 }, "b"), { ingressMbps: 100_000 });
    assert.deepEqual(parseBandwidthLimits({ egressMbps: 5, ingressMbps: undefined }, "b"), { egressMbps: 5 });
  });

  test("nothing, null and an empty object mean no limits", () => {
    assert.equal(parseBandwidthLimits(undefined, "b"), undefined);
    assert.equal(parseBandwidthLimits(null, "b"), undefined);
    assert.equal(parseBandwidthLimits({}, "b"), undefined);
  });

  test("refuses what is not an object, naming where it was", () => {
    for (const value of [20, "20", true, [20], () => 1]) {
      assert.throws(() => parseBandwidthLimits(value, "metadata.bandwidth"), isInvalid(/^metadata\.bandwidth must be an object/));
    }
  });

  test("refuses unknown keys, including ones named like Object's properties", () => {
    assert.throws(() => parseBandwidthLimits({ egressMbps: 1, egress: 2 }, "b"), isInvalid(/unknown key "egress"; it takes only egressMbps and ingressMbps/));
    assert.throws(() => parseBandwidthLimits(JSON.parse('{"__proto__": {"egressMbps": 1}}'), "b"), isInvalid(/unknown key "__proto__"/));
    assert.throws(() => parseBandwidthLimits({ constructor: 1 }, "b"), isInvalid(/unknown key "constructor"/));
    assert.throws(() => parseBandwidthLimits({ ["x".repeat(10_000)]: 1 }, "b"), (err: unknown) => err instanceof CubicleError && err.message.length < 200);
  });

  test("refuses rates that are not numbers from 0.1 to 100000", () => {
    const bad: unknown[] = [0, -1, 0.09, 100_001, Number.NaN, Number.POSITIVE_INFINITY, "20", null, true, {}, [1], 1e308];
    for (const rate of bad) {
      assert.throws(() => parseBandwidthLimits({ egressMbps: rate }, "b"), isInvalid(/^b\.egressMbps must be a number of Mbit\/s from 0\.1 to 100000/), `egressMbps ${String(rate)}`);
      assert.throws(() => parseBandwidthLimits({ ingressMbps: rate }, "b"), isInvalid(/^b\.ingressMbps must be/), `ingressMbps ${String(rate)}`);
    }
  });
});

describe("tokenBucket", () => {
  test("banks 10 ms at the rate and queues 50 ms more", () => {
    assert.deepEqual(tokenBucket(20), { rateBits: 20_000_000, burstBytes: 25_000, limitBytes: 25_000 + 125_000 });
    assert.deepEqual(tokenBucket(100_000), { rateBits: 100_000_000_000, burstBytes: 125_000_000, limitBytes: 125_000_000 + 625_000_000 });
  });

  test("at low rates keeps room for two frames of burst and four of queue", () => {
    assert.deepEqual(tokenBucket(0.1), { rateBits: 100_000, burstBytes: 3028, limitBytes: 3028 + 6056 });
    assert.deepEqual(tokenBucket(2), { rateBits: 2_000_000, burstBytes: 3028, limitBytes: 3028 + 12_500 });
  });
});

describe("bandwidthCommands", () => {
  const dev = "cb0123456789abc";
  const ifb = bandwidthIfbName(dev);
  const present = { hostInterfaceExists: true, ifbExists: true };

  test("names the ifb after the veth, within 15 characters", () => {
    assert.match(ifb, /^ifb[0-9a-f]{12}$/);
    assert.equal(bandwidthIfbName(dev), ifb);
    assert.notEqual(bandwidthIfbName("cb0123456789abd"), ifb);
  });

  test("limits both directions: a tbf on the veth, a redirect to a new ifb with its own tbf", () => {
    const commands = bandwidthCommands(dev, { egressMbps: 20, ingressMbps: 40 }, { hostInterfaceExists: true, ifbExists: false });
    assert.deepEqual(commands, {
      ipBefore: [`link add ${ifb} type ifb`, `link set ${ifb} up`],
      tc: [
        `qdisc replace dev ${ifb} root handle 1: tbf rate 20000000bit burst 25000 limit 150000`,
        `qdisc replace dev ${dev} handle ffff: ingress`,
        `filter replace dev ${dev} parent ffff: protocol all prio 1 handle 800::800 u32 match u32 0 0 action mirred egress redirect dev ${ifb}`,
        `qdisc replace dev ${dev} root handle 1: tbf rate 40000000bit burst 50000 limit 300000`,
      ],
      ipAfter: [],
    });
  });

  test("a change with the ifb present is one tc batch", () => {
    const commands = bandwidthCommands(dev, { egressMbps: 5, ingressMbps: 7 }, present);
    assert.deepEqual(commands.ipBefore, []);
    assert.deepEqual(commands.ipAfter, []);
    assert.equal(commands.tc.length, 4);
  });

  test("an egress limit alone removes any ingress limit, and the reverse removes the ifb", () => {
    const egressOnly = bandwidthCommands(dev, { egressMbps: 5 }, present);
    assert.deepEqual(egressOnly.tc.slice(-2), [`qdisc replace dev ${dev} root pfifo`, `qdisc del dev ${dev} root`]);
    const ingressOnly = bandwidthCommands(dev, { ingressMbps: 5 }, present);
    assert.deepEqual(ingressOnly.tc.slice(0, 2), [`qdisc replace dev ${dev} handle ffff: ingress`, `qdisc del dev ${dev} handle ffff: ingress`]);
    assert.deepEqual(ingressOnly.ipAfter, [`link del ${ifb}`]);
  });

  test("removal is idempotent: replace-then-delete, and the ifb only if it is there", () => {
    const removal = bandwidthCommands(dev, undefined, { hostInterfaceExists: true, ifbExists: false });
    assert.deepEqual(removal, {
      ipBefore: [],
      tc: [`qdisc replace dev ${dev} handle ffff: ingress`, `qdisc del dev ${dev} handle ffff: ingress`, `qdisc replace dev ${dev} root pfifo`, `qdisc del dev ${dev} root`],
      ipAfter: [],
    });
  });

  test("without the veth only a leftover ifb is removed, and a limit is not_found", () => {
    assert.deepEqual(bandwidthCommands(dev, undefined, { hostInterfaceExists: false, ifbExists: true }), { ipBefore: [], tc: [], ipAfter: [`link del ${ifb}`] });
    assert.deepEqual(bandwidthCommands(dev, undefined, { hostInterfaceExists: false, ifbExists: false }), { ipBefore: [], tc: [], ipAfter: [] });
    assert.throws(() => bandwidthCommands(dev, { ingressMbps: 1 }, { hostInterfaceExists: false, ifbExists: false }), (err: unknown) => err instanceof CubicleError && err.code === "not_found");
  });

  test("refuses interface names that could smuggle commands into a batch", () => {
    for (const name of ["", "eth0 root", "a\nqdisc del dev lo root", "x".repeat(16), "-n", "a/b"]) {
      assert.throws(() => bandwidthCommands(name, undefined, present), isInvalid(/network interface name/), JSON.stringify(name));
    }
  });
});

// The integration test: two namespaces joined by a veth pair. The end in namespace A plays the
// host veth (limits applied to it, ifb made beside it), namespace B plays the sandbox. Needs root.
const isRoot = process.getuid?.() === 0;
const r = randomInt(1, 250);
const tag = `${process.pid.toString(36).slice(-3)}${r.toString(36)}`;
const nsHost = `cbw-a-${tag}`;
const nsSandbox = `cbw-b-${tag}`;
const hostEnd = `cbwh${tag}`;
const sandboxEnd = `cbws${tag}`;
const hostAddress = `10.252.${r}.1`;
const sandboxAddress = `10.252.${r}.2`;
const children = new Set<ChildProcess>();

describe("applyBandwidthLimits on a live veth", { skip: !isRoot && "needs root" }, () => {
  before(async () => {
    await runCommand(["ip", "netns", "add", nsHost]);
    await runCommand(["ip", "netns", "add", nsSandbox]);
    const lines = [
      `link add ${hostEnd} netns ${nsHost} type veth peer name ${sandboxEnd} netns ${nsSandbox}`,
      `-n ${nsHost} addr add ${hostAddress}/30 dev ${hostEnd}`,
      `-n ${nsSandbox} addr add ${sandboxAddress}/30 dev ${sandboxEnd}`,
      `-n ${nsHost} link set ${hostEnd} up`,
      `-n ${nsSandbox} link set ${sandboxEnd} up`,
    ];
    for (const line of lines) await runCommand(["ip", ...line.split(" ")]);
  });

  after(async () => {
    for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    // The ifb lives in namespace A and goes with it.
    await runCommand(["ip", "netns", "del", nsHost], { allowFailure: true });
    await runCommand(["ip", "netns", "del", nsSandbox], { allowFailure: true });
  });

  test("shapes each direction to its limit, changes live, and removal restores full speed", async () => {
    const baseline = await bothWays(1000);
    // Unlimited is at least ten times the highest limit below (a loaded 2-core box still moves Gbit/s over a veth).
    const fast = 10 * 40;
    assert.ok(baseline.egress > fast && baseline.ingress > fast, `unlimited: ${JSON.stringify(baseline)}`);

    await applyBandwidthLimits(hostEnd, { egressMbps: 20, ingressMbps: 40 }, { netns: nsHost });
    const limited = await bothWays(2000);
    assertNear(limited.egress, 20, "egress");
    assertNear(limited.ingress, 40, "ingress");

    // Live change: egress up, ingress limit removed.
    await applyBandwidthLimits(hostEnd, { egressMbps: 40 }, { netns: nsHost });
    const changed = await bothWays(2000);
    assertNear(changed.egress, 40, "egress after change");
    assert.ok(changed.ingress > fast, `ingress after its limit was removed: ${changed.ingress} Mbit/s`);

    // And the other way round: the ifb goes, ingress is shaped again.
    await applyBandwidthLimits(hostEnd, { ingressMbps: 20 }, { netns: nsHost });
    assert.equal(await linkExists(bandwidthIfbName(hostEnd)), false);
    const swapped = await bothWays(2000);
    assertNear(swapped.ingress, 20, "ingress after swap");
    assert.ok(swapped.egress > fast, `egress after its limit was removed: ${swapped.egress} Mbit/s`);

    await applyBandwidthLimits(hostEnd, undefined, { netns: nsHost });
    const restored = await bothWays(1000);
    assert.ok(restored.egress > fast && restored.ingress > fast, `after removal: ${JSON.stringify(restored)}`);
    console.log(`# throughput Mbit/s: ${JSON.stringify({ baseline, limited, changed, swapped, restored })}`);
  });

  test("repeated calls are idempotent and leave exactly the expected qdiscs", async () => {
    const limits: BandwidthLimits = { egressMbps: 10, ingressMbps: 30 };
    await applyBandwidthLimits(hostEnd, limits, { netns: nsHost });
    const first = await qdiscs();
    await applyBandwidthLimits(hostEnd, limits, { netns: nsHost });
    assert.deepEqual(await qdiscs(), first);
    const ifb = bandwidthIfbName(hostEnd);
    assert.deepEqual(first, [`${ifb} tbf root 10Mbit`, `${hostEnd} ingress`, `${hostEnd} tbf root 30Mbit`].sort());

    const tcOnly = await timeTcBatch();
    const timings: number[] = [];
    for (const mbps of [11, 12, 13, 14, 15]) {
      const started = performance.now();
      await applyBandwidthLimits(hostEnd, { egressMbps: mbps, ingressMbps: mbps * 2 }, { netns: nsHost });
      timings.push(performance.now() - started);
    }
    console.log(`# applyBandwidthLimits change (netns: ip state read + tc batch) ms: ${timings.map((t) => t.toFixed(1)).join(", ")}; tc batch alone ms: ${tcOnly.toFixed(1)}`);
    assert.deepEqual(await qdiscs(), [`${ifb} tbf root 15Mbit`, `${hostEnd} ingress`, `${hostEnd} tbf root 30Mbit`].sort());

    await applyBandwidthLimits(hostEnd, undefined, { netns: nsHost });
    await applyBandwidthLimits(hostEnd, undefined, { netns: nsHost });
    assert.deepEqual(await qdiscs(), [`${hostEnd} noqueue root`]);
    assert.equal(await linkExists(ifb), false);
  });

  test("a missing interface: limits are not_found, removal only clears a leftover ifb", async () => {
    await assert.rejects(applyBandwidthLimits("cbwgone", { egressMbps: 1 }, { netns: nsHost }), (err: unknown) => err instanceof CubicleError && err.code === "not_found");
    const leftover = bandwidthIfbName("cbwgone");
    await runCommand(["ip", "-n", nsHost, "link", "add", leftover, "type", "ifb"]);
    await applyBandwidthLimits("cbwgone", undefined, { netns: nsHost });
    assert.equal(await linkExists(leftover), false);
  });
});

function assertNear(measuredMbps: number, limitMbps: number, what: string): void {
  const ratio = measuredMbps / limitMbps;
  assert.ok(ratio >= 0.6 && ratio <= 1.15, `${what}: ${measuredMbps.toFixed(1)} Mbit/s against a limit of ${limitMbps} (${(ratio * 100).toFixed(0)} %)`);
}

/** Egress = sandbox (B) sends to host (A); ingress = the reverse. Mbit/s of TCP payload. */
async function bothWays(durationMs: number): Promise<{ egress: number; ingress: number }> {
  const egress = await transfer(nsSandbox, nsHost, hostAddress, durationMs);
  const ingress = await transfer(nsHost, nsSandbox, sandboxAddress, durationMs);
  return { egress: Math.round(egress * 10) / 10, ingress: Math.round(ingress * 10) / 10 };
}

// The receiver counts bytes from the first to the end of the stream, so what the sender's socket
// still held when it stopped writing is measured at the shaped rate too.
const receiverScript = (host: string) => `
const server = require("net").createServer((socket) => {
  let bytes = 0, first = 0;
  socket.on("data", (d) => { if (!first) first = performance.now(); bytes += d.length; });
  socket.on("end", () => { console.log(JSON.stringify({ bytes, ms: performance.now() - first })); process.exit(0); });
});
server.listen(0, ${JSON.stringify(host)}, () => console.log(JSON.stringify({ port: server.address().port })));
setTimeout(() => process.exit(3), 20000);`;

const senderScript = (host: string, port: number, durationMs: number) => `
const chunk = Buffer.alloc(64 * 1024);
const socket = require("net").connect(${port}, ${JSON.stringify(host)}, () => {
  const end = performance.now() + ${durationMs};
  const pump = () => { while (performance.now() < end) if (!socket.write(chunk)) return void socket.once("drain", pump); socket.end(); };
  pump();
});
socket.on("close", () => process.exit(0));
setTimeout(() => process.exit(3), 20000);`;

/** A TCP bulk transfer from a node in `fromNs` to one listening in `toNs`; resolves with Mbit/s. */
async function transfer(fromNs: string, toNs: string, toAddress: string, durationMs: number): Promise<number> {
  const receiver = startNode(toNs, receiverScript(toAddress));
  const lines = readLines(receiver);
  const { port } = JSON.parse(await lines.next()) as { port: number };
  const sender = startNode(fromNs, senderScript(toAddress, port, durationMs));
  try {
    const { bytes, ms } = JSON.parse(await lines.next()) as { bytes: number; ms: number };
    assert.ok(bytes > 0 && ms > 0, `received ${bytes} bytes in ${ms} ms`);
    return (bytes * 8) / (ms / 1000) / 1e6;
  } finally {
    for (const child of [sender, receiver]) if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  }
}

function startNode(netns: string, script: string): ChildProcess {
  const child = spawn("ip", ["netns", "exec", netns, process.execPath, "-e", script], { stdio: ["ignore", "pipe", "inherit"] });
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}

/** Lines of a child's stdout, each awaited with a timeout; fails if the child exits first. */
function readLines(child: ChildProcess): { next(): Promise<string> } {
  const lines: string[] = [];
  let buffered = "";
  let waiter: (() => void) | undefined;
  let exited = false;
  child.stdout!.on("data", (chunk: Buffer) => {
    buffered += chunk.toString("utf8");
    if (buffered.length > 65_536) buffered = buffered.slice(-65_536);
    let newline: number;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      lines.push(buffered.slice(0, newline));
      buffered = buffered.slice(newline + 1);
    }
    waiter?.();
  });
  child.once("close", () => {
    exited = true;
    waiter?.();
  });
  return {
    async next() {
      const deadline = Date.now() + 15_000;
      while (lines.length === 0) {
        if (exited) throw new Error(`child exited with ${child.exitCode ?? child.signalCode} before printing a line`);
        const remaining = deadline - Date.now();
        if (remaining <= 0) throw new Error("timed out waiting for a line from a child");
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, remaining);
          waiter = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        waiter = undefined;
      }
      return lines.shift()!;
    },
  };
}

/** "<dev> <kind> <root|ingress> <rate>" for each qdisc in namespace A, sorted. */
async function qdiscs(): Promise<string[]> {
  const result = await runCommand(["tc", "-n", nsHost, "-j", "qdisc", "show"]);
  const parsed = JSON.parse(result.stdout) as { kind: string; dev: string; root?: boolean; options?: { rate?: number } }[];
  return parsed
    .filter((q) => q.dev !== "lo")
    .map((q) => {
      if (q.kind === "ingress") return `${q.dev} ingress`;
      const rate = q.options?.rate === undefined ? "" : ` ${q.options.rate / 125_000}Mbit`;
      return `${q.dev} ${q.kind}${q.root ? " root" : ""}${rate}`;
    })
    .sort();
}

async function linkExists(name: string): Promise<boolean> {
  const result = await runCommand(["ip", "-n", nsHost, "link", "show", "dev", name], { allowFailure: true });
  return result.exitCode === 0;
}

/** How long one `tc -batch` run of a change takes by itself, for the report. */
async function timeTcBatch(): Promise<number> {
  const { tc } = bandwidthCommands(hostEnd, { egressMbps: 16, ingressMbps: 30 }, { hostInterfaceExists: true, ifbExists: true });
  const started = performance.now();
  await runCommand(["tc", "-n", nsHost, "-batch", "-"], { input: tc.join("\n") + "\n" });
  return performance.now() - started;
}
