import { createHash } from "node:crypto";
import path from "node:path";
import { CubicleError } from "../shared/cubicle-error.js";
import { runCommand } from "../shared/exec.js";
import { pathExists } from "../shared/fs.js";
import { createLogger } from "../shared/log.js";

const log = createLogger("bandwidth");

/**
 * A sandbox's rate limits in Mbit/s (10^6 bit/s, counted on Ethernet frames). An absent key is
 * no limit in that direction. Egress is traffic from the sandbox, ingress traffic to it.
 */
export interface BandwidthLimits {
  egressMbps?: number;
  ingressMbps?: number;
}

export const MIN_MBPS = 0.1;
export const MAX_MBPS = 100_000;

const LIMIT_KEYS: ReadonlySet<string> = new Set(["egressMbps", "ingressMbps"]);
const COMMAND_TIMEOUT_MS = 15_000;
/** An Ethernet frame of a 1500-byte MTU: tbf drops (never sends) a non-GSO packet above its burst. */
const MAX_FRAME_BYTES = 1514;
/** Tokens banked for this long at the rate: enough to ride timer slack (HZ 250 = 4 ms) at any rate. */
const BURST_MS = 10;
/** Queue behind the bucket: this long at the rate, but never fewer than a few frames. */
const QUEUE_MS = 50;
const MIN_QUEUE_FRAMES = 4;
/** Fixed handles, so a repeated `replace` changes the same qdisc and filter in place. */
const INGRESS_HANDLE = "ffff:";
const REDIRECT_FILTER = "prio 1 handle 800::800 u32 match u32 0 0";

/**
 * Reads the Cubicle extension `{ egressMbps?, ingressMbps? }` found at `where` (named in
 * messages). undefined, null and `{}` mean no limits; anything else that is not exactly that
 * shape with rates in [0.1, 100000] is an invalid_argument.
 */
export function parseBandwidthLimits(value: unknown, where: string): BandwidthLimits | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "object" || Array.isArray(value)) {
    throw new CubicleError("invalid_argument", `${where} must be an object like {"egressMbps": 20, "ingressMbps": 40}, not ${describe(value)}`);
  }
  const unknown = Object.keys(value).filter((key) => !LIMIT_KEYS.has(key));
  if (unknown.length > 0) {
    throw new CubicleError("invalid_argument", `${where} has unknown key ${unknown.map((key) => JSON.stringify(key.slice(0, 64))).join(", ")}; it takes only egressMbps and ingressMbps`);
  }
  const limits: BandwidthLimits = {};
  for (const key of ["egressMbps", "ingressMbps"] as const) {
    if (!Object.hasOwn(value, key)) continue;
    const rate = (value as Record<string, unknown>)[key];
    if (rate === undefined) continue;
    if (typeof rate !== "number" || !Number.isFinite(rate) || rate < MIN_MBPS || rate > MAX_MBPS) {
      throw new CubicleError("invalid_argument", `${where}.${key} must be a number of Mbit/s from ${MIN_MBPS} to ${MAX_MBPS}, not ${describe(rate)}; leave it out for no limit`);
    }
    limits[key] = rate;
  }
  return limits.egressMbps === undefined && limits.ingressMbps === undefined ? undefined : limits;
}

/** The tbf parameters for a rate: bits/s, and burst and queue limit in bytes. */
export interface TokenBucket {
  rateBits: number;
  burstBytes: number;
  limitBytes: number;
}

/**
 * Burst = 10 ms of traffic at the rate, at least two full frames (tbf would drop a frame larger
 * than its burst, and a burst of one frame leaves no slack for timer lateness). Limit = the
 * burst plus a queue of 50 ms at the rate, at least four frames: short enough to keep latency
 * down, long enough that TCP sees few losses.
 */
export function tokenBucket(mbps: number): TokenBucket {
  const rateBits = Math.round(mbps * 1e6);
  const bytesPerMs = rateBits / 8 / 1000;
  const burstBytes = Math.max(2 * MAX_FRAME_BYTES, Math.ceil(bytesPerMs * BURST_MS));
  const queueBytes = Math.max(MIN_QUEUE_FRAMES * MAX_FRAME_BYTES, Math.ceil(bytesPerMs * QUEUE_MS));
  return { rateBits, burstBytes, limitBytes: burstBytes + queueBytes };
}

/**
 * The ifb that a host veth's incoming traffic (the sandbox's egress) is redirected to and shaped
 * on: "ifb" + 12 hex of the veth's name. Whoever deletes the veth deletes this too, if present.
 */
export function bandwidthIfbName(hostInterface: string): string {
  return "ifb" + createHash("sha256").update(checkInterfaceName(hostInterface)).digest("hex").slice(0, 12);
}

/** What applyBandwidthLimits found before it acted. */
export interface LinkState {
  hostInterfaceExists: boolean;
  ifbExists: boolean;
}

/** Batch scripts (one command a line) for `ip -batch -` before and after one `tc -batch -`. */
export interface BandwidthCommands {
  ipBefore: string[];
  tc: string[];
  ipAfter: string[];
}

/**
 * The commands that bring `hostInterface` to `limits` from any earlier limits, idempotently:
 *
 * - ingress (to the sandbox) leaves by the host veth: a tbf as its root qdisc;
 * - egress (from the sandbox) arrives on the host veth. This kernel has no police action (and
 *   policing drops where a shaper queues), so an ingress qdisc redirects every frame (u32 match
 *   all + mirred) to an ifb whose root tbf shapes it; the ifb re-injects it as received on the veth.
 *
 * `replace` with fixed handles changes a live limit in place; a limit is removed by a `replace`
 * then a `del` (a bare `del` of a missing qdisc fails). Without the host veth there is nothing
 * to shape: only the ifb is removed.
 */
export function bandwidthCommands(hostInterface: string, limits: BandwidthLimits | undefined, state: LinkState): BandwidthCommands {
  const dev = checkInterfaceName(hostInterface);
  const ifb = bandwidthIfbName(dev);
  const commands: BandwidthCommands = { ipBefore: [], tc: [], ipAfter: [] };
  const egress = limits?.egressMbps;
  const ingress = limits?.ingressMbps;
  if (!state.hostInterfaceExists) {
    if (egress !== undefined || ingress !== undefined) throw new CubicleError("not_found", `network interface ${dev} does not exist; cannot limit its bandwidth`);
    if (state.ifbExists) commands.ipAfter.push(`link del ${ifb}`);
    return commands;
  }
  if (egress !== undefined) {
    if (!state.ifbExists) commands.ipBefore.push(`link add ${ifb} type ifb`, `link set ${ifb} up`);
    // The shaper first, then the redirect: no frame passes an ifb without its limit.
    commands.tc.push(
      `qdisc replace dev ${ifb} root handle 1: ${tbf(egress)}`,
      `qdisc replace dev ${dev} handle ${INGRESS_HANDLE} ingress`,
      `filter replace dev ${dev} parent ${INGRESS_HANDLE} protocol all ${REDIRECT_FILTER} action mirred egress redirect dev ${ifb}`,
    );
  } else {
    // Deleting the ingress qdisc deletes its filter; the ifb goes after it (mirred drops what it
    // would send to a vanished device).
    commands.tc.push(`qdisc replace dev ${dev} handle ${INGRESS_HANDLE} ingress`, `qdisc del dev ${dev} handle ${INGRESS_HANDLE} ingress`);
    if (state.ifbExists) commands.ipAfter.push(`link del ${ifb}`);
  }
  if (ingress !== undefined) {
    commands.tc.push(`qdisc replace dev ${dev} root handle 1: ${tbf(ingress)}`);
  } else {
    // No handle on the stand-in: a replace with handle 1: over a tbf 1: would have to be a tbf.
    commands.tc.push(`qdisc replace dev ${dev} root pfifo`, `qdisc del dev ${dev} root`);
  }
  return commands;
}

export interface ApplyBandwidthOptions {
  /** The network namespace that holds `hostInterface` (and gets the ifb). Default: this process's. */
  netns?: string;
}

/**
 * Sets, changes or removes (`limits` undefined) the limits of a live host veth, idempotently.
 * One `tc -batch` run; an `ip -batch` run before it when an egress limit needs a new ifb, or
 * after it when a removed one leaves an ifb behind. Calls for one interface must not overlap
 * (the sandbox's lock serialises them).
 */
export async function applyBandwidthLimits(hostInterface: string, limits: BandwidthLimits | undefined, options: ApplyBandwidthOptions = {}): Promise<void> {
  const dev = checkInterfaceName(hostInterface);
  const ifb = bandwidthIfbName(dev);
  const netnsArgs = options.netns === undefined ? [] : ["-n", checkNetnsName(options.netns)];
  const state = await readLinkState(dev, ifb, options.netns);
  const commands = bandwidthCommands(dev, limits, state);
  const batch = async (tool: "ip" | "tc", lines: string[]) => {
    if (lines.length > 0) await runCommand([tool, ...netnsArgs, "-batch", "-"], { input: lines.join("\n") + "\n", timeoutMs: COMMAND_TIMEOUT_MS });
  };
  await batch("ip", commands.ipBefore);
  await batch("tc", commands.tc);
  await batch("ip", commands.ipAfter);
  log.debug("bandwidth limits applied", { hostInterface: dev, netns: options.netns, egressMbps: limits?.egressMbps, ingressMbps: limits?.ingressMbps });
}

function tbf(mbps: number): string {
  const { rateBits, burstBytes, limitBytes } = tokenBucket(mbps);
  return `tbf rate ${rateBits}bit burst ${burstBytes} limit ${limitBytes}`;
}

/** Free in this process's namespace (sysfs); one `ip` run for another namespace. */
async function readLinkState(dev: string, ifb: string, netns: string | undefined): Promise<LinkState> {
  if (netns === undefined) {
    const [hostInterfaceExists, ifbExists] = await Promise.all([pathExists(path.join("/sys/class/net", dev)), pathExists(path.join("/sys/class/net", ifb))]);
    return { hostInterfaceExists, ifbExists };
  }
  const result = await runCommand(["ip", "-n", checkNetnsName(netns), "-o", "link", "show"], { timeoutMs: COMMAND_TIMEOUT_MS });
  // Lines look like "7: cbx1@if6: <BROADCAST,...": the name ends at "@" or ":".
  const names = new Set(result.stdout.split("\n").map((line) => /^\d+:\s+([^@:\s]+)/.exec(line)?.[1]).filter((name): name is string => name !== undefined));
  return { hostInterfaceExists: names.has(dev), ifbExists: names.has(ifb) };
}

/** Interface names go into batch scripts: a Linux name (≤ 15 chars) without spaces or separators. */
function checkInterfaceName(name: string): string {
  if (typeof name !== "string" || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$/.test(name)) {
    throw new CubicleError("invalid_argument", `network interface name ${JSON.stringify(String(name).slice(0, 64))} must be 1–15 letters, digits, _, . or -`);
  }
  return name;
}

function checkNetnsName(name: string): string {
  if (typeof name !== "string" || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$/.test(name)) {
    throw new CubicleError("invalid_argument", `network namespace name ${JSON.stringify(String(name).slice(0, 64))} must be letters, digits, _, . or -`);
  }
  return name;
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return `the string ${JSON.stringify(value.slice(0, 32))}`;
  return `a ${typeof value}`;
}
