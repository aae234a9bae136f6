import { constants } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";
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
export function parseKernelLogRecord(record: string, prefix: string): { source: string; destination: string; protocol: "udp" | "icmp" | "tcp"; port: number | undefined; verdict: EgressRecord["verdict"]; reason: string; bytes: number | undefined } | undefined {
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
  return { source, destination, protocol, port: port ? Number(port) : undefined, verdict: kind.verdict, reason: kind.reason, bytes: length ? Number(length) : undefined };
}

export interface KernelEgressLogOptions {
  tableName: string;
  /** The sandbox holding a source address (undefined: not ours, ignored). */
  sandboxFor(address: string): string | undefined;
  audit(record: EgressRecord): void;
  /** Default /dev/kmsg (tests pass a FIFO or a file). */
  path?: string;
}

/**
 * Turns the kernel's log lines for UDP, ICMP and other non-TCP flows (logged by the nftables
 * rules of KERNEL_LOG_NOTE, rate-limited per sandbox there) into egress audit records. TCP
 * never reaches these rules: the egress proxy audits it with its bytes. The first packet of a
 * flow is logged, so a record's bytes are that packet's length, not the flow's.
 */
export class KernelEgressLog {
  private handle: FileHandle | undefined;
  private timer: NodeJS.Timeout | undefined;
  private readonly buffer = Buffer.alloc(RECORD_BYTES);
  private readonly prefix: string;
  private draining = false;

  constructor(private readonly options: KernelEgressLogOptions) {
    this.prefix = kernelLogPrefix(options.tableName);
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
    this.timer = setInterval(() => void this.drain(true), POLL_MS);
    this.timer.unref();
  }

  async stop(): Promise<void> {
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
    this.options.audit({
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
    });
  }
}
