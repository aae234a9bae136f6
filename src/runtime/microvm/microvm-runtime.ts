import { createHash } from "node:crypto";
import { constants, existsSync } from "node:fs";
import { copyFile, mkdir, mkdtemp, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { mountPoints } from "../../shared/fs.js";
import { createLogger } from "../../shared/log.js";
import { assembleAgentKit, kitSourcesIn, type AgentKit } from "../container/agent-kit.js";
import { ContainerImageStore } from "../container/container-image-store.js";
import { imageBudgetExceeded, imageId, parseImageId } from "../images.js";
import type { CheckpointInfo, CheckpointOptions, CheckpointTarget, Runtime, RuntimeState, SandboxSpec, SandboxStats } from "../types.js";
import { builtImageKey, cachedTemplateDiskImage, createOverlay, kitDiskImage, removeUnusedBuiltImages, templateDiskImage, type DiskImage } from "./disk-images.js";
import { agentLaunchFile, prepareGuestAssets, type GuestAssets } from "./guest-assets.js";
import { attachGuestNetwork, GUEST_ADDRESS, GUEST_GATEWAY, GUEST_MAC_ADDRESS, GUEST_PREFIX_LENGTH, releaseGuestNetwork, type GuestNetworkHelper } from "./net.js";
import { startShares, stopShares } from "./shares.js";
import { Microvm, MICROVM_UID_COUNT, MICROVM_UID_START, reconnectMicrovm, startMicrovm, type Accelerator, type GuestNetworkConfig, type MicrovmConfig, type QemuLauncher, guestStateChannel, MACHINE_DEVICES_VERSION, prepareGuestChroot } from "./qemu.js";
import { qemuInstall, sharesRamImages, type QemuInstall } from "./qemu-install.js";
import { SpareQemus, type Spare } from "./spare-qemus.js";

const log = createLogger("microvm");

export interface MicrovmRuntimeConfig {
  /** `<stateDir>/microvm` holds the guest assets, the disk images and the kit. */
  stateDir: string;
  /** Per-sandbox files (overlay, QMP socket, console log) under `<runDir>/microvm/<id>`. */
  runDir: string;
  /** Where the agent bundle and native helpers were built (dist/). */
  distDir: string;
  /** `kvm` only where a probe booted a guest on it (probeKvm); `tcg` otherwise. */
  accel: Accelerator;
  /** Runs QEMU in a sandbox's netns (the resident helper's exec); default nsenter. */
  launcher?: QemuLauncher;
  /** A local copy of the guest kernel package (tests, offline hosts); default apt-get download. */
  kernelDeb?: string;
  /**
   * The layer directory (`upper/` holds its files) of a template made by the template builder
   * (TemplateImage.layerImageId), from the runtime that keeps those images (the containers').
   * Without it such templates are refused.
   */
  templateLayerDir?: (template: SandboxSpec["template"]) => Promise<string>;
  /** Whether that runtime still has a layer image (by id): images of gone ones are removed at init. */
  layerExists?: (imageId: string) => Promise<boolean>;
  /**
   * The containers' resident helper (its `bind-volumes` and `teardown`), for volumes and
   * codebases (MICROVM_SHARES_NOTE). Without it creates that mount them are refused.
   */
  hostHelper?: GuestNetworkHelper & {
    teardown(bundleDir: string, layerDir: undefined): Promise<void>;
  };
  /**
   * The image budget all runtimes share (IMAGE_BUDGET_NOTE) and what the other runtimes' images
   * use of it. Without it this runtime's checkpoints are bounded only by the disk.
   */
  imageBudget?: () => { otherUsedBytes: number; limitBytes: number };
  /**
   * QEMUs kept started ahead per snapshot or warm image (SPARE_QEMU_NOTE); 0 or absent: none.
   * Needs `launcher` and `hostHelper` (the spares' taps are moved by the resident helper).
   */
  spares?: number;
}

/** Where spare QEMUs wait (SPARE_QEMU_NOTE): `<runDir>/microvm-spares/<slot>`. */
const SPARES_DIR = "microvm-spares";
/** How many images keep spares: the most recently restored or saved. */
const SPARE_IMAGES = 2;

/** The idle tiers' quiet share of a guest under TCG (idleCpuShare). */
const TCG_IDLE_CPU_SHARE = 0.2;

/** A guest directory's record of its guest. */
const GUEST_RECORD = "guest.json";

/** What a guest's directory records of it (guest.json), to adopt it after a server restart. */
interface GuestRecord {
  netnsPath: string;
  memoryBytes: number;
  cpuCount: number;
  diskBytes: number;
  uid: number;
  /** virtiofs shares it has (volumes, codebases): its state cannot be saved then. */
  shares?: number;
  /** The template's base image its root overlay is made on (the qcow2's backing file). */
  baseImage?: string;
  /** The kit disk its QEMU has (a guest restored from an older image keeps that image's). */
  kitDisk?: string;
  /** Its RAM as a file (MICROVM_RAM_NOTE): its own, shared, in the RAM tmpfs; or an image's, mapped private. */
  ram?: { file: string; mode: "shared" | "image" };
}

/** What a microVM image's meta.json holds (MICROVM_IMAGE_NOTE). */
interface MicrovmImageMeta {
  runtime: "microvm";
  /** false: the disk alone (MICROVM_FILES_NOTE), no `state`; a restore boots from it. */
  memory: boolean;
  createdAt: string;
  sizeBytes: number;
  memoryMiB: number;
  cpuCount: number;
  diskBytes: number;
  /** The kit disk and the guest kernel it ran: a restore needs the very same. */
  kitImage: string;
  kernelVersion: string;
  /** The QEMU device set it was saved with (MACHINE_DEVICES_VERSION): a load needs the same. */
  devices: number;
  /** The template's base image under the disk's copy (its backing file), when known. */
  baseImage?: string;
  /** The RAM is the `ram` file, and `state` holds the devices alone (MICROVM_RAM_NOTE); else `state` holds both. */
  ramFile?: boolean;
  /** `state.ram`: the devices alone, written when a stream image was given its RAM file (RAM_FILE_CONVERSION_NOTE); else `state`. */
  stateFile?: typeof CONVERTED_STATE_FILE;
}

/** The files of a microVM image. */
const IMAGE_FILES = { state: "state", rootDisk: "root.qcow2", meta: "meta.json", ram: "ram" } as const;
/** The device state of an image converted to a RAM file (RAM_FILE_CONVERSION_NOTE). */
const CONVERTED_STATE_FILE = "state.ram";

/** The file of an image that holds its device state (and, without a RAM file, its RAM). */
function stateFileOf(meta: MicrovmImageMeta): string {
  return meta.stateFile ?? IMAGE_FILES.state;
}

/**
 * MICROVM_RAM_NOTE (QEMU 8.2+, QEMU_INSTALL_NOTE): a guest's RAM is a file, so that guests made
 * from one memory image share its pages. A booted guest's RAM is a file of its own in the
 * runtime's RAM tmpfs (`<runDir>/microvm-ram`, mounted at init, as large as the host's memory:
 * no other user of /dev/shm can fill it under a guest), mapped shared. Its state is then saved
 * without the RAM (QEMU's `x-ignore-shared`: devices only, a few hundred KiB), and the file is
 * copied into the image as `ram` (sparse: holes and zero blocks take no disk) while the vCPUs are
 * still stopped. A guest restored from such an image maps the image's `ram` read-only and
 * private (`readonly=on,rom=off`): its pages are the page cache's, shared by every guest of the
 * image until one writes a page, which then becomes that guest's own (copy-on-write), and the
 * file is opened read-only, so a QEMU a guest took over cannot change what other guests read.
 * A guest restored that way has private RAM, which `x-ignore-shared` cannot leave out: its own
 * image holds its RAM in `state` as before, and a guest restored from that one gets a shared
 * RAM file again (its pages loaded into it). Images are never written after they are made, so
 * the page cache under the private mappings never changes.
 */
const RAM_TMPFS = "microvm-ram";

/**
 * RAM_FILE_CONVERSION_NOTE: an image saved from a restored guest holds its RAM in its stream
 * (MICROVM_RAM_NOTE), so every guest restored from it loads a copy of its own and no page is
 * shared. Most guests are restored ones (a template's warm image), so a snapshot of one is
 * converted in the background, a second after it is taken, one image at a time: a QEMU of the
 * image's shape is started as a spare is (SPARE_QEMU_NOTE), with a shared RAM file of its own,
 * the stream is loaded into it (its vCPUs never run), its devices alone are saved into
 * `state.ram` and its RAM file copied into the image as `ram`; then meta.json is replaced
 * (atomically, by rename) to name both, and the stream goes. The swap waits until no restore of
 * the image is loading its state and holds new ones back while it runs (a few milliseconds), so
 * a restore reads either the old files or the new ones; files are only added before the swap,
 * so the image is whole whenever the process dies, and init() removes what a crash left. A
 * fork's image (`transient`) is restored at once and then removed: it is converted before the
 * checkpoint returns when two or more restores follow (a fork of one loads the stream once, as
 * the conversion would; each of more would load a copy of its own, held privately by each).
 */
const CONVERSION_DELAY_MS = 1000;

interface Guest extends GuestRecord {
  vm: Microvm;
  dir: string;
  overlay: string;
}

/**
 * MICROVM_RUNTIME_NOTE (issue 17): a sandbox as a QEMU microVM (src/runtime/microvm: the guest
 * kernel and initramfs, the template rootfs as an ext4 base image under a qcow2 overlay per
 * sandbox, the agent kit on a read-only disk, a tap in the sandbox's netns behind an address
 * translation, GUEST_NETWORK_NOTE). Create, destroy, freeze/thaw (QMP stop/cont), state, list
 * and stats work, and memory images (checkpoint and restore, and with them snapshots, forks,
 * rollbacks, pauses to disk: MICROVM_IMAGE_NOTE). A template the template builder made runs too:
 * its layer and base become one disk image (BUILT_TEMPLATE_IMAGE_NOTE). A guest outlives a
 * server restart: init() reconnects to the QEMU in each guest directory (guest.json says what it
 * is) and ends those that do not answer, so recovery adopts a running guest and removes one
 * nobody owns. Each QEMU is confined once started (QEMU_CONFINE_NOTE): a uid of its own, a chroot
 * of its own, QEMU's seccomp filter. Volumes and codebases are virtiofs shares (MICROVM_SHARES_NOTE).
 */
export class MicrovmRuntime implements Runtime {
  readonly name = "microvm" as const;
  /**
   * MICROVM_IMAGE_NOTE: a microVM image is a directory (the container runtime's store layout,
   * under `<stateDir>/microvm/images`): `state`, QEMU's saved device state and RAM
   * (MICROVM_STATE_NOTE); `root.qcow2`, a copy of the guest's root overlay taken while QEMU had
   * flushed and released it (its backing file is the template's base image, which must still be
   * there to restore); `meta.json`, the machine's shape (vCPUs, memory, disk), the kit disk and
   * the guest kernel it ran, which a restore must use again, and the bytes it takes. Guests
   * with virtiofs shares cannot be saved with their memory (QEMU 7.2 cannot migrate
   * vhost-user-fs).
   *
   * MICROVM_FILES_NOTE: an image without memory (a pause with `memory: false`, a `layer`
   * checkpoint) is `root.qcow2` and `meta.json` only: the guest is stopped (QMP stop, which
   * drains and flushes QEMU's block layer) and its overlay copied. What the guest's own kernel
   * had not written yet is not in it, as upstream says of its disk-only pauses ("crash-recovery
   * semantics"); the core runs `sync` in the guest first (pause.ts), so only writes made after
   * that are at risk. A restore boots a fresh guest (the current kernel and kit) on a copy of
   * that disk, with the sandbox's volumes and codebases as at a create.
   */
  readonly images: ContainerImageStore;
  private assets: GuestAssets | undefined;
  private kit: AgentKit | undefined;
  private kitImage: DiskImage | undefined;
  private readonly guests = new Map<string, Guest>();
  private readonly exitListeners: ((sandboxId: string) => void)[] = [];
  /** The next guest uid to try (round robin over MICROVM_UID_COUNT: a freed id is reused late). */
  private nextUid = 0;
  /** Sandboxes being torn down on purpose: their QEMU's end is no crash. */
  private readonly stopping = new Set<string>();
  private readonly qemu: QemuInstall;
  /** Guests' RAM as files (MICROVM_RAM_NOTE): false with a QEMU older than 8.2. */
  private readonly ramFiles: boolean;

  /** QEMUs started ahead for the images restored most (SPARE_QEMU_NOTE); none without the helper. */
  private readonly spares: SpareQemus | undefined;
  /** Stream images being given a RAM file, one at a time (RAM_FILE_CONVERSION_NOTE). */
  private conversions: Promise<void> = Promise.resolve();
  /** The QEMUs of the conversions in progress (a fork's and the background one). */
  private readonly converting = new Set<Spare>();
  /** Images queued for conversion or being converted: they get spares once it is done. */
  private readonly toConvert = new Set<string>();
  /** Images saved `transient` (a fork's): restored in one burst, then removed; no spares. */
  private readonly transient = new Set<string>();
  private conversionSlot = 0;
  /** Restores in progress by image id, and the images whose files are being swapped now. */
  private readonly loading = new Map<string, number>();
  private readonly swapping = new Map<string, Promise<void>>();
  private closed = false;

  constructor(private readonly config: MicrovmRuntimeConfig) {
    // An image's spares end before it goes: they map its RAM file and hold a copy of its disk.
    this.images = new ContainerImageStore(path.join(config.stateDir, "microvm", "images"), {
      beforeRemove: async (id) => {
        this.transient.delete(id);
        await this.spares?.drop(id);
      },
    });
    this.qemu = qemuInstall();
    this.ramFiles = sharesRamImages(this.qemu);
    const perImage = config.spares ?? 0;
    this.spares =
      perImage > 0 && config.launcher && config.hostHelper
        ? new SpareQemus({ perImage, images: SPARE_IMAGES, spawn: (imageId, slot) => this.spawnSpare(imageId, slot), discard: (spare) => this.discardSpare(spare) })
        : undefined;
  }

  /**
   * The device set of this runtime's guests (MACHINE_DEVICES_VERSION), one more with RAM files,
   * whose memory backend is another device (MICROVM_RAM_NOTE): images of the one never load into the other.
   */
  private get devicesVersion(): number {
    return MACHINE_DEVICES_VERSION + (this.ramFiles ? 1 : 0);
  }

  /** Where booted guests' RAM files are: a tmpfs of the runtime's own (MICROVM_RAM_NOTE). */
  private get ramDir(): string {
    return path.join(this.config.runDir, RAM_TMPFS);
  }

  private sharedRamOf(sandboxId: string): { file: string; mode: "shared" } | undefined {
    return this.ramFiles ? { file: path.join(this.ramDir, `${sandboxId}.ram`), mode: "shared" } : undefined;
  }

  /** Unmounts the RAM tmpfs (tests, a host's teardown): only when no guest of this runtime is left. */
  async releaseHostMounts(): Promise<void> {
    if (this.guests.size > 0) throw new CubicleError("failed_precondition", "microVMs still use the RAM tmpfs");
    if ((await mountPoints()).includes(this.ramDir)) await runCommand(["umount", this.ramDir], { timeoutMs: 30_000 });
    await rm(this.ramDir, { recursive: true, force: true });
  }

  /** Mounts the RAM tmpfs unless it is there (a restarted server's guests still use it). */
  private async mountRamTmpfs(): Promise<void> {
    await mkdir(this.ramDir, { recursive: true, mode: 0o700 });
    if ((await mountPoints()).includes(this.ramDir)) return;
    // As large as the host's memory: guests' RAM is bounded by admission, as anonymous memory would be.
    await runCommand(["mount", "-t", "tmpfs", "-o", "mode=0700,nosuid,nodev,noexec,size=100%,huge=never", "cubicle-microvm-ram", this.ramDir], { timeoutMs: 10_000 });
  }

  private get cacheDir(): string {
    return path.join(this.config.stateDir, "microvm");
  }

  async init(): Promise<void> {
    await mkdir(this.cacheDir, { recursive: true, mode: 0o700 });
    this.assets = await prepareGuestAssets(path.join(this.cacheDir, "assets"), this.config.kernelDeb ? { kernelDeb: this.config.kernelDeb } : {});
    this.kit = await assembleAgentKit(path.join(this.cacheDir, "kit"), kitSourcesIn(this.config.distDir));
    this.kitImage = await kitDiskImage(this.kit.dir, this.cacheDir);
    // Chroots are per guest now (prepareGuestChroot): the shared empty one of earlier versions goes.
    await rm(path.join(this.cacheDir, "empty"), { recursive: true, force: true });
    await this.images.init();
    await this.clearConversionLeftovers();
    if (this.ramFiles) await this.mountRamTmpfs();
    await this.clearSpares();
    await this.adoptGuests();
    // Disk images of builder templates deleted or rebuilt since (BUILT_TEMPLATE_IMAGE_NOTE).
    const layerExists = this.config.layerExists;
    if (layerExists) {
      const removed = await removeUnusedBuiltImages(this.cacheDir, (name) => layerExists(imageId("layer", name)));
      if (removed.length > 0) log.info("removed the disk images of templates that are gone", { files: removed });
    }
  }

  /** Guests an earlier server started (their QEMU runs on): adopted, or their leftovers removed. */
  private async adoptGuests(): Promise<void> {
    const root = path.join(this.config.runDir, "microvm");
    for (const id of await readdir(root).catch(() => [] as string[])) {
      if (this.guests.has(id)) continue;
      const dir = path.join(root, id);
      const record = await readFile(path.join(dir, GUEST_RECORD), "utf8").then((text) => JSON.parse(text) as GuestRecord).catch(() => undefined);
      const vm = await reconnectMicrovm(path.join(dir, "run"));
      if (!record || !vm) {
        // Nothing runs there (a host reboot), or a QEMU the earlier server never recorded (it
        // died mid-create): it ends, and its files go.
        if (vm) await vm.quit(3000).catch(() => vm.kill());
        await this.removeGuestDir(dir).catch((err) => log.warn("could not remove a guest's leftovers", { dir, error: (err as Error).message }));
        continue;
      }
      this.track(id, { ...record, vm, dir, overlay: path.join(dir, "root.qcow2") });
      log.info("adopted a microVM an earlier server started", { sandboxId: id, pid: vm.pid });
    }
  }

  /**
   * The namespace a spare QEMU starts in, with its tap (SPARE_QEMU_NOTE): one per spare, so a
   * guest's QEMU stays alone in its network namespace (abstract sockets included) after its tap
   * moved out; named after the server (its run directory) and the spare.
   */
  private spareNetns(slot: string): string {
    return `${this.spareNetnsPrefix}${slot}`;
  }

  private get spareNetnsPrefix(): string {
    return `cbspare-${createHash("sha256").update(path.resolve(this.config.runDir)).digest("hex").slice(0, 12)}-`;
  }

  /** Removes a spare's namespace (its QEMU may still be in it: the namespace then lives as long as it does). */
  private async removeSpareNetns(name: string): Promise<void> {
    await runCommand(["ip", "netns", "del", name], { timeoutMs: 10_000, allowFailure: true });
  }

  /** Ends the spares an earlier server left (a crash) and their namespace. */
  private async clearSpares(): Promise<void> {
    const root = path.join(this.config.runDir, SPARES_DIR);
    for (const slot of await readdir(root).catch(() => [] as string[])) {
      const dir = path.join(root, slot);
      const vm = await reconnectMicrovm(path.join(dir, "run"), 1000);
      if (vm) await vm.quit(3000).catch(() => vm.kill());
      await rm(dir, { recursive: true, force: true });
      await rm(path.join(this.ramDir, `.spare-${slot}.ram`), { force: true });
    }
    // Their namespaces (only a spare's own tap is in one; a tap moved out to a sandbox is not).
    for (const name of await readdir("/var/run/netns").catch(() => [] as string[])) {
      if (name.startsWith(this.spareNetnsPrefix)) await this.removeSpareNetns(name);
    }
  }

  /** Ends the spare QEMUs (a server's stop): guests run on and are adopted by the next start. */
  async close(): Promise<void> {
    this.closed = true;
    for (const spare of this.converting) spare.vm.kill();
    await this.conversions;
    if (!this.spares) return;
    await this.spares.close();
    await this.clearSpares();
  }

  /** An image restored or saved keeps spares when it is restored again and again: a snapshot's, a warm one. */
  private wantSpares(imageIdValue: string): void {
    if (this.toConvert.has(imageIdValue) || this.transient.has(imageIdValue)) return;
    const kind = parseImageId(imageIdValue).kind;
    if (kind === "snapshot" || kind === "warm") this.spares?.want(imageIdValue);
  }

  /**
   * A QEMU for the image, started ahead (SPARE_QEMU_NOTE): the image's machine shape, RAM file
   * and a copy of its disk, confined, waiting for the state in a network namespace of its own.
   */
  private async spawnSpare(imageIdValue: string, slot: number, prefix: "s" | "c" = "s"): Promise<Spare | undefined> {
    const { assets, kit } = this;
    if (!assets || !kit || !(await this.images.exists(imageIdValue))) return undefined;
    const imageDir = this.images.dirOf(imageIdValue);
    const meta = await readImageMeta(imageDir).catch(() => undefined);
    if (!meta?.memory || !this.restorable(meta, imageDir)) return undefined;
    const name = `${prefix}${slot % 1_000_000_000}`;
    const dir = path.join(this.config.runDir, SPARES_DIR, name);
    const netnsName = this.spareNetns(name);
    const tapName = `q${name}`;
    const overlay = path.join(dir, "root.qcow2");
    const uid = this.guestUid();
    const ownRamFile = !meta.ramFile && this.ramFiles ? path.join(this.ramDir, `.spare-${name}.ram`) : undefined;
    try {
      await rm(dir, { recursive: true, force: true });
      await mkdir(dir, { recursive: true, mode: 0o700 });
      await this.removeSpareNetns(netnsName);
      await runCommand(["ip", "netns", "add", netnsName], { timeoutMs: 10_000 });
      await copyFile(path.join(imageDir, IMAGE_FILES.rootDisk), overlay, constants.COPYFILE_FICLONE);
      const launchFile = path.join(dir, "launch");
      await writeFile(launchFile, agentLaunchFile({ sandboxId: name, templateEnv: {}, kitCommand: kit.command, shares: [] }), { mode: 0o600 });
      await prepareGuestChroot(MicrovmRuntime.chrootOf(dir), overlay, uid, { incoming: true });
      if (ownRamFile) await rm(ownRamFile, { force: true });
      const ram = meta.ramFile ? { file: path.join(imageDir, IMAGE_FILES.ram), mode: "image" as const } : ownRamFile ? { file: ownRamFile, mode: "shared" as const } : undefined;
      const vm = await this.startQemu({
        accel: this.config.accel,
        assets,
        memoryMiB: meta.memoryMiB,
        cpuCount: meta.cpuCount,
        rootDisk: overlay,
        kitDisk: meta.kitImage,
        network: { tapName, macAddress: GUEST_MAC_ADDRESS, address: GUEST_ADDRESS, prefixLength: GUEST_PREFIX_LENGTH, gateway: GUEST_GATEWAY },
        launchFile,
        runDir: path.join(dir, "run"),
        netnsPath: `/var/run/netns/${netnsName}`,
        confine: { uid, gid: uid, chrootDir: MicrovmRuntime.chrootOf(dir) },
        qemu: this.qemu,
        incoming: true,
        ...(ram ? { ram } : {}),
      });
      // Which image it waits for (diagnostics, tests; the runtime keeps that in memory), written
      // last: the spare is in the pool before anything else runs here.
      await writeFile(path.join(dir, "spare.json"), JSON.stringify({ imageId: imageIdValue }) + "\n", { mode: 0o600 }).catch(async (err) => {
        await vm.quit(2000).catch(() => vm.kill());
        throw err;
      });
      return { imageId: imageIdValue, stamp: imageStamp(meta), dir, vm, uid, tapName, netnsName, ...(ownRamFile ? { ownRamFile } : {}) };
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      await this.removeSpareNetns(netnsName);
      if (ownRamFile) await rm(ownRamFile, { force: true });
      throw err;
    }
  }

  private async discardSpare(spare: Spare): Promise<void> {
    await spare.vm.quit(3000).catch(() => spare.vm.kill());
    await rm(spare.dir, { recursive: true, force: true });
    if (spare.ownRamFile) await rm(spare.ownRamFile, { force: true });
    await this.removeSpareNetns(spare.netnsName);
  }

  /** Whether what a memory image needs is all here (restore() says which part is not). */
  private restorable(meta: MicrovmImageMeta, imageDir: string): boolean {
    return (
      meta.kernelVersion === this.assets?.kernelVersion &&
      meta.devices === this.devicesVersion &&
      existsSync(meta.kitImage) &&
      (!meta.baseImage || existsSync(meta.baseImage)) &&
      (!meta.ramFile || (this.ramFiles && existsSync(path.join(imageDir, IMAGE_FILES.ram))))
    );
  }

  /**
   * A restore into a spare (SPARE_QEMU_NOTE): its directory becomes the sandbox's, its tap moves
   * into the sandbox's netns, and the state goes into its QEMU. On failure the spare is gone.
   */
  private async restoreIntoSpare(spec: SandboxSpec, imageIdValue: string, meta: MicrovmImageMeta, spare: Spare): Promise<void> {
    const id = spec.sandboxId;
    const imageDir = this.images.dirOf(imageIdValue);
    const dir = path.join(this.config.runDir, "microvm", id);
    const started = performance.now();
    let vm: Microvm = spare.vm;
    try {
      await mkdir(path.dirname(dir), { recursive: true, mode: 0o700 });
      await rename(spare.dir, dir);
      // The same QEMU and QMP connection; its files are under the new directory now.
      vm = new Microvm(spare.vm.pid, spare.vm.qmp, path.join(dir, "run"), true);
      const ram = meta.ramFile ? { file: path.join(imageDir, IMAGE_FILES.ram), mode: "image" as const } : spare.ownRamFile ? this.sharedRamOf(id) : undefined;
      if (spare.ownRamFile && ram) await rename(spare.ownRamFile, ram.file);
      await spec.networkReady;
      const through = this.guestNetworkHelper(dir)!;
      await attachGuestNetwork(spec.network, {}, { ...through, spareTap: { netnsName: spare.netnsName, tapName: spare.tapName } });
      await vm.loadState(path.join(imageDir, stateFileOf(meta)), guestStateChannel(MicrovmRuntime.chrootOf(dir)), { withoutSharedRam: meta.ramFile === true });
      await vm.resume();
      const record: GuestRecord = { netnsPath: spec.network.netnsPath, memoryBytes: meta.memoryMiB * 1024 * 1024, cpuCount: meta.cpuCount, diskBytes: meta.diskBytes, uid: spare.uid, shares: 0, kitDisk: meta.kitImage, ...(meta.baseImage ? { baseImage: meta.baseImage } : {}), ...(ram ? { ram } : {}) };
      this.track(id, { ...record, vm, dir, overlay: path.join(dir, "root.qcow2") });
      await writeFile(path.join(dir, GUEST_RECORD), JSON.stringify(record), { mode: 0o600 });
      log.debug("restored into a spare QEMU", { sandboxId: id, imageId: imageIdValue, ms: Math.round(performance.now() - started) });
      // Its namespace's name goes (QEMU alone keeps it), a little later: not beside the guest's first steps.
      setTimeout(() => void this.removeSpareNetns(spare.netnsName), 2000).unref();
    } catch (err) {
      await this.removeSpareNetns(spare.netnsName);
      if (!this.guests.has(id)) await vm.quit(2000).catch(() => vm.kill());
      if (spare.ownRamFile) await rm(spare.ownRamFile, { force: true });
      await rm(spare.dir, { recursive: true, force: true });
      await this.destroy(id).catch((cleanup) => log.warn("could not remove a failed restore's guest", { dir, error: (cleanup as Error).message }));
      throw err;
    }
  }

  /** Keeps a guest and tells the listeners when its QEMU ends on its own. */
  private track(id: string, guest: Guest): void {
    this.guests.set(id, guest);
    void guest.vm.exited.then(() => {
      if (this.stopping.has(id) || this.guests.get(id) !== guest) return;
      log.warn("a microVM ended on its own", { sandboxId: id, console: "see its serial log" });
      for (const listener of this.exitListeners) listener(id);
    });
  }

  /** A guest's QEMU: its directory's files (root overlay, launch file, run dir, chroot), confined to `uid`. */
  private qemuConfig(dir: string, uid: number, spec: SandboxSpec, network: GuestNetworkConfig, shape: { memoryMiB: number; cpuCount: number }): MicrovmConfig {
    return {
      accel: this.config.accel,
      assets: this.assets!,
      memoryMiB: shape.memoryMiB,
      cpuCount: shape.cpuCount,
      rootDisk: path.join(dir, "root.qcow2"),
      kitDisk: this.kitImage!.path,
      network,
      hostname: spec.hostname,
      launchFile: path.join(dir, "launch"),
      runDir: path.join(dir, "run"),
      netnsPath: spec.network.netnsPath,
      confine: { uid, gid: uid, chrootDir: MicrovmRuntime.chrootOf(dir) },
      qemu: this.qemu,
    };
  }

  private startQemu(config: MicrovmConfig): Promise<Microvm> {
    return startMicrovm(config, this.config.launcher ? { launcher: this.config.launcher } : {});
  }

  /** A guest's chroot (QEMU_CONFINE_NOTE), inside its directory. */
  /** The tap and its translation through the resident helper, the ruleset written in the guest's directory (attachGuestNetwork). */
  private guestNetworkHelper(dir: string): { helper: GuestNetworkHelper; rulesetFile: string } | undefined {
    const helper = this.config.hostHelper;
    return helper ? { helper, rulesetFile: path.join(dir, "guest-nat.nft") } : undefined;
  }

  private static chrootOf(dir: string): string {
    return path.join(dir, "chroot");
  }

  /**
   * The disk image of a template the template builder made: its layer's files over its base's
   * (BUILT_TEMPLATE_IMAGE_NOTE). Made once per layer image and size.
   *
   * BUILT_TEMPLATE_IMAGE_NOTE: a built template is a layer image (an overlay upper: its files,
   * whiteouts for what a step removed, opaque directories) on a base rootfs. For a guest both
   * become one ext4 tree: the layer's upper and the base are mounted as a read-only overlay (two
   * lower layers, so the kernel applies the whiteouts and opaque directories exactly as for a
   * container) and the image is made from that mount, which is then removed. Its file name holds
   * the layer image's name: a server start removes the images whose layer is gone.
   */
  private async builtTemplateImage(template: SandboxSpec["template"], sizing: { sizeMiB?: number }): Promise<DiskImage> {
    const layerDir = await this.config.templateLayerDir!(template);
    const cacheKey = builtImageKey(parseImageId(template.layerImageId!).name, `${template.rootfsDir}\0${sizing.sizeMiB ?? ""}`);
    const cached = await cachedTemplateDiskImage(this.cacheDir, cacheKey);
    if (cached) return cached;
    const merged = await mkdtemp(path.join(this.cacheDir, "merge-"));
    try {
      await runCommand(["mount", "-t", "overlay", "overlay", "-o", `ro,lowerdir=${path.join(layerDir, "upper")}:${template.rootfsDir}`, merged], { timeoutMs: 30_000 });
      try {
        return await templateDiskImage(merged, this.cacheDir, { ...sizing, cacheKey });
      } finally {
        await runCommand(["umount", merged], { timeoutMs: 30_000 });
      }
    } finally {
      await rm(merged, { recursive: true, force: true });
    }
  }

  /** A uid no live guest holds. */
  private guestUid(): number {
    const used = new Set([...this.guests.values()].map((guest) => guest.uid));
    for (const uid of this.spares?.uids() ?? []) used.add(uid);
    for (const spare of this.converting) used.add(spare.uid);
    for (let tries = 0; tries < MICROVM_UID_COUNT; tries++) {
      const uid = MICROVM_UID_START + (this.nextUid++ % MICROVM_UID_COUNT);
      if (!used.has(uid)) return uid;
    }
    throw new CubicleError("resource_exhausted", "no guest uid is free");
  }

  /**
   * Removes a guest's directory once its QEMU is gone: its shares stopped and unmounted first
   * (MICROVM_SHARES_NOTE), so nothing is ever removed through a volume or a codebase.
   */
  private async removeGuestDir(dir: string): Promise<void> {
    const helper = this.config.hostHelper;
    await stopShares(dir, async (mounts) => {
      if (!helper) throw new CubicleError("internal", "a microVM's shares are mounted and this runtime has no helper to unmount them");
      await helper.teardown(mounts, undefined);
    });
    await rm(dir, { recursive: true, force: true });
    // Its own RAM file, if it had one (MICROVM_RAM_NOTE); QEMU is gone, so nothing maps it.
    const ram = this.sharedRamOf(path.basename(dir));
    if (ram) await rm(ram.file, { force: true });
  }

  async create(spec: SandboxSpec): Promise<void> {
    await this.boot(spec, undefined);
  }

  /** Boots a guest on a new overlay of its template's image, or on a copy of an image's disk (`disk`, MICROVM_FILES_NOTE). */
  private async boot(spec: SandboxSpec, disk: { base: string; copyOf: string } | undefined): Promise<void> {
    const mounts = (spec.volumes?.length ?? 0) + (spec.codebases?.length ?? 0) > 0;
    if (mounts && !this.config.hostHelper) throw new CubicleError("failed_precondition", "this server's microVMs cannot mount volumes or codebases: create the sandbox with runtime \"container\"");
    const { assets, kit, kitImage } = this;
    if (!assets || !kit || !kitImage) throw new CubicleError("failed_precondition", "the microVM runtime is not initialised; call init() first");
    if (spec.template.layerImageId && !this.config.templateLayerDir) {
      throw new CubicleError("failed_precondition", `template ${spec.template.templateId} was built with the template builder, and this microVM runtime cannot read its layer`);
    }
    const id = spec.sandboxId;
    if (this.guests.has(id)) throw new CubicleError("already_exists", `sandbox ${id} already exists on this host`);
    const dir = path.join(this.config.runDir, "microvm", id);
    const overlay = path.join(dir, "root.qcow2");
    const started = performance.now();
    try {
      // The guest's root file system is the sandbox's disk size (one sparse base image per template
      // and size): what it can write is bounded by the file system, as a container's quota is.
      const sizing = spec.resources.diskMiB > 0 ? { sizeMiB: spec.resources.diskMiB } : {};
      let base: { path: string };
      if (disk) {
        base = { path: disk.base };
        await mkdir(dir, { recursive: true, mode: 0o700 });
        await copyFile(disk.copyOf, overlay, constants.COPYFILE_FICLONE);
      } else {
        base = spec.template.layerImageId ? await this.builtTemplateImage(spec.template, sizing) : await templateDiskImage(spec.template.rootfsDir, this.cacheDir, sizing);
        await createOverlay(base.path, overlay);
      }
      const shares = mounts
        ? await startShares(dir, spec, { call: this.config.hostHelper!.call.bind(this.config.hostHelper), codebaseFs: path.join(this.config.distDir, "codebase-fs") })
        : [];
      const launchFile = path.join(dir, "launch");
      await writeFile(launchFile, agentLaunchFile({ sandboxId: id, templateEnv: spec.template.env, kitCommand: kit.command, shares }), { mode: 0o600 });
      await spec.networkReady;
      const guestNetwork = await attachGuestNetwork(spec.network, {}, this.guestNetworkHelper(dir));
      const uid = this.guestUid();
      await prepareGuestChroot(MicrovmRuntime.chrootOf(dir), overlay, uid);
      const ram = this.sharedRamOf(id);
      if (ram) await rm(ram.file, { force: true });
      const vm = await this.startQemu({
        ...this.qemuConfig(dir, uid, spec, guestNetwork, spec.resources),
        shares: shares.map(({ tag, socket }) => ({ tag, socket })),
        ...(ram ? { ram } : {}),
      });
      const record: GuestRecord = {
        netnsPath: spec.network.netnsPath,
        memoryBytes: spec.resources.memoryMiB * 1024 * 1024,
        cpuCount: spec.resources.cpuCount,
        diskBytes: spec.resources.diskMiB * 1024 * 1024,
        uid,
        shares: shares.length,
        baseImage: base.path,
        kitDisk: kitImage.path,
        ...(ram ? { ram } : {}),
      };
      this.track(id, { ...record, vm, dir, overlay });
      await writeFile(path.join(dir, GUEST_RECORD), JSON.stringify(record), { mode: 0o600 });
      log.debug(disk ? "booted from an image's disk" : "created", { sandboxId: id, ms: Math.round(performance.now() - started) });
    } catch (err) {
      await this.destroy(id).catch((cleanup) => log.warn("could not remove a failed guest's directory", { dir, error: (cleanup as Error).message }));
      throw err;
    }
  }

  async destroy(sandboxId: string): Promise<void> {
    const guest = this.guests.get(sandboxId);
    const dir = guest?.dir ?? path.join(this.config.runDir, "microvm", sandboxId);
    if (guest) {
      this.stopping.add(sandboxId);
      try {
        await guest.vm.quit(3000).catch(() => guest.vm.kill());
        // Through the helper, the next attach in this netns replaces the tap and the table (a
        // rollback, a resume), and a kill or a pause to disk deletes the netns with both: nothing
        // to remove here (~33 ms and an nft process saved). Without it, they go now.
        if (!this.config.hostHelper) await releaseGuestNetwork(guest.netnsPath);
      } finally {
        this.stopping.delete(sandboxId);
        this.guests.delete(sandboxId);
      }
    }
    await this.removeGuestDir(dir);
  }

  async state(sandboxId: string): Promise<RuntimeState> {
    const guest = this.guests.get(sandboxId);
    if (!guest) return "missing";
    const status = await guest.vm.status().catch(() => "gone");
    if (status === "running") return "running";
    // `postmigrate`: stopped after its state was saved (a snapshot of a frozen guest); cont runs it on.
    if (status === "paused" || status === "postmigrate") return "frozen";
    return "stopped";
  }

  async list(): Promise<string[]> {
    return [...this.guests.keys()];
  }

  async freeze(sandboxId: string): Promise<void> {
    await this.guest(sandboxId).vm.pause();
  }

  async thaw(sandboxId: string): Promise<void> {
    await this.guest(sandboxId).vm.resume();
  }

  /** Guests have no background CPU weight (yet): nothing to change. */
  async foreground(sandboxId: string): Promise<void> {
    this.guest(sandboxId);
  }

  async setHostname(sandboxId: string): Promise<void> {
    this.guest(sandboxId);
    // The guest's agent is its root and renames its host at /init (restores, pool claims).
    throw new CubicleError("failed_precondition", "a microVM's host is renamed by its own agent at /init, not from outside");
  }

  async stats(sandboxId: string): Promise<SandboxStats> {
    const guest = this.guest(sandboxId);
    const rss = await guest.vm.rssBytes().catch(() => 0);
    return { cpuUsedPct: 0, cpuCount: guest.cpuCount, memUsedBytes: Math.min(rss, guest.memoryBytes), memTotalBytes: guest.memoryBytes, memCacheBytes: 0, diskUsedBytes: 0, diskTotalBytes: guest.diskBytes };
  }

  // No cpuTimeUsec: QEMU's CPU time is the emulator's as well as the guest's (GUEST_CPU_NOTE).

  /**
   * Under TCG an idle guest spends 1-6 % of a core of its own time on a quiet host (measured: the
   * agent's timers and a request's handling, emulated), and over 10 % for a while on a busy one
   * (CI with a second suite beside it), so it counts as quiet below 20 %; a busy job takes most
   * of a core. Under KVM the default holds.
   */
  async idleCpuShare(): Promise<number | undefined> {
    return this.config.accel === "tcg" ? TCG_IDLE_CPU_SHARE : undefined;
  }

  /** The kit disk and kernel a memory image depends on (MICROVM_IMAGE_NOTE). */
  memoryImageFingerprint(): string | undefined {
    return this.kitImage && this.assets ? `${path.basename(this.kitImage.path)}+${this.assets.kernelVersion}+${this.devicesVersion}` : undefined;
  }

  async checkpoint(sandboxId: string, target: CheckpointTarget, options: CheckpointOptions): Promise<CheckpointInfo & { imageId: string }> {
    const guest = this.guest(sandboxId);
    const { kitImage, assets } = this;
    if (!kitImage || !assets) throw new CubicleError("failed_precondition", "the microVM runtime is not initialised; call init() first");
    // Without memory it is the disk alone (MICROVM_FILES_NOTE), whose restore boots on its template's image.
    if (!options.memory && !guest.baseImage) throw new CubicleError("failed_precondition", "this microVM's disk has no known template image under it; its files cannot be saved");
    if (options.memory && guest.shares) throw new CubicleError("failed_precondition", "a microVM with volumes or codebases mounted cannot be snapshotted or paused to disk yet (virtiofs state cannot be saved)");
    await this.checkImageBudget(guest, options.memory);
    const pending = await this.images.allocate(target.kind, target.name);
    const before = await guest.vm.status();
    const started = performance.now();
    let frozenMs = 0;
    try {
      if (before === "running") await guest.vm.pause();
      // A shared RAM file is left out of the stream and copied, while the vCPUs are stopped (MICROVM_RAM_NOTE).
      const ramFile = options.memory && guest.ram?.mode === "shared" ? guest.ram.file : undefined;
      let stateBytes = options.memory ? await guest.vm.saveState(path.join(pending.dir, IMAGE_FILES.state), guestStateChannel(MicrovmRuntime.chrootOf(guest.dir)), { withoutSharedRam: ramFile !== undefined }) : 0;
      if (ramFile) {
        const copy = path.join(pending.dir, IMAGE_FILES.ram);
        await this.copyRamFile(ramFile, copy);
        stateBytes += (await stat(copy)).blocks * 512;
      }
      // QEMU flushed and released the disk at the end of the save (or at the stop): the copy is consistent.
      await copyFile(guest.overlay, path.join(pending.dir, IMAGE_FILES.rootDisk), constants.COPYFILE_FICLONE);
      const diskFileBytes = (await stat(path.join(pending.dir, IMAGE_FILES.rootDisk))).blocks * 512;
      if (options.leaveRunning) {
        if (before === "running") await guest.vm.resume();
      } else {
        this.stopping.add(sandboxId);
        try {
          await guest.vm.quit(3000).catch(() => guest.vm.kill());
        } finally {
          this.stopping.delete(sandboxId);
        }
        // Its RAM is in the image now; the tmpfs pages go at once, not at the guest's teardown.
        if (guest.ram?.mode === "shared") await rm(guest.ram.file, { force: true });
      }
      frozenMs = performance.now() - started;
      const meta: MicrovmImageMeta = {
        runtime: "microvm",
        memory: options.memory,
        createdAt: new Date().toISOString(),
        sizeBytes: stateBytes + diskFileBytes,
        memoryMiB: Math.round(guest.memoryBytes / (1024 * 1024)),
        cpuCount: guest.cpuCount,
        diskBytes: guest.diskBytes,
        kitImage: guest.kitDisk ?? kitImage.path,
        kernelVersion: assets.kernelVersion,
        devices: this.devicesVersion,
        ...(guest.baseImage ? { baseImage: guest.baseImage } : {}),
        ...(ramFile ? { ramFile: true } : {}),
      };
      await writeFile(path.join(pending.dir, IMAGE_FILES.meta), JSON.stringify(meta, null, 2) + "\n", { mode: 0o600 });
      const info = await this.images.commit(pending);
      if (options.transient) this.transient.add(info.id);
      // A fork's copies map one RAM file instead of each loading the stream (RAM_FILE_CONVERSION_NOTE).
      if (options.memory && options.transient && options.transient.restores > 1 && ramFile === undefined && this.canConvert(info.id)) {
        await this.convertToRamFile(info.id).catch((err: Error) => log.warn("a fork's image keeps its RAM in its stream: converting it failed", { imageId: info.id, error: err.message }));
      }
      // Spares for an image that will be converted wait for it: they would load its stream.
      if (options.memory && !options.transient && !(ramFile === undefined && this.convertInBackground(info.id))) this.wantSpares(info.id);
      log.debug("checkpoint", { sandboxId, imageId: info.id, stateBytes, frozenMs: Math.round(frozenMs) });
      return { imageId: info.id, sizeBytes: info.sizeBytes, frozenMs, memory: options.memory };
    } catch (err) {
      await this.images.abandon(pending);
      // The guest goes on as it was: a failed save must not leave it stopped.
      if (before === "running" && this.guests.get(sandboxId) === guest) await guest.vm.resume().catch(() => undefined);
      throw err;
    }
  }

  /**
   * Refuses (507) a checkpoint that would pass the shared image budget (IMAGE_BUDGET_NOTE) before
   * anything is stopped or written: this one's likely size is the root overlay's allocated bytes
   * and, with memory, QEMU's resident memory (the guest RAM it touched, plus QEMU's own: an upper
   * bound of the RAM in the saved state, whose zero pages take a few bytes).
   */
  private async checkImageBudget(guest: Guest, memory: boolean): Promise<void> {
    const budget = this.config.imageBudget?.();
    if (!budget) return;
    const diskBytes = await stat(guest.overlay).then((s) => s.blocks * 512).catch(() => 0);
    const memoryBytes = memory ? await guest.vm.rssBytes().catch(() => guest.memoryBytes) : 0;
    const needed = diskBytes + memoryBytes;
    const used = this.images.usedBytes() + budget.otherUsedBytes;
    if (used + needed > budget.limitBytes) throw imageBudgetExceeded(used, budget.limitBytes, needed);
  }

  async restore(spec: SandboxSpec, imageId: string): Promise<void> {
    // Counted from before its meta.json is read until its state is loaded (RAM_FILE_CONVERSION_NOTE).
    for (let swap = this.swapping.get(imageId); swap; swap = this.swapping.get(imageId)) await swap;
    this.loading.set(imageId, (this.loading.get(imageId) ?? 0) + 1);
    try {
      await this.restoreImage(spec, imageId);
    } finally {
      const left = (this.loading.get(imageId) ?? 1) - 1;
      if (left > 0) this.loading.set(imageId, left);
      else this.loading.delete(imageId);
    }
  }

  private async restoreImage(spec: SandboxSpec, imageId: string): Promise<void> {
    const { assets, kit, kitImage } = this;
    if (!assets || !kit || !kitImage) throw new CubicleError("failed_precondition", "the microVM runtime is not initialised; call init() first");
    const info = await this.images.info(imageId);
    if (!info) throw new CubicleError("not_found", `image ${imageId} does not exist`);
    if (info.runtime !== "microvm") throw new CubicleError("failed_precondition", `image ${imageId} was made by the ${info.runtime} runtime; microVMs restore only their own`);
    const imageDir = this.images.dirOf(imageId);
    const meta = await readImageMeta(imageDir);
    if (!meta.memory) {
      if (!meta.baseImage || !existsSync(meta.baseImage)) throw new CubicleError("failed_precondition", `image ${imageId} was made on a template disk image that is gone (the template was rebuilt or deleted); it cannot be restored`);
      const disk = { base: meta.baseImage, copyOf: path.join(imageDir, IMAGE_FILES.rootDisk) };
      await this.boot({ ...spec, resources: { ...spec.resources, diskMiB: Math.round(meta.diskBytes / (1024 * 1024)) } }, disk);
      await spec.whenRunning?.();
      return;
    }
    if (meta.ramFile && !existsSync(path.join(imageDir, IMAGE_FILES.ram))) throw new CubicleError("failed_precondition", `the image ${imageId} is damaged (its RAM file is missing)`);
    if (meta.ramFile && !this.ramFiles) throw new CubicleError("failed_precondition", `image ${imageId} keeps its RAM as a file, which this server's QEMU (${this.qemu.version.major}.${this.qemu.version.minor}) cannot map; QEMU 8.2+ can (scripts/setup-host.sh unpacks one)`);
    if (meta.kernelVersion !== assets.kernelVersion || meta.devices !== this.devicesVersion) {
      throw new CubicleError("failed_precondition", `image ${imageId} was made with another guest kernel or QEMU device set than this server runs; it cannot be restored`);
    }
    // The kit disk the guest ran with (its kernel caches what it read of it): an image made before
    // an upgrade restores with its own kit disk, which stays in the cache directory.
    if (!existsSync(meta.kitImage)) throw new CubicleError("failed_precondition", `image ${imageId} was made with an agent kit disk that is gone; it cannot be restored`);
    if ((spec.volumes?.length ?? 0) + (spec.codebases?.length ?? 0) > 0) throw new CubicleError("failed_precondition", "a microVM restored from an image cannot mount volumes or codebases yet");
    if (meta.baseImage && !existsSync(meta.baseImage)) throw new CubicleError("failed_precondition", `image ${imageId} was made on a template disk image that is gone (the template was rebuilt or deleted); it cannot be restored`);
    const id = spec.sandboxId;
    if (this.guests.has(id)) throw new CubicleError("already_exists", `sandbox ${id} already exists on this host`);
    const spare = this.spares?.take(imageId, imageStamp(meta));
    this.wantSpares(imageId);
    if (spare) {
      try {
        await this.restoreIntoSpare(spec, imageId, meta, spare);
        await spec.whenRunning?.();
        return;
      } catch (err) {
        // The spare is gone; a QEMU of its own may still load the state (the error was the spare's).
        if (this.guests.has(id)) throw err;
        log.warn("a restore into a spare QEMU failed; starting one", { sandboxId: id, imageId, error: (err as Error).message });
      }
    }
    const dir = path.join(this.config.runDir, "microvm", id);
    const overlay = path.join(dir, "root.qcow2");
    const started = performance.now();
    let vm: Microvm | undefined;
    try {
      await mkdir(dir, { recursive: true, mode: 0o700 });
      await copyFile(path.join(imageDir, IMAGE_FILES.rootDisk), overlay, constants.COPYFILE_FICLONE);
      const launchFile = path.join(dir, "launch");
      await writeFile(launchFile, agentLaunchFile({ sandboxId: id, templateEnv: spec.template.env, kitCommand: kit.command, shares: [] }), { mode: 0o600 });
      await spec.networkReady;
      const guestNetwork = await attachGuestNetwork(spec.network, {}, this.guestNetworkHelper(dir));
      const uid = this.guestUid();
      const channel = await prepareGuestChroot(MicrovmRuntime.chrootOf(dir), overlay, uid, { incoming: true });
      // The image's RAM mapped copy-on-write, or (RAM in the stream) a shared file of its own to load it into (MICROVM_RAM_NOTE).
      const ram = meta.ramFile ? { file: path.join(imageDir, IMAGE_FILES.ram), mode: "image" as const } : this.sharedRamOf(id);
      if (ram?.mode === "shared") await rm(ram.file, { force: true });
      // The saved machine's shape: its devices and memory must be the same to load its state.
      vm = await this.startQemu({ ...this.qemuConfig(dir, uid, spec, guestNetwork, { memoryMiB: meta.memoryMiB, cpuCount: meta.cpuCount }), kitDisk: meta.kitImage, incoming: true, ...(ram ? { ram } : {}) });
      await vm.loadState(path.join(imageDir, stateFileOf(meta)), channel, { withoutSharedRam: meta.ramFile === true });
      await vm.resume();
      const record: GuestRecord = { netnsPath: spec.network.netnsPath, memoryBytes: meta.memoryMiB * 1024 * 1024, cpuCount: meta.cpuCount, diskBytes: meta.diskBytes, uid, shares: 0, kitDisk: meta.kitImage, ...(meta.baseImage ? { baseImage: meta.baseImage } : {}), ...(ram ? { ram } : {}) };
      this.track(id, { ...record, vm, dir, overlay });
      await writeFile(path.join(dir, GUEST_RECORD), JSON.stringify(record), { mode: 0o600 });
      log.debug("restored", { sandboxId: id, imageId, ms: Math.round(performance.now() - started) });
      await spec.whenRunning?.();
    } catch (err) {
      if (vm && !this.guests.has(id)) await vm.quit(2000).catch(() => vm!.kill());
      await this.destroy(id).catch((cleanup) => log.warn("could not remove a failed restore's guest", { dir, error: (cleanup as Error).message }));
      throw err;
    }
  }

  /** Copies a RAM file sparsely: the resident helper's sparse-copy (no process start from Node), else cp. */
  private async copyRamFile(from: string, to: string): Promise<void> {
    const helper = this.config.hostHelper;
    if (helper) await helper.call("sparse-copy", ["--from", from, "--to", to], { what: "copying the guest's RAM into the image", timeoutMs: 120_000 });
    else await runCommand(["cp", "--sparse=always", from, to], { timeoutMs: 120_000 });
  }

  /** Queues the conversion of a stream image to a RAM file (RAM_FILE_CONVERSION_NOTE); false when it gets none. */
  private convertInBackground(imageIdValue: string): boolean {
    if (!this.canConvert(imageIdValue)) return false;
    this.toConvert.add(imageIdValue);
    this.conversions = this.conversions
      .then(() => sleep(CONVERSION_DELAY_MS))
      .then(() => this.convertToRamFile(imageIdValue))
      .catch((err: Error) => log.warn("an image keeps its RAM in its stream: converting it failed", { imageId: imageIdValue, error: err.message }))
      .finally(() => {
        this.toConvert.delete(imageIdValue);
        // As after its save: the image keeps spares (none if it was removed meanwhile: the spawn finds it gone).
        if (!this.closed) this.wantSpares(imageIdValue);
      });
    return true;
  }

  /** Whether this runtime can give the image a RAM file: QEMU 8.2+, the helper, a snapshot's or a warm image. */
  private canConvert(imageIdValue: string): boolean {
    const kind = parseImageId(imageIdValue).kind;
    return !this.closed && this.ramFiles && this.config.launcher !== undefined && this.config.hostHelper !== undefined && (kind === "snapshot" || kind === "warm");
  }

  /** Gives a stream image a RAM file and a device-only state (RAM_FILE_CONVERSION_NOTE). */
  private async convertToRamFile(imageIdValue: string): Promise<void> {
    if (this.closed || !(await this.images.exists(imageIdValue))) return;
    const imageDir = this.images.dirOf(imageIdValue);
    const meta = await readImageMeta(imageDir);
    if (!meta.memory || meta.ramFile) return;
    const started = performance.now();
    const ram = path.join(imageDir, IMAGE_FILES.ram);
    const devices = path.join(imageDir, CONVERTED_STATE_FILE);
    const spare = await this.spawnSpare(imageIdValue, ++this.conversionSlot, "c");
    if (!spare) return;
    this.converting.add(spare);
    let swapped = false;
    try {
      if (!spare.ownRamFile) throw new CubicleError("internal", "the converting QEMU has no RAM file of its own");
      const channel = guestStateChannel(MicrovmRuntime.chrootOf(spare.dir));
      await spare.vm.loadState(path.join(imageDir, IMAGE_FILES.state), channel);
      const deviceBytes = await spare.vm.saveState(devices, channel, { withoutSharedRam: true });
      await this.copyRamFile(spare.ownRamFile, ram);
      const ramBytes = (await stat(ram)).blocks * 512;
      const diskBytes = (await stat(path.join(imageDir, IMAGE_FILES.rootDisk))).blocks * 512;
      const converted: MicrovmImageMeta = { ...meta, ramFile: true, stateFile: CONVERTED_STATE_FILE, sizeBytes: deviceBytes + ramBytes + diskBytes };
      const metaFile = path.join(imageDir, IMAGE_FILES.meta);
      await writeFile(`${metaFile}.new`, JSON.stringify(converted, null, 2) + "\n", { mode: 0o600 });
      await this.exclusively(imageIdValue, async () => {
        if (this.closed) throw new CubicleError("canceled", "the server is stopping");
        await rename(`${metaFile}.new`, metaFile);
        swapped = true;
      });
      await rm(path.join(imageDir, IMAGE_FILES.state), { force: true });
      this.images.resized(imageIdValue, converted.sizeBytes);
      log.debug("an image's RAM is a file now", { imageId: imageIdValue, ms: Math.round(performance.now() - started), ramBytes });
    } finally {
      this.converting.delete(spare);
      await this.discardSpare(spare);
      if (!swapped) {
        for (const file of [ram, devices, path.join(imageDir, `${IMAGE_FILES.meta}.new`)]) await rm(file, { force: true });
      }
    }
  }

  /** Runs `swap` once no restore is loading the image, holding new restores back until it is done. */
  private async exclusively(imageIdValue: string, swap: () => Promise<void>): Promise<void> {
    while ((this.loading.get(imageIdValue) ?? 0) > 0 || this.swapping.has(imageIdValue)) {
      if (this.closed) throw new CubicleError("canceled", "the server is stopping");
      await sleep(20);
    }
    // Nothing runs between the check above and the entry below: restores see it from now on.
    const done = swap();
    this.swapping.set(imageIdValue, done.then(() => undefined, () => undefined));
    try {
      await done;
    } finally {
      this.swapping.delete(imageIdValue);
    }
  }

  /**
   * What a conversion cut short left in the images (RAM_FILE_CONVERSION_NOTE): before its swap,
   * the new files (unused: the image's meta.json does not name them); after it, the stream.
   */
  private async clearConversionLeftovers(): Promise<void> {
    for (const kind of ["snapshot", "warm"] as const) {
      for (const id of await this.images.list(kind)) {
        const imageDir = this.images.dirOf(id);
        const meta = await readImageMeta(imageDir).catch(() => undefined);
        if (!meta?.memory) continue;
        const stale = meta.stateFile === CONVERTED_STATE_FILE ? [IMAGE_FILES.state] : meta.ramFile ? [] : [IMAGE_FILES.ram, CONVERTED_STATE_FILE];
        for (const file of [...stale, `${IMAGE_FILES.meta}.new`]) await rm(path.join(imageDir, file), { force: true });
      }
    }
  }

  onExit(listener: (sandboxId: string) => void): void {
    this.exitListeners.push(listener);
  }

  async watch(): Promise<void> {}

  private guest(sandboxId: string): Guest {
    const guest = this.guests.get(sandboxId);
    if (!guest) throw new CubicleError("not_found", `sandbox ${sandboxId} does not exist on this host`);
    return guest;
  }
}

/** What tells one image under an id from another made later under the same id (SPARE_QEMU_NOTE). */
function imageStamp(meta: MicrovmImageMeta): string {
  return `${meta.createdAt}/${meta.sizeBytes}/${meta.ramFile ? "ram" : "stream"}`;
}

/** A microVM image's meta.json (MICROVM_IMAGE_NOTE), checked. */
async function readImageMeta(imageDir: string): Promise<MicrovmImageMeta> {
  const text = await readFile(path.join(imageDir, IMAGE_FILES.meta), "utf8").catch((err) => {
    throw new CubicleError("not_found", `the image ${path.basename(imageDir)} is not complete (no meta.json)`, { cause: err });
  });
  let meta: Partial<MicrovmImageMeta>;
  try {
    meta = JSON.parse(text) as Partial<MicrovmImageMeta>;
  } catch (err) {
    throw new CubicleError("failed_precondition", `the image ${path.basename(imageDir)} is damaged (its meta.json is not JSON)`, { cause: err });
  }
  const positive = (value: unknown) => typeof value === "number" && Number.isInteger(value) && value > 0;
  if (typeof meta !== "object" || meta === null || meta.runtime !== "microvm" || typeof meta.memory !== "boolean" || !positive(meta.memoryMiB) || !positive(meta.cpuCount) || typeof meta.kitImage !== "string" || typeof meta.kernelVersion !== "string" || (meta.ramFile !== undefined && typeof meta.ramFile !== "boolean") || (meta.stateFile !== undefined && (meta.stateFile !== CONVERTED_STATE_FILE || meta.ramFile !== true))) {
    throw new CubicleError("failed_precondition", `the image ${path.basename(imageDir)} is damaged (its meta.json is not a microVM image's)`);
  }
  return meta as MicrovmImageMeta;
}
