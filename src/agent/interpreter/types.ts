/**
 * Shapes shared by the interpreter's server, contexts and kernels. The output objects are the
 * NDJSON lines of `POST /execute` (e2b-wire-protocol.md §10.1), written as they are.
 */

export interface StreamOutput {
  type: "stdout" | "stderr";
  text: string;
  /** ISO 8601. */
  timestamp: string;
}

/** One `execute_result` (main) or `display_data` turned into E2B's result fields. */
export interface ResultOutput {
  type: "result";
  is_main_result: boolean;
  text?: string;
  html?: string;
  markdown?: string;
  svg?: string;
  png?: string;
  jpeg?: string;
  pdf?: string;
  latex?: string;
  json?: unknown;
  javascript?: string;
  data?: unknown;
  chart?: unknown;
  extra?: Record<string, unknown>;
}

export interface ErrorOutput {
  type: "error";
  name: string;
  value: string;
  /** The whole traceback as one string (the Python client requires a string). */
  traceback: string;
}

export interface ExecutionCountOutput {
  type: "number_of_executions";
  execution_count: number;
}

export type ExecutionOutput = StreamOutput | ResultOutput | ErrorOutput | ExecutionCountOutput;

/** Where a kernel sends what an execution produces, in order. */
export type OutputSink = (output: ExecutionOutput) => void;

export interface ExecuteRequest {
  code: string;
  /** Applied for this execution only and reverted afterwards. */
  envVars: Record<string, string>;
}

/** What a kernel needs to know to start: who it runs as, where, and with which environment. */
export interface KernelLaunch {
  cwd: string;
  uid?: number;
  gid?: number;
  groups?: number[];
  /** The complete environment of the kernel process (sandbox env vars included). */
  env: Record<string, string>;
}

/**
 * A stateful evaluator for one language. Kernels start lazily, run one execution at a time
 * (the context serialises calls) and report their own death as an error output of the running
 * execution, never by hanging.
 */
export interface Kernel {
  readonly language: string;
  /** True once the kernel process has gone (died, was shut down, or failed to start). A kernel is not restarted in place: the context makes a new one. */
  readonly exited: boolean;
  /** Starts the kernel; rejects with a message for the user if it cannot. Called once. */
  start(): Promise<void>;
  /**
   * Runs code and resolves when the kernel is idle again. An aborted signal interrupts the
   * kernel; the promise still resolves once the interrupted execution has ended.
   */
  execute(request: ExecuteRequest, sink: OutputSink, signal: AbortSignal): Promise<void>;
  /** Stops the kernel process; safe to call at any time and more than once. */
  shutdown(): Promise<void>;
}

/** Who a kernel runs as, for launchAs (process/launch.ts): the agent's own user when unset. */
export function kernelIdentity(launch: KernelLaunch): { uid: number; gid: number; groups: number[] } | undefined {
  if (launch.uid === undefined || launch.gid === undefined) return undefined;
  return { uid: launch.uid, gid: launch.gid, groups: launch.groups ?? [launch.gid] };
}

export function streamOutput(type: "stdout" | "stderr", text: string, timestamp = new Date().toISOString()): StreamOutput {
  return { type, text, timestamp };
}

export function errorOutput(name: string, value: string, traceback = ""): ErrorOutput {
  return { type: "error", name, value, traceback };
}
