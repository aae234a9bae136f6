import { spawn } from "node:child_process";
import { mkdir, open, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { mountCodebases } from "../../codebases/codebase-mount.js";
import { CubicleError } from "../../shared/cubicle-error.js";
import { mountsBelow } from "../../shared/fs.js";
import { createLogger } from "../../shared/log.js";
import type { SandboxSpec } from "../types.js";
import type { GuestShare } from "./guest-assets.js";

const log = createLogger("microvm-shares");

/** QEMU 7.2's virtiofsd (package qemu-system-common). */
export const VIRTIOFSD_BINARY = "/usr/lib/qemu/virtiofsd";
/** Where virtiofsd keeps a lock file per socket path (`.<path with / as .>.pid`). */
const VIRTIOFSD_LOCK_DIR = "/var/run/virtiofsd";
/** How long a virtiofsd may take to listen. */
const LISTEN_TIMEOUT_MS = 10_000;

/**
 * MICROVM_SHARES_NOTE: a microVM's volumes and codebases are host directories the guest mounts
 * over virtiofs, one virtiofsd per directory:
 * - a volume is bound at `<guest dir>/mounts/volumes/<n>` by the helper (`bind-volumes`),
 *   idmapped from canonical ids (100000+n on disk) to the guest's own (n), nosuid and nodev;
 * - a codebase is served by its codebase-fs (CODEBASES_NOTE) at `<guest dir>/mounts/codebases/<n>`
 *   with the guest's ids (its user is 1000), so the permission table is enforced on the host,
 *   below anything the guest's kernel does.
 * virtiofsd (QEMU 7.2's, as root) works in each request as the guest's uid and gid, so through
 * the idmapped bind what the guest's user writes is the volume's user 1000, as in a container.
 * It pivot_roots into the directory (`sandbox=namespace`): no path a guest sends leaves it; it
 * runs without CAP_MKNOD (`modcaps=-mknod`) and the volume binds are nodev, so not even a guest
 * kernel of the attacker's own making can open a host device through it. `cache=none`: the
 * guest caches neither data nor attributes, so sandboxes sharing a volume see each other's
 * writes at once (as containers do); the cost is that a file on a share cannot be mapped shared
 * and writable (mmap MAP_SHARED fails with ENODEV; private mappings, so running programs, work).
 * The guest mounts each share nosuid,nodev at its path before the agent starts (GUEST_INIT_NOTE);
 * its RAM is then a shared memfd, which vhost-user needs. virtiofsd ends when QEMU disconnects;
 * the guest's teardown also ends each by its pid, then unmounts everything below `mounts/`
 * (the helper's teardown, which ends the codebase-fs daemons) before the guest's directory is
 * removed, and removes nothing while a mount is left.
 */
export interface ShareDeps {
  /** The resident helper's subcommands (`bind-volumes`, `teardown`). */
  call(command: string, args: readonly string[], options: { what: string; timeoutMs?: number }): Promise<string>;
  /** dist/codebase-fs. */
  codebaseFs: string;
  /** Default VIRTIOFSD_BINARY. */
  virtiofsd?: string;
}

export interface StartedShare extends GuestShare {
  socket: string;
}

/** The guest's shares, in order (volumes, then codebases), each with its virtiofsd listening. */
export async function startShares(dir: string, spec: Pick<SandboxSpec, "volumes" | "codebases">, deps: ShareDeps): Promise<StartedShare[]> {
  const volumes = spec.volumes ?? [];
  const codebases = spec.codebases ?? [];
  if (volumes.length === 0 && codebases.length === 0) return [];
  const mounts = path.join(dir, "mounts");
  await mkdir(mounts, { mode: 0o711 });
  const shares: { source: string; tag: string; target: string }[] = [];
  if (volumes.length) {
    if (volumes.some((volume) => !volume.source.startsWith("/") || volume.source.includes(";") || /[\t\n]/.test(volume.source))) throw new CubicleError("invalid_argument", "a volume's directory must be an absolute path without ';'");
    await deps.call("bind-volumes", ["--dir", mounts, "--volumes", volumes.map((volume) => volume.source).join(";")], { what: "binding the sandbox's volumes" });
    volumes.forEach((volume, index) => shares.push({ source: path.join(mounts, "volumes", String(index)), tag: `volume-${index}`, target: volume.target }));
  }
  if (codebases.length) {
    const served = await mountCodebases(deps.codebaseFs, mounts, 0, codebases);
    codebases.forEach((codebase, index) => shares.push({ source: served[index]!, tag: `codebase-${index}`, target: codebase.target }));
  }
  const started: StartedShare[] = [];
  for (const share of shares) {
    const socket = path.join(dir, `${share.tag}.sock`);
    await startVirtiofsd(deps.virtiofsd ?? VIRTIOFSD_BINARY, share.source, socket, path.join(dir, `${share.tag}.log`));
    started.push({ tag: share.tag, target: share.target, socket });
  }
  return started;
}

/**
 * Starts a virtiofsd for `source` in a session of its own (it outlives a server restart, as
 * QEMU does) and waits until it listens on `socket`; its pid goes to `<socket>.pid`.
 */
async function startVirtiofsd(binary: string, source: string, socket: string, logFile: string): Promise<void> {
  if (source.includes(",") || socket.includes(",")) throw new CubicleError("invalid_argument", `the path ${source} may not hold a comma`);
  const logHandle = await open(logFile, "a", 0o600);
  let child;
  try {
    child = spawn(
      binary,
      [`--socket-path=${socket}`, "-o", `source=${source}`, "-o", "cache=none", "-o", "sandbox=namespace", "-o", "modcaps=-mknod", "-o", "no_xattr", "-o", "log_level=warn", "-f"],
      { detached: true, stdio: ["ignore", logHandle.fd, logHandle.fd] },
    );
  } finally {
    await logHandle.close();
  }
  const pid = child.pid;
  let ended: string | undefined;
  child.on("error", (err) => (ended = err.message));
  child.on("exit", (code, signal) => (ended = `it ended (${code ?? signal})`));
  const deadline = performance.now() + LISTEN_TIMEOUT_MS;
  try {
    if (pid === undefined) throw new CubicleError("internal", `could not start virtiofsd (${VIRTIOFSD_BINARY}): install qemu-system-common`);
    await writeFile(`${socket}.pid`, `${pid}\n`, { mode: 0o600 });
    for (;;) {
      if (ended) throw new CubicleError("internal", `virtiofsd did not start: ${ended}; see ${path.basename(logFile)} in the sandbox's directory`);
      if ((await stat(socket).catch(() => undefined))?.isSocket()) break;
      if (performance.now() > deadline) throw new CubicleError("internal", "virtiofsd did not listen in time");
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  } catch (err) {
    if (pid !== undefined && !ended) process.kill(pid, "SIGKILL");
    throw err;
  }
  child.removeAllListeners("exit");
  child.unref();
}

/**
 * Ends the guest's virtiofsd processes (by the pids their start recorded, when they are still
 * theirs), unmounts everything below `<dir>/mounts` and removes virtiofsd's lock files.
 * Afterwards no mount is left below `dir`, or it throws (so nothing is removed through one).
 */
export async function stopShares(dir: string, teardown: (bundleDir: string) => Promise<void>): Promise<void> {
  const names = await readdir(dir).catch(() => [] as string[]);
  for (const name of names.filter((entry) => entry.endsWith(".sock.pid"))) {
    const socket = path.join(dir, name.slice(0, -".pid".length));
    const pid = Number((await readFile(path.join(dir, name), "utf8").catch(() => "")).trim());
    if (Number.isInteger(pid) && pid > 1 && (await commandLineOf(pid)).includes(`--socket-path=${socket}`)) {
      try {
        process.kill(pid, "SIGTERM");
      } catch {
        // Gone meanwhile.
      }
    }
    await rm(path.join(VIRTIOFSD_LOCK_DIR, `${socket.replace(/\//g, ".")}.pid`), { force: true });
  }
  const mounts = path.join(dir, "mounts");
  if (await stat(mounts).catch(() => undefined)) await teardown(mounts);
  const left = await mountsBelow(dir);
  if (left.length) throw new CubicleError("internal", `a microVM's share is still mounted (${left.length}); its directory is kept`);
  log.debug("shares stopped", { dir });
}

async function commandLineOf(pid: number): Promise<string[]> {
  return (await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "")).split("\0");
}
