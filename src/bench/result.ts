import type { BenchOptions } from "./options.js";
import type { BenchTarget } from "./target.js";

/** What a scenario hands back; `runBench` adds machine, revision and parameters. */
export interface ScenarioResult {
  /**
   * "not available": the server does not offer the feature (e.g. 501); no numbers are faked.
   * "failed": the scenario could not run at all (its setup broke); `reason` says why.
   */
  status: "ok" | "not available" | "failed";
  reason?: string;
  samples: unknown;
  errors: string[];
  summary: Record<string, unknown>;
}

export type Scenario = (options: BenchOptions, target: BenchTarget) => Promise<ScenarioResult>;

/** The JSON written to bench/results/ (schema "cubicle-bench/1"). */
export interface BenchResultFile extends ScenarioResult {
  schema: "cubicle-bench/1";
  scenario: string;
  startedAt: string;
  finishedAt: string;
  machine: Record<string, unknown>;
  /** The server measured, with its warm-pool levels at the start (`GET /pools`). */
  target: { apiUrl: string; pools?: unknown };
  parameters: Record<string, unknown>;
}

export function notAvailable(reason: string, summary: Record<string, unknown> = {}): ScenarioResult {
  return { status: "not available", reason, samples: [], errors: [], summary };
}
