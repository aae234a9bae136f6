import { criuDumpArgs, DETACHED_DESCRIPTORS } from "./criu-dump.js";
import { createHash } from "node:crypto";
import { chmod, chown, mkdir, readdir, readFile, rm, rmdir, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import type { CubicleConfig } from "../../shared/config.js";
import { mountCodebases } from "../../codebases/codebase-mount.js";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { pathExists } from "../../shared/fs.js";
import { createLogger, roundMs } from "../../shared/log.js";
import { type CheckpointInfo, type CheckpointOptions, type CheckpointTarget, type Runtime, type RuntimeState, type SandboxSpec, type SandboxStats } from "../types.js";
import { imageBudgetExceeded, parseImageId } from "../images.js";
import { assembleAgentKit, kitSourcesIn, type AgentKit } from "./agent-kit.js";
import { enableKsm } from "./ksm-host.js";
import { identityFiles, identityFor, readIdentity, writeIdentity, type BootIdentity } from "./boot-identity.js";
import { CRIU_VIEW_PREFIX, IMAGE_VERSION, imageLayout, makeCriuFilesReadable, readMeta, writeMeta, type CheckpointMeta } from "./checkpoint-image.js";
import { ContainerImageStore } from "./container-image-store.js";
import { cgroupDirectories, detectCgroupLayout, readCgroupCpuUsec, readCgroupUsage, removeCgroupDirectories, setNormalCpuWeight, supportsSwapLimit, type CgroupLayout } from "./cgroups.js";
import { criuFrontEnv, criuLogTail, ensureCriuKdatCache, findCriu, installCriuForRunc, tarShimEnv, writeCriuConfig, writeTarShim } from "./criu.js";
import { ANNOTATION_NETNS_PATH, ANNOTATION_ROOTFS_DIR, ANNOTATION_TEMPLATE_ID, buildOciSpec, CPU_PERIOD_USEC } from "./oci-spec.js";
import { Runc } from "./runc.js";
import { ExitWatcher, SandboxHelper } from "./sandbox-helper.js";
import { StoragePool } from "./storage-pool.js";
import { UidRanges } from "./uid-ranges.js";

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
  /** The static sandbox helper and the CRIU shim (SANDBOX_HELPER_NOTE); default from `<repo>/dist`. */
  helperBinary?: string;
  criuShim?: string;
  /** The sandbox's first program (native/sandbox-boot.c, BOOT_IDENTITY_NOTE); default from `<repo>/dist`. */
  sandboxBoot?: string;
}

/** Where the runtime keeps what sandboxes must reach, and the size of its storage pool. */
export type ContainerRuntimeConfig = Pick<CubicleConfig, "stateDir" | "distDir" | "runcPath" | "runDir"> & Partial<Pick<CubicleConfig, "storageBytes" | "imageBudgetBytes" | "ksm" | "checkpointVia">>;

/**
 * Version of the sandbox's mount layout (config.json). A memory image names every mount, so one
 * made under another layout cannot be restored: the version is part of memoryImageFingerprint,
 * and a template's warm snapshot is remade when it changes. 2: /sys became a bind, not a tmpfs.
 * 3: idmapped roots in per-sandbox uid ranges, layers on the storage pool. 4: the sandbox's own
 * boot id and machine id bound in, its own time namespace (BOOT_IDENTITY_NOTE).
 */
const SANDBOX_LAYOUT_VERSION = 4;

/**
 * BACKGROUND_START_NOTE: a background start (`spec.background`: a warm-pool refill, a warm
 * snapshot's source) boots while the host serves users (~200 ms of CPU for runc and the agent's
 * boot, on 2 cores). Its cgroup gets the lowest CPU weight (config.json `cpu.shares`
 * BACKGROUND_CPU_SHARES, which runc 1.1 applies at create), so its processes lose the CPU to
 * every other sandbox's until `foreground()` writes the normal weight (NORMAL_CPU_WEIGHT) at
 * its claim. runc itself is not niced (the helper's `exec --nice` could): measured with
 * `bench create -c 1` on 2 cores, runc at nice 19 on top of the low weight slowed refills so
 * much that the pool ran dry in 3 of 5 runs (18-23 of 40 creates warm instead of 26), while
 * claims got no faster; the weight alone kept the pool as full as before.
 */

/** Dumping memory may take long for big sandboxes. */
const CHECKPOINT_TIMEOUT_MS = 10 * 60_000;

/** Timings of the last create, for benchmarks and the debug log. */
export interface CreateTimings {
  prepareMs: number;
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

/** What the runtime knows of a sandbox on this host (rebuilt from its bundle after a restart). */
interface SandboxFacts {
  cpuCount: number;
  memoryBytes: number;
  diskBytes: number;
  /** First host uid of its range (USERNS_OWNER_NOTE). */
  uidBase: number;
  /** Its layer's btrfs subvolume id (quota usage), once known. */
  layerId: number | undefined;
}

/** The parts of a bundle's config.json the runtime reads back. */
interface OciConfigFacts {
  hostname?: string;
  annotations?: Record<string, string>;
  root?: { path?: string };
  /** What a checkpoint names as external (CRIU_RPC_NOTE). */
  mounts?: { destination: string; type?: string; options?: string[] }[];
  linux?: {
    namespaces?: { type: string; path?: string }[];
    uidMappings?: { hostID: number }[];
    resources?: { cpu?: { quota?: number }; memory?: { limit?: number } };
    maskedPaths?: string[];
    devices?: { path: string }[];
  };
}

interface CpuSample {
  usageUsec: number;
  atMs: number;
}

/**
 * The container runtime: runc in a user namespace of the sandbox's own uid range, owned by that
 * range (USERNS_OWNER_NOTE); an overlayfs root (the template read-only below, the sandbox's
 * layer above, both idmapped) on the storage pool with a quota (STORAGE_POOL_NOTE); the pre-made
 * netns joined by path; and the agent started from the read-only kit at /.cubicle.
 */
export class ContainerRuntime implements Runtime {
  readonly name = "container" as const;
  /** The checkpoint images, on the storage pool (in its image budget). */
  readonly images: ContainerImageStore;
  /** Phase timings of the most recent successful create. */
  lastCreateTimings: CreateTimings | undefined;

  private readonly runc: Runc;
  private readonly pool: StoragePool;
  /**
   * The resident host helper (HELPER_PROTOCOL_NOTE): the runtime's host-side steps and its runc
   * calls go through it, and other host-side modules may share it (`call`, `exec`).
   */
  readonly helper: SandboxHelper;
  private readonly uidRanges = new UidRanges();
  private readonly exitWatcher: ExitWatcher;
  private readonly exitListeners: ((sandboxId: string) => void)[] = [];
  private readonly kitSourceDir: string;
  private kit: AgentKit | undefined;
  private cgroups: CgroupLayout | undefined;
  private limitSwap = false;
  private readonly facts = new Map<string, SandboxFacts>();
  private readonly cpuSamples = new Map<string, CpuSample>();
  /** Per-sandbox queue: a checkpoint and a restore of one sandbox never overlap. */
  private readonly busy = new Map<string, Promise<unknown>>();
  private readonly criuConfigFile: string;
  /** PATH entry holding the tar shim CRIU runs (see criu.ts). */
  private readonly criuBinDir: string;
  private readonly criuShim: string;
  private readonly sandboxBoot: string;
  private criuPath: string | undefined;
  private runcCriu: Promise<string> | undefined;
  private hostTar = "/usr/bin/tar";
  private kitFingerprint: string | undefined;
  /** Numbers restores' views of CRIU files apart. */
  private viewCounter = 0;
  private deletionsSinceGc = 0;

  constructor(
    private readonly config: ContainerRuntimeConfig,
    private readonly options: ContainerRuntimeOptions = {},
  ) {
    const helperBinary = options.helperBinary ?? path.join(config.distDir, "sandbox-helper");
    this.criuShim = options.criuShim ?? path.join(config.distDir, "criu-userns-shim.so");
    this.sandboxBoot = options.sandboxBoot ?? path.join(config.distDir, "sandbox-boot");
    this.helper = new SandboxHelper(helperBinary);
    this.runc = new Runc(config.runcPath, this.helper);
    this.exitWatcher = new ExitWatcher(helperBinary, (id) => this.exitListeners.forEach((listener) => listener(id)));
    this.pool = new StoragePool({
      stateDir: config.stateDir,
      mountDir: path.join(config.runDir, "pool"),
      sizeBytes: config.storageBytes,
      imageBudgetBytes: config.imageBudgetBytes,
    });
    this.images = new ContainerImageStore(this.pool.imagesDir, { onDeleted: () => this.noteDeletion() });
    this.kitSourceDir = path.join(config.stateDir, "kit");
    this.criuConfigFile = path.join(config.stateDir, "criu-runc.conf");
    // CRIU runs `tar` for tmpfs mounts inside the sandbox's user namespace, whose root cannot
    // traverse the 0700 state directory: there the shim would be skipped for the host's GNU tar
    // (with --gzip, and a process start more). The run dir (0711) is reachable (TAR_SHIM_NOTE).
    this.criuBinDir = path.join(config.runDir, "criu-bin");
  }

  /** The kit as sandboxes reach it: a read-only bind of `<stateDir>/kit` under the run dir. */
  private get kitDir(): string {
    return path.join(this.config.runDir, "kit");
  }

  async init(): Promise<void> {
    for (const file of [this.helper.binary, this.criuShim, this.sandboxBoot]) {
      if (!(await pathExists(file))) throw new CubicleError("failed_precondition", `${path.basename(file)} is not built; run \`node scripts/build.mjs\` (needs gcc)`);
    }
    await mkdir(this.config.stateDir, { recursive: true, mode: 0o700 });
    await mkdir(this.config.runDir, { recursive: true, mode: 0o711 });
    await chmod(this.config.runDir, 0o711);
    await this.pool.init();
    const mergeMemory = this.config.ksm === true && (await enableKsm());
    const kit = await assembleAgentKit(
      this.kitSourceDir,
      kitSourcesIn(this.config.distDir, {
        nodeBinary: this.options.nodeBinary ?? process.execPath,
        agentScript: this.options.agentScript ?? path.join(this.config.distDir, "agent", "agent.js"),
        sandboxBoot: this.sandboxBoot,
        mergeMemory,
      }),
    );
    await this.mountKit();
    this.kit = { dir: this.kitDir, command: kit.command };
    this.kitFingerprint = await readFile(path.join(this.kitSourceDir, "manifest.json")).then(
      (text) => createHash("sha256").update(text).update(`layout ${SANDBOX_LAYOUT_VERSION}`).digest("hex").slice(0, 16),
      () => undefined,
    );
    await writeCriuConfig(this.criuConfigFile);
    this.hostTar = await findHostTar();
    await writeTarShim(this.criuBinDir, this.hostTar, path.join(this.config.distDir, "tar-shim"));
    // Where older versions kept the shims (unreachable from the sandbox's namespace, see above).
    await rm(path.join(this.config.stateDir, "criu-bin"), { recursive: true, force: true });
    await this.prepareCriuCache();
    this.cgroups = await detectCgroupLayout();
    this.limitSwap = await supportsSwapLimit(this.cgroups);
    // Ranges of sandboxes that outlived the previous server process.
    for (const entry of await readdir(this.pool.sandboxesDir).catch(() => [] as string[])) {
      const facts = await this.readFacts(entry).catch(() => undefined);
      if (facts) this.uidRanges.claim(facts.uidBase);
    }
    await this.helper.collectQgroups(this.pool.mountDir).catch((err) => log.warn("collecting stale quota groups failed", { error: String(err) }));
    await this.images.init();
    await this.pool.compressNewFiles(this.images.kindDir("pause")).catch((err) => log.warn("durable images stay uncompressed (IMAGE_COMPRESSION_NOTE)", { error: String(err) }));
    log.info("container runtime ready", { cgroupVersion: this.cgroups.version, limitSwap: this.limitSwap, sys: this.options.sysfs ?? "empty", pool: this.pool.mountDir });
  }

  /**
   * The kit lives in the state directory (0700; the Node binary is hard-linked there) and is
   * bound read-only where sandbox roots can reach it. Rebound when the kit was rebuilt (a new
   * directory); running sandboxes keep the one they mounted.
   */
  private async mountKit(): Promise<void> {
    await mkdir(this.kitDir, { recursive: true, mode: 0o755 });
    const source = await stat(this.kitSourceDir);
    const mounted = await stat(this.kitDir);
    if (mounted.dev === source.dev && mounted.ino === source.ino) return;
    if ((await mountsUnder(this.kitDir)).length > 0) await runCommand(["umount", "--lazy", this.kitDir], { timeoutMs: 15_000 });
    await runCommand(["mount", "--bind", "-o", "ro", this.kitSourceDir, this.kitDir], { timeoutMs: 15_000 });
    await runCommand(["mount", "-o", "remount,bind,ro,nosuid,nodev", this.kitDir], { timeoutMs: 15_000 });
  }

  /**
   * Unmounts the storage pool and the kit (tests, and `cubicle` teardown on a host): only when
   * no sandbox of this runtime is left.
   */
  async releaseHostMounts(): Promise<void> {
    this.exitWatcher.close();
    if ((await this.list()).length > 0) throw new CubicleError("failed_precondition", "sandboxes still use the storage pool");
    for (const mountPoint of await mountsUnder(this.config.runDir)) {
      await runCommand(["umount", mountPoint], { timeoutMs: 30_000, allowFailure: true }).then(async (result) => {
        if (result.exitCode !== 0) await runCommand(["umount", "--lazy", mountPoint], { timeoutMs: 30_000 });
      });
    }
    // Only the empty mount points are left; rmdir (not rm -r) cannot reach into a mount.
    for (const dir of [path.join(this.config.runDir, "kit"), this.pool.mountDir, this.config.runDir]) await rmdir(dir).catch(() => undefined);
    this.helper.close();
  }

  /** Registers for sandboxes whose processes ended (crash, OOM of the init, kill from inside). */
  onExit(listener: (sandboxId: string) => void): void {
    this.exitListeners.push(listener);
  }

  /** Watches a running sandbox found on the host (after a server restart). */
  async watch(sandboxId: string): Promise<void> {
    const container = await this.runc.state(CONTAINER_PREFIX + checkId(sandboxId));
    if (container && this.owns(container.bundle) && container.pid > 0) this.exitWatcher.watch(sandboxId, container.pid);
  }

  async create(spec: SandboxSpec): Promise<void> {
    const id = checkId(spec.sandboxId);
    const started = performance.now();
    const uidBase = this.uidRanges.allocate();
    try {
      const templateLayer = spec.template.layerImageId ? await this.templateLayer(spec.template) : undefined;
      const timings = await this.prepareBundle(spec, uidBase, { kind: "fresh", templateLayer }, identityFor({ kind: "fresh" }));
      await spec.networkReady;
      await this.runc.runDetached(CONTAINER_PREFIX + id, this.paths(id).dir, this.paths(id).runcLog, spec.network.netnsPath);
      const ran = performance.now();
      this.dropStartMounts(id);
      await this.watch(id);
      this.lastCreateTimings = { ...timings, runcMs: roundMs(ran - started - timings.totalMs), totalMs: roundMs(ran - started) };
      log.debug("created", { sandboxId: id, ...this.lastCreateTimings });
    } catch (err) {
      await settled(spec.networkReady);
      throw await this.undoFailedStart(id, uidBase, err, "create");
    }
  }

  /**
   * The layer directory of a template's layer image (TemplateImage.layerImageId): a committed
   * filesystem-only image of kind `layer`, made on the template's own rootfs.
   */
  async templateLayer(template: SandboxSpec["template"]): Promise<string> {
    const imageId = template.layerImageId!;
    if (parseImageId(imageId).kind !== "layer" || !(await this.images.exists(imageId))) {
      throw new CubicleError("failed_precondition", `template ${template.templateId} has lost its files (image ${imageId}); build it again`);
    }
    const imageDir = this.images.dirOf(imageId);
    const meta = await readMeta(imageDir);
    if (meta.memory || (meta.rootfsDir && meta.rootfsDir !== template.rootfsDir)) {
      throw new CubicleError("failed_precondition", `template ${template.templateId}'s files (image ${imageId}) were made on another base; build it again`);
    }
    return imageLayout(imageDir).layer;
  }

  /**
   * After a failed create or restore: removes what was made of the sandbox and frees its uid
   * range. A range recorded in the sandbox's facts is freed by destroy(); one that was not (the
   * failure came first) is freed here. Freeing it twice could free it from under a sandbox
   * that took it meanwhile. An already_exists error is another sandbox's bundle: left alone.
   */
  private async undoFailedStart(id: string, uidBase: number, err: unknown, what: string): Promise<CubicleError> {
    const error = CubicleError.from(err);
    const recorded = this.facts.get(id)?.uidBase === uidBase;
    if (error.code === "already_exists" && !recorded) {
      this.uidRanges.release(uidBase);
      return new CubicleError("already_exists", `sandbox ${id} already exists on this host`, { cause: err });
    }
    await this.destroy(id).catch((cleanupErr) => log.warn(`cleanup after failed ${what} failed`, { sandboxId: id, error: String(cleanupErr) }));
    if (!recorded) this.uidRanges.release(uidBase);
    return error;
  }

  /**
   * Makes the bundle: a layer (empty, or a snapshot of an image's), the user namespace (fresh
   * sandboxes: CRIU makes a restored one), the idmapped overlay root, the files of the
   * sandbox's ids (BOOT_IDENTITY_NOTE) and config.json. Fails with already_exists when the bundle
   * exists. The facts are recorded first, so a failure is undone by destroy().
   */
  private async prepareBundle(
    spec: SandboxSpec,
    uidBase: number,
    source: { kind: "fresh"; templateLayer?: string } | { kind: "image"; imageDir: string; memory: boolean; criuView: string | undefined },
    identity: BootIdentity,
  ): Promise<Omit<CreateTimings, "runcMs">> {
    const kit = this.kit;
    if (!kit) throw new CubicleError("failed_precondition", "the container runtime is not initialised; call init() first");
    const id = spec.sandboxId;
    const paths = this.paths(id);
    const started = performance.now();
    await checkRootfsPath(spec.template.rootfsDir);
    // The sandbox's root reaches its root mount through the group; nobody else gets in.
    await mkdir(paths.dir, { mode: 0o710 });
    this.facts.set(id, { cpuCount: spec.resources.cpuCount, memoryBytes: spec.resources.memoryMiB * 1024 * 1024, diskBytes: spec.resources.diskMiB * 1024 * 1024, uidBase, layerId: undefined });
    await chown(paths.dir, 0, uidBase);
    await chmod(paths.dir, 0o710); // mkdir's mode is cut by the umask
    await mkdir(paths.rootfs);
    // The user namespace is in config.json before any of it exists: a failure is undone by destroy().
    await Promise.all([
      this.writeConfig(spec, kit, uidBase, source.kind === "fresh" || !source.memory),
      writeIdentity(paths.dir, identity),
    ]);
    const configured = performance.now();
    const layerId = await this.helper.prepare({
      uidBase,
      lowerDir: spec.template.rootfsDir,
      layerDir: paths.layer,
      rootfsDir: paths.rootfs,
      quotaBytes: Math.max(0, Math.floor(spec.resources.diskMiB)) * 1024 * 1024,
      fromLayer: source.kind === "image" ? imageLayout(source.imageDir).layer : source.templateLayer,
      usernsPin: source.kind === "fresh" || !source.memory ? paths.userns : undefined,
      criuImages: source.kind === "image" && source.criuView ? imageLayout(source.imageDir).criu : undefined,
      criuView: source.kind === "image" ? source.criuView : undefined,
      volumeSources: spec.volumes?.map((volume) => volume.source),
    });
    this.facts.get(id)!.layerId = layerId;
    await writeFile(paths.layerId, `${layerId}\n`, { mode: 0o600 });
    if (spec.codebases?.length) await mountCodebases(path.join(this.config.distDir, "codebase-fs"), paths.dir, uidBase, spec.codebases);
    const prepared = performance.now();
    return { prepareMs: roundMs(prepared - configured), configMs: roundMs(configured - started), totalMs: roundMs(prepared - started) };
  }

  private async writeConfig(spec: SandboxSpec, kit: AgentKit, uidBase: number, joinsPinnedUserns: boolean): Promise<void> {
    const paths = this.paths(spec.sandboxId);
    const ociSpec = buildOciSpec({
      spec,
      agentCommand: kit.command,
      kitDir: kit.dir,
      cgroupsPath: cgroupsPathOf(spec.sandboxId),
      limitSwap: this.limitSwap,
      sysfs: this.options.sysfs ?? "empty",
      emptyDir: this.pool.emptyDir,
      criuConfigFile: this.criuConfigFile,
      identityFiles: identityFiles(paths.dir),
      uidBase,
      usernsPath: joinsPinnedUserns ? paths.userns : undefined,
      volumeBinds: [
        ...(spec.volumes ?? []).map((volume, index) => ({ source: path.join(paths.dir, "volumes", String(index)), target: volume.target })),
        ...(spec.codebases ?? []).map((codebase, index) => ({ source: path.join(paths.dir, "codebases", String(index)), target: codebase.target })),
      ],
    });
    await writeFile(paths.config, JSON.stringify(ociSpec), { mode: 0o600 });
  }

  /**
   * MOUNT_COUNT_NOTE: every container start copies the host's mount table into the container's
   * new mount namespace and tears the copy down again (runc: unshare, then pivot_root and a
   * detached unmount of the old root), so its cost grows with the mounts on the host: 3,000
   * extra mounts made a bare `runc run` + `delete` 58 → 169 ms here, and 1,000 live sandboxes
   * held 3,000 (each an overlay root, a network namespace pin and a user namespace pin). The
   * pin and the root serve runc's start only: once the sandbox's init holds its user namespace
   * and has its root in its own mount namespace, both leave the host's (in the background: the
   * helper's children, not this process, unmount them). A restore mounts a new root for CRIU
   * and drops it the same way; the network namespace pin stays (the network's helpers and CRIU
   * find the namespace by it).
   */
  private dropStartMounts(id: string): void {
    const paths = this.paths(id);
    for (const mount of [paths.userns, paths.rootfs]) {
      this.helper.teardown(mount, undefined).catch((err) => log.warn("a mount only the start needed could not be unmounted", { sandboxId: id, mount, error: String(err) }));
    }
  }

  async destroy(sandboxId: string): Promise<void> {
    const id = checkId(sandboxId);
    const paths = this.paths(id);
    const containerId = CONTAINER_PREFIX + id;
    this.exitWatcher.unwatch(id);
    const facts = this.facts.get(id) ?? (await this.readFacts(id).catch(() => undefined));
    const container = await this.runc.state(containerId);
    if (container && this.owns(container.bundle)) {
      await this.runc.kill(container);
      await this.runc.delete(containerId, false).catch(() => this.runc.delete(containerId, true));
    } else if (container) {
      log.warn("a container with this sandbox's id belongs to another state dir; leaving it", { containerId, bundle: container.bundle });
    }
    const hasLayer = await pathExists(paths.layer);
    if (hasLayer || (await pathExists(paths.dir))) {
      await this.helper.teardown(paths.dir, hasLayer ? paths.layer : undefined);
      this.noteDeletion();
    }
    await rm(paths.dir, { recursive: true, force: true });
    if (this.cgroups) {
      const left = await removeCgroupDirectories(this.cgroups, cgroupsPathOf(id));
      if (left.length > 0) throw new CubicleError("internal", `cgroups of sandbox ${id} are still in use: ${left.join(", ")}`);
    }
    if (facts) this.uidRanges.release(facts.uidBase);
    this.facts.delete(id);
    this.cpuSamples.delete(id);
  }

  /** Changes the image budget (bytes) of this running runtime; the configured one returns at the next start. */
  setImageBudget(bytes: number): void {
    this.pool.imageBudgetBytes = bytes;
  }

  /**
   * Bytes of the images other runtimes beside this one keep (a microVM runtime's), which share
   * its budget (IMAGE_BUDGET_NOTE); set by whoever puts them together.
   */
  otherImagesBytes: () => number = () => 0;

  /** The image budget and what of it is used, by this runtime's images and the others'. */
  imageBudget(): { usedBytes: number; limitBytes: number } {
    return { usedBytes: this.images.usedBytes() + this.otherImagesBytes(), limitBytes: this.pool.imageBudgetBytes };
  }

  /**
   * IMAGE_BUDGET_NOTE: a checkpoint is refused (insufficient_storage, 507) before anything is
   * frozen or written when the images already made plus this one's likely size (the layer's
   * bytes and, with memory, the cgroup's memory use: an upper bound of what CRIU writes) would
   * pass the budget; its real size counts from then on. The budget is the storage pool's (half
   * of it unless CUBICLE_IMAGE_BUDGET_GB says), and a microVM runtime's images count in it too
   * (it checks its own checkpoints against it: MicrovmRuntimeConfig.imageBudget).
   */
  private async checkImageBudget(id: string, layerId: number | undefined, memory: boolean): Promise<void> {
    const layerBytes = layerId === undefined ? 0 : (await this.pool.usage(layerId).catch(() => ({ usedBytes: 0 }))).usedBytes;
    const memoryBytes = memory && this.cgroups ? (await readCgroupUsage(this.cgroups, cgroupsPathOf(id)).catch(() => undefined))?.memoryUsedBytes ?? 0 : 0;
    const needed = layerBytes + memoryBytes;
    const { usedBytes, limitBytes } = this.imageBudget();
    if (usedBytes + needed > limitBytes) throw imageBudgetExceeded(usedBytes, limitBytes, needed);
  }

  /** Deleted subvolumes leave qgroups behind until the cleaner is done: collect now and then. */
  private noteDeletion(): void {
    if (++this.deletionsSinceGc < 200) return;
    this.deletionsSinceGc = 0;
    void this.helper.collectQgroups(this.pool.mountDir).catch((err) => log.warn("collecting stale quota groups failed", { error: String(err) }));
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
    // Half-made or half-destroyed sandboxes have a bundle or a layer but no container.
    for (const dir of [this.pool.sandboxesDir, this.pool.layersDir]) {
      for (const entry of await readdir(dir).catch(() => [] as string[])) ids.add(entry);
    }
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

  /** See Runtime.foreground and BACKGROUND_START_NOTE: the claim path, so no process start. */
  async foreground(sandboxId: string): Promise<void> {
    const id = checkId(sandboxId);
    const layout = this.cgroups ?? (this.cgroups = await detectCgroupLayout());
    try {
      setNormalCpuWeight(layout, cgroupsPathOf(id));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") throw new CubicleError("not_found", `sandbox ${sandboxId} is not running`, { cause: err });
      throw CubicleError.from(err);
    }
  }

  async setHostname(sandboxId: string, hostname: string): Promise<void> {
    if (!/^[a-zA-Z0-9][a-zA-Z0-9.-]{0,62}$/.test(hostname)) throw new CubicleError("invalid_argument", `"${hostname}" is not a valid hostname`);
    const container = await this.runc.state(CONTAINER_PREFIX + checkId(sandboxId));
    if (!container || container.pid <= 0) throw new CubicleError("not_found", `sandbox ${sandboxId} is not running`);
    await this.helper.setHostname(container.pid, hostname);
  }

  /**
   * See Runtime.checkpoint. The sandbox is frozen (cgroup freezer) while its layer is
   * snapshotted and CRIU dumps it, so both describe one instant; CRIU always dumps with
   * `--leave-running`, and a durable pause (`leaveRunning: false`) kills the container only once
   * the image is complete and renamed into place: a failed checkpoint never costs the sandbox.
   * After a durable pause the bundle stays, unmounted, until destroy(); state() says "missing".
   * A sandbox whose container is gone can still be checkpointed without memory. Established TCP
   * connections are not saved (CRIU `tcp-close`, see criu.ts): they come back closed. The image
   * counts against the pool's image budget: past it, the checkpoint fails with
   * insufficient_storage and leaves nothing.
   */
  async checkpoint(sandboxId: string, target: CheckpointTarget, options: CheckpointOptions): Promise<CheckpointInfo & { imageId: string }> {
    const id = checkId(sandboxId);
    return this.exclusive(id, () => this.checkpointNow(id, target, options));
  }

  private async checkpointNow(id: string, target: CheckpointTarget, options: CheckpointOptions): Promise<CheckpointInfo & { imageId: string }> {
    const paths = this.paths(id);
    const containerId = CONTAINER_PREFIX + id;
    const found = await this.runc.state(containerId);
    const container = found && this.owns(found.bundle) && (found.status === "running" || found.status === "paused") ? found : undefined;
    if (!container && options.memory) throw new CubicleError("failed_precondition", `sandbox ${id} is not running on this host; only a filesystem checkpoint (memory: false) can be taken of it`);
    if (!(await pathExists(paths.layer))) throw new CubicleError("not_found", `sandbox ${id} does not exist on this host`);
    const oci = await this.readOciConfig(id);
    const facts = this.facts.get(id) ?? (await this.readFacts(id));
    const criuPath = options.memory ? await this.criuForRunc() : undefined;
    const identity = await readIdentity(paths.dir);

    await this.checkImageBudget(id, facts.layerId, options.memory);
    const pending = await this.images.allocate(target.kind, target.name);
    const layout = imageLayout(pending.dir);

    const freezeHere = container?.status === "running";
    let frozenAt = performance.now();
    let thawedAt: number | undefined;
    try {
      await mkdir(layout.log, { mode: 0o700 });
      if (freezeHere) {
        await this.runc.pause(containerId);
        frozenAt = performance.now();
      }
      const snapshotId = await this.helper.snapshot(paths.layer, layout.layer);
      const snapshotted = performance.now();
      if (criuPath) {
        await mkdir(layout.criu, { mode: 0o755 });
        const logFile = path.join(layout.log, "runc.log");
        const netnsPath = oci.annotations?.[ANNOTATION_NETNS_PATH];
        if (!netnsPath) throw new CubicleError("internal", `sandbox ${id} has no netns path in its config.json (made by an older Cubicle?)`);
        // Through CRIU's RPC from the resident helper (CRIU_RPC_NOTE); runc when its state says too little.
        const dumpFacts = this.config.checkpointVia !== "runc" && this.criuPath && oci.annotations?.["org.criu.config"] ? await this.runc.dumpFacts(containerId) : undefined;
        const dump = dumpFacts
          ? writeFile(path.join(layout.criu, "descriptors.json"), DETACHED_DESCRIPTORS, { mode: 0o600 }).then(async () => {
              const args = await criuDumpArgs({
                criu: this.criuPath!,
                netnsPath,
                pid: dumpFacts.pid,
                imagesDir: layout.criu,
                workDir: layout.log,
                root: path.resolve(paths.dir, oci.root?.path ?? "rootfs"),
                freezerCgroup: dumpFacts.freezerCgroup,
                configFile: oci.annotations!["org.criu.config"]!,
                leaveRunning: true,
                oci,
                env: this.criuEnv(undefined),
              });
              await this.helper.call("criu-dump", args, { what: `checkpoint of sandbox ${id}`, timeoutMs: CHECKPOINT_TIMEOUT_MS });
            })
          : this.runc.checkpoint(containerId, { criuPath, netnsPath, imagePath: layout.criu, workPath: layout.log, leaveRunning: true, logFile, timeoutMs: CHECKPOINT_TIMEOUT_MS, env: this.criuEnv(undefined) });
        await dump.catch(async (err) => {
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
      const criuBytes = criuPath ? await makeCriuFilesReadable(layout.criu) : 0;
      const layerBytes = (await this.pool.usage(snapshotId).catch(() => ({ usedBytes: 0 }))).usedBytes;
      const meta: CheckpointMeta = {
        version: IMAGE_VERSION,
        runtime: "container",
        sandboxId: id,
        templateId: oci.annotations?.[ANNOTATION_TEMPLATE_ID] ?? "",
        rootfsDir: oci.annotations?.[ANNOTATION_ROOTFS_DIR] ?? "",
        memory: options.memory,
        hostname: oci.hostname ?? "",
        kitFingerprint: options.memory ? this.kitFingerprint : undefined,
        bootId: identity.bootId,
        machineId: identity.machineId,
        createdAt: new Date().toISOString(),
        frozenMs: thawedAt === undefined ? 0 : roundMs(thawedAt - frozenAt),
        layerSnapshotMs: roundMs(snapshotted - frozenAt),
        dumpMs: roundMs(dumped - snapshotted),
        layerBytes,
        criuBytes,
      };
      await writeMeta(pending.dir, meta);
      const image = await this.images.commit(pending);
      if (!options.leaveRunning && container) {
        await this.stopKeepingBundle(id).catch((err) => {
          throw new CubicleError("internal", `checkpoint image ${image.id} is complete, but sandbox ${id} could not be stopped: ${CubicleError.from(err).message}`, { cause: err });
        });
        thawedAt = performance.now();
        meta.frozenMs = roundMs(thawedAt - frozenAt);
        await writeMeta(this.images.dirOf(image.id), meta);
      }
      log.debug("checkpointed", { sandboxId: id, imageId: image.id, ...options, frozenMs: meta.frozenMs, layerSnapshotMs: meta.layerSnapshotMs, dumpMs: meta.dumpMs });
      return { imageId: image.id, sizeBytes: image.sizeBytes, frozenMs: meta.frozenMs, memory: options.memory };
    } catch (err) {
      // The source sandbox must come out of a failed checkpoint running as it went in.
      if (freezeHere && thawedAt === undefined) await this.runc.resume(containerId).catch((thawErr) => log.warn("thaw after failed checkpoint failed", { sandboxId: id, error: String(thawErr) }));
      // After the commit, this finds nothing: a complete image stays (its id was not returned, but it is listed).
      await this.images.abandon(pending);
      throw CubicleError.from(err);
    }
  }

  /**
   * See Runtime.restore. Always builds the sandbox afresh: whatever is left of `spec.sandboxId`
   * on the host (the bundle kept by a durable pause) is replaced by the image's layer, so a
   * rollback gets exactly the snapshot's files. A container that still exists under that id is
   * an error (already_exists): destroy() it first. The image is only read (but for the
   * restore's own view of its CRIU files), so one image can feed many concurrent restores, each
   * with its own layer (an O(1) snapshot), uid range, container, cgroup and netns.
   *
   * Restored processes keep what they had in memory: the old hostname (UTS namespace, renamed
   * here), the environment (CUBICLE_SANDBOX_ID of the source) and closed TCP connections; the
   * caller re-initialises the agent.
   */
  async restore(spec: SandboxSpec, imageId: string): Promise<void> {
    try {
      const id = checkId(spec.sandboxId);
      const imageDir = this.images.dirOf(imageId);
      await this.exclusive(id, () => this.restoreNow(spec, imageDir));
    } catch (err) {
      await settled(spec.networkReady);
      throw err;
    }
  }

  private async restoreNow(spec: SandboxSpec, imageDir: string): Promise<void> {
    if (!this.kit) throw new CubicleError("failed_precondition", "the container runtime is not initialised; call init() first");
    const id = spec.sandboxId;
    const paths = this.paths(id);
    const meta = await readMeta(imageDir);
    if (meta.rootfsDir && meta.rootfsDir !== spec.template.rootfsDir) {
      throw new CubicleError("failed_precondition", `the image was made on another template tree than ${spec.template.templateId}'s current one; restore it with the same template`);
    }
    const criuPath = meta.memory ? await this.criuForRunc() : undefined;
    const existing = await this.runc.state(CONTAINER_PREFIX + id);
    if (existing) throw new CubicleError("already_exists", `sandbox ${id} still has a container (${existing.status}); destroy it before restoring into the same id`);
    if ((await pathExists(paths.dir)) || (await pathExists(paths.layer))) await this.destroy(id);

    const started = performance.now();
    const uidBase = this.uidRanges.allocate();
    const criuView = criuPath ? path.join(imageDir, `${CRIU_VIEW_PREFIX}${id}-${process.pid}-${++this.viewCounter}`) : undefined;
    try {
      const identity = identityFor({ kind: "image", memory: meta.memory, sameMachine: spec.sameMachine === true, recorded: { bootId: meta.bootId, machineId: meta.machineId } });
      const timings: Record<string, number> = await this.prepareBundle(spec, uidBase, { kind: "image", imageDir, memory: meta.memory, criuView }, identity);
      const bundled = performance.now();
      await spec.networkReady;
      timings.networkWaitMs = roundMs(performance.now() - bundled);
      const runcStarted = performance.now();
      if (criuPath && criuView) {
        const workPath = path.join(paths.dir, "criu-restore");
        await mkdir(workPath, { mode: 0o700 });
        await this.runc
          .restoreDetached(CONTAINER_PREFIX + id, paths.dir, { criuPath, netnsPath: spec.network.netnsPath, imagePath: criuView, workPath, logFile: paths.runcLog, timeoutMs: CHECKPOINT_TIMEOUT_MS, env: this.criuEnv(uidBase) })
          .catch(async (err) => {
            const kitChanged = meta.kitFingerprint && this.kitFingerprint && meta.kitFingerprint !== this.kitFingerprint;
            const hint = kitChanged ? " (the agent kit changed since the checkpoint: processes still map the old Node binary; make a new image)" : "";
            throw await withCriuLog(err, path.join(workPath, "restore.log"), `restore of sandbox ${id} failed${hint}`);
          })
          .finally(() => rm(criuView, { recursive: true, force: true }));
      } else {
        await this.runc.runDetached(CONTAINER_PREFIX + id, paths.dir, paths.runcLog, spec.network.netnsPath);
      }
      timings.runcMs = roundMs(performance.now() - runcStarted);
      this.dropStartMounts(id);
      const container = await this.runc.state(CONTAINER_PREFIX + id);
      if (!container || container.pid <= 0) throw new CubicleError("internal", `sandbox ${id} stopped right after its restore`);
      this.exitWatcher.watch(id, container.pid);
      // CRIU brings back the image's UTS namespace with the source's name (its tmpfs files it
      // extracts inside the new user namespace: their ids are right); the caller's own first
      // step (the agent's /init) runs meanwhile.
      const running = performance.now();
      await allSettledOrThrow([criuPath ? this.helper.setHostname(container.pid, spec.hostname) : undefined, spec.whenRunning?.()]);
      log.debug("restored", { sandboxId: id, imageDir, memory: meta.memory, ...timings, finishingMs: roundMs(performance.now() - running), totalMs: roundMs(performance.now() - started) });
    } catch (err) {
      throw await this.undoFailedStart(id, uidBase, err, "restore");
    }
  }

  /** A durable pause: the container goes (processes, cgroups), the bundle stays for restore/destroy. */
  private async stopKeepingBundle(id: string): Promise<void> {
    const containerId = CONTAINER_PREFIX + id;
    this.exitWatcher.unwatch(id);
    const container = await this.runc.state(containerId);
    if (container) {
      await this.runc.kill(container);
      await this.runc.delete(containerId, false).catch(() => this.runc.delete(containerId, true));
    }
    await this.helper.teardown(this.paths(id).dir, undefined);
    if (this.cgroups) await removeCgroupDirectories(this.cgroups, cgroupsPathOf(id));
    this.cpuSamples.delete(id);
  }

  /**
   * What runc's environment for checkpoint and restore (and so CRIU's) sets on top of the
   * server's: the tar shim and CRIU first in PATH, what the CRIU front and the static tar shim
   * need (CRIU_FRONT_NOTE, TAR_SHIM_NOTE), and the user-namespace shim with, for a restore, the
   * new namespace's owner (USERNS_OWNER_NOTE).
   */
  private criuEnv(usernsOwner: number | undefined): Record<string, string> {
    const front = this.criuPath ? criuFrontEnv(this.criuBinDir, this.criuPath) : {};
    return {
      ...front,
      ...tarShimEnv(this.hostTar),
      LD_PRELOAD: this.criuShim,
      ...(usernsOwner === undefined ? {} : { CUBICLE_USERNS_OWNER: String(usernsOwner) }),
      PATH: `${this.criuBinDir}:${process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin"}`,
    };
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

  /**
   * CPU and memory from the cgroup, disk from the layer's qgroup (kernel accounting, read from
   * sysfs: no walk of the sandbox's files, whatever they hold).
   */
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
    const disk = facts.layerId === undefined ? undefined : await this.pool.usage(facts.layerId).catch(() => undefined);
    return {
      cpuUsedPct: Math.round(cpuUsedPct * 100) / 100,
      cpuCount: facts.cpuCount,
      memUsedBytes: usage.memoryUsedBytes,
      memTotalBytes: usage.memoryLimitBytes ?? facts.memoryBytes,
      memCacheBytes: usage.memoryCacheBytes,
      diskUsedBytes: disk?.usedBytes ?? 0,
      diskTotalBytes: facts.diskBytes > 0 ? facts.diskBytes : (disk?.limitBytes ?? 0),
    };
  }

  async cpuTimeUsec(sandboxId: string): Promise<number> {
    const layout = this.cgroups ?? (this.cgroups = await detectCgroupLayout());
    return readCgroupCpuUsec(layout, cgroupsPathOf(checkId(sandboxId))).catch((err) => {
      throw new CubicleError("not_found", `sandbox ${sandboxId} is not running on this host`, { cause: err });
    });
  }

  /** Cgroup directories a sandbox has (for leak checks). */
  cgroupDirectories(sandboxId: string): string[] {
    return this.cgroups ? cgroupDirectories(this.cgroups, cgroupsPathOf(checkId(sandboxId))) : [];
  }

  /** The bundle directory of a sandbox (config.json, rootfs/, the namespace pin). */
  bundleDir(sandboxId: string): string {
    return this.paths(checkId(sandboxId)).dir;
  }

  /** The writable layer of a sandbox (a subvolume: upper/ and work/), for tests. */
  layerDir(sandboxId: string): string {
    return this.paths(checkId(sandboxId)).layer;
  }

  /** The host uid range of a sandbox (its first id), for tests and leak checks. */
  uidBaseOf(sandboxId: string): number | undefined {
    return this.facts.get(sandboxId)?.uidBase;
  }

  private paths(id: string) {
    const dir = path.join(this.pool.sandboxesDir, id);
    return {
      dir,
      rootfs: path.join(dir, "rootfs"),
      config: path.join(dir, "config.json"),
      userns: path.join(dir, "userns"),
      layerId: path.join(dir, "layer-id"),
      runcLog: path.join(dir, "runc.log"),
      layer: path.join(this.pool.layersDir, id),
    };
  }

  private owns(bundle: string): boolean {
    return path.dirname(bundle) === this.pool.sandboxesDir;
  }

  /** After a restart: what stats and destroy need, from the bundle. */
  private async readFacts(id: string): Promise<SandboxFacts> {
    const paths = this.paths(id);
    const oci = await this.readOciConfig(id);
    const uidBase = oci.linux?.uidMappings?.[0]?.hostID;
    if (typeof uidBase !== "number") throw new CubicleError("failed_precondition", `sandbox ${id}'s config.json names no uid range`);
    const layerId = Number((await readFile(paths.layerId, "utf8").catch(() => "")).trim()) || undefined;
    const facts: SandboxFacts = {
      cpuCount: (oci.linux?.resources?.cpu?.quota ?? CPU_PERIOD_USEC) / CPU_PERIOD_USEC,
      memoryBytes: oci.linux?.resources?.memory?.limit ?? 0,
      diskBytes: 0,
      uidBase,
      layerId,
    };
    if (layerId !== undefined) facts.diskBytes = (await this.pool.usage(layerId).catch(() => undefined))?.limitBytes ?? 0;
    this.facts.set(id, facts);
    return facts;
  }
}

/** Template trees hold the canonical ids; a tree path is passed to the helper as an argument. */
async function checkRootfsPath(dir: string): Promise<void> {
  if (/[,:\\\s]/.test(dir)) throw new CubicleError("invalid_argument", `template rootfs path ${dir} must not contain commas, colons, backslashes or spaces`);
  const info = await stat(dir).catch((err) => {
    throw new CubicleError("not_found", `the template's root filesystem is missing; rebuild the template`, { cause: err });
  });
  if (!info.isDirectory()) throw new CubicleError("failed_precondition", `the template's root filesystem is not a directory; rebuild the template`);
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
