import type { SandboxNetwork } from "../network/types.js";

/** The template facts a runtime needs to start a sandbox. */
export interface TemplateImage {
  templateId: string;
  /** Root filesystem, owned by the user-namespace range the runtime maps root to. */
  rootfsDir: string;
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
  hostname: string;
  template: TemplateImage;
  resources: SandboxResources;
  network: SandboxNetwork;
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
  readonly name: "container" | "microvm";
  /** Prepares host-wide state (agent kit, directories). */
  init(): Promise<void>;
  /** Creates and starts the sandbox with the agent running. Resolves once the agent process runs (not necessarily listening). */
  create(spec: SandboxSpec): Promise<void>;
  /** Stops and removes everything the sandbox owns on the host. Idempotent. */
  destroy(sandboxId: string): Promise<void>;
  state(sandboxId: string): Promise<RuntimeState>;
  /** Sandbox ids this runtime has on the host (for recovery and leak checks). */
  list(): Promise<string[]>;
  freeze(sandboxId: string): Promise<void>;
  thaw(sandboxId: string): Promise<void>;
  stats(sandboxId: string): Promise<SandboxStats>;
}

/** Root inside a sandbox is this uid on the host; template rootfs trees are owned by the shifted range. */
export const SANDBOX_UID_BASE = 100000;
/** Size of the uid/gid range mapped into every sandbox's user namespace. */
export const SANDBOX_UID_COUNT = 65536;
