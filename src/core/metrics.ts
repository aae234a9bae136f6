/**
 * Sandbox metrics over time (`GET /sandboxes/{id}/metrics?start=&end=`): every running sandbox
 * is sampled once per METRICS_BUCKET_SEC bucket, like upstream's collector, and the last
 * METRICS_RETAINED_SAMPLES samples of each are kept in memory (an hour: 12 KiB per sandbox in
 * typed arrays). A paused sandbox keeps its history and gets no new samples; an ended one's
 * history goes with it. A request whose range reaches the current bucket takes that bucket's
 * sample on the spot (or retakes it), so a new sandbox has metrics at once and the newest
 * sample is never older than the request.
 *
 * A round costs little at scale: the runtime reads kernel files synchronously (KERNEL_FILES_NOTE),
 * so a round goes in batches of COLLECT_BATCH sandboxes with the event loop free between them,
 * and a sandbox frozen for idleness is not read at all: none of its processes can run, so its
 * newest sample carries on with no CPU use (memory and disk stay as they were).
 */
import type { SandboxStats } from "../runtime/types.js";
import { createLogger } from "../shared/log.js";

const log = createLogger("metrics");

export const METRICS_BUCKET_SEC = 5;
export const METRICS_RETAINED_SAMPLES = 720;
/** Sandboxes sampled per turn of the event loop in a collector round (~0.15 ms each). */
const COLLECT_BATCH = 16;

/** One sample: the bucket's start (unix seconds) and the sandbox's stats then. */
export interface MetricSample extends SandboxStats {
  timestampSec: number;
}

const fields = ["timestampSec", "cpuCount", "cpuUsedPct", "memUsedBytes", "memTotalBytes", "memCacheBytes", "diskUsedBytes", "diskTotalBytes"] as const;

/** A fixed ring of samples in one Float64Array (fields side by side), oldest overwritten first. */
class SampleRing {
  private readonly values = new Float64Array(METRICS_RETAINED_SAMPLES * fields.length);
  private next = 0;
  private count = 0;

  push(sample: MetricSample): void {
    if (this.lastBucket() === sample.timestampSec) {
      // The current bucket's sample, taken again: replaced, still one per bucket.
      this.next = (this.next - 1 + METRICS_RETAINED_SAMPLES) % METRICS_RETAINED_SAMPLES;
      this.count--;
    }
    const base = this.next * fields.length;
    fields.forEach((field, index) => (this.values[base + index] = sample[field]));
    this.next = (this.next + 1) % METRICS_RETAINED_SAMPLES;
    this.count = Math.min(this.count + 1, METRICS_RETAINED_SAMPLES);
  }

  /** The newest sample, if any. */
  newest(): MetricSample | undefined {
    return this.count === 0 ? undefined : this.sampleAt((this.next - 1 + METRICS_RETAINED_SAMPLES) % METRICS_RETAINED_SAMPLES);
  }

  /** The newest sample's bucket, or -Infinity. */
  lastBucket(): number {
    if (this.count === 0) return -Infinity;
    return this.values[((this.next - 1 + METRICS_RETAINED_SAMPLES) % METRICS_RETAINED_SAMPLES) * fields.length]!;
  }

  /** Samples with `start <= timestampSec <= end`, oldest first. */
  range(start: number, end: number): MetricSample[] {
    const found: MetricSample[] = [];
    const first = (this.next - this.count + METRICS_RETAINED_SAMPLES) % METRICS_RETAINED_SAMPLES;
    for (let offset = 0; offset < this.count; offset++) {
      const slot = (first + offset) % METRICS_RETAINED_SAMPLES;
      const timestampSec = this.values[slot * fields.length]!;
      if (timestampSec >= start && timestampSec <= end) found.push(this.sampleAt(slot));
    }
    return found;
  }

  private sampleAt(slot: number): MetricSample {
    const base = slot * fields.length;
    const sample = {} as MetricSample;
    fields.forEach((field, index) => (sample[field] = this.values[base + index]!));
    return sample;
  }
}

export interface MetricsSource {
  /** Runtime ids of the sandboxes running now, by sandbox id. */
  running(): Map<string, string>;
  /** Whether a sandbox is still known (running or paused): an ended one's history is dropped. */
  isKnown(sandboxId: string): boolean;
  /** Whether a running sandbox is frozen for idleness (its newest sample carries on, CPU 0). */
  frozen?(sandboxId: string): boolean;
  stats(runtimeId: string): Promise<SandboxStats>;
}

export class SandboxMetrics {
  private readonly rings = new Map<string, SampleRing>();
  private timer: NodeJS.Timeout | undefined;
  private collecting: Promise<void> | undefined;
  /** Samples in flight per sandbox, so a request and the collector never sample one bucket twice. */
  private readonly sampling = new Map<string, Promise<void>>();

  constructor(
    private readonly source: MetricsSource,
    private readonly now: () => number = Date.now,
  ) {}

  /** Samples every running sandbox at the start of each bucket from now on. */
  start(): void {
    if (this.timer) return;
    const tick = () => {
      this.collecting ??= this.collect().finally(() => (this.collecting = undefined));
      const ms = this.now();
      this.timer = setTimeout(tick, METRICS_BUCKET_SEC * 1000 - (ms % (METRICS_BUCKET_SEC * 1000)) + 50);
      this.timer.unref();
    };
    tick();
  }

  async stop(): Promise<void> {
    clearTimeout(this.timer);
    this.timer = undefined;
    await this.collecting;
  }

  /** One round: a sample of every running sandbox whose current bucket has none; drops ended ones. */
  async collect(): Promise<void> {
    const running = this.source.running();
    for (const sandboxId of [...this.rings.keys()]) {
      if (!running.has(sandboxId) && !this.source.isKnown(sandboxId)) this.rings.delete(sandboxId);
    }
    const toSample: Array<[string, string]> = [];
    const bucket = bucketOf(this.now() / 1000);
    for (const [sandboxId, runtimeId] of running) {
      const ring = this.rings.get(sandboxId);
      const newest = this.source.frozen?.(sandboxId) ? ring?.newest() : undefined;
      if (newest && newest.timestampSec < bucket) ring!.push({ ...newest, cpuUsedPct: 0, timestampSec: bucket });
      else if (!newest) toSample.push([sandboxId, runtimeId]);
    }
    for (let start = 0; start < toSample.length; start += COLLECT_BATCH) {
      if (start > 0) await new Promise((resolve) => setImmediate(resolve));
      await Promise.all(toSample.slice(start, start + COLLECT_BATCH).map(([sandboxId, runtimeId]) => this.sample(sandboxId, runtimeId)));
    }
  }

  /**
   * Samples in `[startSec, endSec]` (unix seconds, both optional: from the oldest kept, to now).
   * `runtimeId` is given when the sandbox runs: an empty current bucket in range is sampled now.
   */
  async range(sandboxId: string, runtimeId: string | undefined, startSec?: number, endSec?: number): Promise<MetricSample[]> {
    const nowSec = this.now() / 1000;
    const end = endSec ?? nowSec;
    const start = startSec ?? 0;
    if (runtimeId !== undefined && end >= bucketOf(nowSec)) await this.sample(sandboxId, runtimeId, true);
    return this.rings.get(sandboxId)?.range(start, end) ?? [];
  }

  /** The newest sample of each sandbox (sampled now when its current bucket has none). */
  async latest(sandboxes: Map<string, string | undefined>): Promise<Map<string, MetricSample>> {
    const found = new Map<string, MetricSample>();
    await Promise.all(
      [...sandboxes].map(async ([sandboxId, runtimeId]) => {
        const samples = await this.range(sandboxId, runtimeId);
        const newest = samples[samples.length - 1];
        if (newest) found.set(sandboxId, newest);
      }),
    );
    return found;
  }

  /** Samples the current bucket unless it has a sample already (`retake`: replaces that one). */
  private sample(sandboxId: string, runtimeId: string, retake = false): Promise<void> {
    const bucket = bucketOf(this.now() / 1000);
    const ring = this.rings.get(sandboxId);
    if (!retake && ring && ring.lastBucket() >= bucket) return Promise.resolve();
    let pending = this.sampling.get(sandboxId);
    if (!pending) {
      pending = this.source
        .stats(runtimeId)
        .then((stats) => {
          // Ended while it was read: nothing to keep.
          if (!this.source.isKnown(sandboxId)) return;
          let target = this.rings.get(sandboxId);
          if (!target) this.rings.set(sandboxId, (target = new SampleRing()));
          if (target.lastBucket() <= bucket) target.push({ ...stats, timestampSec: bucket });
        })
        .catch((reason: unknown) => log.debug("no sample", { sandboxId, reason: (reason as Error).message }))
        .finally(() => this.sampling.delete(sandboxId));
      this.sampling.set(sandboxId, pending);
    }
    return pending;
  }
}

function bucketOf(unixSec: number): number {
  return Math.floor(unixSec / METRICS_BUCKET_SEC) * METRICS_BUCKET_SEC;
}
