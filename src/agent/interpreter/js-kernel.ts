import { ChildProcessKernel, type ChildKernelMessage } from "./child-kernel.js";
import { JS_KERNEL_PROGRAM } from "./js-kernel-program.js";
import { prepareCellOffLoop } from "./cell-preparer.js";
import { errorOutput, type ExecuteRequest, type KernelLaunch, type OutputSink } from "./types.js";
import { spawnKernel } from "./kernel-process.js";

export interface JsKernelOptions {
  language: "javascript" | "typescript";
  /** argv prefix that runs Node (see InterpreterServerOptions.nodeCommand). */
  nodeCommand: string[];
  launch: KernelLaunch;
  /** After an interrupt, how long the cell may take to stop before the process is killed. */
  interruptGraceMs?: number;
}

/**
 * A Node child process evaluating cells in one persistent global scope (js-kernel-program.ts),
 * run with the agent's own Node, over Node's IPC channel. TypeScript is the same kernel with
 * types erased first.
 */
export class JsKernel extends ChildProcessKernel {
  readonly language: string;

  constructor(private readonly options: JsKernelOptions) {
    super();
    this.language = options.language;
  }

  start(): Promise<void> {
    const [command, ...prefix] = this.options.nodeCommand;
    const { launch } = this.options;
    const ready = this.whenReady();
    // As the user with their groups, and marked for the OOM killer (kernel-process.ts).
    const child = spawnKernel(launch, command!, [...prefix, "-e", JS_KERNEL_PROGRAM], { stdio: ["ignore", "pipe", "pipe", "ipc"], serialization: "json" });
    this.adopt(child);
    // Output written straight to the file descriptors (e.g. by a child process with inherited stdio).
    child.stdout!.setEncoding("utf8");
    child.stdout!.on("data", (text: string) => this.rawStdout(text));
    child.on("message", (message: ChildKernelMessage) => this.onMessage(message));
    return ready;
  }

  async execute(request: ExecuteRequest, sink: OutputSink, signal: AbortSignal): Promise<void> {
    if (this.refuseIfDead(sink)) return;
    let cell;
    try {
      cell = await prepareCellOffLoop(request.code, { typescript: this.language === "typescript" });
    } catch (error) {
      sink(errorOutput(error instanceof SyntaxError ? "SyntaxError" : "CellPreparationError", (error as Error).message));
      return;
    }
    if (this.refuseIfDead(sink)) return;
    await this.runCell(
      sink,
      signal,
      () => this.child!.send({ type: "execute", code: cell.code, isAsync: cell.isAsync, imports: cell.imports, envVars: request.envVars }),
      () => this.child?.kill("SIGINT"),
      this.options.interruptGraceMs ?? 2_000,
    );
  }
}
