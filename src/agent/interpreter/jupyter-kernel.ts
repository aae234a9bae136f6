import type { ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type * as Zmq from "zeromq";
import { createLogger } from "../../shared/log.js";
import { JupyterSession, type JupyterMessage } from "./jupyter-wire.js";
import { resultFromMimeBundle } from "./mime-bundle.js";
import { errorOutput, streamOutput, type ErrorOutput, type ExecuteRequest, type Kernel, type KernelLaunch, type OutputSink } from "./types.js";
import { spawnKernel } from "./kernel-process.js";

const log = createLogger("interpreter");

/**
 * What differs between Jupyter kernels: how the process starts, how it names its ipc sockets,
 * and the code (in the kernel's own language) that sets and restores per-call env vars.
 */
export interface JupyterKernelSpec {
  language: string;
  /** `kernel_name` in the connection file. */
  kernelName: string;
  /** The kernel process for a connection file (run as the launch's user, in its cwd). */
  command(connectionFile: string): { file: string; args: string[] };
  /** Run silently once the kernel answers, before the first cell. */
  setupCode?: string;
  /** Code that applies env vars for one execution (remembering what it replaced). */
  setEnvCode(envVars: Record<string, string>): string;
  /** Code that puts back what setEnvCode replaced. */
  restoreEnvCode: string;
}

export interface JupyterKernelOptions {
  launch: KernelLaunch;
  /** Parent of the per-kernel directory holding the connection file and the ipc sockets. */
  runtimeDir?: string;
  /** How long the kernel may take to answer its first kernel_info_request. */
  startTimeoutMs?: number;
  /** After an interrupt, how long the running cell may take to stop before the kernel is killed. */
  interruptGraceMs?: number;
}

interface PendingExecution {
  sink: OutputSink | undefined;
  /** Set once an error was reported, so that the reply does not report another. */
  sawError: boolean;
  /** A silent execution: the kernel may publish nothing on iopub, its reply says how it went. */
  silent: boolean;
  /** Set once the cell was interrupted on the caller's request. */
  interrupted: boolean;
  /** The iopub `status: idle` and the shell `execute_reply` have arrived: the cell is over. */
  idle: boolean;
  replied: boolean;
  done: () => void;
}

let zmqModule: Promise<typeof Zmq> | undefined;

/** Loads the native zeromq addon on first use only, so the agent starts without it. */
function loadZmq(): Promise<typeof Zmq> {
  zmqModule ??= import("zeromq").catch((error: unknown) => {
    zmqModule = undefined;
    throw new Error(`the zeromq module could not be loaded: ${(error as Error).message}`);
  });
  return zmqModule;
}

/**
 * A Jupyter kernel (ipykernel, IRkernel) spoken to over the Jupyter wire protocol on ipc sockets
 * in a private directory (no TCP ports to collide with the user's servers). An execution ends
 * once both the iopub `status: idle` and the shell `execute_reply` answering it have arrived
 * (the reply may come last, and carries what iopub did not say: an abort, a silent error).
 */
export class JupyterKernel implements Kernel {
  readonly language: string;
  private process: ChildProcess | undefined;
  private shell: Zmq.Dealer | undefined;
  private control: Zmq.Dealer | undefined;
  private iopub: Zmq.Subscriber | undefined;
  private jupyter: JupyterSession | undefined;
  private runtimeDir: string | undefined;
  private readonly pending = new Map<string, PendingExecution>();
  private stderrTail = "";
  private exitReason: string | undefined;
  private exitListeners = new Set<() => void>();

  constructor(private readonly spec: JupyterKernelSpec, private readonly options: JupyterKernelOptions) {
    this.language = spec.language;
  }

  get exited(): boolean {
    return this.exitReason !== undefined;
  }

  async start(): Promise<void> {
    try {
      await this.launch();
      await this.waitUntilReady();
      if (this.spec.setupCode) await this.runSilently(this.spec.setupCode);
    } catch (error) {
      await this.shutdown();
      throw error;
    }
  }

  private async launch(): Promise<void> {
    const zmq = await loadZmq();
    const { launch } = this.options;
    const baseDir = this.options.runtimeDir ?? path.join(os.tmpdir(), "cubicle-kernels");
    await fs.mkdir(baseDir, { recursive: true, mode: 0o711 });
    const dir = await fs.mkdtemp(path.join(baseDir, `${this.spec.kernelName.slice(0, 8)}-`));
    this.runtimeDir = dir;
    const key = randomBytes(32).toString("hex");
    const socketBase = path.join(dir, "k");
    const connection = {
      transport: "ipc",
      ip: socketBase,
      shell_port: 1,
      iopub_port: 2,
      stdin_port: 3,
      control_port: 4,
      hb_port: 5,
      key,
      signature_scheme: "hmac-sha256",
      kernel_name: this.spec.kernelName,
    };
    const connectionFile = path.join(dir, "connection.json");
    await fs.writeFile(connectionFile, JSON.stringify(connection), { mode: 0o600 });
    if (launch.uid !== undefined && launch.gid !== undefined) {
      // The kernel binds its sockets in this directory, so it must own it.
      await fs.chown(dir, launch.uid, launch.gid);
      await fs.chown(connectionFile, launch.uid, launch.gid);
    }
    this.jupyter = new JupyterSession(key);

    // As the user with their groups, and marked for the OOM killer (kernel-process.ts).
    const command = this.spec.command(connectionFile);
    const child = spawnKernel(launch, command.file, command.args, { stdio: ["ignore", "pipe", "pipe"] });
    this.process = child;
    const keepTail = (chunk: Buffer) => {
      this.stderrTail = (this.stderrTail + chunk.toString("utf8")).slice(-4000);
    };
    child.stdout!.on("data", keepTail);
    child.stderr!.on("data", keepTail);
    child.on("error", (error) => this.markExited(`the kernel could not be started: ${error.message}`));
    child.on("exit", (code, signal) => this.markExited(signal ? `the kernel was killed by ${signal}` : `the kernel exited with code ${code}`));
    log.debug("kernel spawned", { language: this.language, pid: child.pid, cwd: launch.cwd, uid: launch.uid });

    this.shell = new zmq.Dealer({ linger: 0 });
    this.control = new zmq.Dealer({ linger: 0 });
    this.iopub = new zmq.Subscriber({ linger: 0 });
    // Over ipc a kernel binds `<ip>-<port>` (jupyter_client's convention; ipykernel and IRkernel follow it).
    this.shell.connect(`ipc://${socketBase}-${connection.shell_port}`);
    this.iopub.connect(`ipc://${socketBase}-${connection.iopub_port}`);
    this.control.connect(`ipc://${socketBase}-${connection.control_port}`);
    this.iopub.subscribe();
    void this.receiveLoop(this.iopub, (message) => this.onIopub(message));
    void this.receiveLoop(this.shell, (message) => this.onShellReply(message));
    void this.receiveLoop(this.control, () => {});
  }

  private async receiveLoop(socket: Zmq.Dealer | Zmq.Subscriber, handle: (message: JupyterMessage) => void): Promise<void> {
    try {
      for await (const frames of socket) {
        let message: JupyterMessage;
        try {
          message = this.jupyter!.deserialize(frames);
        } catch (error) {
          log.warn("dropping a kernel message", { reason: (error as Error).message });
          continue;
        }
        handle(message);
      }
    } catch (error) {
      if (!this.exited && !socket.closed) log.warn("kernel socket failed", { reason: (error as Error).message });
    }
  }

  /**
   * Sends kernel_info_request until one is answered on iopub: only then is the SUB socket
   * known to be connected (ZeroMQ drops what a publisher sends before that, the "slow joiner").
   */
  private async waitUntilReady(): Promise<void> {
    const deadline = Date.now() + (this.options.startTimeoutMs ?? 30_000);
    let ready = false;
    const probes = new Set<string>();
    const probeDone = new Promise<void>((resolve) => {
      this.readyProbe = (parentId) => {
        if (probes.has(parentId)) {
          ready = true;
          resolve();
        }
      };
    });
    try {
      while (!ready) {
        if (this.exited) throw new Error(`${this.exitReason}${this.stderrTail ? `\n${this.stderrTail.trim()}` : ""}`);
        if (Date.now() > deadline) throw new Error(`the kernel did not answer within ${this.options.startTimeoutMs ?? 30_000} ms`);
        const probe = this.jupyter!.createMessage("kernel_info_request", {});
        probes.add(probe.header.msg_id);
        await this.shell!.send(this.jupyter!.serialize(probe));
        await Promise.race([probeDone, delay(probes.size < 10 ? 100 : 250), this.exitPromise()]);
      }
    } finally {
      this.readyProbe = undefined;
    }
  }

  private readyProbe: ((parentId: string) => void) | undefined;

  private onIopub(message: JupyterMessage): void {
    const parentId = message.parent_header.msg_id;
    if (!parentId) return;
    this.readyProbe?.(parentId);
    const execution = this.pending.get(parentId);
    if (!execution) return;
    const content = message.content as Record<string, any>;
    const sink = execution.sink;
    switch (message.header.msg_type) {
      case "execute_input":
        sink?.({ type: "number_of_executions", execution_count: Number(content.execution_count) });
        break;
      case "stream":
        sink?.(streamOutput(content.name === "stderr" ? "stderr" : "stdout", String(content.text ?? ""), toIsoDate(message.header.date)));
        break;
      case "execute_result":
        sink?.(resultFromMimeBundle(content.data ?? {}, true));
        break;
      case "display_data":
        sink?.(resultFromMimeBundle(content.data ?? {}, false));
        break;
      case "error":
        execution.sawError = true;
        sink?.(errorOutput(String(content.ename ?? "Error"), String(content.evalue ?? ""), joinTraceback(content.traceback)));
        break;
      case "status":
        if (content.execution_state === "idle") {
          execution.idle = true;
          if (execution.replied) execution.done();
        }
        break;
    }
  }

  private onShellReply(message: JupyterMessage): void {
    if (message.header.msg_type !== "execute_reply") return;
    const parentId = message.parent_header.msg_id;
    const execution = parentId ? this.pending.get(parentId) : undefined;
    if (!execution) return;
    const content = message.content as Record<string, any>;
    // An aborted request gets no iopub error; say so rather than end silently. IRkernel answers
    // an interrupted cell with status "abort" and nothing on iopub.
    if (!execution.sawError && (content.status === "aborted" || content.status === "abort")) {
      execution.sawError = true;
      execution.sink?.(
        execution.interrupted
          ? errorOutput("Interrupted", "the execution was interrupted")
          : errorOutput("ExecutionAborted", "the kernel aborted the execution"),
      );
    }
    // A silent execution may publish nothing on iopub; its reply still names the error.
    if (execution.silent && !execution.sawError && content.status === "error") {
      execution.sawError = true;
      execution.sink?.(errorOutput(String(content.ename ?? "Error"), String(content.evalue ?? ""), joinTraceback(content.traceback)));
    }
    execution.replied = true;
    if (execution.idle) execution.done();
  }

  async execute(request: ExecuteRequest, sink: OutputSink, signal: AbortSignal): Promise<void> {
    const hasEnv = Object.keys(request.envVars).length > 0;
    try {
      if (hasEnv) {
        const failure = await this.runSilently(this.spec.setEnvCode(request.envVars));
        if (failure) {
          sink(errorOutput("InvalidEnvVars", `the per-call env vars could not be set: ${failure.name}: ${failure.value}`));
          return;
        }
      }
      await this.run(request.code, sink, signal);
    } finally {
      if (hasEnv && !this.exited) await this.runSilently(this.spec.restoreEnvCode).catch(() => {});
    }
  }

  /** Runs code without output or history; resolves with its error, if it raised one. */
  private async runSilently(code: string): Promise<ErrorOutput | undefined> {
    let failure: ErrorOutput | undefined;
    await this.run(code, (output) => {
      if (output.type === "error") failure ??= output;
    }, undefined, true);
    return failure;
  }

  private async run(code: string, sink: OutputSink | undefined, signal: AbortSignal | undefined, silent = false): Promise<void> {
    if (this.exited) {
      sink?.(this.deathError());
      return;
    }
    const message = this.jupyter!.createMessage("execute_request", {
      code,
      silent,
      store_history: !silent,
      user_expressions: {},
      allow_stdin: false,
      // We serialise calls ourselves; never let one error abort what follows.
      stop_on_error: false,
    });
    const msgId = message.header.msg_id;
    let interruptTimer: NodeJS.Timeout | undefined;
    let finished!: () => void;
    const done = new Promise<void>((resolve) => (finished = resolve));
    const execution: PendingExecution = { sink, silent, sawError: false, interrupted: false, idle: false, replied: false, done: finished };
    this.pending.set(msgId, execution);
    const onExit = () => {
      if (!execution.sawError) sink?.(this.deathError());
      finished();
    };
    const onAbort = () => {
      execution.interrupted = true;
      this.interrupt();
      // A cell stuck in native code may ignore SIGINT: then the kernel goes, so the next call runs.
      interruptTimer = setTimeout(() => {
        log.warn("kernel ignored the interrupt; killing it", { pid: this.process?.pid });
        this.process?.kill("SIGKILL");
      }, this.options.interruptGraceMs ?? 3_000);
    };
    this.exitListeners.add(onExit);
    if (signal?.aborted) onAbort();
    else signal?.addEventListener("abort", onAbort, { once: true });
    try {
      await this.shell!.send(this.jupyter!.serialize(message));
      await done;
    } finally {
      clearTimeout(interruptTimer);
      signal?.removeEventListener("abort", onAbort);
      this.exitListeners.delete(onExit);
      this.pending.delete(msgId);
    }
  }

  /** SIGINT is what `interrupt_mode: signal` (ipykernel's and IRkernel's) expects: it stops the running cell. */
  interrupt(): void {
    if (!this.exited) this.process?.kill("SIGINT");
  }

  private deathError() {
    const tail = this.stderrTail.trim().split("\n").slice(-20).join("\n");
    return errorOutput(
      "UnexpectedEndOfExecution",
      `${this.exitReason ?? "the kernel exited"}; it will be restarted on the next execution (state is lost)`,
      tail,
    );
  }

  private markExited(reason: string): void {
    if (this.exitReason !== undefined) return;
    this.exitReason = reason;
    log.info("kernel exited", { language: this.language, pid: this.process?.pid, reason });
    for (const listener of [...this.exitListeners]) listener();
    this.closeSockets();
    if (this.runtimeDir) void fs.rm(this.runtimeDir, { recursive: true, force: true }).catch(() => {});
  }

  private exitPromise(): Promise<void> {
    if (this.exited) return Promise.resolve();
    return new Promise((resolve) => {
      const listener = () => {
        this.exitListeners.delete(listener);
        resolve();
      };
      this.exitListeners.add(listener);
    });
  }

  private closeSockets(): void {
    for (const socket of [this.shell, this.control, this.iopub]) {
      if (socket && !socket.closed) socket.close();
    }
  }

  async shutdown(): Promise<void> {
    const child = this.process;
    if (!child || child.exitCode !== null || child.signalCode !== null) {
      this.markExited("the kernel was shut down");
      return;
    }
    const exited = this.exitPromise();
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 2_000);
    await exited;
    clearTimeout(timer);
    if (this.runtimeDir) await fs.rm(this.runtimeDir, { recursive: true, force: true }).catch(() => {});
  }
}

function joinTraceback(traceback: unknown): string {
  return Array.isArray(traceback) ? traceback.map(String).join("\n") : String(traceback ?? "");
}

function toIsoDate(date: unknown): string {
  return typeof date === "string" && date ? date : new Date().toISOString();
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
