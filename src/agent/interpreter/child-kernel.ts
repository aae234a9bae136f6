import type { ChildProcess } from "node:child_process";
import { createLogger } from "../../shared/log.js";
import { resultFromMimeBundle } from "./mime-bundle.js";
import { errorOutput, streamOutput, type ExecuteRequest, type Kernel, type OutputSink } from "./types.js";

const log = createLogger("interpreter");

/** What a kernel program of ours says to the agent (js-kernel-program.ts, java-kernel-program.ts). */
export type ChildKernelMessage =
  | { type: "ready" }
  | { type: "stdout" | "stderr"; text: string }
  | { type: "result"; text: string }
  | { type: "error"; name: string; value: string; traceback: string }
  | { type: "done" };

interface CurrentCell {
  sink: OutputSink;
  done: () => void;
  sawError: boolean;
}

/**
 * The agent's side of a kernel that is one child process running a program of ours (the
 * JavaScript and Java kernels): it waits for `ready`, runs one cell at a time until `done`,
 * streams what the child writes to stderr (and raw stdout) into the cell, interrupts a cell
 * and kills the child when it does not stop, and reports a death in the cell it ends. The
 * subclass starts the child (`adopt`), sends cells (`runCell`) and says how to interrupt.
 */
export abstract class ChildProcessKernel implements Kernel {
  abstract readonly language: string;
  protected child: ChildProcess | undefined;
  private exitReason: string | undefined;
  private executionCount = 0;
  private current: CurrentCell | undefined;
  private readyWaiter: { resolve: () => void; reject: (error: Error) => void } | undefined;
  private stderrTail = "";

  get exited(): boolean {
    return this.exitReason !== undefined;
  }

  abstract start(): Promise<void>;
  abstract execute(request: ExecuteRequest, sink: OutputSink, signal: AbortSignal): Promise<void>;

  /** Settles when the child says `ready`, or rejects when it dies first or after `timeoutMs`. */
  protected whenReady(timeoutMs?: number): Promise<void> {
    const ready = new Promise<void>((resolve, reject) => (this.readyWaiter = { resolve, reject }));
    if (timeoutMs === undefined) return ready;
    const timer = setTimeout(() => {
      this.readyWaiter?.reject(new Error(`the ${this.language} kernel did not start within ${timeoutMs} ms`));
      this.readyWaiter = undefined;
      this.child?.kill("SIGKILL");
    }, timeoutMs);
    return ready.finally(() => clearTimeout(timer));
  }

  /** Takes a spawned child: its stderr goes to the running cell, its end ends the kernel. */
  protected adopt(child: ChildProcess): void {
    this.child = child;
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (text: string) => {
      this.stderrTail = (this.stderrTail + text).slice(-4000);
      this.current?.sink(streamOutput("stderr", text));
    });
    child.on("error", (error) => this.markExited(`the ${this.language} kernel could not be started: ${error.message}`));
    child.on("exit", (code, signal) => this.markExited(signal ? `the ${this.language} kernel was killed by ${signal}` : `the ${this.language} kernel exited with code ${code}`));
  }

  /** Output the child wrote outside its messages (e.g. a process of the user's with inherited stdio). */
  protected rawStdout(text: string): void {
    this.current?.sink(streamOutput("stdout", text));
  }

  protected onMessage(message: ChildKernelMessage): void {
    if (message.type === "ready") {
      this.readyWaiter?.resolve();
      this.readyWaiter = undefined;
      return;
    }
    const current = this.current;
    if (!current) return;
    switch (message.type) {
      case "stdout":
      case "stderr":
        current.sink(streamOutput(message.type, String(message.text)));
        break;
      case "result":
        current.sink(resultFromMimeBundle({ "text/plain": String(message.text) }, true));
        break;
      case "error":
        current.sawError = true;
        current.sink(errorOutput(String(message.name), String(message.value), String(message.traceback ?? "")));
        break;
      case "done":
        current.done();
        break;
    }
  }

  /** True when the kernel cannot run a cell (then the cell has been told why). */
  protected refuseIfDead(sink: OutputSink): boolean {
    if (!this.exited && this.child) return false;
    sink(this.deathError());
    return true;
  }

  /**
   * Runs one cell: `send` hands it to the child; an abort calls `interrupt`, and the child is
   * killed if the cell has not ended `graceMs` later. Resolves when the child says `done` or dies.
   */
  protected async runCell(sink: OutputSink, signal: AbortSignal, send: () => void, interrupt: () => void, graceMs: number): Promise<void> {
    sink({ type: "number_of_executions", execution_count: ++this.executionCount });
    let finished!: () => void;
    const done = new Promise<void>((resolve) => (finished = resolve));
    const current: CurrentCell = { sink, done: finished, sawError: false };
    this.current = current;
    let killTimer: NodeJS.Timeout | undefined;
    const onAbort = () => {
      interrupt();
      killTimer = setTimeout(() => {
        log.warn(`${this.language} kernel ignored the interrupt; killing it`, { pid: this.child?.pid });
        this.child?.kill("SIGKILL");
      }, graceMs);
    };
    try {
      send();
      if (signal.aborted) onAbort();
      else signal.addEventListener("abort", onAbort, { once: true });
      await done;
    } finally {
      clearTimeout(killTimer);
      signal.removeEventListener("abort", onAbort);
      if (this.current === current) this.current = undefined;
    }
  }

  private deathError() {
    return errorOutput(
      "UnexpectedEndOfExecution",
      `${this.exitReason ?? `the ${this.language} kernel is not running`}; it will be restarted on the next execution (state is lost)`,
      this.stderrTail.trim().split("\n").slice(-20).join("\n"),
    );
  }

  private markExited(reason: string): void {
    if (this.exitReason !== undefined) return;
    this.exitReason = reason;
    log.info(`${this.language} kernel exited`, { pid: this.child?.pid, reason });
    this.readyWaiter?.reject(new Error(`${reason}${this.stderrTail ? `\n${this.stderrTail.trim()}` : ""}`));
    this.readyWaiter = undefined;
    const current = this.current;
    if (current) {
      if (!current.sawError) current.sink(this.deathError());
      current.done();
    }
  }

  async shutdown(): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) {
      this.markExited(`the ${this.language} kernel was shut down`);
      return;
    }
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    child.kill("SIGKILL");
    await exited;
  }
}
