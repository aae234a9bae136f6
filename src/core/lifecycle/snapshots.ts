import { CubicleError } from "../../shared/cubicle-error.js";
import { runPool } from "../../shared/pool.js";
import { runtimeIdOf, type SandboxRecord, type SnapshotQuery, type SnapshotRecord } from "../../store/types.js";
import { newForkSnapshotId, newSnapshotId } from "../ids.js";
import { normaliseSnapshotRef, parseSnapshotName } from "../snapshot-names.js";
import type { TemplateInfo } from "../types.js";
import { storageFullOr, type LifecycleContext } from "./context.js";

/** Restores of one fork request run this many at a time. */
const FORK_PARALLELISM = 4;

/** One entry of a fork answer: a sandbox or why that fork failed. */
export type ForkOutcome = { record: SandboxRecord } | { error: CubicleError };

/**
 * Snapshots (a running sandbox's memory and files kept as an image that outlives it), forks
 * (one dump, many restores) and rollbacks (a sandbox restored in place from its own snapshot).
 */
export class Snapshots {
  constructor(private readonly ctx: LifecycleContext) {}

  /**
   * Dumps a running sandbox's memory and files into a persistent snapshot; the sandbox is frozen
   * only for the dump. A second snapshot (or fork) of the same sandbox while one runs → 409.
   */
  async createSnapshot(sandboxId: string, rawName: unknown): Promise<SnapshotRecord> {
    const name = parseSnapshotName(rawName);
    if (name && (await this.ctx.ports.templates.resolve(name))) {
      throw new CubicleError("conflict", `"${name}" is the name of a template; choose another snapshot name`);
    }
    return this.withDump(sandboxId, (record) => this.dump(record, newSnapshotId(), name ? [name] : []));
  }

  async listSnapshots(query: SnapshotQuery): Promise<SnapshotRecord[]> {
    return this.ctx.ports.store.querySnapshots({ ...query, name: query.name === undefined ? undefined : normaliseSnapshotRef(query.name) });
  }

  /** Deletes a snapshot and its image; false when there is none. Sandboxes made from it are not affected. */
  async deleteSnapshot(idOrName: string): Promise<boolean> {
    const { store } = this.ctx.ports;
    const snapshot = await store.findSnapshot(normaliseSnapshotRef(idOrName));
    if (!snapshot || snapshot.hidden) return false;
    return this.ctx.mutex.run(`snapshot:${snapshot.snapshotId}`, async () => {
      if (!(await store.deleteSnapshot(snapshot.snapshotId))) return false;
      await this.ctx.ports.runtime.images.remove(snapshot.imageId);
      return true;
    });
  }

  /**
   * Forks a running sandbox: one checkpoint (the source keeps running, its id and endAt unchanged),
   * then `count` restores, `FORK_PARALLELISM` at a time. Each fork succeeds or fails on its own.
   */
  async fork(sandboxId: string, options: { timeoutSec: number; count: number }): Promise<ForkOutcome[]> {
    const { ctx } = this;
    let source!: SandboxRecord;
    const image = await this.withDump(sandboxId, async (record) => {
      source = { ...record };
      return this.dump(record, newForkSnapshotId(), [], { restores: options.count });
    });
    try {
      const template = await ctx.templateOf(image);
      const made = await runPool(options.count, FORK_PARALLELISM, () => ctx.starts.run("create", () => this.forkOne(source, image, template, options.timeoutSec)));
      return made.map((result): ForkOutcome => (result.status === "fulfilled" ? { record: result.value } : { error: CubicleError.from(result.reason) }));
    } finally {
      await ctx.ports.store.deleteSnapshot(image.snapshotId).catch(() => undefined);
      await ctx.ports.runtime.images.remove(image.imageId).catch(() => undefined);
    }
  }

  private async forkOne(source: SandboxRecord, image: SnapshotRecord, template: TemplateInfo, timeoutSec: number): Promise<SandboxRecord> {
    const { ctx } = this;
    ctx.refuseWhenClosed();
    const record = ctx.newRecord(
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
    record.runtime = source.runtime;
    if (image.volumeMounts?.length) record.volumeMounts = image.volumeMounts;
    if (image.codebaseMounts?.length) record.codebaseMounts = image.codebaseMounts;
    record.metadata = { ...source.metadata };
    await ctx.table.add(record);
    await ctx.startOrFail(record, () => ctx.restoreInto(record, template, image.imageId, image.agentAccessToken));
    return ctx.markRunning(record, { forkedFrom: source.sandboxId });
  }

  /**
   * Rolls a running sandbox back to one of its own snapshots, in place: same id, same network
   * address, memory and files as at the snapshot. If the restore fails the sandbox is gone and
   * is marked dead (never reported running while it is not).
   */
  async rollback(sandboxId: string, snapshotRef: string): Promise<SandboxRecord> {
    const { ctx } = this;
    const snapshot = await ctx.ports.store.findSnapshot(normaliseSnapshotRef(snapshotRef));
    if (!snapshot || snapshot.hidden) throw new CubicleError("not_found", `snapshot "${snapshotRef}" not found`);
    return this.withDump(sandboxId, async (record) => {
      if (snapshot.sourceSandboxId !== record.sandboxId || snapshot.sourceRuntimeId !== runtimeIdOf(record)) {
        throw new CubicleError(
          "conflict",
          `snapshot "${snapshot.snapshotId}" was taken from sandbox "${snapshot.sourceSandboxId}", not "${sandboxId}"; a sandbox rolls back only to its own snapshots (create a new sandbox from it instead)`,
        );
      }
      const template = await ctx.templateOf(record);
      ctx.resetConnections(sandboxId);
      ctx.dropIdleSockets(record);
      await ctx.ports.runtime.destroy(runtimeIdOf(record));
      try {
        // The sandbox's own past: its machine and the boot its restored processes belong to.
        await ctx.starts.run("create", () => ctx.restoreInto(record, template, snapshot.imageId, snapshot.agentAccessToken, true));
      } catch (err) {
        await ctx.markDead(record, `rollback to ${snapshot.snapshotId} failed: ${(err as Error).message}`);
        throw new CubicleError("internal", `rollback of sandbox "${sandboxId}" failed and the sandbox is gone: ${(err as Error).message}`, { cause: err });
      }
      await ctx.recordEvent(sandboxId, "rolled-back", { snapshotId: snapshot.snapshotId });
      return record;
    });
  }

  /** Runs a dump under the sandbox's lock, refusing a concurrent one (409, not queued). */
  private async withDump<T>(sandboxId: string, operation: (record: SandboxRecord) => Promise<T>): Promise<T> {
    const { ctx } = this;
    const live = ctx.table.entry(sandboxId);
    if (!live || (live.record.state !== "running" && live.record.state !== "paused")) throw new CubicleError("not_found", `sandbox "${sandboxId}" not found`);
    if (live.dumping) throw new CubicleError("conflict", `a snapshot of sandbox "${sandboxId}" is already being taken; retry when it is done`);
    live.dumping = true;
    try {
      return await ctx.mutex.run(sandboxId, async () => {
        const record = ctx.table.get(sandboxId);
        if (!record || (record.state !== "running" && record.state !== "paused")) throw new CubicleError("not_found", `sandbox "${sandboxId}" not found`);
        if (record.state !== "running") throw new CubicleError("conflict", `sandbox "${sandboxId}" is paused; resume it (connect) before taking a snapshot`);
        // A dump needs its processes: one asleep for idleness is woken first.
        await ctx.wakeLocked(record);
        return operation(record);
      });
    } finally {
      live.dumping = false;
    }
  }

  /** `transient`: a fork's hidden image, restored `restores` times at once and then removed. */
  private async dump(record: SandboxRecord, snapshotId: string, names: string[], transient?: { restores: number }): Promise<SnapshotRecord> {
    const hidden = transient !== undefined;
    const { ctx } = this;
    const runtimeId = runtimeIdOf(record);
    ctx.dropIdleSockets(record);
    let info;
    try {
      info = await ctx.ports.runtime.checkpoint(runtimeId, { kind: "snapshot", name: snapshotId }, { memory: true, leaveRunning: true, ...(transient ? { transient } : {}) });
    } catch (err) {
      // A failed dump (disk full …) leaves no image behind: the runtime abandons what it wrote.
      const state = await ctx.ports.runtime.state(runtimeId).catch(() => "missing" as const);
      if (state === "frozen") await ctx.ports.runtime.thaw(runtimeId).catch(() => undefined);
      const lost = state === "missing" || state === "stopped";
      if (lost) await ctx.markDead(record, `the sandbox was lost during a snapshot: ${(err as Error).message}`);
      throw storageFullOr(CubicleError.from(err), record.sandboxId, lost ? "" : "; the sandbox keeps running");
    }
    const snapshot: SnapshotRecord = {
      snapshotId,
      names,
      sourceSandboxId: record.sandboxId,
      sourceRuntimeId: runtimeId,
      templateId: record.templateId,
      createdAt: Date.now(),
      imageId: info.imageId,
      sizeBytes: info.sizeBytes,
      memory: info.memory,
      agentAccessToken: record.envdAccessToken,
      cpuCount: record.cpuCount,
      memoryMB: record.memoryMB,
      diskSizeMB: record.diskSizeMB,
      ...(record.volumeMounts?.length ? { volumeMounts: record.volumeMounts } : {}),
      ...(record.codebaseMounts?.length ? { codebaseMounts: record.codebaseMounts } : {}),
      hidden,
    };
    try {
      await ctx.ports.store.insertSnapshot(snapshot);
    } catch (err) {
      await ctx.ports.runtime.images.remove(info.imageId).catch(() => undefined);
      throw err;
    }
    await ctx.recordEvent(record.sandboxId, "snapshot", { snapshotId, frozenMs: info.frozenMs, sizeBytes: info.sizeBytes });
    return snapshot;
  }
}
