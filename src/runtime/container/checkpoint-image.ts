import { chmod, chown, readdir, readFile, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";

/**
 * A checkpoint image of a container sandbox, as `checkpoint()` leaves it, in the storage
 * pool's images subvolume (STORAGE_POOL_NOTE):
 *
 * ```
 * <imageDir>/
 *   meta.json   CheckpointMeta (below); written last before the rename, so a directory
 *               without it is not an image
 *   layer/      a btrfs snapshot of the sandbox's writable layer (upper/: the sandbox's files,
 *               whiteouts and trusted.overlay.* xattrs included, ids canonical), counted in
 *               the image budget
 *   criu/       CRIU images (only with memory): processes, memory pages, and the tmpfs
 *               mounts of the sandbox (/dev, /dev/shm) as tar files
 *   log/        dump.log (CRIU) and runc.log of the dump, for debugging
 * ```
 *
 * The images directory is host root's alone (0700), so nobody else reaches an image by path.
 * A restore's processes, which run as the new sandbox's root, read `criu/` only through an
 * open directory (a per-restore view of hard links, see the sandbox helper): its files are
 * 0644, its directories 0755.
 *
 * Where images are and how they are written and removed is the ContainerImageStore's business
 * (container-image-store.ts): an image is built in a pending directory and committed (renamed
 * into place) at the end, so a failure (a full budget, a CRIU error) never leaves a directory
 * that looks complete. An image is never written by a restore, but for the restore's own view
 * directory (`criu-view-*`), removed when the restore ends.
 */
export interface CheckpointMeta {
  version: 2;
  /**
   * The runtime that made the image (ImageInfo.runtime): always "container" here. Images made
   * before the field existed lack it and are the container runtime's.
   */
  runtime?: "container";
  sandboxId: string;
  templateId: string;
  /** The overlay lower layer the upper layer belongs to; a restore must use the same. */
  rootfsDir: string;
  memory: boolean;
  hostname: string;
  /** Fingerprint of the agent kit the processes were started from (memory images only). */
  kitFingerprint: string | undefined;
  /**
   * The sandbox's boot id and machine id when the image was made (BOOT_IDENTITY_NOTE): a resume
   * or rollback keeps them; absent in images made before they were recorded.
   */
  bootId?: string;
  machineId?: string;
  createdAt: string;
  frozenMs: number;
  /** Time to snapshot the layer (the sandbox was frozen). */
  layerSnapshotMs: number;
  dumpMs: number;
  /** Bytes the layer references (qgroup), and the CRIU files. */
  layerBytes: number;
  criuBytes: number;
}

export const IMAGE_VERSION = 2;

export function imageLayout(imageDir: string) {
  return {
    meta: path.join(imageDir, "meta.json"),
    layer: path.join(imageDir, "layer"),
    criu: path.join(imageDir, "criu"),
    log: path.join(imageDir, "log"),
  };
}

/** Prefix of a restore's view of an image's CRIU files (inside the image directory). */
export const CRIU_VIEW_PREFIX = "criu-view-";

export async function writeMeta(imageDir: string, meta: CheckpointMeta): Promise<void> {
  await writeFile(imageLayout(imageDir).meta, JSON.stringify(meta, null, 2) + "\n", { mode: 0o600 });
}

export async function readMeta(imageDir: string): Promise<CheckpointMeta> {
  const text = await readFile(imageLayout(imageDir).meta, "utf8").catch((err) => {
    throw new CubicleError("not_found", `the image ${path.basename(imageDir)} is not complete (no meta.json)`, { cause: err });
  });
  let meta: CheckpointMeta;
  try {
    meta = JSON.parse(text) as CheckpointMeta;
  } catch (err) {
    throw new CubicleError("failed_precondition", `the image ${path.basename(imageDir)} is damaged (meta.json is not JSON)`, { cause: err });
  }
  const runtime: unknown = meta.runtime ?? "container";
  if (runtime !== "container") {
    throw new CubicleError("failed_precondition", `the image ${path.basename(imageDir)} was made by the ${String(runtime)} runtime; the container runtime cannot restore it (restore it with the runtime that made it)`);
  }
  if (meta.version !== IMAGE_VERSION) {
    throw new CubicleError("failed_precondition", `the image ${path.basename(imageDir)} was made by an older Cubicle (format ${meta.version}, this server reads ${IMAGE_VERSION}); take a new snapshot`);
  }
  return meta;
}

/**
 * CRIU's files readable through an open directory by a restore's processes (which run as the
 * new sandbox's root), and by nobody through a path (the images directory is 0700).
 */
export async function makeCriuFilesReadable(dir: string): Promise<number> {
  let bytes = 0;
  const entries = await readdir(dir, { withFileTypes: true });
  await Promise.all(
    entries.map(async (entry) => {
      const file = path.join(dir, entry.name);
      if (entry.isSymbolicLink()) return;
      if (entry.isDirectory()) bytes += await makeCriuFilesReadable(file);
      else bytes += (await stat(file)).blocks * 512;
      await chown(file, 0, 0);
      await chmod(file, entry.isDirectory() ? 0o755 : 0o644);
    }),
  );
  await chown(dir, 0, 0);
  await chmod(dir, 0o755);
  return bytes;
}
