import { spawn, type ChildProcess, type ChildProcessWithoutNullStreams } from "node:child_process";
import { createInterface } from "node:readline";
import { CubicleError } from "../../shared/cubicle-error.js";
import { createLogger } from "../../shared/log.js";

const log = createLogger("sandbox-helper");

/**
 * SANDBOX_HELPER_NOTE: the host-side steps of a sandbox that Node cannot make itself (btrfs
 * ioctls, user namespaces with a chosen owner, idmapped mounts through the new mount API) are
 * one static program, src/runtime/container/native/sandbox-helper.c, which replaced one process
 * start per step (`mount`, `cp -a`, `umount`, `nsenter hostname`): process creation is the
 * expensive part of every path here. It runs resident and forks itself per step
 * (HELPER_PROTOCOL_NOTE), and starts runc too.
 *
 * USERNS_OWNER_NOTE: every sandbox has its own host uid range (UidRanges), and its user
 * namespace is *owned* by the range's first uid, not by root. The kernel charges per-user counts
 * (inotify instances and watches, nested namespaces, fanotify groups …) to the uid inside and to
 * the namespace's owner in the parent namespace; with root as every sandbox's owner, 128 inotify
 * instances in one sandbox broke inotify in all the others and for host root. Owned by its own
 * uid, a sandbox meets the host's per-user limits alone. A fresh sandbox's namespace is made by
 * the helper (`prepare --userns`) and joined by runc by path; a restored one is made by CRIU,
 * which the preloaded src/runtime/container/native/criu-userns-shim.c lets create it as the
 * sandbox's uid, and whose image view (`--criu-images`) maps it to the new range. Template
 * trees and layers keep canonical ids (100000 + n) on disk and are mounted idmapped, so one tree
 * serves every range and images move between ranges unchanged.
 */
export interface PrepareOptions {
  uidBase: number;
  lowerDir: string;
  layerDir: string;
  rootfsDir: string;
  quotaBytes: number;
  /** Snapshot this image layer instead of making an empty one. */
  fromLayer?: string;
  /** Make and pin the sandbox's user namespace here (fresh sandboxes; CRIU makes restored ones). */
  usernsPin?: string;
  /** A view of this CRIU image directory for this range, at criuView. */
  criuImages?: string;
  criuView?: string;
  /** Directories bound idmapped at `<rootfs's dir>/volumes/<n>` (VOLUME_BINDS_NOTE in the helper). */
  volumeSources?: readonly string[];
}

/**
 * HELPER_PROTOCOL_NOTE: the helper is resident (`sandbox-helper serve`, one per runtime, started
 * at the first request): a fork of the server's Node process is what makes a process start
 * cost 7-9 ms here, and the helper forks only itself (a small static program) for each request
 * and, for `exec`, execs the program directly, so a sandbox's create, restore, snapshot or kill
 * starts no process from Node but runc (and what runc starts).
 *
 * Requests are lines on its stdin, fields separated by tabs: `ID TIMEOUT_MS COMMAND ARG...`.
 * COMMAND is one of its subcommands (`prepare`, `snapshot`, `teardown`, `hostname`, `qgroup-gc`,
 * and what other modules add, e.g. `net-setup`; ARGs are the CLI's `--name value` pairs), `exec`
 * (`[--netns PATH] [--env NAME=VALUE]... [--stdio null|capture] [--nice 0-19] -- PROGRAM ARG...`:
 * the nice value set, setns into the netns, the variables set on top of the helper's
 * environment, stdio on /dev/null or captured, then execve), `cancel` (ARG: an id in flight) or `ping`. No field may hold a tab, a
 * newline or a NUL (checked here and by the helper), and a line is at most 64 KiB. Each request
 * runs in its own child, concurrently; the helper kills a child at its timeout. A reply is a
 * header line `ID KIND VALUE STDOUT_BYTES STDERR_BYTES` and then those bytes (stdout's first
 * 4 MiB, stderr's last 64 KiB); KIND is `exit` (VALUE = status), `signal`, `timeout` or
 * `cancelled` (VALUE = the signal) or `error` (refused before anything ran; the message is the
 * stderr part). A bad request gets an error reply and the helper lives on. If the helper dies,
 * the requests in flight fail (`unavailable`) and the next request starts a new one. The
 * one-shot CLI (`sandbox-helper prepare ...`) runs the same code, for tools and tests.
 */
export interface HelperCallOptions {
  /** The helper kills the request's child after this long (deadline_exceeded). Default 60 s. */
  timeoutMs?: number;
  /** Cancels the request: the helper kills its child (canceled). */
  signal?: AbortSignal;
}

export interface HelperExecOptions extends HelperCallOptions {
  /** Join this network namespace (a path, e.g. /run/netns/x) before exec. */
  netnsPath?: string;
  /** Variables set on top of the helper's environment (the server's, when the helper started). */
  env?: Record<string, string | undefined>;
  /**
   * "null": stdin, stdout and stderr on /dev/null (what a detached runc needs: the container
   * inherits them). "capture" (default): stdin on /dev/null, stdout and stderr returned.
   */
  stdio?: "null" | "capture";
  /**
   * Run the program (and all it starts, which keep it) at this nice value, 0–19, e.g. work that
   * must not compete with the server. Default: the helper's own. (Background starts do not use
   * it for runc: BACKGROUND_START_NOTE in container-runtime.ts.)
   */
  nice?: number;
}

export interface HelperExecResult {
  /** The exit status, or null when a signal ended the program. */
  exitCode: number | null;
  signal: number | null;
  stdout: string;
  stderr: string;
}

/** How a request ended, as the helper says it. */
interface HelperReply {
  kind: "exit" | "signal" | "timeout" | "cancelled" | "error";
  value: number;
  stdout: Buffer;
  stderr: Buffer;
}

const DEFAULT_TIMEOUT_MS = 60_000;
/**
 * How long past its timeout a request may go unanswered (the helper kills it at the timeout; a
 * child stuck in the kernel cannot die) before it fails here. Only that request fails.
 */
const ANSWER_GRACE_MS = 5_000;
const MAX_LINE_BYTES = 256 * 1024;
const MAX_STDOUT_BYTES = 4 << 20;
const MAX_STDERR_BYTES = 65_536;
const REPLY_HEADER = /^([\w.-]{1,32}|-)\t(exit|signal|timeout|cancelled|error)\t(\d{1,10})\t(\d{1,10})\t(\d{1,10})$/;

/**
 * The host-side steps of sandboxes (SANDBOX_HELPER_NOTE), through one resident
 * `sandbox-helper serve` (HELPER_PROTOCOL_NOTE). `call` runs a subcommand, `exec` a program
 * (runc) in a network namespace; both are open to other host-side modules.
 */
export class SandboxHelper {
  private resident: ResidentHelper | undefined;
  private sequence = 0;

  constructor(readonly binary: string) {}

  /** Layer, user namespace and root mount of a sandbox; returns the layer's subvolume id. */
  async prepare(options: PrepareOptions): Promise<number> {
    const args = [
      "--base",
      String(options.uidBase),
      "--lower",
      options.lowerDir,
      "--layer",
      options.layerDir,
      "--rootfs",
      options.rootfsDir,
      "--quota",
      String(options.quotaBytes),
    ];
    if (options.fromLayer) args.push("--from", options.fromLayer);
    if (options.usernsPin) args.push("--userns", options.usernsPin);
    if (options.criuImages && options.criuView) args.push("--criu-images", options.criuImages, "--criu-view", options.criuView);
    if (options.volumeSources?.length) {
      if (options.volumeSources.some((source) => !source.startsWith("/") || source.includes(";") || /[\t\n]/.test(source))) throw new CubicleError("invalid_argument", "a volume's directory must be an absolute path without ';'");
      args.push("--volumes", options.volumeSources.join(";"));
    }
    return subvolumeId(await this.call("prepare", args, { what: "preparing the sandbox's root filesystem" }));
  }

  /** A snapshot of a layer for an image; returns its subvolume id. */
  async snapshot(fromLayer: string, to: string): Promise<number> {
    return subvolumeId(await this.call("snapshot", ["--from", fromLayer, "--to", to], { what: "saving the sandbox's files" }));
  }

  /** Unmounts everything below `bundleDir` and deletes the layer subvolume (if given). */
  async teardown(bundleDir: string, layerDir: string | undefined): Promise<void> {
    const args = ["--bundle", bundleDir];
    if (layerDir) args.push("--layer", layerDir);
    await this.call("teardown", args, { what: "removing the sandbox's root filesystem" });
  }

  /** Names the host of a running sandbox (its init's UTS namespace). */
  async setHostname(pid: number, hostname: string): Promise<void> {
    await this.call("hostname", ["--pid", String(pid), "--name", hostname], { what: "renaming the sandbox's host" });
  }

  /** Removes the qgroups of deleted subvolumes; returns how many went. */
  async collectQgroups(mountDir: string): Promise<number> {
    const stdout = await this.call("qgroup-gc", ["--mount", mountDir], { what: "collecting stale quota groups" });
    return Number(/removed (\d+)/.exec(stdout)?.[1] ?? 0);
  }

  /**
   * Runs a subcommand of the helper (its `--name value` pairs as `args`) and returns its stdout.
   * A failure is a CubicleError with the helper's message: insufficient_storage for exit 28
   * (EDQUOT / ENOSPC), deadline_exceeded, canceled, unavailable (the helper died), else internal.
   */
  async call(command: string, args: readonly string[], options: HelperCallOptions & { what?: string } = {}): Promise<string> {
    const what = options.what ?? `sandbox-helper ${command}`;
    const reply = await this.request(command, args, options, what);
    const stderr = reply.stderr.toString("utf8").trim();
    if (reply.kind === "exit" && reply.value === 0) return reply.stdout.toString("utf8");
    if (reply.kind === "error") throw new CubicleError("internal", `${what}: the sandbox helper refused the request: ${stderr}`);
    const how = reply.kind === "exit" ? `exit ${reply.value}` : `signal ${reply.value}`;
    // Exit 28: the layer's quota or the pool is full (EDQUOT / ENOSPC).
    const code = (reply.kind === "exit" && reply.value === 28) || /Disk quota exceeded|No space left/.test(stderr) ? "insufficient_storage" : "internal";
    throw new CubicleError(code, `${what} failed: ${stderr || how}`);
  }

  /**
   * Runs a program from the resident helper (no process start from Node): in `netnsPath` when
   * given, with `env` on top of the helper's environment. A non-zero exit is a result, not an
   * error; a timeout (deadline_exceeded, the program killed), a cancel (canceled) or the
   * helper's death (unavailable) throw.
   */
  async exec(argv: readonly string[], options: HelperExecOptions = {}): Promise<HelperExecResult> {
    if (argv.length === 0 || !argv[0]) throw new CubicleError("internal", "exec needs a program");
    const args: string[] = [];
    if (options.netnsPath) args.push("--netns", options.netnsPath);
    for (const [name, value] of Object.entries(options.env ?? {})) {
      if (value === undefined) continue;
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) throw new CubicleError("internal", `environment variable name ${JSON.stringify(name)} is not valid`);
      args.push("--env", `${name}=${value}`);
    }
    args.push("--stdio", options.stdio ?? "capture");
    if (options.nice) {
      if (!Number.isInteger(options.nice) || options.nice < 0 || options.nice > 19) throw new CubicleError("internal", `nice ${options.nice} is not 0 to 19`);
      args.push("--nice", String(options.nice));
    }
    args.push("--", ...argv);
    const what = argv.join(" ").slice(0, 300);
    const reply = await this.request("exec", args, options, what);
    const stdout = reply.stdout.toString("utf8");
    const stderr = reply.stderr.toString("utf8");
    if (reply.kind === "error") throw new CubicleError("internal", `${what}: the sandbox helper refused the request: ${stderr.trim()}`);
    return { exitCode: reply.kind === "exit" ? reply.value : null, signal: reply.kind === "exit" ? null : reply.value, stdout, stderr };
  }

  /** Ends the resident helper once its requests in flight are answered; a later request starts another. */
  close(): void {
    this.resident?.close();
    this.resident = undefined;
  }

  /** The resident process's pid (tests), or undefined when none runs. */
  get residentPid(): number | undefined {
    return this.resident?.pid;
  }

  private async request(command: string, args: readonly string[], options: HelperCallOptions, what: string): Promise<HelperReply> {
    const timeoutMs = Math.max(1, Math.ceil(options.timeoutMs ?? DEFAULT_TIMEOUT_MS));
    const id = String(++this.sequence);
    const fields = [id, String(timeoutMs), command, ...args];
    for (const field of fields) {
      if (/[\t\n\0]/.test(field)) throw new CubicleError("invalid_argument", `${what}: an argument holds a tab, a newline or a NUL byte`);
    }
    const line = `${fields.join("\t")}\n`;
    if (Buffer.byteLength(line) > MAX_LINE_BYTES) throw new CubicleError("invalid_argument", `${what}: the request is longer than ${MAX_LINE_BYTES} bytes`);
    if (options.signal?.aborted) throw new CubicleError("canceled", `${what} was canceled`);
    if (!this.resident?.alive) this.resident = new ResidentHelper(this.binary);
    const resident = this.resident;
    const reply = await resident.send(id, line, timeoutMs + ANSWER_GRACE_MS, options.signal, () => this.cancel(resident, id));
    if (reply.kind === "timeout") {
      throw new CubicleError("deadline_exceeded", `${what} timed out after ${timeoutMs} ms`, { details: { stderr: reply.stderr.toString("utf8").slice(-2000) } });
    }
    if (reply.kind === "cancelled") throw new CubicleError("canceled", `${what} was canceled`);
    return reply;
  }

  /** Asks the helper to kill a request's child; its reply (`cancelled`) settles the request. */
  private cancel(resident: ResidentHelper, targetId: string): void {
    const id = String(++this.sequence);
    void resident.send(id, `${id}\t1000\tcancel\t${targetId}\n`, 1000 + ANSWER_GRACE_MS, undefined, () => undefined).catch(() => undefined);
  }
}

interface PendingRequest {
  resolve: (reply: HelperReply) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

/** One `sandbox-helper serve` process and its requests in flight. */
class ResidentHelper {
  private readonly child: ChildProcessWithoutNullStreams;
  private readonly pending = new Map<string, PendingRequest>();
  /** Reply bytes not yet parsed. */
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;
  /** The header being read the body of. */
  private header: { id: string; kind: HelperReply["kind"]; value: number; stdoutBytes: number; stderrBytes: number } | undefined;
  private ended = false;

  constructor(binary: string) {
    const child = spawn(binary, ["serve"], { stdio: ["pipe", "pipe", "pipe"] });
    this.child = child;
    child.stdin.on("error", () => undefined);
    child.stdout.on("data", (chunk: Buffer) => this.onData(chunk));
    child.stderr.on("data", (chunk: Buffer) => log.warn("sandbox helper", { stderr: chunk.toString("utf8").trim().slice(0, 2000) }));
    child.on("error", (err) => this.end(`the sandbox helper could not start (${binary}: ${err.message})`));
    // "close", not "exit": replies still in the pipe are read first.
    child.on("close", (code, signal) => this.end(`the sandbox helper ended (${signal ?? `exit ${code}`})`));
    // A resident helper must not keep the server alive: a request in flight does (its timer).
    child.unref();
    for (const stream of [child.stdin, child.stdout, child.stderr]) (stream as unknown as { unref?: () => void }).unref?.();
  }

  get alive(): boolean {
    return !this.ended;
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  send(id: string, line: string, answerWithinMs: number, signal: AbortSignal | undefined, cancel: () => void): Promise<HelperReply> {
    if (this.ended) return Promise.reject(new CubicleError("unavailable", "the sandbox helper ended; retry"));
    return new Promise<HelperReply>((resolve, reject) => {
      const onAbort = () => cancel();
      const settle = () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        this.pending.delete(id);
      };
      const timer = setTimeout(() => {
        settle();
        cancel();
        reject(new CubicleError("deadline_exceeded", `the sandbox helper did not answer request ${id} in ${answerWithinMs} ms`));
      }, answerWithinMs);
      this.pending.set(id, {
        resolve: (reply) => {
          settle();
          resolve(reply);
        },
        reject: (err) => {
          settle();
          reject(err);
        },
        timer,
      });
      signal?.addEventListener("abort", onAbort, { once: true });
      this.child.stdin.write(line);
    });
  }

  /** Ends stdin: the helper answers what is in flight, then exits. */
  close(): void {
    this.child.stdin.end();
  }

  private onData(chunk: Buffer): void {
    this.buffered.push(chunk);
    this.bufferedBytes += chunk.length;
    for (;;) {
      if (!this.header) {
        const joined = this.buffered.length === 1 ? this.buffered[0]! : Buffer.concat(this.buffered);
        this.buffered = [joined];
        const newline = joined.indexOf(0x0a);
        if (newline < 0) {
          if (joined.length > 256) this.desync("a reply header without its end");
          return;
        }
        const match = REPLY_HEADER.exec(joined.subarray(0, newline).toString("latin1"));
        const stdoutBytes = Number(match?.[4]);
        const stderrBytes = Number(match?.[5]);
        if (!match || stdoutBytes > MAX_STDOUT_BYTES || stderrBytes > MAX_STDERR_BYTES) {
          this.desync(`a malformed reply header: ${JSON.stringify(joined.subarray(0, Math.min(newline, 120)).toString("latin1"))}`);
          return;
        }
        this.header = { id: match[1]!, kind: match[2] as HelperReply["kind"], value: Number(match[3]), stdoutBytes, stderrBytes };
        const rest = joined.subarray(newline + 1);
        this.buffered = rest.length > 0 ? [rest] : [];
        this.bufferedBytes = rest.length;
      }
      const header = this.header;
      const bodyBytes = header.stdoutBytes + header.stderrBytes;
      if (this.bufferedBytes < bodyBytes) return;
      const joined = Buffer.concat(this.buffered);
      this.header = undefined;
      const rest = joined.subarray(bodyBytes);
      this.buffered = rest.length > 0 ? [rest] : [];
      this.bufferedBytes = rest.length;
      const reply: HelperReply = {
        kind: header.kind,
        value: header.value,
        stdout: joined.subarray(0, header.stdoutBytes),
        stderr: joined.subarray(header.stdoutBytes, bodyBytes),
      };
      const pending = this.pending.get(header.id);
      if (pending) pending.resolve(reply);
      else if (header.id === "-") log.warn("the sandbox helper refused a request it could not name", { stderr: reply.stderr.toString("utf8").slice(0, 500) });
      if (this.bufferedBytes === 0) return;
    }
  }

  /** The byte stream no longer parses: end this helper (its requests fail; the next starts another). */
  private desync(why: string): void {
    log.error("sandbox helper protocol error; restarting it", { why });
    this.end(`the sandbox helper's reply did not parse (${why})`);
    this.child.kill("SIGKILL");
  }

  private end(why: string): void {
    if (this.ended) return;
    this.ended = true;
    if (this.pending.size > 0) log.warn("the sandbox helper ended with requests in flight; they fail, the next request starts a new helper", { why, inFlight: this.pending.size });
    for (const pending of [...this.pending.values()]) pending.reject(new CubicleError("unavailable", `${why} while this request was in flight; retry`));
    this.pending.clear();
  }
}

function subvolumeId(stdout: string): number {
  const match = /^subvol (\d+)$/m.exec(stdout);
  if (!match) throw new CubicleError("internal", `sandbox-helper printed no subvolume id: ${stdout.slice(0, 200)}`);
  return Number(match[1]);
}

/**
 * Tells when a sandbox's init process ends, at once and without polling: one long-running
 * `sandbox-helper watch` holds a pidfd per watched process. Restarted if it dies, with what it
 * watched registered again (a process that ended meanwhile is reported at once).
 */
export class ExitWatcher {
  private child: ChildProcess | undefined;
  private readonly watched = new Map<string, number>();
  private closed = false;

  constructor(
    private readonly binary: string,
    private readonly onExit: (tag: string) => void,
  ) {}

  watch(tag: string, pid: number): void {
    if (!/^[\w.-]{1,79}$/.test(tag) || !Number.isInteger(pid) || pid <= 0) return;
    this.watched.set(tag, pid);
    this.send(`add ${tag} ${pid}\n`);
  }

  unwatch(tag: string): void {
    if (!this.watched.delete(tag)) return;
    this.send(`del ${tag}\n`);
  }

  close(): void {
    this.closed = true;
    this.child?.stdin?.end();
    this.child?.kill("SIGTERM");
    this.child = undefined;
  }

  private send(line: string): void {
    if (this.closed) return;
    const child = this.child ?? this.start();
    child.stdin?.write(line);
  }

  private start(): ChildProcess {
    const child = spawn(this.binary, ["watch"], { stdio: ["pipe", "pipe", "pipe"] });
    this.child = child;
    child.stdin!.on("error", () => undefined);
    child.stderr!.on("data", (chunk: Buffer) => log.warn("exit watcher", { stderr: chunk.toString().trim() }));
    createInterface({ input: child.stdout! }).on("line", (line) => {
      const tag = /^exit (\S+)$/.exec(line)?.[1];
      if (!tag || !this.watched.has(tag)) return;
      this.watched.delete(tag);
      this.onExit(tag);
    });
    child.on("exit", (code, signal) => {
      if (this.child === child) this.child = undefined;
      if (this.closed) return;
      log.warn("exit watcher ended; restarting it", { code, signal });
      // Re-register what it watched: a process that ended meanwhile is reported at once.
      const again = [...this.watched];
      if (again.length > 0) setTimeout(() => again.forEach(([tag, pid]) => this.watch(tag, pid)), 100).unref();
    });
    child.on("error", (err) => log.error("exit watcher failed to start", { error: err.message }));
    // The watcher must not keep the server alive.
    child.unref();
    (child.stdin as unknown as { unref?: () => void }).unref?.();
    (child.stdout as unknown as { unref?: () => void }).unref?.();
    (child.stderr as unknown as { unref?: () => void }).unref?.();
    return child;
  }
}
