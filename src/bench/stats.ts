/** Summary statistics of latency samples (ms), as the benchmark reports print them. */
export interface LatencySummary {
  count: number;
  avg: number;
  min: number;
  p50: number;
  p90: number;
  p95: number;
  p99: number;
  max: number;
}

/** Nearest-rank percentile of sorted samples. */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))]!;
}

export function summarize(samples: readonly number[]): LatencySummary {
  const sorted = [...samples].sort((a, b) => a - b);
  const round = (v: number) => Math.round(v * 100) / 100;
  return {
    count: sorted.length,
    avg: round(sorted.reduce((a, b) => a + b, 0) / (sorted.length || 1)),
    min: round(sorted[0] ?? NaN),
    p50: round(percentile(sorted, 50)),
    p90: round(percentile(sorted, 90)),
    p95: round(percentile(sorted, 95)),
    p99: round(percentile(sorted, 99)),
    max: round(sorted[sorted.length - 1] ?? NaN),
  };
}

/** A ratio of two medians with a percentile-bootstrap confidence interval over paired samples. */
export interface PairedRatio {
  pairs: number;
  /** median(treatment) ÷ median(control). */
  ratio: number;
  /** Median of the per-pair ratios (treatment_i ÷ control_i). */
  medianPairRatio: number;
  /** The 95 % interval of the ratio of medians, pairs resampled with replacement. */
  ci95: [number, number];
  resamples: number;
}

/** Mulberry32: a small seeded generator, so a bootstrap is reproducible from its samples. */
function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/**
 * median(treatment) ÷ median(control) of paired samples (pair i measured back to back), with a
 * bootstrap interval that resamples whole pairs, so drift shared by a pair cancels.
 */
export function pairedRatio(control: readonly number[], treatment: readonly number[], resamples = 2000, seed = 1): PairedRatio {
  if (control.length !== treatment.length) throw new RangeError("pairedRatio needs as many control as treatment samples");
  const n = control.length;
  if (n === 0) return { pairs: 0, ratio: NaN, medianPairRatio: NaN, ci95: [NaN, NaN], resamples: 0 };
  const random = seededRandom(seed);
  const ratios: number[] = [];
  const c: number[] = new Array(n);
  const t: number[] = new Array(n);
  for (let r = 0; r < resamples; r++) {
    for (let i = 0; i < n; i++) {
      const k = Math.floor(random() * n);
      c[i] = control[k]!;
      t[i] = treatment[k]!;
    }
    ratios.push(median(t) / median(c));
  }
  ratios.sort((a, b) => a - b);
  const round = (v: number) => Math.round(v * 10_000) / 10_000;
  return {
    pairs: n,
    ratio: round(median(treatment) / median(control)),
    medianPairRatio: round(median(control.map((v, i) => treatment[i]! / v))),
    ci95: [round(percentile(ratios, 2.5)), round(percentile(ratios, 97.5))],
    resamples,
  };
}
