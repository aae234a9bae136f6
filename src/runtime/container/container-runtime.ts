import { chmod, chown, lstat, mkdir, readdir, readFile, rm, stat, statfs, writeFile } from "node:fs/promises";
import path from "node:path";
import type { CubicleConfig } from "../../shared/config.js";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { createLogger } from "../../shared/log.js";
import { SANDBOX_UID_BASE, type CheckpointInfo, type CheckpointOptions, type Runtime, type RuntimeState, type SandboxSpec, type SandboxStats } from "../types.js";
import { assembleAgentKit, findNativePackages, type AgentKit } from "./agent-kit.js";
import { cgroupDirectories, detectCgroupLayout, readCgroupUsage, removeCgroupDirectories, supportsSwapLimit, type CgroupLayout } from "./cgroups.js";
import { buildOciSpec, CPU_PERIOD_USEC } from "./oci-spec.js";
import { Runc } from "./runc.js";

const log = createLogger("container");

/** runc container ids are this plus the sandbox id. */
export const CONTAINER_PREFIX = "cubicle-";

export interface ContainerRuntimeOptions {
  /** The agent bundle to inject; default `<distDir>/agent/agent.js`. */
  agentScript?: string;
  /** The Node binary to inject; default the server's own. */
  nodeBinary?: string;
  /**
   * How /sys is provided inside sandboxes (see `SYS_MOUNT_NOTE`). Default "tmpfs".
   */
  sysfs?: "sysfs" | "tmpfs";
}

/** Timings of the last create, for benchmarks and the debug log. */
export interface CreateTimings {
  prepareMs: number;
  mountMs: number;
  configMs: number;
  runcMs: number;
  totalMs: number;
}

/**
 * Why /sys is an empty read-only tmpfs by default: mounting sysfs requires CAP_SYS_ADMIN over
 * the user namespace that owns the *network* namespace (sysfs shows that netns's devices). The
 * sandbox joins a netns that Cubicle made in the host user namespace, so the kernel refuses
 * sysfs there (EPERM), and a bind of the host's /sys would show host devices and is not
 * something CRIU can restore into another host path. An empty /sys keeps the container
 * checkpointable; programs that need it (lscpu, udev) do not work.
 */
export const SYS_MOUNT_NOTE = "sysfs needs the netns to be owned by the sandbox's user namespace";

interface SandboxFacts {
  cpuCount: number;
  memoryBytes: number;
  diskBytes: number;
}

interface CpuSample {
  usageUsec: number;
  atMs: number;
}

/**
 * The container runtime: runc with a user namespace (root → SANDBOX_UID_BASE), an overlayfs
 * root (template rootfs read-only below, a per-sandbox upper layer), the pre-made netns joined
 * by path, and the agent started from the read-only kit at /.cubicle.
 */
export class ContainerRuntime implements Runtime {
  readonly name = "container" as const;
  /** Phase timings of the most recent successful create. */
  lastCreateTimings: CreateTimings | undefined;

  private readonly runc: Runc;
  private readonly sandboxesDir: string;
  private readonly kitDir: string;
  private kit: AgentKit | undefined;
  private cgroups: CgroupLayout | undefined;
  private limitSwap = false;
  private openFilesLimit = 1024;
  private readonly facts = new Map<string, SandboxFacts>();
  private readonly cpuSamples = new Map<string, CpuSample>();

  constructor(
    private readonly config: Pick<CubicleConfig, "stateDir" | "distDir" | "runcPath">,
    private readonly options: ContainerRuntimeOptions = {},
  ) {
    this.runc = new Runc(config.runcPath);
    this.sandboxesDir = path.join(config.stateDir, "sandboxes");
    this.kitDir = path.join(config.stateDir, "kit");
  }

  async init(): Promise<void> {
    await mkdir(this.sandboxesDir, { recursive: true, mode: 0o711 });
    // The sandbox's root (an unprivileged uid on the host) must traverse the state dir to reach
    // its bundle and the kit: give "others" search (x) permission, never read.
    for (const dir of [this.config.stateDir, this.sandboxesDir]) {
      const info = await stat(dir);
      if ((info.mode & 0o001) === 0) await chmod(dir, (info.mode & 0o7777) | 0o011);
    }
    this.kit = await assembleAgentKit(this.kitDir, {
      nodeBinary: this.options.nodeBinary ?? process.execPath,
      agentScript: this.options.agentScript ?? path.join(this.config.distDir, "agent", "agent.js"),
      nativePackages: findNativePackages(),
    });
    this.cgroups = await detectCgroupLayout();
    this.limitSwap = await supportsSwapLimit(this.cgroups);
    this.openFilesLimit = await readOpenFilesHardLimit();
    log.info("container runtime ready", { cgroupVersion: this.cgroups.version, limitSwap: this.limitSwap, sys: this.options.sysfs ?? "tmpfs" });
  }

  async create(spec: SandboxSpec): Promise<void> {
    const kit = this.kit;
    if (!kit) throw new CubicleError("failed_precondition", "the container runtime is not initialised; call init() first");
    const id = checkId(spec.sandboxId);
    const paths = this.paths(id);
    const started = performance.now();
    try {
      await checkOverlayPath(spec.template.rootfsDir);
      const lower = await stat(spec.template.rootfsDir);
      await mkdir(paths.dir, { mode: 0o711 });
      await Promise.all([mkdir(paths.upper), mkdir(paths.work), mkdir(paths.rootfs)]);
      // The merged root takes the upper dir's owner and mode: make it the lower root's.
      await Promise.all([
        chown(paths.upper, lower.uid, lower.gid).then(() => chmod(paths.upper, lower.mode & 0o7777)),
        chown(paths.work, SANDBOX_UID_BASE, SANDBOX_UID_BASE),
      ]);
      const prepared = performance.now();

      await runCommand(
        ["mount", "-t", "overlay", "overlay", "-o", `lowerdir=${spec.template.rootfsDir},upperdir=${paths.upper},workdir=${paths.work}`, paths.rootfs],
        { timeoutMs: 15_000 },
      );
      const mounted = performance.now();

      const ociSpec = buildOciSpec({
        spec,
        agentCommand: kit.command,
        kitDir: kit.dir,
        cgroupsPath: cgroupsPathOf(id),
        limitSwap: this.limitSwap,
        sysfs: this.options.sysfs ?? "tmpfs",
        openFilesLimit: this.openFilesLimit,
      });
      await writeFile(paths.config, JSON.stringify(ociSpec));
      const configured = performance.now();

      await this.runc.runDetached(CONTAINER_PREFIX + id, paths.dir, paths.runcLog);
      const ran = performance.now();
      this.facts.set(id, {
        cpuCount: spec.resources.cpuCount,
        memoryBytes: spec.resources.memoryMiB * 1024 * 1024,
        diskBytes: spec.resources.diskMiB * 1024 * 1024,
      });
      this.lastCreateTimings = {
        prepareMs: round(prepared - started),
        mountMs: round(mounted - prepared),
        configMs: round(configured - mounted),
        runcMs: round(ran - configured),
        totalMs: round(ran - started),
      };
      log.debug("created", { sandboxId: id, ...this.lastCreateTimings });
    } catch (err) {
      const error = CubicleError.from(err);
      if (error.code === "already_exists") throw new CubicleError("already_exists", `sandbox ${id} already exists on this host`, { cause: err });
      await this.destroy(id).catch((cleanupErr) => log.warn("cleanup after failed create failed", { sandboxId: id, error: String(cleanupErr) }));
      throw error;
    }
  }

  async destroy(sandboxId: string): Promise<void> {
    const id = checkId(sandboxId);
    const paths = this.paths(id);
    const containerId = CONTAINER_PREFIX + id;
    const container = await this.runc.state(containerId);
    if (container && this.owns(container.bundle)) {
      await this.runc.kill(container);
      await this.runc.delete(containerId, false).catch(() => this.runc.delete(containerId, true));
    } else if (container) {
      log.warn("a container with this sandbox's id belongs to another state dir; leaving it", { containerId, bundle: container.bundle });
    }
    for (const mountPoint of await mountsUnder(paths.dir)) {
      const result = await runCommand(["umount", mountPoint], { timeoutMs: 15_000, allowFailure: true });
      if (result.exitCode !== 0) {
        log.warn("umount failed, detaching lazily", { mountPoint, stderr: result.stderr.trim() });
        await runCommand(["umount", "--lazy", mountPoint], { timeoutMs: 15_000 });
      }
    }
    await rm(paths.dir, { recursive: true, force: true });
    if (this.cgroups) {
      const left = await removeCgroupDirectories(this.cgroups, cgroupsPathOf(id));
      if (left.length > 0) throw new CubicleError("internal", `cgroups of sandbox ${id} are still in use: ${left.join(", ")}`);
    }
    this.facts.delete(id);
    this.cpuSamples.delete(id);
  }

  async state(sandboxId: string): Promise<RuntimeState> {
    const container = await this.runc.state(CONTAINER_PREFIX + checkId(sandboxId));
    if (!container || !this.owns(container.bundle)) return "missing";
    switch (container.status) {
      case "running":
        return "running";
      case "paused":
        return "frozen";
      default:
        return "stopped";
    }
  }

  async list(): Promise<string[]> {
    const ids = new Set<string>();
    for (const container of await this.runc.list()) {
      if (container.id.startsWith(CONTAINER_PREFIX) && this.owns(container.bundle)) ids.add(container.id.slice(CONTAINER_PREFIX.length));
    }
    // Half-made or half-destroyed sandboxes have a directory (maybe a mount) but no container.
    for (const entry of await readdir(this.sandboxesDir).catch(() => [] as string[])) ids.add(entry);
    return [...ids].sort();
  }

  async freeze(sandboxId: string): Promise<void> {
    await this.runc.pause(CONTAINER_PREFIX + checkId(sandboxId)).catch((err) => {
      throw mapMissing(err, sandboxId);
    });
  }

  async thaw(sandboxId: string): Promise<void> {
    await this.runc.resume(CONTAINER_PREFIX + checkId(sandboxId)).catch((err) => {
      throw mapMissing(err, sandboxId);
    });
  }

  async checkpoint(sandboxId: string, _imageDir: string, _options: CheckpointOptions): Promise<CheckpointInfo> {
    throw new CubicleError("unimplemented", `checkpoints are not available yet (sandbox ${sandboxId})`);
  }

  async restore(spec: SandboxSpec, _imageDir: string): Promise<void> {
    throw new CubicleError("unimplemented", `restoring sandboxes is not available yet (sandbox ${spec.sandboxId})`);
  }

  async stats(sandboxId: string): Promise<SandboxStats> {
    const id = checkId(sandboxId);
    const layout = this.cgroups ?? (this.cgroups = await detectCgroupLayout());
    const paths = this.paths(id);
    const facts = this.facts.get(id) ?? (await this.readFacts(id));
    const usage = await readCgroupUsage(layout, cgroupsPathOf(id)).catch((err) => {
      throw new CubicleError("not_found", `sandbox ${id} is not running on this host`, { cause: err });
    });
    const nowMs = Date.now();
    const previous = this.cpuSamples.get(id) ?? { usageUsec: 0, atMs: (await stat(paths.config)).mtimeMs };
    this.cpuSamples.set(id, { usageUsec: usage.cpuUsageUsec, atMs: nowMs });
    const wallUsec = Math.max(1, (nowMs - previous.atMs) * 1000);
    const cpuUsedPct = Math.min(100, Math.max(0, ((usage.cpuUsageUsec - previous.usageUsec) / (wallUsec * facts.cpuCount)) * 100));
    const diskUsedBytes = await treeBytes(paths.upper);
    const diskTotalBytes = facts.diskBytes > 0 ? facts.diskBytes : await statfs(paths.upper).then((s) => s.blocks * s.bsize, () => 0);
    return {
      cpuUsedPct: Math.round(cpuUsedPct * 100) / 100,
      cpuCount: facts.cpuCount,
      memUsedBytes: usage.memoryUsedBytes,
      memTotalBytes: usage.memoryLimitBytes ?? facts.memoryBytes,
      memCacheBytes: usage.memoryCacheBytes,
      diskUsedBytes,
      diskTotalBytes,
    };
  }

  /** Cgroup directories a sandbox has (for leak checks). */
  cgroupDirectories(sandboxId: string): string[] {
    return this.cgroups ? cgroupDirectories(this.cgroups, cgroupsPathOf(checkId(sandboxId))) : [];
  }

  /** The bundle directory of a sandbox (config.json, upper/, work/, rootfs/). */
  bundleDir(sandboxId: string): string {
    return this.paths(checkId(sandboxId)).dir;
  }

  private paths(id: string) {
    const dir = path.join(this.sandboxesDir, id);
    return {
      dir,
      upper: path.join(dir, "upper"),
      work: path.join(dir, "work"),
      rootfs: path.join(dir, "rootfs"),
      config: path.join(dir, "config.json"),
      runcLog: path.join(dir, "runc.log"),
    };
  }

  private owns(bundle: string): boolean {
    return path.dirname(bundle) === this.sandboxesDir;
  }

  /** After a restart: recover what stats needs from the bundle's config.json. */
  private async readFacts(id: string): Promise<SandboxFacts> {
    const text = await readFile(this.paths(id).config, "utf8").catch((err) => {
      throw new CubicleError("not_found", `sandbox ${id} does not exist on this host`, { cause: err });
    });
    const oci = JSON.parse(text) as { linux?: { resources?: { cpu?: { quota?: number }; memory?: { limit?: number } } } };
    const facts: SandboxFacts = {
      cpuCount: (oci.linux?.resources?.cpu?.quota ?? CPU_PERIOD_USEC) / CPU_PERIOD_USEC,
      memoryBytes: oci.linux?.resources?.memory?.limit ?? 0,
      diskBytes: 0,
    };
    this.facts.set(id, facts);
    return facts;
  }
}

/** The runc `linux.cgroupsPath` of a sandbox (cgroupfs driver). */
export function cgroupsPathOf(sandboxId: string): string {
  return `/cubicle/${sandboxId}`;
}

function checkId(sandboxId: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$/.test(sandboxId)) {
    throw new CubicleError("invalid_argument", `sandbox id ${JSON.stringify(sandboxId)} must be 1–63 letters, digits, _ or -`);
  }
  return sandboxId;
}

/** overlayfs options are comma- and colon-separated: such paths cannot be passed. */
async function checkOverlayPath(dir: string): Promise<void> {
  if (/[,:\\\s]/.test(dir)) throw new CubicleError("invalid_argument", `template rootfs path ${dir} must not contain commas, colons, backslashes or spaces`);
  const info = await stat(dir).catch((err) => {
    throw new CubicleError("not_found", `template rootfs ${dir} does not exist; rebuild the template`, { cause: err });
  });
  if (!info.isDirectory()) throw new CubicleError("failed_precondition", `template rootfs ${dir} is not a directory`);
}

/** Mount points at or below `dir`, deepest first, from this process's mountinfo. */
async function mountsUnder(dir: string): Promise<string[]> {
  const mountinfo = await readFile("/proc/self/mountinfo", "utf8");
  const found: string[] = [];
  for (const line of mountinfo.split("\n")) {
    const mountPoint = line.split(" ")[4];
    if (!mountPoint) continue;
    const decoded = mountPoint.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
    if (decoded === dir || decoded.startsWith(dir + "/")) found.push(decoded);
  }
  return found.sort((a, b) => b.length - a.length);
}

/** Allocated bytes of a tree (like `du -s`); the upper layer holds only what the sandbox changed. */
async function treeBytes(root: string): Promise<number> {
  let total = 0;
  const walk = async (dir: string): Promise<void> => {
    const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
    await Promise.all(
      entries.map(async (entry) => {
        const full = path.join(dir, entry.name);
        const info = await lstat(full).catch(() => undefined);
        if (info) total += info.blocks * 512;
        if (entry.isDirectory()) await walk(full);
      }),
    );
  };
  await walk(root);
  return total;
}

/** The hard RLIMIT_NOFILE of this process (children such as runc inherit it). */
async function readOpenFilesHardLimit(): Promise<number> {
  const limits = await readFile("/proc/self/limits", "utf8").catch(() => "");
  const match = /^Max open files\s+\S+\s+(\S+)/m.exec(limits);
  const hard = match?.[1] === "unlimited" ? 1_048_576 : Number(match?.[1]);
  return Number.isFinite(hard) && hard > 0 ? Math.min(hard, 1_048_576) : 1024;
}

function mapMissing(err: unknown, sandboxId: string): CubicleError {
  const error = CubicleError.from(err);
  return /does not exist|not found/i.test(error.message) ? new CubicleError("not_found", `sandbox ${sandboxId} is not running on this host`, { cause: err }) : error;
}

function round(ms: number): number {
  return Math.round(ms * 10) / 10;
}
