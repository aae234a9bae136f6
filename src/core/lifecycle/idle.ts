import { CubicleError } from "../../shared/cubicle-error.js";
import { roundMs } from "../../shared/log.js";
import { imageId } from "../../runtime/images.js";
import { runtimeIdOf, type SandboxRecord } from "../../store/types.js";
import type { LiveSandbox } from "../sandbox-table.js";
import { log, type LifecycleContext } from "./context.js";

export interface IdleSettings {
  /** Quiet time after which a running sandbox is frozen; 0 = never. */
  freezeAfterMs: number;
  /** Time frozen after which its memory goes to disk; 0 = never. */
  diskAfterMs: number;
}

/**
 * The most CPU a quiet sandbox may use and still count as idle: 2 % of one core over the measured
 * window (the agent's own timers, and its answer to the process list, stay far below), unless its
 * runtime says otherwise (Runtime.idleCpuShare: a microVM under TCG).
 */
const IDLE_CPU_SHARE = 0.02;

/**
 * Idle tiers below E2B's lifecycle: a running sandbox that has had no traffic, no open stream,
 * no command running in its agent and ~no CPU use for `freezeAfterMs` is frozen (cgroup
 * freezer); after `diskAfterMs` more its memory goes to disk (a checkpoint that stops it, as a
 * durable pause) and the host's resources are released. Its state stays `running` throughout;
 * the record's `idle` says which tier it is in. The next request (the router) or verb that
 * needs it live wakes it: a thaw, or a restore of the image; concurrent callers share one wake.
 * Its end of life (endAt) keeps counting, and the reaper ends or pauses it from any tier.
 *
 * The check of one sandbox runs on a timer of its own: half a window after its last activity
 * it reads its CPU time; a full window after, when nothing happened meanwhile, it reads it again
 * and asks the agent for running processes; only then, under the sandbox's lock and when still
 * quiet, it freezes. Traffic only stamps `activeAt` (no timer work on the hot path).
 */
export class IdleTiers {
  /** Freezes and moves to disk under way: close() waits for them (they record into the store). */
  private readonly moves = new Set<Promise<void>>();

  constructor(
    private readonly ctx: LifecycleContext,
    private readonly settings: IdleSettings,
  ) {}

  /** Whether a sandbox's traffic must wait for a wake (asleep, or a move to sleep under way). */
  asleep(live: LiveSandbox): boolean {
    return live.record.idle !== undefined || live.idleMoving;
  }

  /** Traffic or an API call reached the sandbox. */
  touch(sandboxId: string): void {
    const live = this.ctx.table.entry(sandboxId);
    if (live) live.activeAt = Date.now();
  }

  /** A forwarded request or stream opened: the sandbox is not idle until the returned function is called. */
  hold(sandboxId: string): () => void {
    const live = this.ctx.table.entry(sandboxId);
    if (!live) return () => undefined;
    live.openStreams++;
    live.activeAt = Date.now();
    let released = false;
    return () => {
      if (released) return;
      released = true;
      live.openStreams--;
      live.activeAt = Date.now();
    };
  }

  /** Arms the checks of sandboxes that have none and drops those of sandboxes no longer running (after any change of state). */
  sync(): void {
    if (this.ctx.closed) return;
    for (const live of this.ctx.table.entries()) {
      const { record } = live;
      if (record.state !== "running") {
        this.disarm(live);
        continue;
      }
      if (live.idleTimer || live.idleMoving) continue;
      if (!record.idle) this.armCheck(live, live.activeAt + this.halfWindowMs());
      else if (record.idle.tier === "frozen") this.armDisk(live);
    }
  }

  /** Stops every timer and waits for the moves under way. */
  async close(): Promise<void> {
    for (const live of this.ctx.table.entries()) this.disarm(live);
    await Promise.all([...this.moves]);
  }

  /**
   * Wakes an idle sandbox (no-op for an awake one), sharing the wake with concurrent callers;
   * takes the sandbox's lock. Throws when the wake failed (the sandbox stays where it was, or is
   * marked dead when the runtime lost it).
   */
  async wake(sandboxId: string): Promise<void> {
    const live = this.ctx.table.entry(sandboxId);
    if (!live || !this.asleep(live)) return;
    if (!live.waking) {
      live.waking = this.ctx.mutex
        .run(sandboxId, async () => {
          if (this.ctx.table.entry(sandboxId) === live && live.record.state === "running") await this.wakeLocked(live.record);
        })
        .finally(() => (live.waking = undefined));
    }
    return live.waking;
  }

  /** As wake(), for a caller that holds the sandbox's lock. */
  async wakeLocked(record: SandboxRecord): Promise<void> {
    const { ctx } = this;
    const live = ctx.table.entry(record.sandboxId);
    if (live) live.activeAt = Date.now();
    const idle = record.idle;
    if (!live || !idle || record.state !== "running") return;
    const started = performance.now();
    const runtimeId = runtimeIdOf(record);
    this.disarm(live);
    if (idle.tier === "frozen") {
      try {
        await ctx.ports.runtime.thaw(runtimeId);
      } catch (err) {
        const state = await ctx.ports.runtime.state(runtimeId).catch(() => "missing" as const);
        if (state === "missing" || state === "stopped") await ctx.markDead(record, `the idle sandbox was lost while frozen: ${(err as Error).message}`);
        if (state !== "running") throw CubicleError.from(err);
      }
    } else {
      const template = await ctx.templateOf(record);
      try {
        // Its own memory image: the agent holds the sandbox's token; the same machine and boot.
        await ctx.starts.run("create", () => ctx.restoreInto(record, template, idle.imageId!, record.envdAccessToken, true));
      } catch (err) {
        // The image is intact: it stays on disk, and the next request tries again.
        await ctx.ports.runtime.destroy(runtimeId).catch(() => undefined);
        await ctx.ports.network.release(runtimeId).catch(() => undefined);
        await ctx.table.update(record, { network: undefined });
        throw CubicleError.from(err);
      }
    }
    const runningMs = roundMs(performance.now() - started);
    await ctx.table.update(record, { idle: undefined, network: record.network });
    if (idle.imageId) {
      await ctx.ports.runtime.images.remove(idle.imageId, { background: true }).catch((err) => log.error("removing an idle sandbox's image failed", { imageId: idle.imageId, error: String(err) }));
    }
    live.activeAt = Date.now();
    live.cpuMark = undefined;
    live.idleDiskFailed = false;
    this.armCheck(live, live.activeAt + this.halfWindowMs());
    const ms = roundMs(performance.now() - started);
    log.info("woke an idle sandbox", { sandboxId: record.sandboxId, tier: idle.tier, ms, runningMs });
    await ctx.recordEvent(record.sandboxId, "idle-woke", { tier: idle.tier, ms, runningMs });
  }

  private halfWindowMs(): number {
    return this.settings.freezeAfterMs / 2;
  }

  private disarm(live: LiveSandbox): void {
    clearTimeout(live.idleTimer);
    live.idleTimer = undefined;
  }

  /**
   * Arms the next idleness check of an awake sandbox. Never for one asleep already: a check that
   * began before another one froze the sandbox (sync() arms a check while a decision is still
   * waiting for the agent) ends with the frozen agent not answering, and re-arming then would
   * replace the sandbox's one timer, its move to disk, with a check that does nothing for a
   * frozen sandbox: it would stay frozen in RAM for good.
   */
  private armCheck(live: LiveSandbox, atMs: number): void {
    if (this.settings.freezeAfterMs <= 0 || live.record.idle) return;
    this.arm(live, atMs, () => this.check(live));
  }

  private armDisk(live: LiveSandbox): void {
    const idle = live.record.idle;
    if (this.settings.diskAfterMs <= 0 || idle?.tier !== "frozen" || live.idleDiskFailed) return;
    this.arm(live, idle.since + this.settings.diskAfterMs, () => this.track(this.moveToDisk(live, idle.since)));
  }

  private arm(live: LiveSandbox, atMs: number, run: () => void): void {
    this.disarm(live);
    if (this.ctx.closed) return;
    live.idleTimer = setTimeout(
      () => {
        live.idleTimer = undefined;
        if (this.ctx.table.entry(live.record.sandboxId) === live && !this.ctx.closed) run();
      },
      Math.max(0, atMs - Date.now()),
    );
    live.idleTimer.unref();
  }

  private track(move: Promise<void>): void {
    const tracked = move.catch((err) => log.error("an idle tier step failed", { error: String(err) })).finally(() => this.moves.delete(tracked));
    this.moves.add(tracked);
  }

  /** One step of the idleness check of an awake running sandbox (see the class comment). */
  private check(live: LiveSandbox): void {
    const { record } = live;
    if (record.state !== "running" || record.idle || live.idleMoving || !record.network) return;
    const now = Date.now();
    const half = this.halfWindowMs();
    if (live.openStreams > 0) return this.armCheck(live, now + half);
    if (now < live.activeAt + half) return this.armCheck(live, live.activeAt + half);
    const mark = live.cpuMark;
    if (!mark || mark.atMs < live.activeAt) {
      // The first reading of this quiet spell; the decision comes at the end of the window.
      this.track(
        this.cpuTime(record).then((usec) => {
          if (usec === undefined) return this.armCheck(live, Date.now() + half);
          live.cpuMark = { atMs: now, usec };
          this.armCheck(live, Math.max(live.activeAt + this.settings.freezeAfterMs, now + half));
        }),
      );
      return;
    }
    if (now < live.activeAt + this.settings.freezeAfterMs) return this.armCheck(live, live.activeAt + this.settings.freezeAfterMs);
    this.track(this.decide(live, mark));
  }

  /** The end of a quiet window: still quiet, no CPU, no command → freeze; otherwise check again later. */
  private async decide(live: LiveSandbox, mark: { atMs: number; usec: number }): Promise<void> {
    const { ctx } = this;
    const { record } = live;
    const quietSince = live.activeAt;
    const half = this.halfWindowMs();
    const now = Date.now();
    const usec = await this.cpuTime(record);
    if (usec === undefined) return this.armCheck(live, Date.now() + half);
    const share = (await ctx.ports.runtime.idleCpuShare?.(runtimeIdOf(record)).catch(() => undefined)) ?? IDLE_CPU_SHARE;
    if (usec - mark.usec > (now - mark.atMs) * 1000 * share) {
      // Busy without traffic (a background job): measure the next half window.
      live.cpuMark = { atMs: now, usec };
      return this.armCheck(live, now + half);
    }
    const processes = await ctx.ports.agent.runningProcessCount(record.network!.sandboxAddress, record.envdAccessToken).catch((err) => {
      log.debug("cannot list an idle sandbox's processes; taking it as busy", { sandboxId: record.sandboxId, error: String(err) });
      return -1;
    });
    if (processes !== 0) {
      live.cpuMark = undefined;
      return this.armCheck(live, Date.now() + half);
    }
    await ctx.mutex.run(record.sandboxId, async () => {
      // Anything that happened meanwhile (traffic, a verb, a pause, its end) keeps it awake.
      const stillQuiet = ctx.table.entry(record.sandboxId) === live && live.activeAt === quietSince && live.openStreams === 0;
      if (!stillQuiet || record.state !== "running" || record.idle || !record.network || ctx.closed) {
        if (ctx.table.entry(record.sandboxId) === live && record.state === "running" && !record.idle) this.armCheck(live, live.activeAt + half);
        return;
      }
      live.idleMoving = true;
      try {
        await ctx.ports.runtime.freeze(runtimeIdOf(record));
        await ctx.table.update(record, { idle: { tier: "frozen", since: Date.now() } });
      } catch (err) {
        log.warn("freezing an idle sandbox failed; it stays awake", { sandboxId: record.sandboxId, error: String(err) });
        await ctx.ports.runtime.thaw(runtimeIdOf(record)).catch(() => undefined);
        live.activeAt = Date.now();
        this.armCheck(live, live.activeAt + half);
        return;
      } finally {
        live.idleMoving = false;
      }
      log.info("froze an idle sandbox", { sandboxId: record.sandboxId, quietMs: Date.now() - quietSince });
      await ctx.recordEvent(record.sandboxId, "idle-frozen", { quietMs: Date.now() - quietSince });
      this.armDisk(live);
    });
  }

  /**
   * Moves a frozen idle sandbox's memory to disk: a checkpoint that stops it (the durable pause's
   * machinery), its container and network released, its state still running. A failed dump
   * leaves it frozen (it is not tried again before it wakes), never dead unless the runtime
   * lost it.
   */
  private async moveToDisk(live: LiveSandbox, since: number): Promise<void> {
    const { ctx } = this;
    const { record } = live;
    await ctx.mutex.run(record.sandboxId, async () => {
      if (ctx.closed || ctx.table.entry(record.sandboxId) !== live || record.state !== "running" || record.idle?.tier !== "frozen" || record.idle.since !== since) return;
      const runtimeId = runtimeIdOf(record);
      const started = performance.now();
      live.idleMoving = true;
      try {
        const target = { kind: "pause" as const, name: record.sandboxId };
        // A running sandbox has no pause image of its own; one left by an earlier resume is stale.
        await ctx.ports.runtime.images.remove(imageId(target.kind, target.name));
        ctx.dropIdleSockets(record);
        let image;
        try {
          image = await ctx.ports.runtime.checkpoint(runtimeId, target, { memory: true, leaveRunning: false });
        } catch (err) {
          live.idleDiskFailed = true;
          const state = await ctx.ports.runtime.state(runtimeId).catch(() => "missing" as const);
          if (state === "running") await ctx.ports.runtime.freeze(runtimeId).catch(() => undefined);
          if (state === "missing" || state === "stopped") await ctx.markDead(record, `the idle sandbox was lost while its memory was written to disk: ${(err as Error).message}`);
          else log.warn("moving an idle sandbox to disk failed; it stays frozen in RAM", { sandboxId: record.sandboxId, error: String(err) });
          return;
        }
        // Recorded before the release: a crash midway finds it on disk (recovery.ts).
        await ctx.table.update(record, { idle: { tier: "disk", since, imageId: image.imageId } });
        await ctx.releaseHostResources(record);
      } finally {
        live.idleMoving = false;
      }
      const ms = roundMs(performance.now() - started);
      log.info("moved an idle sandbox to disk", { sandboxId: record.sandboxId, ms });
      await ctx.recordEvent(record.sandboxId, "idle-to-disk", { ms });
    });
  }

  /**
   * The sandbox's CPU time, or undefined when it cannot be told (then it is taken as busy).
   *
   * GUEST_CPU_NOTE: the runtime's count where it has one (a container's cgroup). A microVM's
   * runtime has none that means the guest: its QEMU's CPU time includes the emulator's (under TCG
   * an idle guest's QEMU takes ~10 % of a core, five times the idle share), so the agent is asked
   * for its machine's busy time, which in a microVM is the guest's own.
   */
  private async cpuTime(record: SandboxRecord): Promise<number | undefined> {
    const { runtime, agent } = this.ctx.ports;
    if (runtime.cpuTimeUsec) {
      try {
        return await runtime.cpuTimeUsec(runtimeIdOf(record));
      } catch (err) {
        if (!(err instanceof CubicleError && err.code === "unimplemented")) return undefined;
      }
    }
    if (!record.network) return undefined;
    return agent.guestCpuTimeUsec(record.network.sandboxAddress, record.envdAccessToken).catch(() => undefined);
  }
}
