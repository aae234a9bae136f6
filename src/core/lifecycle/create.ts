import { startTemplateCommand } from "../template-start.js";
import { CubicleError } from "../../shared/cubicle-error.js";
import { roundMs } from "../../shared/log.js";
import { runtimeIdOf, type PoolEntryRecord, type SandboxRecord, type SnapshotRecord, type VolumeMount, type CodebaseMount } from "../../store/types.js";
import { agentReadyTimeoutMs } from "../../protocol/index.js";
import { normaliseSnapshotRef } from "../snapshot-names.js";
import type { CreateSandboxRequest, TemplateInfo } from "../types.js";
import type { WarmPool } from "../warm-pool.js";
import type { WarmSnapshots } from "../warm-snapshots.js";
import { hasOwnEgressPolicy, log, networkPolicyOf, type LifecycleContext } from "./context.js";

/**
 * A claimed pool entry with a policy of its own gets it, and is thawed, this long after the 201
 * at the latest (POLICY_CLAIM_NOTE): long enough for the client to read the 201 undisturbed,
 * short enough that the batch is mostly done before its first request comes. First command
 * with a policy ÷ without, 200 pairs each (bench/network.sh): 1.05–1.06x when waiting 20 ms
 * (the batch and the thaw in the first request's path), 1.03x with 2 ms.
 */
const POLICY_AFTER_CLAIM_MS = 2;

/** The alias a create named, or the template's first one. */
function aliasOf(template: TemplateInfo, requested: string): string | undefined {
  return template.aliases.includes(requested) ? requested : template.aliases[0];
}

/**
 * Creates: a claim of a warm-pool entry when one fits, else a restore of the template's warm
 * snapshot, else a cold boot; or a restore of a user's snapshot named instead of a template.
 */
export class Creation {
  constructor(
    private readonly ctx: LifecycleContext,
    private readonly pool: WarmPool,
    private readonly warmSnapshots: WarmSnapshots,
  ) {}

  async create(request: CreateSandboxRequest): Promise<SandboxRecord> {
    this.ctx.refuseWhenClosed();
    this.refuseRuntimeNotHere(request.runtime, "");
    // Volumes and codebases are mounted as a sandbox starts: such a create boots (no pool entry has them).
    const volumeMounts = request.volumeMounts?.length ? await this.resolveVolumes(request) : undefined;
    const codebaseMounts = request.codebaseMounts?.length ? await this.resolveCodebases(request) : undefined;
    const mounts = volumeMounts || codebaseMounts ? { volumeMounts, codebaseMounts } : undefined;
    // Pool entries run in their template's runtime: WarmPool.claim checks the create's own choice.
    const claimed = !mounts
      ? this.pool.claim({ templateIdOrAlias: request.templateId, cpuCount: request.cpuCount, memoryMB: request.memoryMB, diskSizeMB: request.diskSizeMB, runtime: request.runtime })
      : undefined;
    if (claimed) {
      const record = await this.createFromPoolEntry(request, claimed.template, claimed.entry);
      if (record) return record;
    }
    const template = claimed?.template ?? (await this.ctx.ports.templates.resolve(request.templateId));
    if (!template) {
      const snapshot = await this.ctx.ports.store.findSnapshot(normaliseSnapshotRef(request.templateId));
      if (snapshot && !snapshot.hidden) {
        if (mounts) throw new CubicleError("invalid_argument", "volumeMounts and codebaseMounts cannot be given with a snapshot: a sandbox from a snapshot has the mounts its source had");
        return this.ctx.starts.run("create", () => this.createFromSnapshot(request, snapshot));
      }
      throw new CubicleError("not_found", `template or snapshot "${request.templateId}" not found; list templates with \`./cubicle template ls\` and snapshots with GET /snapshots`);
    }
    if (request.runtime === undefined) this.refuseRuntimeNotHere(template.runtime, ` (template ${template.templateId} runs there: CUBICLE_TEMPLATE_RUNTIME)`);
    // Refused at once (429/503) when it cannot be served; else it waits for a start slot (ADMISSION_NOTE).
    return this.ctx.starts.run("create", () => this.createFromTemplate(request, template, mounts));
  }

  /** The create's codebases, by name or id; a server without codebases refuses them. */
  private async resolveCodebases(request: CreateSandboxRequest): Promise<CodebaseMount[]> {
    const codebases = this.ctx.ports.codebases;
    if (!codebases) throw new CubicleError("failed_precondition", "this server has no codebases: leave codebaseMounts out");
    return codebases.resolveMounts(request.codebaseMounts!);
  }

  /** The create's volumes, by name or id; a server without volumes refuses them. */
  private async resolveVolumes(request: CreateSandboxRequest): Promise<VolumeMount[]> {
    const volumes = this.ctx.ports.volumes;
    if (!volumes) throw new CubicleError("failed_precondition", "this server has no volumes: leave volumeMounts out");
    return volumes.resolveMounts(request.volumeMounts!);
  }

  /** A runtime this host does not run is a 400, before anything starts. */
  private refuseRuntimeNotHere(wanted: CreateSandboxRequest["runtime"], why: string): void {
    const { runtime } = this.ctx.ports;
    if (wanted === undefined || (runtime.runs ? runtime.runs(wanted) : runtime.name === wanted)) return;
    throw new CubicleError("failed_precondition", `this host cannot run ${wanted} sandboxes${why}: it runs ${runtime.name} sandboxes only (CUBICLE_MICROVM is off)`);
  }

  /** A create without a pool entry: a restore of the template's warm snapshot, or a boot. */
  private async createFromTemplate(
    request: CreateSandboxRequest,
    template: TemplateInfo,
    mounts: { volumeMounts?: VolumeMount[]; codebaseMounts?: CodebaseMount[] } | undefined,
  ): Promise<SandboxRecord> {
    const { ctx } = this;
    ctx.refuseWhenClosed();
    const record = ctx.newRecord(request, template, aliasOf(template, request.templateId));
    if (mounts?.volumeMounts) record.volumeMounts = mounts.volumeMounts;
    if (mounts?.codebaseMounts) record.codebaseMounts = mounts.codebaseMounts;
    // The warm image is of the template's runtime: a create that asks for the other one boots.
    const templateRuntime = record.runtime === (template.runtime ?? ctx.ports.runtime.name);
    const warmImage = templateRuntime && this.warmSnapshotFits(request, template) ? await this.warmSnapshots.imageFor(template) : undefined;
    await ctx.table.add(record);
    if (warmImage) {
      const started = performance.now();
      // The image's agent was never given a token: its first /init needs none.
      await ctx.startOrFail(record, () => ctx.restoreInto(record, template, warmImage, undefined));
      this.warmSnapshots.countRestore(template.templateId);
      log.debug("created from the template's warm snapshot", { sandboxId: record.sandboxId, templateId: template.templateId, ms: roundMs(performance.now() - started) });
      return ctx.markRunning(record, { pooled: false, warmSnapshot: true });
    }
    await ctx.startOrFail(record, async () => {
      const started = performance.now();
      const network = await ctx.beginNetwork(record);
      await ctx.ports.runtime.create({ ...ctx.specOf(record, template), networkReady: network.ready });
      const created = performance.now();
      // Its first /init is retried until the agent listens: no separate health probe.
      // A microVM under TCG boots in seconds, not milliseconds.
      await ctx.initAgent(record, template, undefined, agentReadyTimeoutMs(record.runtime));
      if (template.startCmd) await startTemplateCommand(record.network!.sandboxAddress, template, record.envdAccessToken);
      log.debug("booted", { sandboxId: record.sandboxId, runtimeMs: roundMs(created - started), agentUpMs: roundMs(performance.now() - created) });
    });
    return ctx.markRunning(record, { pooled: false });
  }

  /**
   * The warm path: the sandbox takes the frozen entry's id (its container already has that
   * hostname), is recorded in the same transaction that removes the pool row, is thawed (one
   * with a policy of its own only once the policy is in place: POLICY_CLAIM_NOTE) and given its
   * identity. Undefined when the entry turns out broken (its cgroup is gone, it cannot be
   * thawed): it is torn down and the caller creates cold.
   *
   * Most creates (secure, no env vars) need no /init: the entry's agent got the template's
   * defaults and a token of its own before the freeze. Otherwise the agent's /init (identity,
   * env vars, token) is not awaited here: it runs while the 201 goes out (~2.5 ms of a ~5 ms
   * claim), under the sandbox's lock, and the router holds the sandbox's traffic until it is
   * done (routeTarget / resumeForTraffic), so no request reaches the agent before it knows its
   * token. An init that fails then kills the sandbox (the warm-up before the freeze proved the
   * agent answers, so this is a sandbox dying, not a bad entry).
   */
  private async createFromPoolEntry(request: CreateSandboxRequest, template: TemplateInfo, entry: PoolEntryRecord): Promise<SandboxRecord | undefined> {
    const { ctx } = this;
    const started = performance.now();
    const record = ctx.newRecord(request, template, aliasOf(template, request.templateId), entry.runtimeId);
    record.network = entry.network;
    // The entry's agent already holds the template's defaults and a token made for it alone
    // (PoolEntryRecord.agentToken): a secure create without env vars needs no /init at all.
    const initialised = entry.agentToken !== undefined && record.envdAccessToken !== undefined && Object.keys(record.envVars).length === 0;
    if (initialised) record.envdAccessToken = entry.agentToken;
    await ctx.table.addClaimed(record);
    const ownPolicy = hasOwnEgressPolicy(record);
    try {
      const recorded = performance.now();
      // Made at background CPU priority: the normal one before it runs again (no process start).
      // This also proves the entry's cgroup is still there.
      await ctx.ports.runtime.foreground(record.sandboxId);
      // POLICY_CLAIM_NOTE: the entry's network allows all public egress, so a create with a
      // policy of its own stays frozen until that policy is in the kernel: not one packet of its
      // template's processes leaves under the entry's. The policy (one netlink batch in the
      // resident helper, NFT_NETLINK_NOTE) and the thaw come after the 201, when the sandbox's
      // first request reaches the router or POLICY_AFTER_CLAIM_MS later, whichever is first; the
      // router holds its traffic until both are done. Applied as the 201 went out, the helper's
      // work competed with the client reading it on two cores: 201 1.06–1.09x a create without
      // a policy; not applied at all, 0.98x; as now, 0.96–0.99x (bench/network.sh, 100–200 pairs).
      if (!ownPolicy) await ctx.ports.runtime.thaw(record.sandboxId);
      const thawed = performance.now();
      if (!initialised || ownPolicy) this.initialiseInBackground(record, template, thawed, { init: !initialised, policy: ownPolicy, currentToken: entry.agentToken });
      await ctx.markRunning(record, { pooled: true });
      log.debug("claimed a pool entry", {
        sandboxId: record.sandboxId,
        recordMs: roundMs(recorded - started),
        thawMs: roundMs(thawed - recorded),
        totalMs: roundMs(performance.now() - started),
      });
      return record;
    } catch (err) {
      // A broken pool entry must not fail the create: drop it, the caller boots a fresh one.
      log.warn("warm pool claim failed; creating cold", { sandboxId: record.sandboxId, error: String(err) });
      await ctx.table.end(record, { state: "dead", reason: `pool claim failed: ${(err as Error).message}` });
      return undefined;
    }
  }

  /**
   * See createFromPoolEntry: /init, and the create's own network policy and thaw
   * (POLICY_CLAIM_NOTE), after the claim's response, the router holding the sandbox's traffic
   * until they are done and starting them at once when traffic comes (LiveSandbox.hurry).
   */
  private initialiseInBackground(record: SandboxRecord, template: TemplateInfo, claimedAt: number, steps: { init: boolean; policy: boolean; currentToken: string | undefined }): void {
    const { ctx } = this;
    const sandboxId = record.sandboxId;
    const live = ctx.table.entry(sandboxId)!;
    live.initialising = ctx.mutex.run(sandboxId, async () => {
      try {
        if (steps.policy) {
          await new Promise<void>((resolve) => {
            const timer = setTimeout(resolve, POLICY_AFTER_CLAIM_MS);
            live.hurry = () => {
              clearTimeout(timer);
              resolve();
            };
          });
          live.hurry = undefined;
          await ctx.ports.network.applyPolicy(runtimeIdOf(record), networkPolicyOf(record));
          await ctx.ports.runtime.thaw(sandboxId);
        }
        if (steps.init) await ctx.initAgent(record, template, steps.currentToken);
        log.debug("initialised a claimed pool entry", { sandboxId, policy: steps.policy, initMs: roundMs(performance.now() - claimedAt) });
      } catch (err) {
        // Killed meanwhile (it left the table): nothing to do.
        if (!ctx.table.isLive(record)) return;
        log.warn("agent init or network policy after a pool claim failed; killing the sandbox", { sandboxId, error: String(err) });
        await ctx.markDead(record, `agent init failed: ${(err as Error).message}`).catch((markErr) => log.error("marking a sandbox dead failed", { sandboxId, error: String(markErr) }));
      } finally {
        live.hurry = undefined;
        live.initialising = undefined;
      }
    });
  }

  /**
   * A warm snapshot serves a create that asks for the template's own resources and no env vars:
   * processes restored from it (the interpreter's kernel) keep the environment they started
   * with, while a cold sandbox's kernel starts after the /init that hands over the env vars.
   */
  private warmSnapshotFits(request: CreateSandboxRequest, template: TemplateInfo): boolean {
    if (Object.keys(request.envVars).length > 0 || request.volumeMounts?.length || request.codebaseMounts?.length) return false;
    if (request.cpuCount !== undefined && request.cpuCount !== template.cpuCount) return false;
    if (request.memoryMB !== undefined && request.memoryMB !== template.memoryMB) return false;
    if (request.diskSizeMB !== undefined && request.diskSizeMB !== template.diskSizeMB) return false;
    return this.warmSnapshots.isEnabled(template);
  }

  private async createFromSnapshot(request: CreateSandboxRequest, snapshot: SnapshotRecord): Promise<SandboxRecord> {
    const { ctx } = this;
    const template = await ctx.templateOf(snapshot);
    const record = ctx.newRecord(request, template, undefined);
    record.fromSnapshotId = snapshot.snapshotId;
    // The image's cgroup limits and memory layout are the source's: keep its resources.
    record.cpuCount = snapshot.cpuCount;
    record.memoryMB = snapshot.memoryMB;
    record.diskSizeMB = snapshot.diskSizeMB;
    // The image restores on the runtime that made it, whatever the template or the request say.
    const image = await ctx.ports.runtime.images.info(snapshot.imageId);
    if (image) record.runtime = image.runtime;
    // The same volumes and codebases, by id, as they are now: one deleted or unregistered since
    // the snapshot fails the create here.
    if (snapshot.volumeMounts?.length) {
      record.volumeMounts = await this.resolveVolumes({ ...request, volumeMounts: snapshot.volumeMounts.map((mount) => ({ name: mount.volumeId, path: mount.path })) });
    }
    if (snapshot.codebaseMounts?.length) {
      record.codebaseMounts = await this.resolveCodebases({ ...request, codebaseMounts: snapshot.codebaseMounts.map((mount) => ({ codebase: mount.codebaseId, path: mount.path, rules: mount.rules, defaultLevel: mount.defaultLevel })) });
    }
    await ctx.table.add(record);
    await ctx.startOrFail(record, () => ctx.restoreInto(record, template, snapshot.imageId, snapshot.memory ? snapshot.agentAccessToken : undefined));
    return ctx.markRunning(record, { snapshotId: snapshot.snapshotId });
  }
}
