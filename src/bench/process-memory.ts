import { readdir, readFile } from "node:fs/promises";
import path from "node:path";
import { runCommand } from "../shared/exec.js";

/** The memory fields of /proc/<pid>/smaps_rollup, in bytes. */
export interface ProcessMemory {
  rssBytes: number;
  pssBytes: number;
  /** Private_Clean + Private_Dirty: what killing the process would give back. */
  privateBytes: number;
}

export function parseSmapsRollup(text: string): ProcessMemory {
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? 0) * 1024;
  return { rssBytes: field("Rss"), pssBytes: field("Pss"), privateBytes: field("Private_Clean") + field("Private_Dirty") };
}

interface RuncListEntry {
  id: string;
  pid: number;
  status: string;
  bundle: string;
}

/**
 * Memory of the agent process of each running sandbox of the server whose run dir is given:
 * `runc list` → the container's init (tini, pid from runc) → its child, the agent →
 * /proc/<pid>/smaps_rollup. Only containers whose bundle lives in that server's storage pool
 * (`<runDir>/pool/sandboxes/`) count, so another server's sandboxes are skipped; frozen ones
 * (the warm pool) are skipped too.
 * Bundles are named by the runtime id, which for a sandbox claimed from the warm pool is not
 * its sandbox id: so this measures every running sandbox of that server, and the benchmark
 * assumes nobody else uses the server meanwhile.
 */
export async function runningAgentMemory(runcPath: string, runDir: string): Promise<{ runtimeId: string; agentPid: number; memory: ProcessMemory }[]> {
  const { stdout } = await runCommand([runcPath, "list", "--format", "json"], { timeoutMs: 30_000 });
  const containers = ((JSON.parse(stdout || "null") as RuncListEntry[] | null) ?? []).filter(
    (c) => path.dirname(c.bundle) === path.join(runDir, "pool", "sandboxes") && c.status === "running" && c.pid > 0,
  );
  const found: { runtimeId: string; agentPid: number; memory: ProcessMemory }[] = [];
  for (const container of containers) {
    const children = await readFile(`/proc/${container.pid}/task/${container.pid}/children`, "utf8").catch(() => "");
    const agentPid = Number(children.trim().split(/\s+/)[0]);
    if (!Number.isInteger(agentPid) || agentPid <= 0) continue;
    const rollup = await readFile(`/proc/${agentPid}/smaps_rollup`, "utf8").catch(() => "");
    if (rollup) found.push({ runtimeId: path.basename(container.bundle), agentPid, memory: parseSmapsRollup(rollup) });
  }
  return found;
}

/**
 * Memory of the QEMU of each microVM of the server whose run dir is given (its guest directory
 * `<runDir>/microvm/<runtime id>` is in QEMU's command line), from /proc/<pid>/smaps_rollup:
 * what guests made from one image share shows as Pss below Rss, and Private as what each one
 * holds alone (MICROVM_RAM_NOTE). The RAM files of booted guests are in a tmpfs, which counts
 * in Rss and Private (shared mappings of a file only one process maps).
 */
export async function microvmQemuMemory(runDir: string): Promise<{ runtimeId: string; pid: number; memory: ProcessMemory }[]> {
  const prefix = path.join(runDir, "microvm") + "/";
  // A guest restored into a spare QEMU (SPARE_QEMU_NOTE) has the spare's directory in its argv:
  // its pid file, in the guest's directory, names it.
  const byPidFile = new Map<number, string>();
  for (const id of await readdir(path.join(runDir, "microvm")).catch(() => [] as string[])) {
    const pid = Number((await readFile(path.join(runDir, "microvm", id, "run", "qemu.pid"), "utf8").catch(() => "")).trim());
    if (Number.isInteger(pid) && pid > 1) byPidFile.set(pid, id);
  }
  const found: { runtimeId: string; pid: number; memory: ProcessMemory }[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const comm = (await readFile(`/proc/${entry}/comm`, "utf8").catch(() => "")).trim();
    if (!comm.startsWith("qemu-system")) continue;
    const args = (await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "")).split("\0");
    const inDir = args.find((arg) => arg.includes(prefix));
    const runtimeId = byPidFile.get(Number(entry)) ?? (inDir ? inDir.slice(inDir.indexOf(prefix) + prefix.length).split("/")[0]! : undefined);
    if (!runtimeId) continue;
    const rollup = await readFile(`/proc/${entry}/smaps_rollup`, "utf8").catch(() => "");
    if (rollup) found.push({ runtimeId, pid: Number(entry), memory: parseSmapsRollup(rollup) });
  }
  return found;
}

/** The spare QEMUs of a server (SPARE_QEMU_NOTE) still waiting for a state, with their memory. */
export async function spareQemuMemory(runDir: string): Promise<{ slot: string; pid: number; memory: ProcessMemory }[]> {
  const root = path.join(runDir, "microvm-spares");
  const found: { slot: string; pid: number; memory: ProcessMemory }[] = [];
  // Spares are `s<n>`; `c<n>` is an image's conversion to a RAM file (RAM_FILE_CONVERSION_NOTE).
  for (const slot of (await readdir(root).catch(() => [] as string[])).filter((name) => name.startsWith("s"))) {
    const pid = Number((await readFile(path.join(root, slot, "run", "qemu.pid"), "utf8").catch(() => "")).trim());
    if (!Number.isInteger(pid) || pid <= 1) continue;
    const rollup = await readFile(`/proc/${pid}/smaps_rollup`, "utf8").catch(() => "");
    if (rollup) found.push({ slot, pid, memory: parseSmapsRollup(rollup) });
  }
  return found;
}
