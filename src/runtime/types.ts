import type { SandboxNetwork } from "../network/types.js";
import type { ImageKind, ImageStore } from "./images.js";

/** The template facts a runtime needs to start a sandbox. */
export interface TemplateImage {
  templateId: string;
  /** Root filesystem, owned by the user-namespace range the runtime maps root to. */
  rootfsDir: string;
  /**
   * The template's own files on top of `rootfsDir` (a user template's build): a filesystem-only
   * image of kind `layer` made on the same `rootfsDir`. A fresh sandbox's writable layer starts
   * as a copy of it (copy-on-write) instead of empty. Absent = the rootfs alone.
   */
  layerImageId?: string;
  defaultUser: string;
  defaultWorkdir: string;
  /** Extra environment for every process (PATH …). */
  env: Record<string, string>;
}

export interface SandboxResources {
  cpuCount: number;
  memoryMiB: number;
  /** Upper-layer quota; 0 = none. */
  diskMiB: number;
  /** Max number of processes. */
  pidsLimit: number;
}

export interface SandboxSpec {
  sandboxId: string;
  /**
   * Which runtime runs it, for a RuntimeSet (RUNTIME_SET_NOTE): create() picks it (absent = the
   * set's default); a restore runs on the runtime that made the image, whatever this says. A
   * single runtime ignores it.
   */
  runtime?: "container" | "microvm";
  hostname: string;
  template: TemplateImage;
  resources: SandboxResources;
  network: SandboxNetwork;
  /**
   * Settles when `network` exists on the host (NetworkManager.begin). The runtime prepares what
   * needs only the names (bundle, upper layer, mounts) meanwhile and waits for it before the
   * container joins the namespace. Absent = the network is ready.
   */
  networkReady?: Promise<unknown>;
  /**
   * restore(): the caller's first step once the processes run (the agent's /init), run
   * concurrently with what the runtime still does then (renaming the host); restore() resolves
   * when both are done and fails when either fails.
   */
  whenRunning?: () => Promise<void>;
  /**
   * restore(): the image is this sandbox's own earlier state brought back (a resume, a
   * rollback), not a new machine made from it (a fork, a create from a snapshot or a template's
   * warm image). It keeps the image's machine id and, when its processes are restored, its boot
   * id; otherwise it gets new ones (a filesystem-only image always boots: a new boot id).
   */
  sameMachine?: boolean;
  /**
   * Host directories mounted read-write at `target` inside (volumes, VOLUMES_NOTE), their
   * files' owners mapped as the template's are. A runtime that cannot mount them refuses.
   */
  volumes?: readonly { source: string; target: string }[];
  /**
   * Host directories served at `target` through a permission-checking filesystem
   * (CODEBASES_NOTE): `rules` of glob pattern → level, `defaultLevel` for the rest.
   */
  codebases?: readonly { source: string; target: string; rules: readonly { pattern: string; level: string }[]; defaultLevel: string }[];
  /**
   * create(): a start for no one yet (a warm-pool entry, a warm snapshot's source), made with
   * the lowest CPU weight so that foreground work wins the CPU while it boots and waits;
   * `Runtime.foreground` gives it the normal one when it is claimed.
   */
  background?: boolean;
}

export type RuntimeState = "running" | "frozen" | "stopped" | "missing";

export interface SandboxStats {
  cpuUsedPct: number;
  cpuCount: number;
  memUsedBytes: number;
  memTotalBytes: number;
  memCacheBytes: number;
  diskUsedBytes: number;
  diskTotalBytes: number;
}

/**
 * A runtime driver: makes the isolated machine, starts the Cubicle agent in it, and tears it
 * down. The agent listens on the sandbox address, ports 49983 (envd) and 49999 (interpreter).
 */
export interface Runtime {
  /** The runtime's kind; a RuntimeSet's is its default runtime's. */
  readonly name: "container" | "microvm";
  /** Whether sandboxes of that runtime can run here (a RuntimeSet may run several); absent = only `name`. */
  runs?(name: "container" | "microvm"): boolean;
  /** Prepares host-wide state (agent kit, directories). */
  init(): Promise<void>;
  /** Creates and starts the sandbox with the agent running. Resolves once the agent process runs (not necessarily listening). */
  create(spec: SandboxSpec): Promise<void>;
  /** Stops and removes everything the sandbox owns on the host. Idempotent. */
  destroy(sandboxId: string): Promise<void>;
  state(sandboxId: string): Promise<RuntimeState>;
  /** Sandbox ids this runtime has on the host (for recovery and leak checks). */
  list(): Promise<string[]>;
  /**
   * What a memory image depends on besides the template (the container runtime: its agent kit,
   * whose Node binary restored processes still map); images made under another value cannot be
   * restored. Undefined when the runtime has no such dependency. A RuntimeSet answers for the
   * runtime named (default: its default runtime); a single runtime ignores the name.
   */
  memoryImageFingerprint?(runtime?: "container" | "microvm"): string | undefined;
  freeze(sandboxId: string): Promise<void>;
  thaw(sandboxId: string): Promise<void>;
  /**
   * Gives a sandbox created with `spec.background` the CPU weight every other sandbox has (a
   * warm-pool claim, before its thaw). Cheap: a file write, no process start; works on a frozen
   * sandbox, and on one that never was a background start (nothing changes).
   */
  foreground(sandboxId: string): Promise<void>;
  /**
   * Renames a running sandbox's host (its UTS namespace) from outside: a claimed pool entry or a
   * restored image carries the name it was made with, and the agent lacks CAP_SYS_ADMIN.
   */
  setHostname(sandboxId: string, hostname: string): Promise<void>;
  stats(sandboxId: string): Promise<SandboxStats>;
  /**
   * Total CPU time the sandbox's processes consumed so far (microseconds), without the side
   * effects of stats() (which measures use since its previous call): the idle tiers compare two
   * readings. Absent (or `unimplemented`) = the runtime cannot tell: the idle tiers then ask the
   * sandbox's agent for its machine's CPU time (GUEST_CPU_NOTE: a microVM's guest).
   */
  cpuTimeUsec?(sandboxId: string): Promise<number>;
  /**
   * The most CPU (a share of one core, as the idle tiers measure it) a quiet sandbox of this
   * runtime uses, when it is not the idle tiers' default (2 %): a microVM under TCG spends
   * guest time several times over on the same idle work (GUEST_CPU_NOTE).
   */
  idleCpuShare?(sandboxId: string): Promise<number | undefined>;
  /**
   * The runtime's images (snapshots, pause images, warm images): callers hold their ids and
   * remove, list and check them here; only the runtime writes and reads what is in them.
   */
  readonly images: ImageStore;
  /**
   * Saves the sandbox's state as a new image `target` (`images.allocate`, then commit: the id
   * exists only once the image is complete; a failure leaves nothing, and already_exists when
   * an image has that id): the filesystem and, with `memory`, its processes. With
   * `leaveRunning` the sandbox is frozen only for the dump and keeps running; without it, the
   * sandbox's processes are gone afterwards (durable pause) but its disk stays until destroy().
   */
  checkpoint(sandboxId: string, target: CheckpointTarget, options: CheckpointOptions): Promise<CheckpointInfo & { imageId: string }>;
  /**
   * Starts a sandbox from an image made by this runtime's checkpoint() (an image of another
   * runtime is refused: failed_precondition): its disk made from the image's, processes restored
   * (or, for a filesystem-only image, the agent started anew) into `spec.network`.
   * `spec.sandboxId` may be the image's own sandbox (resume, rollback: the old sandbox must be
   * gone first) or a new one (create from snapshot, fork).
   * Restored processes keep what was in their memory: the source's hostname and environment;
   * established TCP connections come back closed, listening sockets listen again.
   */
  restore(spec: SandboxSpec, imageId: string): Promise<void>;
  /** Registers for sandboxes whose processes ended on their own (crash, OOM, exit from inside). */
  onExit(listener: (sandboxId: string) => void): void;
  /** Starts reporting the end of a running sandbox found on the host (after a server restart). */
  watch(sandboxId: string): Promise<void>;
}

/** The image a checkpoint makes: its id is `imageId(kind, name)`. */
export interface CheckpointTarget {
  kind: ImageKind;
  name: string;
}

export interface CheckpointOptions {
  /** Dump processes and memory (CRIU); false = filesystem only. */
  memory: boolean;
  /** Keep the sandbox running after the dump (snapshot, fork) instead of stopping it (pause). */
  leaveRunning: boolean;
  /** The image serves this many restores at once and is then removed (a fork's): nothing is prepared for later ones. */
  transient?: { restores: number };
}

export interface CheckpointInfo {
  /** Bytes the image takes on disk. */
  sizeBytes: number;
  /** Time the sandbox was frozen for the dump (ms). */
  frozenMs: number;
  memory: boolean;
}

/**
 * Template rootfs trees and sandbox layers store ids shifted to this base on disk (root inside
 * = 100000); each sandbox sees them through idmapped mounts in its own host range
 * (USERNS_OWNER_NOTE), never as these ids.
 */
export const SANDBOX_UID_BASE = 100000;
/** Size of the uid/gid range mapped into every sandbox's user namespace. */
export const SANDBOX_UID_COUNT = 65536;
