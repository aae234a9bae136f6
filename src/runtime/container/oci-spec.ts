import { SANDBOX_UID_COUNT, type SandboxSpec } from "../types.js";
import { KIT_BOOT_ID_SOURCE, KIT_MOUNT_POINT, kernelNodeCommand } from "./agent-kit.js";
import { MACHINE_ID_PATH } from "./boot-identity.js";
import { buildSeccompProfile } from "./seccomp-profile.js";

/** The capabilities a sandbox's root keeps: Docker's default set. */
export const SANDBOX_CAPABILITIES: readonly string[] = [
  "CAP_CHOWN",
  "CAP_DAC_OVERRIDE",
  "CAP_FSETID",
  "CAP_FOWNER",
  "CAP_MKNOD",
  "CAP_NET_RAW",
  "CAP_SETGID",
  "CAP_SETUID",
  "CAP_SETFCAP",
  "CAP_SETPCAP",
  "CAP_NET_BIND_SERVICE",
  "CAP_SYS_CHROOT",
  "CAP_KILL",
  "CAP_AUDIT_WRITE",
];

/** /proc and /sys entries hidden (bind of /dev/null or an empty tmpfs), as Docker does. */
export const MASKED_PATHS: readonly string[] = [
  "/proc/acpi",
  "/proc/asound",
  "/proc/interrupts",
  "/proc/kcore",
  "/proc/keys",
  "/proc/latency_stats",
  "/proc/timer_list",
  "/proc/timer_stats",
  "/proc/sched_debug",
  "/proc/scsi",
  "/sys/firmware",
  "/sys/devices/virtual/powercap",
];

/**
 * What the sandbox's first program, sandbox-boot, needs for its own steps (a time namespace,
 * the boot id mount, BOOT_IDENTITY_NOTE) and drops before it execs the init: no process of the
 * sandbox keeps them, in any set.
 */
export const BOOT_CAPABILITIES: readonly string[] = ["CAP_SYS_ADMIN", "CAP_SYS_TIME"];

export const READONLY_PATHS: readonly string[] = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

export const CPU_PERIOD_USEC = 100_000;
/**
 * `linux.resources.cpu.shares` of a background start (BACKGROUND_START_NOTE): v1's minimum; runc
 * 1.1 writes it to cpu.shares on v1 and converts it to cpu.weight 1 (the minimum) on v2.
 */
export const BACKGROUND_CPU_SHARES = 2;

export interface OciSpecInput {
  spec: SandboxSpec;
  /** The agent's argv inside the sandbox. */
  agentCommand: string[];
  /** Host directory bind-mounted read-only at /.cubicle. */
  kitDir: string;
  /** `linux.cgroupsPath` (cgroupfs driver, absolute), e.g. /cubicle/<id>. */
  cgroupsPath: string;
  /** Put a swap limit equal to the memory limit (no swap) when the host can account swap. */
  limitSwap: boolean;
  /**
   * How /sys is provided. "sysfs" needs the netns to be owned by the sandbox's user namespace;
   * with a netns made by the host, the kernel refuses sysfs there (see container-runtime.ts).
   */
  sysfs: "sysfs" | "empty";
  /** Host directory bound read-only at /sys when `sysfs` is "empty". */
  emptyDir: string;
  /** CRIU config file runc hands to CRIU on checkpoint and restore (see criu.ts). */
  criuConfigFile: string;
  /**
   * Host files with the sandbox's own ids (BOOT_IDENTITY_NOTE), bound read-only: the machine id
   * at /etc/machine-id, the boot id in the kit for sandbox-boot (`agentCommand` starts with it).
   */
  identityFiles: { machineId: string; bootId: string };
  /** First host uid (and gid) of the sandbox's own range: root inside is this uid outside. */
  uidBase: number;
  /**
   * The sandbox's user namespace, made and pinned beforehand (owned by `uidBase`,
   * USERNS_OWNER_NOTE): runc joins it. Absent for a CRIU restore, which makes its own.
   */
  usernsPath?: string;
  /** Volumes: the idmapped binds the helper made in the bundle (VOLUME_BINDS_NOTE) and where they go. */
  volumeBinds?: readonly { source: string; target: string }[];
}

/** config.json annotations that let a checkpoint find what the sandbox was made from. */
export const ANNOTATION_TEMPLATE_ID = "dev.cubicle.template-id";
export const ANNOTATION_ROOTFS_DIR = "dev.cubicle.rootfs-dir";
/**
 * The sandbox's netns. config.json names no network namespace: runc runs inside this one
 * (RUNC_NETNS_NOTE in runc.ts) and the container shares it.
 */
export const ANNOTATION_NETNS_PATH = "dev.cubicle.netns-path";

/** Builds the OCI runtime config (config.json) for a sandbox; root.path is `rootfs` in the bundle. */
export function buildOciSpec(input: OciSpecInput): Record<string, unknown> {
  const { spec } = input;
  const { resources, template } = spec;
  const memoryBytes = Math.max(16, Math.floor(resources.memoryMiB)) * 1024 * 1024;
  const env = {
    PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    HOME: "/root",
    ...template.env,
    CUBICLE_AGENT: "1",
    // tini is PID 1; the agent may still set the sandbox's hostname (its own UTS namespace).
    CUBICLE_AGENT_SET_HOSTNAME: "1",
    // How to start Node inside the sandbox (through the kit's loader), for the JS kernels.
    CUBICLE_AGENT_NODE_COMMAND: JSON.stringify(kernelNodeCommand(input.agentCommand)),
    CUBICLE_SANDBOX_ID: spec.sandboxId,
    // The agent gives commands the template's environment (not the rest of its own).
    CUBICLE_TEMPLATE_ENV: JSON.stringify(template.env),
  };
  // sandbox-boot drops BOOT_CAPABILITIES before it execs the init.
  const caps = [...SANDBOX_CAPABILITIES, ...BOOT_CAPABILITIES];
  const idMap = [{ containerID: 0, hostID: input.uidBase, size: SANDBOX_UID_COUNT }];
  const sysMount =
    input.sysfs === "sysfs"
      ? { destination: "/sys", type: "sysfs", source: "sysfs", options: ["nosuid", "noexec", "nodev", "ro"] }
      : { destination: "/sys", type: "bind", source: input.emptyDir, options: ["bind", "ro", "nosuid", "noexec", "nodev"] };
  return {
    ociVersion: "1.0.2",
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: input.agentCommand,
      env: Object.entries(env).map(([key, value]) => `${key}=${value}`),
      cwd: "/",
      capabilities: { bounding: caps, effective: caps, permitted: caps },
      // No rlimits: runc sets them on the container's init from outside (prlimit), which needs
      // CAP_SYS_RESOURCE over the sandbox's user namespace, and host root lacks it on hosts that
      // drop it from the bounding set. The agent inherits runc's limits; Node raises its own
      // soft RLIMIT_NOFILE to the hard one at startup.
      // Off so that `sudo` (setuid) works for the template's `user`, as on E2B. Root inside is
      // an unprivileged uid of its own on the host, so a setuid binary gains nothing outside.
      noNewPrivileges: false,
    },
    root: { path: "rootfs", readonly: false },
    hostname: spec.hostname,
    annotations: {
      // runc 1.1 passes this file to CRIU (CRIU options runc has no flag for).
      "org.criu.config": input.criuConfigFile,
      [ANNOTATION_TEMPLATE_ID]: template.templateId,
      [ANNOTATION_ROOTFS_DIR]: template.rootfsDir,
      [ANNOTATION_NETNS_PATH]: spec.network.netnsPath,
    },
    mounts: [
      { destination: "/proc", type: "proc", source: "proc", options: ["nosuid", "noexec", "nodev"] },
      { destination: "/dev", type: "tmpfs", source: "tmpfs", options: ["nosuid", "strictatime", "mode=755", "size=65536k"] },
      { destination: "/dev/pts", type: "devpts", source: "devpts", options: ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
      { destination: "/dev/shm", type: "tmpfs", source: "shm", options: ["nosuid", "noexec", "nodev", "mode=1777", `size=${memoryBytes}`] },
      { destination: "/dev/mqueue", type: "mqueue", source: "mqueue", options: ["nosuid", "noexec", "nodev"] },
      sysMount,
      { destination: KIT_MOUNT_POINT, type: "bind", source: input.kitDir, options: ["bind", "ro", "nosuid", "nodev"] },
      // After the kit: the mount point is the kit's empty file.
      { destination: KIT_BOOT_ID_SOURCE, type: "bind", source: input.identityFiles.bootId, options: ["bind", "ro", "nosuid", "nodev", "noexec"] },
      { destination: MACHINE_ID_PATH, type: "bind", source: input.identityFiles.machineId, options: ["bind", "ro", "nosuid", "nodev", "noexec"] },
      // runc makes each mount point inside the root as the sandbox's root, never following a
      // symlink out of it, and marks these binds external in its checkpoints.
      ...(input.volumeBinds ?? []).map((bind) => ({ destination: bind.target, type: "bind", source: bind.source, options: ["bind", "rw", "nosuid", "nodev"] })),
    ],
    linux: {
      uidMappings: idMap,
      gidMappings: idMap,
      namespaces: [
        { type: "pid" },
        { type: "ipc" },
        { type: "uts" },
        { type: "mount" },
        { type: "cgroup" },
        input.usernsPath ? { type: "user", path: input.usernsPath } : { type: "user" },
      ],
      cgroupsPath: input.cgroupsPath,
      resources: {
        // Deny every device node; runc adds its default allow-list (null, zero, full, random,
        // urandom, tty, ptmx, pts) on top.
        devices: [{ allow: false, access: "rwm" }],
        memory: { limit: memoryBytes, ...(input.limitSwap ? { swap: memoryBytes } : {}) },
        // No shares otherwise: the cgroup keeps the kernel's default weight (NORMAL_CPU_WEIGHT).
        cpu: {
          quota: Math.max(1, Math.round(resources.cpuCount * CPU_PERIOD_USEC)),
          period: CPU_PERIOD_USEC,
          ...(spec.background ? { shares: BACKGROUND_CPU_SHARES } : {}),
        },
        pids: { limit: Math.max(16, resources.pidsLimit) },
      },
      maskedPaths: [...MASKED_PATHS],
      readonlyPaths: [...READONLY_PATHS],
      seccomp: buildSeccompProfile(),
    },
  };
}
