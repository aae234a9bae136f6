import { lstat, readdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";

/**
 * A checkpoint image of a container sandbox, as `checkpoint()` leaves it:
 *
 * ```
 * <imageDir>/
 *   meta.json   CheckpointMeta (below); written last before the rename, so a directory
 *               without it is not an image
 *   upper/      copy of the overlay upper layer (`cp -a`: owners, modes, xattrs, so the
 *               whiteouts — char devices 0/0 — and trusted.overlay.* xattrs survive and files
 *               deleted in the sandbox stay deleted)
 *   criu/       CRIU images (only with memory): processes, memory pages, and the tmpfs
 *               mounts of the sandbox (/dev, /dev/shm) as tar files
 *   log/        dump.log (CRIU) and runc.log of the dump, for debugging
 * ```
 *
 * `<imageDir>` and `criu/` are owner root, group the sandboxes' mapped root (100000), mode 0750
 * and no access for others: the images hold the sandbox's memory, and a restore reads them as
 * host root inside a new user namespace (owner rights only) and as the mapped root (group).
 *
 * It is built in `<imageDir>.partial-<pid>-<n>` next to `imageDir` and renamed into place at the
 * end, so a failure (ENOSPC, a CRIU error) never leaves a directory that looks complete. An
 * image is never written by restore: many restores may read one image at once.
 */
export interface CheckpointMeta {
  version: 1;
  sandboxId: string;
  templateId: string;
  /** The overlay lower layer the upper layer belongs to; a restore must use the same. */
  rootfsDir: string;
  memory: boolean;
  hostname: string;
  /** Fingerprint of the agent kit the processes were started from (memory images only). */
  kitFingerprint: string | undefined;
  createdAt: string;
  frozenMs: number;
  upperCopyMs: number;
  dumpMs: number;
  upperBytes: number;
  criuBytes: number;
}

export function imageLayout(imageDir: string) {
  return {
    meta: path.join(imageDir, "meta.json"),
    upper: path.join(imageDir, "upper"),
    criu: path.join(imageDir, "criu"),
    log: path.join(imageDir, "log"),
  };
}

/** Suffix of the temporary directories checkpoint() writes in; leftovers after a crash can go. */
export const PARTIAL_IMAGE_MARKER = ".partial-";

export async function writeMeta(imageDir: string, meta: CheckpointMeta): Promise<void> {
  await writeFile(imageLayout(imageDir).meta, JSON.stringify(meta, null, 2) + "\n");
}

export async function readMeta(imageDir: string): Promise<CheckpointMeta> {
  const text = await readFile(imageLayout(imageDir).meta, "utf8").catch((err) => {
    throw new CubicleError("not_found", `${imageDir} is not a complete checkpoint image (no meta.json)`, { cause: err });
  });
  let meta: CheckpointMeta;
  try {
    meta = JSON.parse(text) as CheckpointMeta;
  } catch (err) {
    throw new CubicleError("failed_precondition", `${imageDir}/meta.json is not valid JSON; the image is damaged`, { cause: err });
  }
  if (meta.version !== 1) throw new CubicleError("failed_precondition", `checkpoint image ${imageDir} has version ${meta.version}; this server reads version 1`);
  return meta;
}

/**
 * Copies a directory tree exactly (GNU `cp -a`: owners, modes, times, xattrs including
 * trusted.*, device nodes, hard links), reflinking file data where the filesystem can.
 * `target` must not exist.
 */
export async function copyTree(source: string, target: string, timeoutMs: number): Promise<void> {
  const result = await runCommand(["cp", "-a", "--reflink=auto", "--no-target-directory", source, target], { timeoutMs, allowFailure: true });
  if (result.exitCode === 0) return;
  const stderr = result.stderr.trim();
  if (/No space left|Disk quota exceeded/i.test(stderr)) {
    // cp names every file it could not write: the user needs the cause, the server log the detail.
    throw new CubicleError("insufficient_storage", `not enough disk space on the server to copy the sandbox's files (No space left on device); free disk space on the host, then retry`, {
      cause: new Error(`copying ${source} to ${target} failed: ${stderr.slice(-1000)}`),
    });
  }
  throw new CubicleError("internal", `copying ${source} to ${target} failed: ${stderr.slice(-1000)}`);
}

/** Allocated bytes of a tree (like `du -s`); the upper layer holds only what the sandbox changed. */
export async function treeBytes(root: string): Promise<number> {
  let total = 0;
  const walk = async (dir: string): Promise<void> => {
    const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
    await Promise.all(
      entries.map(async (entry) => {
        const full = path.join(dir, entry.name);
        const info = await lstat(full).catch(() => undefined);
        if (info) total += info.blocks * 512;
        if (entry.isDirectory()) await walk(full);
      }),
    );
  };
  await walk(root);
  return total;
}
