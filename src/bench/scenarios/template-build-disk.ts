/**
 * Disk figures of the `template-build` benchmark, read on the server's host: the storage pool
 * (the btrfs filesystem at `<runDir>/pool`, STORAGE_POOL_NOTE) where template layer images live
 * as subvolumes under `images/layers/`, and the state dir's `images/` (IMAGE_BASES_NOTE: one
 * unpacked rootfs per pulled image manifest).
 */
import fs from "node:fs";
import { statfs } from "node:fs/promises";
import path from "node:path";
import { runCommand } from "../../shared/exec.js";

export interface PoolProbe {
  mountDir: string;
  /** /sys/fs/btrfs/<uuid>: the pool's qgroup counters. */
  sysfsDir: string;
}

/** The server's storage pool, when it is a btrfs mount this host can see; else undefined. */
export function findPool(runDir: string): PoolProbe | undefined {
  const mountDir = path.join(runDir, "pool");
  const mountinfo = fs.readFileSync("/proc/self/mountinfo", "utf8");
  for (const line of mountinfo.split("\n")) {
    const [left, right] = line.split(" - ");
    if (!left || !right) continue;
    const [fsType, source] = right.split(" ");
    if (left.split(" ")[4] !== mountDir || fsType !== "btrfs" || !source) continue;
    const device = path.basename(source);
    for (const uuid of fs.readdirSync("/sys/fs/btrfs")) {
      if (fs.existsSync(path.join("/sys/fs/btrfs", uuid, "devices", device))) return { mountDir, sysfsDir: path.join("/sys/fs/btrfs", uuid) };
    }
  }
  return undefined;
}

/**
 * Commits the pool and waits until subvolumes deleted so far (build sandboxes' layers) are
 * cleaned, so a reading counts what stays, not what is on its way out.
 */
export async function settlePool(pool: PoolProbe): Promise<void> {
  await runCommand(["btrfs", "filesystem", "sync", pool.mountDir], { timeoutMs: 60_000 });
  await runCommand(["btrfs", "subvolume", "sync", pool.mountDir], { timeoutMs: 300_000 });
  await runCommand(["btrfs", "filesystem", "sync", pool.mountDir], { timeoutMs: 60_000 });
}

/** Bytes in use on the pool's filesystem (data and metadata), as statfs reports them. */
export async function poolUsedBytes(pool: PoolProbe): Promise<number> {
  const s = await statfs(pool.mountDir);
  return (s.blocks - s.bfree) * s.bsize;
}

function imageNames(pool: PoolProbe, kindDir: string): string[] {
  const dir = path.join(pool.mountDir, "images", kindDir);
  return fs.existsSync(dir) ? fs.readdirSync(dir).filter((name) => !name.startsWith(".") && !name.includes(".partial-") && !name.includes(".removed-")) : [];
}

/** Names of the pool's template layer images (`images/layers/<name>`). */
export function layerImageNames(pool: PoolProbe): string[] {
  return imageNames(pool, "layers");
}

/** Names of the pool's warm images (`images/warm/<templateId>-<key>`). */
export function warmImageNames(pool: PoolProbe): string[] {
  return imageNames(pool, "warm");
}

/**
 * A layer image's qgroup counters: `referenced` (every byte it can read, shared or not) and
 * `exclusive` (bytes only it holds: what deleting it would free).
 */
export async function layerImageBytes(pool: PoolProbe, name: string): Promise<{ referencedBytes: number; exclusiveBytes: number }> {
  const layerDir = path.join(pool.mountDir, "images", "layers", name, "layer");
  const { stdout } = await runCommand(["btrfs", "inspect-internal", "rootid", layerDir], { timeoutMs: 30_000 });
  const id = Number(stdout.trim());
  const read = (file: string) => Number(fs.readFileSync(path.join(pool.sysfsDir, "qgroups", `0_${id}`, file), "utf8").trim());
  return { referencedBytes: read("referenced"), exclusiveBytes: read("exclusive") };
}

/** The state dir's image bases: how many, and the blocks they use (`du`). */
export async function imageBasesUsage(stateDir: string): Promise<{ entries: string[]; bytes: number }> {
  const dir = path.join(stateDir, "images");
  if (!fs.existsSync(dir)) return { entries: [], bytes: 0 };
  const entries = fs.readdirSync(dir).filter((name) => /^[a-f0-9]{64}$/.test(name));
  const { stdout } = await runCommand(["du", "-s", "-B1", dir], { timeoutMs: 120_000 });
  return { entries, bytes: Number(stdout.split(/\s/)[0]) };
}
