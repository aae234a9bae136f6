import { EventEmitter } from "node:events";
import { EGRESS_FIELDS } from "../network/egress-policy.js";
import type { NetworkManager } from "../network/types.js";
import type { Runtime } from "../runtime/types.js";
import { runtimeIdOf, type SandboxQuery, type SandboxRecord, type SnapshotQuery, type SnapshotRecord, type Store } from "../store/types.js";
import { CubicleError } from "../shared/cubicle-error.js";
import type { AgentLink } from "../protocol/index.js";
import { LifecycleContext, log, networkPolicyOf, type CodebasePort, type VolumePort } from "./lifecycle/context.js";
import { Creation } from "./lifecycle/create.js";
import { handleRuntimeExit, kill } from "./lifecycle/end.js";
import { IdleTiers } from "./lifecycle/idle.js";
import { PauseTiers, type ResumeOptions } from "./lifecycle/pause.js";
import { Reaper } from "./lifecycle/reaper.js";
import { SandboxMetrics, type MetricSample } from "./metrics.js";
import { recover, type Recovered } from "./lifecycle/recovery.js";
import { Snapshots, type ForkOutcome } from "./lifecycle/snapshots.js";
import { StartQueue, type StartQueueOptions } from "./start-queue.js";
import type { CreateSandboxRequest, TemplateCatalog, TemplateInfo } from "./types.js";
import { WarmPool } from "./warm-pool.js";
import { WarmSnapshots, type WarmSnapshotCounts } from "./warm-snapshots.js";
import { bootUnclaimed, destroyUnclaimed } from "./unclaimed-sandbox.js";
import { imageId, parseImageId } from "../runtime/images.js";
import { buildInitBody } from "../protocol/index.js";

export type { ForkOutcome } from "./lifecycle/snapshots.js";
export type { ResumeOptions } from "./lifecycle/pause.js";

/** The most a sandbox may live from one timeout call: 24 h, as upstream's highest tier. */
export const MAX_TIMEOUT_SEC = 24 * 60 * 60;
/** Timeout of a fork when the request names none (the API spec's default). */
export const DEFAULT_FORK_TIMEOUT_SEC = 15;

export interface SandboxManagerOptions {
  store: Store;
  runtime: Runtime;
  network: NetworkManager;
  /** The server's link to the agents in the sandboxes. */
  agent: AgentLink;
  templates: TemplateCatalog;
  /** Volumes (VOLUMES_NOTE); absent: creates with `volumeMounts` are refused. */
  volumes?: VolumePort;
  /** Codebases (CODEBASES_NOTE); absent: creates with `codebaseMounts` are refused. */
  codebases?: CodebasePort;
  /** Processes per sandbox. */
  pidsLimit?: number;
  /** Warm pool size per template id or alias; empty = no pools. */
  poolSizes?: Record<string, number>;
  /** Start slots and admission limits (ADMISSION_NOTE; the defaults are the configuration's). */
  admission: StartQueueOptions;
  /** Seconds in the hot pause tier (frozen in RAM) before a checkpoint to disk. */
  durablePauseAfterSec?: number;
  /** Seconds without traffic, command or CPU use after which a running sandbox is frozen (idle tiers); 0 or absent = never. */
  idleFreezeAfterSec?: number;
  /** Seconds frozen for idleness after which its memory goes to disk; 0 or absent = never. */
  idleDiskAfterSec?: number;
  /**
   * Milliseconds after a hot pause at which its image is written to disk while it stays frozen
   * (so a host reboot does not lose it); default 1000, negative = never.
   */
  pauseImageAfterMs?: number;
  /** Template ids or aliases whose creates restore a warm snapshot when no pool entry is ready. */
  warmSnapshotTemplates?: string[];
  /** Decides when a template's warm snapshot is stale (its recipe hash); default its rootfs path. */
  templateFingerprint?: (template: TemplateInfo) => Promise<string>;
  /** PEM of Cubicle's CA, handed to every agent in /init so sandboxes trust the egress proxy. */
  caCertificates?: string;
}

/** Where the router sends traffic for a live sandbox. */
export interface RouteTarget {
  sandboxId: string;
  address: string;
  /** Set when ingress needs the `e2b-traffic-access-token` header (network.allowPublicTraffic false). */
  trafficAccessToken?: string;
  /** E2B `network.maskRequestHost`: the Host non-envd ports receive (`${PORT}` replaced by the router). */
  maskRequestHost?: string;
  /** E2B `network.httpsPorts`: ports the router reaches over TLS. */
  httpsPorts?: number[];
}

export interface SandboxManagerEvents {
  /** A sandbox stopped serving (killed, expired, paused, rolled back): open connections must be reset. */
  ended: [sandboxId: string];
}

/**
 * The core's public verbs: create (warm pool, warm snapshot, cold, from a snapshot), kill,
 * timeouts, pause and resume (hot: frozen in RAM; durable: a checkpoint on disk), snapshots,
 * fork, rollback, and recovery after a restart. The live sandboxes are in a SandboxTable, which
 * mirrors them into the store and checks every change of state; the verbs are in lifecycle/,
 * one file per concern, and take the sandbox's lock here. Runtime and network calls use the
 * record's runtime id (`runtimeIdOf`): it equals the sandbox id (a claimed pool entry's id
 * becomes the sandbox's), but records of earlier versions kept the pool entry's own id.
 */
export class SandboxManager extends EventEmitter<SandboxManagerEvents> {
  private readonly ctx: LifecycleContext;
  private readonly pool: WarmPool;
  private readonly warmSnapshots: WarmSnapshots;
  private readonly creation: Creation;
  private readonly pauses: PauseTiers;
  private readonly idle: IdleTiers;
  private readonly snapshots: Snapshots;
  private readonly reaper: Reaper;
  private readonly metricsHistory: SandboxMetrics;

  constructor(options: SandboxManagerOptions) {
    super();
    const pidsLimit = options.pidsLimit ?? 4096;
    // Every start (create, restore, pool refill) takes a slot here (ADMISSION_NOTE).
    const starts = new StartQueue(options.admission);
    const ports = { store: options.store, runtime: options.runtime, network: options.network, agent: options.agent, templates: options.templates, volumes: options.volumes, codebases: options.codebases };
    this.ctx = new LifecycleContext(
      ports,
      {
        pidsLimit,
        durablePauseAfterMs: (options.durablePauseAfterSec ?? 60) * 1000,
        pauseImageAfterMs: options.pauseImageAfterMs ?? 1000,
        caCertificates: options.caCertificates,
      },
      starts,
      (sandboxId) => this.emit("ended", sandboxId),
    );
    this.pool = new WarmPool({ ...ports, starts, sizes: options.poolSizes ?? {}, pidsLimit, caCertificates: options.caCertificates });
    this.warmSnapshots = new WarmSnapshots({
      ...ports,
      starts,
      templates: options.warmSnapshotTemplates ?? [],
      pidsLimit,
      templateFingerprint: options.templateFingerprint,
      caCertificates: options.caCertificates,
    });
    this.creation = new Creation(this.ctx, this.pool, this.warmSnapshots);
    this.pauses = new PauseTiers(this.ctx);
    this.idle = new IdleTiers(this.ctx, { freezeAfterMs: (options.idleFreezeAfterSec ?? 0) * 1000, diskAfterMs: (options.idleDiskAfterSec ?? 0) * 1000 });
    this.ctx.wakeLocked = (record) => this.idle.wakeLocked(record);
    this.snapshots = new Snapshots(this.ctx);
    this.reaper = new Reaper(this.ctx, this.pauses, { pause: (sandboxId) => this.pause(sandboxId), kill: (sandboxId, reason) => this.kill(sandboxId, reason) });
    this.ctx.scheduleReaper = () => {
      this.reaper.schedule();
      this.idle.sync();
    };
    options.runtime.onExit((runtimeId) => void handleRuntimeExit(this.ctx, this.pool, runtimeId));
    this.metricsHistory = new SandboxMetrics({
      // A sandbox asleep on disk has no container to sample.
      running: () => new Map(this.ctx.table.records().filter((record) => record.state === "running" && record.idle?.tier !== "disk").map((record) => [record.sandboxId, runtimeIdOf(record)])),
      isKnown: (sandboxId) => this.ctx.table.get(sandboxId) !== undefined,
      frozen: (sandboxId) => this.ctx.table.get(sandboxId)?.idle?.tier === "frozen",
      stats: (runtimeId) => options.runtime.stats(runtimeId),
    });
    this.metricsHistory.start();
  }

  /**
   * What the template builder needs of the core (BUILD_AGENT_NOTE): build sandboxes, booted
   * like pool entries (recorded as such, so recovery removes what a crash leaves) from a
   * template that need not be registered, with their agent initialised without a token; their
   * files committed as layer images; a template's warm snapshot made on demand.
   */
  readonly builds = {
    start: async (template: TemplateInfo, options: { allowInternetAccess: boolean }): Promise<{ runtimeId: string; address: string }> => {
      const deps = { ...this.ctx.ports, starts: this.ctx.starts, pidsLimit: this.ctx.settings.pidsLimit, caCertificates: this.ctx.settings.caCertificates };
      const entry = await bootUnclaimed(deps, template, options);
      const address = entry.network!.sandboxAddress;
      try {
        await this.ctx.ports.runtime.foreground(entry.runtimeId);
        await this.ctx.ports.agent.init(address, buildInitBody({ envVars: {}, defaultUser: template.image.defaultUser, defaultWorkdir: template.image.defaultWorkdir, caCertificates: this.ctx.settings.caCertificates }));
      } catch (err) {
        await destroyUnclaimed(deps, entry.runtimeId);
        throw err;
      }
      return { runtimeId: entry.runtimeId, address };
    },
    /** The build sandbox's files as the layer image `layer/<name>` (it keeps running); replaces an older one. */
    commit: async (runtimeId: string, name: string): Promise<string> => {
      const { runtime } = this.ctx.ports;
      await runtime.images.remove(imageId("layer", name));
      return (await runtime.checkpoint(runtimeId, { kind: "layer", name }, { memory: false, leaveRunning: true })).imageId;
    },
    destroy: async (runtimeId: string): Promise<void> => {
      await destroyUnclaimed({ ...this.ctx.ports, pidsLimit: this.ctx.settings.pidsLimit }, runtimeId);
    },
    imageExists: (id: string): Promise<boolean> => this.ctx.ports.runtime.images.exists(id),
    removeImage: (id: string): Promise<void> => this.ctx.ports.runtime.images.remove(id),
    removeWarm: async (templateId: string): Promise<void> => {
      const { images } = this.ctx.ports.runtime;
      for (const id of await images.list("warm")) if (parseImageId(id).name.startsWith(`${templateId}-`)) await images.remove(id);
    },
    /** Makes the template's warm snapshot (its start command running) and waits for it. */
    warm: (template: TemplateInfo): Promise<void> => this.warmSnapshots.ensure(template),
    /** Whether a sandbox (live, paused or asleep) was made from the template. */
    inUse: async (templateId: string): Promise<boolean> =>
      this.ctx.table.records().some((record) => record.templateId === templateId) ||
      (await this.ctx.ports.store.querySandboxes({ states: ["paused"] })).some((record) => record.templateId === templateId),
  };

  /** A sandbox's metrics samples in `[start, end]` (unix seconds, inclusive; metrics.ts). */
  async metrics(sandboxId: string, range: { start?: number; end?: number } = {}): Promise<MetricSample[]> {
    const record = await this.get(sandboxId);
    return this.metricsHistory.range(sandboxId, record.state === "running" && record.idle?.tier !== "disk" ? runtimeIdOf(record) : undefined, range.start, range.end);
  }

  /** The newest sample of each of these sandboxes; ids of no running or paused sandbox are left out. */
  async latestMetrics(sandboxIds: string[]): Promise<Map<string, MetricSample>> {
    const known = new Map<string, string | undefined>();
    for (const sandboxId of sandboxIds) {
      const record = this.ctx.table.get(sandboxId);
      if (record?.state === "running") known.set(sandboxId, runtimeIdOf(record));
      else if (record?.state === "paused") known.set(sandboxId, undefined);
    }
    return this.metricsHistory.latest(known);
  }

  /**
   * Starts filling the warm pools and building the warm snapshots of `prepared` templates
   * (others get theirs on their first create); call once the templates are built.
   */
  async startPools(prepared: string[] = []): Promise<void> {
    await this.pool.start();
    await this.warmSnapshots.start(prepared, (idOrAlias) => this.ctx.ports.templates.resolve(idOrAlias));
  }

  warmSnapshotCounts(): Record<string, WarmSnapshotCounts> {
    return this.warmSnapshots.counts();
  }

  poolCounts(): Record<string, { ready: number; creating: number; target: number }> {
    return this.pool.counts();
  }

  // ---- routing ------------------------------------------------------------------------------

  /**
   * The router's lookup: only running sandboxes with a network get traffic; one asleep for
   * idleness has none until resumeForTraffic wakes it. A lookup counts as activity (idle.ts).
   */
  routeTarget(sandboxId: string): RouteTarget | undefined {
    const live = this.ctx.table.entry(sandboxId);
    if (!live || live.initialising || live.record.state !== "running" || !live.record.network || this.idle.asleep(live)) return undefined;
    live.activeAt = Date.now();
    const { trafficAccessToken, networkConfig } = live.record;
    const maskRequestHost = networkConfig?.maskRequestHost;
    const httpsPorts = networkConfig?.httpsPorts;
    return {
      sandboxId,
      address: live.record.network.sandboxAddress,
      ...(trafficAccessToken ? { trafficAccessToken } : {}),
      ...(typeof maskRequestHost === "string" && maskRequestHost !== "" ? { maskRequestHost } : {}),
      ...(Array.isArray(httpsPorts) && httpsPorts.length > 0 ? { httpsPorts: httpsPorts.filter((port): port is number => Number.isInteger(port)) } : {}),
    };
  }

  /**
   * The router's second chance: a running sandbox asleep for idleness is woken (always: it is
   * running for its user, health probes included); a paused sandbox with auto-resume (and its
   * memory kept) is resumed for the request that arrived, unless `wake` is false (a health
   * probe); undefined means answer "not found" (also when the wake or resume failed).
   */
  async resumeForTraffic(sandboxId: string, options: { wake?: boolean } = {}): Promise<RouteTarget | undefined> {
    const live = this.ctx.table.entry(sandboxId);
    if (live?.initialising) {
      live.hurry?.();
      await live.initialising;
      return this.routeTarget(sandboxId);
    }
    if (live?.record.state === "running" && this.idle.asleep(live)) {
      try {
        await this.idle.wake(sandboxId);
      } catch (err) {
        log.warn("waking an idle sandbox failed", { sandboxId, error: String(err) });
        return undefined;
      }
      return this.routeTarget(sandboxId);
    }
    const record = live?.record;
    if (!record || record.state !== "paused" || !record.lifecycle.autoResume || record.pause?.memory === false || options.wake === false) return undefined;
    log.info("resuming a paused sandbox for the traffic that reached it (autoResume)", { sandboxId });
    try {
      await this.resume(sandboxId, { timeoutSec: record.timeoutSec ?? 300 });
    } catch (err) {
      log.warn("auto-resume failed", { sandboxId, error: String(err) });
      return undefined;
    }
    return this.routeTarget(sandboxId);
  }

  /** A forwarded request or stream to a sandbox opened; call the result when it closes (idle tiers count them). */
  holdAwake(sandboxId: string): () => void {
    return this.idle.hold(sandboxId);
  }

  /** Live and paused sandboxes, for routing signed `/files` URLs that carry no sandbox id. */
  liveSandboxes(): SandboxRecord[] {
    return this.ctx.table.records();
  }

  // ---- create, queries, kill, timeout -------------------------------------------------------

  async create(request: CreateSandboxRequest): Promise<SandboxRecord> {
    return this.creation.create(request);
  }

  /** A sandbox the API can talk about: running or paused. Throws not_found otherwise. */
  /** The sandbox a runtime id belongs to (they differ after a rollback); undefined for none. */
  sandboxIdOfRuntime(runtimeId: string): string | undefined {
    return this.ctx.table.byRuntimeId(runtimeId)?.sandboxId;
  }

  async get(sandboxId: string): Promise<SandboxRecord> {
    const record = this.ctx.table.get(sandboxId);
    if (record && (record.state === "running" || record.state === "paused")) return record;
    throw new CubicleError("not_found", `sandbox "${sandboxId}" not found`);
  }

  async list(query: SandboxQuery): Promise<SandboxRecord[]> {
    const states = query.states?.length ? query.states : ["running", "paused"];
    // A template filter names an id or an alias; the store keeps ids.
    const templateIds = query.templateIds
      ? await Promise.all(query.templateIds.map(async (idOrAlias) => (await this.ctx.ports.templates.resolve(idOrAlias))?.templateId ?? idOrAlias))
      : undefined;
    return this.ctx.ports.store.querySandboxes({ ...query, templateIds, states: states.filter((s) => s === "running" || s === "paused") });
  }

  /** Kills a sandbox. Resolves false when there is no such live sandbox (E2B's kill → false). */
  async kill(sandboxId: string, reason = "killed"): Promise<boolean> {
    return kill(this.ctx, sandboxId, reason);
  }

  /** E2B setTimeout: `endAt = now + timeout`; shortening is allowed. */
  async setTimeout(sandboxId: string, timeoutSec: number): Promise<void> {
    await this.ctx.mutex.run(sandboxId, async () => {
      const record = await this.get(sandboxId);
      await this.ctx.table.update(record, { endAt: Date.now() + timeoutSec * 1000 });
      this.idle.touch(sandboxId);
    });
    this.ctx.scheduleReaper();
  }

  /**
   * E2B updateNetwork: replaces the sandbox's egress fields (allowOut, denyOut, rules,
   * egressProxy; an omitted one is cleared) and allowInternetAccess, and applies them at once to
   * a sandbox that has a network (running or hot-paused); a durable pause gets them on resume.
   * The other `network` fields (allowPublicTraffic, maskRequestHost) stay.
   */
  async updateNetwork(sandboxId: string, update: { allowInternetAccess: boolean; egress: Record<string, unknown> }): Promise<void> {
    await this.ctx.mutex.run(sandboxId, async () => {
      const record = await this.get(sandboxId);
      const kept = Object.fromEntries(Object.entries(record.networkConfig ?? {}).filter(([key]) => !(EGRESS_FIELDS as readonly string[]).includes(key)));
      const networkConfig = { ...kept, ...update.egress };
      const next = { allowInternetAccess: update.allowInternetAccess, networkConfig: Object.keys(networkConfig).length > 0 ? networkConfig : undefined };
      if (record.network) await this.ctx.ports.network.applyPolicy(runtimeIdOf(record), networkPolicyOf(next));
      await this.ctx.table.update(record, next);
      this.idle.touch(sandboxId);
    });
  }

  /** E2B connect: resumes a paused sandbox (resumed: true) or returns a running one; only ever extends the TTL. */
  async connect(sandboxId: string, timeoutSec: number, memory?: boolean): Promise<{ record: SandboxRecord; resumed: boolean }> {
    return this.resume(sandboxId, { timeoutSec, memory });
  }

  // ---- pause and resume ---------------------------------------------------------------------

  /** See PauseTiers.pause: hot (frozen in RAM) with memory, durable (on disk) without; 409 when paused. */
  async pause(sandboxId: string, options: { memory?: boolean } = {}): Promise<void> {
    await this.ctx.mutex.run(sandboxId, async () => this.pauses.pause(await this.get(sandboxId), options));
    this.ctx.scheduleReaper();
  }

  /** See PauseTiers.resume; a running sandbox asleep for idleness is woken (connect means it is about to be used). */
  async resume(sandboxId: string, options: ResumeOptions): Promise<{ record: SandboxRecord; resumed: boolean }> {
    const result = await this.ctx.mutex.run(sandboxId, async () => {
      const record = await this.get(sandboxId);
      if (record.state === "running") await this.idle.wakeLocked(record);
      return this.pauses.resume(record, options);
    });
    this.idle.touch(sandboxId);
    this.ctx.scheduleReaper();
    return result;
  }

  // ---- snapshots, fork, rollback ------------------------------------------------------------

  async createSnapshot(sandboxId: string, rawName: unknown): Promise<SnapshotRecord> {
    return this.snapshots.createSnapshot(sandboxId, rawName);
  }

  async listSnapshots(query: SnapshotQuery): Promise<SnapshotRecord[]> {
    return this.snapshots.listSnapshots(query);
  }

  async deleteSnapshot(idOrName: string): Promise<boolean> {
    return this.snapshots.deleteSnapshot(idOrName);
  }

  async fork(sandboxId: string, options: { timeoutSec: number; count: number }): Promise<ForkOutcome[]> {
    return this.snapshots.fork(sandboxId, options);
  }

  async rollback(sandboxId: string, snapshotRef: string): Promise<SandboxRecord> {
    return this.snapshots.rollback(sandboxId, snapshotRef);
  }

  // ---- recovery and shutdown ----------------------------------------------------------------

  async recover(): Promise<Recovered> {
    return recover(this.ctx, this.pool, this.pauses);
  }

  /**
   * Stops timers, lets pause images being written finish (they record into the store) and drains
   * the warm pool; sandboxes keep running (they are adopted on the next start).
   */
  async close(): Promise<void> {
    this.ctx.closed = true;
    this.reaper.stop();
    await this.metricsHistory.stop();
    await Promise.all([this.pool.drain(), this.warmSnapshots.close(), this.pauses.close(), this.idle.close()]);
  }

  /** Kills every live sandbox (used by tests and `cubicle down --kill`). */
  async killAll(reason = "server shutdown"): Promise<void> {
    await Promise.all(this.ctx.table.records().map((record) => this.kill(record.sandboxId, reason)));
  }
}
