import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { createLogger } from "../../shared/log.js";
import { JAVA_KERNEL_CLASS, JAVA_KERNEL_DIR } from "./java-kernel-program.js";
import { resultFromMimeBundle } from "./mime-bundle.js";
import { errorOutput, kernelIdentity, streamOutput, type ExecuteRequest, type Kernel, type KernelLaunch, type OutputSink } from "./types.js";
import { launchAs, markForOomKiller } from "../process/launch.js";

const log = createLogger("interpreter");

export interface JavaKernelOptions {
  /** Default `java` (on the kernel's PATH: Debian's alternatives link). */
  javaPath?: string;
  /** Where CubicleJavaKernel.class is. Default JAVA_KERNEL_DIR (put there by the template recipe). */
  classPath?: string;
  launch: KernelLaunch;
  /** How long the JVM may take to say it is ready. */
  startTimeoutMs?: number;
  /** After an interrupt, how long the cell may take to stop before the JVM is killed. */
  interruptGraceMs?: number;
}

/** A message of the Java kernel program (java-kernel-program.ts). */
export type JavaKernelMessage =
  | { type: "ready" }
  | { type: "stdout" | "stderr"; text: string }
  | { type: "result"; text: string }
  | { type: "error"; name: string; value: string; traceback: string }
  | { type: "done" };

/**
 * Splits the Java kernel's stdout into its messages (`<marker>{json}` lines) and the raw output
 * around them (what a child process with inherited stdio wrote). A partial line is held until
 * its end arrives; the kernel ends every cell with a message line, so nothing stays held.
 */
export class MarkedLineSplitter {
  /** The start of a line whose end has not arrived, in pieces (a long line is never rescanned). */
  private pieces: string[] = [];

  constructor(
    private readonly marker: string,
    private readonly onMessage: (message: JavaKernelMessage) => void,
    private readonly onRaw: (text: string) => void,
  ) {}

  push(chunk: string): void {
    let start = 0;
    let newline: number;
    while ((newline = chunk.indexOf("\n", start)) >= 0) {
      this.pieces.push(chunk.slice(start, newline));
      const line = this.pieces.join("");
      this.pieces = [];
      start = newline + 1;
      this.onLine(line);
    }
    if (start < chunk.length) this.pieces.push(chunk.slice(start));
  }

  private onLine(line: string): void {
    const at = line.indexOf(this.marker);
    if (at < 0) {
      this.onRaw(line + "\n");
      return;
    }
    if (at > 0) this.onRaw(line.slice(0, at));
    let message: JavaKernelMessage;
    try {
      message = JSON.parse(line.slice(at + this.marker.length)) as JavaKernelMessage;
    } catch {
      log.warn("dropping a malformed java kernel message", { length: line.length });
      return;
    }
    this.onMessage(message);
  }
}

/** One request line: the cell and its env vars, each base64 so no field holds a space or newline. */
export function javaExecuteLine(request: ExecuteRequest): string {
  const fields = ["X", request.code];
  for (const [name, value] of Object.entries(request.envVars)) fields.push(name, value);
  return fields.map((field, i) => (i === 0 ? field : Buffer.from(field, "utf8").toString("base64"))).join(" ") + "\n";
}

/**
 * A JVM running the Java kernel program (jshell snippets evaluated in one persistent JShell),
 * spoken to over stdin/stdout lines. Its cwd is the context's, which is `user.dir` and what
 * relative paths resolve against.
 */
export class JavaKernel implements Kernel {
  readonly language = "java";
  private child: ChildProcess | undefined;
  private exitReason: string | undefined;
  private executionCount = 0;
  private current: { sink: OutputSink; done: () => void; sawError: boolean } | undefined;
  private readyWaiter: { resolve: () => void; reject: (error: Error) => void } | undefined;
  private stderrTail = "";

  constructor(private readonly options: JavaKernelOptions) {}

  get exited(): boolean {
    return this.exitReason !== undefined;
  }

  start(): Promise<void> {
    const { launch } = this.options;
    const classPath = this.options.classPath ?? JAVA_KERNEL_DIR;
    if (!fs.existsSync(path.join(classPath, `${JAVA_KERNEL_CLASS}.class`))) {
      return Promise.reject(new Error(`this sandbox's template has no Java kernel (${classPath}): use code-interpreter-v1 or a template built from it`));
    }
    const marker = `\u0001cubicle-${randomBytes(8).toString("hex")}:`;
    const splitter = new MarkedLineSplitter(marker, (message) => this.onMessage(message), (text) => this.current?.sink(streamOutput("stdout", text)));
    const args = [
      // Per-call env vars are written into the map behind System.getenv() (java-kernel-program.ts).
      "--add-opens=java.base/java.util=ALL-UNNAMED",
      // One thread of garbage collection, small heaps: a sandbox has little memory.
      "-XX:+UseSerialGC",
      // C1 only: each cell is compiled by javac in this JVM, and without C2 competing for the two
      // cores the JVM starts and answers faster (start + first cell ~740 vs ~870 ms, a small cell
      // ~35 vs ~55 ms here); a long hot loop runs ~1.5x slower.
      "-XX:TieredStopAtLevel=1",
      "-Xss4m",
      "-cp",
      classPath,
      JAVA_KERNEL_CLASS,
      marker,
    ];
    const started = new Promise<void>((resolve, reject) => {
      this.readyWaiter = { resolve, reject };
    });
    // As the user with their groups, and marked for the OOM killer (process/launch.ts).
    const start = launchAs(kernelIdentity(launch), this.options.javaPath ?? "java", args);
    const child = spawn(start.file, start.args, {
      cwd: launch.cwd,
      env: launch.env,
      uid: start.uid,
      gid: start.gid,
      stdio: ["pipe", "pipe", "pipe"],
    });
    this.child = child;
    child.once("spawn", () => markForOomKiller(child.pid, start));
    child.stdout!.setEncoding("utf8");
    child.stdout!.on("data", (chunk: string) => splitter.push(chunk));
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (text: string) => {
      this.stderrTail = (this.stderrTail + text).slice(-4000);
      this.current?.sink(streamOutput("stderr", text));
    });
    // A write after the JVM died fails with EPIPE; the exit handler reports the death.
    child.stdin!.on("error", () => {});
    child.on("error", (error) => this.markExited(`the java kernel could not be started: ${error.message}`));
    child.on("exit", (code, signal) => this.markExited(signal ? `the java kernel was killed by ${signal}` : `the java kernel exited with code ${code}`));
    const timeoutMs = this.options.startTimeoutMs ?? 60_000;
    const timer = setTimeout(() => {
      this.readyWaiter?.reject(new Error(`the java kernel did not start within ${timeoutMs} ms`));
      this.readyWaiter = undefined;
      child.kill("SIGKILL");
    }, timeoutMs);
    return started.finally(() => clearTimeout(timer));
  }

  private onMessage(message: JavaKernelMessage): void {
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

  async execute(request: ExecuteRequest, sink: OutputSink, signal: AbortSignal): Promise<void> {
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
      this.child?.stdin!.write("I\n");
      // A cell that catches ThreadDeath, or sits in native code, does not stop: then the JVM goes.
      killTimer = setTimeout(() => {
        log.warn("java kernel ignored the interrupt; killing it", { pid: this.child?.pid });
        this.child?.kill("SIGKILL");
      }, this.options.interruptGraceMs ?? 3_000);
    };
    try {
      this.child.stdin!.write(javaExecuteLine(request));
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
      `${this.exitReason ?? "the java kernel is not running"}; it will be restarted on the next execution (state is lost)`,
      this.stderrTail.trim().split("\n").slice(-20).join("\n"),
    );
  }

  private markExited(reason: string): void {
    if (this.exitReason !== undefined) return;
    this.exitReason = reason;
    log.info("java kernel exited", { pid: this.child?.pid, reason });
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
      this.markExited("the java kernel was shut down");
      return;
    }
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    child.kill("SIGKILL");
    await exited;
  }
}
