import { stat } from "node:fs/promises";
import path from "node:path";

/**
 * CRIU_RPC_NOTE (issue 15): a container sandbox's checkpoint is CRIU's DUMP request sent by the
 * resident helper (`criu-dump`, native/criu-rpc.h) to a `criu swrk` it starts in the sandbox's
 * netns, not `runc checkpoint`: runc is a Go program (~22 ms to start here) that then spends
 * ~40 ms more reading its state, asking CRIU's version and building the request, around a dump
 * CRIU itself does in ~75 ms. The request is the one runc 1.1 sends for
 * `runc checkpoint --file-locks --leave-running` (read off the wire once and kept field for
 * field), without notify scripts, whose only effect for a dump is a marker file in runc's
 * state: the bind mounts of config.json, the masked files (bound from /dev/null) and the
 * default device nodes as external mounts, the netns as an empty (external) one, the freezer
 * cgroup, the CRIU config file of the annotation `org.criu.config`. runc's `descriptors.json`
 * (the init's stdio, /dev/null for every detached sandbox) is written beside the image, so
 * `runc restore` takes these images as its own. Restores stay with runc: it owns the
 * container's state, cgroups and later kill and delete.
 */
export const CRIU_RPC_NOTE = "checkpoints through CRIU's RPC from the resident helper";

/** runc's default device nodes (libcontainer/specconv AllowedDevices with a path), bound into a user namespace. */
const RUNC_DEFAULT_DEVICES = ["/dev/null", "/dev/random", "/dev/full", "/dev/tty", "/dev/zero", "/dev/urandom"];

/** What runc's state and the bundle's config.json say of the container to dump. */
export interface CriuDumpInput {
  criu: string;
  netnsPath: string;
  pid: number;
  imagesDir: string;
  workDir: string;
  /** The bundle's rootfs, absolute. */
  root: string;
  freezerCgroup: string;
  configFile: string;
  leaveRunning: boolean;
  /** config.json's mounts, masked paths and devices. */
  oci: { mounts?: { destination: string; type?: string; options?: string[] }[]; linux?: { maskedPaths?: string[]; devices?: { path: string }[] } };
  env: Record<string, string | undefined>;
}

/**
 * The external mounts runc names in its DUMP request: every bind mount at its destination, each
 * masked path that is a file in the running sandbox (bound from /dev/null), and the device nodes.
 */
export async function externalMounts(input: Pick<CriuDumpInput, "oci" | "pid">): Promise<[string, string][]> {
  const mounts: [string, string][] = [];
  for (const mount of input.oci.mounts ?? []) {
    if (mount.type === "bind" || mount.options?.includes("bind") || mount.options?.includes("rbind")) mounts.push([mount.destination, mount.destination]);
  }
  for (const masked of input.oci.linux?.maskedPaths ?? []) {
    const found = await stat(path.join(`/proc/${input.pid}/root`, masked)).catch(() => undefined);
    if (found && !found.isDirectory()) mounts.push([masked, "/dev/null"]);
  }
  const devices = [...RUNC_DEFAULT_DEVICES, ...(input.oci.linux?.devices ?? []).map((device) => device.path)];
  for (const device of new Set(devices)) mounts.push([device, device]);
  return mounts;
}

/** The helper's `criu-dump` arguments (native/criu-rpc.h). */
export async function criuDumpArgs(input: CriuDumpInput): Promise<string[]> {
  const mounts = await externalMounts(input);
  for (const [key, value] of mounts) {
    if (/[;=\t\n\0]/.test(key) || /[;=\t\n\0]/.test(value)) throw new Error(`a mount path CRIU's request cannot carry: ${JSON.stringify(key)}`);
  }
  const args = [
    "--criu", input.criu,
    "--netns", input.netnsPath,
    "--pid", String(input.pid),
    "--images", input.imagesDir,
    "--work", input.workDir,
    "--root", input.root,
    "--freeze-cgroup", input.freezerCgroup,
    "--config", input.configFile,
    "--ext-mnts", mounts.map(([key, value]) => `${key}=${value}`).join(";"),
    "--leave-running", input.leaveRunning ? "1" : "0",
  ];
  for (const [name, value] of Object.entries(input.env)) if (value !== undefined) args.push("--env", `${name}=${value}`);
  return args;
}

/** runc's descriptors.json for a detached sandbox (stdio on /dev/null), which `runc restore` reads. */
export const DETACHED_DESCRIPTORS = JSON.stringify(["/dev/null", "/dev/null", "/dev/null"]);
