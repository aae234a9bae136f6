import { runPool } from "../../shared/pool.js";
import { runtimeIdOf, type SandboxRecord } from "../../store/types.js";
import type { WarmPool } from "../warm-pool.js";
import { log, networkPolicyOf, type LifecycleContext } from "./context.js";
import type { PauseTiers } from "./pause.js";

/** Sandboxes whose survival is checked at once after a restart. */
const RECOVERY_CONCURRENCY = 8;

export interface Recovered {
  adopted: string[];
  dead: string[];
  orphansRemoved: string[];
}

/**
 * After a restart: adopt sandboxes that still run, keep paused ones paused (hot: still frozen;
 * durable: their image), end vanished ones dead, discard the previous process's pool entries
 * and half-written images, and remove whatever the runtime or network holds that nothing owns.
 */
export async function recover(ctx: LifecycleContext, pool: WarmPool, pauses: PauseTiers): Promise<Recovered> {
  const recovered: Recovered = { adopted: [], dead: [], orphansRemoved: [] };
  const { store, runtime, network } = ctx.ports;
  recovered.orphansRemoved.push(...(await pool.discardRecorded()));
  const records = await store.querySandboxes({ states: ["starting", "running", "paused"], order: "asc" });
  // Each sandbox's checks wait mostly on others (runc's state, the agent's health, the network
  // helper): a few at a time, so a thousand are back in seconds rather than a minute.
  const checked = await runPool(records.length, RECOVERY_CONCURRENCY, async (index) => {
    const record = records[index]!;
    if (await stillThere(ctx, pauses, record)) {
      ctx.table.adopt(record);
      if (record.network) await runtime.watch(runtimeIdOf(record)).catch((err) => log.warn("cannot watch an adopted sandbox", { sandboxId: record.sandboxId, error: String(err) }));
      recovered.adopted.push(record.sandboxId);
      await ctx.recordEvent(record.sandboxId, "adopted", { state: record.state });
    } else {
      await ctx.table.end(record, { state: "dead", reason: record.state === "starting" ? "server stopped during create" : "vanished while the server was down" });
      recovered.dead.push(record.sandboxId);
    }
  });
  const failed = checked.find((result) => result.status === "rejected");
  if (failed) throw failed.reason;
  const liveRuntimeIds = new Set(ctx.table.records().map(runtimeIdOf));
  for (const runtimeId of await runtime.list()) {
    if (liveRuntimeIds.has(runtimeId)) continue;
    await runtime.destroy(runtimeId).catch((err) => log.error("orphan destroy failed", { runtimeId, error: String(err) }));
    recovered.orphansRemoved.push(runtimeId);
  }
  for (const runtimeId of await network.listRuntimeIds()) {
    // Namespaces of sandboxes this store never knew belong to another server on the host.
    if (liveRuntimeIds.has(runtimeId) || !(await store.knowsRuntimeId(runtimeId))) continue;
    await network.release(runtimeId).catch((err) => log.error("orphan network release failed", { runtimeId, error: String(err) }));
    if (!recovered.orphansRemoved.includes(runtimeId)) recovered.orphansRemoved.push(runtimeId);
  }
  await removeUnownedImages(ctx);
  // Hot pauses still frozen in RAM whose image the previous process did not write (after the
  // cleanup above, which would remove an image written meanwhile as unowned).
  for (const record of ctx.table.records()) {
    if (record.state === "paused" && record.pause?.tier === "hot" && !record.pause.imageId) pauses.schedulePauseImage(record);
  }
  ctx.scheduleReaper();
  if (recovered.adopted.length || recovered.dead.length || recovered.orphansRemoved.length) log.info("recovered", { ...recovered });
  return recovered;
}

/**
 * Whether a recorded sandbox survived the restart, bringing its record up to date on the way:
 * a running one whose container runs (thawed if a snapshot dump froze it) and whose agent
 * answers; a hot pause whose container is still there (frozen again if it ran), or whose image
 * is complete (it becomes a durable pause); a durable pause whose image is there.
 */
async function stillThere(ctx: LifecycleContext, pauses: PauseTiers, record: SandboxRecord): Promise<boolean> {
  const { runtime, network, agent } = ctx.ports;
  const { images } = runtime;
  const runtimeId = runtimeIdOf(record);
  let alive = false;
  if (record.state === "running" && record.idle?.tier === "disk" && record.idle.imageId) {
    // Asleep on disk (idle.ts): it stays so, and the next request wakes it. A network still
    // recorded is one the previous process did not get to release after the dump.
    alive = await images.exists(record.idle.imageId);
    if (alive && record.network) await ctx.releaseHostResources(record);
  } else if (record.state === "running" && record.network) {
    const state = await runtime.state(runtimeId);
    // Frozen while running: the server died during a snapshot dump, or it was frozen for
    // idleness: it is thawed and awake again (its idle check starts over).
    if (state === "frozen") await runtime.thaw(runtimeId);
    if (state === "running" || state === "frozen") {
      await network.adopt(runtimeId, record.network, networkPolicyOf(record));
      alive = await agent.isHealthy(record.network.sandboxAddress);
      if (alive && record.idle) await ctx.table.update(record, { idle: undefined });
    } else if (record.idle?.tier === "frozen" && (await images.exists(pauses.pauseImageId(record.sandboxId)))) {
      // The server died between an idle sandbox's dump to disk and recording it: the image is
      // complete (an image id exists only once committed), so it is asleep on disk.
      await ctx.table.update(record, { idle: { ...record.idle, tier: "disk", imageId: pauses.pauseImageId(record.sandboxId) } });
      await ctx.releaseHostResources(record);
      alive = true;
    }
  } else if (record.state === "paused" && record.pause?.tier === "hot" && record.network) {
    const state = await runtime.state(runtimeId);
    if (state === "running") {
      await runtime.freeze(runtimeId);
      // It ran after its image was written (the server died in a resume): the image is stale.
      if (record.pause.imageId) await ctx.table.update(record, { pause: { ...record.pause, imageId: undefined } });
    }
    if (state === "running" || state === "frozen") {
      await network.adopt(runtimeId, record.network, networkPolicyOf(record));
      alive = true;
    } else if (await images.exists(pauses.pauseImageId(record.sandboxId))) {
      // The frozen processes are gone (a host reboot; or the server died between a dump to
      // disk and recording it) but the pause's image is complete (an image id exists only once
      // committed): it becomes a durable pause. A resume removes a stale image first.
      await ctx.table.update(record, { pause: { ...record.pause, tier: "durable", imageId: pauses.pauseImageId(record.sandboxId) } });
    }
  }
  if (record.state === "paused" && record.pause?.tier === "durable" && record.pause.imageId) {
    alive = await images.exists(record.pause.imageId);
    if (alive && record.network) await ctx.releaseHostResources(record);
  }
  return alive;
}

/**
 * Images without an owner: a crashed fork's one-off image, snapshots the store does not know (a
 * dump recorded by no one), pause images of no paused sandbox. (Half-written images are the
 * image store's own business: it never lists them and removes them when it starts.)
 */
async function removeUnownedImages(ctx: LifecycleContext): Promise<void> {
  const { store, runtime } = ctx.ports;
  const remove = (id: string) => runtime.images.remove(id).catch((err) => log.error("removing an unowned image failed", { imageId: id, error: String(err) }));
  for (const snapshot of await store.allSnapshots()) {
    if (snapshot.hidden) {
      await store.deleteSnapshot(snapshot.snapshotId);
      await remove(snapshot.imageId);
    }
  }
  const snapshots = new Set((await store.allSnapshots()).map((s) => s.imageId));
  for (const id of await runtime.images.list("snapshot")) if (!snapshots.has(id)) await remove(id);
  const pauses = new Set(ctx.table.records().flatMap((r) => [r.pause?.imageId, r.idle?.imageId]));
  for (const id of await runtime.images.list("pause")) if (!pauses.has(id)) await remove(id);
}
