import { runtimeIdOf } from "../../store/types.js";
import type { WarmPool } from "../warm-pool.js";
import { log, type LifecycleContext } from "./context.js";

/**
 * Kills a sandbox (a user's kill, or its timeout). Resolves false when there is no such live
 * sandbox (E2B's kill → false); a sandbox still starting cannot be killed yet.
 */
export async function kill(ctx: LifecycleContext, sandboxId: string, reason = "killed"): Promise<boolean> {
  return ctx.mutex.run(sandboxId, async () => {
    const record = ctx.table.get(sandboxId);
    if (!record || record.state === "starting") return false;
    await ctx.table.end(record, { state: "killed", reason });
    ctx.scheduleReaper();
    return true;
  });
}

/**
 * A sandbox's processes ended on their own (its agent was OOM-killed, its init exited): it is
 * dead. Marked so at once (gone from list and getInfo), its resources released and its open
 * streams reset, unless a lifecycle step already moved it on (kill, durable pause, rollback),
 * which the check under the sandbox's lock sees. A warm-pool entry that ended is discarded.
 */
export async function handleRuntimeExit(ctx: LifecycleContext, pool: WarmPool, runtimeId: string): Promise<void> {
  const record = ctx.table.byRuntimeId(runtimeId);
  if (!record) {
    await pool.discardEnded(runtimeId).catch((err) => log.error("discarding an ended pool entry failed", { runtimeId, error: String(err) }));
    return;
  }
  await ctx.mutex
    .run(record.sandboxId, async () => {
      if (!ctx.table.isLive(record) || runtimeIdOf(record) !== runtimeId) return;
      // A running sandbox asleep on disk has no processes by design (idle.ts).
      const hot = (record.state === "running" && record.idle?.tier !== "disk") || (record.state === "paused" && record.pause?.tier === "hot");
      if (!hot) return;
      const state = await ctx.ports.runtime.state(runtimeId).catch(() => "missing" as const);
      if (state === "running" || state === "frozen") return;
      log.warn("a sandbox's processes ended; marking it dead", { sandboxId: record.sandboxId, runtimeState: state });
      await ctx.markDead(record, "the sandbox's processes ended (its agent was killed, e.g. out of memory)");
    })
    .catch((err) => log.error("handling a sandbox's end failed", { sandboxId: record.sandboxId, error: String(err) }));
  ctx.scheduleReaper();
}
