import { spawn, type ChildProcess } from "node:child_process";
import { constants } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";
import { isIPv4 } from "node:net";
import { createInterface } from "node:readline";
import { createLogger } from "../shared/log.js";
import type { EgressRecord } from "./egress-types.js";

const log = createLogger("egress-log");

/** How often the kernel log is drained (it is read non-blocking: no thread waits on it). */
const POLL_MS = 250;
/** One /dev/kmsg record is at most ~1 KiB (PRINTK_MESSAGE_MAX); a read returns one record. */
const RECORD_BYTES = 8192;
/** Records drained per poll at most, so a flood cannot hold the event loop. */
const MAX_RECORDS_PER_POLL = 2000;

/** The verdict letters of the nftables log prefixes (nft-ruleset.ts, KERNEL_LOG_NOTE). */
const VERDICTS: Record<string, { verdict: EgressRecord["verdict"]; reason: string }> = {
  A: { verdict: "allowed", reason: "allowed by policy" },
  D: { verdict: "denied", reason: "denied by policy" },
  F: { verdict: "denied", reason: "host, sandbox, loopback, link-local or reserved address" },
  P: { verdict: "denied", reason: "private address" },
};

/** `cbe:<table>:` — the log prefix of this server's table, then the verdict letter and a space. */
export function kernelLogPrefix(tableName: string): string {
  return `cbe:${tableName}:`;
}

/**
 * Parses one /dev/kmsg record ("6,123,456,-;cbe:cubicle:D IN=cb… SRC=10.88.0.2 DST=… PROTO=UDP
 * SPT=… DPT=…") of this table into the parts of an egress record; undefined for anything else.
 */
export function parseKernelLogRecord(
  record: string,
  prefix: string,
): { source: string; destination: string; protocol: "udp" | "icmp" | "tcp"; port: number | undefined; verdict: EgressRecord["verdict"]; reason: string; bytes: number | undefined; flow: KernelFlow | undefined } | undefined {
  const semicolon = record.indexOf(";");
  if (semicolon < 0) return undefined;
  const message = record.slice(semicolon + 1);
  if (!message.startsWith(prefix)) return undefined;
  const kind = VERDICTS[message.charAt(prefix.length)];
  if (!kind) return undefined;
  const field = (name: string) => new RegExp(`(?:^| )${name}=(\\S*)`).exec(message)?.[1];
  const source = field("SRC");
  const destination = field("DST");
  const proto = field("PROTO")?.toLowerCase();
  if (!source || !destination || !proto) return undefined;
  const protocol = proto === "udp" ? "udp" : proto === "icmp" ? "icmp" : proto === "tcp" ? "tcp" : undefined;
  if (!protocol) return undefined;
  const port = field("DPT");
  const length = field("LEN");
  return { source, destination, protocol, port: port ? Number(port) : undefined, verdict: kind.verdict, reason: kind.reason, bytes: length ? Number(length) : undefined, flow: flowOf(message, protocol, source, destination) };
}

/** A UDP or ICMP flow as conntrack names it: the key of its `flows` line and its `del` request. */
export interface KernelFlow {
  /** `udp SRC SPORT DST DPORT` or `icmp SRC ID DST TYPE`, as the helper's `flows` prints it. */
  key: string;
  /** The helper's `del …` line that ends it. */
  del: string;
}

const DECIMAL = /^\d{1,5}$/;

/** The flow of a logged packet; the transport fields follow PROTO= (the IP header has its own ID= and LEN=). */
function flowOf(message: string, protocol: string, source: string, destination: string): KernelFlow | undefined {
  if (!isIPv4(source) || !isIPv4(destination)) return undefined;
  const transport = message.slice(message.indexOf(" PROTO="));
  const field = (name: string) => {
    const value = new RegExp(` ${name}=(\\S*)`).exec(transport)?.[1];
    return value !== undefined && DECIMAL.test(value) ? value : undefined;
  };
  if (protocol === "udp") {
    const [sport, dport] = [field("SPT"), field("DPT")];
    if (!sport || !dport) return undefined;
    return { key: `udp ${source} ${sport} ${destination} ${dport}`, del: `del udp ${source} ${sport} ${destination} ${dport}` };
  }
  if (protocol === "icmp") {
    const [id, type, code] = [field("ID"), field("TYPE"), field("CODE")];
    if (!id || !type || !code) return undefined;
    return { key: `icmp ${source} ${id} ${destination} ${type}`, del: `del icmp ${source} ${id} ${destination} ${type} ${code}` };
  }
  return undefined;
}

export interface KernelEgressLogOptions {
  tableName: string;
  /** The sandbox holding a source address (undefined: not ours, ignored). */
  sandboxFor(address: string): string | undefined;
  audit(record: EgressRecord): void;
  /** Default /dev/kmsg (tests pass a FIFO or a file). */
  path?: string;
  /** Flow accounting (FLOW_ACCOUNTING_NOTE): off without it. */
  flows?: { helperPath: string; subnet: string; finished(record: EgressRecord): void };
}

/** Allowed flows waiting for their counts at most; the oldest is given up beyond. */
const MAX_TRACKED_FLOWS = 65_536;
/** How long after an unexpected end the flow watcher is started again. */
const FLOWS_RESTART_MS = 5_000;

/**
 * FLOW_ACCOUNTING_NOTE: an allowed UDP or ICMP flow is audited from its first packet (the kernel
 * log), and its bytes come from connection tracking when the kernel forgets the flow: the
 * helper's `flows` (conntrack.h), one process for the server's life, turns on conntrack
 * accounting and prints each ended flow of the subnet with its bytes both ways (IP packets,
 * headers included), which replace the first packet's length in the flow's record. A flow
 * ends when the kernel's timeout passes (30 s after its last packet for most UDP, 120 s for a
 * stream; 30 s for ICMP), or at once when its sandbox's network is released (the flows this log
 * tracks for the address are deleted from conntrack, so their counts come then and a later
 * sandbox at that address inherits none of them). Flows over the log's rate limit, and flows
 * that began before accounting was on, have no record or no counts.
 */
class FlowAccounting {
  private child: ChildProcess | undefined;
  private stopped = false;
  /** Flow key → its record, in the order they began. */
  private readonly tracked = new Map<string, { record: EgressRecord; flow: KernelFlow; source: string }>();

  constructor(private readonly options: NonNullable<KernelEgressLogOptions["flows"]>) {}

  start(): void {
    if (this.stopped) return;
    const child = spawn(this.options.helperPath, ["flows", "--subnet", this.options.subnet], { stdio: ["pipe", "pipe", "pipe"] });
    this.child = child;
    child.stdin!.on("error", () => undefined);
    let stderr = "";
    child.stderr!.on("data", (chunk: Buffer) => (stderr = (stderr + chunk.toString()).slice(-2000)));
    createInterface({ input: child.stdout! }).on("line", (line) => this.ended(line));
    child.on("error", (err) => {
      // Not startable (no helper binary): no restarts every few seconds, one warning.
      this.stopped = true;
      log.warn("cannot start the flow watcher: UDP and ICMP audit records keep their first packet's size", { error: String(err) });
    });
    child.on("exit", (code, signal) => {
      if (this.child === child) this.child = undefined;
      if (this.stopped) return;
      log.warn("the flow watcher ended; starting it again", { code, signal, stderr: stderr.trim() });
      setTimeout(() => this.start(), FLOWS_RESTART_MS).unref();
    });
  }

  stop(): void {
    this.stopped = true;
    this.child?.stdin?.end();
    this.child = undefined;
  }

  track(flow: KernelFlow, record: EgressRecord, source: string): void {
    // A key seen again is a new flow (the old one ended without a line, or before accounting).
    this.tracked.delete(flow.key);
    if (this.tracked.size >= MAX_TRACKED_FLOWS) this.tracked.delete(this.tracked.keys().next().value as string);
    this.tracked.set(flow.key, { record, flow, source });
  }

  /** A sandbox's network is gone: its tracked flows end now (their counts follow as lines). */
  release(address: string): void {
    const lines: string[] = [];
    for (const entry of this.tracked.values()) if (entry.source === address) lines.push(entry.flow.del);
    if (lines.length > 0 && this.child?.stdin?.writable) this.child.stdin.write(`${lines.join("\n")}\n`);
  }

  /** `udp SRC SPORT DST DPORT OUT IN` / `icmp SRC ID DST TYPE OUT IN` / `lost`. */
  private ended(line: string): void {
    if (line === "lost") return void log.warn("the kernel dropped conntrack events: some UDP/ICMP audit records keep their first packet's size");
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

/**
 * Turns the kernel's log lines for UDP, ICMP and other non-TCP flows (logged by the nftables
 * rules of KERNEL_LOG_NOTE, rate-limited per sandbox there) into egress audit records. TCP
 * never reaches these rules: the egress proxy audits it with its bytes. The first packet of a
 * flow is logged; an allowed flow's bytes follow when it ends (FLOW_ACCOUNTING_NOTE).
 */
export class KernelEgressLog {
  private handle: FileHandle | undefined;
  private timer: NodeJS.Timeout | undefined;
  private readonly buffer = Buffer.alloc(RECORD_BYTES);
  private readonly prefix: string;
  private draining = false;

  private readonly flows: FlowAccounting | undefined;

  constructor(private readonly options: KernelEgressLogOptions) {
    this.prefix = kernelLogPrefix(options.tableName);
    this.flows = options.flows ? new FlowAccounting(options.flows) : undefined;
  }

  /** The sandbox at `address` is gone: its flows end now, with their counts (FLOW_ACCOUNTING_NOTE). */
  released(address: string): void {
    this.flows?.release(address);
  }

  async start(): Promise<void> {
    try {
      this.handle = await open(this.options.path ?? "/dev/kmsg", constants.O_RDONLY | constants.O_NONBLOCK);
    } catch (err) {
      log.warn("cannot read the kernel log: UDP and ICMP egress attempts are not audited", { error: String(err) });
      return;
    }
    // What the log held before this start belongs to no sandbox of this run.
    await this.drain(false);
    this.flows?.start();
    this.timer = setInterval(() => void this.drain(true), POLL_MS);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    this.flows?.stop();
    clearInterval(this.timer);
    this.timer = undefined;
    const handle = this.handle;
    this.handle = undefined;
    await handle?.close().catch(() => undefined);
  }

  private async drain(deliver: boolean): Promise<void> {
    if (this.draining || !this.handle) return;
    this.draining = true;
    try {
      for (let n = 0; deliver ? n < MAX_RECORDS_PER_POLL : true; n++) {
        let bytesRead: number;
        try {
          ({ bytesRead } = await this.handle.read(this.buffer, 0, RECORD_BYTES, null));
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          // EPIPE: records were overwritten before we read them; the next read goes on.
          if (code === "EPIPE") continue;
          if (code !== "EAGAIN") log.warn("reading the kernel log failed", { error: String(err) });
          return;
        }
        if (bytesRead === 0) return;
        if (deliver) this.deliver(this.buffer.toString("utf8", 0, bytesRead));
      }
    } finally {
      this.draining = false;
    }
  }

  private deliver(record: string): void {
    const parsed = parseKernelLogRecord(record, this.prefix);
    if (!parsed) return;
    const sandboxId = this.options.sandboxFor(parsed.source);
    if (!sandboxId) return;
    const audited: EgressRecord = {
      time: Date.now(),
      sandboxId,
      protocol: parsed.protocol === "tcp" ? "tcp" : parsed.protocol,
      address: parsed.destination,
      port: parsed.port,
      domain: undefined,
      verdict: parsed.verdict,
      reason: parsed.reason,
      bytesOut: parsed.bytes,
      bytesIn: undefined,
      durationMs: undefined,
    };
    this.options.audit(audited);
    if (audited.verdict === "allowed" && parsed.flow) this.flows?.track(parsed.flow, audited, parsed.source);
  }
}
