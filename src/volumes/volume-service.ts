import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, mkdir, open, readdir, readFile, rm, rmdir, statfs } from "node:fs/promises";
import path from "node:path";
import { constantTimeEquals } from "../shared/compare.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { runCommand } from "../shared/exec.js";
import { mountPoints, pathExists } from "../shared/fs.js";
import { createLogger } from "../shared/log.js";
import type { VolumeMount, VolumeRecord, VolumeStore } from "../store/index.js";

const log = createLogger("volumes");

/**
 * VOLUMES_NOTE: a volume (E2B `/volumes`) is a filesystem of its own: an ext4 image of its
 * `sizeMB` (`<state>/volumes/<volumeID>.ext4`, sparse: it takes the disk its files take) mounted
 * through a loop device at `<run>/volumes/<volumeID>` (nosuid, nodev, noatime). Its quota is the
 * filesystem's size, so a write past it fails with ENOSPC, whoever writes (a sandbox, the
 * content API: 507), and fills nothing else. Its record (name, token, size) is in the store; the
 * image and the record outlive sandboxes, server restarts and host reboots: the server mounts
 * every volume at start, through the loop device already attached to its image when there is
 * one (sandboxes that still bind it after a server restart), never a second one, which would be
 * two kernels' views of one filesystem. The mounts stay across a server stop, as the storage
 * pool's does. The content API (volume-content.ts) works on the mount from the host. Files are
 * owned on disk by the canonical ids sandboxes' trees use (CANONICAL_ID_BASE + the id a sandbox
 * sees), so the idmapped mount that serves template trees can serve a volume to any sandbox.
 * A create's `volumeMounts` bind volumes into container sandboxes (VOLUME_BINDS_NOTE) and share
 * them with microVMs (MICROVM_SHARES_NOTE); a volume a live sandbox mounts is not deleted.
 * Volumes made before images (btrfs subvolumes `<pool>/volumes/<volumeID>` with a qgroup limit,
 * EDQUOT past it) are still served where they are. Not yet: teams.
 */
export const VOLUME_BOUNDS = {
  nameChars: 63,
  maxSizeMB: 1024 * 1024,
} as const;

/** The id sandbox uid/gid 0 has on disk (SANDBOX_UID_BASE, the helper's CANONICAL_BASE). */
export const CANONICAL_ID_BASE = 100_000;

const NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]*$/;
const VOLUME_ID = /^vol_[0-9a-f]{24}$/;

export interface VolumeServiceOptions {
  store: VolumeStore;
  /** `<state>/volumes`: the volumes' images (made 0700 at init). */
  imagesDir: string;
  /** `<run>/volumes`: where they are mounted (made 0700 at init). */
  mountsDir: string;
  /** `<pool>/volumes`: volumes made as btrfs subvolumes by earlier versions. */
  volumesDir: string;
  defaultSizeMB: number;
  /** At most this many volumes (each holds a loop device while it exists); default 256. */
  maxVolumes?: number;
  /** What uses the volume (a live sandbox that mounts it, a codebase on it), if anything: such a volume is not deleted. */
  mountedBy?: (volumeId: string) => string | undefined | Promise<string | undefined>;
}

export class VolumeService {
  private readonly store: VolumeStore;
  readonly imagesDir: string;
  readonly mountsDir: string;
  readonly volumesDir: string;
  /** Volumes that are images (all but the subvolumes of earlier versions). */
  private readonly images = new Set<string>();
  /** Images that could not be mounted at start (their files are kept; nothing reaches them until a restart mounts them). */
  private readonly unmounted = new Map<string, string>();
  private readonly defaultSizeMB: number;
  private readonly maxVolumes: number;
  /** Set once the sandboxes exist (they are made after the volumes). */
  mountedBy: (volumeId: string) => string | undefined | Promise<string | undefined>;

  constructor(options: VolumeServiceOptions) {
    this.store = options.store;
    this.imagesDir = options.imagesDir;
    this.mountsDir = options.mountsDir;
    this.volumesDir = options.volumesDir;
    this.defaultSizeMB = options.defaultSizeMB;
    this.maxVolumes = options.maxVolumes ?? 256;
    this.mountedBy = options.mountedBy ?? (() => undefined);
  }

  /**
   * Makes the directories, mounts every volume's image (VOLUMES_NOTE) and removes images and
   * subvolumes whose record is gone (a create or delete cut short).
   */
  async init(): Promise<void> {
    for (const dir of [this.imagesDir, this.mountsDir]) {
      await mkdir(dir, { recursive: true, mode: 0o700 });
      await chmod(dir, 0o700);
    }
    const known = new Set((await this.store.listVolumes()).map((volume) => volume.volumeId));
    for (const name of await readdir(this.imagesDir)) {
      const volumeId = name.slice(0, -".ext4".length);
      if (!name.endsWith(".ext4") || !VOLUME_ID.test(volumeId)) continue;
      if (known.has(volumeId)) {
        this.images.add(volumeId);
        try {
          await this.mountImage(volumeId);
        } catch (err) {
          // One volume that cannot be mounted must not stop the server; nothing may write to its
          // empty mount point meanwhile either (dirOf refuses it).
          this.unmounted.set(volumeId, (err as Error).message);
          log.error("a volume's image could not be mounted; it is unavailable until a restart mounts it", { volumeId, error: (err as Error).message });
        }
      } else {
        log.warn("removing a volume's image that has no record (a create or delete was cut short)", { volumeId });
        await this.removeImage(volumeId);
      }
    }
    if (existsSync(this.volumesDir)) {
      for (const name of await readdir(this.volumesDir)) {
        if (VOLUME_ID.test(name) && !known.has(name)) {
          log.warn("removing a volume's subvolume that has no record (a create or delete was cut short)", { volumeId: name });
          await this.removeSubvolume(path.join(this.volumesDir, name));
        }
      }
    }
  }

  async create(input: unknown): Promise<VolumeRecord> {
    if (typeof input !== "object" || input === null || Array.isArray(input)) throw new CubicleError("invalid_argument", "the body must be a JSON object: {name}");
    const body = input as Record<string, unknown>;
    for (const key of Object.keys(body)) {
      if (key !== "name" && key !== "sizeMB") throw new CubicleError("invalid_argument", `${JSON.stringify(key.slice(0, 64))} is not a volume field (name, sizeMB)`);
    }
    const name = body.name;
    if (typeof name !== "string" || name.length === 0 || name.length > VOLUME_BOUNDS.nameChars || !NAME.test(name)) {
      throw new CubicleError("invalid_argument", `name must be 1-${VOLUME_BOUNDS.nameChars} letters, digits, '.', '_' or '-', not starting with '.' or '-'`);
    }
    const sizeMB = body.sizeMB ?? this.defaultSizeMB;
    if (typeof sizeMB !== "number" || !Number.isInteger(sizeMB) || sizeMB < 1 || sizeMB > VOLUME_BOUNDS.maxSizeMB) {
      throw new CubicleError("invalid_argument", `sizeMB must be an integer from 1 to ${VOLUME_BOUNDS.maxSizeMB}`);
    }
    const record: VolumeRecord = { volumeId: `vol_${randomBytes(12).toString("hex")}`, name, token: randomBytes(32).toString("base64url"), sizeMB, createdAt: Date.now() };
    const existing = await this.store.listVolumes();
    if (existing.some((volume) => volume.name === name)) throw new CubicleError("already_exists", `a volume named "${name}" already exists`);
    if (existing.length >= this.maxVolumes) throw new CubicleError("resource_exhausted", `this server holds at most ${this.maxVolumes} volumes (CUBICLE_MAX_VOLUMES); delete one first`);
    const free = await statfs(this.imagesDir).then((fs) => Math.floor((fs.bavail * fs.bsize) / (1024 * 1024))).catch(() => undefined);
    if (free !== undefined && sizeMB > free) throw new CubicleError("invalid_argument", `sizeMB ${sizeMB} is more than the ${free} MB the host's disk has free`);
    try {
      await this.makeImage(record.volumeId, sizeMB);
      await this.store.insertVolume(record);
    } catch (err) {
      await this.removeImage(record.volumeId);
      throw err;
    }
    log.info("volume created", { volumeId: record.volumeId, name, sizeMB });
    return record;
  }

  list(): Promise<VolumeRecord[]> {
    return this.store.listVolumes();
  }

  /** The volume, or not_found. */
  async get(volumeId: string): Promise<VolumeRecord> {
    const record = VOLUME_ID.test(volumeId) ? await this.store.getVolume(volumeId) : undefined;
    if (!record) throw new CubicleError("not_found", `volume "${volumeId.slice(0, 64)}" not found`);
    return record;
  }

  /** The volume whose content API `token` opens; unauthenticated for any other token. */
  async authorize(volumeId: string, token: string | undefined): Promise<VolumeRecord> {
    if (!token) throw new CubicleError("unauthenticated", "missing volume token: send it as Authorization: Bearer <token>");
    const record = VOLUME_ID.test(volumeId) ? await this.store.getVolume(volumeId) : undefined;
    // The same answer for an unknown volume and a wrong token: a token names one volume only.
    if (!record || !constantTimeEquals(record.token, token)) throw new CubicleError("unauthenticated", "invalid volume token");
    return record;
  }

  /** The volumes of a create's `volumeMounts`, by name or id (VolumePort). */
  async resolveMounts(mounts: readonly { name: string; path: string }[]): Promise<VolumeMount[]> {
    const all = await this.store.listVolumes();
    const resolved = mounts.map((mount) => {
      const volume = all.find((candidate) => candidate.name === mount.name || candidate.volumeId === mount.name);
      if (!volume) throw new CubicleError("invalid_argument", `volumeMounts: there is no volume named "${mount.name.slice(0, 64)}"; create it first (Volume.create)`);
      return { volumeId: volume.volumeId, name: volume.name, path: mount.path };
    });
    // One volume at two places in one sandbox would be two mounts of one filesystem whose paths
    // the sandbox could confuse; E2B mounts a volume once per sandbox too.
    const twice = resolved.find((mount, index) => resolved.findIndex((other) => other.volumeId === mount.volumeId) !== index);
    if (twice) throw new CubicleError("invalid_argument", `volumeMounts: volume "${twice.name}" is mounted twice; mount each volume once`);
    return resolved;
  }

  /** Deletes the volume and its content; false when there is no such volume. Refused while a sandbox mounts it. */
  async delete(volumeId: string): Promise<boolean> {
    const record = VOLUME_ID.test(volumeId) ? await this.store.getVolume(volumeId) : undefined;
    if (!record) return false;
    const user = await this.mountedBy(volumeId);
    if (user) throw new CubicleError("failed_precondition", `volume "${record.name}" is in use by ${user}: kill the sandbox or unregister the codebase first`);
    await this.store.deleteVolume(volumeId);
    if (this.images.has(volumeId)) await this.removeImage(volumeId);
    else await this.removeSubvolume(this.dirOf(volumeId));
    log.info("volume deleted", { volumeId, name: record.name });
    return true;
  }

  /** Where the volume's files are on the host: its mount (or an earlier version's subvolume). */
  dirOf(volumeId: string): string {
    if (!VOLUME_ID.test(volumeId)) throw new CubicleError("invalid_argument", "not a volume id");
    if (this.unmounted.has(volumeId)) throw new CubicleError("unavailable", `volume ${volumeId} could not be mounted when the server started (see the server log); its files are kept`);
    return this.images.has(volumeId) ? path.join(this.mountsDir, volumeId) : path.join(this.volumesDir, volumeId);
  }

  private imageOf(volumeId: string): string {
    return path.join(this.imagesDir, `${volumeId}.ext4`);
  }

  /** A new volume's image: sparse, ext4 without reserved blocks, its root the sandbox user's; mounted. */
  private async makeImage(volumeId: string, sizeMB: number): Promise<void> {
    const image = this.imageOf(volumeId);
    const file = await open(image, "wx", 0o600);
    try {
      await file.truncate(sizeMB * 1024 * 1024);
    } finally {
      await file.close();
    }
    this.images.add(volumeId);
    const owner = `${CANONICAL_ID_BASE + 1000}:${CANONICAL_ID_BASE + 1000}`;
    // Lazy inode table and journal: the image is new and sparse, all zeros, so nothing needs zeroing.
    await runCommand(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", `root_owner=${owner},nodiscard,lazy_itable_init=1,lazy_journal_init=1`, "-L", volumeId.slice(0, 16), image], { timeoutMs: 120_000 });
    const dir = await this.mountImage(volumeId);
    // The root like a home (0755, the user's); no lost+found (root's, which a sandbox would see as nobody's).
    await rmdir(path.join(dir, "lost+found"));
    await chmod(dir, 0o755);
  }

  /**
   * Mounts the volume's image at its directory unless it is mounted: through the loop device
   * already attached to the image when there is one (VOLUMES_NOTE).
   */
  private async mountImage(volumeId: string): Promise<string> {
    const dir = path.join(this.mountsDir, volumeId);
    await mkdir(dir, { recursive: true, mode: 0o755 });
    if ((await mountPoints()).includes(dir)) return dir;
    const image = this.imageOf(volumeId);
    const attached = await loopDeviceOf(image);
    const options = "nosuid,nodev,noatime";
    await runCommand(attached ? ["mount", "-t", "ext4", "-o", options, attached, dir] : ["mount", "-t", "ext4", "-o", `loop,${options}`, image, dir], { timeoutMs: 60_000 });
    return dir;
  }

  /** Unmounts (lazily: a sandbox's bind keeps the filesystem until it ends) and removes the image. */
  private async removeImage(volumeId: string): Promise<void> {
    const dir = path.join(this.mountsDir, volumeId);
    if ((await mountPoints()).includes(dir)) await runCommand(["umount", "--lazy", dir], { timeoutMs: 60_000 });
    await rmdir(dir).catch(() => undefined);
    await rm(this.imageOf(volumeId), { force: true });
    this.images.delete(volumeId);
    this.unmounted.delete(volumeId);
  }

  private async removeSubvolume(dir: string): Promise<void> {
    if (!(await pathExists(dir))) return;
    const deleted = await runCommand(["btrfs", "subvolume", "delete", dir], { timeoutMs: 60_000, allowFailure: true });
    if (deleted.exitCode !== 0) {
      log.warn("could not delete a volume's subvolume; removing its files", { dir, error: deleted.stderr.trim().slice(-300) });
      await rm(dir, { recursive: true, force: true });
    }
  }
}

/** The loop device attached to `image`, if any (/sys/block/loop*\/loop/backing_file). */
async function loopDeviceOf(image: string): Promise<string | undefined> {
  for (const name of await readdir("/sys/block").catch(() => [] as string[])) {
    if (!name.startsWith("loop")) continue;
    const backing = await readFile(`/sys/block/${name}/loop/backing_file`, "utf8").catch(() => "");
    if (backing.trim() === image) return `/dev/${name}`;
  }
  return undefined;
}
