import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { copyFile, mkdir, readFile, readdir, rename, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { createLogger } from "../../shared/log.js";
import { KIT_MOUNT_POINT, kernelNodeCommand } from "../container/agent-kit.js";
import { writeCpioNewc, type CpioEntry } from "./cpio.js";

const log = createLogger("microvm-assets");

/**
 * The guest kernel: Debian 12's cloud kernel (`apt-cache depends linux-image-cloud-amd64`),
 * pinned by its ABI name. It is downloaded (`apt-get download`) and unpacked (`dpkg -x`) into
 * the runtime's own directory, never installed on the host. Its virtio drivers are modules
 * (GUEST_MODULES), ext4 and the 8250 serial console are built in. scripts/setup-host.sh keeps
 * the package file in apt's cache (found by findCachedKernelDeb), so hosts and tests need no
 * download at run time.
 */
export const GUEST_KERNEL_PACKAGE = "linux-image-6.1.0-57-cloud-amd64";

/**
 * The modules the guest's initramfs loads, in dependency order (their `depends=` in .modinfo):
 * virtio over MMIO (the `microvm` machine has no PCI), the disks, the network (virtio_net needs
 * net_failover and failover), the entropy source, fw_cfg's sysfs view (the launch file,
 * GUEST_INIT_NOTE) and virtiofs (volumes and codebases, MICROVM_SHARES_NOTE). Paths are relative to `lib/modules/<release>/kernel`.
 */
export const GUEST_MODULES: readonly string[] = [
  "drivers/virtio/virtio_ring.ko",
  "drivers/virtio/virtio.ko",
  "drivers/virtio/virtio_mmio.ko",
  "drivers/block/virtio_blk.ko",
  "drivers/char/hw_random/virtio-rng.ko",
  "net/core/failover.ko",
  "drivers/net/net_failover.ko",
  "drivers/net/virtio_net.ko",
  "drivers/firmware/qemu_fw_cfg.ko",
  "fs/fuse/fuse.ko",
  "fs/fuse/virtiofs.ko",
];

/** The static busybox of the host (package busybox-static), the initramfs's only program. */
export const HOST_BUSYBOX = "/bin/busybox";

/** Serial numbers of the guest's disks: the init finds them by these, not by probe order. */
export const ROOT_DISK_SERIAL = "cubicle-root";
export const KIT_DISK_SERIAL = "cubicle-kit";

/** The fw_cfg item holding the launch file (launchScript), as `-fw_cfg name=…,file=…` names it. */
export const LAUNCH_FW_CFG_NAME = "opt/cubicle/launch";

/** What the guest prints on its console when booted with GUEST_PROBE_ARG (probeKvm). */
export const GUEST_PROBE_MARKER = "cubicle-guest-probe-ok";
export const GUEST_PROBE_ARG = "cubicle.probe";

export interface GuestAssets {
  /** The kernel image (bzImage) for `-kernel`. */
  kernel: string;
  /** The initramfs (uncompressed newc cpio) for `-initrd`. */
  initramfs: string;
  /** `uname -r` of the guest kernel. */
  kernelRelease: string;
  /** The Debian version of the kernel package that was unpacked. */
  kernelVersion: string;
}

export interface GuestAssetOptions {
  /** Default GUEST_KERNEL_PACKAGE. */
  kernelPackage?: string;
  /** Default HOST_BUSYBOX. */
  busybox?: string;
  /**
   * A local copy of the kernel package (.deb) to unpack instead of downloading one. Default: the
   * package in apt's cache (/var/cache/apt/archives) when it is there, else `apt-get download`.
   */
  kernelDeb?: string;
}

/** The kernel package in apt's cache (e.g. left by `apt-get install --download-only`), if any. */
export async function findCachedKernelDeb(kernelPackage = GUEST_KERNEL_PACKAGE, cacheDir = "/var/cache/apt/archives"): Promise<string | undefined> {
  const names = await readdir(cacheDir).catch(() => [] as string[]);
  const found = names.filter((name) => name.startsWith(`${kernelPackage}_`) && name.endsWith("_amd64.deb")).sort();
  return found.length ? path.join(cacheDir, found[found.length - 1]!) : undefined;
}

/**
 * GUEST_INIT_NOTE: the guest's PID 1 until the agent runs. It mounts what it needs, loads the
 * virtio modules, finds the root disk and the kit disk by their serial numbers, mounts the root
 * read-write (a per-sandbox qcow2 overlay over the template's read-only image) and the kit
 * read-only at /.cubicle, configures eth0 and the hostname from the kernel command line
 * (`cubicle.ip=ADDR/PREFIX cubicle.gw=GATEWAY cubicle.host=NAME`, short on purpose), moves
 * /dev, /proc and /sys into the new root and mounts /dev/pts, /dev/shm and /tmp there. The
 * long values (the agent's environment and argv: the template's env as JSON, the node command)
 * come from the launch file that QEMU passes through fw_cfg (`-fw_cfg name=opt/cubicle/launch`,
 * read at /sys/firmware/qemu_fw_cfg/by_name/…; the kernel has qemu_fw_cfg as a module,
 * CONFIG_FW_CFG_SYSFS=m): a shell fragment `set -- NAME=VALUE… /bin/busybox switch_root
 * /newroot ARGV…`, every word single-quoted by launchScript(), so no value is ever parsed as
 * shell; before it, one `share TAG TARGET` line per volume or codebase (MICROVM_SHARES_NOTE)
 * mounts that virtiofs share in the new root (nosuid, nodev). The init ends with
 * `exec env -i "$@"`: env (still PID 1) clears the environment and
 * execs switch_root, which execs the agent's argv in the new root with exactly that environment.
 * The argv starts with the kit's tini (`init -g`), which stays PID 1 and reaps orphans. Any
 * failure prints `cubicle-init: …` on the console and reboots the guest, so QEMU exits
 * (`-no-reboot`; a panic reboots too, `panic=-1`).
 */
export const GUEST_INIT_SCRIPT = `#!/bin/busybox sh
# Cubicle's microVM init (src/runtime/microvm/guest-assets.ts, GUEST_INIT_NOTE).
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "cubicle-init: $*"; reboot -f; sleep 5; exit 1; }
# share TAG TARGET: a host directory (virtiofs, MICROVM_SHARES_NOTE) at TARGET in the new root.
share() { mkdir -p "/newroot$2" && mount -t virtiofs -o nosuid,nodev "$1" "/newroot$2" || fail "mount share $1 at $2"; }
mount -t devtmpfs -o nosuid,mode=0755 dev /dev || fail "mount /dev"
mount -t proc -o nosuid,noexec,nodev proc /proc || fail "mount /proc"
mount -t sysfs -o nosuid,noexec,nodev sys /sys || fail "mount /sys"
address= gw= host=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    cubicle.ip=*) address="\${arg#cubicle.ip=}" ;;
    cubicle.gw=*) gw="\${arg#cubicle.gw=}" ;;
    cubicle.host=*) host="\${arg#cubicle.host=}" ;;
    ${GUEST_PROBE_ARG}) echo "${GUEST_PROBE_MARKER}"; reboot -f; sleep 5; exit 0 ;;
  esac
done
for module in ${GUEST_MODULES.map((m) => path.basename(m, ".ko")).join(" ")}; do
  insmod "/lib/modules/$module.ko" || fail "insmod $module"
done
root= kit= tries=0
while [ -z "$root" ] || [ -z "$kit" ]; do
  for disk in /sys/block/vd*; do
    [ -r "$disk/serial" ] || continue
    case "$(cat "$disk/serial")" in
      ${ROOT_DISK_SERIAL}) root="/dev/\${disk##*/}" ;;
      ${KIT_DISK_SERIAL}) kit="/dev/\${disk##*/}" ;;
    esac
  done
  tries=$((tries + 1))
  [ $tries -gt 1000 ] && fail "disks not found (root '$root', kit '$kit')"
  [ -z "$root" ] || [ -z "$kit" ] && usleep 10000
done
mkdir -p /newroot
mount -t ext4 -o rw,noatime "$root" /newroot || fail "mount the root disk $root"
mkdir -p /newroot${KIT_MOUNT_POINT} /newroot/dev /newroot/proc /newroot/sys /newroot/tmp
mount -t ext4 -o ro,nosuid,nodev "$kit" /newroot${KIT_MOUNT_POINT} || fail "mount the kit disk $kit"
launch=/sys/firmware/qemu_fw_cfg/by_name/${LAUNCH_FW_CFG_NAME}/raw
[ -r "$launch" ] || fail "no launch file at $launch"
. "$launch"
[ -e /proc/sys/net/ipv6/conf/all/disable_ipv6 ] && echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
echo 0 > /proc/sys/net/ipv4/ip_unprivileged_port_start
ip link set lo up || fail "lo up"
if [ -n "$address" ]; then
  ip link set eth0 up || fail "eth0 up"
  ip addr add "$address" dev eth0 || fail "address $address"
  [ -n "$gw" ] && { ip route add default via "$gw" || fail "route via $gw"; }
fi
[ -n "$host" ] && hostname "$host"
mount --move /dev /newroot/dev || fail "move /dev"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o nosuid,noexec,ptmxmode=0666,mode=0620,gid=5 devpts /newroot/dev/pts || fail "mount /dev/pts"
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /newroot/dev/shm || fail "mount /dev/shm"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /newroot/tmp || fail "mount /tmp"
mount --move /proc /newroot/proc || fail "move /proc"
mount --move /sys /newroot/sys || fail "move /sys"
exec env -i "$@"
`;

const NAME_PATTERN = /^[A-Za-z_][A-Za-z0-9_]*$/;
/** A virtiofs share's tag, as QEMU's option syntax and the launch file both take it. */
export const SHARE_TAG_PATTERN = /^[a-z0-9-]{1,32}$/;

/** A virtiofs share the guest mounts (its tag as QEMU names it) at `target` (MICROVM_SHARES_NOTE). */
export interface GuestShare {
  tag: string;
  target: string;
}

/** A word for a POSIX shell, single-quoted: nothing in it is expanded. */
export function shellQuote(word: string): string {
  if (word.includes("\0")) throw new CubicleError("invalid_argument", "a value for the guest holds a NUL byte");
  return `'${word.replace(/'/g, `'\\''`)}'`;
}

/**
 * The launch file (GUEST_INIT_NOTE): the agent's environment and argv for the init to exec in
 * the new root. Environment names must be plain identifiers.
 */
export function launchScript(env: Record<string, string>, argv: readonly string[], shares: readonly GuestShare[] = []): string {
  if (argv.length === 0) throw new CubicleError("internal", "the guest's launch file needs a program");
  const lines = shares.map((share) => {
    if (!SHARE_TAG_PATTERN.test(share.tag)) throw new CubicleError("internal", `share tag ${JSON.stringify(share.tag)} is not a short name`);
    if (!share.target.startsWith("/")) throw new CubicleError("invalid_argument", `a mount path (${share.target}) must be absolute`);
    return `share ${shellQuote(share.tag)} ${shellQuote(share.target)}\n`;
  });
  const words: string[] = [];
  for (const [name, value] of Object.entries(env)) {
    if (!NAME_PATTERN.test(name)) throw new CubicleError("invalid_argument", `environment variable name ${JSON.stringify(name)} is not valid in a microVM; use letters, digits and _`);
    words.push(shellQuote(`${name}=${value}`));
  }
  words.push("/bin/busybox", "switch_root", "/newroot", ...argv.map(shellQuote));
  return `${lines.join("")}set -- ${words.join(" ")}\n`;
}

/**
 * The agent's argv in a guest, from the kit's container command: without sandbox-boot (the
 * guest's own kernel gives it a boot id, clocks and capabilities of its own), so it starts with
 * tini when the kit has it.
 */
export function guestAgentCommand(kitCommand: readonly string[]): string[] {
  const bootPrefix = kitCommand[0] === `${KIT_MOUNT_POINT}/boot` ? kitCommand.indexOf("--") : -1;
  return bootPrefix >= 0 ? kitCommand.slice(bootPrefix + 1) : [...kitCommand];
}

export interface AgentLaunchInput {
  sandboxId: string;
  /** The template's environment (TemplateImage.env). */
  templateEnv: Record<string, string>;
  /** The kit's container command (AgentKit.command). */
  kitCommand: readonly string[];
  /** Volumes and codebases to mount before the agent starts. */
  shares?: readonly GuestShare[];
}

/**
 * The launch file of a sandbox's guest: the agent started as the container runtime starts it
 * (oci-spec.ts buildOciSpec: the same environment), without sandbox-boot.
 */
export function agentLaunchFile(input: AgentLaunchInput): string {
  const env = {
    PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    HOME: "/root",
    ...input.templateEnv,
    CUBICLE_AGENT: "1",
    CUBICLE_AGENT_SET_HOSTNAME: "1",
    CUBICLE_AGENT_GUEST: "1",
    CUBICLE_AGENT_NODE_COMMAND: JSON.stringify(kernelNodeCommand([...input.kitCommand])),
    CUBICLE_SANDBOX_ID: input.sandboxId,
    CUBICLE_TEMPLATE_ENV: JSON.stringify(input.templateEnv),
  };
  return launchScript(env, guestAgentCommand(input.kitCommand), input.shares);
}

const preparing = new Map<string, Promise<GuestAssets>>();

/**
 * Makes (once; later calls return the cached files) the guest kernel and initramfs under `dir`:
 * `kernel-<package>/` holds the kernel, its config and GUEST_MODULES; `initramfs-<hash>.cpio`
 * the init, busybox and those modules.
 */
export function prepareGuestAssets(dir: string, options: GuestAssetOptions = {}): Promise<GuestAssets> {
  const key = `${path.resolve(dir)}\0${options.kernelPackage ?? GUEST_KERNEL_PACKAGE}\0${options.busybox ?? HOST_BUSYBOX}`;
  let pending = preparing.get(key);
  if (!pending) {
    pending = prepare(dir, options).finally(() => preparing.delete(key));
    preparing.set(key, pending);
  }
  return pending;
}

async function prepare(dir: string, options: GuestAssetOptions): Promise<GuestAssets> {
  const kernelPackage = options.kernelPackage ?? GUEST_KERNEL_PACKAGE;
  if (!/^linux-image-[a-z0-9.+-]+$/.test(kernelPackage)) throw new CubicleError("invalid_argument", `${kernelPackage} is not a kernel package name`);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const kernelDir = await prepareKernel(dir, kernelPackage, options.kernelDeb ?? (await findCachedKernelDeb(kernelPackage)));
  const kernelRelease = (await readFile(path.join(kernelDir, "release"), "utf8")).trim();
  const kernelVersion = (await readFile(path.join(kernelDir, "version"), "utf8")).trim();
  const initramfs = await prepareInitramfs(dir, kernelDir, options.busybox ?? HOST_BUSYBOX);
  return { kernel: path.join(kernelDir, "vmlinuz"), initramfs, kernelRelease, kernelVersion };
}

/** Downloads and unpacks the kernel package once; keeps the kernel, its config and the modules the guest needs. */
async function prepareKernel(dir: string, kernelPackage: string, localDeb: string | undefined): Promise<string> {
  const kernelDir = path.join(dir, `kernel-${kernelPackage}`);
  if (existsSync(path.join(kernelDir, "vmlinuz"))) return kernelDir;
  const started = performance.now();
  const staging = `${kernelDir}.staging-${process.pid}`;
  await rm(staging, { recursive: true, force: true });
  await mkdir(path.join(staging, "download"), { recursive: true });
  try {
    if (localDeb) {
      await copyFile(localDeb, path.join(staging, "download", path.basename(localDeb)));
    } else {
      // apt-get download as root warns that it cannot drop to _apt for a directory it cannot
      // write; the download itself works.
      await runCommand(["apt-get", "download", "-q", kernelPackage], { cwd: path.join(staging, "download"), timeoutMs: 600_000 }).catch((err) => {
        throw new CubicleError("failed_precondition", `could not download the guest kernel ${kernelPackage} (apt-get download); check the host's apt sources: ${(err as Error).message}`, { cause: err });
      });
    }
    const debs = (await readdir(path.join(staging, "download"))).filter((name) => name.endsWith(".deb"));
    if (debs.length !== 1) throw new CubicleError("internal", `expected one package of ${kernelPackage}, found ${debs.length}`);
    const deb = path.join(staging, "download", debs[0]!);
    const fields = (await runCommand(["dpkg-deb", "-f", deb, "Package", "Version"], { timeoutMs: 30_000 })).stdout;
    const packageName = /^Package: (\S+)$/m.exec(fields)?.[1];
    const version = /^Version: (\S+)$/m.exec(fields)?.[1] ?? "unknown";
    if (packageName !== kernelPackage) throw new CubicleError("invalid_argument", `${path.basename(deb)} is ${packageName ?? "no package"}, not ${kernelPackage}`);
    const unpacked = path.join(staging, "unpacked");
    await runCommand(["dpkg", "-x", deb, unpacked], { timeoutMs: 300_000 });
    const images = (await readdir(path.join(unpacked, "boot"))).filter((name) => name.startsWith("vmlinuz-"));
    if (images.length !== 1) throw new CubicleError("internal", `${kernelPackage} holds ${images.length} kernel images`);
    const release = images[0]!.slice("vmlinuz-".length);
    await copyFile(path.join(unpacked, "boot", images[0]!), path.join(staging, "vmlinuz"));
    await copyFile(path.join(unpacked, "boot", `config-${release}`), path.join(staging, "config"));
    await mkdir(path.join(staging, "modules"));
    for (const module of GUEST_MODULES) {
      await copyFile(path.join(unpacked, "lib", "modules", release, "kernel", module), path.join(staging, "modules", path.basename(module)));
    }
    await writeFile(path.join(staging, "release"), release + "\n");
    await writeFile(path.join(staging, "version"), version + "\n");
    await rm(path.join(staging, "download"), { recursive: true, force: true });
    await rm(unpacked, { recursive: true, force: true });
    await rename(staging, kernelDir).catch(async (err) => {
      // Another process made it meanwhile: keep theirs.
      if (!existsSync(path.join(kernelDir, "vmlinuz"))) throw err;
    });
    log.info("guest kernel unpacked", { kernelPackage, version, release, ms: Math.round(performance.now() - started) });
    return kernelDir;
  } finally {
    await rm(staging, { recursive: true, force: true });
  }
}

/** Builds the initramfs once per init script, busybox and kernel; the file name carries their hash. */
async function prepareInitramfs(dir: string, kernelDir: string, busybox: string): Promise<string> {
  const busyboxInfo = await stat(busybox).catch((err) => {
    throw new CubicleError("failed_precondition", `${busybox} is missing; install busybox-static (scripts/setup-host.sh)`, { cause: err });
  });
  const release = (await readFile(path.join(kernelDir, "release"), "utf8")).trim();
  const hash = createHash("sha256")
    .update(GUEST_INIT_SCRIPT)
    .update(`\0${busybox}\0${busyboxInfo.size}\0${busyboxInfo.mtimeMs}\0${release}\0${GUEST_MODULES.join(",")}`)
    .digest("hex")
    .slice(0, 16);
  const target = path.join(dir, `initramfs-${hash}.cpio`);
  if (existsSync(target)) return target;
  const started = performance.now();
  const entries: CpioEntry[] = [
    { kind: "directory", name: "bin" },
    { kind: "directory", name: "dev" },
    { kind: "directory", name: "proc" },
    { kind: "directory", name: "sys" },
    { kind: "directory", name: "newroot" },
    { kind: "directory", name: "lib" },
    { kind: "directory", name: "lib/modules" },
    // The kernel opens /dev/console for the init before anything is mounted.
    { kind: "char-device", name: "dev/console", major: 5, minor: 1 },
    { kind: "file", name: "bin/busybox", data: await readFile(busybox), mode: 0o755 },
    { kind: "symlink", name: "bin/sh", target: "busybox" },
    { kind: "file", name: "init", data: Buffer.from(GUEST_INIT_SCRIPT), mode: 0o755 },
  ];
  for (const module of GUEST_MODULES) {
    const name = path.basename(module);
    entries.push({ kind: "file", name: `lib/modules/${name}`, data: await readFile(path.join(kernelDir, "modules", name)) });
  }
  const staging = `${target}.staging-${process.pid}`;
  await writeFile(staging, writeCpioNewc(entries), { mode: 0o644 });
  await rename(staging, target);
  log.info("guest initramfs built", { file: target, ms: Math.round(performance.now() - started) });
  return target;
}
