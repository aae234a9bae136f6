import { EGRESS_FIELDS } from "../../network/egress-policy.js";
import type { NetworkManager, NetworkPolicy } from "../../network/types.js";
import type { Runtime, SandboxSpec } from "../../runtime/types.js";
import { CubicleError } from "../../shared/cubicle-error.js";
import { createLogger, roundMs } from "../../shared/log.js";
import { runtimeIdOf, type CodebaseMount, type SandboxRecord, type Store, type VolumeMount } from "../../store/types.js";
import { agentReadyTimeoutMs, buildInitBody, newMachineIdentity, type AgentLink } from "../../protocol/index.js";
import { newSandboxId, newToken } from "../ids.js";
import { KeyedMutex } from "../keyed-mutex.js";
import { SandboxTable } from "../sandbox-table.js";
import type { StartQueue } from "../start-queue.js";
import type { CreateSandboxRequest, TemplateCatalog, TemplateInfo } from "../types.js";

export const log = createLogger("core");

/** What the lifecycle steps drive: the ports of the layers below the core. */
export interface LifecyclePorts {
  store: Store;
  runtime: Runtime;
  network: NetworkManager;
  agent: AgentLink;
  templates: TemplateCatalog;
  /** Volumes (VOLUMES_NOTE); absent: creates with `volumeMounts` are refused. */
  volumes?: VolumePort;
  /** Codebases (CODEBASES_NOTE); absent: creates with `codebaseMounts` are refused. */
  codebases?: CodebasePort;
}

/** What the lifecycle needs of the codebases. */
export interface CodebasePort {
  resolveMounts(mounts: NonNullable<CreateSandboxRequest["codebaseMounts"]>): Promise<CodebaseMount[]>;
}

/** What the lifecycle needs of the volumes. */
export interface VolumePort {
  /** The volumes a create names, by name or id; invalid_argument for one that does not exist. */
  resolveMounts(mounts: readonly { name: string; path: string }[]): Promise<VolumeMount[]>;
  /** The host directory of a volume. */
  dirOf(volumeId: string): string;
}

export interface LifecycleSettings {
  /** Processes per sandbox. */
  pidsLimit: number;
  /** Time in the hot pause tier (frozen in RAM) before a checkpoint to disk. */
  durablePauseAfterMs: number;
  /** Time after a hot pause at which its image is written to disk while it stays frozen; negative = never. */
  pauseImageAfterMs: number;
  /** PEM of Cubicle's CA for the agents' /init (they add it to the sandbox's trust). */
  caCertificates?: string;
}

/**
 * A dump that failed for lack of space (the runtime gives a full image budget or pool its own
 * code: the snapshot's or CRIU's EDQUOT/ENOSPC) becomes a 507 that says what it means for this
 * sandbox and what to do; any other error is returned as it is.
 */
export function storageFullOr(error: CubicleError, sandboxId: string, outcome: string): CubicleError {
  if (error.code !== "insufficient_storage") return error;
  return new CubicleError(
    "insufficient_storage",
    `not enough space on the server to save the memory and files of sandbox "${sandboxId}": its storage for snapshots and paused sandboxes is full (No space left on device)${outcome}. Delete snapshots you no longer need, or free space on the host (or raise CUBICLE_IMAGE_BUDGET_GB), then retry`,
    { cause: error, details: error.details },
  );
}

/**
 * What every lifecycle step shares: the ports, the sandbox table, the per-sandbox lock, the
 * start slots, and the steps more than one verb takes (a new record, its network, its agent's
 * /init, a restore into it, its end). The verbs themselves live in the files next to this one.
 */
export class LifecycleContext {
  readonly table: SandboxTable;
  readonly mutex = new KeyedMutex();
  /** Set by close(): no new sandbox starts. */
  closed = false;
  /** Re-arms the reaper after a change of an end of life or a pause (set by the manager). */
  scheduleReaper: () => void = () => undefined;
  /**
   * Wakes a running sandbox asleep for idleness (frozen or on disk) before a verb that needs it
   * live; the caller holds its lock. A no-op for an awake one (set by the manager: idle.ts).
   */
  wakeLocked: (record: SandboxRecord) => Promise<void> = async () => undefined;

  constructor(
    readonly ports: LifecyclePorts,
    readonly settings: LifecycleSettings,
    readonly starts: StartQueue,
    /** Resets a sandbox's open connections (it ended, or stops serving for a while). */
    readonly resetConnections: (sandboxId: string) => void,
  ) {
    this.table = new SandboxTable(ports.store, (record, reason) => this.teardown(record, reason));
  }

  refuseWhenClosed(): void {
    if (this.closed) throw new CubicleError("unavailable", "the server is shutting down; try again shortly");
  }

  async recordEvent(sandboxId: string, kind: string, detail?: Record<string, unknown>): Promise<void> {
    await this.ports.store.recordEvent({ sandboxId, at: Date.now(), kind, detail });
  }

  newRecord(request: CreateSandboxRequest, template: TemplateInfo, alias: string | undefined, sandboxId = newSandboxId()): SandboxRecord {
    const now = Date.now();
    return {
      sandboxId,
      runtimeId: sandboxId,
      templateId: template.templateId,
      alias,
      clientId: "cubicle",
      state: "starting",
      startedAt: now,
      endAt: now + request.timeoutSec * 1000,
      cpuCount: request.cpuCount ?? template.cpuCount,
      memoryMB: request.memoryMB ?? template.memoryMB,
      diskSizeMB: request.diskSizeMB ?? template.diskSizeMB,
      metadata: request.metadata,
      envVars: request.envVars,
      secure: request.secure,
      envdAccessToken: request.secure ? newToken() : undefined,
      // Ingress through the router then needs this token (e2b-traffic-access-token), as upstream.
      trafficAccessToken: request.networkConfig?.allowPublicTraffic === false ? newToken() : undefined,
      allowInternetAccess: request.allowInternetAccess,
      // The template's rate limits unless the create names its own (both off by default).
      networkConfig: template.bandwidth && request.networkConfig?.bandwidth === undefined ? { ...request.networkConfig, bandwidth: template.bandwidth } : request.networkConfig,
      lifecycle: { autoResume: request.autoResume, onTimeout: request.autoPause ? "pause" : "kill" },
      network: undefined,
      runtime: request.runtime ?? template.runtime ?? this.ports.runtime.name,
      endReason: undefined,
      timeoutSec: request.timeoutSec,
    };
  }

  /** Runs the start steps of a recorded `starting` sandbox; on failure it ends dead and the error is thrown. */
  async startOrFail(record: SandboxRecord, start: () => Promise<void>): Promise<void> {
    try {
      await start();
    } catch (err) {
      log.warn("create failed", { sandboxId: record.sandboxId, error: String(err) });
      await this.table.end(record, { state: "dead", reason: `create failed: ${(err as Error).message}` });
      throw CubicleError.from(err);
    }
  }

  /** A started sandbox is running: recorded with its network and runtime id, and its end of life armed. */
  async markRunning(record: SandboxRecord, detail: Record<string, unknown>): Promise<SandboxRecord> {
    await this.table.transition(record, "running", { network: record.network, runtimeId: record.runtimeId });
    await this.recordEvent(record.sandboxId, "created", { templateId: record.templateId, ...detail });
    this.scheduleReaper();
    return record;
  }

  /**
   * Gives the record its network's names and addresses (recorded at once, so a crash finds what
   * to release) and returns the promise of the namespace itself: the runtime prepares the
   * container meanwhile and waits for it before the container joins (~10 ms saved per start).
   */
  async beginNetwork(record: SandboxRecord): Promise<{ ready: Promise<unknown> }> {
    const { network, ready } = this.ports.network.begin(runtimeIdOf(record), networkPolicyOf(record));
    // Observed here so that a failure while the runtime is still busy is no unhandled rejection;
    // the runtime awaits `ready` itself and so fails with it.
    ready.catch(() => undefined);
    await this.table.update(record, { network });
    // In an object: an async function returning the promise itself would wait for it.
    return { ready };
  }

  specOf(record: SandboxRecord, template: TemplateInfo): SandboxSpec {
    if (!record.network) throw new CubicleError("internal", `sandbox ${record.sandboxId} has no network`);
    return {
      sandboxId: runtimeIdOf(record),
      runtime: record.runtime,
      hostname: record.sandboxId,
      template: template.image,
      resources: { cpuCount: record.cpuCount, memoryMiB: record.memoryMB, diskMiB: record.diskSizeMB, pidsLimit: this.settings.pidsLimit },
      network: record.network,
      ...(record.volumeMounts?.length ? { volumes: record.volumeMounts.map((mount) => ({ source: this.volumeDir(mount.volumeId), target: mount.path })) } : {}),
      ...(record.codebaseMounts?.length
        ? { codebases: record.codebaseMounts.map((mount) => ({ source: mount.sourceDir, target: mount.path, rules: mount.rules, defaultLevel: mount.defaultLevel })) }
        : {}),
    };
  }

  private volumeDir(volumeId: string): string {
    if (!this.ports.volumes) throw new CubicleError("failed_precondition", "this server has no volumes: the sandbox's volume mounts cannot be made");
    return this.ports.volumes.dirOf(volumeId);
  }

  /**
   * `/init` with the sandbox's identity; `currentToken` is the token the agent holds now, if any;
   * with `whenUpMs`, retried that long while the agent cannot be reached.
   */
  async initAgent(record: SandboxRecord, template: TemplateInfo, currentToken: string | undefined, whenUpMs?: number, options: { newMachine?: boolean } = {}): Promise<void> {
    const init = buildInitBody({
      ...(options.newMachine ? { machine: newMachineIdentity() } : {}),
      accessToken: record.envdAccessToken,
      envVars: record.envVars,
      defaultUser: template.image.defaultUser,
      defaultWorkdir: template.image.defaultWorkdir,
      hostname: record.sandboxId,
      caCertificates: this.settings.caCertificates,
    });
    await this.ports.agent.init(record.network!.sandboxAddress, init, { currentToken, whenUpMs });
  }

  /** No idle keep-alive socket of ours may be carried into a memory image (see AgentLink.dropIdleSockets). */
  dropIdleSockets(record: SandboxRecord): void {
    if (record.network) this.ports.agent.dropIdleSockets(record.network.sandboxAddress);
  }

  async templateOf(record: Pick<SandboxRecord, "templateId">): Promise<TemplateInfo> {
    const template = await this.ports.templates.resolve(record.templateId);
    if (!template) throw new CubicleError("failed_precondition", `template "${record.templateId}" is gone; the sandbox cannot be restored without its root filesystem`);
    return template;
  }

  /**
   * Restores an image into a recorded sandbox: a network (new unless the record has one), the
   * runtime restore, the agent's readiness, and a re-init that hands it this sandbox's identity.
   * `sameMachine`: the image is the sandbox's own earlier state (resume, rollback), which keeps
   * its machine and boot ids; anything else is a new machine (SandboxSpec.sameMachine).
   */
  async restoreInto(record: SandboxRecord, template: TemplateInfo, imageId: string, agentToken: string | undefined, sameMachine = false): Promise<void> {
    const started = performance.now();
    const network = record.network ? undefined : await this.beginNetwork(record);
    // The restored agent listens already: no health probe before its /init, which runs while
    // the runtime renames the host. One restored from files alone boots first (a microVM's
    // guest kernel too: its runtime's wait).
    const whenRunning = () => this.initAgent(record, template, agentToken, agentReadyTimeoutMs(record.runtime), { newMachine: !sameMachine });
    await this.ports.runtime.restore({ ...this.specOf(record, template), networkReady: network?.ready, whenRunning, sameMachine }, imageId);
    log.debug("restored into a sandbox", { sandboxId: record.sandboxId, ms: roundMs(performance.now() - started) });
  }

  async markDead(record: SandboxRecord, reason: string): Promise<void> {
    await this.table.end(record, { state: "dead", reason });
  }

  /** A durable pause needs neither the bundle (the image holds a copy of the upper layer) nor the network. */
  async releaseHostResources(record: SandboxRecord): Promise<void> {
    const runtimeId = runtimeIdOf(record);
    await this.ports.runtime.destroy(runtimeId).catch((err) => log.error("destroy after checkpoint failed", { sandboxId: record.sandboxId, error: String(err) }));
    await this.ports.network.release(runtimeId).catch((err) => log.error("network release after checkpoint failed", { sandboxId: record.sandboxId, error: String(err) }));
    await this.table.update(record, { network: undefined });
  }

  /** Removes an ended sandbox's connections, container, network and pause image (either tier); never throws. */
  private async teardown(record: SandboxRecord, reason: string): Promise<void> {
    this.resetConnections(record.sandboxId);
    const runtimeId = runtimeIdOf(record);
    try {
      await this.ports.runtime.destroy(runtimeId);
    } catch (err) {
      log.error("runtime destroy failed", { sandboxId: record.sandboxId, runtimeId, reason, error: String(err) });
    }
    try {
      await this.ports.network.release(runtimeId);
    } catch (err) {
      log.error("network release failed", { sandboxId: record.sandboxId, runtimeId, reason, error: String(err) });
    }
    // A pause image (either tier), or the image of a running sandbox asleep on disk (idle.ts).
    for (const image of [record.pause?.imageId, record.idle?.imageId]) {
      if (image) await this.ports.runtime.images.remove(image).catch((err) => log.error("removing a pause image failed", { sandboxId: record.sandboxId, reason, error: String(err) }));
    }
  }
}

/** What the network manager enforces for a sandbox: its allowInternetAccess and `network` egress fields. */
export function networkPolicyOf(record: Pick<SandboxRecord, "allowInternetAccess" | "networkConfig">): NetworkPolicy {
  return { allowInternetAccess: record.allowInternetAccess, network: record.networkConfig };
}

/** Whether a sandbox's policy differs from a fresh pool entry's (everything public allowed). */
export function hasOwnEgressPolicy(record: Pick<SandboxRecord, "allowInternetAccess" | "networkConfig">): boolean {
  const network = record.networkConfig;
  if (!record.allowInternetAccess) return true;
  if (!network) return false;
  return [...EGRESS_FIELDS, "bandwidth"].some((field) => {
    const value = network[field];
    return value !== undefined && value !== null && !(Array.isArray(value) && value.length === 0);
  });
}
