import { spawn, type ChildProcess } from "node:child_process";
import { isIPv4 } from "node:net";
import { createInterface } from "node:readline";
import { createLogger } from "../shared/log.js";
import type { EgressRecord } from "./egress-types.js";
import { LOG_RATE } from "./nft-ruleset.js";

const log = createLogger("egress-log");

/** How long the helper may take to bind its NFLOG group at start. */
const START_TIMEOUT_MS = 10_000;

/** The verdict letters of the NFLOG prefixes (nft-ruleset.ts, KERNEL_LOG_NOTE). */
const VERDICT_LETTERS: Record<string, { verdict: EgressRecord["verdict"]; reason: string }> = {
  A: { verdict: "allowed", reason: "allowed by policy" },
  D: { verdict: "denied", reason: "denied by policy" },
  F: { verdict: "denied", reason: "host, sandbox, loopback, link-local or reserved address" },
  P: { verdict: "denied", reason: "private address" },
  Q: { verdict: "denied", reason: "UDP to a host with header rules (QUIC is refused so the client uses TCP, where they are injected)" },
};

/** The reason's tail of a lowercase letter: the first packet past the log's rate limit in a second. */
export const PAST_LOG_LIMIT = `past the audit's limit of ${LOG_RATE} new flows a second from this sandbox: the flows after this one in the same second are not recorded`;

const VERDICTS: Record<string, { verdict: EgressRecord["verdict"]; reason: string }> = {
  ...VERDICT_LETTERS,
  ...Object.fromEntries(Object.entries(VERDICT_LETTERS).map(([letter, kind]) => [letter.toLowerCase(), { verdict: kind.verdict, reason: `${kind.reason}; ${PAST_LOG_LIMIT}` }])),
};

/**
 * The NFLOG group a server's table asks for first, from its table name (servers on one host
 * have tables of their own); the helper takes the next free one when another process holds it.
 */
export function firstLogGroup(tableName: string): number {
  let hash = 0;
  for (const char of tableName) hash = (Math.imul(hash, 31) + char.charCodeAt(0)) >>> 0;
  return 1 + (hash % 60_000);
}

/** A logged packet, as the helper's `log …` line names it (nflog.h). */
export interface LoggedPacket {
  source: string;
  destination: string;
  protocol: "udp" | "icmp" | "tcp";
  port: number | undefined;
  verdict: EgressRecord["verdict"];
  reason: string;
  /** IP bytes of the packets this line stands for. */
  bytes: number;
  /** Packets folded into the line (denied ones to one target within a second), 1 or more. */
  count: number;
  flow: KernelFlow | undefined;
}

const DECIMAL = /^\d{1,20}$/;

/**
 * Parses the helper's `log L udp|tcp SRC SPORT DST DPORT BYTES COUNT` or
 * `log L icmp SRC ID DST TYPE CODE BYTES COUNT`; undefined for anything else.
 */
export function parseLogLine(line: string): LoggedPacket | undefined {
  const fields = line.split(" ");
  if (fields[0] !== "log") return undefined;
  const kind = VERDICTS[fields[1] ?? ""];
  const protocol = fields[2];
  if (!kind || (protocol !== "udp" && protocol !== "tcp" && protocol !== "icmp")) return undefined;
  const numbers = protocol === "icmp" ? [fields[4], fields[6], fields[7], fields[8], fields[9]] : [fields[4], fields[6], fields[7], fields[8]];
  if (fields.length !== (protocol === "icmp" ? 10 : 9) || numbers.some((value) => value === undefined || !DECIMAL.test(value))) return undefined;
  const [source, destination] = [fields[3]!, fields[5]!];
  if (!isIPv4(source) || !isIPv4(destination)) return undefined;
  const [bytes, count] = [Number(fields.at(-2)), Number(fields.at(-1))];
  if (!Number.isSafeInteger(bytes) || !Number.isSafeInteger(count) || count < 1) return undefined;
  if (protocol === "icmp") {
    const [id, type, code] = [fields[4]!, fields[6]!, fields[7]!];
    return { source, destination, protocol, port: undefined, verdict: kind.verdict, reason: kind.reason, bytes, count, flow: { key: `icmp ${source} ${id} ${destination} ${type}`, del: `del icmp ${source} ${id} ${destination} ${type} ${code}` } };
  }
  const [sport, dport] = [fields[4]!, fields[6]!];
  const flow = protocol === "udp" ? { key: `udp ${source} ${sport} ${destination} ${dport}`, del: `del udp ${source} ${sport} ${destination} ${dport}` } : undefined;
  return { source, destination, protocol, port: Number(dport), verdict: kind.verdict, reason: kind.reason, bytes, count, flow };
}

/** A UDP or ICMP flow as conntrack names it: the key of its `flows` line and its `del` request. */
export interface KernelFlow {
  /** `udp SRC SPORT DST DPORT` or `icmp SRC ID DST TYPE`, as the helper's `flows` prints it. */
  key: string;
  /** The helper's `del …` line that ends it. */
  del: string;
}

export interface KernelEgressLogOptions {
  /** The NFLOG group to ask for first (firstLogGroup). */
  firstGroup: number;
  /** dist/sandbox-helper (its `flows`). */
  helperPath: string;
  /** The sandbox pool: packets from elsewhere are not ours. */
  subnet: string;
  /** The sandbox holding a source address (undefined: not ours, ignored). */
  sandboxFor(address: string): string | undefined;
  audit(record: EgressRecord): void;
  /** An allowed flow ended: its record has its bytes now. */
  finished(record: EgressRecord): void;
}

/** Allowed flows waiting for their counts at most; the oldest is given up beyond. */
const MAX_TRACKED_FLOWS = 65_536;
/** How long after an unexpected end the helper is started again. */
const RESTART_MS = 5_000;

/**
 * Turns the packets the nftables rules log (KERNEL_LOG_NOTE: the first packet of each UDP, ICMP
 * or floor-dropped flow a sandbox starts, through an NFLOG group) into egress audit records,
 * and gives allowed flows their bytes when they end (FLOW_ACCOUNTING_NOTE). Both come from one
 * process for the server's life, the helper's `flows` (nflog.h, conntrack.h). TCP past the
 * floor never reaches these rules: the egress proxy audits it with its bytes.
 *
 * FLOW_ACCOUNTING_NOTE: an allowed UDP or ICMP flow is audited from its first packet, and its
 * bytes come from connection tracking when the kernel forgets the flow: `flows` turns on
 * conntrack accounting and prints each ended flow of the subnet with its bytes both ways (IP
 * packets, headers included), which replace the first packet's length in the flow's record. A
 * flow ends when the kernel's timeout passes (30 s after its last packet for most UDP, 120 s for
 * a stream; 30 s for ICMP), or at once when its sandbox's network is released (the flows this
 * log tracks for the address are deleted from conntrack, so their counts come then and a later
 * sandbox at that address inherits none of them). Flows over the log's rate limit, and flows
 * that began before accounting was on, have no record or no counts.
 */
export class KernelEgressLog {
  private child: ChildProcess | undefined;
  private stopped = false;
  /** The NFLOG group the helper bound (the rules log to it). */
  private group: number | undefined;
  /** Flow key → its record, in the order they began. */
  private readonly tracked = new Map<string, { record: EgressRecord; flow: KernelFlow; source: string }>();

  constructor(private readonly options: KernelEgressLogOptions) {}

  /** Starts the helper; resolves with the NFLOG group it bound, or undefined when it cannot run (audit of UDP/ICMP off, warned). */
  async start(): Promise<number | undefined> {
    this.group = await this.spawn(this.options.firstGroup);
    return this.group;
  }

  private spawn(firstGroup: number): Promise<number | undefined> {
    return new Promise((resolve) => {
      let settled = false;
      const settle = (group: number | undefined) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve(group);
      };
      const child = spawn(this.options.helperPath, ["flows", "--subnet", this.options.subnet, "--log-group", String(firstGroup)], { stdio: ["pipe", "pipe", "pipe"] });
      this.child = child;
      const timer = setTimeout(() => {
        log.warn("the egress log helper did not bind an NFLOG group in time: UDP and ICMP egress is not audited");
        settle(undefined);
      }, START_TIMEOUT_MS);
      child.stdin!.on("error", () => undefined);
      let stderr = "";
      child.stderr!.on("data", (chunk: Buffer) => (stderr = (stderr + chunk.toString()).slice(-2000)));
      createInterface({ input: child.stdout! }).on("line", (line) => {
        const bound = /^group (\d+)$/.exec(line);
        if (bound) return settle(Number(bound[1]));
        this.line(line);
      });
      child.on("error", (err) => {
        // Not startable (no helper binary): no restarts every few seconds, one warning.
        this.stopped = true;
        log.warn("cannot start the egress log helper: UDP and ICMP egress is not audited", { error: String(err) });
        settle(undefined);
      });
      child.on("exit", (code, signal) => {
        if (this.child === child) this.child = undefined;
        if (!settled) log.warn("the egress log helper could not start: UDP and ICMP egress is not audited", { code, signal, stderr: stderr.trim() });
        settle(undefined);
        if (this.stopped || this.group === undefined) return;
        log.warn("the egress log helper ended; starting it again", { code, signal, stderr: stderr.trim() });
        setTimeout(() => void this.restart(), RESTART_MS).unref();
      });
    });
  }

  /** The same group again: the rules log to it (only another process taking it meanwhile loses it). */
  private async restart(): Promise<void> {
    if (this.stopped || this.group === undefined) return;
    const group = await this.spawn(this.group);
    if (group !== this.group) log.warn("the egress log helper could not bind its NFLOG group again: UDP and ICMP egress is not audited until a restart", { group: this.group, bound: group });
  }

  async stop(): Promise<void> {
    this.stopped = true;
    const child = this.child;
    this.child = undefined;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.stdin?.end();
    await exited;
  }

  /** The sandbox at `address` is gone: its tracked flows end now (their counts follow as lines). */
  released(address: string): void {
    const lines: string[] = [];
    for (const entry of this.tracked.values()) if (entry.source === address) lines.push(entry.flow.del);
    if (lines.length > 0 && this.child?.stdin?.writable) this.child.stdin.write(`${lines.join("\n")}\n`);
  }

  private line(line: string): void {
    if (line.startsWith("log ")) return this.logged(line);
    if (line === "lost-log") return void log.warn("the kernel dropped logged packets: some UDP/ICMP egress attempts have no audit record");
    if (line === "lost") return void log.warn("the kernel dropped conntrack events: some UDP/ICMP audit records keep their first packet's size");
    this.ended(line);
  }

  private logged(line: string): void {
    const packet = parseLogLine(line);
    if (!packet) return;
    const sandboxId = this.options.sandboxFor(packet.source);
    if (!sandboxId) return;
    const record: EgressRecord = {
      time: Date.now(),
      sandboxId,
      protocol: packet.protocol,
      address: packet.destination,
      port: packet.port,
      domain: undefined,
      verdict: packet.verdict,
      reason: packet.reason,
      bytesOut: packet.bytes,
      bytesIn: undefined,
      durationMs: undefined,
    };
    if (packet.count > 1) record.attempts = packet.count;
    this.options.audit(record);
    if (record.verdict === "allowed" && packet.flow) this.track(packet.flow, record, packet.source);
  }

  private track(flow: KernelFlow, record: EgressRecord, source: string): void {
    // A key seen again is a new flow (the old one ended without a line, or before accounting).
    this.tracked.delete(flow.key);
    if (this.tracked.size >= MAX_TRACKED_FLOWS) this.tracked.delete(this.tracked.keys().next().value as string);
    this.tracked.set(flow.key, { record, flow, source });
  }

  /** `udp SRC SPORT DST DPORT OUT IN` / `icmp SRC ID DST TYPE OUT IN`: a flow ended. */
  private ended(line: string): void {
    const fields = line.split(" ");
    if (fields.length !== 7) return;
    const key = fields.slice(0, 5).join(" ");
    const entry = this.tracked.get(key);
    if (!entry) return;
    this.tracked.delete(key);
    const [bytesOut, bytesIn] = [Number(fields[5]), Number(fields[6])];
    if (!Number.isSafeInteger(bytesOut) || !Number.isSafeInteger(bytesIn)) return;
    // Counts are only there when accounting was on as the flow began: none keeps the first packet's.
    if (bytesOut === 0 && bytesIn === 0) return;
    entry.record.bytesOut = bytesOut;
    entry.record.bytesIn = bytesIn;
    entry.record.durationMs = Math.max(0, Date.now() - entry.record.time);
    this.options.finished(entry.record);
  }
}
