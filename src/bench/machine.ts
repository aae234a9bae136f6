import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";

/** The machine a benchmark ran on, recorded in every result file. */
export function describeMachine() {
  const cpuModel = os.cpus()[0]?.model ?? "unknown";
  let gitRevision = "unknown";
  try {
    gitRevision = execFileSync("git", ["rev-parse", "--short", "HEAD"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
  } catch {
    // not a checkout
  }
  let cgroup = "v1";
  if (fs.existsSync("/sys/fs/cgroup/cgroup.controllers")) cgroup = "v2";
  return {
    hostname: os.hostname(),
    cpuModel,
    cores: os.cpus().length,
    memoryGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    kernel: os.release(),
    node: process.version,
    cgroup,
    gitRevision,
  };
}

function meminfoBytes(field: string): number {
  const line = fs.readFileSync("/proc/meminfo", "utf8").split("\n").find((l) => l.startsWith(`${field}:`));
  return Number(line?.split(/\s+/)[1] ?? 0) * 1024;
}

/** MemAvailable from /proc/meminfo, in bytes. */
export function memAvailableBytes(): number {
  return meminfoBytes("MemAvailable");
}

/** MemFree from /proc/meminfo, in bytes (counts page cache as used: the stricter figure). */
export function memFreeBytes(): number {
  return meminfoBytes("MemFree");
}
