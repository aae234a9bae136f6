import { chmod, copyFile, mkdir, readFile, readlink, rename, rm, statfs, symlink, writeFile } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { pathExists } from "../../shared/fs.js";

/** Where `scripts/setup-host.sh` records the CRIU it installed, in the default state dir. */
const DEFAULT_CRIU_PATH_FILE = "/var/lib/cubicle/criu/path";

/**
 * The CRIU binary runc must use (through installCriuForRunc, CRIU_FRONT_NOTE). Never the host's
 * `criu` from PATH: Debian 12's 3.17 fails on current kernels, so only what setup-host.sh verified is used
 * (explicit option, `CUBICLE_CRIU`, `<stateDir>/criu/path`, then the default state dir's file).
 */
export async function findCriu(stateDir: string, explicit: string | undefined): Promise<string> {
  if (explicit) return explicit;
  if (process.env.CUBICLE_CRIU) return process.env.CUBICLE_CRIU;
  for (const file of [path.join(stateDir, "criu", "path"), DEFAULT_CRIU_PATH_FILE]) {
    const recorded = (await readFile(file, "utf8").catch(() => "")).trim();
    if (recorded) return recorded;
  }
  throw new CubicleError("failed_precondition", "CRIU 4.2+ is not set up on this host; run scripts/setup-host.sh (it records the binary in <stateDir>/criu/path)");
}

/**
 * Options runc 1.1 cannot pass on its command line, given to CRIU through the config file that
 * runc names in its RPC request (the `org.criu.config` annotation of config.json; CRIU ≥ 3.11
 * lets the file override RPC options).
 *
 * - `tcp-close`: established TCP connections are neither dumped nor blocked, and come back
 *   closed. A restore usually lands in another netns with another address (clone, fork), where
 *   a repaired connection could never work; the peers (Cubicle's own keep-alive sockets, a
 *   user's client) see their connection end and reconnect. Listening sockets are dumped and
 *   serve again. It also spares the network lock (iptables inside the sandbox's netns).
 * - `skip-in-flight`: connections still in a listen queue (SYN received, not accepted) are
 *   dropped instead of failing the dump.
 * - `ghost-limit`: files deleted but still open are stored in the image; CRIU's default limit
 *   (1 MiB) would fail a dump of, say, a deleted log file a process still writes to.
 * - `manage-cgroups=ignore`: CRIU neither dumps nor restores cgroups. runc 1.1 has no such
 *   mode on its command line, and its default ("soft") makes CRIU mount every v1 hierarchy in
 *   a scratch yard and read each controller's files: half of a dump and a third of a restore
 *   here (~37 of 76 ms). Nothing is lost: a restore's cgroups are made by runc from config.json
 *   (limits included) and runc puts CRIU into them before it forks the restored tree, which
 *   inherits them. (`=`: the option's argument is optional, so a space would not bind it.)
 */
export const CRIU_CONFIG = ["tcp-close", "skip-in-flight", "ghost-limit 268435456", "manage-cgroups=ignore", ""].join("\n");

/** Writes the CRIU config file named by every sandbox's `org.criu.config` annotation. */
export async function writeCriuConfig(file: string): Promise<void> {
  await replaceFile(file, Buffer.from(CRIU_CONFIG), 0o644);
}

/**
 * Puts `content` at `file` through a temporary file and a rename, so runc and CRIU never run a
 * half-written file; nothing happens when the file holds it already (every server start).
 */
async function replaceFile(file: string, content: Buffer, mode: number): Promise<void> {
  const current = await readFile(file).catch(() => undefined);
  if (current?.equals(content)) return;
  const temporary = `${file}.tmp-${process.pid}`;
  await rm(temporary, { force: true });
  await writeFile(temporary, content, { mode });
  await chmod(temporary, mode);
  await rename(temporary, file);
}

/**
 * TAR_SHIM_NOTE: CRIU archives the sandbox's tmpfs mounts (/dev/shm, /dev) with `tar --gzip`,
 * hard-coded (mount.c): gzip manages ~35 MB/s, so 500 MB in /dev/shm kept the sandbox frozen for 25 s.
 * CRIU runs `tar` from PATH, inside the sandbox's user namespace; runc gets this shim first in
 * PATH for checkpoint and restore, in a directory of the run dir (the sandbox's root cannot
 * traverse the 0700 state directory, and a PATH entry it cannot reach is skipped). It
 * drops `--gzip`. When extracting, it has tar read the image through `/proc/self/fd/0` (CRIU
 * hands it over as stdin, a regular file) instead of from the stream: GNU tar then recognises a
 * compressed archive by itself (images made before the shim are gzip), which it cannot do on a
 * stream, and no process has to look at the magic first. The image file keeps CRIU's
 * `.tar.gz.img` name whatever its content. The shim is the static build of
 * src/runtime/container/native/tar-shim.c when there is one: it archives and extracts what CRIU
 * asks for itself (GNU tar's format; no process per tmpfs mount) and execs GNU tar as above only
 * for what it does not handle (sparse files, gzip images, other entry types). This shell version
 * stays as the fallback when it could not be built.
 */
export function tarShim(realTar: string): string {
  return `#!/bin/sh
# Written by Cubicle (src/runtime/container/criu.ts): CRIU's tmpfs archives without gzip.
file=
case " $* " in
  *" --extract "*) file=/proc/self/fd/0 ;;
esac
for arg do
  shift
  [ "$arg" = "--gzip" ] || set -- "$@" "$arg"
done
exec ${realTar} \${file:+--file=$file} "$@"
`;
}

/**
 * Writes the tar shim as `<dir>/tar` (TAR_SHIM_NOTE): a copy of the static `builtShim` when it
 * exists (it finds `realTar` through tarShimEnv), else the shell version.
 */
export async function writeTarShim(dir: string, realTar: string, builtShim?: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o755 });
  await chmod(dir, 0o755);
  const content = builtShim && (await pathExists(builtShim)) ? await readFile(builtShim) : Buffer.from(tarShim(realTar));
  await replaceFile(path.join(dir, "tar"), content, 0o755);
}

/** What the static tar shim needs in CRIU's environment (TAR_SHIM_NOTE). */
export function tarShimEnv(realTar: string): Record<string, string> {
  return { CUBICLE_REAL_TAR: realTar };
}

/**
 * CRIU_FRONT_NOTE: runc runs `<dir>/criu` as its CRIU, through `runc --criu` (runc 1.1) or as
 * the first `criu` in PATH (runc >= 1.2 has no such flag; the runtime puts `dir` first in
 * runc's PATH). That file is the CRIU front (src/runtime/container/native/criu-front.c) when it
 * was built: runc asks CRIU its version before every checkpoint and restore by starting it,
 * ~4.5 ms, and the front answers that question from a cache of the real CRIU's own reply
 * (`criuFrontEnv`), execing the real CRIU for everything else. Without the front it is a
 * symlink to the real CRIU. Either way runc runs the CRIU setup-host.sh chose, never the host's.
 * Returns the path to give runc.
 */
export async function installCriuForRunc(dir: string, realCriu: string, front: string | undefined): Promise<string> {
  const target = path.join(dir, "criu");
  if (front && (await pathExists(front))) {
    await replaceFile(target, await readFile(front), 0o755);
  } else if ((await readlink(target).catch(() => "")) !== realCriu) {
    const temporary = `${target}.tmp-${process.pid}`;
    await rm(temporary, { force: true });
    await symlink(realCriu, temporary);
    await rename(temporary, target);
  }
  return target;
}

/** What the CRIU front needs in runc's environment (CRIU_FRONT_NOTE). */
export function criuFrontEnv(dir: string, realCriu: string): Record<string, string> {
  return { CUBICLE_CRIU_REAL: realCriu, CUBICLE_CRIU_VERSION_CACHE: path.join(dir, "version-reply") };
}

/**
 * The interesting part of a CRIU log (runc has CRIU write `dump.log` / `restore.log` into the
 * work path): the error lines, then the last lines, which name the step that failed, and a
 * line saying so when the log's filesystem is full (see fullDiskNote). Call it right after the
 * failure, before the image directory is removed.
 */
export async function criuLogTail(logFile: string, lines = 12): Promise<string> {
  const [text, fullDisk] = await Promise.all([readFile(logFile, "utf8").catch(() => ""), fullDiskNote(path.dirname(logFile))]);
  const picked: string[] = [];
  if (!text) {
    picked.push(`(no CRIU log at ${logFile})`);
  } else {
    const all = text.split("\n").filter(Boolean);
    const errors = all.filter((line) => /Error|error \(|fail/i.test(line)).slice(-6);
    const tail = all.slice(-lines);
    picked.push(...errors.filter((line) => !tail.includes(line)), ...tail);
  }
  if (fullDisk) picked.push(fullDisk);
  return picked.join("\n");
}

/** Less free space than this on a log's filesystem after a failure counts as a full disk. */
const FULL_DISK_FREE_BYTES = 1024 * 1024;

/**
 * "No space left on device …" when the filesystem holding `dir` is (all but) full. During a
 * dump CRIU's log lives in the image directory, on the disk that ran out: the log then stops
 * mid-line, often before CRIU's own ENOSPC error or with only tar's "Wrote only 4096 of 10240
 * bytes" (seen with a 48 MiB tmpfs and 100 MiB in /dev/shm), so the disk itself is the
 * reliable witness. Free space as unprivileged users see it (`df`), though CRIU runs as root.
 */
async function fullDiskNote(dir: string): Promise<string | undefined> {
  const stats = await statfs(dir).catch(() => undefined);
  if (!stats) return undefined;
  const freeBytes = stats.bavail * stats.bsize;
  if (freeBytes >= FULL_DISK_FREE_BYTES) return undefined;
  return `No space left on device: the filesystem of ${dir} has ${Math.floor(freeBytes / 1024)} KiB free`;
}

/** CRIU's kernel-feature cache (kerndat.c: KDAT_RUNDIR "/criu.kdat"). */
export const CRIU_KDAT_FILE = "/run/criu.kdat";

/**
 * Makes sure CRIU finds its kernel-feature cache. Every CRIU run otherwise probes the kernel
 * again (~23 ms here: vdso, compat, breakpoints, nftables…), for each dump and each restore.
 * CRIU keeps the cache only when /run is a tmpfs (so that a reboot drops it); on hosts where
 * /run is an ordinary directory, as on this project's VMs, it never writes one. Then Cubicle
 * runs `criu check` once in a private mount namespace with a tmpfs on /run, and puts the file
 * CRIU wrote there in place, tagged with the boot id: after a reboot (another kernel, maybe)
 * it is made anew. CRIU loads any cache with its magic numbers and size, so a cache from the
 * same binary on the same boot is exactly what it would have kept itself.
 * Returns what happened, for the log.
 */
export async function ensureCriuKdatCache(criuPath: string, scratchDir: string): Promise<"tmpfs" | "present" | "made"> {
  const runFs = await statfs("/run").catch(() => undefined);
  if (runFs && runFs.type === TMPFS_MAGIC) return "tmpfs";
  const bootId = (await readFile("/proc/sys/kernel/random/boot_id", "utf8")).trim();
  const tagFile = `${CRIU_KDAT_FILE}.cubicle-boot-id`;
  const [tag, cacheExists] = await Promise.all([readFile(tagFile, "utf8").catch(() => ""), pathExists(CRIU_KDAT_FILE)]);
  if (cacheExists && tag.trim() === `${bootId} ${criuPath}`) return "present";

  await mkdir(scratchDir, { recursive: true, mode: 0o700 });
  const made = path.join(scratchDir, `criu.kdat.${process.pid}`);
  const script = 'mount -t tmpfs -o size=1m,mode=0755 cubicle-kdat /run && "$1" check >/dev/null && cp /run/criu.kdat "$2"';
  const result = await runCommand(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", criuPath, made], { timeoutMs: 60_000, allowFailure: true });
  if (result.exitCode !== 0) {
    await rm(made, { force: true });
    throw new CubicleError("internal", `making CRIU's kernel-feature cache failed: ${(result.stderr || result.stdout).trim().slice(-500)}`);
  }
  await rename(made, CRIU_KDAT_FILE).catch(async (err: NodeJS.ErrnoException) => {
    if (err.code !== "EXDEV") throw err;
    await copyFile(made, `${CRIU_KDAT_FILE}.cubicle-tmp`);
    await rename(`${CRIU_KDAT_FILE}.cubicle-tmp`, CRIU_KDAT_FILE);
    await rm(made, { force: true });
  });
  await writeFile(tagFile, `${bootId} ${criuPath}\n`);
  return "made";
}

const TMPFS_MAGIC = 0x01021994;

