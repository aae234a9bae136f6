import { writeFileSync } from "node:fs";
import { readFile, rmdir } from "node:fs/promises";
import path from "node:path";
import { pathExists, readKernelFile } from "../../shared/fs.js";

/**
 * The host's cgroup layout, read once from /proc/self/mountinfo. Pure v2 hosts have one
 * `cgroup2` mount; v1 and hybrid hosts have one `cgroup` mount per controller set (a hybrid
 * host also has a `cgroup2` mount, which holds no controllers).
 */
export interface CgroupLayout {
  version: 1 | 2;
  /** v1: controller name (memory, cpuacct, pids, name=systemd …) → mount point. */
  v1Mounts: Map<string, string>;
  /** v2 mount point (also set on hybrid hosts, e.g. /sys/fs/cgroup/unified). */
  v2Mount: string | undefined;
}

export async function detectCgroupLayout(): Promise<CgroupLayout> {
  const mountinfo = await readFile("/proc/self/mountinfo", "utf8");
  const v1Mounts = new Map<string, string>();
  let v2Mount: string | undefined;
  for (const line of mountinfo.split("\n")) {
    // <id> <parent> <maj:min> <root> <mountpoint> <opts> [optional…] - <fstype> <source> <superopts>
    const [left, right] = line.split(" - ");
    if (!left || !right) continue;
    const mountPoint = unescapeMountPath(left.split(" ")[4] ?? "");
    const [fsType, , superOptions = ""] = right.split(" ");
    if (fsType === "cgroup2") v2Mount ??= mountPoint;
    if (fsType === "cgroup") {
      for (const option of superOptions.split(",")) {
        if (["rw", "ro"].includes(option) || option.startsWith("release_agent") || option === "clone_children" || option === "nsdelegate") continue;
        v1Mounts.set(option, mountPoint);
      }
    }
  }
  return { version: v1Mounts.has("memory") || v1Mounts.has("cpuacct") || v1Mounts.has("pids") ? 1 : 2, v1Mounts, v2Mount };
}

/** Every directory a container with this `cgroupsPath` (cgroupfs driver) can have. */
export function cgroupDirectories(layout: CgroupLayout, cgroupsPath: string): string[] {
  const dirs = new Set<string>();
  for (const mountPoint of layout.v1Mounts.values()) dirs.add(path.join(mountPoint, cgroupsPath));
  if (layout.v2Mount) dirs.add(path.join(layout.v2Mount, cgroupsPath));
  return [...dirs];
}

/** Removes (empty) cgroup directories that are left; returns those that could not be removed. */
export async function removeCgroupDirectories(layout: CgroupLayout, cgroupsPath: string): Promise<string[]> {
  const left: string[] = [];
  for (const dir of cgroupDirectories(layout, cgroupsPath)) {
    if (!(await pathExists(dir))) continue;
    await rmdir(dir).catch(() => {});
    if (await pathExists(dir)) left.push(dir);
  }
  return left;
}

/**
 * The CPU weight of a cgroup nothing set one for (what a sandbox's cgroup has unless it is a
 * background start): the kernel's default, v1 `cpu.shares` and v2 `cpu.weight`.
 */
export const NORMAL_CPU_WEIGHT = { v1Shares: 1024, v2Weight: 100 } as const;

/**
 * Gives a container's cgroup the normal CPU weight (BACKGROUND_START_NOTE in
 * container-runtime.ts): one synchronous file write, no process start. Throws when the cgroup
 * is gone (ENOENT).
 */
export function setNormalCpuWeight(layout: CgroupLayout, cgroupsPath: string): void {
  if (layout.version === 2) writeFileSync(path.join(layout.v2Mount ?? "/sys/fs/cgroup", cgroupsPath, "cpu.weight"), String(NORMAL_CPU_WEIGHT.v2Weight));
  else writeFileSync(path.join(layout.v1Mounts.get("cpu") ?? "/sys/fs/cgroup/cpu", cgroupsPath, "cpu.shares"), String(NORMAL_CPU_WEIGHT.v1Shares));
}

export interface CgroupUsage {
  /** Total CPU time consumed, in microseconds. */
  cpuUsageUsec: number;
  memoryUsedBytes: number;
  memoryCacheBytes: number;
  /** The memory limit in force, or undefined when unlimited. */
  memoryLimitBytes: number | undefined;
}

/** Total CPU time a container's cgroup consumed, in microseconds (one file read: the idle tiers' check). */
export async function readCgroupCpuUsec(layout: CgroupLayout, cgroupsPath: string): Promise<number> {
  if (layout.version === 2) return keyedNumber(readKernelFile(path.join(layout.v2Mount ?? "/sys/fs/cgroup", cgroupsPath, "cpu.stat")), "usage_usec");
  const usageNs = readKernelFile(path.join(layout.v1Mounts.get("cpuacct") ?? "/sys/fs/cgroup/cpuacct", cgroupsPath, "cpuacct.usage"));
  return Number(usageNs.trim()) / 1000;
}

/** Reads CPU and memory use of a container's cgroup; the files differ between v1 and v2. */
export async function readCgroupUsage(layout: CgroupLayout, cgroupsPath: string): Promise<CgroupUsage> {
  if (layout.version === 2) {
    const dir = path.join(layout.v2Mount ?? "/sys/fs/cgroup", cgroupsPath);
    const read = (name: string) => readKernelFile(path.join(dir, name));
    const max = read("memory.max").trim();
    return {
      cpuUsageUsec: keyedNumber(read("cpu.stat"), "usage_usec"),
      memoryUsedBytes: Number(read("memory.current").trim()),
      memoryCacheBytes: keyedNumber(read("memory.stat"), "file"),
      memoryLimitBytes: max === "max" ? undefined : Number(max),
    };
  }
  const memoryDir = path.join(layout.v1Mounts.get("memory") ?? "/sys/fs/cgroup/memory", cgroupsPath);
  const cpuacctDir = path.join(layout.v1Mounts.get("cpuacct") ?? "/sys/fs/cgroup/cpuacct", cgroupsPath);
  const read = (name: string) => readKernelFile(path.join(memoryDir, name));
  const memoryStat = read("memory.stat");
  const limitBytes = Number(read("memory.limit_in_bytes").trim());
  return {
    cpuUsageUsec: Number(readKernelFile(path.join(cpuacctDir, "cpuacct.usage")).trim()) / 1000,
    memoryUsedBytes: Number(read("memory.usage_in_bytes").trim()),
    memoryCacheBytes: keyedNumber(memoryStat, "total_cache") || keyedNumber(memoryStat, "cache"),
    // v1 reports "unlimited" as a huge page-rounded number.
    memoryLimitBytes: limitBytes >= 2 ** 60 ? undefined : limitBytes,
  };
}

/** Whether this host can limit swap for a cgroup (v1 needs swapaccount; v2 the swap files). */
export async function supportsSwapLimit(layout: CgroupLayout): Promise<boolean> {
  if (layout.version === 1) {
    const memory = layout.v1Mounts.get("memory");
    return memory ? pathExists(path.join(memory, "memory.memsw.limit_in_bytes")) : false;
  }
  const controllers = await readFile(path.join(layout.v2Mount ?? "/sys/fs/cgroup", "cgroup.controllers"), "utf8").catch(() => "");
  return controllers.split(/\s+/).includes("memory") && (await pathExists("/proc/swaps"));
}

function keyedNumber(text: string, key: string): number {
  const match = new RegExp(`^${key} (\\d+)$`, "m").exec(text);
  return match ? Number(match[1]) : 0;
}

/** mountinfo escapes space, tab, newline and backslash as octal. */
function unescapeMountPath(text: string): string {
  return text.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

