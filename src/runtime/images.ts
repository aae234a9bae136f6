import { CubicleError } from "../shared/cubicle-error.js";
import type { Runtime } from "./types.js";

/**
 * What an image is for. The kind only names the image (callers keep ids, not paths); what an
 * image holds is decided by the checkpoint that wrote it.
 * - snapshot: a user's snapshot (and a fork's one-off image), named by the snapshot id
 * - pause: a paused sandbox's image, named by its sandbox id
 * - warm: a template's warm image, named `<templateId>-<key>`
 * - layer: a template's own files (a filesystem-only image of a build sandbox after a build
 *   step), named by the step's cache key; sandboxes of the template start from a copy of it
 */
export type ImageKind = "snapshot" | "pause" | "warm" | "layer";

export const IMAGE_KINDS: readonly ImageKind[] = ["snapshot", "pause", "warm", "layer"];

/** The runtime that made an image; only that runtime can restore it. */
export type ImageRuntime = Runtime["name"];

/**
 * Names are file names for every runtime (a directory, a RAM file): letters, digits, `.`, `_`,
 * `-`, no leading dot, at most 128 characters. Stores name their own temporary entries with
 * a marker no name may hold (see RESERVED_NAME_PARTS).
 */
const NAME_PATTERN = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;

/** Marks an image store's entry of an image being written (`<name>.partial-…`). */
export const PENDING_IMAGE_MARKER = ".partial-";
/** Marks an image store's entry of a removed image, still being deleted (`<name>.removed-…`). */
export const REMOVED_IMAGE_MARKER = ".removed-";
/** Marks a pause image an older core moved aside before deleting it (`<name>.stale-…`). */
export const LEGACY_STALE_IMAGE_MARKER = ".stale-";
/** Parts of entry names image stores keep for themselves: no image name holds one. */
const RESERVED_NAME_PARTS = [PENDING_IMAGE_MARKER, REMOVED_IMAGE_MARKER, LEGACY_STALE_IMAGE_MARKER] as const;

export function isImageName(name: string): boolean {
  return NAME_PATTERN.test(name) && !RESERVED_NAME_PARTS.some((part) => name.includes(part));
}

function checkImageName(name: string): string {
  if (!isImageName(name)) {
    throw new CubicleError("invalid_argument", `image name ${JSON.stringify(name)} must be 1–128 letters, digits, '.', '_' or '-', not start with '.', and not contain ${RESERVED_NAME_PARTS.join(", ")}`);
  }
  return name;
}

function isImageKind(kind: string): kind is ImageKind {
  return (IMAGE_KINDS as readonly string[]).includes(kind);
}

/** The id of the image of `kind` named `name`: `"<kind>/<name>"`, e.g. `snapshot/snap_abc`. */
export function imageId(kind: ImageKind, name: string): string {
  if (!isImageKind(kind)) throw new CubicleError("invalid_argument", `image kind ${JSON.stringify(kind)} must be one of ${IMAGE_KINDS.join(", ")}`);
  return `${kind}/${checkImageName(name)}`;
}

/** The kind and name of an image id; invalid_argument when it is not `<kind>/<name>`. */
export function parseImageId(id: string): { kind: ImageKind; name: string } {
  const slash = typeof id === "string" ? id.indexOf("/") : -1;
  const kind = slash > 0 ? id.slice(0, slash) : "";
  const name = slash > 0 ? id.slice(slash + 1) : "";
  if (!isImageKind(kind) || !isImageName(name)) {
    throw new CubicleError("invalid_argument", `${JSON.stringify(id)} is not an image id (<kind>/<name>, kind one of ${IMAGE_KINDS.join(", ")})`);
  }
  return { kind, name };
}

/** Whether `id` is an image id at all (a record of an older version may hold anything). */
export function isImageId(id: unknown): id is string {
  if (typeof id !== "string") return false;
  const slash = id.indexOf("/");
  return slash > 0 && isImageKind(id.slice(0, slash)) && isImageName(id.slice(slash + 1));
}

/** A committed image as its store describes it. */
export interface ImageInfo {
  id: string;
  kind: ImageKind;
  /** The runtime that made it: a runtime restores only its own images. */
  runtime: ImageRuntime;
  /** Bytes it counts against the image budget. */
  sizeBytes: number;
  /** Processes and memory are in it (false: the files only). */
  memory: boolean;
  /** ISO 8601. */
  createdAt: string;
}

/**
 * An image being written: reserved by `allocate`, invisible under its id until `commit`. Only
 * the runtime that allocated it writes into `dir`.
 */
export interface PendingImage {
  readonly id: string;
  readonly kind: ImageKind;
  readonly name: string;
  /** The directory to write the image into (made by allocate, empty). */
  readonly dir: string;
}

/**
 * The images of one runtime, owned by that runtime: it decides where and how they are stored
 * (a directory tree for containers, a RAM file and a device-state file for microVMs); callers
 * hold ids. Writing is allocate → write into `pending.dir` → commit (or abandon), so an id is
 * either absent or a complete image.
 */
export interface ImageStore {
  /** Reserves a new image of `kind` named `name` for the runtime to write; already_exists if a committed image has that id. */
  allocate(kind: ImageKind, name: string): Promise<PendingImage>;
  /** Makes a written image visible under its id in one atomic step (a rename). */
  commit(pending: PendingImage): Promise<ImageInfo>;
  /** Drops a pending image that failed. */
  abandon(pending: PendingImage): Promise<void>;
  /** Whether a committed image has this id (false for a string that is no image id). */
  exists(id: string): Promise<boolean>;
  /** The image's description; undefined when it is absent or incomplete (no readable metadata). */
  info(id: string): Promise<ImageInfo | undefined>;
  /** Ids of the committed images of `kind` (never one being written or being deleted). */
  list(kind: ImageKind): Promise<string[]>;
  /**
   * Removes an image; idempotent. The image is moved aside at once (so the same id can be
   * written again immediately) and deleted; resolves when it is gone, or, with `background`,
   * as soon as it is aside (the deletion goes on without the caller: a resume need not wait
   * for a large image to be deleted).
   */
  remove(id: string, options?: { background?: boolean }): Promise<void>; // a string that is no image id names no image: nothing to do
  /** Bytes of committed images (what counts against the image budget). */
  usedBytes(): number | Promise<number>;
}

/**
 * The refusal of an image that would pass the image budget (IMAGE_BUDGET_NOTE), which every
 * runtime's snapshots, pause images and warm images share: HTTP 507 with what is in use.
 */
export function imageBudgetExceeded(usedBytes: number, budgetBytes: number, neededBytes: number): CubicleError {
  const mib = (bytes: number) => Math.ceil(bytes / 1024 ** 2);
  return new CubicleError(
    "insufficient_storage",
    `No space left on device: the image budget is used up (${mib(usedBytes)} of ${mib(budgetBytes)} MiB in use; this image needs about ${mib(neededBytes)} MiB)`,
    { details: { usedBytes, budgetBytes, neededBytes } },
  );
}
