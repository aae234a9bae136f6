/**
 * One process started by the agent, with pipes or a PTY: its output fanned out to any number
 * of observers (Start and Connect streams), its stdin, its signals and its single end event.
 */
import { spawn, type ChildProcess } from "node:child_process";
import type { Readable, Writable } from "node:stream";
import type { IPty } from "node-pty";
import { CubicleError } from "../../shared/cubicle-error.js";
import { createLogger } from "../../shared/log.js";
import type { AgentUser } from "../users.js";
import { endEventFromExit, signalNumber, type EndEvent } from "./exit-status.js";
import { launchAs, markForOomKiller } from "./launch.js";
import { startWithAddon, type AddonChild, type SpawnAddonError } from "./spawn-addon.js";

const log = createLogger("agent-process");

export type OutputKind = "stdout" | "stderr" | "pty";

export interface ProcessObserver {
  data(kind: OutputKind, chunk: Buffer): void;
  end(event: EndEvent): void;
}

/** The process as the client asked for it; List reports it unchanged. */
export interface ProcessConfig {
  cmd: string;
  args: string[];
  envs: Record<string, string>;
  cwd?: string;
}

export interface SpawnSpec {
  /** What is started. */
  config: ProcessConfig;
  /** What the process list shows, when not `config` (a session command's wrapper, SESSIONS_NOTE). */
  shown?: ProcessConfig;
  tag?: string;
  /** Resolved working directory. */
  cwd: string;
  /** The complete environment of the process. */
  env: Record<string, string>;
  user: AgentUser;
  /** Pipe stdin (true) or give the process /dev/null (false). Ignored for PTYs. */
  stdin: boolean;
  pty?: { cols: number; rows: number };
}

/** The pipes of a command started without a PTY; stdin only when it asked for one. */
interface CommandPipes {
  stdin: Writable | null | undefined;
  stdout: Readable;
  stderr: Readable;
}

/** upstream envd sends at most 32 KiB per data event, 16 KiB for PTYs. */
const stdChunkBytes = 32 * 1024;
const ptyChunkBytes = 16 * 1024;
/**
 * After the process exits, output still in the pipes is read for this long. A background
 * child that inherited the pipes may keep them open forever; upstream stops reading at exit too.
 */
const drainAfterExitMs = 100;

export class ManagedProcess {
  readonly pid: number;
  readonly config: ProcessConfig;
  readonly tag: string | undefined;
  readonly isPty: boolean;
  /** Set once, when the process has exited and its output has been delivered. */
  end: EndEvent | undefined;
  readonly ended: Promise<EndEvent>;

  private observers = new Set<ProcessObserver>();
  /** Output produced before anyone subscribed (only until the first subscriber). */
  private early: Array<[OutputKind, Buffer]> | undefined = [];
  private pauseCount = 0;
  private lifetimeTimer: NodeJS.Timeout | undefined;
  private resolveEnded!: (event: EndEvent) => void;

  private constructor(
    spec: SpawnSpec,
    pid: number,
    private readonly pipes: CommandPipes | undefined,
    private readonly term: IPty | undefined,
  ) {
    this.pid = pid;
    this.config = spec.shown ?? spec.config;
    this.tag = spec.tag;
    this.isPty = term !== undefined;
    this.ended = new Promise((resolve) => (this.resolveEnded = resolve));
  }

  /**
   * Spawns a command with pipes: `[stdin], stdout, stderr`, in its own session and process
   * group; through the spawn addon when the agent has it (SPAWN_NOTE), else Node's spawn.
   */
  static async spawnCommand(spec: SpawnSpec): Promise<ManagedProcess> {
    let started: AddonChild | undefined;
    try {
      started = startWithAddon({ file: spec.config.cmd, args: spec.config.args, env: spec.env, cwd: spec.cwd, identity: spec.user, stdin: spec.stdin });
    } catch (error) {
      // Node's wording for the same failures (`spawn FILE ENOENT`), so both paths read alike.
      const message = (error as SpawnAddonError).syscall ? `spawn ${spec.config.cmd} ${(error as SpawnAddonError).code}` : (error as Error).message;
      throw new CubicleError("invalid_argument", `error starting process '${commandLine(spec.config)}': ${message}`, { cause: error });
    }
    if (started) {
      const proc = new ManagedProcess(spec, started.pid, started, undefined);
      proc.attachPipes(started, (listener) => started.onExit(listener));
      return proc;
    }
    return ManagedProcess.spawnWithNode(spec);
  }

  /** Node's spawn of run-as (RUN_AS_NOTE): the path without the addon. */
  private static async spawnWithNode(spec: SpawnSpec): Promise<ManagedProcess> {
    const launch = launchAs(spec.user, spec.config.cmd, spec.config.args);
    let child: ChildProcess;
    try {
      child = spawn(launch.file, launch.args, {
        cwd: spec.cwd,
        env: spec.env,
        stdio: [spec.stdin ? "pipe" : "ignore", "pipe", "pipe"],
        // Own process group, so a kill reaches the whole command (bash and what it started).
        detached: true,
        uid: launch.uid,
        gid: launch.gid,
      });
    } catch (error) {
      // Node refuses some argv synchronously (a NUL byte in the command or an argument).
      throw new CubicleError("invalid_argument", `error starting process '${commandLine(spec.config)}': ${(error as Error).message}`, { cause: error });
    }
    await new Promise<void>((resolve, reject) => {
      child.once("spawn", resolve);
      child.once("error", (error) =>
        reject(new CubicleError("invalid_argument", `error starting process '${commandLine(spec.config)}': ${error.message}`, { cause: error })),
      );
    });
    markForOomKiller(child.pid, launch);
    const pipes = { stdin: child.stdin, stdout: child.stdout!, stderr: child.stderr! };
    const proc = new ManagedProcess(spec, child.pid!, pipes, undefined);
    child.on("error", (error) => log.warn("process error", { pid: proc.pid, error: error.message }));
    proc.attachPipes(pipes, (listener) => child.once("exit", listener));
    return proc;
  }

  /** Spawns a command on a new pseudo-terminal (node-pty, loaded on first use). */
  static async spawnPty(spec: SpawnSpec): Promise<ManagedProcess> {
    const pty = await loadNodePty();
    const size = spec.pty!;
    const launch = launchAs(spec.user, spec.config.cmd, spec.config.args);
    let term: IPty;
    // Without a helper, node-pty's fork keeps the parent's supplementary groups across
    // setgid/setuid, so the agent holds the user's groups just for the synchronous fork.
    const savedGroups = launch.uid !== undefined ? process.getgroups!() : undefined;
    try {
      if (savedGroups) process.setgroups!(spec.user.groups);
      term = pty.spawn(launch.file, launch.args, {
        name: spec.env.TERM ?? "xterm-256color",
        cols: clampSize(size.cols, 80),
        rows: clampSize(size.rows, 24),
        cwd: spec.cwd,
        env: spec.env,
        encoding: null,
        uid: launch.uid,
        gid: launch.gid,
      });
    } catch (error) {
      throw new CubicleError(
        "invalid_argument",
        `error starting pty with command '${commandLine(spec.config)}' in dir '${spec.cwd}' with '${size.cols}' cols and '${size.rows}' rows: ${(error as Error).message}`,
        { cause: error },
      );
    } finally {
      if (savedGroups) process.setgroups!(savedGroups);
    }
    markForOomKiller(term.pid, launch);
    const proc = new ManagedProcess(spec, term.pid, undefined, term);
    proc.attachPty(term);
    return proc;
  }

  /** Adds an observer; returns the function that removes it. A process that ended gets only `end`. */
  subscribe(observer: ProcessObserver): () => void {
    if (this.end) {
      observer.end(this.end);
      return () => {};
    }
    this.observers.add(observer);
    const early = this.early;
    this.early = undefined;
    if (early) for (const [kind, chunk] of early) observer.data(kind, chunk);
    return () => {
      this.observers.delete(observer);
    };
  }

  /** Holds the output back (a client reads slowly) until the returned release is called. */
  pause(): () => void {
    let released = false;
    if (this.pauseCount++ === 0) this.setFlowing(false);
    return () => {
      if (released) return;
      released = true;
      if (--this.pauseCount === 0) this.setFlowing(true);
    };
  }

  async writeStdin(data: Buffer): Promise<void> {
    if (this.term) throw new CubicleError("internal", "error writing to stdin: tty assigned to process — input should be written to the pty, not the stdin");
    const stdin = this.pipes?.stdin;
    if (!stdin || stdin.destroyed || stdin.writableEnded) throw new CubicleError("internal", "error writing to stdin: stdin not enabled or closed");
    await new Promise<void>((resolve, reject) => {
      stdin.write(data, (error) =>
        error ? reject(new CubicleError("internal", `error writing to stdin: error writing to stdin of process '${this.pid}': ${error.message}`)) : resolve(),
      );
    });
  }

  closeStdin(): void {
    if (this.term) throw new CubicleError("internal", "error closing stdin: cannot close stdin for PTY process — send Ctrl+D (0x04) instead");
    const stdin = this.pipes?.stdin;
    if (stdin && !stdin.writableEnded) stdin.end();
  }

  writePty(data: Buffer): void {
    if (!this.term) throw new CubicleError("internal", "error writing to tty: tty not assigned to process — input should be written to the stdin, not the tty");
    this.term.write(data);
  }

  resize(cols: number, rows: number): void {
    if (!this.term) throw new CubicleError("internal", "error resizing tty: tty not assigned to process");
    this.term.resize(clampSize(cols, 80), clampSize(rows, 24));
  }

  /** Sends a signal to the process group (falls back to the process alone). */
  signal(signal: NodeJS.Signals): void {
    if (this.end) return;
    try {
      process.kill(-this.pid, signal);
    } catch {
      try {
        process.kill(this.pid, signal);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "ESRCH") {
          throw new CubicleError("internal", `error sending signal: ${(error as Error).message}`);
        }
      }
    }
  }

  /** Kills the process (SIGKILL) when `ms` have passed: the Connect-Timeout-Ms of its Start. */
  setLifetime(ms: number): void {
    if (this.end) return;
    if (this.lifetimeTimer) clearTimeout(this.lifetimeTimer);
    this.lifetimeTimer = setTimeout(() => {
      log.debug("process reached its lifetime, killing it", { pid: this.pid, ms });
      this.signal("SIGKILL");
    }, ms);
  }

  private emitData(kind: OutputKind, chunk: Buffer): void {
    const max = kind === "pty" ? ptyChunkBytes : stdChunkBytes;
    for (let offset = 0; offset < chunk.length; offset += max) {
      const piece = chunk.length <= max ? chunk : chunk.subarray(offset, offset + max);
      if (this.early) this.early.push([kind, piece]);
      else for (const observer of this.observers) observer.data(kind, piece);
    }
  }

  private finish(event: EndEvent): void {
    if (this.end) return;
    this.end = event;
    if (this.lifetimeTimer) clearTimeout(this.lifetimeTimer);
    this.lifetimeTimer = undefined;
    const observers = [...this.observers];
    this.observers.clear();
    this.early = undefined;
    for (const observer of observers) observer.end(event);
    this.resolveEnded(event);
  }

  private setFlowing(flowing: boolean): void {
    if (this.term) {
      if (flowing) this.term.resume();
      else this.term.pause();
      return;
    }
    for (const stream of [this.pipes?.stdout, this.pipes?.stderr]) {
      if (!stream || stream.destroyed) continue;
      if (flowing) stream.resume();
      else stream.pause();
    }
  }

  /** Streams the output, and ends the process once it has exited and its output is drained. */
  private attachPipes(pipes: CommandPipes, onExit: (listener: (code: number | null, signal: NodeJS.Signals | number | null) => void) => void): void {
    const streams: Array<[OutputKind, Readable]> = [
      ["stdout", pipes.stdout],
      ["stderr", pipes.stderr],
    ];
    let open = streams.length;
    let exit: EndEvent | undefined;
    let drainTimer: NodeJS.Timeout | undefined;
    const complete = () => {
      if (!exit) return;
      if (drainTimer) clearTimeout(drainTimer);
      drainTimer = undefined;
      for (const [, stream] of streams) stream.destroy();
      this.finish(exit);
    };
    for (const [kind, stream] of streams) {
      stream.on("data", (chunk: Buffer) => {
        this.emitData(kind, chunk);
        drainTimer?.refresh();
      });
      stream.on("error", (error) => log.debug("output stream error", { pid: this.pid, kind, error: error.message }));
      stream.once("close", () => {
        if (--open === 0) complete();
      });
    }
    pipes.stdin?.on("error", (error) => log.debug("stdin error", { pid: this.pid, error: error.message }));
    onExit((code, signal) => {
      exit = endEventFromExit(code, signal);
      // As Node does for its children: nobody reads the stdin of an exited process.
      pipes.stdin?.destroy();
      if (open === 0) return complete();
      const check = () => {
        // A paused (backed-up) output is not lost: wait until the client catches up.
        if (this.pauseCount > 0) drainTimer = setTimeout(check, drainAfterExitMs);
        else complete();
      };
      drainTimer = setTimeout(check, drainAfterExitMs);
    });
  }

  private attachPty(term: IPty): void {
    term.onData((data: string | Buffer) => this.emitData("pty", typeof data === "string" ? Buffer.from(data) : data));
    term.onExit(({ exitCode, signal }) => this.finish(endEventFromExit(exitCode, signal ? signalNumber(signal) : null)));
  }
}

function commandLine(config: ProcessConfig): string {
  return [config.cmd, ...config.args].join(" ");
}

function clampSize(n: number, fallback: number): number {
  return Number.isInteger(n) && n > 0 ? Math.min(n, 65535) : fallback;
}

type NodePty = typeof import("node-pty");
let nodePty: Promise<NodePty> | undefined;

function loadNodePty(): Promise<NodePty> {
  nodePty ??= import("node-pty").then((m) => ((m as { default?: NodePty }).default ?? m) as NodePty);
  return nodePty;
}
