import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { createLogger } from "../../shared/log.js";
import { JAVA_KERNEL_CLASS, JAVA_KERNEL_DIR } from "./java-kernel-program.js";
import { ChildProcessKernel, type ChildKernelMessage } from "./child-kernel.js";
import { type ExecuteRequest, type KernelLaunch, type OutputSink } from "./types.js";
import { spawnKernel } from "./kernel-process.js";

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
export type JavaKernelMessage = ChildKernelMessage;

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
export class JavaKernel extends ChildProcessKernel {
  readonly language = "java";

  constructor(private readonly options: JavaKernelOptions) {
    super();
  }

  start(): Promise<void> {
    const { launch } = this.options;
    const classPath = this.options.classPath ?? JAVA_KERNEL_DIR;
    if (!fs.existsSync(path.join(classPath, `${JAVA_KERNEL_CLASS}.class`))) {
      return Promise.reject(new Error(`this sandbox's template has no Java kernel (${classPath}): use code-interpreter-v1 or a template built from it`));
    }
    const marker = `\u0001cubicle-${randomBytes(8).toString("hex")}:`;
    const splitter = new MarkedLineSplitter(marker, (message) => this.onMessage(message), (text) => this.rawStdout(text));
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
    const ready = this.whenReady(this.options.startTimeoutMs ?? 60_000);
    // As the user with their groups, and marked for the OOM killer (kernel-process.ts).
    const child = spawnKernel(launch, this.options.javaPath ?? "java", args, { stdio: ["pipe", "pipe", "pipe"] });
    this.adopt(child);
    child.stdout!.setEncoding("utf8");
    child.stdout!.on("data", (chunk: string) => splitter.push(chunk));
    // A write after the JVM died fails with EPIPE; the exit handler reports the death.
    child.stdin!.on("error", () => {});
    return ready;
  }

  async execute(request: ExecuteRequest, sink: OutputSink, signal: AbortSignal): Promise<void> {
    if (this.refuseIfDead(sink)) return;
    await this.runCell(
      sink,
      signal,
      () => this.child!.stdin!.write(javaExecuteLine(request)),
      // A cell that catches ThreadDeath, or sits in native code, does not stop: then the JVM goes.
      () => this.child?.stdin!.write("I\n"),
      this.options.interruptGraceMs ?? 3_000,
    );
  }
}
