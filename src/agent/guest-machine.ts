import { execFile } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import type { InitBody } from "../protocol/init-body.js";
import { createLogger } from "../shared/log.js";
import { loadNativeAddon } from "../shared/native-addon.js";

const log = createLogger("agent");
const run = promisify(execFile);

/** A guest's clock further off the server's than this is set (a restored guest's stopped while it was saved). */
const CLOCK_TOLERANCE_MS = 1000;
const COMMAND_TIMEOUT_MS = 10_000;
const GUEST_BOOT_ID_FILE = "/run/cubicle-boot-id";
const BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id";

interface GuestAddon {
  reseed(bytes: Buffer): void;
  setTime(epochMs: number): void;
  /** Absent from an addon built before it (an image's own kit disk). */
  bindReadOnly?(source: string, target: string): void;
}

/** The guest's RTC (QEMU's follows the host's clock, also while the guest is stopped), in whole seconds. */
const RTC_SECONDS_FILE = "/sys/class/rtc/rtc0/since_epoch";
/** How often the clock is compared with the RTC, and how far off it may be (the RTC counts whole seconds). */
const RTC_CHECK_MS = 2000;
const RTC_TOLERANCE_MS = 2500;

/**
 * GUEST_MACHINE_NOTE: in a microVM guest (CUBICLE_AGENT_GUEST=1, set by the guest's launch file)
 * the agent is the guest's root, and does at /init what the container runtime does from outside
 * (BOOT_IDENTITY_NOTE), because a guest restored from a memory image is the saved machine to the
 * last bit:
 * - **Clock**: a guest's clock stops while it is paused or saved, and under TCG it also falls
 *   behind (a jiffies clock that loses ticks on a busy host). /init's `timestamp` (the server's
 *   time) sets it when it is more than a second off, and every two seconds the agent compares it
 *   with the guest's RTC (QEMU's runs on the host's clock, paused or not) and sets it when they
 *   differ by more than 2.5 s (guest.node's setTime: a system call, no process).
 * - **A new machine** (`machine`: a fork, a create from a snapshot; not a resume or a rollback,
 *   which bring back the same machine): /etc/machine-id is rewritten; the boot id is a file bound
 *   over /proc/sys/kernel/random/boot_id (the kernel's own cannot change without a boot; by
 *   guest.node's bindReadOnly: `umount` and `mount` processes, a fork of the agent each, took
 *   ~350 ms of a restored guest's first /init under TCG); and the host's fresh random bytes
 *   are credited to the kernel's pool and its CRNG reseeded at once (guest.node), so forks of
 *   one image do not produce the same "random" numbers until the kernel's own reseed a minute
 *   later. Failures are logged; /init still succeeds.
 * Containers ignore both (their clock is the host's, their ids are the runtime's).
 */
export async function applyGuestInit(request: InitBody, env: NodeJS.ProcessEnv = process.env): Promise<void> {
  if (env.CUBICLE_AGENT_GUEST !== "1") return;
  const serverMs = request.timestamp ? Date.parse(request.timestamp) : NaN;
  if (Number.isFinite(serverMs) && Math.abs(Date.now() - serverMs) > CLOCK_TOLERANCE_MS) setClock(serverMs);
  const machine = request.machine;
  if (!machine) return;
  try {
    guestAddon()?.reseed(Buffer.from(machine.entropy, "base64"));
  } catch (error) {
    log.warn("could not reseed the guest's random numbers", { error: (error as Error).message });
  }
  await writeAtomically("/etc/machine-id", `${machine.machineId}\n`).catch((error: Error) => log.warn("could not write /etc/machine-id", { error: error.message }));
  await setBootId(machine.bootId).catch((error: Error) => log.warn("could not set the guest's boot id", { error: error.message }));
}

/**
 * A guest booted from a template has the template's /etc/machine-id, which Debian ships empty
 * (systemd fills it at the first boot; a guest has no systemd): the agent gives it one at its
 * start, as that first boot would, on the guest's own disk, so it stays across pauses and
 * reboots of the same machine (GUEST_MACHINE_NOTE; a new machine gets one at /init). Containers
 * have theirs from the runtime; call in a guest only. Synchronous: before the agent listens.
 */
export function ensureGuestMachineId(env: NodeJS.ProcessEnv = process.env, file = "/etc/machine-id"): void {
  if (env.CUBICLE_AGENT_GUEST !== "1") return;
  try {
    const current = fs.existsSync(file) ? fs.readFileSync(file, "utf8").trim() : "";
    if (/^[0-9a-f]{32}$/.test(current)) return;
    const temporary = `${file}.cubicle-${process.pid}`;
    fs.writeFileSync(temporary, `${crypto.randomBytes(16).toString("hex")}\n`, { mode: 0o444 });
    fs.renameSync(temporary, file);
  } catch (error) {
    log.warn("could not give the guest a machine id", { error: (error as Error).message });
  }
}

let rtcSync: { lastCheckMs: number } | undefined;

/**
 * Keeps a guest's clock with its RTC (GUEST_MACHINE_NOTE) from now on; call once at the agent's
 * start, in a guest only. Without an RTC it does nothing.
 */
export function startGuestClockSync(env: NodeJS.ProcessEnv = process.env): void {
  if (env.CUBICLE_AGENT_GUEST !== "1" || !fs.existsSync(RTC_SECONDS_FILE)) return;
  rtcSync = { lastCheckMs: 0 };
  checkGuestClock();
  setInterval(() => checkGuestClock(), RTC_CHECK_MS).unref();
}

/**
 * Compares the clock with the RTC and sets it when they differ (GUEST_MACHINE_NOTE): every two
 * seconds, and before each request (at most every 200 ms), since a request is what a resume
 * brings first. One small sysfs read; nothing outside a guest.
 */
export function checkGuestClock(): void {
  if (!rtcSync) return;
  const started = performance.now();
  if (started - rtcSync.lastCheckMs < 200) return;
  rtcSync.lastCheckMs = started;
  let rtcMs: number;
  try {
    rtcMs = Number(fs.readFileSync(RTC_SECONDS_FILE, "utf8").trim()) * 1000;
  } catch {
    return;
  }
  // Mid-second on average: the RTC shows the whole seconds that have passed.
  if (Number.isFinite(rtcMs) && rtcMs > 0 && Math.abs(Date.now() - (rtcMs + 500)) > RTC_TOLERANCE_MS) setClock(rtcMs + 500);
}

function setClock(epochMs: number): void {
  try {
    const addon = guestAddon();
    if (addon) addon.setTime(epochMs);
    else void run("date", ["-u", "-s", `@${(epochMs / 1000).toFixed(3)}`], { timeout: COMMAND_TIMEOUT_MS }).catch((error: Error) => log.warn("could not set the guest's clock", { error: error.message }));
  } catch (error) {
    log.warn("could not set the guest's clock", { error: (error as Error).message });
  }
}

async function setBootId(bootId: string): Promise<void> {
  await writeAtomically(GUEST_BOOT_ID_FILE, `${bootId}\n`);
  // By syscalls: two processes (`umount`, `mount`) took most of a restored guest's first /init under TCG.
  const addon = guestAddon();
  if (addon?.bindReadOnly) return addon.bindReadOnly(GUEST_BOOT_ID_FILE, BOOT_ID_PATH);
  // A file bound earlier (a fork of a fork) still shows the old content through its old inode.
  const mounts = await fs.promises.readFile("/proc/self/mountinfo", "utf8");
  if (mounts.split("\n").some((line) => line.split(" ")[4] === BOOT_ID_PATH)) await run("umount", [BOOT_ID_PATH], { timeout: COMMAND_TIMEOUT_MS });
  await run("mount", ["--bind", "-o", "ro", GUEST_BOOT_ID_FILE, BOOT_ID_PATH], { timeout: COMMAND_TIMEOUT_MS });
}

async function writeAtomically(file: string, text: string): Promise<void> {
  await fs.promises.mkdir(path.dirname(file), { recursive: true });
  const temporary = `${file}.cubicle-${process.pid}`;
  await fs.promises.writeFile(temporary, text, { mode: 0o444 });
  await fs.promises.rename(temporary, file);
}

let loaded: GuestAddon | null | undefined;

function guestAddon(): GuestAddon | null {
  if (loaded !== undefined) return loaded;
  const file = process.env.CUBICLE_AGENT_GUEST_ADDON ?? path.join(path.dirname(process.argv[1] ?? "/"), "guest.node");
  loaded = null;
  if (!fs.existsSync(file)) {
    log.warn("no guest addon: a restored guest is not reseeded at once", { file });
    return loaded;
  }
  try {
    loaded = loadNativeAddon<GuestAddon>(file);
  } catch (error) {
    log.warn("the guest addon cannot be loaded: a restored guest is not reseeded at once", { file, error: (error as Error).message });
  }
  return loaded;
}
