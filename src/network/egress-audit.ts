/**
 * The egress audit log: what each sandbox tried to reach and what was decided, in memory and,
 * with a store, in the database too so a restart keeps it (AUDIT_PERSISTENCE_NOTE).
 *
 * Bounds (defaults): a sandbox's log keeps its newest 10,000 records; records older than 24 h
 * go; at most 1,000 sandboxes have a log and at most 100,000 records are kept in all — past
 * either, the least recently active log loses its oldest records first (an ended sandbox's
 * log stays until then, or until retention). A record takes at most ~1 KiB (its strings are
 * clipped: address 64, domain 253, reason 200 characters; measured 989 bytes with every string
 * at its limit), so the log holds at most ~100 MiB (~25 MiB with typical domains and reasons).
 *
 * Pages are newest first: the cursor is the sequence number of the last record returned, so
 * records added meanwhile (newer) never shift a later page and none is returned twice.
 *
 * AUDIT_PERSISTENCE_NOTE: with a store, records new or changed (a connection's bytes when it
 * closes) since the last flush are written every `flushIntervalMs` (default 250 ms) in one
 * transaction, at most FLUSH_MAX_ROWS a flush (a flood is written over the next flushes; what
 * the memory bounds drop meanwhile is never written), together with the drops the memory bounds
 * made since (per sandbox: everything below its oldest kept record) and the retention. The
 * database so holds what memory holds, as of the last flush; a server that starts loads the
 * newest records within retention (the same bounds), keeps their sequence numbers (a page
 * token stays valid across a restart) and continues after the highest. A crash loses at most
 * the last interval; a clean stop flushes. The Prometheus counters are written with the records
 * (same transaction) and continue from their written values after a restart, so a crash loses
 * what they counted in the same last interval and they never go back to zero.
 */
import type { EgressAuditStore } from "../store/index.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import type { MetricFamily } from "../shared/prometheus.js";
import type { EgressRecord } from "./egress-types.js";

export interface EgressAuditOptions {
  /** Newest records kept per sandbox (N). */
  maxRecordsPerSandbox?: number;
  /** Records older than this (by their `time`) are dropped. */
  retentionMs?: number;
  /** Sandboxes with a log at once (M). */
  maxSandboxes?: number;
  /** Records kept across all logs. */
  maxTotalRecords?: number;
  /** Epoch ms; injected by tests. */
  now?: () => number;
  /** Where records are kept across restarts (AUDIT_PERSISTENCE_NOTE); none: memory only. */
  store?: EgressAuditStore;
  /** How often new and changed records are written to the store. */
  flushIntervalMs?: number;
}

export interface EgressPage {
  /** Newest first. */
  items: EgressRecord[];
  /** Present when older records remain. */
  nextToken?: string;
}

export const EGRESS_AUDIT_DEFAULTS = {
  maxRecordsPerSandbox: 10_000,
  retentionMs: 24 * 60 * 60 * 1000,
  maxSandboxes: 1_000,
  maxTotalRecords: 100_000,
} as const;

const logger = createLogger("egress-audit");

const CLIP = { address: 64, domain: 253, reason: 200 } as const;

/** How often the whole log is swept for expired records (each call also trims what it touches). */
const SWEEP_INTERVAL_MS = 60_000;
/** Rows one flush writes at most (a few ms of SQLite): a flood is written over several flushes. */
const FLUSH_MAX_ROWS = 2_000;
/** Everything of a sandbox (its log was evicted). */
const ALL_SEQS = Number.MAX_SAFE_INTEGER;

/** One sandbox's records in sequence order; the dropped head is skipped by `start`, compacted now and then. */
class SandboxEgressLog {
  records: (EgressRecord | undefined)[] = [];
  seqs: number[] = [];
  start = 0;

  get size(): number {
    return this.records.length - this.start;
  }

  push(seq: number, record: EgressRecord): void {
    this.records.push(record);
    this.seqs.push(seq);
  }

  /** The sequence number of the oldest record kept; the next one's when none is. */
  oldestSeq(next: number): number {
    return this.size > 0 ? this.seqs[this.start]! : next;
  }

  dropOldest(): void {
    this.records[this.start] = undefined;
    this.start++;
    if (this.start >= 1024 && this.start * 2 >= this.records.length) {
      this.records = this.records.slice(this.start);
      this.seqs = this.seqs.slice(this.start);
      this.start = 0;
    }
  }

  oldestTime(): number | undefined {
    return this.size > 0 ? this.records[this.start]!.time : undefined;
  }

  /** Index of the first record whose sequence number is ≥ seq (binary search). */
  indexOfSeq(seq: number): number {
    let low = this.start;
    let high = this.records.length;
    while (low < high) {
      const mid = (low + high) >>> 1;
      if (this.seqs[mid]! < seq) low = mid + 1;
      else high = mid;
    }
    return low;
  }
}

function clip(text: string, max: number): string {
  return text.length > max ? text.slice(0, max) : text;
}

function encodeToken(seq: number): string {
  return Buffer.from(`egress.${seq}`).toString("base64url");
}

function decodeToken(token: string): number {
  const match = /^egress\.(\d{1,15})$/.exec(Buffer.from(token, "base64url").toString("utf8"));
  if (!match || token.length > 40) throw new CubicleError("invalid_argument", "nextToken is not a token this server issued");
  return Number(match[1]);
}

/**
 * Per-sandbox egress records and the Prometheus counters over all of them. The proxy calls
 * `record(rec)` when an attempt is decided, keeps updating that same object's bytes and
 * duration, and calls `finished(rec)` when the connection closes.
 */
export class EgressAuditLog {
  private readonly logs = new Map<string, SandboxEgressLog>();
  private readonly options: Required<Omit<EgressAuditOptions, "now" | "store" | "flushIntervalMs">>;
  private readonly now: () => number;
  private nextSeq = 1;
  private total = 0;
  private lastSweep = 0;
  private lastFlushSweep = 0;
  private readonly connections = new Map<string, { protocol: string; verdict: string; count: number }>();
  private bytesOut = 0;
  private bytesIn = 0;
  /** The counters changed since the last flush. */
  private countersChanged = false;
  private readonly finishedRecords = new WeakSet<EgressRecord>();
  private readonly store: EgressAuditStore | undefined;
  /** Each kept record's sequence number (for the store). */
  private readonly seqOf = new WeakMap<EgressRecord, number>();
  /** Records to write at the next flush, in the order they became dirty. */
  private readonly dirty = new Set<EgressRecord>();
  /** Sandboxes whose oldest records were dropped since the last flush. */
  private readonly dropped = new Set<string>();
  private readonly flushTimer: NodeJS.Timeout | undefined;

  constructor(options: EgressAuditOptions = {}) {
    this.options = {
      maxRecordsPerSandbox: Math.max(1, options.maxRecordsPerSandbox ?? EGRESS_AUDIT_DEFAULTS.maxRecordsPerSandbox),
      retentionMs: options.retentionMs ?? EGRESS_AUDIT_DEFAULTS.retentionMs,
      maxSandboxes: Math.max(1, options.maxSandboxes ?? EGRESS_AUDIT_DEFAULTS.maxSandboxes),
      maxTotalRecords: Math.max(1, options.maxTotalRecords ?? EGRESS_AUDIT_DEFAULTS.maxTotalRecords),
    };
    this.now = options.now ?? Date.now;
    this.store = options.store;
    if (this.store) {
      this.load(this.store);
      this.flushTimer = setInterval(() => this.flush(), options.flushIntervalMs ?? 250);
      this.flushTimer.unref();
    }
  }

  /** Writes what changed since the last flush to the store (AUDIT_PERSISTENCE_NOTE). Never throws. */
  flush(): void {
    if (!this.store || (this.dirty.size === 0 && this.dropped.size === 0 && !this.countersChanged && this.now() - this.lastFlushSweep < SWEEP_INTERVAL_MS)) return;
    const upserts = [];
    for (const rec of this.dirty) {
      if (upserts.length >= FLUSH_MAX_ROWS) break;
      this.dirty.delete(rec);
      const seq = this.seqOf.get(rec);
      if (seq !== undefined) upserts.push({ seq, sandboxId: rec.sandboxId, time: rec.time, body: JSON.stringify(rec) });
    }
    const dropBefore = [...this.dropped].map((sandboxId) => ({ sandboxId, seq: this.logs.get(sandboxId)?.oldestSeq(this.nextSeq) ?? ALL_SEQS }));
    this.dropped.clear();
    this.lastFlushSweep = this.now();
    const counters = this.countersChanged ? this.counterValues() : undefined;
    this.countersChanged = false;
    try {
      this.store.writeEgressAudit({ upserts, dropBefore, dropOlderThan: this.now() - this.options.retentionMs, counters });
    } catch (err) {
      // The memory log is whole; the database catches up at a later flush (or loses this one's rows).
      if (counters) this.countersChanged = true;
      logger.warn("could not write the egress audit log to the database", { error: String(err) });
    }
  }

  /** Flushes and stops the timer. */
  close(): void {
    if (this.flushTimer) clearInterval(this.flushTimer);
    while (this.dirty.size > 0 || this.dropped.size > 0) this.flush();
  }

  private load(store: EgressAuditStore): void {
    const rows = store.loadEgressAudit(this.now() - this.options.retentionMs, this.options.maxTotalRecords);
    for (const row of rows) {
      let rec: EgressRecord;
      try {
        rec = JSON.parse(row.body) as EgressRecord;
      } catch {
        continue;
      }
      if (typeof rec !== "object" || rec === null || rec.sandboxId !== row.sandboxId) continue;
      this.keep(rec, row.seq);
    }
    if (rows.length > 0) this.nextSeq = rows.at(-1)!.seq + 1;
    // What the bounds dropped while loading goes from the database at the first flush.
    for (const [name, value] of Object.entries(store.loadEgressCounters())) {
      if (!Number.isSafeInteger(value) || value < 0) continue;
      if (name === "bytes|out") this.bytesOut = value;
      else if (name === "bytes|in") this.bytesIn = value;
      else {
        const [kind, protocol, verdict] = name.split("|");
        if (kind === "connections" && protocol && verdict) this.connections.set(`${protocol}|${verdict}`, { protocol, verdict, count: value });
      }
    }
  }

  /** The counters as the store keeps them: `connections|<protocol>|<verdict>`, `bytes|out`, `bytes|in`. */
  private counterValues(): Record<string, number> {
    const values: Record<string, number> = { "bytes|out": this.bytesOut, "bytes|in": this.bytesIn };
    for (const { protocol, verdict, count } of this.connections.values()) values[`connections|${protocol}|${verdict}`] = count;
    return values;
  }

  /**
   * Keeps `rec` (the object itself: later changes to its bytes and duration show in `list`).
   * Strings longer than the log keeps (a hostile SNI) are clipped in place; a time that is not a
   * number becomes now.
   */
  record(rec: EgressRecord): void {
    if (!Number.isFinite(rec.time)) rec.time = this.now();
    rec.address = clip(rec.address, CLIP.address);
    if (rec.domain !== undefined) rec.domain = clip(rec.domain, CLIP.domain);
    rec.reason = clip(rec.reason, CLIP.reason);
    const key = `${rec.protocol}|${rec.verdict}`;
    const counter = this.connections.get(key);
    const attempts = Number.isSafeInteger(rec.attempts) && rec.attempts! > 1 ? rec.attempts! : 1;
    if (counter) counter.count += attempts;
    else this.connections.set(key, { protocol: rec.protocol, verdict: rec.verdict, count: attempts });
    this.countersChanged = true;

    this.sweepNowAndThen();
    this.keep(rec, this.nextSeq++);
    if (this.store) this.dirty.add(rec);
  }

  /** Adds `rec` with sequence number `seq` to its sandbox's log, within the bounds. */
  private keep(rec: EgressRecord, seq: number): void {
    let log = this.logs.get(rec.sandboxId);
    if (log) {
      // Map order is activity order: the first log is the least recently active.
      this.logs.delete(rec.sandboxId);
    } else {
      while (this.logs.size >= this.options.maxSandboxes) this.evictLog(this.logs.keys().next().value as string);
      log = new SandboxEgressLog();
    }
    this.logs.set(rec.sandboxId, log);
    log.push(seq, rec);
    this.seqOf.set(rec, seq);
    this.total++;
    if (log.size > this.options.maxRecordsPerSandbox) this.dropOldest(rec.sandboxId, log);
    while (this.total > this.options.maxTotalRecords) {
      const [oldestId, oldest] = this.logs.entries().next().value as [string, SandboxEgressLog];
      this.dropOldest(oldestId, oldest);
      if (oldest.size === 0) this.logs.delete(oldestId);
    }
  }

  /** The connection of `rec` closed: its bytes go into the totals (once, however often this is called). */
  finished(rec: EgressRecord): void {
    if (this.finishedRecords.has(rec)) return;
    this.finishedRecords.add(rec);
    if (Number.isFinite(rec.bytesOut) && rec.bytesOut! > 0) this.bytesOut += rec.bytesOut!;
    if (Number.isFinite(rec.bytesIn) && rec.bytesIn! > 0) this.bytesIn += rec.bytesIn!;
    this.countersChanged = true;
    // Its bytes and duration are final now: written again (if it is still kept).
    if (this.store && this.seqOf.has(rec)) this.dirty.add(rec);
  }

  /** True while records of this sandbox are kept. */
  has(sandboxId: string): boolean {
    const log = this.logs.get(sandboxId);
    if (!log) return false;
    this.expire(sandboxId, log);
    return this.logs.has(sandboxId);
  }

  /** A page of a sandbox's records, newest first; an unknown sandbox has none. */
  list(sandboxId: string, page: { limit: number; nextToken?: string }): EgressPage {
    const before = page.nextToken === undefined || page.nextToken === "" ? undefined : decodeToken(page.nextToken);
    const limit = Math.max(1, Math.floor(page.limit));
    const log = this.logs.get(sandboxId);
    if (!log) return { items: [] };
    this.expire(sandboxId, log);
    const end = before === undefined ? log.records.length : log.indexOfSeq(before);
    const first = Math.max(log.start, end - limit);
    const items: EgressRecord[] = [];
    for (let index = end - 1; index >= first; index--) items.push(log.records[index]!);
    return first > log.start ? { items, nextToken: encodeToken(log.seqs[first]!) } : { items };
  }

  /** Records kept now, in all logs. */
  get size(): number {
    return this.total;
  }

  /** `cubicle_egress_connections_total{protocol,verdict}` and `cubicle_egress_bytes_total{direction}`. */
  metricFamilies(): MetricFamily[] {
    return [
      {
        name: "cubicle_egress_connections_total",
        help: "Egress attempts of sandboxes (connections, datagrams, DNS queries), by protocol and verdict.",
        type: "counter",
        samples: [...this.connections.values()].map(({ protocol, verdict, count }) => ({ labels: { protocol, verdict }, value: count })),
      },
      {
        name: "cubicle_egress_bytes_total",
        help: "Bytes of finished egress connections through the proxy: out = sandbox to destination, in = back.",
        type: "counter",
        samples: [
          { labels: { direction: "out" }, value: this.bytesOut },
          { labels: { direction: "in" }, value: this.bytesIn },
        ],
      },
    ];
  }

  private dropOldest(sandboxId: string, log: SandboxEgressLog): void {
    const rec = log.records[log.start];
    if (rec) this.forget(rec);
    log.dropOldest();
    this.total--;
    if (this.store) this.dropped.add(sandboxId);
  }

  private evictLog(sandboxId: string): void {
    const log = this.logs.get(sandboxId);
    if (!log) return;
    for (let index = log.start; index < log.records.length; index++) this.forget(log.records[index]!);
    this.total -= log.size;
    this.logs.delete(sandboxId);
    if (this.store) this.dropped.add(sandboxId);
  }

  /** A dropped record is never written (again). */
  private forget(rec: EgressRecord): void {
    this.seqOf.delete(rec);
    this.dirty.delete(rec);
  }

  /** Drops this log's records past retention, and the log when nothing is left. */
  private expire(sandboxId: string, log: SandboxEgressLog): void {
    const cutoff = this.now() - this.options.retentionMs;
    // Records are in the order they were decided; a `time` out of order only delays its drop.
    while (log.size > 0 && log.oldestTime()! < cutoff) this.dropOldest(sandboxId, log);
    if (log.size === 0) this.logs.delete(sandboxId);
  }

  private sweepNowAndThen(): void {
    const now = this.now();
    if (now - this.lastSweep < SWEEP_INTERVAL_MS) return;
    this.lastSweep = now;
    for (const [sandboxId, log] of [...this.logs]) this.expire(sandboxId, log);
  }
}
