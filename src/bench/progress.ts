import { percentile } from "./stats.js";

/**
 * Live progress on stderr: a bar, the running p50/p99 and the error count, redrawn in place at
 * most every 100 ms. Disabled (silent) when stderr is not a TTY or CI=true; errors are then
 * only in the JSON.
 */
export class Progress {
  private done = 0;
  private errors = 0;
  private readonly samples: number[] = [];
  private lastDraw = 0;

  constructor(
    private readonly label: string,
    private readonly total: number,
    private readonly enabled: boolean,
  ) {
    this.draw(true);
  }

  /** One successful iteration and its latency. */
  sample(ms: number): void {
    this.done++;
    this.samples.push(ms);
    this.draw(false);
  }

  /** One failed iteration; the first few messages are printed on their own line. */
  error(message: string): void {
    this.done++;
    this.errors++;
    if (this.enabled && this.errors <= 5) process.stderr.write(`\r\x1b[K  error: ${message.split("\n")[0]!.slice(0, 200)}\n`);
    this.draw(true);
  }

  /** A free-form status (density: memory per sandbox). */
  note(text: string): void {
    if (this.enabled) process.stderr.write(`\r\x1b[K${this.label} ${text}`);
  }

  finish(): void {
    this.draw(true);
    if (this.enabled) process.stderr.write("\n");
  }

  private draw(force: boolean): void {
    if (!this.enabled) return;
    const now = performance.now();
    if (!force && now - this.lastDraw < 100 && this.done < this.total) return;
    this.lastDraw = now;
    const width = 24;
    const filled = this.total > 0 ? Math.min(width, Math.round((this.done / this.total) * width)) : 0;
    const sorted = [...this.samples].sort((a, b) => a - b);
    const stats = sorted.length ? `  p50 ${percentile(sorted, 50).toFixed(1)} ms  p99 ${percentile(sorted, 99).toFixed(1)} ms` : "";
    const errors = this.errors ? `  errors ${this.errors}` : "";
    process.stderr.write(`\r\x1b[K${this.label} [${"#".repeat(filled)}${".".repeat(width - filled)}] ${this.done}/${this.total}${stats}${errors}`);
  }
}
