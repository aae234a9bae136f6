import { spawn } from "node:child_process";
import { CubicleError } from "./cubicle-error.js";
import { createLogger } from "./log.js";

const log = createLogger("exec");

export interface RunOptions {
  /** Kill the command and fail after this long. Default 60 s. */
  timeoutMs?: number;
  /** Bytes written to the command's stdin. */
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Do not throw on a non-zero exit; return the result instead. */
  allowFailure?: boolean;
  /** Each complete line of stderr as it comes (progress of a long command); stderr is still returned. */
  onStderrLine?: (line: string) => void;
}

export interface RunResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs an external command (runc, ip, nft, criu, qemu …) from an argv, never a shell string.
 * Logs the argv at debug level, enforces a timeout, and raises a CubicleError with stderr
 * attached when the command fails.
 */
export function runCommand(argv: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const [file, ...args] = argv;
  if (!file) throw new CubicleError("internal", "runCommand needs a command");
  const timeoutMs = options.timeoutMs ?? 60_000;
  log.debug("run", { argv });
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, {
      env: options.env ?? process.env,
      cwd: options.cwd,
      stdio: [options.input === undefined ? "ignore" : "pipe", "pipe", "pipe"],
    });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, timeoutMs);
    child.stdout!.on("data", (chunk: Buffer) => stdout.push(chunk));
    let partial = "";
    child.stderr!.on("data", (chunk: Buffer) => {
      stderr.push(chunk);
      if (!options.onStderrLine) return;
      const lines = (partial + chunk.toString("utf8")).split("\n");
      partial = lines.pop()!.slice(-4096);
      for (const line of lines) if (line.trim()) options.onStderrLine(line);
    });
    if (options.input !== undefined) child.stdin!.end(options.input);
    child.on("error", (err) => {
      clearTimeout(timer);
      reject(new CubicleError("internal", `${file}: ${err.message}`, { cause: err }));
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      const result: RunResult = {
        exitCode: code ?? (signal ? 128 : 1),
        stdout: Buffer.concat(stdout).toString("utf8"),
        stderr: Buffer.concat(stderr).toString("utf8"),
      };
      if (timedOut) {
        reject(new CubicleError("deadline_exceeded", `${argv.join(" ")}: timed out after ${timeoutMs} ms`, { details: { stderr: result.stderr } }));
      } else if (result.exitCode !== 0 && !options.allowFailure) {
        const detail = (result.stderr.trim() || result.stdout.trim()).slice(-2000);
        reject(new CubicleError("internal", `${argv.join(" ")} exited with ${result.exitCode}: ${detail}`, { details: { stderr: result.stderr } }));
      } else {
        resolve(result);
      }
    });
  });
}
