/**
 * prepareCell (js-source.ts) without holding up the agent. The tokenizer is fast on notebook
 * code, but a cell is the user's to choose: 200 KB of `(` took 47 s to strip as TypeScript
 * (some bracket scans are quadratic), and even plain JavaScript costs ~1.5 µs a character, up to
 * the 64 MiB an `/execute` may carry. Small cells (nearly all) are prepared in place; larger ones
 * in a worker thread with a time and a heap limit, so that the agent keeps serving every other
 * request meanwhile and a cell that cannot be prepared in time fails on its own. The worker is
 * started on first need and ends after a while without work.
 *
 * The worker runs this same code: in a sandbox that is the agent's bundle (its main.ts starts
 * nothing in a worker thread); elsewhere (tests) setCellPreparerEntry names this file.
 */
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";
import { createLogger } from "../../shared/log.js";
import { prepareCell, type PreparedCell } from "./js-source.js";

const log = createLogger("interpreter");

/** Cells up to this many characters are prepared in place: worst case ~10 ms (measured, TypeScript). */
export const inlineMaxChars = 2048;
const workerRole = "cubicle-cell-preparer";
const idleMs = 30_000;

let prepareTimeoutMs = 10_000;
/** A file for the worker to run, or the code of a script that loads it (`eval`). */
export type CellPreparerEntry = string | URL | { eval: string };

/** The agent's bundle (CommonJS) is the worker's code; undefined means: prepare in place. */
let entry: CellPreparerEntry | undefined = typeof __filename === "string" ? __filename : undefined;

/** Tests: what the worker runs, and how long a preparation may take. */
export function setCellPreparerEntry(file: CellPreparerEntry | undefined, timeoutMs = 10_000): void {
  entry = file;
  prepareTimeoutMs = timeoutMs;
}

interface PrepareRequest {
  id: number;
  code: string;
  typescript: boolean;
}

type PrepareReply = { id: number; cell: PreparedCell } | { id: number; error: string; syntax: boolean };

/** True in the worker thread this module starts. */
export const isCellPreparerThread = !isMainThread && (workerData as { role?: string } | undefined)?.role === workerRole;

if (isCellPreparerThread) {
  parentPort!.on("message", (request: PrepareRequest) => {
    let reply: PrepareReply;
    try {
      reply = { id: request.id, cell: prepareCell(request.code, { typescript: request.typescript }) };
    } catch (error) {
      reply = { id: request.id, error: (error as Error).message, syntax: error instanceof SyntaxError };
    }
    parentPort!.postMessage(reply);
  });
}

interface Pending {
  resolve: (cell: PreparedCell) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

let worker: Worker | undefined;
let idleTimer: NodeJS.Timeout | undefined;
let nextId = 0;
const pending = new Map<number, Pending>();

function stopWorker(reason: Error): void {
  const current = worker;
  worker = undefined;
  if (idleTimer) clearTimeout(idleTimer);
  idleTimer = undefined;
  for (const [id, entry] of pending) {
    clearTimeout(entry.timer);
    entry.reject(reason);
    pending.delete(id);
  }
  void current?.terminate();
}

function startWorker(file: CellPreparerEntry): Worker {
  const evaluated = typeof file === "object" && "eval" in file;
  const started = new Worker(evaluated ? file.eval : file, {
    eval: evaluated,
    workerData: { role: workerRole },
    // A giant cell fails in the worker instead of growing the agent's heap.
    resourceLimits: { maxOldGenerationSizeMb: 512 },
    stdout: false,
    stderr: false,
  });
  started.unref();
  started.on("message", (reply: PrepareReply) => {
    const waiting = pending.get(reply.id);
    if (!waiting) return;
    pending.delete(reply.id);
    clearTimeout(waiting.timer);
    if ("cell" in reply) waiting.resolve(reply.cell);
    else waiting.reject(reply.syntax ? new SyntaxError(reply.error) : new Error(reply.error));
    if (pending.size === 0) scheduleIdleStop();
  });
  started.on("error", (error) => {
    if (worker === started) stopWorker(new Error(`the cell could not be prepared: ${error.message}`));
  });
  started.on("exit", (code) => {
    if (worker === started) stopWorker(new Error(`the cell preparer stopped (exit code ${code})`));
  });
  return started;
}

function scheduleIdleStop(): void {
  if (idleTimer) clearTimeout(idleTimer);
  idleTimer = setTimeout(() => {
    if (pending.size === 0 && worker) {
      void worker.terminate();
      worker = undefined;
    }
  }, idleMs);
  idleTimer.unref();
}

/**
 * prepareCell, in place for small cells and in the worker for larger ones. Rejects with a
 * SyntaxError for what prepareCell refuses, and with an Error when the worker runs out of time
 * or memory (that worker is then replaced).
 */
export function prepareCellOffLoop(code: string, options: { typescript: boolean }): Promise<PreparedCell> {
  if (code.length <= inlineMaxChars || entry === undefined) {
    try {
      return Promise.resolve(prepareCell(code, options));
    } catch (error) {
      return Promise.reject(error);
    }
  }
  worker ??= startWorker(entry);
  if (idleTimer) clearTimeout(idleTimer);
  const id = nextId++;
  const current = worker;
  return new Promise<PreparedCell>((resolve, reject) => {
    const timer = setTimeout(() => {
      log.warn("a cell took too long to prepare; restarting the preparer", { chars: code.length, typescript: options.typescript });
      if (worker === current) stopWorker(new Error(`the cell could not be prepared within ${prepareTimeoutMs / 1000} s: it is too large or too complex for Cubicle's ${options.typescript ? "TypeScript" : "JavaScript"} preparation; split it into smaller cells`));
    }, prepareTimeoutMs);
    pending.set(id, { resolve, reject, timer });
    current.postMessage({ id, code, typescript: options.typescript } satisfies PrepareRequest);
  });
}
