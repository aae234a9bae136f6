import { randomUUID } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";

/**
 * BOOT_IDENTITY_NOTE: what makes a sandbox a machine of its own rather than a view of the host.
 *
 * - **Boot id** (`/proc/sys/kernel/random/boot_id`, read by journald, systemd, and programs
 *   that tell a reboot from a restart): the kernel has one for the whole host. Each sandbox
 *   gets its own in a file of its bundle. runc 1.1 refuses config.json mounts under /proc
 *   (checkProcMount), so runc binds the file read-only at /.cubicle/boot-id (an empty file of
 *   the kit is the mount point) and the sandbox's first program, `native/sandbox-boot.c`, binds
 *   that over the kernel's path before it execs the init. For CRIU the first mount is an
 *   external one runc names (restored from the restoring bundle's file, never the dumped one)
 *   and the second a bind of it, so a restored sandbox shows the id the runtime chose for it.
 * - **Machine id** (`/etc/machine-id`, dbus, systemd): a read-only bind of a file of the bundle,
 *   an ordinary config.json mount, external for CRIU the same way. The templates have no
 *   /etc/machine-id of their own; runc makes the empty mount point in the sandbox's layer.
 *   `/var/lib/dbus/machine-id` is left to the template (Debian's dbus links it to
 *   /etc/machine-id).
 * - **Uptime**: sandbox-boot also makes a time namespace whose monotonic and boot-time clocks
 *   start at zero, so `/proc/uptime`, `uptime`, process start times, /proc/stat's btime and
 *   `time.monotonic()` count from the sandbox's boot (runc 1.1 has no time namespaces, and runc
 *   itself must stay in the host's: it records the init's start time as it sees it and compares
 *   it on every later call). CRIU saves the namespace's clocks with the processes and a restore
 *   continues them from there: the time a sandbox spent dumped does not count.
 * - runc gives sandbox-boot CAP_SYS_ADMIN and CAP_SYS_TIME over the sandbox's user namespace for
 *   this (BOOT_CAPABILITIES in oci-spec.ts); it drops both from every set before the exec.
 *
 * Which ids a sandbox gets (`identityFor`): a boot is a new boot id; a new machine (a create, a
 * fork, a create from a snapshot or from a template's warm image) is a new machine id too. The
 * sandbox's own earlier state brought back (a resume, a rollback) keeps its machine id, and,
 * when its processes come back with it, its boot id: it did not reboot. A resume from a
 * filesystem-only image is a reboot: a new boot id, the same machine id, uptime from zero.
 */
export const BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id";
export const MACHINE_ID_PATH = "/etc/machine-id";

/** The ids of one sandbox, as its files hold them (with the trailing newline). */
export interface BootIdentity {
  /** Like the kernel's: a random (version 4) UUID, e.g. `1b4e28ba-2fa1-41d2-883f-0016d3cca427\n`. */
  bootId: string;
  /** Like systemd's: 32 lowercase hex digits of a random (version 4) UUID. */
  machineId: string;
}

export function newBootId(): string {
  return `${randomUUID()}\n`;
}

export function newMachineId(): string {
  return `${randomUUID().replace(/-/g, "")}\n`;
}

const BOOT_ID_FORMAT = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\n$/;
const MACHINE_ID_FORMAT = /^[0-9a-f]{32}\n$/;

/** The boot id in `text` when it is one (an image's meta.json may be damaged or hostile). */
export function validBootId(text: unknown): string | undefined {
  return typeof text === "string" && BOOT_ID_FORMAT.test(text) ? text : undefined;
}

export function validMachineId(text: unknown): string | undefined {
  return typeof text === "string" && MACHINE_ID_FORMAT.test(text) && !/^0+\n$/.test(text) ? text : undefined;
}

/** Where a sandbox comes from, as far as its identity is concerned. */
export type IdentitySource =
  | { kind: "fresh" }
  | {
      kind: "image";
      /** The image's processes are restored (not a boot from its files). */
      memory: boolean;
      /** The image is this sandbox's own earlier state (resume, rollback), not a new machine made from it. */
      sameMachine: boolean;
      /** The ids recorded in the image (absent in images made before they were). */
      recorded: Partial<BootIdentity>;
    };

/** The ids a sandbox starts with (BOOT_IDENTITY_NOTE). */
export function identityFor(source: IdentitySource): BootIdentity {
  if (source.kind === "fresh" || !source.sameMachine) return { bootId: newBootId(), machineId: newMachineId() };
  const machineId = validMachineId(source.recorded.machineId) ?? newMachineId();
  const bootId = (source.memory ? validBootId(source.recorded.bootId) : undefined) ?? newBootId();
  return { bootId, machineId };
}

/** The files of a bundle that hold its ids (bound into the sandbox read-only). */
export function identityFiles(bundleDir: string): { bootId: string; machineId: string } {
  return { bootId: path.join(bundleDir, "boot-id"), machineId: path.join(bundleDir, "machine-id") };
}

/** Writes a bundle's id files: host root's, readable by all (the sandbox's root binds them). */
export async function writeIdentity(bundleDir: string, identity: BootIdentity): Promise<void> {
  const files = identityFiles(bundleDir);
  await Promise.all([writeFile(files.bootId, identity.bootId, { mode: 0o444, flag: "wx" }), writeFile(files.machineId, identity.machineId, { mode: 0o444, flag: "wx" })]);
}

/** A bundle's ids, for its checkpoint images; a file that is missing or damaged is left out. */
export async function readIdentity(bundleDir: string): Promise<Partial<BootIdentity>> {
  const files = identityFiles(bundleDir);
  const [bootId, machineId] = await Promise.all([readFile(files.bootId, "utf8").catch(() => undefined), readFile(files.machineId, "utf8").catch(() => undefined)]);
  return { bootId: validBootId(bootId), machineId: validMachineId(machineId) };
}
