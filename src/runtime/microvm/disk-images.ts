import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, mkdir, readdir, readFile, readlink, realpath, rename, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { createLogger } from "../../shared/log.js";
import { SANDBOX_UID_BASE, SANDBOX_UID_COUNT } from "../types.js";

const log = createLogger("microvm-disks");

const MKE2FS_TIMEOUT_MS = 30 * 60_000;
const QEMU_IMG_TIMEOUT_MS = 60_000;

export interface DiskImage {
  path: string;
  /** The file system's size (the image's virtual size). */
  sizeBytes: number;
  /** Made by this call (false: it was in the cache). */
  built: boolean;
  /** How long making it took (0 when cached). */
  buildMs: number;
}

export interface TemplateImageOptions {
  /** Names the image in the cache; default a hash of the tree's real path, inode and mtime (and the size). */
  cacheKey?: string;
  /**
   * File system size (a guest's whole root disk: the sandbox's diskSizeMB); default the tree's
   * size plus 1 GiB, rounded up to 64 MiB. Less than the tree plus 32 MiB is refused.
   */
  sizeMiB?: number;
  /** The host id that is root in the tree (its ids are shifted by this); default SANDBOX_UID_BASE. */
  idBase?: number;
}

const building = new Map<string, Promise<DiskImage>>();

/** One build per target file at a time in this process; the others wait for it. */
function once(target: string, make: () => Promise<DiskImage>): Promise<DiskImage> {
  let pending = building.get(target);
  if (!pending) {
    pending = make().finally(() => building.delete(target));
    building.set(target, pending);
  }
  return pending;
}

/**
 * A template's rootfs as a raw ext4 image under `cacheDir` (`template-<key>.ext4`), made once
 * and then only read: every sandbox's root disk is a qcow2 overlay on it (createOverlay). The
 * tree stores ids shifted by `idBase` (root inside = SANDBOX_UID_BASE on disk); the image holds
 * them unshifted (root = 0), as a guest kernel expects (ID_SHIFT_NOTE). The file is sparse: the
 * free space of the file system costs no disk.
 */
export async function templateDiskImage(rootfsDir: string, cacheDir: string, options: TemplateImageOptions = {}): Promise<DiskImage> {
  const real = await realpath(rootfsDir).catch((err) => {
    throw new CubicleError("not_found", `the template rootfs ${rootfsDir} does not exist`, { cause: err });
  });
  const info = await stat(real);
  const key = options.cacheKey ?? createHash("sha256").update(`${real}\0${info.dev}\0${info.ino}\0${info.mtimeMs}\0${options.sizeMiB ?? ""}`).digest("hex").slice(0, 16);
  checkCacheKey(key);
  const target = path.join(cacheDir, `template-${key}.ext4`);
  return once(target, async () => {
    const cached = await cachedImage(target);
    if (cached) return cached;
    const started = performance.now();
    await mkdir(cacheDir, { recursive: true, mode: 0o700 });
    const treeMiB = await treeSizeMiB(real);
    const sizeMiB = options.sizeMiB ?? roundUp(treeMiB + 1024, 64);
    if (sizeMiB < treeMiB + 32) {
      throw new CubicleError("failed_precondition", `a ${sizeMiB} MiB root disk cannot hold the template's files (${Math.ceil(treeMiB)} MiB) with room to run; ask for at least ${Math.ceil(treeMiB) + 32} MB`);
    }
    const staging = `${target}.staging-${process.pid}`;
    await rm(staging, { force: true });
    try {
      await mke2fsShifted(["-q", "-F", "-t", "ext4", "-m", "0", "-L", "cubicle-root", "-d", real, staging, `${sizeMiB}M`], options.idBase ?? SANDBOX_UID_BASE);
      await chmod(staging, 0o444);
      await rename(staging, target);
    } finally {
      await rm(staging, { force: true });
    }
    const buildMs = Math.round(performance.now() - started);
    log.info("template disk image made", { rootfsDir: real, image: target, sizeMiB, ms: buildMs });
    return { path: target, sizeBytes: sizeMiB * 1024 * 1024, built: true, buildMs };
  });
}

/** A cache key names a file: 1-200 letters, digits, '.', '_' or '-'. */
function checkCacheKey(key: string): void {
  if (!/^[A-Za-z0-9._-]{1,200}$/.test(key)) throw new CubicleError("invalid_argument", `disk image key ${JSON.stringify(key)} must be 1-200 letters, digits, '.', '_' or '-'`);
}

/**
 * The cache key of a built template's image (BUILT_TEMPLATE_IMAGE_NOTE): its layer image's name,
 * so that removeUnusedBuiltImages can tell whose it is, and a hash of the rest.
 */
export function builtImageKey(layerName: string, rest: string): string {
  return `built.${layerName}.${createHash("sha256").update(rest).digest("hex").slice(0, 16)}`;
}

/**
 * Removes the built templates' images whose layer image is gone (the template was deleted or
 * rebuilt); returns the files removed. `layerExists` gets the layer image's name.
 */
export async function removeUnusedBuiltImages(cacheDir: string, layerExists: (layerName: string) => Promise<boolean>): Promise<string[]> {
  const removed: string[] = [];
  for (const name of await readdir(cacheDir).catch(() => [] as string[])) {
    const match = /^template-built\.([A-Za-z0-9._-]+)\.[0-9a-f]{16}\.ext4$/.exec(name);
    if (!match || (await layerExists(match[1]!))) continue;
    await rm(path.join(cacheDir, name), { force: true });
    removed.push(name);
  }
  return removed;
}

/** The image templateDiskImage made under `cacheKey`, if it is in the cache. */
export async function cachedTemplateDiskImage(cacheDir: string, cacheKey: string): Promise<DiskImage | undefined> {
  checkCacheKey(cacheKey);
  return cachedImage(path.join(cacheDir, `template-${cacheKey}.ext4`));
}

/**
 * The agent kit as a raw ext4 image under `cacheDir` (`kit-<fingerprint>.ext4`), mounted
 * read-only at /.cubicle in every guest. The fingerprint is a hash of the kit's manifest.json
 * (assembleAgentKit rewrites it whenever a source changed), so a new kit gets a new image. The
 * kit's files belong to host root, which is root in the guest too: no id shift. No journal: it
 * is never written.
 */
export async function kitDiskImage(kitDir: string, cacheDir: string): Promise<DiskImage> {
  const manifest = await readFile(path.join(kitDir, "manifest.json")).catch((err) => {
    throw new CubicleError("failed_precondition", `${kitDir} is not an agent kit (no manifest.json); assemble it first`, { cause: err });
  });
  const fingerprint = createHash("sha256").update(manifest).digest("hex").slice(0, 16);
  const target = path.join(cacheDir, `kit-${fingerprint}.ext4`);
  return once(target, async () => {
    const cached = await cachedImage(target);
    if (cached) return cached;
    const started = performance.now();
    await mkdir(cacheDir, { recursive: true, mode: 0o700 });
    const sizeMiB = roundUp(Math.ceil((await treeSizeMiB(kitDir)) * 1.15) + 16, 16);
    const staging = `${target}.staging-${process.pid}`;
    await rm(staging, { force: true });
    try {
      await runCommand(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0", "-L", "cubicle-kit", "-d", kitDir, staging, `${sizeMiB}M`], { timeoutMs: MKE2FS_TIMEOUT_MS });
      await chmod(staging, 0o444);
      await rename(staging, target);
    } finally {
      await rm(staging, { force: true });
    }
    const buildMs = Math.round(performance.now() - started);
    log.info("kit disk image made", { kitDir, image: target, sizeMiB, ms: buildMs });
    return { path: target, sizeBytes: sizeMiB * 1024 * 1024, built: true, buildMs };
  });
}

/**
 * A sandbox's root disk: a qcow2 file whose reads fall through to `baseImage` (raw, never
 * written) and whose writes stay in it. `sizeMiB` larger than the base makes the disk larger
 * (the guest's file system still has the base's size until it is grown).
 */
export async function createOverlay(baseImage: string, overlayPath: string, options: { sizeMiB?: number } = {}): Promise<void> {
  if (!path.isAbsolute(baseImage)) throw new CubicleError("internal", `the base image path ${baseImage} must be absolute (qcow2 stores it)`);
  await mkdir(path.dirname(overlayPath), { recursive: true, mode: 0o700 });
  await runCommand(["qemu-img", "create", "-q", "-f", "qcow2", "-b", baseImage, "-F", "raw", overlayPath, ...(options.sizeMiB ? [`${options.sizeMiB}M`] : [])], { timeoutMs: QEMU_IMG_TIMEOUT_MS });
  await chmod(overlayPath, 0o600);
}

/** Removes a sandbox's overlay; no error when it is gone already. */
export async function removeOverlay(overlayPath: string): Promise<void> {
  await rm(overlayPath, { force: true });
}

async function cachedImage(target: string): Promise<DiskImage | undefined> {
  if (!existsSync(target)) return undefined;
  const info = await stat(target);
  return { path: target, sizeBytes: info.size, built: false, buildMs: 0 };
}

function roundUp(value: number, step: number): number {
  return Math.ceil(value / step) * step;
}

async function treeSizeMiB(dir: string): Promise<number> {
  const { stdout } = await runCommand(["du", "-s", "--block-size=1M", "-x", dir], { timeoutMs: 300_000 });
  const mib = Number(/^(\d+)/.exec(stdout)?.[1]);
  if (!Number.isFinite(mib)) throw new CubicleError("internal", `du ${dir}: unexpected output ${JSON.stringify(stdout.slice(0, 200))}`);
  return mib;
}

/**
 * ID_SHIFT_NOTE: mke2fs -d copies each file's owner as stat() reports it. Run inside a user
 * namespace that maps host ids idBase…idBase+65535 to 0…65535, stat() reports the tree's
 * shifted ids unshifted. The mapping is written by this (root) process from outside
 * (/proc/PID/uid_map), not by `unshare --map-users`, whose newuidmap wants /etc/subuid entries
 * for root. mke2fs keeps host uid 0 (unmapped in there), so it still owns and can write the
 * image's directory; `--keep-caps` gives it the namespace's capabilities as ambient ones, so it
 * reads the tree's files whatever their mode (CAP_DAC_READ_SEARCH over mapped owners). The
 * shell in front waits for one line on stdin, sent once the maps are written, then execs mke2fs.
 */
async function mke2fsShifted(args: string[], idBase: number): Promise<void> {
  const argv = ["unshare", "--user", "--keep-caps", "--", "/bin/sh", "-c", 'read go && exec "$@"', "mke2fs", "mke2fs", ...args];
  log.debug("run", { argv });
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ["pipe", "ignore", "pipe"] });
  let stderr = "";
  child.stderr!.on("data", (chunk: Buffer) => (stderr = (stderr + chunk.toString("utf8")).slice(-8192)));
  const exited = new Promise<number>((resolve, reject) => {
    child.on("error", (err) => reject(new CubicleError("internal", `unshare: ${err.message}`, { cause: err })));
    child.on("close", (code, signal) => resolve(code ?? (signal ? 128 : 1)));
  });
  const timer = setTimeout(() => child.kill("SIGKILL"), MKE2FS_TIMEOUT_MS);
  try {
    const own = await readlink("/proc/self/ns/user");
    const deadline = Date.now() + 10_000;
    // unshare(CLONE_NEWUSER) happens right after the spawn; the maps can be written from then on.
    while ((await readlink(`/proc/${child.pid}/ns/user`).catch(() => own)) === own) {
      if (child.exitCode !== null || Date.now() > deadline) throw new CubicleError("internal", `unshare --user did not start: ${stderr.trim()}`);
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
    const map = `0 ${idBase} ${SANDBOX_UID_COUNT}\n`;
    await writeFile(`/proc/${child.pid}/uid_map`, map);
    await writeFile(`/proc/${child.pid}/gid_map`, map);
    child.stdin!.end("go\n");
    const code = await exited;
    if (code !== 0) throw new CubicleError("internal", `mke2fs -d (ids shifted by ${idBase}) exited with ${code}: ${stderr.trim().slice(-2000)}`);
  } catch (err) {
    if (child.exitCode === null) child.kill("SIGKILL");
    await exited.catch(() => {});
    throw err;
  } finally {
    clearTimeout(timer);
  }
}
