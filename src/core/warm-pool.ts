import { buildInitBody } from "../protocol/index.js";
import type { PoolEntryRecord } from "../store/types.js";
import { createLogger } from "../shared/log.js";
import { newToken } from "./ids.js";
import type { TemplateCatalog, TemplateInfo } from "./types.js";
import { bootUnclaimed, destroyUnclaimed, type UnclaimedSandboxDeps } from "./unclaimed-sandbox.js";

const log = createLogger("pool");

/** Parallel creations per template while refilling: a refill must not starve user creates. */
const REFILL_PARALLELISM = 2;
/**
 * A claim starts its refill this much later: the claimed sandbox's create and first command run
 * on this process's event loop, and a refill's synchronous work (process spawns for runc, ip,
 * nft; SQLite writes) would sit in front of them. Measured (base, pool 2, c=1, `bench create`):
 * p50 claim → first command 24–30 ms refilling at once, 17–23 ms with 30 ms, 14.5 ms with
 * 100 ms (but then the pool no longer keeps up with ~10 creates/s and a tenth go cold).
 */
const REFILL_AFTER_CLAIM_MS = 30;
/** After a failed pool create, wait this long before trying again (no hot loop on a broken template). */
const RETRY_AFTER_FAILURE_MS = 5_000;

export interface WarmPoolOptions extends UnclaimedSandboxDeps {
  templates: TemplateCatalog;
  /** Wanted entries per template id or alias. */
  sizes: Record<string, number>;
}

/** What a create needs of a pool entry: the template's own resources and network policy. */
export interface PoolClaimRequest {
  /** The template id or alias the create named. */
  templateIdOrAlias: string;
  cpuCount: number | undefined;
  memoryMB: number | undefined;
  diskSizeMB?: number | undefined;
  /** The runtime the create asked for (its `runtime` field), if it named one. */
  runtime?: "container" | "microvm" | undefined;
}

/** A claimed entry and the template it was made from. */
export interface PoolClaim {
  entry: PoolEntryRecord;
  template: TemplateInfo;
}

/**
 * Keeps per template a number of sandboxes created ahead and frozen (`runtime.freeze`): only the
 * agent runs in them, without a token, so the first `/init` of a claim succeeds. An entry's
 * runtime id is a sandbox id (and its hostname): the sandbox that claims it takes that id. A
 * claim hands an entry over synchronously (no two creates get the same one) and refills in the
 * background.
 * Entries are recorded in the store before anything is made, so a crash leaves nothing unowned:
 * recovery discards them (`discardRecorded`), a graceful stop drains them (`drain`).
 */
export class WarmPool {
  private readonly ready = new Map<string, PoolEntryRecord[]>();
  private readonly inFlight = new Map<string, number>();
  private readonly targets = new Map<string, { size: number; template: TemplateInfo }>();
  private readonly retryTimers = new Set<NodeJS.Timeout>();
  private readonly refillTimers = new Map<string, NodeJS.Timeout>();
  private readonly creations = new Set<Promise<void>>();
  private stopped = false;

  constructor(private readonly options: WarmPoolOptions) {}

  /** Resolves the configured templates and starts filling. Call once templates are built. */
  async start(): Promise<void> {
    for (const [idOrAlias, size] of Object.entries(this.options.sizes)) {
      if (size <= 0) continue;
      const template = await this.options.templates.resolve(idOrAlias);
      if (!template) {
        log.warn("pool template not found; no pool for it", { template: idOrAlias });
        continue;
      }
      const runtime = this.options.runtime;
      if (template.runtime !== undefined && !(runtime.runs ? runtime.runs(template.runtime) : runtime.name === template.runtime)) {
        log.warn("this template's runtime does not run here, so it has no pool", { template: idOrAlias, runtime: template.runtime });
        continue;
      }
      this.targets.set(template.templateId, { size, template });
    }
    for (const templateId of this.targets.keys()) this.refill(templateId);
  }

  /** Frozen entries ready per template (for tests and the debug log). */
  counts(): Record<string, { ready: number; creating: number; target: number }> {
    const out: Record<string, { ready: number; creating: number; target: number }> = {};
    for (const [templateId, { size }] of this.targets) {
      out[templateId] = { ready: this.ready.get(templateId)?.length ?? 0, creating: this.inFlight.get(templateId) ?? 0, target: size };
    }
    return out;
  }

  /**
   * Takes a frozen entry for a create, or undefined when none fits (other resources than the
   * template's, or the pool is empty). The caller owns the entry from now on: it records its
   * sandbox under the entry's id (`Store.claimPoolEntry`, which deletes the pool row) and thaws
   * it. A refill starts in the background shortly after.
   */
  claim(request: PoolClaimRequest): PoolClaim | undefined {
    if (this.stopped) return undefined;
    const target = [...this.targets.values()].find(
      ({ template }) => template.templateId === request.templateIdOrAlias || template.aliases.includes(request.templateIdOrAlias),
    );
    if (!target) return undefined;
    const { template } = target;
    if (request.cpuCount !== undefined && request.cpuCount !== template.cpuCount) return undefined;
    if (request.memoryMB !== undefined && request.memoryMB !== template.memoryMB) return undefined;
    if (request.diskSizeMB !== undefined && request.diskSizeMB !== template.diskSizeMB) return undefined;
    // Entries run in the template's runtime: a create that asks for another one boots.
    if (request.runtime !== undefined && request.runtime !== (template.runtime ?? this.options.runtime.name)) return undefined;
    const entry = this.ready.get(template.templateId)?.shift();
    this.refillLater(template.templateId);
    return entry?.network ? { entry, template } : undefined;
  }

  private refillLater(templateId: string): void {
    if (this.refillTimers.has(templateId)) return;
    const timer = setTimeout(() => {
      this.refillTimers.delete(templateId);
      this.refill(templateId);
    }, REFILL_AFTER_CLAIM_MS);
    timer.unref();
    this.refillTimers.set(templateId, timer);
  }

  private refill(templateId: string): void {
    const target = this.targets.get(templateId);
    if (!target || this.stopped) return;
    const have = () => (this.ready.get(templateId)?.length ?? 0) + (this.inFlight.get(templateId) ?? 0);
    while (have() < target.size && (this.inFlight.get(templateId) ?? 0) < REFILL_PARALLELISM) {
      this.inFlight.set(templateId, (this.inFlight.get(templateId) ?? 0) + 1);
      const creation = this.createEntry(target.template)
        .then(
          (entry) => {
            if (this.stopped) return this.destroyEntry(entry);
            const list = this.ready.get(templateId) ?? [];
            list.push(entry);
            this.ready.set(templateId, list);
          },
          (err) => {
            log.warn("pool entry create failed; retrying later", { templateId, error: String(err) });
            const timer = setTimeout(() => {
              this.retryTimers.delete(timer);
              this.refill(templateId);
            }, RETRY_AFTER_FAILURE_MS);
            timer.unref();
            this.retryTimers.add(timer);
            return "failed" as const;
          },
        )
        .then((outcome) => {
          this.inFlight.set(templateId, (this.inFlight.get(templateId) ?? 1) - 1);
          if (outcome !== "failed") this.refill(templateId);
        });
      const tracked = creation.finally(() => this.creations.delete(tracked));
      this.creations.add(tracked);
    }
  }

  /** An entry: booted under the id of the sandbox that will claim it (so a claim needs no rename), warmed up, given an identity, frozen. */
  private async createEntry(template: TemplateInfo): Promise<PoolEntryRecord> {
    const entry = await bootUnclaimed(this.options, template);
    const address = entry.network!.sandboxAddress;
    try {
      await this.options.agent.warmUp(address, template.image.defaultUser).catch((err) => log.debug("agent warm-up failed; freezing anyway", { runtimeId: entry.runtimeId, error: String(err) }));
      // The identity most creates want (see PoolEntryRecord.agentToken), given while it is cheap.
      const agentToken = newToken();
      await this.options.agent.init(
        address,
        buildInitBody({ accessToken: agentToken, envVars: {}, defaultUser: template.image.defaultUser, defaultWorkdir: template.image.defaultWorkdir, hostname: entry.runtimeId, caCertificates: this.options.caCertificates }),
      );
      entry.agentToken = agentToken;
      await this.options.store.insertPoolEntry(entry);
      // The warm-up's keep-alive connection stays open through the freeze (the agent never closes
      // idle ones, see KEEP_IDLE_CONNECTIONS): the claim's /init reuses it, no handshake with a
      // just-thawed agent.
      await this.options.runtime.freeze(entry.runtimeId);
      return entry;
    } catch (err) {
      await this.destroyEntry(entry);
      throw err;
    }
  }

  /**
   * An entry whose processes ended while it waited (the runtime reported it): taken out and
   * removed, so no claim gets it; false when it is not a ready entry.
   */
  async discardEnded(runtimeId: string): Promise<boolean> {
    for (const [templateId, list] of this.ready) {
      const index = list.findIndex((entry) => entry.runtimeId === runtimeId);
      if (index < 0) continue;
      const [entry] = list.splice(index, 1);
      log.warn("a pool entry's processes ended; replacing it", { runtimeId });
      await this.destroyEntry(entry!);
      this.refillLater(templateId);
      return true;
    }
    return false;
  }

  /** Removes an entry's container, network and row; never throws. */
  async destroyEntry(entry: Pick<PoolEntryRecord, "runtimeId">): Promise<void> {
    await destroyUnclaimed(this.options, entry.runtimeId);
  }

  /** After a restart: entries of the previous process are discarded (cheaper than proving them clean). */
  async discardRecorded(): Promise<string[]> {
    const entries = await this.options.store.listPoolEntries();
    for (const entry of entries) await this.destroyEntry(entry);
    return entries.map((e) => e.runtimeId);
  }

  /** Stops refilling and destroys every entry (graceful shutdown). */
  async drain(): Promise<void> {
    this.stopped = true;
    for (const timer of [...this.retryTimers, ...this.refillTimers.values()]) clearTimeout(timer);
    this.retryTimers.clear();
    this.refillTimers.clear();
    await Promise.allSettled([...this.creations]);
    const entries = [...this.ready.values()].flat();
    this.ready.clear();
    await Promise.all(entries.map((entry) => this.destroyEntry(entry)));
  }
}
