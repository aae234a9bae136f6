import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";

const log = createLogger("nft");

/** How long one transaction may take before the shell is presumed stuck (and restarted). */
const TRANSACTION_TIMEOUT_MS = 15_000;
/** nft's output for one transaction is an error message or a listing: keep it bounded. */
const MAX_OUTPUT_BYTES = 1 << 20;

interface Pending {
  lines: string;
  marker: string;
  resolve: (output: string) => void;
  reject: (err: Error) => void;
}

/**
 * One resident `nft -i` that runs nftables transactions written to its stdin, so a change costs
 * no process creation (expensive on this project's machines) (NFT_SHELL_NOTE).
 *
 * NFT_SHELL_NOTE: nft's interactive mode parses each input line as one batch, applied
 * atomically (a failing command leaves the whole line unapplied). stderr is merged into stdout
 * (`2>&1`) so an error and the line after it arrive in order. After each transaction the shell
 * is asked to list a table that cannot exist (`cubicle_nft_marker_<n>`); nft answers with an
 * error that echoes that line, which marks the end of the transaction's output. What came
 * before the marker's "Error:" is the transaction's own output: an error message if it failed.
 * Transactions run one at a time, in order. If nft dies or stalls, the pending transaction
 * fails and the next one starts a fresh shell.
 */
export class NftShell {
  private child: ChildProcessWithoutNullStreams | undefined;
  private output = "";
  private queue: Pending[] = [];
  private current: Pending | undefined;
  private timer: NodeJS.Timeout | undefined;
  private sequence = 0;
  private closed = false;

  /** Runs one atomic transaction: commands separated by newlines or `;`. Resolves with nft's output. */
  run(script: string): Promise<string> {
    if (this.closed) return Promise.reject(new CubicleError("unavailable", "the nftables shell is closed"));
    // One line = one batch: join the script's lines (comments and blank lines dropped).
    const lines = script
      .split("\n")
      .map((line) => line.trim())
      .filter((line) => line.length > 0 && !line.startsWith("#"))
      .join("; ")
      .replace(/([{;])\s*;\s*/g, "$1 ");
    return new Promise((resolve, reject) => {
      this.queue.push({ lines, marker: "", resolve, reject });
      this.next();
    });
  }

  close(): void {
    this.closed = true;
    for (const pending of this.queue.splice(0)) pending.reject(new CubicleError("unavailable", "the nftables shell is closed"));
    this.stop(new CubicleError("unavailable", "the nftables shell is closed"));
  }

  private next(): void {
    if (this.current || this.queue.length === 0) return;
    const pending = this.queue.shift()!;
    this.current = pending;
    pending.marker = `list table inet cubicle_nft_marker_${++this.sequence}`;
    const child = this.ensureChild();
    this.output = "";
    this.timer = setTimeout(() => this.stop(new CubicleError("internal", "nft did not answer in time")), TRANSACTION_TIMEOUT_MS);
    child.stdin.write(`${pending.lines}\n${pending.marker}\n`);
  }

  private ensureChild(): ChildProcessWithoutNullStreams {
    if (this.child) return this.child;
    const child = spawn("sh", ["-c", "exec nft -i 2>&1"], { stdio: ["pipe", "pipe", "pipe"] });
    this.child = child;
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (chunk: string) => this.onOutput(chunk));
    child.stderr.resume();
    child.stdin.on("error", () => undefined);
    child.on("error", (err) => this.onExit(child, `nft could not start: ${err.message}`));
    child.on("exit", (code, signal) => this.onExit(child, `nft exited (${signal ?? code})`));
    // A resident helper must not keep its process alive: a transaction in flight does (its timer).
    child.unref();
    for (const stream of [child.stdin, child.stdout, child.stderr]) (stream as unknown as { unref?: () => void }).unref?.();
    return child;
  }

  private onOutput(chunk: string): void {
    const pending = this.current;
    if (!pending) return;
    this.output += chunk;
    if (this.output.length > MAX_OUTPUT_BYTES) {
      this.stop(new CubicleError("internal", "nft wrote more output than expected"));
      return;
    }
    // The marker's error: "Error: ...\n<marker line>\n<carets>\n".
    const at = this.output.indexOf(`\n${pending.marker}\n`);
    if (at < 0) return;
    const afterMarker = this.output.slice(at + pending.marker.length + 2);
    if (!afterMarker.includes("\n")) return;
    const own = this.output.slice(0, at);
    const errorStart = own.lastIndexOf("Error:");
    const body = errorStart >= 0 ? own.slice(0, errorStart) : own;
    this.finish(pending, body);
  }

  private finish(pending: Pending, body: string): void {
    clearTimeout(this.timer);
    this.current = undefined;
    this.output = "";
    if (/^Error:/m.test(body)) pending.reject(new CubicleError("internal", `nftables refused a change: ${body.trim()}`));
    else pending.resolve(body);
    this.next();
  }

  private onExit(child: ChildProcessWithoutNullStreams, why: string): void {
    if (this.child !== child) return;
    this.child = undefined;
    if (!this.closed) log.warn("the nftables shell ended; the next change starts a new one", { why });
    const pending = this.current;
    this.current = undefined;
    clearTimeout(this.timer);
    pending?.reject(new CubicleError("internal", why));
    if (!this.closed) this.next();
  }

  private stop(err: Error): void {
    const child = this.child;
    const pending = this.current;
    this.child = undefined;
    this.current = undefined;
    clearTimeout(this.timer);
    pending?.reject(err);
    if (child) {
      child.stdin.end();
      child.kill("SIGKILL");
    }
    if (!this.closed) this.next();
  }
}
