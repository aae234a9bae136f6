import { createHash } from "node:crypto";
import { chmod, chown, mkdir, readdir, readFile, rename, rm, stat, statfs, writeFile } from "node:fs/promises";
import path from "node:path";
import type { CubicleConfig } from "../../shared/config.js";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { pathExists } from "../../shared/fs.js";
import { createLogger } from "../../shared/log.js";
import { SANDBOX_UID_BASE, type CheckpointInfo, type CheckpointOptions, type RestoreOptions, type Runtime, type RuntimeState, type SandboxSpec, type SandboxStats } from "../types.js";
import { assembleAgentKit, findNativePackages, type AgentKit } from "./agent-kit.js";
import { copyTree, imageLayout, PARTIAL_IMAGE_MARKER, readMeta, treeBytes, writeMeta, type CheckpointMeta } from "./checkpoint-image.js";
import { cgroupDirectories, detectCgroupLayout, readCgroupUsage, removeCgroupDirectories, supportsSwapLimit, type CgroupLayout } from "./cgroups.js";
import { criuFrontEnv, criuLogTail, ensureCriuKdatCache, findCriu, installCriuForRunc, tarShimEnv, writeCriuConfig, writeTarShim } from "./criu.js";
import { ANNOTATION_ROOTFS_DIR, ANNOTATION_TEMPLATE_ID, buildOciSpec, CPU_PERIOD_USEC } from "./oci-spec.js";
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
   * How /sys is provided inside sandboxes (see `SYS_MOUNT_NOTE`). Default "empty".
   */
  sysfs?: "sysfs" | "empty";
  /** CRIU binary for checkpoint/restore; default the one scripts/setup-host.sh recorded (see criu.ts). */
  criuPath?: string;
}

/**
 * Version of the sandbox's mount layout (config.json). A memory image names every mount, so one
 * made under another layout cannot be restored: the version is part of memoryImageFingerprint,
 * and a template's warm snapshot is remade when it changes. 2: /sys became a bind, not a tmpfs.
 */
const SANDBOX_LAYOUT_VERSION = 2;

/** Copying an upper layer or dumping memory may take long for big sandboxes. */
const CHECKPOINT_TIMEOUT_MS = 10 * 60_000;

/** Timings of the last create, for benchmarks and the debug log. */
export interface CreateTimings {
  prepareMs: number;
  mountMs: number;
  configMs: number;
  runcMs: number;
  totalMs: number;
}

/**
 * Why /sys is empty by default: mounting sysfs requires CAP_SYS_ADMIN over the user namespace
 * that owns the *network* namespace (sysfs shows that netns's devices). The sandbox joins a
 * netns that Cubicle made in the host user namespace, so the kernel refuses sysfs there
 * (EPERM), and a bind of the host's /sys would show host devices. An empty /sys keeps the
 * container checkpointable; programs that need it (lscpu, udev) do not work. It is a read-only
 * bind of one empty host directory, not a tmpfs: CRIU archives every tmpfs with a `tar` run
 * (~4 ms per dump and per restore), while a bind is an external mount it only names.
 */
export const SYS_MOUNT_NOTE = "sysfs needs the netns to be owned by the sandbox's user namespace";

interface SandboxFacts {
  cpuCount: number;
  memoryBytes: number;
  diskBytes: number;
}

/** The parts of a bundle's config.json a checkpoint reads back. */
interface OciConfigFacts {
  hostname?: string;
  annotations?: Record<string, string>;
  linux?: { namespaces?: { type: string; path?: string }[] };
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
  /** Per-sandbox queue: a checkpoint and a restore of one sandbox never overlap. */
  private readonly busy = new Map<string, Promise<unknown>>();
  private readonly criuConfigFile: string;
  /** PATH entry holding the tar shim CRIU runs (see criu.ts). */
  private readonly criuBinDir: string;
  /** An empty directory owned by the sandboxes' root, bound read-only at /sys (SYS_MOUNT_NOTE). */
  private readonly emptyDir: string;
  /** Ready copies of image upper layers (RestoreOptions.keepSpareUpper), by image upper path. */
  private readonly spareUppersDir: string;
  private readonly spareUppers = new Map<string, string>();
  private readonly makingSpares = new Set<string>();
  private criuPath: string | undefined;
  private runcCriu: Promise<string> | undefined;
  private hostTar = "/usr/bin/tar";
  private kitFingerprint: string | undefined;
  private partialCounter = 0;

  constructor(
    private readonly config: Pick<CubicleConfig, "stateDir" | "distDir" | "runcPath">,
    private readonly options: ContainerRuntimeOptions = {},
  ) {
    this.runc = new Runc(config.runcPath);
    this.sandboxesDir = path.join(config.stateDir, "sandboxes");
    this.kitDir = path.join(config.stateDir, "kit");
    this.criuConfigFile = path.join(config.stateDir, "criu-runc.conf");
    this.criuBinDir = path.join(config.stateDir, "criu-bin");
    this.emptyDir = path.join(config.stateDir, "empty");
    this.spareUppersDir = path.join(config.stateDir, "spare-uppers");
  }

  async init(): Promise<void> {
    await mkdir(this.sandboxesDir, { recursive: true, mode: 0o711 });
    // Spare copies of a previous process are not known to this one: start empty.
    await rm(this.spareUppersDir, { recursive: true, force: true });
    await mkdir(this.spareUppersDir, { mode: 0o700 });
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
      runAs: path.join(this.config.distDir, "agent", "run-as"),
    });
    this.kitFingerprint = await readFile(path.join(this.kit.dir, "manifest.json")).then(
      (text) => createHash("sha256").update(text).update(`layout ${SANDBOX_LAYOUT_VERSION}`).digest("hex").slice(0, 16),
      () => undefined,
    );
    await mkdir(this.emptyDir, { recursive: true });
    await chown(this.emptyDir, SANDBOX_UID_BASE, SANDBOX_UID_BASE);
    await chmod(this.emptyDir, 0o555);
    await writeCriuConfig(this.criuConfigFile);
    this.hostTar = await findHostTar();
    await writeTarShim(this.criuBinDir, this.hostTar, path.join(this.config.distDir, "tar-shim"));
    await this.prepareCriuCache();
    this.cgroups = await detectCgroupLayout();
    this.limitSwap = await supportsSwapLimit(this.cgroups);
    this.openFilesLimit = await readOpenFilesHardLimit();
    await raiseKeyQuota();
    log.info("container runtime ready", { cgroupVersion: this.cgroups.version, limitSwap: this.limitSwap, sys: this.options.sysfs ?? "empty" });
  }

  async create(spec: SandboxSpec): Promise<void> {
    const id = checkId(spec.sandboxId);
    const started = performance.now();
    try {
      const timings = await this.prepareBundle(spec, undefined);
      await spec.networkReady;
      await this.runc.runDetached(CONTAINER_PREFIX + id, this.paths(id).dir, this.paths(id).runcLog);
      const ran = performance.now();
      this.rememberFacts(spec);
      this.lastCreateTimings = { ...timings, runcMs: round(ran - started - timings.totalMs), totalMs: round(ran - started) };
      log.debug("created", { sandboxId: id, ...this.lastCreateTimings });
    } catch (err) {
      await settled(spec.networkReady);
      const error = CubicleError.from(err);
      if (error.code === "already_exists") throw new CubicleError("already_exists", `sandbox ${id} already exists on this host`, { cause: err });
      await this.destroy(id).catch((cleanupErr) => log.warn("cleanup after failed create failed", { sandboxId: id, error: String(cleanupErr) }));
      throw error;
    }
  }

  /**
   * Makes the bundle: the upper layer (empty, or a copy of `upperSource` from an image), the
   * overlay mount and config.json. Fails with already_exists when the directory exists.
   */
  private async prepareBundle(spec: SandboxSpec, upperSource: string | undefined): Promise<Omit<CreateTimings, "runcMs">> {
    const kit = this.kit;
    if (!kit) throw new CubicleError("failed_precondition", "the container runtime is not initialised; call init() first");
    const id = spec.sandboxId;
    const paths = this.paths(id);
    const started = performance.now();
    await checkOverlayPath(spec.template.rootfsDir);
    const lower = await stat(spec.template.rootfsDir);
    await mkdir(paths.dir, { mode: 0o711 });
    await Promise.all([mkdir(paths.work), mkdir(paths.rootfs)]);
    if (upperSource) {
      // An image's upper layer already has the owner and mode of the root it was made for.
      const spare = this.spareUppers.get(upperSource);
      this.spareUppers.delete(upperSource);
      const renamed = spare ? await rename(spare, paths.upper).then(() => true, () => false) : false;
      if (!renamed) await copyTree(upperSource, paths.upper, CHECKPOINT_TIMEOUT_MS);
    } else {
      await mkdir(paths.upper);
      // The merged root takes the upper dir's owner and mode: make it the lower root's.
      await chown(paths.upper, lower.uid, lower.gid).then(() => chmod(paths.upper, lower.mode & 0o7777));
    }
    await chown(paths.work, SANDBOX_UID_BASE, SANDBOX_UID_BASE);
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
      sysfs: this.options.sysfs ?? "empty",
      emptyDir: this.emptyDir,
      openFilesLimit: this.openFilesLimit,
      criuConfigFile: this.criuConfigFile,
    });
    await writeFile(paths.config, JSON.stringify(ociSpec));
    const configured = performance.now();
    return {
      prepareMs: round(prepared - started),
      mountMs: round(mounted - prepared),
      configMs: round(configured - mounted),
      totalMs: round(configured - started),
    };
  }

  private rememberFacts(spec: SandboxSpec): void {
    this.facts.set(spec.sandboxId, {
      cpuCount: spec.resources.cpuCount,
      memoryBytes: spec.resources.memoryMiB * 1024 * 1024,
      diskBytes: spec.resources.diskMiB * 1024 * 1024,
    });
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
    await this.unmountAll(paths.dir);
    await rm(paths.dir, { recursive: true, force: true });
    if (this.cgroups) {
      const left = await removeCgroupDirectories(this.cgroups, cgroupsPathOf(id));
      if (left.length > 0) throw new CubicleError("internal", `cgroups of sandbox ${id} are still in use: ${left.join(", ")}`);
    }
    this.facts.delete(id);
    this.cpuSamples.delete(id);
  }

  private async unmountAll(dir: string): Promise<void> {
    for (const mountPoint of await mountsUnder(dir)) {
      const result = await runCommand(["umount", mountPoint], { timeoutMs: 15_000, allowFailure: true });
      if (result.exitCode !== 0) {
        log.warn("umount failed, detaching lazily", { mountPoint, stderr: result.stderr.trim() });
        await runCommand(["umount", "--lazy", mountPoint], { timeoutMs: 15_000 });
      }
    }
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

  memoryImageFingerprint(): string | undefined {
    return this.kitFingerprint;
  }

  async freeze(sandboxId: string): Promise<void> {
    await this.runc.pause(CONTAINER_PREFIX + checkId(sandboxId)).catch((err) => {
      throw mapMissing(err, sandboxId);
    });
  }

  /** Thaws (runc.resume writes the cgroup freezer directly: this is the warm-pool claim path). */
  async thaw(sandboxId: string): Promise<void> {
    await this.runc.resume(CONTAINER_PREFIX + checkId(sandboxId)).catch((err) => {
      throw mapMissing(err, sandboxId);
    });
  }

  async setHostname(sandboxId: string, hostname: string): Promise<void> {
    if (!/^[a-zA-Z0-9][a-zA-Z0-9.-]{0,62}$/.test(hostname)) throw new CubicleError("invalid_argument", `"${hostname}" is not a valid hostname`);
    const container = await this.runc.state(CONTAINER_PREFIX + checkId(sandboxId));
    if (!container || container.pid <= 0) throw new CubicleError("not_found", `sandbox ${sandboxId} is not running`);
    // Host root may enter the container's UTS namespace; `hostname` there calls sethostname(2).
    await runCommand(["nsenter", `--target=${container.pid}`, "--uts", "--", "hostname", hostname], { timeoutMs: 5_000 });
  }

  /**
   * See Runtime.checkpoint. The sandbox is frozen (cgroup freezer) while its upper layer is
   * copied and CRIU dumps it, so both describe one instant; CRIU always dumps with
   * `--leave-running`, and a durable pause (`leaveRunning: false`) kills the container only once
   * the image is complete and renamed into place: a failed checkpoint never costs the sandbox.
   * After a durable pause the bundle (upper layer, config.json) stays, unmounted, until
   * destroy(); state() says "missing". A sandbox whose container is gone (after a durable pause)
   * can still be checkpointed without memory. Established TCP connections are not saved (CRIU
   * `tcp-close`, see criu.ts): they come back closed.
   */
  async checkpoint(sandboxId: string, imageDir: string, options: CheckpointOptions): Promise<CheckpointInfo> {
    const id = checkId(sandboxId);
    return this.exclusive(id, () => this.checkpointNow(id, path.resolve(imageDir), options));
  }

  private async checkpointNow(id: string, imageDir: string, options: CheckpointOptions): Promise<CheckpointInfo> {
    const paths = this.paths(id);
    const containerId = CONTAINER_PREFIX + id;
    const found = await this.runc.state(containerId);
    const container = found && this.owns(found.bundle) && (found.status === "running" || found.status === "paused") ? found : undefined;
    if (!container && options.memory) throw new CubicleError("failed_precondition", `sandbox ${id} is not running on this host; only a filesystem checkpoint (memory: false) can be taken of it`);
    if (!container && !(await pathExists(paths.upper))) throw new CubicleError("not_found", `sandbox ${id} does not exist on this host`);
    const oci = await this.readOciConfig(id);
    const criuPath = options.memory ? await this.criuForRunc() : undefined;

    await mkdir(path.dirname(imageDir), { recursive: true });
    if (await pathExists(imageDir)) throw new CubicleError("already_exists", `checkpoint image ${imageDir} already exists; choose a new directory`);
    const partial = `${imageDir}${PARTIAL_IMAGE_MARKER}${process.pid}-${++this.partialCounter}`;
    const layout = imageLayout(partial);
    await mkdir(partial);
    // Host root and the sandboxes' mapped root (group) only: the image holds the sandbox's memory.
    await chown(partial, 0, SANDBOX_UID_BASE);
    await chmod(partial, 0o750);
    await mkdir(layout.log);

    const freezeHere = container?.status === "running";
    let frozenAt = performance.now();
    let thawedAt: number | undefined;
    try {
      if (freezeHere) {
        await this.runc.pause(containerId);
        frozenAt = performance.now();
      }
      await copyTree(paths.upper, layout.upper, CHECKPOINT_TIMEOUT_MS);
      const copied = performance.now();
      if (criuPath) {
        await mkdir(layout.criu);
        const logFile = path.join(layout.log, "runc.log");
        const netnsPath = oci.linux?.namespaces?.find((ns) => ns.type === "network")?.path;
        if (!netnsPath) throw new CubicleError("internal", `sandbox ${id} has no netns path in its config.json`);
        await this.runc.checkpoint(containerId, { criuPath, netnsPath, imagePath: layout.criu, workPath: layout.log, leaveRunning: true, logFile, timeoutMs: CHECKPOINT_TIMEOUT_MS, env: this.criuEnv() }).catch(async (err) => {
          throw await withCriuLog(err, path.join(layout.log, "dump.log"), `checkpoint of sandbox ${id} failed`);
        });
      }
      const dumped = performance.now();
      // A snapshot thaws as soon as the dump is done; a durable pause stays frozen until the
      // image is in place and the container is gone.
      if (freezeHere && options.leaveRunning) {
        await this.runc.resume(containerId);
        thawedAt = performance.now();
      }
      if (criuPath) await shareWithSandboxRoot(layout.criu);
      const meta: CheckpointMeta = {
        version: 1,
        sandboxId: id,
        templateId: oci.annotations?.[ANNOTATION_TEMPLATE_ID] ?? "",
        rootfsDir: oci.annotations?.[ANNOTATION_ROOTFS_DIR] ?? "",
        memory: options.memory,
        hostname: oci.hostname ?? "",
        kitFingerprint: options.memory ? this.kitFingerprint : undefined,
        createdAt: new Date().toISOString(),
        frozenMs: thawedAt === undefined ? 0 : round(thawedAt - frozenAt),
        upperCopyMs: round(copied - frozenAt),
        dumpMs: round(dumped - copied),
        upperBytes: await treeBytes(layout.upper),
        criuBytes: criuPath ? await treeBytes(layout.criu) : 0,
      };
      await writeMeta(partial, meta);
      await rename(partial, imageDir);
      if (!options.leaveRunning && container) {
        await this.stopKeepingBundle(id).catch((err) => {
          throw new CubicleError("internal", `checkpoint image ${imageDir} is complete, but sandbox ${id} could not be stopped: ${CubicleError.from(err).message}`, { cause: err });
        });
        thawedAt = performance.now();
        meta.frozenMs = round(thawedAt - frozenAt);
        await writeMeta(imageDir, meta);
      }
      log.debug("checkpointed", { sandboxId: id, imageDir, ...options, frozenMs: meta.frozenMs, upperCopyMs: meta.upperCopyMs, dumpMs: meta.dumpMs });
      return { sizeBytes: meta.upperBytes + meta.criuBytes, frozenMs: meta.frozenMs, memory: options.memory };
    } catch (err) {
      // The source sandbox must come out of a failed checkpoint running as it went in.
      if (freezeHere && thawedAt === undefined) await this.runc.resume(containerId).catch((thawErr) => log.warn("thaw after failed checkpoint failed", { sandboxId: id, error: String(thawErr) }));
      await rm(partial, { recursive: true, force: true });
      throw CubicleError.from(err);
    }
  }

  /**
   * See Runtime.restore. Always builds the sandbox afresh: whatever is left of `spec.sandboxId`
   * on the host (the bundle kept by a durable pause) is replaced by the image's upper layer, so
   * a rollback gets exactly the snapshot's files. A container that still exists under that id
   * is an error (already_exists): destroy() it first. The image is only read, so one image can
   * feed many concurrent restores, each with its own upper layer, container, cgroup and netns.
   *
   * Restored processes keep what they had in memory: the old hostname (UTS namespace), the
   * environment (CUBICLE_SANDBOX_ID of the source) and closed TCP connections; the caller
   * re-initialises the agent.
   */
  async restore(spec: SandboxSpec, imageDir: string, options: RestoreOptions = {}): Promise<void> {
    try {
      const id = checkId(spec.sandboxId);
      await this.exclusive(id, () => this.restoreNow(spec, path.resolve(imageDir)));
    } catch (err) {
      await settled(spec.networkReady);
      throw err;
    }
    if (options.keepSpareUpper) this.makeSpareUpper(imageLayout(path.resolve(imageDir)).upper);
  }

  /** See RestoreOptions.keepSpareUpper: one ready copy per image, made in the background. */
  private makeSpareUpper(upperSource: string): void {
    if (this.spareUppers.has(upperSource) || this.makingSpares.has(upperSource)) return;
    this.makingSpares.add(upperSource);
    const target = path.join(this.spareUppersDir, String(++this.partialCounter));
    copyTree(upperSource, target, CHECKPOINT_TIMEOUT_MS)
      .then(
        () => void this.spareUppers.set(upperSource, target),
        async (err) => {
          log.warn("copying a spare upper layer failed; the next restore copies it itself", { upperSource, error: String(err) });
          await rm(target, { recursive: true, force: true });
        },
      )
      .finally(() => this.makingSpares.delete(upperSource));
  }

  private async restoreNow(spec: SandboxSpec, imageDir: string): Promise<void> {
    if (!this.kit) throw new CubicleError("failed_precondition", "the container runtime is not initialised; call init() first");
    const id = spec.sandboxId;
    const paths = this.paths(id);
    const layout = imageLayout(imageDir);
    const meta = await readMeta(imageDir);
    if (meta.rootfsDir && meta.rootfsDir !== spec.template.rootfsDir) {
      throw new CubicleError("failed_precondition", `checkpoint image ${imageDir} was made on template rootfs ${meta.rootfsDir}, not ${spec.template.rootfsDir}; restore it with the same template`);
    }
    const criuPath = meta.memory ? await this.criuForRunc() : undefined;
    const existing = await this.runc.state(CONTAINER_PREFIX + id);
    if (existing) throw new CubicleError("already_exists", `sandbox ${id} still has a container (${existing.status}); destroy it before restoring into the same id`);
    if (await pathExists(paths.dir)) await this.destroy(id);

    const started = performance.now();
    try {
      const timings: Record<string, number> = await this.prepareBundle(spec, layout.upper);
      const bundled = performance.now();
      await spec.networkReady;
      timings.networkWaitMs = round(performance.now() - bundled);
      const runcStarted = performance.now();
      if (criuPath) {
        const workPath = path.join(paths.dir, "criu-restore");
        await mkdir(workPath);
        await this.runc.restoreDetached(CONTAINER_PREFIX + id, paths.dir, { criuPath, netnsPath: spec.network.netnsPath, imagePath: layout.criu, workPath, logFile: paths.runcLog, timeoutMs: CHECKPOINT_TIMEOUT_MS, env: this.criuEnv() }).catch(async (err) => {
          const kitChanged = meta.kitFingerprint && this.kitFingerprint && meta.kitFingerprint !== this.kitFingerprint;
          const hint = kitChanged ? " (the agent kit changed since the checkpoint: processes still map the old Node binary; make a new image)" : "";
          throw await withCriuLog(err, path.join(workPath, "restore.log"), `restore of sandbox ${id} from ${imageDir} failed${hint}`);
        });
      } else {
        await this.runc.runDetached(CONTAINER_PREFIX + id, paths.dir, paths.runcLog);
      }
      timings.runcMs = round(performance.now() - runcStarted);
      this.rememberFacts(spec);
      // CRIU brings back the image's UTS namespace with the source's name; the caller's own
      // first step (the agent's /init) runs meanwhile.
      const running = performance.now();
      await allSettledOrThrow([criuPath ? this.setHostname(id, spec.hostname) : undefined, spec.whenRunning?.()]);
      log.debug("restored", { sandboxId: id, imageDir, memory: meta.memory, ...timings, finishingMs: round(performance.now() - running), totalMs: round(performance.now() - started) });
    } catch (err) {
      const error = CubicleError.from(err);
      await this.destroy(id).catch((cleanupErr) => log.warn("cleanup after failed restore failed", { sandboxId: id, error: String(cleanupErr) }));
      if (error.code === "already_exists") throw new CubicleError("already_exists", `sandbox ${id} already exists on this host`, { cause: err });
      throw error;
    }
  }

  /** A durable pause: the container goes (processes, cgroups), the bundle stays for restore/destroy. */
  private async stopKeepingBundle(id: string): Promise<void> {
    const containerId = CONTAINER_PREFIX + id;
    const container = await this.runc.state(containerId);
    if (container) {
      await this.runc.kill(container);
      await this.runc.delete(containerId, false).catch(() => this.runc.delete(containerId, true));
    }
    await this.unmountAll(this.paths(id).dir);
    if (this.cgroups) await removeCgroupDirectories(this.cgroups, cgroupsPathOf(id));
    this.cpuSamples.delete(id);
  }

  /**
   * runc's environment for checkpoint and restore (and so CRIU's): the tar shim and CRIU first
   * in PATH, and what the CRIU front and the static tar shim need (CRIU_FRONT_NOTE, TAR_SHIM_NOTE).
   */
  private criuEnv(): NodeJS.ProcessEnv {
    const front = this.criuPath ? criuFrontEnv(this.criuBinDir, this.criuPath) : {};
    return { ...process.env, ...front, ...tarShimEnv(this.hostTar), PATH: `${this.criuBinDir}:${process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin"}` };
  }

  /**
   * The CRIU runc runs (CRIU_FRONT_NOTE) and CRIU's kernel-feature cache (ensureCriuKdatCache).
   * Without CRIU (not set up yet) there is nothing to do; without the cache dumps are slower.
   */
  private async prepareCriuCache(): Promise<void> {
    const criuPath = await this.criu().catch(() => undefined);
    if (!criuPath) return;
    await this.criuForRunc();
    await ensureCriuKdatCache(criuPath, path.join(this.config.stateDir, "criu-kdat")).then(
      (outcome) => log.debug("CRIU kernel-feature cache", { outcome }),
      (err: unknown) => log.warn("no CRIU kernel-feature cache: every dump and restore probes the kernel (~20 ms)", { error: String(err) }),
    );
  }

  private async criu(): Promise<string> {
    return (this.criuPath ??= await findCriu(this.config.stateDir, this.options.criuPath));
  }

  /** What runc is told to run as CRIU: the front or a link to the real one (CRIU_FRONT_NOTE). */
  private criuForRunc(): Promise<string> {
    this.runcCriu ??= this.criu()
      .then((real) => installCriuForRunc(this.criuBinDir, real, path.join(this.config.distDir, "criu-front")))
      .catch((err: unknown) => {
        this.runcCriu = undefined;
        throw err;
      });
    return this.runcCriu;
  }

  private async readOciConfig(id: string): Promise<OciConfigFacts> {
    const text = await readFile(this.paths(id).config, "utf8").catch((err) => {
      throw new CubicleError("not_found", `sandbox ${id} has no bundle on this host`, { cause: err });
    });
    return JSON.parse(text) as OciConfigFacts;
  }

  /** Runs `task` after every earlier checkpoint/restore of the same sandbox has settled. */
  private async exclusive<T>(id: string, task: () => Promise<T>): Promise<T> {
    const previous = this.busy.get(id) ?? Promise.resolve();
    const run = previous.then(task, task);
    const settled = run.then(() => {}, () => {});
    this.busy.set(id, settled);
    try {
      return await run;
    } finally {
      if (this.busy.get(id) === settled) this.busy.delete(id);
    }
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

/** The host's tar, for the shim CRIU runs (never the shim itself). */
async function findHostTar(): Promise<string> {
  for (const candidate of ["/usr/bin/tar", "/bin/tar"]) if (await pathExists(candidate)) return candidate;
  throw new CubicleError("failed_precondition", "GNU tar is missing on the host (apt-get install tar); CRIU needs it for tmpfs mounts");
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

/** Adds the tail of CRIU's log to a failed runc checkpoint/restore: the only way to see why. */
async function withCriuLog(err: unknown, logFile: string, what: string): Promise<CubicleError> {
  const error = CubicleError.from(err);
  const tail = await criuLogTail(logFile);
  // runc exits 1 whatever CRIU's reason: a full disk shows only in the log (criuLogTail notes a full filesystem).
  const code = /No space left on device|Disk quota exceeded/i.test(tail) ? "insufficient_storage" : error.code;
  return new CubicleError(code, `${what}: ${error.message}\nCRIU log (${logFile}):\n${tail}`, { cause: err, details: { criuLog: logFile, criuLogTail: tail } });
}

/**
 * Makes CRIU images readable for a restore, by nobody else: a restore reads them both as host
 * root inside a fresh user namespace (no capabilities over host files, so plain owner rights)
 * and, later, as the sandbox's mapped root. Owner root, group the mapped root, no "other".
 */
async function shareWithSandboxRoot(dir: string): Promise<void> {
  // In process: CRIU writes one flat directory of a few dozen files (no chown/chmod spawns).
  const entries = await readdir(dir, { withFileTypes: true });
  await Promise.all(
    entries.map(async (entry) => {
      const file = path.join(dir, entry.name);
      if (entry.isDirectory()) await shareWithSandboxRoot(file);
      if (entry.isSymbolicLink()) return;
      await chown(file, 0, SANDBOX_UID_BASE);
      await chmod(file, entry.isDirectory() ? 0o750 : 0o640);
    }),
  );
  await chown(dir, 0, SANDBOX_UID_BASE);
  await chmod(dir, 0o750);
}

/** Waits for every step (undefined = none) and then throws the first failure, if any. */
async function allSettledOrThrow(steps: (Promise<unknown> | undefined)[]): Promise<void> {
  const results = await Promise.allSettled(steps);
  const failed = results.find((result): result is PromiseRejectedResult => result.status === "rejected");
  if (failed) throw failed.reason;
}

/**
 * Waits for a sandbox's network set-up to finish, however it ends: after a failed create or
 * restore the caller releases the network, which must not race the set-up still under way.
 */
async function settled(networkReady: Promise<unknown> | undefined): Promise<void> {
  await networkReady?.catch(() => undefined);
}

function round(ms: number): number {
  return Math.round(ms * 10) / 10;
}

/**
 * runc gives every container a new session keyring, charged to the container root's host uid.
 * All sandboxes map root to the same uid (SANDBOX_UID_BASE), whose kernel key quota (200 keys by
 * default) would stop creates at about 200 sandboxes with "disk quota exceeded".
 */
const KEY_QUOTA = { maxkeys: 1_000_000, maxbytes: 25_000_000 };

async function raiseKeyQuota(): Promise<void> {
  for (const [name, wanted] of Object.entries(KEY_QUOTA)) {
    const file = `/proc/sys/kernel/keys/${name}`;
    const current = Number((await readFile(file, "utf8").catch(() => "0")).trim());
    if (current >= wanted) continue;
    await writeFile(file, String(wanted)).then(
      () => log.info("raised the kernel key quota for sandbox users", { [name]: wanted }),
      (err: Error) => log.warn("cannot raise the kernel key quota: creates may fail past ~200 sandboxes", { file, error: err.message }),
    );
  }
}
