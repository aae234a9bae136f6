import { randomBytes } from "node:crypto";
import { chmod, chown, mkdir, readdir, rm } from "node:fs/promises";
import path from "node:path";
import { constantTimeEquals } from "../shared/compare.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { runCommand } from "../shared/exec.js";
import { pathExists } from "../shared/fs.js";
import { createLogger } from "../shared/log.js";
import type { VolumeMount, VolumeRecord, VolumeStore } from "../store/index.js";

const log = createLogger("volumes");

/**
 * VOLUMES_NOTE: a volume (E2B `/volumes`) is a btrfs subvolume `<pool>/volumes/<volumeID>` on
 * the storage pool (STORAGE_POOL_NOTE) with a qgroup limit of its `sizeMB`, so its quota is the
 * kernel's: a write past it fails with EDQUOT whoever writes. Its record (name, token, size)
 * is in the store; the subvolume and the record outlive sandboxes and server restarts (the pool
 * is a file in the state directory, mounted again at start). The content API
 * (volume-content.ts) works on the subvolume from the host. Files are owned on disk by the
 * canonical ids sandboxes' trees use (CANONICAL_ID_BASE + the id a sandbox sees), so the
 * idmapped mount that serves template trees can serve a volume to any sandbox.
 * A create's `volumeMounts` bind volumes into container sandboxes (VOLUME_BINDS_NOTE); a
 * volume a live sandbox mounts is not deleted. Not yet: microVMs, teams.
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
  /** `<pool>/volumes`: made 0700 at init. */
  volumesDir: string;
  defaultSizeMB: number;
  /** What uses the volume (a live sandbox that mounts it, a codebase on it), if anything: such a volume is not deleted. */
  mountedBy?: (volumeId: string) => string | undefined | Promise<string | undefined>;
}

export class VolumeService {
  private readonly store: VolumeStore;
  readonly volumesDir: string;
  private readonly defaultSizeMB: number;
  /** Set once the sandboxes exist (they are made after the volumes). */
  mountedBy: (volumeId: string) => string | undefined | Promise<string | undefined>;

  constructor(options: VolumeServiceOptions) {
    this.store = options.store;
    this.volumesDir = options.volumesDir;
    this.defaultSizeMB = options.defaultSizeMB;
    this.mountedBy = options.mountedBy ?? (() => undefined);
  }

  /** Makes the volumes directory; removes subvolumes whose record is gone (a crash mid-delete). */
  async init(): Promise<void> {
    await mkdir(this.volumesDir, { recursive: true, mode: 0o700 });
    await chmod(this.volumesDir, 0o700);
    const known = new Set((await this.store.listVolumes()).map((volume) => volume.volumeId));
    for (const name of await readdir(this.volumesDir)) {
      if (VOLUME_ID.test(name) && !known.has(name)) {
        log.warn("removing a volume's subvolume that has no record (a create or delete was cut short)", { volumeId: name });
        await this.removeSubvolume(this.dirOf(name));
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
    if ((await this.store.listVolumes()).some((volume) => volume.name === name)) throw new CubicleError("already_exists", `a volume named "${name}" already exists`);
    const dir = this.dirOf(record.volumeId);
    await runCommand(["btrfs", "subvolume", "create", dir], { timeoutMs: 60_000 });
    try {
      await runCommand(["btrfs", "qgroup", "limit", `${sizeMB}M`, dir], { timeoutMs: 60_000 });
      // The root directory belongs to the sandbox's default user (uid/gid 1000), like a home.
      await chown(dir, CANONICAL_ID_BASE + 1000, CANONICAL_ID_BASE + 1000);
      await chmod(dir, 0o755);
      await this.store.insertVolume(record);
    } catch (err) {
      await this.removeSubvolume(dir);
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
    await this.removeSubvolume(this.dirOf(volumeId));
    log.info("volume deleted", { volumeId, name: record.name });
    return true;
  }

  dirOf(volumeId: string): string {
    if (!VOLUME_ID.test(volumeId)) throw new CubicleError("invalid_argument", "not a volume id");
    return path.join(this.volumesDir, volumeId);
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
