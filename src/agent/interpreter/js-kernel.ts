import { spawn, type ChildProcess } from "node:child_process";
import { createLogger } from "../../shared/log.js";
import { JS_KERNEL_PROGRAM } from "./js-kernel-program.js";
import { prepareCellOffLoop } from "./cell-preparer.js";
import { resultFromMimeBundle } from "./mime-bundle.js";
import { errorOutput, kernelIdentity, streamOutput, type ExecuteRequest, type Kernel, type KernelLaunch, type OutputSink } from "./types.js";
import { launchAs, markForOomKiller } from "../process/launch.js";

const log = createLogger("interpreter");

export interface JsKernelOptions {
  language: "javascript" | "typescript";
  /** argv prefix that runs Node (see InterpreterServerOptions.nodeCommand). */
  nodeCommand: string[];
  launch: KernelLaunch;
  /** After an interrupt, how long the cell may take to stop before the process is killed. */
  interruptGraceMs?: number;
}

type ChildMessage =
  | { type: "ready" }
  | { type: "stdout" | "stderr"; text: string }
  | { type: "result"; text: string }
  | { type: "error"; name: string; value: string; traceback: string }
  | { type: "done" };

/**
 * A Node child process evaluating cells in one persistent global scope (js-kernel-program.ts),
 * run with the agent's own Node. TypeScript is the same kernel with types erased first.
 */
export class JsKernel implements Kernel {
  readonly language: string;
  private child: ChildProcess | undefined;
  private exitReason: string | undefined;
  private executionCount = 0;
  private current: { sink: OutputSink; done: () => void; sawError: boolean } | undefined;
  private readyWaiter: { resolve: () => void; reject: (error: Error) => void } | undefined;
  private stderrTail = "";

  constructor(private readonly options: JsKernelOptions) {
    this.language = options.language;
  }

  get exited(): boolean {
    return this.exitReason !== undefined;
  }

  start(): Promise<void> {
    const [command, ...prefix] = this.options.nodeCommand;
    const { launch } = this.options;
    return new Promise<void>((resolve, reject) => {
      this.readyWaiter = { resolve, reject };
      // As the user with their groups, and marked for the OOM killer (process/launch.ts).
      const start = launchAs(kernelIdentity(launch), command!, [...prefix, "-e", JS_KERNEL_PROGRAM]);
      const child = spawn(start.file, start.args, {
        cwd: launch.cwd,
        env: launch.env,
        uid: start.uid,
        gid: start.gid,
        stdio: ["ignore", "pipe", "pipe", "ipc"],
        serialization: "json",
      });
      this.child = child;
      child.once("spawn", () => markForOomKiller(child.pid, start));
      // Output written straight to the file descriptors (e.g. by a child process with inherited stdio).
      child.stdout!.on("data", (chunk: Buffer) => this.current?.sink(streamOutput("stdout", chunk.toString("utf8"))));
      child.stderr!.on("data", (chunk: Buffer) => {
        const text = chunk.toString("utf8");
        this.stderrTail = (this.stderrTail + text).slice(-4000);
        this.current?.sink(streamOutput("stderr", text));
      });
      child.on("message", (message: ChildMessage) => this.onMessage(message));
      child.on("error", (error) => this.markExited(`the ${this.language} kernel could not be started: ${error.message}`));
      child.on("exit", (code, signal) => this.markExited(signal ? `the ${this.language} kernel was killed by ${signal}` : `the ${this.language} kernel exited with code ${code}`));
    });
  }

  private onMessage(message: ChildMessage): void {
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
        current.sink(streamOutput(message.type, message.text));
        break;
      case "result":
        current.sink(resultFromMimeBundle({ "text/plain": message.text }, true));
        break;
      case "error":
        current.sawError = true;
        current.sink(errorOutput(message.name, message.value, message.traceback));
        break;
      case "done":
        current.done();
        break;
    }
  }

  async execute(request: ExecuteRequest, sink: OutputSink, signal: AbortSignal): Promise<void> {
    if (this.exited || !this.child) {
      sink(this.deathError());
      return;
    }
    let cell;
    try {
      cell = await prepareCellOffLoop(request.code, { typescript: this.language === "typescript" });
    } catch (error) {
      sink(errorOutput(error instanceof SyntaxError ? "SyntaxError" : "CellPreparationError", (error as Error).message));
      return;
    }
    if (this.exited || !this.child) {
      sink(this.deathError());
      return;
    }
    sink({ type: "number_of_executions", execution_count: ++this.executionCount });
    let finished!: () => void;
    const done = new Promise<void>((resolve) => (finished = resolve));
    const current = { sink, done: finished, sawError: false };
    this.current = current;
    let killTimer: NodeJS.Timeout | undefined;
    const onAbort = () => {
      this.child?.kill("SIGINT");
      killTimer = setTimeout(() => {
        log.warn("javascript kernel ignored the interrupt; killing it", { pid: this.child?.pid });
        this.child?.kill("SIGKILL");
      }, this.options.interruptGraceMs ?? 2_000);
    };
    if (signal.aborted) onAbort();
    else signal.addEventListener("abort", onAbort, { once: true });
    try {
      this.child.send({ type: "execute", code: cell.code, isAsync: cell.isAsync, imports: cell.imports, envVars: request.envVars });
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
    log.info("javascript kernel exited", { pid: this.child?.pid, reason });
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
