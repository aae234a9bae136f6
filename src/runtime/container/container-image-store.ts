import { existsSync } from "node:fs";
import { chmod, mkdir, readdir, readFile, rename, rm } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { pathExists } from "../../shared/fs.js";
import { createLogger } from "../../shared/log.js";
import {
  IMAGE_KINDS,
  imageId,
  isImageId,
  isImageName,
  LEGACY_STALE_IMAGE_MARKER,
  parseImageId,
  PENDING_IMAGE_MARKER,
  REMOVED_IMAGE_MARKER,
  type ImageInfo,
  type ImageKind,
  type ImageRuntime,
  type ImageStore,
  type PendingImage,
} from "../images.js";
import { CRIU_VIEW_PREFIX, imageLayout } from "./checkpoint-image.js";

const log = createLogger("images");

/**
 * The directory of each kind under the images directory. These names are the layout images
 * were kept in before the store existed (core named them): images on disk stay valid.
 */
const KIND_DIRS: Record<ImageKind, string> = { snapshot: "snapshots", pause: "paused", warm: "warm", layer: "layers" };

export interface ContainerImageStoreOptions {
  /** Called after each deletion of an image (the runtime collects btrfs quota groups now and then). */
  onDeleted?: () => void;
  /** Called before an image is removed, with its id (the microVM runtime ends the QEMUs waiting for it). */
  beforeRemove?: (id: string) => Promise<void>;
}

/**
 * The container runtime's images: one directory each (see checkpoint-image.ts for what is in
 * it), `<imagesDir>/<kind dir>/<name>`, on the storage pool's images subvolume.
 *
 * - An image is written in `<name>.partial-<pid>-<n>` and renamed to `<name>` by commit(): a
 *   directory under an image's name is complete, whatever failed while it was written.
 * - remove() renames it to `<name>.removed-<pid>-<n>` and deletes that in the background: the
 *   name is free at once, and a deletion cut short by a crash is finished by the next init().
 * - The kind directories are 0711: a restore's processes, which run as the new sandbox's root,
 *   search them to reach their view of an image's CRIU files.
 * - The image budget counts the committed images' bytes (their meta.json), found again by init().
 */
export class ContainerImageStore implements ImageStore {
  private counter = 0;
  /** Bytes of each committed image, by id (see usedBytes). */
  private readonly bytes = new Map<string, number>();
  private readonly deletions = new Set<Promise<void>>();

  constructor(
    /** The root of the images (`<pool>/images`). */
    readonly imagesDir: string,
    private readonly options: ContainerImageStoreOptions = {},
  ) {}

  /**
   * Makes the kind directories, finds the committed images for the budget, and clears what a
   * crash left: images half written or half deleted (but this process's own, which are in
   * progress), older pause images moved aside, and restores' views of CRIU files.
   */
  async init(): Promise<void> {
    for (const kind of IMAGE_KINDS) {
      const dir = this.kindDir(kind);
      await mkdir(dir, { recursive: true, mode: 0o711 });
      await chmod(dir, 0o711); // mkdir's mode is cut by the umask
      for (const entry of await readdir(dir)) {
        if (isLeftover(entry)) {
          this.deleteInBackground(path.join(dir, entry));
          continue;
        }
        if (!isImageName(entry)) continue;
        const imageDir = path.join(dir, entry);
        for (const inside of await readdir(imageDir).catch(() => [] as string[])) {
          if (inside.startsWith(CRIU_VIEW_PREFIX)) await rm(path.join(imageDir, inside), { recursive: true, force: true });
        }
        const info = await readImageInfo(imageId(kind, entry), imageDir);
        if (info) this.bytes.set(info.id, info.sizeBytes);
      }
    }
  }

  /** Where the image `id` is (or would be): for the container runtime's own reading and writing. */
  dirOf(id: string): string {
    const { kind, name } = parseImageId(id);
    return path.join(this.kindDir(kind), name);
  }

  async allocate(kind: ImageKind, name: string): Promise<PendingImage> {
    const id = imageId(kind, name);
    const finalDir = this.dirOf(id);
    await mkdir(path.dirname(finalDir), { recursive: true, mode: 0o711 });
    if (await pathExists(finalDir)) throw alreadyExists(id);
    const dir = `${finalDir}${PENDING_IMAGE_MARKER}${process.pid}-${++this.counter}`;
    await mkdir(dir, { mode: 0o755 });
    return { id, kind, name, dir };
  }

  async commit(pending: PendingImage): Promise<ImageInfo> {
    const info = await readImageInfo(pending.id, pending.dir);
    if (!info) throw new CubicleError("internal", `image ${pending.id} was written without its meta.json; it cannot be committed`);
    const finalDir = this.dirOf(pending.id);
    // rename(2) would replace an empty directory: check first, and let ENOTEMPTY catch a race.
    if (await pathExists(finalDir)) throw alreadyExists(pending.id);
    await rename(pending.dir, finalDir).catch((err: NodeJS.ErrnoException) => {
      throw err.code === "ENOTEMPTY" || err.code === "EEXIST" ? alreadyExists(pending.id, err) : CubicleError.from(err);
    });
    this.bytes.set(info.id, info.sizeBytes);
    return info;
  }

  async abandon(pending: PendingImage): Promise<void> {
    await rm(pending.dir, { recursive: true, force: true });
  }

  async exists(id: string): Promise<boolean> {
    return isImageId(id) && pathExists(this.dirOf(id));
  }

  async info(id: string): Promise<ImageInfo | undefined> {
    return isImageId(id) ? readImageInfo(id, this.dirOf(id)) : undefined;
  }

  async list(kind: ImageKind): Promise<string[]> {
    const names = await readdir(this.kindDir(kind)).catch(() => [] as string[]);
    return names.filter(isImageName).sort().map((name) => imageId(kind, name));
  }

  async remove(id: string, options: { background?: boolean } = {}): Promise<void> {
    if (!isImageId(id)) return;
    await this.options.beforeRemove?.(id);
    const dir = this.dirOf(id);
    const aside = `${dir}${REMOVED_IMAGE_MARKER}${process.pid}-${++this.counter}`;
    this.bytes.delete(id);
    try {
      await rename(dir, aside);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return;
      log.warn("could not move an image aside; deleting it in place", { imageId: id, error: String(err) });
      await rm(dir, { recursive: true, force: true });
      this.options.onDeleted?.();
      return;
    }
    const deletion = this.deleteInBackground(aside);
    if (!options.background) await deletion;
  }

  /** An image's files changed after its commit (the microVM runtime's RAM_FILE_CONVERSION_NOTE): it counts `bytes` now. */
  resized(id: string, bytes: number): void {
    if (this.bytes.has(id)) this.bytes.set(id, bytes);
  }

  /**
   * Bytes of the committed images. An image whose directory went another way than remove()
   * (by hand) stops counting here.
   */
  usedBytes(): number {
    let total = 0;
    for (const [id, bytes] of this.bytes) {
      if (existsSync(this.dirOf(id))) total += bytes;
      else this.bytes.delete(id);
    }
    return total;
  }

  /** Waits for the background deletions started so far (tests, shutdown). */
  async settled(): Promise<void> {
    await Promise.all([...this.deletions]);
  }

  /** Where the images of one kind live (`<imagesDir>/paused` …). */
  kindDir(kind: ImageKind): string {
    return path.join(this.imagesDir, KIND_DIRS[kind]);
  }

  private deleteInBackground(dir: string): Promise<void> {
    const deletion = rm(dir, { recursive: true, force: true }).then(
      () => this.options.onDeleted?.(),
      (err: unknown) => log.error("deleting an image failed", { dir, error: String(err) }),
    );
    this.deletions.add(deletion);
    void deletion.finally(() => this.deletions.delete(deletion));
    return deletion;
  }
}

/** An entry a crash left: an image being written or deleted by another process, an older core's aside. */
function isLeftover(entry: string): boolean {
  if (entry.includes(LEGACY_STALE_IMAGE_MARKER)) return true;
  for (const marker of [PENDING_IMAGE_MARKER, REMOVED_IMAGE_MARKER]) {
    const at = entry.indexOf(marker);
    if (at > 0) return Number(entry.slice(at + marker.length).split("-")[0]) !== process.pid;
  }
  return false;
}

function alreadyExists(id: string, cause?: unknown): CubicleError {
  return new CubicleError("already_exists", `image ${id} already exists; remove it first or choose another name`, cause === undefined ? undefined : { cause });
}

/**
 * The description of an image from its meta.json, read leniently: any runtime's image can be
 * described (one of another runtime is refused by readMeta, not here). Images made before
 * meta.json named its runtime are the container runtime's.
 */
async function readImageInfo(id: string, dir: string): Promise<ImageInfo | undefined> {
  const text = await readFile(imageLayout(dir).meta, "utf8").catch(() => undefined);
  if (text === undefined) return undefined;
  let meta: { runtime?: unknown; memory?: unknown; createdAt?: unknown; sizeBytes?: unknown; layerBytes?: unknown; criuBytes?: unknown };
  try {
    meta = JSON.parse(text) as typeof meta;
  } catch {
    return undefined;
  }
  if (typeof meta !== "object" || meta === null) return undefined;
  const runtime = meta.runtime ?? "container";
  if (runtime !== "container" && runtime !== "microvm") return undefined;
  const number = (value: unknown) => (typeof value === "number" && Number.isFinite(value) ? value : 0);
  return {
    id,
    kind: parseImageId(id).kind,
    runtime: runtime satisfies ImageRuntime,
    sizeBytes: typeof meta.sizeBytes === "number" ? number(meta.sizeBytes) : number(meta.layerBytes) + number(meta.criuBytes),
    memory: meta.memory === true,
    createdAt: typeof meta.createdAt === "string" ? meta.createdAt : "",
  };
}
