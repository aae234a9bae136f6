import { spawn } from "node:child_process";
import { createReadStream, createWriteStream, readFileSync } from "node:fs";
import { chmod, chown, link, mkdir, readFile, rm } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { createLogger } from "../../shared/log.js";
import { GUEST_PROBE_ARG, GUEST_PROBE_MARKER, KIT_DISK_SERIAL, LAUNCH_FW_CFG_NAME, ROOT_DISK_SERIAL, SHARE_TAG_PATTERN, type GuestAssets } from "./guest-assets.js";
import { QmpClient } from "./qmp.js";
import { hasQemuBinary, qemuCommand, qemuInstall, versionAtLeast, type QemuInstall } from "./qemu-install.js";

const log = createLogger("qemu");

/** How long a daemonizing QEMU may take to be set up (it has not run the guest yet then). */
const START_TIMEOUT_MS = 30_000;

export type Accelerator = "tcg" | "kvm";

export interface GuestNetworkConfig {
  /** The tap inside the sandbox's netns (guest-network.ts) that QEMU attaches virtio-net to. */
  tapName: string;
  macAddress: string;
  /** The guest's eth0: address and prefix length (the sandbox address). */
  address: string;
  prefixLength: number;
  /** The guest's default route (the host end of the sandbox's veth). */
  gateway: string;
}

export interface MicrovmConfig {
  /** Default qemuInstall() (QEMU_INSTALL_NOTE). */
  qemu?: QemuInstall;
  /** "kvm" only where probeKvm() said it works; never chosen here. */
  accel: Accelerator;
  assets: Pick<GuestAssets, "kernel" | "initramfs">;
  memoryMiB: number;
  cpuCount: number;
  /** The root disk: the sandbox's qcow2 overlay (read-write). */
  rootDisk: string;
  /** The kit disk: raw ext4, attached read-only. */
  kitDisk: string;
  network?: GuestNetworkConfig;
  hostname?: string;
  /** The launch file (guest-assets.ts launchScript) passed through fw_cfg. */
  launchFile?: string;
  /** This VM's own directory: QMP socket, serial log, pid file. */
  runDir: string;
  /** The sandbox's network namespace, which QEMU runs in (its tap lives there). */
  netnsPath?: string;
  /** TCG's translation cache in MiB (most of an idle TCG guest's private memory). Default 64. */
  tbSizeMiB?: number;
  /** Extra kernel command line words. */
  kernelArgs?: string[];
  /**
   * Start with the vCPUs stopped (`-S`): QMP `cont` starts the guest (a VM prepared ahead of
   * its use, or one that loads a state first).
   */
  startPaused?: boolean;
  /**
   * Start waiting for a saved state (`-incoming defer`, vCPUs stopped): Microvm.loadState feeds
   * it, then `cont` runs the guest (MICROVM_STATE_NOTE). The devices must be the saved guest's.
   */
  incoming?: boolean;
  /** TCG only: the guest's TSC rate in kHz (TCG_CLOCK_NOTE); default hostTscKhz(). */
  tscKhz?: number;
  /** Where QEMU goes once it has opened what it needs (QEMU_CONFINE_NOTE); none: it stays root. */
  confine?: QemuConfinement;
  /**
   * virtiofs shares (MICROVM_SHARES_NOTE): each a virtiofsd listening on `socket`, seen by the
   * guest under `tag`. With any, the guest's RAM must be shared (vhost-user maps it): its `ram`
   * file, or without one a shared memfd.
   */
  shares?: readonly { tag: string; socket: string }[];
  /**
   * The guest's RAM as a file (MICROVM_RAM_NOTE): `shared`, a file of its own in the runtime's
   * RAM tmpfs, mapped shared (its state is saved without the RAM, which is copied from the
   * file); `image`, a memory image's RAM file, opened read-only and mapped copy-on-write.
   * None: QEMU's own anonymous RAM (a QEMU older than 8.2).
   */
  ram?: { file: string; mode: "shared" | "image" };
}

/**
 * QEMU_CONFINE_NOTE: a guest that breaks out of the emulator (a device model bug) lands in a
 * process that is as small as QEMU can be made. After it has opened everything (kernel,
 * initramfs, disks, tap, the serial log, the QMP socket, /dev/kvm) QEMU chroots into an empty
 * read-only directory (`-chroot`) and becomes a uid and gid of its own (`-runas`, one per
 * guest, below the container ranges: MICROVM_UID_START), so it holds no capability and can open
 * no host file, reach no other guest's process and make no device; `-sandbox on` adds QEMU's
 * seccomp filter (NoNewPrivs, and no obsolete, resource-control or privileged syscalls). Two of
 * the filter's switches stay open, measured on QEMU 7.2: `spawn=deny` kills `-daemonize` (its
 * fork) and `elevateprivileges=deny` kills the `-runas` setuid that comes after the filter; the
 * setuid drops every capability anyway, and with the chroot a spawn finds no program to run.
 * The chroot is the guest's own (prepareGuestChroot): it holds nothing but the guest's root
 * disk (QEMU reopens it by path when a saved state hands it over) and the state channel.
 */
export interface QemuConfinement {
  uid: number;
  gid: number;
  /** A directory QEMU cannot write, holding only its own root disk and state channel (prepareGuestChroot). */
  chrootDir: string;
}

/** Guests' uids and gids: MICROVM_UID_COUNT ids just below the containers' ranges (2^30). */
export const MICROVM_UID_START = 2 ** 30 - 2 ** 20;
export const MICROVM_UID_COUNT = 2 ** 20;

/**
 * TCG_CLOCK_NOTE: under TCG the guest's TSC is the host's (QEMU reads the host's counter), but
 * the guest kernel measures its rate against the PIT in a few milliseconds of emulated time, and
 * on a busy host that measurement fails ("tsc: Unable to calibrate against PIT") about one boot
 * in five; the guest then has no usable clock and hangs before its console says anything more.
 * So a TCG guest is told the rate (`tsc_early_khz=`, Linux 5.1+): the host's, from
 * /proc/cpuinfo. A KVM guest gets its clock from kvmclock and is told nothing.
 */
export function hostTscKhz(cpuinfo?: string): number | undefined {
  const text = cpuinfo ?? readFileSync("/proc/cpuinfo", "utf8");
  const mhz = Number(/^cpu MHz\s*:\s*([\d.]+)$/m.exec(text)?.[1]);
  return Number.isFinite(mhz) && mhz > 0 ? Math.round(mhz * 1000) : undefined;
}

/**
 * Starts `argv` (a QEMU with -daemonize) in the network namespace `netnsPath` and resolves once
 * the foreground QEMU exited 0, i.e. the daemon runs (QEMU reports its setup errors before that).
 * The default joins the namespace with nsenter; a resident sandbox helper's `exec --netns` does
 * the same without two process starts (helperLauncher).
 */
export type QemuLauncher = (argv: readonly string[], netnsPath: string | undefined) => Promise<void>;

export const nsenterLauncher: QemuLauncher = async function nsenterLauncher(argv, netnsPath) {
  await runCommand(netnsPath ? ["nsenter", `--net=${netnsPath}`, "--", ...argv] : argv, { timeoutMs: START_TIMEOUT_MS });
};

/** What a launcher needs of the container runtime's SandboxHelper. */
export interface HelperLike {
  exec(argv: readonly string[], options: { netnsPath?: string; stdio?: "null" | "capture"; timeoutMs?: number }): Promise<{ exitCode: number | null; stderr: string }>;
}

export function helperLauncher(helper: HelperLike): QemuLauncher {
  return async function launchThroughHelper(argv, netnsPath) {
    const result = await helper.exec(argv, { netnsPath, stdio: "capture", timeoutMs: START_TIMEOUT_MS });
    if (result.exitCode !== 0) throw new CubicleError("internal", `${argv[0]} exited with ${result.exitCode ?? "a signal"}: ${result.stderr.trim().slice(-2000)}`);
  };
}

export const MICROVM_FILES = { qmpSocket: "qmp.sock", serialLog: "serial.log", pidFile: "qemu.pid" } as const;

/** The kernel command line: short (QEMU and the kernel cap it), the rest is in the launch file. */
export function kernelCommandLine(config: Pick<MicrovmConfig, "network" | "hostname" | "kernelArgs" | "tscKhz">): string {
  const words = ["console=ttyS0", "quiet", "panic=-1", "reboot=t"];
  if (config.tscKhz) words.push(`tsc_early_khz=${Math.round(config.tscKhz)}`);
  if (config.network) words.push(`cubicle.ip=${config.network.address}/${config.network.prefixLength}`, `cubicle.gw=${config.network.gateway}`);
  if (config.hostname) words.push(`cubicle.host=${config.hostname}`);
  words.push(...(config.kernelArgs ?? []));
  for (const word of words) {
    if (!/^[A-Za-z0-9_.,:=/-]+$/.test(word)) throw new CubicleError("invalid_argument", `kernel argument ${JSON.stringify(word)} has characters the guest cannot take`);
  }
  return words.join(" ");
}

/**
 * The version of the device set buildQemuArgv gives a guest: a saved state loads only into a
 * QEMU with the same devices, so images record it (MICROVM_IMAGE_NOTE). Raise it with any change
 * to the devices or their options.
 */
export const MACHINE_DEVICES_VERSION = 1;

/**
 * QEMU's argv for a microVM (`-M microvm`: no PCI, no firmware tables but ACPI's, virtio over
 * MMIO): the kernel and initramfs booted directly, the root overlay and the kit as virtio-blk
 * disks told apart by serial number, virtio-net on the sandbox's tap, virtio-rng from the host's
 * urandom, QMP on a unix socket, the serial console into a log file, and -daemonize so that the
 * start returns once QEMU is set up. `-no-reboot`: a guest that ends (its init exits, it panics,
 * it powers off) ends QEMU.
 */
export function buildQemuArgv(config: MicrovmConfig): string[] {
  const files = microvmFiles(config.runDir);
  if (!Number.isInteger(config.cpuCount) || config.cpuCount < 1 || config.cpuCount > 64) throw new CubicleError("invalid_argument", `cpuCount ${config.cpuCount} must be 1 to 64`);
  if (!Number.isInteger(config.memoryMiB) || config.memoryMiB < 128) throw new CubicleError("invalid_argument", `memoryMiB ${config.memoryMiB} must be at least 128`);
  for (const file of [config.rootDisk, config.kitDisk, config.launchFile ?? "/", config.runDir, config.ram?.file ?? "/", ...(config.shares ?? []).map((share) => share.socket)]) {
    // QEMU's -drive/-fw_cfg option syntax splits on commas.
    if (file.includes(",")) throw new CubicleError("invalid_argument", `the path ${file} may not hold a comma`);
  }
  const accel = config.accel === "kvm" ? "kvm" : `tcg,tb-size=${config.tbSizeMiB ?? 64}`;
  const qemu = config.qemu ?? qemuInstall();
  const argv = [
    ...qemuCommand(qemu),
    "-M",
    "microvm",
    "-accel",
    accel,
    "-cpu",
    config.accel === "kvm" ? "host" : "max",
    "-smp",
    String(config.cpuCount),
    "-m",
    `${config.memoryMiB}M`,
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-no-reboot",
    "-serial",
    `file:${files.serialLog}`,
    "-kernel",
    config.assets.kernel,
    "-initrd",
    config.assets.initramfs,
    "-append",
    kernelCommandLine({ ...config, tscKhz: config.accel === "tcg" ? (config.tscKhz ?? hostTscKhz()) : undefined }),
    "-drive",
    `id=root,file=${config.rootDisk},format=qcow2,if=none,discard=unmap`,
    "-device",
    `virtio-blk-device,drive=root,serial=${ROOT_DISK_SERIAL}`,
    "-drive",
    `id=kit,file=${config.kitDisk},format=raw,if=none,readonly=on`,
    "-device",
    `virtio-blk-device,drive=kit,serial=${KIT_DISK_SERIAL}`,
    "-object",
    "rng-random,id=rng,filename=/dev/urandom",
    "-device",
    "virtio-rng-device,rng=rng",

    "-qmp",
    `unix:${files.qmpSocket},server=on,wait=off`,
    "-pidfile",
    files.pidFile,
    "-daemonize",
  ];
  if (config.network) {
    if (!/^[a-z0-9]{1,15}$/.test(config.network.tapName)) throw new CubicleError("invalid_argument", `tap name ${config.network.tapName} must be 1-15 lowercase letters or digits`);
    if (!/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/.test(config.network.macAddress)) throw new CubicleError("invalid_argument", `MAC address ${config.network.macAddress} is not valid`);
    argv.push("-netdev", `tap,id=net,ifname=${config.network.tapName},script=no,downscript=no`, "-device", `virtio-net-device,netdev=net,mac=${config.network.macAddress}`);
  }
  if (config.launchFile) argv.push("-fw_cfg", `name=${LAUNCH_FW_CFG_NAME},file=${config.launchFile}`);
  if (config.ram) {
    if (!path.isAbsolute(config.ram.file)) throw new CubicleError("invalid_argument", `the RAM file ${config.ram.file} must be an absolute path`);
    const mapping = config.ram.mode === "shared" ? "share=on" : "share=off,readonly=on,rom=off";
    argv.push("-object", `memory-backend-file,id=ram,size=${config.memoryMiB}M,mem-path=${config.ram.file},${mapping}`, "-machine", "memory-backend=ram");
  }
  if (config.shares?.length) {
    if (config.ram?.mode === "image") throw new CubicleError("invalid_argument", "virtiofs shares need the guest's RAM shared; a RAM image is mapped private");
    // vhost-user devices need shared RAM (the file's, or a memfd) and virtio 1.0 transports (the microvm machine's are legacy by default).
    if (!config.ram) argv.push("-object", `memory-backend-memfd,id=ram,size=${config.memoryMiB}M,share=on`, "-machine", "memory-backend=ram");
    argv.push("-global", "virtio-mmio.force-legacy=false");
    for (const [index, share] of config.shares.entries()) {
      if (!SHARE_TAG_PATTERN.test(share.tag)) throw new CubicleError("invalid_argument", `share tag ${share.tag} must be 1-32 lowercase letters, digits or -`);
      argv.push("-chardev", `socket,id=fs${index},path=${share.socket}`, "-device", `vhost-user-fs-device,chardev=fs${index},tag=${share.tag}`);
    }
  }
  if (config.startPaused || config.incoming) argv.push("-S");
  if (config.incoming) argv.push("-incoming", "defer");
  if (config.confine) {
    const { uid, gid, chrootDir } = config.confine;
    for (const id of [uid, gid]) {
      if (!Number.isInteger(id) || id < MICROVM_UID_START || id >= MICROVM_UID_START + MICROVM_UID_COUNT) throw new CubicleError("invalid_argument", `a guest's uid/gid ${id} is outside ${MICROVM_UID_START}-${MICROVM_UID_START + MICROVM_UID_COUNT - 1}`);
    }
    if (!path.isAbsolute(chrootDir) || chrootDir.includes(",")) throw new CubicleError("invalid_argument", `the chroot directory ${chrootDir} must be an absolute path without commas`);
    argv.push("-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=allow,resourcecontrol=deny");
    // QEMU 9.1 replaced -runas and -chroot with -run-with (QEMU_INSTALL_NOTE).
    if (versionAtLeast(qemu.version, 9, 1)) argv.push("-run-with", `chroot=${chrootDir},user=${uid}:${gid}`);
    else argv.push("-runas", `${uid}:${gid}`, "-chroot", chrootDir);
  }
  return argv;
}

export function microvmFiles(runDir: string): { qmpSocket: string; serialLog: string; pidFile: string } {
  return {
    qmpSocket: path.join(runDir, MICROVM_FILES.qmpSocket),
    serialLog: path.join(runDir, MICROVM_FILES.serialLog),
    pidFile: path.join(runDir, MICROVM_FILES.pidFile),
  };
}

/**
 * MICROVM_STATE_NOTE: a guest's memory image is QEMU's own migration stream (device state and
 * RAM; pages that are all zero take a few bytes) written to a file while the vCPUs are
 * stopped, and loaded into a new QEMU started with the same devices and `-incoming defer`.
 * QEMU is chrooted and cannot open host files (QEMU_CONFINE_NOTE), so the stream goes through
 * a unix socket in the guest's state channel, a directory inside QEMU's chroot: to save, this
 * process listens there and QEMU connects; to load, QEMU listens and this process connects. The
 * channel is root's (0711): a QEMU that a guest took over may connect to the socket made for it,
 * but cannot replace it with a link this process would then follow. Only a QEMU started for a
 * load, which has run no guest code yet, gets a directory of its own in it (`incoming/`, its
 * uid's) to make its socket in; it is removed once the state is in. The RAM is copied, not mapped: a guest made from an image has its
 * own pages from the start (no sharing between guests of one image yet).
 */
export interface StateChannel {
  /** The directory as the host sees it. */
  hostDir: string;
  /** The same directory as QEMU sees it inside its chroot. */
  qemuDir: string;
}

/**
 * Makes a guest's chroot (QEMU_CONFINE_NOTE) at `chrootDir` (root's, read-only to others): its
 * root disk under the same path as on the host (a second name of the same file, which becomes
 * the guest uid's), and its state channel, `state/` (MICROVM_STATE_NOTE). QEMU opens the root
 * disk again by its path whenever a saved or loaded state hands the disk over (read-only, then
 * read-write), after it has chrooted. `chrootDir` must be on the root disk's file system.
 */
export async function prepareGuestChroot(chrootDir: string, rootDisk: string, uid: number, options: { incoming?: boolean } = {}): Promise<StateChannel> {
  if (!path.isAbsolute(rootDisk)) throw new CubicleError("internal", `the root disk path ${rootDisk} must be absolute`);
  await rm(chrootDir, { recursive: true, force: true });
  await mkdir(path.join(chrootDir, path.dirname(rootDisk)), { recursive: true, mode: 0o555 });
  await chown(rootDisk, uid, uid);
  await chmod(rootDisk, 0o600);
  await link(rootDisk, path.join(chrootDir, rootDisk));
  const channel = guestStateChannel(chrootDir);
  await mkdir(channel.hostDir, { mode: 0o711 });
  await chmod(channel.hostDir, 0o711);
  if (options.incoming) {
    const incoming = path.join(channel.hostDir, INCOMING_DIR);
    await mkdir(incoming, { mode: 0o700 });
    await chown(incoming, uid, uid);
  }
  return channel;
}

/** The load's own directory in a state channel (MICROVM_STATE_NOTE). */
const INCOMING_DIR = "incoming";

/** The state channel of a chroot prepareGuestChroot made. */
export function guestStateChannel(chrootDir: string): StateChannel {
  return { hostDir: path.join(chrootDir, "state"), qemuDir: "/state" };
}

/** How long a save or a load may take: a guest of a few GiB, written by a slow disk. */
const STATE_TIMEOUT_MS = 120_000;
let stateSequence = 0;

/** Connects to a unix socket QEMU is about to listen on (migrate-incoming makes it). */
async function connectWhenListening(socketPath: string, timeoutMs: number): Promise<net.Socket> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const socket = net.connect(socketPath);
        socket.once("connect", () => resolve(socket));
        socket.once("error", reject);
      });
    } catch (err) {
      if (Date.now() > deadline) throw new CubicleError("deadline_exceeded", `QEMU did not listen for the state: ${(err as Error).message}`);
      await sleep(5);
    }
  }
}

function withTimeout<T>(promise: Promise<T>, timeoutMs: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([promise, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new CubicleError("deadline_exceeded", message)), timeoutMs)))]).finally(() => clearTimeout(timer));
}

/** QMP's RunState: "prelaunch" (-S), "running", "paused", "inmigrate", "shutdown" … */
export type MicrovmStatus = string;

/** A running QEMU microVM, driven over QMP. */
export class Microvm {
  /** Settles when QEMU has gone (its QMP connection closed). */
  readonly exited: Promise<void>;

  /** Whether QEMU's `x-ignore-shared` is on; undefined for a QEMU an earlier server started (not known). */
  private ignoreShared: boolean | undefined;

  constructor(
    readonly pid: number,
    readonly qmp: QmpClient,
    readonly runDir: string,
    /** Started by this process: its migration capabilities are QEMU's defaults. */
    fresh = false,
  ) {
    this.exited = qmp.closed;
    if (fresh) this.ignoreShared = false;
  }

  get serialLog(): string {
    return microvmFiles(this.runDir).serialLog;
  }

  async status(): Promise<MicrovmStatus> {
    const reply = await this.qmp.execute<{ status: string }>("query-status");
    return reply.status;
  }

  /** Stops the vCPUs (the guest's clock stops too). */
  async pause(): Promise<void> {
    await this.qmp.execute("stop");
  }

  async resume(): Promise<void> {
    await this.qmp.execute("cont");
  }

  /**
   * Writes the stopped guest's whole state (device state and RAM: QEMU's migration stream) to
   * `file` (MICROVM_STATE_NOTE); resolves with its size once it is complete. QEMU is left in
   * `postmigrate` with its disks flushed and released: `cont` runs the guest on, `quit` ends it.
   */
  async saveState(file: string, channel: StateChannel, options: { withoutSharedRam?: boolean; timeoutMs?: number } = {}): Promise<number> {
    const timeoutMs = options.timeoutMs ?? STATE_TIMEOUT_MS;
    const name = `save-${process.pid}-${++stateSequence}.sock`;
    const socketPath = path.join(channel.hostDir, name);
    await rm(socketPath, { force: true });
    const output = createWriteStream(file, { mode: 0o600 });
    const server = net.createServer({ pauseOnConnect: false });
    let bytes = 0;
    const received = new Promise<void>((resolve, reject) => {
      server.once("connection", (socket) => {
        // One stream, from this guest's QEMU (the socket's directory is its uid's alone).
        server.close();
        socket.on("data", (chunk: Buffer) => (bytes += chunk.length));
        socket.pipe(output);
        socket.once("error", reject);
        output.once("error", reject);
        output.once("finish", resolve);
      });
      server.once("error", reject);
    });
    received.catch(() => undefined);
    try {
      await new Promise<void>((resolve, reject) => server.listen(socketPath, resolve).once("error", reject));
      await chmod(socketPath, 0o666);
      // No bandwidth cap for a local file (QEMU's default is made for networks).
      await this.qmp.execute("migrate-set-parameters", { "max-bandwidth": 64 * 1024 ** 3 });
      await this.setIgnoreShared(options.withoutSharedRam === true);
      await this.qmp.execute("migrate", { uri: `unix:${path.posix.join(channel.qemuDir, name)}` });
      await this.waitForMigration(timeoutMs, "saving");
      await withTimeout(received, timeoutMs, "the saved state's stream did not end");
      return bytes;
    } catch (err) {
      output.destroy();
      await rm(file, { force: true });
      throw err;
    } finally {
      server.close();
      await rm(socketPath, { force: true });
    }
  }

  /**
   * Loads a state saveState wrote into this QEMU (started with `incoming`): QEMU listens on a
   * socket in the channel directory and this streams the file into it. The guest stays stopped
   * (`paused`) until resume().
   */
  async loadState(file: string, channel: StateChannel, options: { withoutSharedRam?: boolean; timeoutMs?: number } = {}): Promise<void> {
    const timeoutMs = options.timeoutMs ?? STATE_TIMEOUT_MS;
    const name = `load-${process.pid}-${++stateSequence}.sock`;
    const incoming = path.join(channel.hostDir, INCOMING_DIR);
    const socketPath = path.join(incoming, name);
    try {
      await this.setIgnoreShared(options.withoutSharedRam === true);
      await this.qmp.execute("migrate-incoming", { uri: `unix:${path.posix.join(channel.qemuDir, INCOMING_DIR, name)}` });
      const socket = await connectWhenListening(socketPath, timeoutMs);
      const sent = new Promise<void>((resolve, reject) => {
        const input = createReadStream(file);
        input.once("error", reject);
        socket.once("error", reject);
        input.pipe(socket);
        socket.once("finish", resolve);
      });
      await withTimeout(sent, timeoutMs, "the state could not be sent");
      // The incoming side's end: the run state leaves `inmigrate` (a QEMU whose load fails exits).
      const deadline = Date.now() + timeoutMs;
      for (let delay = 2; ; delay = Math.min(delay * 2, 50)) {
        const status = await this.status();
        if (status === "paused") break;
        if (status !== "inmigrate") throw new CubicleError("internal", `QEMU is ${status} after loading the guest's state`);
        if (Date.now() > deadline) throw new CubicleError("deadline_exceeded", `QEMU did not finish loading the guest's state within ${timeoutMs} ms`);
        await sleep(delay);
      }
      socket.destroy();
    } finally {
      await rm(incoming, { recursive: true, force: true });
    }
  }

  /**
   * QEMU's `x-ignore-shared` (MICROVM_RAM_NOTE): a stream without the RAM of a file mapped
   * shared, which the file holds. Saver and loader must agree: the stream's layout differs.
   */
  private async setIgnoreShared(on: boolean): Promise<void> {
    if (this.ignoreShared === on) return;
    await this.qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "x-ignore-shared", state: on }] });
    this.ignoreShared = on;
  }

  /** Polls `query-migrate` until the migration completed (or failed: an error naming why). */
  private async waitForMigration(timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (let delay = 2; ; delay = Math.min(delay * 2, 50)) {
      const info = await this.qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate");
      if (info.status === "completed") return;
      if (info.status === "failed" || info.status === "cancelled") throw new CubicleError("internal", `QEMU failed ${what} the guest's state: ${info["error-desc"] ?? info.status}`);
      if (Date.now() > deadline) throw new CubicleError("deadline_exceeded", `QEMU did not finish ${what} the guest's state within ${timeoutMs} ms (${info.status ?? "no status"})`);
      await sleep(delay);
    }
  }

  /** Ends QEMU through QMP `quit` and waits until it has gone; SIGKILL after `timeoutMs`. */
  async quit(timeoutMs = 5000): Promise<void> {
    await this.qmp.execute("quit", undefined, timeoutMs).catch(() => {});
    const gone = await Promise.race([this.exited.then(() => true), sleep(timeoutMs).then(() => false)]);
    if (!gone) this.kill();
    await this.waitForProcessGone(timeoutMs);
  }

  /** SIGKILL (when the pid still names this QEMU). */
  kill(): void {
    if (isQemu(this.pid)) {
      try {
        process.kill(this.pid, "SIGKILL");
      } catch {
        // gone already
      }
    }
  }

  /** Resident memory of the QEMU process, from /proc/PID/status (VmRSS). */
  async rssBytes(): Promise<number> {
    const status = await readFile(`/proc/${this.pid}/status`, "utf8");
    const kib = Number(/^VmRSS:\s+(\d+) kB/m.exec(status)?.[1] ?? NaN);
    return kib * 1024;
  }

  /** The end of the serial console log (diagnostics). */
  async consoleTail(bytes = 4000): Promise<string> {
    const text = await readFile(this.serialLog, "utf8").catch(() => "");
    return text.slice(-bytes);
  }

  private async waitForProcessGone(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (isQemu(this.pid)) {
      if (Date.now() > deadline) throw new CubicleError("internal", `QEMU ${this.pid} did not end`);
      await sleep(10);
    }
  }
}

/**
 * Starts a microVM: makes `runDir`, runs QEMU (daemonized, in the sandbox's netns) through the
 * launcher, reads its pid file and connects to QMP. The guest is booting when this returns.
 */
export async function startMicrovm(config: MicrovmConfig, options: { launcher?: QemuLauncher } = {}): Promise<Microvm> {
  const files = microvmFiles(config.runDir);
  await mkdir(config.runDir, { recursive: true, mode: 0o700 });
  await Promise.all(Object.values(files).map((file) => rm(file, { force: true })));
  const argv = buildQemuArgv(config);
  log.debug("start", { argv, netnsPath: config.netnsPath });
  try {
    await (options.launcher ?? nsenterLauncher)(argv, config.netnsPath);
  } catch (err) {
    throw new CubicleError("internal", `QEMU did not start: ${(err as Error).message}`, { cause: err });
  }
  const pid = Number((await readFile(files.pidFile, "utf8")).trim());
  if (!Number.isInteger(pid) || pid <= 1) throw new CubicleError("internal", `QEMU's pid file ${files.pidFile} holds no pid`);
  try {
    const qmp = await QmpClient.connect(files.qmpSocket);
    return new Microvm(pid, qmp, config.runDir, true);
  } catch (err) {
    if (isQemu(pid)) process.kill(pid, "SIGKILL");
    throw err;
  }
}

/**
 * The QEMU an earlier server process started in `runDir` (it outlives the server: -daemonize),
 * reconnected over its QMP socket; undefined when it is gone. One that runs but does not answer
 * QMP is ended (by its pid, once /proc says it is a QEMU).
 */
export async function reconnectMicrovm(runDir: string, timeoutMs = 3000): Promise<Microvm | undefined> {
  const files = microvmFiles(runDir);
  const pid = Number((await readFile(files.pidFile, "utf8").catch(() => "")).trim());
  if (!Number.isInteger(pid) || pid <= 1 || !isQemu(pid)) return undefined;
  try {
    return new Microvm(pid, await QmpClient.connect(files.qmpSocket, timeoutMs), runDir);
  } catch (err) {
    log.warn("a QEMU left by an earlier server does not answer QMP; ending it", { pid, error: String(err) });
    process.kill(pid, "SIGKILL");
    return undefined;
  }
}

function isQemu(pid: number): boolean {
  try {
    // A zombie or a recycled pid is not ours to kill.
    const comm = readFileSync(`/proc/${pid}/comm`, "utf8").trim();
    return comm.startsWith("qemu-system");
  } catch {
    return false;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export interface KvmProbeResult {
  usable: boolean;
  /** Why not, or "booted". */
  reason: string;
  ms: number;
}

/**
 * KVM_PROBE_NOTE: whether guests really boot under KVM here. The existence of /dev/kvm says
 * little (a /dev/kvm backed by PVM runs no stock guest kernel), so this boots the guest kernel
 * with its initramfs in probe mode (GUEST_PROBE_ARG: the init prints GUEST_PROBE_MARKER and
 * reboots, which ends a `-no-reboot` QEMU) with `-accel kvm`, and answers yes only when the
 * marker came within `timeoutMs`.
 * Without a usable /dev/kvm QEMU refuses to start and the answer comes at once.
 */
export async function probeKvm(assets: Pick<GuestAssets, "kernel" | "initramfs">, options: { qemu?: QemuInstall; timeoutMs?: number } = {}): Promise<KvmProbeResult> {
  const started = performance.now();
  const timeoutMs = options.timeoutMs ?? 10_000;
  const qemu = options.qemu ?? qemuInstall();
  const [binary, ...prefix] = qemuCommand(qemu);
  const argv = [
    ...prefix,
    "-M",
    "microvm",
    "-accel",
    "kvm",
    "-cpu",
    "host",
    "-m",
    "128M",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-no-reboot",
    "-serial",
    "stdio",
    "-kernel",
    assets.kernel,
    "-initrd",
    assets.initramfs,
    "-append",
    `console=ttyS0 quiet panic=-1 reboot=t ${GUEST_PROBE_ARG}`,
  ];
  const result = await new Promise<{ output: string; timedOut: boolean; code: number | null }>((resolve) => {
    const child = spawn(binary!, argv, { stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    let timedOut = false;
    const collect = (chunk: Buffer) => {
      output = (output + chunk.toString("utf8")).slice(-16_384);
      if (output.includes(GUEST_PROBE_MARKER)) child.kill("SIGKILL");
    };
    child.stdout.on("data", collect);
    child.stderr.on("data", collect);
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, timeoutMs);
    child.on("error", (err) => {
      clearTimeout(timer);
      resolve({ output: String(err), timedOut: false, code: null });
    });
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ output, timedOut, code });
    });
  });
  const ms = Math.round(performance.now() - started);
  if (result.output.includes(GUEST_PROBE_MARKER)) return { usable: true, reason: "booted", ms };
  const lastLine = result.output.trim().split("\n").filter(Boolean).pop() ?? "";
  const reason = result.timedOut ? `no guest under KVM within ${timeoutMs} ms` : `QEMU exited with ${result.code}: ${lastLine.slice(0, 300)}`;
  return { usable: false, reason, ms };
}

/** True when the host has the QEMU this runtime needs (tests skip without it). */
export function hasQemu(binary = qemuInstall().binary): boolean {
  return hasQemuBinary(binary);
}
