import type { ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { createLogger } from "../../shared/log.js";
import { errorOutput, streamOutput, type ExecuteRequest, type Kernel, type KernelLaunch, type OutputSink } from "./types.js";
import { spawnKernel } from "./kernel-process.js";

const log = createLogger("interpreter");

/**
 * Reads one command line per cell from stdin. The INT trap returns from the sourced cell (loops
 * included); a `read` interrupted between cells (status > 128) just reads again.
 */
const BASH_LOOP = [
  "trap 'return 130 2>/dev/null' INT",
  "while :; do IFS= read -r __cubicle_line; __cubicle_read=$?",
  'if [ "$__cubicle_read" -ne 0 ]; then [ "$__cubicle_read" -gt 128 ] && continue; exit 0; fi',
  'eval "$__cubicle_line"; done',
].join("; ");

export interface BashKernelOptions {
  bashPath?: string;
  launch: KernelLaunch;
  runtimeDir?: string;
  interruptGraceMs?: number;
}

/**
 * One persistent `bash` per context (variables, functions and `cd` carry over). Each cell is
 * written to a file and `source`d; a marker with the exit status is then printed on stdout and
 * a marker on stderr, so the end of a cell is known once both streams have delivered everything
 * before them. A non-zero status is reported as an error, as the Jupyter bash kernel does.
 */
export class BashKernel implements Kernel {
  readonly language = "bash";
  private child: ChildProcess | undefined;
  private dir: string | undefined;
  private exitReason: string | undefined;
  private executionCount = 0;
  private readonly marker = `__cubicle_${randomBytes(8).toString("hex")}__`;
  private current:
    | { sink: OutputSink; stdoutDone: boolean; stderrDone: boolean; status: number | undefined; finish: () => void }
    | undefined;
  private pendingStdout = "";
  private pendingStderr = "";

  constructor(private readonly options: BashKernelOptions) {}

  get exited(): boolean {
    return this.exitReason !== undefined;
  }

  async start(): Promise<void> {
    const { launch } = this.options;
    const base = this.options.runtimeDir ?? path.join(os.tmpdir(), "cubicle-kernels");
    await fs.mkdir(base, { recursive: true, mode: 0o711 });
    this.dir = await fs.mkdtemp(path.join(base, "sh-"));
    await fs.chmod(this.dir, 0o755);
    // A trap that returns from the sourced cell makes SIGINT stop the whole cell, loops included.
    // As the user with their groups, and marked for the OOM killer (kernel-process.ts).
    const child = spawnKernel(launch, this.options.bashPath ?? "bash", ["--noprofile", "--norc", "-c", BASH_LOOP], { stdio: ["pipe", "pipe", "pipe"], detached: true });
    this.child = child;
    child.stdout!.on("data", (chunk: Buffer) => this.onStream("stdout", chunk.toString("utf8")));
    child.stderr!.on("data", (chunk: Buffer) => this.onStream("stderr", chunk.toString("utf8")));
    child.on("error", (error) => this.markExited(`bash could not be started: ${error.message}`));
    child.on("exit", (code, signal) => this.markExited(signal ? `bash was killed by ${signal}` : `bash exited with code ${code}`));
    await new Promise<void>((resolve, reject) => {
      child.once("spawn", resolve);
      child.once("error", reject);
    });
  }

  private onStream(type: "stdout" | "stderr", text: string): void {
    const current = this.current;
    let buffered = (type === "stdout" ? this.pendingStdout : this.pendingStderr) + text;
    const markerAt = buffered.indexOf(this.marker);
    let emit = buffered;
    let rest = "";
    if (markerAt >= 0) {
      emit = buffered.slice(0, markerAt);
      const after = buffered.slice(markerAt + this.marker.length);
      const newline = after.indexOf("\n");
      if (newline < 0) {
        // The marker line is still incomplete; wait for the rest.
        if (type === "stdout") this.pendingStdout = buffered.slice(markerAt);
        else this.pendingStderr = buffered.slice(markerAt);
        if (emit && current) current.sink(streamOutput(type, emit));
        return;
      }
      rest = after.slice(newline + 1);
      if (current) {
        if (type === "stdout") {
          current.status = Number(after.slice(0, newline));
          current.stdoutDone = true;
        } else current.stderrDone = true;
      }
    } else {
      // Hold back a tail that could be the start of a marker split across chunks.
      const keep = partialMarkerLength(buffered, this.marker);
      emit = buffered.slice(0, buffered.length - keep);
      rest = buffered.slice(buffered.length - keep);
    }
    if (type === "stdout") this.pendingStdout = rest;
    else this.pendingStderr = rest;
    if (emit && current) current.sink(streamOutput(type, emit));
    buffered = "";
    if (current && current.stdoutDone && current.stderrDone) current.finish();
  }

  async execute(request: ExecuteRequest, sink: OutputSink, signal: AbortSignal): Promise<void> {
    if (this.exited || !this.child) {
      sink(this.deathError());
      return;
    }
    sink({ type: "number_of_executions", execution_count: ++this.executionCount });
    const cellFile = path.join(this.dir!, `cell-${this.executionCount}.sh`);
    const exports = Object.entries(request.envVars)
      .map(([key, value]) => (/^[A-Za-z_][A-Za-z0-9_]*$/.test(key) ? `export ${key}=${shellQuote(value)}\n` : ""))
      .join("");
    await fs.writeFile(cellFile, exports + request.code + "\n", { mode: 0o644 });
    let finish!: () => void;
    const done = new Promise<void>((resolve) => (finish = resolve));
    const current = { sink, stdoutDone: false, stderrDone: false, status: undefined as number | undefined, finish };
    this.current = current;
    let killTimer: NodeJS.Timeout | undefined;
    const onAbort = () => {
      if (this.child?.pid) process.kill(-this.child.pid, "SIGINT");
      killTimer = setTimeout(() => {
        log.warn("bash ignored the interrupt; killing it", { pid: this.child?.pid });
        if (this.child?.pid) process.kill(-this.child.pid, "SIGKILL");
      }, this.options.interruptGraceMs ?? 1_000);
    };
    if (signal.aborted) onAbort();
    else signal.addEventListener("abort", onAbort, { once: true });
    // Per-call env vars are exported by the cell file and unset again after it.
    const restore = Object.keys(request.envVars).filter((key) => /^[A-Za-z_][A-Za-z0-9_]*$/.test(key));
    const saveEnv = restore.map((key) => `__cubicle_saved_${key}="\${${key}-__cubicle_unset__}"`).join("; ");
    const restoreEnv = restore
      .map((key) => `if [ "$__cubicle_saved_${key}" = __cubicle_unset__ ]; then unset ${key}; else export ${key}="$__cubicle_saved_${key}"; fi; unset __cubicle_saved_${key}`)
      .join("; ");
    const line = [
      saveEnv,
      `source ${shellQuote(cellFile)} </dev/null`,
      `__cubicle_status=$?`,
      restoreEnv,
      `printf '%s%s\\n' ${this.marker} "$__cubicle_status"`,
      `printf '%s\\n' ${this.marker} >&2`,
    ]
      .filter(Boolean)
      .join("; ");
    try {
      this.child.stdin!.write(line + "\n");
      await done;
      if (current.status !== undefined && current.status !== 0 && !this.exited) {
        sink(errorOutput("ExitCodeError", String(current.status), `bash: the cell exited with status ${current.status}`));
      }
    } finally {
      clearTimeout(killTimer);
      signal.removeEventListener("abort", onAbort);
      if (this.current === current) this.current = undefined;
      await fs.rm(cellFile, { force: true }).catch(() => {});
    }
  }

  private deathError() {
    return errorOutput("UnexpectedEndOfExecution", `${this.exitReason ?? "bash is not running"}; it will be restarted on the next execution (state is lost)`);
  }

  private markExited(reason: string): void {
    if (this.exitReason !== undefined) return;
    this.exitReason = reason;
    const current = this.current;
    if (current) {
      current.sink(this.deathError());
      current.finish();
    }
    if (this.dir) void fs.rm(this.dir, { recursive: true, force: true }).catch(() => {});
  }

  async shutdown(): Promise<void> {
    const child = this.child;
    if (!child?.pid || child.exitCode !== null || child.signalCode !== null) {
      this.markExited("bash was shut down");
      return;
    }
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    try {
      process.kill(-child.pid, "SIGKILL");
    } catch {
      child.kill("SIGKILL");
    }
    await exited;
    if (this.dir) await fs.rm(this.dir, { recursive: true, force: true }).catch(() => {});
  }
}

function shellQuote(value: string): string {
  return `'${value.replaceAll("'", `'\\''`)}'`;
}

/** Length of the longest suffix of `text` that is a prefix of `marker`. */
function partialMarkerLength(text: string, marker: string): number {
  for (let length = Math.min(marker.length - 1, text.length); length > 0; length--) {
    if (marker.startsWith(text.slice(text.length - length))) return length;
  }
  return 0;
}
