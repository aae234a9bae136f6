import { chmod, chown, mkdir, open, readdir, readFile, stat, statfs } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { pathExists, readKernelFile } from "../../shared/fs.js";
import { createLogger } from "../../shared/log.js";

const log = createLogger("storage");

/**
 * STORAGE_POOL_NOTE: sandbox disks are enforced by the kernel. Every sandbox's writable layer
 * (overlay upper and work dirs) is a btrfs subvolume with a qgroup limit (its `diskSizeMB`): a
 * write past it fails with EDQUOT inside the sandbox and nothing else is affected. Images
 * (snapshots, pause images) live in one subvolume; their size counts against the server-wide
 * image budget, which the runtime checks before every dump (507 when it is used up). The budget
 * is not a qgroup limit: a layer snapshot counted in a parent qgroup makes btrfs's accounting
 * inconsistent until a full rescan, a reflinked copy is not checked against a limit at all, and
 * a subvolume over its limit cannot even be deleted (EDQUOT), which would wedge the store.
 *
 * The pool is one btrfs filesystem in a sparse file in the state directory, loop-mounted under
 * /run/cubicle (the mount point is outside the state directory, which is 0700: the sandboxes'
 * mapped roots must reach their bundles). Project quotas on the host's own filesystem would be
 * the other way, but the kernels of this project's machines have neither ext4 nor XFS quota
 * support, while btrfs qgroups need none; btrfs also makes a layer's snapshot an O(1) ioctl,
 * which replaces copying upper layers for every checkpoint and restore.
 */
export interface StoragePoolOptions {
  stateDir: string;
  mountDir: string;
  /** Size of the pool's image file when it is made; default: 90 % of the free space, at most 1 TiB. */
  sizeBytes?: number;
  /** The image budget; default: half the pool. */
  imageBudgetBytes?: number;
}

const MIN_POOL_BYTES = 1024 ** 3;
const MAX_DEFAULT_POOL_BYTES = 1024 ** 4;

export class StoragePool {
  readonly mountDir: string;
  readonly imageFile: string;
  private sysfsDir: string | undefined;
  /** The server-wide budget for images, in bytes (known after init). */
  imageBudgetBytes = 0;

  constructor(private readonly options: StoragePoolOptions) {
    this.mountDir = options.mountDir;
    this.imageFile = path.join(options.stateDir, "storage.btrfs");
  }

  /** Bundles: config.json, the root mount point, the namespace pin. Traversable by sandbox roots. */
  get sandboxesDir(): string {
    return path.join(this.mountDir, "sandboxes");
  }

  /** Writable layers (subvolumes): host root only. */
  get layersDir(): string {
    return path.join(this.mountDir, "layers");
  }

  /** Checkpoint images (in the image budget): host root only. */
  get imagesDir(): string {
    return path.join(this.mountDir, "images");
  }

  /** Bound read-only at /sys in sandboxes (SYS_MOUNT_NOTE). */
  get emptyDir(): string {
    return path.join(this.mountDir, "empty");
  }

  /** Makes (first start), mounts (after a reboot) and lays out the pool. Idempotent. */
  async init(): Promise<void> {
    await mkdir(path.dirname(this.mountDir), { recursive: true, mode: 0o711 });
    await mkdir(this.mountDir, { recursive: true, mode: 0o711 });
    if (!(await this.mountedDevice())) {
      if (!(await pathExists(this.imageFile))) await this.makeImage();
      await runCommand(["mount", "-t", "btrfs", "-o", "loop,noatime,discard=async,commit=5", this.imageFile, this.mountDir], { timeoutMs: 60_000 });
      log.info("storage pool mounted", { image: this.imageFile, mountDir: this.mountDir });
    }
    const device = await this.mountedDevice();
    if (!device) throw new CubicleError("internal", `the storage pool did not mount at ${this.mountDir}`);
    this.sysfsDir = await findSysfsDir(device);
    // Everything of the pool is host root's; only what sandbox roots must reach is opened up.
    await chmod(this.mountDir, 0o711);
    await mkdir(this.sandboxesDir, { recursive: true });
    await chmod(this.sandboxesDir, 0o711);
    await mkdir(this.layersDir, { recursive: true });
    await chmod(this.layersDir, 0o700);
    await mkdir(this.emptyDir, { recursive: true });
    await chown(this.emptyDir, 0, 0);
    await chmod(this.emptyDir, 0o555);
    if (!(await pathExists(path.join(this.sysfsDir, "qgroups")))) {
      await runCommand(["btrfs", "quota", "enable", this.mountDir], { timeoutMs: 60_000 });
    }
    if (!(await pathExists(this.imagesDir))) {
      await runCommand(["btrfs", "subvolume", "create", this.imagesDir], { timeoutMs: 60_000 });
    }
    await chmod(this.imagesDir, 0o700);
    this.imageBudgetBytes = this.options.imageBudgetBytes ?? Math.floor((await stat(this.imageFile)).size / 2);
  }

  /**
   * IMAGE_COMPRESSION_NOTE: files made under `dir` from now on are compressed by btrfs (zstd,
   * the directory's `compression` property, which new files and directories inherit). Used for
   * the images of durable pauses, which the idle tiers make of every sandbox left alone: a
   * CRIU image of an idle agent is ~10 MiB of pages that zstd takes to ~2 MiB (measured on
   * two agents' pages-*.img: 10.5 MB → 1.9 MB at level 3, 2.0 MB at level 1; their pages are not
   * shared, so deduplication would not help). The kernel compresses at writeback, after the
   * dump has returned, and decompresses on a cold read at restore (~10 MiB, a few ms); an image
   * still in the page cache is read as it is. Sizes the image budget counts stay the
   * uncompressed ones (st_blocks), so the budget is a bound on what images could take, not on
   * the pool's use. Set at every start (idempotent; one process, not on a hot path).
   */
  async compressNewFiles(dir: string): Promise<void> {
    await runCommand(["btrfs", "property", "set", dir, "compression", "zstd"], { timeoutMs: 30_000 });
  }

  /** Bytes a layer references (kernel accounting, from sysfs: no walk) and its limit. */
  async usage(subvolumeId: number): Promise<{ usedBytes: number; limitBytes: number | undefined }> {
    if (!this.sysfsDir) throw new CubicleError("failed_precondition", "the storage pool is not initialised");
    const dir = path.join(this.sysfsDir, "qgroups", `0_${subvolumeId}`);
    // `referenced` is accounted at each commit; `rsv_data` holds what was written since.
    // Read synchronously: sysfs files (KERNEL_FILES_NOTE).
    const read = (name: string) => {
      try {
        return Number(readKernelFile(path.join(dir, name)).trim()) || 0;
      } catch {
        return 0;
      }
    };
    const limit = read("max_referenced");
    return { usedBytes: read("referenced") + read("rsv_data"), limitBytes: limit > 0 && limit < 2 ** 62 ? limit : undefined };
  }

  private async makeImage(): Promise<void> {
    const sizeBytes = this.options.sizeBytes ?? (await defaultPoolBytes(this.options.stateDir));
    // Created 0600 and sparse: the file grows as sandboxes write (discard gives space back).
    const file = await open(this.imageFile, "wx", 0o600);
    try {
      await file.truncate(sizeBytes);
    } finally {
      await file.close();
    }
    await runCommand(["mkfs.btrfs", "-q", this.imageFile], { timeoutMs: 120_000 });
    log.info("storage pool made", { image: this.imageFile, bytes: sizeBytes });
  }

  /** The block device mounted at mountDir, if it is a btrfs mount. */
  private async mountedDevice(): Promise<string | undefined> {
    const mountinfo = await readFile("/proc/self/mountinfo", "utf8");
    for (const line of mountinfo.split("\n")) {
      const [left, right] = line.split(" - ");
      if (!left || !right) continue;
      const mountPoint = left.split(" ")[4];
      const [fsType, source] = right.split(" ");
      if (mountPoint === this.mountDir && fsType === "btrfs" && source) return source;
    }
    return undefined;
  }
}

/** /sys/fs/btrfs/<uuid> of the filesystem on `device` (/dev/loopN). */
async function findSysfsDir(device: string): Promise<string> {
  const name = path.basename(device);
  for (const uuid of await readdir("/sys/fs/btrfs").catch(() => [] as string[])) {
    if (await pathExists(path.join("/sys/fs/btrfs", uuid, "devices", name))) return path.join("/sys/fs/btrfs", uuid);
  }
  throw new CubicleError("internal", `no btrfs sysfs entry for ${device}`);
}

async function defaultPoolBytes(stateDir: string): Promise<number> {
  const stats = await statfs(stateDir);
  const free = stats.bavail * stats.bsize;
  const wanted = Math.min(Math.floor(free * 0.9), MAX_DEFAULT_POOL_BYTES);
  if (wanted < MIN_POOL_BYTES) {
    throw new CubicleError("insufficient_storage", `the state directory's filesystem has ${Math.floor(free / 1024 ** 2)} MiB free; sandbox storage needs at least 1 GiB`);
  }
  return wanted;
}
