import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";

/**
 * QEMU_INSTALL_NOTE: which QEMU runs the guests. Debian 12's is 7.2, which cannot map a file of
 * guest RAM copy-on-write without opening it for writing (MICROVM_RAM_NOTE); bookworm-backports
 * builds QEMU 10 for this very release, and `scripts/setup-host.sh` unpacks its packages into a
 * private tree (`<state dir>/qemu/root`, nothing installed, the host's libraries) and records
 * the binary in `<state dir>/qemu/path`. The first of these wins: `CUBICLE_QEMU` (a binary),
 * `$CUBICLE_STATE_DIR/qemu/path`, `/var/lib/cubicle/qemu/path`, then `qemu-system-x86_64` from
 * PATH. A private tree's firmware and option ROMs (`usr/share/qemu`) go with its binary (`-L`).
 * Features follow the version: `-run-with` for the chroot and user (9.1+, where `-runas` and
 * `-chroot` are gone), and guest RAM images shared between guests (8.2+).
 */
export interface QemuInstall {
  binary: string;
  /** `-L`: the firmware directory of a private tree; none for the host's QEMU (its built-in path). */
  dataDir?: string;
  version: { major: number; minor: number };
}

const DEFAULT_PATH_FILE = "/var/lib/cubicle/qemu/path";
const HOST_BINARY = "qemu-system-x86_64";

let cached: QemuInstall | undefined;

/** The QEMU this process runs guests with (QEMU_INSTALL_NOTE); looked up once. */
export function qemuInstall(env: NodeJS.ProcessEnv = process.env): QemuInstall {
  if (cached && env === process.env) return cached;
  const found = findQemu(env);
  if (env === process.env) cached = found;
  return found;
}

function findQemu(env: NodeJS.ProcessEnv): QemuInstall {
  const recorded = [env.CUBICLE_STATE_DIR ? path.join(env.CUBICLE_STATE_DIR, "qemu", "path") : undefined, DEFAULT_PATH_FILE]
    .filter((file): file is string => file !== undefined)
    .map((file) => readRecorded(file))
    .find((binary) => binary !== undefined && existsSync(binary));
  const binary = env.CUBICLE_QEMU || recorded || HOST_BINARY;
  const shareDir = path.join(path.dirname(binary), "..", "share", "qemu");
  const dataDir = path.isAbsolute(binary) && existsSync(path.join(shareDir, "qboot.rom")) ? path.resolve(shareDir) : undefined;
  return { binary, ...(dataDir ? { dataDir } : {}), version: qemuVersion(binary) };
}

function readRecorded(file: string): string | undefined {
  try {
    return readFileSync(file, "utf8").trim() || undefined;
  } catch {
    return undefined;
  }
}

/** The command that starts this QEMU: its binary, and a private tree's firmware directory (`-L`). */
export function qemuCommand(install: QemuInstall): string[] {
  return [install.binary, ...(install.dataDir ? ["-L", install.dataDir] : [])];
}

/** `QEMU emulator version 10.0.2 (…)` → 10.0; 0.0 when it does not run. */
export function qemuVersion(binary: string): { major: number; minor: number } {
  const result = spawnSync(binary, ["--version"], { encoding: "utf8", timeout: 10_000 });
  return parseQemuVersion(result.stdout ?? "");
}

export function parseQemuVersion(text: string): { major: number; minor: number } {
  const match = /QEMU emulator version (\d+)\.(\d+)/.exec(text);
  return match ? { major: Number(match[1]), minor: Number(match[2]) } : { major: 0, minor: 0 };
}

export function versionAtLeast(version: { major: number; minor: number }, major: number, minor: number): boolean {
  return version.major > major || (version.major === major && version.minor >= minor);
}

/** Guest RAM as a file mapped copy-on-write read-only (`readonly=on,rom=off`: MICROVM_RAM_NOTE). */
export function sharesRamImages(install: QemuInstall): boolean {
  return versionAtLeast(install.version, 8, 2);
}

/** Whether `binary` is a QEMU that runs here (a name is looked up in the usual directories). */
export function hasQemuBinary(binary: string): boolean {
  if (path.isAbsolute(binary)) return existsSync(binary);
  return ["/usr/bin", "/usr/local/bin"].some((dir) => existsSync(path.join(dir, binary)));
}
