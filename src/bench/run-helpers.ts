import { runPool } from "../shared/pool.js";
import { Progress } from "./progress.js";
/** Small helpers the scenarios share: timing, error classification (bounded concurrency: runPool in src/shared/pool.ts). */

export function fulfilled<T>(results: PromiseSettledResult<T>[]): T[] {
  return results.filter((r): r is PromiseFulfilledResult<T> => r.status === "fulfilled").map((r) => r.value);
}

export function rejectedMessages<T>(results: PromiseSettledResult<T>[]): string[] {
  return results.filter((r): r is PromiseRejectedResult => r.status === "rejected").map((r) => errorMessage(r.reason));
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? `${err.name}: ${err.message}` : String(err);
}

/** Milliseconds `fn` took, rounded to 0.01 ms, with its value. */
export async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const t0 = performance.now();
  const value = await fn();
  return { ms: round2(performance.now() - t0), value };
}

export function round2(v: number): number {
  return Math.round(v * 100) / 100;
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * True when a failure means "the server does not offer this" (HTTP 501 `unimplemented`, or an
 * SDK error that says so), as opposed to a feature that exists and broke.
 */
export function isNotAvailable(err: unknown): boolean {
  const text = errorMessage(err);
  return /\b501\b|unimplemented|not available|not implemented|not supported/i.test(text);
}

/** Thrown by a scenario to record `{"status": "not available", "reason": …}` instead of numbers. */
export class NotAvailable extends Error {
  override name = "NotAvailable";
}

/**
 * Runs `once` `total` times at `concurrency`, drawing progress (its `firstCommandMs` samples and
 * errors) under `label`. A `NotAvailable` failure is not counted as an error: the caller turns it
 * into a "not available" result.
 */
export async function runMeasured<T extends { firstCommandMs: number }>(
  label: string,
  options: { total: number; concurrency: number; progress: boolean },
  once: () => Promise<T>,
): Promise<{ results: PromiseSettledResult<T>[]; wallMs: number }> {
  const progress = new Progress(label, options.total, options.progress);
  const started = performance.now();
  const results = await runPool(options.total, options.concurrency, async () => {
    try {
      const sample = await once();
      progress.sample(sample.firstCommandMs);
      return sample;
    } catch (err) {
      if (!(err instanceof NotAvailable)) progress.error(errorMessage(err));
      throw err;
    }
  });
  const wallMs = performance.now() - started;
  progress.finish();
  return { results, wallMs };
}
