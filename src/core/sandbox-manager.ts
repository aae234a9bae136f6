import { EventEmitter } from "node:events";
import { mkdir, readdir, rename, rm } from "node:fs/promises";
import path from "node:path";
import type { NetworkManager } from "../network/types.js";
import type { Runtime, SandboxSpec } from "../runtime/types.js";
import { runtimeIdOf, type PoolEntryRecord, type SandboxRecord, type SandboxQuery, type SnapshotQuery, type SnapshotRecord, type Store } from "../store/types.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import { AGENT_READY_TIMEOUT_MS, agentIsHealthy, dropIdleAgentSockets, initAgent, initAgentWhenUp, type AgentInit } from "./agent-client.js";
import { newImageId, newSandboxId, newSnapshotId, newToken } from "./ids.js";
import { KeyedMutex } from "./keyed-mutex.js";
import { normaliseSnapshotRef, parseSnapshotName } from "./snapshot-names.js";
import type { CreateSandboxRequest, TemplateCatalog, TemplateInfo } from "./types.js";
import { StartQueue, type StartQueueOptions } from "./start-queue.js";
import { WarmPool } from "./warm-pool.js";
import { WarmSnapshots, type WarmSnapshotCounts } from "./warm-snapshots.js";

const log = createLogger("core");

/** The alias a create named, or the template's first one. */
function aliasOf(template: TemplateInfo, requested: string): string | undefined {
  return template.aliases.includes(requested) ? requested : template.aliases[0];
}

function round(ms: number): number {
  return Math.round(ms * 10) / 10;
}

async function exists(file: string): Promise<boolean> {
  return readdir(file).then(
    () => true,
    () => false,
  );
}

/**
 * A dump that failed for lack of space (the runtime gives a full image budget or pool its own
 * code: the snapshot's or CRIU's EDQUOT/ENOSPC) becomes a 507 that says what it means for this
 * sandbox and what to do; any other error is returned as it is.
 */
function storageFullOr(error: CubicleError, sandboxId: string, outcome: string): CubicleError {
  if (error.code !== "insufficient_storage") return error;
  return new CubicleError(
    "insufficient_storage",
    `not enough space on the server to save the memory and files of sandbox "${sandboxId}": its storage for snapshots and paused sandboxes is full (No space left on device)${outcome}. Delete snapshots you no longer need, or free space on the host (or raise CUBICLE_IMAGE_BUDGET_GB), then retry`,
    { cause: error, details: error.details },
  );
}

/** The most a sandbox may live from one timeout call: 24 h, as upstream's highest tier. */
export const MAX_TIMEOUT_SEC = 24 * 60 * 60;
/** Restores of one fork request run this many at a time. */
const FORK_PARALLELISM = 4;
/** Timeout of a fork when the request names none (the API spec's default). */
export const DEFAULT_FORK_TIMEOUT_SEC = 15;

export interface SandboxManagerOptions {
  store: Store;
  runtime: Runtime;
  network: NetworkManager;
  templates: TemplateCatalog;
  /** Images directory (the runtime's): snapshots under `snapshots/`, durable pauses under `paused/`. */
  imagesDir: string;
  /** Processes per sandbox. */
  pidsLimit?: number;
  /** Warm pool size per template id or alias; empty = no pools. */
  poolSizes?: Record<string, number>;
  /** Start slots and admission limits (ADMISSION_NOTE; the defaults are the configuration's). */
  admission: StartQueueOptions;
  /** Seconds in the hot pause tier (frozen in RAM) before a checkpoint to disk. */
  durablePauseAfterSec?: number;
  /**
   * Milliseconds after a hot pause at which its image is written to disk while it stays frozen
   * (so a host reboot does not lose it); default 1000, negative = never.
   */
  pauseImageAfterMs?: number;
  /** Template ids or aliases whose creates restore a warm snapshot when no pool entry is ready. */
  warmSnapshotTemplates?: string[];
  /** Decides when a template's warm snapshot is stale (its recipe hash); default its rootfs path. */
  templateFingerprint?: (template: TemplateInfo) => Promise<string>;
}

/** Where the router sends traffic for a live sandbox. */
export interface RouteTarget {
  sandboxId: string;
  address: string;
}

export interface SandboxManagerEvents {
  /** A sandbox stopped serving (killed, expired, paused, rolled back): open connections must be reset. */
  ended: [sandboxId: string];
}

export interface ResumeOptions {
  timeoutSec: number;
  /** False = discard memory: boot from the filesystem only. */
  memory?: boolean;
  /** `POST /resume` refuses a running sandbox (409); connect returns it (200). */
  requirePaused?: boolean;
}

/** One entry of a fork answer: a sandbox or why that fork failed. */
export type ForkOutcome = { record: SandboxRecord } | { error: CubicleError };

/**
 * The sandbox state machine: create (warm pool, cold, from a snapshot), kill, timeouts, pause and
 * resume (hot: frozen in RAM; durable: a checkpoint on disk), snapshots, fork, rollback, and
 * recovery after a restart. Keeps live sandboxes in memory for the router and mirrors every
 * change into the store. Runtime and network calls use the record's runtime id (`runtimeIdOf`):
 * it equals the sandbox id (a claimed pool entry's id becomes the sandbox's), but records of
 * earlier versions kept the pool entry's own id.
 */
export class SandboxManager extends EventEmitter<SandboxManagerEvents> {
  private readonly live = new Map<string, SandboxRecord>();
  private readonly mutex = new KeyedMutex();
  /** Claimed pool entries whose agent is being given its identity (createFromPoolEntry). */
  private readonly initialising = new Map<string, Promise<void>>();
  /** Sandboxes with a snapshot or fork dump in progress: a second one is refused, not queued. */
  private readonly dumping = new Set<string>();
  /** Hot-paused sandboxes whose move to disk failed: not retried until resumed and paused again. */
  private readonly durableFailed = new Set<string>();
  /** Hot pauses waiting for their image write (see writePauseImage), by sandbox id. */
  private readonly pauseImageTimers = new Map<string, NodeJS.Timeout>();
  /** Image writes under way: close() waits for them (they record into the store). */
  private readonly pauseImageWrites = new Set<Promise<void>>();
  private readonly pool: WarmPool;
  private readonly warmSnapshots: WarmSnapshots;
  /** Every start (create, restore, pool refill) takes a slot here (ADMISSION_NOTE). */
  private readonly starts: StartQueue;
  private reaperTimer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(private readonly options: SandboxManagerOptions) {
    super();
    this.starts = new StartQueue(options.admission);
    this.pool = new WarmPool({
      starts: this.starts,
      store: options.store,
      runtime: options.runtime,
      network: options.network,
      templates: options.templates,
      sizes: options.poolSizes ?? {},
      pidsLimit: options.pidsLimit ?? 4096,
    });
    this.warmSnapshots = new WarmSnapshots({
      starts: this.starts,
      store: options.store,
      runtime: options.runtime,
      network: options.network,
      imagesDir: options.imagesDir,
      templates: options.warmSnapshotTemplates ?? [],
      pidsLimit: options.pidsLimit ?? 4096,
      templateFingerprint: options.templateFingerprint,
    });
    options.runtime.onExit((runtimeId) => void this.handleRuntimeExit(runtimeId));
  }

  /**
   * A sandbox's processes ended on their own (its agent was OOM-killed, its init exited): it is
   * dead. Marked so at once (gone from list and getInfo), its resources released and its open
   * streams reset, unless a lifecycle step of ours already moved it on (kill, durable pause,
   * rollback), which the check under the sandbox's lock sees.
   */
  private async handleRuntimeExit(runtimeId: string): Promise<void> {
    const record = [...this.live.values()].find((candidate) => runtimeIdOf(candidate) === runtimeId);
    if (!record) {
      await this.pool.discardEnded(runtimeId).catch((err) => log.error("discarding an ended pool entry failed", { runtimeId, error: String(err) }));
      return;
    }
    await this.mutex
      .run(record.sandboxId, async () => {
        if (this.live.get(record.sandboxId) !== record || runtimeIdOf(record) !== runtimeId) return;
        const hot = record.state === "running" || (record.state === "paused" && record.pause?.tier === "hot");
        if (!hot) return;
        const state = await this.options.runtime.state(runtimeId).catch(() => "missing" as const);
        if (state === "running" || state === "frozen") return;
        log.warn("a sandbox's processes ended; marking it dead", { sandboxId: record.sandboxId, runtimeState: state });
        await this.markDead(record, "the sandbox's processes ended (its agent was killed, e.g. out of memory)");
      })
      .catch((err) => log.error("handling a sandbox's end failed", { sandboxId: record.sandboxId, error: String(err) }));
    this.scheduleReaper();
  }

  private get snapshotsDir(): string {
    return path.join(this.options.imagesDir, "snapshots");
  }

  private get pausedDir(): string {
    return path.join(this.options.imagesDir, "paused");
  }

  private get durableAfterMs(): number {
    return (this.options.durablePauseAfterSec ?? 60) * 1000;
  }

  /**
   * Starts filling the warm pools and building the warm snapshots of `prepared` templates
   * (others get theirs on their first create); call once the templates are built.
   */
  async startPools(prepared: string[] = []): Promise<void> {
    await this.pool.start();
    await this.warmSnapshots.start(prepared, (idOrAlias) => this.options.templates.resolve(idOrAlias));
  }

  warmSnapshotCounts(): Record<string, WarmSnapshotCounts> {
    return this.warmSnapshots.counts();
  }

  poolCounts(): Record<string, { ready: number; creating: number; target: number }> {
    return this.pool.counts();
  }

  /** The router's lookup: only running sandboxes with a network get traffic. */
  routeTarget(sandboxId: string): RouteTarget | undefined {
    if (this.initialising.has(sandboxId)) return undefined;
    const record = this.live.get(sandboxId);
    if (!record || record.state !== "running" || !record.network) return undefined;
    return { sandboxId, address: record.network.sandboxAddress };
  }

  /**
   * The router's second chance: a paused sandbox with auto-resume (and its memory kept) is
   * resumed for the request that arrived, unless `wake` is false (a health probe); undefined
   * means answer "not found".
   */
  async resumeForTraffic(sandboxId: string, options: { wake?: boolean } = {}): Promise<RouteTarget | undefined> {
    const initialising = this.initialising.get(sandboxId);
    if (initialising) {
      await initialising;
      return this.routeTarget(sandboxId);
    }
    const record = this.live.get(sandboxId);
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

  /** Live and paused sandboxes, for routing signed `/files` URLs that carry no sandbox id. */
  liveSandboxes(): SandboxRecord[] {
    return [...this.live.values()];
  }

  // ---- create -------------------------------------------------------------------------------

  async create(request: CreateSandboxRequest): Promise<SandboxRecord> {
    if (this.closed) throw new CubicleError("unavailable", "the server is shutting down; try again shortly");
    const claimed = this.pool.claim({ templateIdOrAlias: request.templateId, cpuCount: request.cpuCount, memoryMB: request.memoryMB, diskSizeMB: request.diskSizeMB });
    if (claimed) {
      const record = await this.createFromPoolEntry(request, claimed.template, claimed.entry);
      if (record) return record;
    }
    const template = claimed?.template ?? (await this.options.templates.resolve(request.templateId));
    if (!template) {
      const snapshot = await this.options.store.findSnapshot(normaliseSnapshotRef(request.templateId));
      if (snapshot && !snapshot.hidden) return this.starts.run("create", () => this.createFromSnapshot(request, snapshot));
      throw new CubicleError("not_found", `template or snapshot "${request.templateId}" not found; list templates with \`./cubicle template ls\` and snapshots with GET /snapshots`);
    }
    // Refused at once (429/503) when it cannot be served; else it waits for a start slot (ADMISSION_NOTE).
    return this.starts.run("create", () => this.createFromTemplate(request, template));
  }

  /** A create without a pool entry: a restore of the template's warm snapshot, or a boot. */
  private async createFromTemplate(request: CreateSandboxRequest, template: TemplateInfo): Promise<SandboxRecord> {
    if (this.closed) throw new CubicleError("unavailable", "the server is shutting down; try again shortly");
    const record = this.newRecord(request, template, aliasOf(template, request.templateId));
    const warmImage = this.warmSnapshotFits(request, template) ? await this.warmSnapshots.imageFor(template) : undefined;
    await this.options.store.insertSandbox(record);
    this.live.set(record.sandboxId, record);
    if (warmImage) {
      const started = performance.now();
      // The image's agent was never given a token: its first /init needs none.
      await this.startOrFail(record, () => this.restoreInto(record, template, warmImage, undefined));
      this.warmSnapshots.countRestore(template.templateId);
      log.debug("created from the template's warm snapshot", { sandboxId: record.sandboxId, templateId: template.templateId, ms: round(performance.now() - started) });
      return this.markRunning(record, { pooled: false, warmSnapshot: true });
    }
    await this.startOrFail(record, async () => {
      const network = await this.beginNetwork(record);
      await this.options.runtime.create({ ...this.specOf(record, template), networkReady: network.ready });
      // Its first /init is retried until the agent listens: no separate health probe.
      await this.initRecordAgent(record, template, undefined, AGENT_READY_TIMEOUT_MS);
    });
    return this.markRunning(record, { pooled: false });
  }

  /**
   * The warm path: the sandbox takes the frozen entry's id (its container already has that
   * hostname), is recorded in the same transaction that removes the pool row, is thawed and
   * given its identity. Undefined when the entry turns out broken (it cannot be thawed): it is
   * torn down and the caller creates cold.
   *
   * Most creates (secure, no env vars) need no /init: the entry's agent got the template's
   * defaults and a token of its own before the freeze. Otherwise the agent's /init (identity,
   * env vars, token) is not awaited here: it runs while the 201
   * goes out (~2.5 ms of a ~5 ms claim), under the sandbox's mutex, and the router holds the
   * sandbox's traffic until it is done (routeTarget / resumeForTraffic), so no request reaches
   * the agent before it knows its token. An init that fails then kills the sandbox (the warm-up
   * before the freeze proved the agent answers, so this is a sandbox dying, not a bad entry).
   */
  private async createFromPoolEntry(request: CreateSandboxRequest, template: TemplateInfo, entry: PoolEntryRecord): Promise<SandboxRecord | undefined> {
    const started = performance.now();
    const record = this.newRecord(request, template, aliasOf(template, request.templateId), entry.runtimeId);
    record.network = entry.network;
    // The entry's agent already holds the template's defaults and a token made for it alone
    // (PoolEntryRecord.agentToken): a secure create without env vars needs no /init at all.
    const initialised = entry.agentToken !== undefined && record.envdAccessToken !== undefined && Object.keys(record.envVars).length === 0;
    if (initialised) record.envdAccessToken = entry.agentToken;
    await this.options.store.claimPoolEntry(record);
    this.live.set(record.sandboxId, record);
    try {
      const recorded = performance.now();
      // Independent: the cgroup freezer and the nftables rules. Both settle before any teardown.
      const steps = await Promise.allSettled([
        this.options.runtime.thaw(record.sandboxId),
        request.allowInternetAccess ? undefined : this.options.network.applyPolicy(record.sandboxId, { allowInternetAccess: false }),
      ]);
      const failed = steps.find((step) => step.status === "rejected");
      if (failed) throw failed.reason;
      const thawed = performance.now();
      if (!initialised) this.initialiseInBackground(record, template, thawed, entry.agentToken);
      await this.markRunning(record, { pooled: true });
      log.debug("claimed a pool entry", {
        sandboxId: record.sandboxId,
        recordMs: round(recorded - started),
        thawMs: round(thawed - recorded),
        totalMs: round(performance.now() - started),
      });
      return record;
    } catch (err) {
      // A broken pool entry must not fail the create: drop it, the caller boots a fresh one.
      log.warn("warm pool claim failed; creating cold", { sandboxId: record.sandboxId, error: String(err) });
      await this.teardown(record, "pool claim failed");
      this.live.delete(record.sandboxId);
      await this.options.store.updateSandbox(record.sandboxId, { state: "dead", endReason: `pool claim failed: ${(err as Error).message}`, network: undefined });
      return undefined;
    }
  }

  /** See createFromPoolEntry: /init after the claim's response, the router waiting for it. */
  private initialiseInBackground(record: SandboxRecord, template: TemplateInfo, thawedAt: number, currentToken: string | undefined): void {
    const sandboxId = record.sandboxId;
    const done = this.mutex.run(sandboxId, async () => {
      try {
        await this.initRecordAgent(record, template, currentToken);
        log.debug("initialised a claimed pool entry", { sandboxId, initMs: round(performance.now() - thawedAt) });
      } catch (err) {
        // Killed meanwhile (the record left `live`): nothing to do.
        if (this.live.get(sandboxId) !== record) return;
        log.warn("agent init after a pool claim failed; killing the sandbox", { sandboxId, error: String(err) });
        await this.markDead(record, `agent init failed: ${(err as Error).message}`).catch((markErr) => log.error("marking a sandbox dead failed", { sandboxId, error: String(markErr) }));
      } finally {
        this.initialising.delete(sandboxId);
      }
    });
    this.initialising.set(sandboxId, done);
  }

  /**
   * A warm snapshot serves a create that asks for the template's own resources and no env vars:
   * processes restored from it (the interpreter's kernel) keep the environment they started
   * with, while a cold sandbox's kernel starts after the /init that hands over the env vars.
   */
  private warmSnapshotFits(request: CreateSandboxRequest, template: TemplateInfo): boolean {
    if (Object.keys(request.envVars).length > 0) return false;
    if (request.cpuCount !== undefined && request.cpuCount !== template.cpuCount) return false;
    if (request.memoryMB !== undefined && request.memoryMB !== template.memoryMB) return false;
    if (request.diskSizeMB !== undefined && request.diskSizeMB !== template.diskSizeMB) return false;
    return this.warmSnapshots.isEnabled(template);
  }

  private newRecord(request: CreateSandboxRequest, template: TemplateInfo, alias: string | undefined, sandboxId = newSandboxId()): SandboxRecord {
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
      trafficAccessToken: undefined,
      allowInternetAccess: request.allowInternetAccess,
      networkConfig: request.networkConfig,
      lifecycle: { autoResume: request.autoResume, onTimeout: request.autoPause ? "pause" : "kill" },
      network: undefined,
      runtime: this.options.runtime.name,
      endReason: undefined,
      timeoutSec: request.timeoutSec,
    };
  }

  /** Runs the start steps of a recorded `starting` sandbox; on failure tears down and marks it dead. */
  private async startOrFail(record: SandboxRecord, start: () => Promise<void>): Promise<void> {
    try {
      await start();
    } catch (err) {
      log.warn("create failed", { sandboxId: record.sandboxId, error: String(err) });
      await this.teardown(record, "create failed");
      this.live.delete(record.sandboxId);
      record.state = "dead";
      record.endReason = `create failed: ${(err as Error).message}`;
      await this.options.store.updateSandbox(record.sandboxId, { state: "dead", endReason: record.endReason, network: undefined });
      throw CubicleError.from(err);
    }
  }

  private async markRunning(record: SandboxRecord, detail: Record<string, unknown>): Promise<SandboxRecord> {
    record.state = "running";
    await this.options.store.updateSandbox(record.sandboxId, { state: "running", network: record.network, runtimeId: record.runtimeId });
    await this.options.store.recordEvent({ sandboxId: record.sandboxId, at: Date.now(), kind: "created", detail: { templateId: record.templateId, ...detail } });
    this.scheduleReaper();
    return record;
  }

  /**
   * Gives the record its network's names and addresses (recorded at once, so a crash finds what
   * to release) and returns the promise of the namespace itself: the runtime prepares the
   * container meanwhile and waits for it before the container joins (~10 ms saved per start).
   */
  private async beginNetwork(record: SandboxRecord): Promise<{ ready: Promise<unknown> }> {
    const { network, ready } = this.options.network.begin(runtimeIdOf(record), { allowInternetAccess: record.allowInternetAccess });
    // Observed here so that a failure while the runtime is still busy is no unhandled rejection;
    // the runtime awaits `ready` itself and so fails with it.
    ready.catch(() => undefined);
    record.network = network;
    await this.options.store.updateSandbox(record.sandboxId, { network });
    // In an object: an async function returning the promise itself would wait for it.
    return { ready };
  }

  private specOf(record: SandboxRecord, template: TemplateInfo): SandboxSpec {
    if (!record.network) throw new CubicleError("internal", `sandbox ${record.sandboxId} has no network`);
    return {
      sandboxId: runtimeIdOf(record),
      hostname: record.sandboxId,
      template: template.image,
      resources: { cpuCount: record.cpuCount, memoryMiB: record.memoryMB, diskMiB: record.diskSizeMB, pidsLimit: this.options.pidsLimit ?? 4096 },
      network: record.network,
    };
  }

  /**
   * `/init` with the sandbox's identity; `currentToken` is the token the agent holds now, if any;
   * with `whenUpMs`, retried that long while the agent cannot be reached.
   */
  private async initRecordAgent(record: SandboxRecord, template: TemplateInfo, currentToken: string | undefined, whenUpMs?: number): Promise<void> {
    const address = record.network!.sandboxAddress;
    const init: AgentInit = {
      accessToken: record.envdAccessToken,
      envVars: record.envVars,
      defaultUser: template.image.defaultUser,
      defaultWorkdir: template.image.defaultWorkdir,
      hostname: record.sandboxId,
      timestamp: new Date().toISOString(),
    };
    await (whenUpMs === undefined ? initAgent(address, init, currentToken) : initAgentWhenUp(address, init, currentToken, whenUpMs));
  }

  private async templateOf(record: Pick<SandboxRecord, "templateId">): Promise<TemplateInfo> {
    const template = await this.options.templates.resolve(record.templateId);
    if (!template) throw new CubicleError("failed_precondition", `template "${record.templateId}" is gone; the sandbox cannot be restored without its root filesystem`);
    return template;
  }

  /**
   * Restores an image into a recorded sandbox: a network (new unless the record has one), the
   * runtime restore, the agent's readiness, and a re-init that hands it this sandbox's identity.
   */
  private async restoreInto(record: SandboxRecord, template: TemplateInfo, imageDir: string, agentToken: string | undefined): Promise<void> {
    const started = performance.now();
    const network = record.network ? undefined : await this.beginNetwork(record);
    // The restored agent listens already: no health probe before its /init, which runs while
    // the runtime renames the host.
    const whenRunning = () => this.initRecordAgent(record, template, agentToken, AGENT_READY_TIMEOUT_MS);
    await this.options.runtime.restore({ ...this.specOf(record, template), networkReady: network?.ready, whenRunning }, imageDir);
    log.debug("restored into a sandbox", { sandboxId: record.sandboxId, ms: round(performance.now() - started) });
  }

  private async createFromSnapshot(request: CreateSandboxRequest, snapshot: SnapshotRecord): Promise<SandboxRecord> {
    const template = await this.templateOf(snapshot);
    const record = this.newRecord(request, template, undefined);
    record.fromSnapshotId = snapshot.snapshotId;
    // The image's cgroup limits and memory layout are the source's: keep its resources.
    record.cpuCount = snapshot.cpuCount;
    record.memoryMB = snapshot.memoryMB;
    record.diskSizeMB = snapshot.diskSizeMB;
    await this.options.store.insertSandbox(record);
    this.live.set(record.sandboxId, record);
    await this.startOrFail(record, () => this.restoreInto(record, template, snapshot.imageDir, snapshot.memory ? snapshot.agentAccessToken : undefined));
    return this.markRunning(record, { snapshotId: snapshot.snapshotId });
  }

  /** Removes the container and the network (and a pause's image, either tier); never throws. */
  private async teardown(record: SandboxRecord, reason: string): Promise<void> {
    this.emit("ended", record.sandboxId);
    this.cancelPauseImage(record.sandboxId);
    const runtimeId = runtimeIdOf(record);
    try {
      await this.options.runtime.destroy(runtimeId);
    } catch (err) {
      log.error("runtime destroy failed", { sandboxId: record.sandboxId, runtimeId, reason, error: String(err) });
    }
    try {
      await this.options.network.release(runtimeId);
    } catch (err) {
      log.error("network release failed", { sandboxId: record.sandboxId, runtimeId, reason, error: String(err) });
    }
    if (record.pause?.imageDir) await rm(record.pause.imageDir, { recursive: true, force: true }).catch(() => undefined);
    this.durableFailed.delete(record.sandboxId);
  }

  // ---- queries, kill, timeout ---------------------------------------------------------------

  /** A sandbox the API can talk about: live, or paused. Throws not_found otherwise. */
  async get(sandboxId: string): Promise<SandboxRecord> {
    const record = this.live.get(sandboxId);
    if (record && (record.state === "running" || record.state === "paused")) return record;
    throw new CubicleError("not_found", `sandbox "${sandboxId}" not found`);
  }

  async list(query: SandboxQuery): Promise<SandboxRecord[]> {
    const states = query.states?.length ? query.states : ["running", "paused"];
    // A template filter names an id or an alias; the store keeps ids.
    const templateIds = query.templateIds
      ? await Promise.all(query.templateIds.map(async (idOrAlias) => (await this.options.templates.resolve(idOrAlias))?.templateId ?? idOrAlias))
      : undefined;
    return this.options.store.querySandboxes({ ...query, templateIds, states: states.filter((s) => s === "running" || s === "paused") });
  }

  /** Kills a sandbox. Resolves false when there is no such live sandbox (E2B's kill → false). */
  async kill(sandboxId: string, reason = "killed"): Promise<boolean> {
    return this.mutex.run(sandboxId, async () => {
      const record = this.live.get(sandboxId);
      if (!record || record.state === "killed" || record.state === "dead" || record.state === "starting") return false;
      record.state = "killed";
      this.live.delete(sandboxId);
      await this.options.store.updateSandbox(sandboxId, { state: "killed", endReason: reason, network: undefined });
      await this.teardown(record, reason);
      await this.options.store.recordEvent({ sandboxId, at: Date.now(), kind: "killed", detail: { reason } });
      this.scheduleReaper();
      return true;
    });
  }

  /** E2B setTimeout: `endAt = now + timeout`; shortening is allowed. */
  async setTimeout(sandboxId: string, timeoutSec: number): Promise<void> {
    await this.mutex.run(sandboxId, async () => {
      const record = await this.get(sandboxId);
      record.endAt = Date.now() + timeoutSec * 1000;
      await this.options.store.updateSandbox(sandboxId, { endAt: record.endAt });
    });
    this.scheduleReaper();
  }

  /** E2B connect: resumes a paused sandbox (resumed: true) or returns a running one; only ever extends the TTL. */
  async connect(sandboxId: string, timeoutSec: number, memory?: boolean): Promise<{ record: SandboxRecord; resumed: boolean }> {
    return this.resume(sandboxId, { timeoutSec, memory });
  }

  // ---- pause and resume ---------------------------------------------------------------------

  /**
   * Pauses a running sandbox. With memory (default) it is frozen in RAM (hot tier), its image is
   * written to disk in the background after `pauseImageAfterMs` (it stays frozen: a host reboot
   * then finds it on disk), and it leaves RAM after `durablePauseAfterSec`; without memory only
   * its filesystem is kept, on disk, now. 409 when already paused.
   */
  async pause(sandboxId: string, options: { memory?: boolean } = {}): Promise<void> {
    await this.mutex.run(sandboxId, async () => {
      const record = await this.get(sandboxId);
      if (record.state === "paused") throw new CubicleError("conflict", `sandbox "${sandboxId}" is already paused`);
      const memory = options.memory !== false;
      // Open streams would hang on a frozen agent: reset them like upstream does on pause.
      this.emit("ended", sandboxId);
      if (memory) {
        await this.options.runtime.freeze(runtimeIdOf(record));
        record.state = "paused";
        record.pause = { tier: "hot", pausedAt: Date.now(), memory: true };
      } else {
        await this.checkpointToDisk(record, false, false);
      }
      await this.options.store.updateSandbox(sandboxId, { state: "paused", pause: record.pause, network: record.network });
      await this.options.store.recordEvent({ sandboxId, at: Date.now(), kind: "paused", detail: { tier: record.pause!.tier, memory } });
      if (memory) this.schedulePauseImage(record);
    });
    this.scheduleReaper();
  }

  /** Arms the background image write of a hot pause (cancelled by resume and teardown). */
  private schedulePauseImage(record: SandboxRecord): void {
    const afterMs = this.options.pauseImageAfterMs ?? 1000;
    if (afterMs < 0 || this.closed) return;
    const { sandboxId } = record;
    const pausedAt = record.pause!.pausedAt;
    this.cancelPauseImage(sandboxId);
    const timer = setTimeout(() => {
      this.pauseImageTimers.delete(sandboxId);
      const write = this.writePauseImage(sandboxId, pausedAt).finally(() => this.pauseImageWrites.delete(write));
      this.pauseImageWrites.add(write);
    }, Math.max(0, pausedAt + afterMs - Date.now()));
    timer.unref();
    this.pauseImageTimers.set(sandboxId, timer);
  }

  private cancelPauseImage(sandboxId: string): void {
    clearTimeout(this.pauseImageTimers.get(sandboxId));
    this.pauseImageTimers.delete(sandboxId);
  }

  /**
   * Writes a hot pause's memory and files to `paused/<id>` while the container stays frozen in
   * RAM (a dump of a frozen container leaves it frozen), and records the image in the store: a
   * host reboot, which takes the frozen processes, then leaves a durable pause for recover(), and
   * makeDurable() later needs no second dump (nothing ran since). Under the sandbox's lock, so a
   * resume that arrives meanwhile waits for it. Never throws: without an image the sandbox is
   * still paused, only not reboot-proof until makeDurable() dumps it.
   */
  private async writePauseImage(sandboxId: string, pausedAt: number): Promise<void> {
    await this.mutex.run(sandboxId, async () => {
      const record = this.live.get(sandboxId);
      // Resumed (and maybe paused again) since the timer was armed, killed, shutting down, or
      // makeDurable() got here first (a failed move to disk is not retried: see durableFailed).
      if (this.closed || !record || record.state !== "paused" || record.pause?.tier !== "hot" || record.pause.pausedAt !== pausedAt || record.pause.imageDir || this.durableFailed.has(sandboxId)) return;
      const runtimeId = runtimeIdOf(record);
      const imageDir = path.join(this.pausedDir, sandboxId);
      const started = performance.now();
      try {
        await rm(imageDir, { recursive: true, force: true });
        await this.mkdirs(this.pausedDir);
        if (record.network) dropIdleAgentSockets(record.network.sandboxAddress);
        await this.options.runtime.checkpoint(runtimeId, imageDir, { memory: true, leaveRunning: true });
      } catch (err) {
        const state = await this.options.runtime.state(runtimeId).catch(() => "missing" as const);
        // A pause must stay a pause, whatever a failed dump did to the freezer.
        if (state === "running") await this.options.runtime.freeze(runtimeId).catch(() => undefined);
        if (state === "missing" || state === "stopped") await this.markDead(record, `the paused sandbox was lost while its image was written: ${(err as Error).message}`);
        else log.warn("writing a paused sandbox's image failed; it stays frozen in RAM only (a host reboot would lose it)", { sandboxId, error: String(err) });
        return;
      }
      record.pause = { ...record.pause, imageDir };
      await this.options.store.updateSandbox(sandboxId, { pause: record.pause });
      await this.options.store.recordEvent({ sandboxId, at: Date.now(), kind: "pause-image-written", detail: { ms: round(performance.now() - started) } });
    }).catch((err) => log.error("writing or recording a paused sandbox's image failed", { sandboxId, error: String(err) }));
  }

  /**
   * Takes a resumed hot pause's image out of the way at once (a rename: the next pause writes a
   * fresh one at the same path, and recover() must never mistake it for the current state) and
   * deletes it in the background: a resume does not wait for a large rm.
   */
  private async discardPauseImage(imageDir: string): Promise<void> {
    const stale = `${imageDir}.stale-${newImageId()}`;
    try {
      await rename(imageDir, stale);
    } catch (err) {
      log.warn("could not move a stale pause image aside; deleting it in place", { imageDir, error: String(err) });
      await rm(imageDir, { recursive: true, force: true }).catch((rmErr) => log.error("deleting a stale pause image failed", { imageDir, error: String(rmErr) }));
      return;
    }
    void rm(stale, { recursive: true, force: true }).catch((err) => log.error("deleting a stale pause image failed", { imageDir: stale, error: String(err) }));
  }

  /**
   * Writes a running or hot-paused sandbox to disk (durable tier): checkpoint, container gone,
   * network released. On failure the sandbox is left as it truthfully is (still frozen or running,
   * or marked dead when the runtime lost it) and the error is thrown.
   */
  private async checkpointToDisk(record: SandboxRecord, memory: boolean, wasFrozen: boolean): Promise<void> {
    const runtimeId = runtimeIdOf(record);
    const imageDir = path.join(this.pausedDir, record.sandboxId);
    await rm(imageDir, { recursive: true, force: true });
    await this.mkdirs(this.pausedDir);
    try {
      // The runtime dumps a frozen container as it is (no thaw: nothing runs between pause and dump).
      if (record.network) dropIdleAgentSockets(record.network.sandboxAddress);
      await this.options.runtime.checkpoint(runtimeId, imageDir, { memory, leaveRunning: false });
    } catch (err) {
      await rm(imageDir, { recursive: true, force: true }).catch(() => undefined);
      const state = await this.options.runtime.state(runtimeId).catch(() => "missing" as const);
      if (state === "running" && wasFrozen) await this.options.runtime.freeze(runtimeId).catch(() => undefined);
      const lost = state === "missing" || state === "stopped";
      if (lost) await this.markDead(record, `pause to disk failed: ${(err as Error).message}`);
      throw storageFullOr(CubicleError.from(err), record.sandboxId, lost ? "" : wasFrozen ? "; the sandbox stays paused in memory" : "; the sandbox keeps running");
    }
    // Record the image first: a crash from here on finds a durable pause, not a vanished sandbox.
    record.state = "paused";
    record.pause = { tier: "durable", pausedAt: record.pause?.pausedAt ?? Date.now(), memory, imageDir };
    await this.options.store.updateSandbox(record.sandboxId, { state: "paused", pause: record.pause });
    await this.releaseHostResources(record);
  }

  /** A durable pause needs neither the bundle (the image holds a copy of the upper layer) nor the network. */
  private async releaseHostResources(record: SandboxRecord): Promise<void> {
    const runtimeId = runtimeIdOf(record);
    await this.options.runtime.destroy(runtimeId).catch((err) => log.error("destroy after checkpoint failed", { sandboxId: record.sandboxId, error: String(err) }));
    await this.options.network.release(runtimeId).catch((err) => log.error("network release after checkpoint failed", { sandboxId: record.sandboxId, error: String(err) }));
    record.network = undefined;
    await this.options.store.updateSandbox(record.sandboxId, { network: undefined });
  }

  private async markDead(record: SandboxRecord, reason: string): Promise<void> {
    record.state = "dead";
    record.endReason = reason;
    this.live.delete(record.sandboxId);
    // Recorded before the teardown: list (the store) must not show it running meanwhile; a crash
    // in between leaves orphans that recover() removes.
    await this.options.store.updateSandbox(record.sandboxId, { state: "dead", endReason: reason, network: undefined, pause: undefined });
    await this.teardown(record, reason);
    await this.options.store.recordEvent({ sandboxId: record.sandboxId, at: Date.now(), kind: "dead", detail: { reason } });
  }

  /**
   * Moves a hot-paused sandbox to disk (called by the reaper after the hot tier's time). The image
   * writePauseImage() made is reused: the sandbox stayed frozen since, so only the container and
   * the network go; without one (the write failed or is off) it is dumped now.
   */
  private async makeDurable(sandboxId: string): Promise<void> {
    await this.mutex.run(sandboxId, async () => {
      const record = this.live.get(sandboxId);
      if (!record || record.state !== "paused" || record.pause?.tier !== "hot") return;
      this.cancelPauseImage(sandboxId);
      const imageDir = record.pause.imageDir;
      if (imageDir) {
        // Recorded before the release, as in checkpointToDisk: a crash midway finds a durable pause.
        record.pause = { ...record.pause, tier: "durable" };
        await this.options.store.updateSandbox(sandboxId, { pause: record.pause });
        await this.releaseHostResources(record);
      } else {
        try {
          await this.checkpointToDisk(record, true, true);
        } catch (err) {
          this.durableFailed.add(sandboxId);
          log.warn("moving a paused sandbox to disk failed; it stays frozen in RAM", { sandboxId, error: String(err) });
          return;
        }
      }
      await this.options.store.updateSandbox(sandboxId, { pause: record.pause, network: undefined });
      await this.options.store.recordEvent({ sandboxId, at: Date.now(), kind: "paused-to-disk", detail: { reusedPauseImage: imageDir !== undefined } });
    });
  }

  /**
   * Resumes a paused sandbox (hot: thaw; durable: restore into a new network, re-init the agent)
   * and extends its TTL to at least `now + timeout`. Returns a running one unchanged but for the
   * TTL, unless `requirePaused` (409).
   */
  async resume(sandboxId: string, options: ResumeOptions): Promise<{ record: SandboxRecord; resumed: boolean }> {
    const result = await this.mutex.run(sandboxId, async () => {
      const record = await this.get(sandboxId);
      let resumed = false;
      if (record.state === "paused") {
        await this.resumePaused(record, options.memory !== false);
        resumed = true;
      } else if (options.requirePaused) {
        throw new CubicleError("conflict", `sandbox "${sandboxId}" is not paused`);
      }
      const wanted = Date.now() + options.timeoutSec * 1000;
      if (wanted > record.endAt || resumed) {
        record.endAt = Math.max(record.endAt, wanted);
        await this.options.store.updateSandbox(sandboxId, { endAt: record.endAt });
      }
      return { record, resumed };
    });
    this.scheduleReaper();
    return result;
  }

  private async resumePaused(record: SandboxRecord, memory: boolean): Promise<void> {
    const pause = record.pause!;
    const runtimeId = runtimeIdOf(record);
    this.cancelPauseImage(record.sandboxId);
    if (pause.tier === "hot" && !memory) {
      if (pause.imageDir) {
        // Replaced by a filesystem-only image at the same path: unrecorded first, so a failed
        // checkpoint below never leaves a record pointing at a deleted image.
        record.pause = { ...pause, imageDir: undefined };
        await this.options.store.updateSandbox(record.sandboxId, { pause: record.pause });
      }
      // Reboot from the filesystem: write it to disk without memory, then restore that.
      await this.checkpointToDisk(record, false, true);
      await this.options.store.updateSandbox(record.sandboxId, { pause: record.pause, network: undefined });
    }
    if (record.pause!.tier === "hot") {
      await this.options.runtime.thaw(runtimeId);
      // Only after the thaw: were the thaw to fail, the image would still be the sandbox's state.
      if (record.pause!.imageDir) await this.discardPauseImage(record.pause!.imageDir);
    } else {
      const imageDir = record.pause!.imageDir!;
      const template = await this.templateOf(record);
      try {
        // A memory image's agent holds the sandbox's token; a filesystem-only restore starts a fresh agent.
        await this.starts.run("create", () => this.restoreInto(record, template, imageDir, record.pause!.memory && memory ? record.envdAccessToken : undefined));
      } catch (err) {
        // The image is intact: stay paused (durable) so a later resume can try again.
        await this.options.runtime.destroy(runtimeId).catch(() => undefined);
        await this.options.network.release(runtimeId).catch(() => undefined);
        record.network = undefined;
        await this.options.store.updateSandbox(record.sandboxId, { network: undefined });
        throw CubicleError.from(err);
      }
      await rm(imageDir, { recursive: true, force: true }).catch(() => undefined);
    }
    record.state = "running";
    record.pause = undefined;
    this.durableFailed.delete(record.sandboxId);
    await this.options.store.updateSandbox(record.sandboxId, { state: "running", pause: undefined, network: record.network });
    await this.options.store.recordEvent({ sandboxId: record.sandboxId, at: Date.now(), kind: "resumed", detail: { tier: pause.tier } });
  }

  // ---- snapshots, fork, rollback ------------------------------------------------------------

  /**
   * Dumps a running sandbox's memory and files into a persistent snapshot; the sandbox is frozen
   * only for the dump. A second snapshot (or fork) of the same sandbox while one runs → 409.
   */
  async createSnapshot(sandboxId: string, rawName: unknown): Promise<SnapshotRecord> {
    const name = parseSnapshotName(rawName);
    if (name && (await this.options.templates.resolve(name))) {
      throw new CubicleError("conflict", `"${name}" is the name of a template; choose another snapshot name`);
    }
    return this.withDump(sandboxId, (record) => this.dump(record, newSnapshotId(), name ? [name] : [], false));
  }

  /** Runs a dump under the sandbox's lock, refusing a concurrent one (409, not queued). */
  private async withDump<T>(sandboxId: string, operation: (record: SandboxRecord) => Promise<T>): Promise<T> {
    await this.get(sandboxId);
    if (this.dumping.has(sandboxId)) throw new CubicleError("conflict", `a snapshot of sandbox "${sandboxId}" is already being taken; retry when it is done`);
    this.dumping.add(sandboxId);
    try {
      return await this.mutex.run(sandboxId, async () => {
        const record = await this.get(sandboxId);
        if (record.state !== "running") throw new CubicleError("conflict", `sandbox "${sandboxId}" is paused; resume it (connect) before taking a snapshot`);
        return operation(record);
      });
    } finally {
      this.dumping.delete(sandboxId);
    }
  }

  private async dump(record: SandboxRecord, snapshotId: string, names: string[], hidden: boolean): Promise<SnapshotRecord> {
    const runtimeId = runtimeIdOf(record);
    const imageDir = path.join(this.snapshotsDir, snapshotId);
    await this.mkdirs(this.snapshotsDir);
    if (record.network) dropIdleAgentSockets(record.network.sandboxAddress);
    let info;
    try {
      info = await this.options.runtime.checkpoint(runtimeId, imageDir, { memory: true, leaveRunning: true });
    } catch (err) {
      // A failed dump (disk full …) leaves no snapshot behind, whatever the runtime left.
      await rm(imageDir, { recursive: true, force: true }).catch(() => undefined);
      const state = await this.options.runtime.state(runtimeId).catch(() => "missing" as const);
      if (state === "frozen") await this.options.runtime.thaw(runtimeId).catch(() => undefined);
      const lost = state === "missing" || state === "stopped";
      if (lost) await this.markDead(record, `the sandbox was lost during a snapshot: ${(err as Error).message}`);
      throw storageFullOr(CubicleError.from(err), record.sandboxId, lost ? "" : "; the sandbox keeps running");
    }
    const snapshot: SnapshotRecord = {
      snapshotId,
      names,
      sourceSandboxId: record.sandboxId,
      sourceRuntimeId: runtimeId,
      templateId: record.templateId,
      createdAt: Date.now(),
      imageDir,
      sizeBytes: info.sizeBytes,
      memory: info.memory,
      agentAccessToken: record.envdAccessToken,
      cpuCount: record.cpuCount,
      memoryMB: record.memoryMB,
      diskSizeMB: record.diskSizeMB,
      hidden,
    };
    try {
      await this.options.store.insertSnapshot(snapshot);
    } catch (err) {
      await rm(imageDir, { recursive: true, force: true }).catch(() => undefined);
      throw err;
    }
    await this.options.store.recordEvent({ sandboxId: record.sandboxId, at: Date.now(), kind: "snapshot", detail: { snapshotId, frozenMs: info.frozenMs, sizeBytes: info.sizeBytes } });
    return snapshot;
  }

  async listSnapshots(query: SnapshotQuery): Promise<SnapshotRecord[]> {
    return this.options.store.querySnapshots({ ...query, name: query.name === undefined ? undefined : normaliseSnapshotRef(query.name) });
  }

  /** Deletes a snapshot and its image; false when there is none. Sandboxes made from it are not affected. */
  async deleteSnapshot(idOrName: string): Promise<boolean> {
    const snapshot = await this.options.store.findSnapshot(normaliseSnapshotRef(idOrName));
    if (!snapshot || snapshot.hidden) return false;
    return this.mutex.run(`snapshot:${snapshot.snapshotId}`, async () => {
      if (!(await this.options.store.deleteSnapshot(snapshot.snapshotId))) return false;
      await rm(snapshot.imageDir, { recursive: true, force: true });
      return true;
    });
  }

  /**
   * Forks a running sandbox: one checkpoint (the source keeps running, its id and endAt unchanged),
   * then `count` restores, `FORK_PARALLELISM` at a time. Each fork succeeds or fails on its own.
   */
  async fork(sandboxId: string, options: { timeoutSec: number; count: number }): Promise<ForkOutcome[]> {
    let source!: SandboxRecord;
    const image = await this.withDump(sandboxId, async (record) => {
      source = { ...record };
      return this.dump(record, newImageId(), [], true);
    });
    try {
      const template = await this.templateOf(image);
      const outcomes: ForkOutcome[] = new Array(options.count);
      let next = 0;
      const worker = async () => {
        while (next < options.count) {
          const index = next++;
          outcomes[index] = await this.starts.run("create", () => this.forkOne(source, image, template, options.timeoutSec)).then(
            (record) => ({ record }),
            (err) => ({ error: CubicleError.from(err) }),
          );
        }
      };
      await Promise.all(Array.from({ length: Math.min(FORK_PARALLELISM, options.count) }, worker));
      return outcomes;
    } finally {
      await this.options.store.deleteSnapshot(image.snapshotId).catch(() => undefined);
      await rm(image.imageDir, { recursive: true, force: true }).catch(() => undefined);
    }
  }

  private async forkOne(source: SandboxRecord, image: SnapshotRecord, template: TemplateInfo, timeoutSec: number): Promise<SandboxRecord> {
    if (this.closed) throw new CubicleError("unavailable", "the server is shutting down; try again shortly");
    const record = this.newRecord(
      {
        templateId: source.templateId,
        timeoutSec,
        secure: source.secure,
        allowInternetAccess: source.allowInternetAccess,
        metadata: source.metadata,
        envVars: source.envVars,
        autoPause: source.lifecycle.onTimeout === "pause",
        autoResume: source.lifecycle.autoResume,
        networkConfig: source.networkConfig,
      },
      template,
      source.alias,
    );
    record.cpuCount = image.cpuCount;
    record.memoryMB = image.memoryMB;
    record.diskSizeMB = image.diskSizeMB;
    record.metadata = { ...source.metadata };
    await this.options.store.insertSandbox(record);
    this.live.set(record.sandboxId, record);
    await this.startOrFail(record, () => this.restoreInto(record, template, image.imageDir, image.agentAccessToken));
    return this.markRunning(record, { forkedFrom: source.sandboxId });
  }

  /**
   * Rolls a running sandbox back to one of its own snapshots, in place: same id, same network
   * address, memory and files as at the snapshot. If the restore fails the sandbox is gone and
   * is marked dead (never reported running while it is not).
   */
  async rollback(sandboxId: string, snapshotRef: string): Promise<SandboxRecord> {
    const snapshot = await this.options.store.findSnapshot(normaliseSnapshotRef(snapshotRef));
    if (!snapshot || snapshot.hidden) throw new CubicleError("not_found", `snapshot "${snapshotRef}" not found`);
    return this.withDump(sandboxId, async (record) => {
      if (snapshot.sourceSandboxId !== record.sandboxId || snapshot.sourceRuntimeId !== runtimeIdOf(record)) {
        throw new CubicleError(
          "conflict",
          `snapshot "${snapshot.snapshotId}" was taken from sandbox "${snapshot.sourceSandboxId}", not "${sandboxId}"; a sandbox rolls back only to its own snapshots (create a new sandbox from it instead)`,
        );
      }
      const template = await this.templateOf(record);
      const runtimeId = runtimeIdOf(record);
      this.emit("ended", sandboxId);
      if (record.network) dropIdleAgentSockets(record.network.sandboxAddress);
      await this.options.runtime.destroy(runtimeId);
      try {
        await this.starts.run("create", () => this.restoreInto(record, template, snapshot.imageDir, snapshot.agentAccessToken));
      } catch (err) {
        await this.markDead(record, `rollback to ${snapshot.snapshotId} failed: ${(err as Error).message}`);
        throw new CubicleError("internal", `rollback of sandbox "${sandboxId}" failed and the sandbox is gone: ${(err as Error).message}`, { cause: err });
      }
      await this.options.store.recordEvent({ sandboxId, at: Date.now(), kind: "rolled-back", detail: { snapshotId: snapshot.snapshotId } });
      return record;
    });
  }

  // ---- reaper -------------------------------------------------------------------------------

  /** One timer for the earliest due time (an end of life, or a hot pause due for disk). */
  private scheduleReaper(): void {
    if (this.reaperTimer) clearTimeout(this.reaperTimer);
    this.reaperTimer = undefined;
    if (this.closed) return;
    let next = Infinity;
    for (const record of this.live.values()) {
      if (record.state === "running" && record.endAt < next) next = record.endAt;
      if (record.state === "paused" && record.pause?.tier === "hot" && !this.durableFailed.has(record.sandboxId)) {
        next = Math.min(next, record.pause.pausedAt + this.durableAfterMs);
      }
    }
    if (next === Infinity) return;
    // setTimeout overflows past 2^31-1 ms; wake up at least that often.
    const delay = Math.min(Math.max(0, next - Date.now()), 2 ** 31 - 1);
    this.reaperTimer = setTimeout(() => void this.reap(), delay);
    this.reaperTimer.unref();
  }

  private async reap(): Promise<void> {
    const now = Date.now();
    const records = [...this.live.values()];
    const due = records.filter((r) => r.state === "running" && r.endAt <= now);
    const toDisk = records.filter(
      (r) => r.state === "paused" && r.pause?.tier === "hot" && !this.durableFailed.has(r.sandboxId) && r.pause.pausedAt + this.durableAfterMs <= now,
    );
    await Promise.all([
      ...due.map(async (record) => {
        log.info("sandbox reached its end of life", { sandboxId: record.sandboxId, onTimeout: record.lifecycle.onTimeout });
        if (record.lifecycle.onTimeout === "pause") {
          await this.pause(record.sandboxId).catch(async (err) => {
            if (err instanceof CubicleError && err.code === "conflict") return;
            log.error("pause at timeout failed; killing", { sandboxId: record.sandboxId, error: String(err) });
            await this.kill(record.sandboxId, "timeout").catch(() => undefined);
          });
        } else {
          await this.kill(record.sandboxId, "timeout").catch((err) => log.error("reaper kill failed", { error: String(err) }));
        }
      }),
      ...toDisk.map((record) => this.makeDurable(record.sandboxId)),
    ]);
    this.scheduleReaper();
  }

  // ---- recovery and shutdown ----------------------------------------------------------------

  /**
   * After a restart: adopt sandboxes that still run, keep paused ones paused (hot: still frozen;
   * durable: their image), mark vanished ones dead, discard the previous process's pool entries
   * and half-written images, and remove whatever the runtime or network holds that nothing owns.
   */
  async recover(): Promise<{ adopted: string[]; dead: string[]; orphansRemoved: string[] }> {
    const adopted: string[] = [];
    const dead: string[] = [];
    const orphansRemoved: string[] = [];
    const { store, runtime, network } = this.options;
    orphansRemoved.push(...(await this.pool.discardRecorded()));
    const records = await store.querySandboxes({ states: ["starting", "running", "paused"], order: "asc" });
    for (const record of records) {
      const runtimeId = runtimeIdOf(record);
      let alive = false;
      if (record.state === "running" && record.network) {
        const state = await runtime.state(runtimeId);
        // Frozen while running: the server died during a snapshot dump.
        if (state === "frozen") await runtime.thaw(runtimeId);
        if (state === "running" || state === "frozen") {
          await network.adopt(runtimeId, record.network, { allowInternetAccess: record.allowInternetAccess });
          alive = await agentIsHealthy(record.network.sandboxAddress);
        }
      } else if (record.state === "paused" && record.pause?.tier === "hot" && record.network) {
        const state = await runtime.state(runtimeId);
        if (state === "running") {
          await runtime.freeze(runtimeId);
          // It ran after its image was written (the server died in a resume): the image is stale.
          if (record.pause.imageDir) {
            record.pause = { ...record.pause, imageDir: undefined };
            await store.updateSandbox(record.sandboxId, { pause: record.pause });
          }
        }
        if (state === "running" || state === "frozen") {
          await network.adopt(runtimeId, record.network, { allowInternetAccess: record.allowInternetAccess });
          alive = true;
        } else if (await exists(path.join(this.pausedDir, record.sandboxId))) {
          // The frozen processes are gone (a host reboot; or the server died between a dump to
          // disk and recording it) but the pause's image is complete (runtimes rename it into
          // place): it becomes a durable pause. A resume moves a stale image aside first.
          record.pause = { ...record.pause, tier: "durable", imageDir: path.join(this.pausedDir, record.sandboxId) };
          await store.updateSandbox(record.sandboxId, { pause: record.pause });
        }
      }
      if (record.state === "paused" && record.pause?.tier === "durable" && record.pause.imageDir) {
        alive = await exists(record.pause.imageDir);
        if (alive && record.network) await this.releaseHostResources(record);
      }
      if (alive) {
        this.live.set(record.sandboxId, record);
        if (record.network) await runtime.watch(runtimeId).catch((err) => log.warn("cannot watch an adopted sandbox", { sandboxId: record.sandboxId, error: String(err) }));
        adopted.push(record.sandboxId);
        await store.recordEvent({ sandboxId: record.sandboxId, at: Date.now(), kind: "adopted", detail: { state: record.state } });
      } else {
        const reason = record.state === "starting" ? "server stopped during create" : "vanished while the server was down";
        await this.teardown(record, reason);
        await store.updateSandbox(record.sandboxId, { state: "dead", endReason: reason, network: undefined, pause: undefined });
        await store.recordEvent({ sandboxId: record.sandboxId, at: Date.now(), kind: "dead", detail: { reason } });
        dead.push(record.sandboxId);
      }
    }
    const liveRuntimeIds = new Set([...this.live.values()].map(runtimeIdOf));
    for (const runtimeId of await runtime.list()) {
      if (liveRuntimeIds.has(runtimeId)) continue;
      await runtime.destroy(runtimeId).catch((err) => log.error("orphan destroy failed", { runtimeId, error: String(err) }));
      orphansRemoved.push(runtimeId);
    }
    for (const netnsName of await network.listNamespaces()) {
      const runtimeId = netnsName.replace(/^cubicle-/, "");
      // Namespaces of sandboxes this store never knew belong to another server on the host.
      if (liveRuntimeIds.has(runtimeId) || !(await store.knowsRuntimeId(runtimeId))) continue;
      await network.release(runtimeId).catch((err) => log.error("orphan network release failed", { runtimeId, error: String(err) }));
      if (!orphansRemoved.includes(runtimeId)) orphansRemoved.push(runtimeId);
    }
    await this.removeUnownedImages();
    // Hot pauses still frozen in RAM whose image the previous process did not write (after the
    // cleanup above, which would delete a write's half-made directory).
    for (const record of this.live.values()) {
      if (record.state === "paused" && record.pause?.tier === "hot" && !record.pause.imageDir) this.schedulePauseImage(record);
    }
    this.scheduleReaper();
    if (adopted.length || dead.length || orphansRemoved.length) log.info("recovered", { adopted, dead, orphansRemoved });
    return { adopted, dead, orphansRemoved };
  }

  /** Images without an owner: half-written dumps, a crashed fork's one-off image, stale pause images (moved aside by a resume). */
  private async removeUnownedImages(): Promise<void> {
    const { store } = this.options;
    for (const snapshot of await store.allSnapshots()) {
      if (snapshot.hidden) {
        await store.deleteSnapshot(snapshot.snapshotId);
        await rm(snapshot.imageDir, { recursive: true, force: true }).catch(() => undefined);
      }
    }
    const known = new Set((await store.allSnapshots()).map((s) => s.snapshotId));
    for (const entry of await readdir(this.snapshotsDir).catch(() => [] as string[])) {
      if (!known.has(entry)) await rm(path.join(this.snapshotsDir, entry), { recursive: true, force: true }).catch(() => undefined);
    }
    for (const entry of await readdir(this.pausedDir).catch(() => [] as string[])) {
      const imageDir = path.join(this.pausedDir, entry);
      if (this.live.get(entry)?.pause?.imageDir !== imageDir) await rm(imageDir, { recursive: true, force: true }).catch(() => undefined);
    }
  }

  private async mkdirs(dir: string): Promise<void> {
    // Search permission for others: the sandboxes' mapped root reads its image during a restore.
    await mkdir(dir, { recursive: true, mode: 0o711 });
  }

  /**
   * Stops timers, lets pause images being written finish (they record into the store) and drains
   * the warm pool; sandboxes keep running (they are adopted on the next start).
   */
  async close(): Promise<void> {
    this.closed = true;
    if (this.reaperTimer) clearTimeout(this.reaperTimer);
    for (const sandboxId of [...this.pauseImageTimers.keys()]) this.cancelPauseImage(sandboxId);
    await Promise.all([this.pool.drain(), this.warmSnapshots.close(), ...this.pauseImageWrites]);
  }

  /** Kills every live sandbox (used by tests and `cubicle down --kill`). */
  async killAll(reason = "server shutdown"): Promise<void> {
    await Promise.all([...this.live.keys()].map((id) => this.kill(id, reason)));
  }
}
