import { spawn, type ChildProcess } from "node:child_process";
import { createInterface } from "node:readline";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { createLogger } from "../../shared/log.js";

const log = createLogger("sandbox-helper");

/**
 * SANDBOX_HELPER_NOTE: the host-side steps of a sandbox that Node cannot make itself (btrfs
 * ioctls, user namespaces with a chosen owner, idmapped mounts through the new mount API) are
 * one static program, src/runtime/container/native/sandbox-helper.c, started once per step that
 * was one process start before (`mount`, `cp -a`, `umount`, `nsenter hostname`): process
 * creation is the expensive part of every path here.
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
}

export class SandboxHelper {
  constructor(readonly binary: string) {}

  /** Layer, user namespace and root mount of a sandbox; returns the layer's subvolume id. */
  async prepare(options: PrepareOptions): Promise<number> {
    const argv = [
      this.binary,
      "prepare",
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
    if (options.fromLayer) argv.push("--from", options.fromLayer);
    if (options.usernsPin) argv.push("--userns", options.usernsPin);
    if (options.criuImages && options.criuView) argv.push("--criu-images", options.criuImages, "--criu-view", options.criuView);
    return subvolumeId(await this.run(argv, "preparing the sandbox's root filesystem"));
  }

  /** A snapshot of a layer for an image; returns its subvolume id. */
  async snapshot(fromLayer: string, to: string): Promise<number> {
    return subvolumeId(await this.run([this.binary, "snapshot", "--from", fromLayer, "--to", to], "saving the sandbox's files"));
  }

  /** Unmounts everything below `bundleDir` and deletes the layer subvolume (if given). */
  async teardown(bundleDir: string, layerDir: string | undefined): Promise<void> {
    const argv = [this.binary, "teardown", "--bundle", bundleDir];
    if (layerDir) argv.push("--layer", layerDir);
    await this.run(argv, "removing the sandbox's root filesystem");
  }

  /** Names the host of a running sandbox (its init's UTS namespace). */
  async setHostname(pid: number, hostname: string): Promise<void> {
    await this.run([this.binary, "hostname", "--pid", String(pid), "--name", hostname], "renaming the sandbox's host");
  }

  /** Removes the qgroups of deleted subvolumes; returns how many went. */
  async collectQgroups(mountDir: string): Promise<number> {
    const stdout = await this.run([this.binary, "qgroup-gc", "--mount", mountDir], "collecting stale quota groups");
    return Number(/removed (\d+)/.exec(stdout)?.[1] ?? 0);
  }

  private async run(argv: string[], what: string): Promise<string> {
    const result = await runCommand(argv, { timeoutMs: 60_000, allowFailure: true });
    if (result.exitCode === 0) return result.stdout;
    const stderr = result.stderr.trim();
    // Exit 28: the layer's quota or the pool is full (EDQUOT / ENOSPC).
    const code = result.exitCode === 28 || /Disk quota exceeded|No space left/.test(stderr) ? "insufficient_storage" : "internal";
    throw new CubicleError(code, `${what} failed: ${stderr || `exit ${result.exitCode}`}`);
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
