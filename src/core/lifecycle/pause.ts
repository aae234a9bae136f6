import { mkdir, rename, rm } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runtimeIdOf, type SandboxRecord } from "../../store/types.js";
import { newImageId } from "../ids.js";
import { log, round, storageFullOr, type LifecycleContext } from "./context.js";

export interface ResumeOptions {
  timeoutSec: number;
  /** False = discard memory: boot from the filesystem only. */
  memory?: boolean;
  /** `POST /resume` refuses a running sandbox (409); connect returns it (200). */
  requirePaused?: boolean;
}

/**
 * Pause and resume in two tiers: hot (frozen in RAM by the cgroup freezer, network kept, its
 * image written to disk in the background so a host reboot does not lose it) and durable (a
 * checkpoint on disk, no container, no network), which a hot pause becomes after
 * `durablePauseAfterMs`.
 */
export class PauseTiers {
  /** Image writes under way: close() waits for them (they record into the store). */
  private readonly imageWrites = new Set<Promise<void>>();

  constructor(private readonly ctx: LifecycleContext) {}

  /** Where pause images are (one per sandbox, named by its id). */
  get pausedDir(): string {
    return path.join(this.ctx.settings.imagesDir, "paused");
  }

  /** Where a sandbox's pause image is (or goes). */
  pauseImageDir(sandboxId: string): string {
    return path.join(this.pausedDir, sandboxId);
  }

  /** When a hot pause is due for disk; undefined when it is not in the hot tier or its move failed before. */
  durableDueAt(record: SandboxRecord): number | undefined {
    if (record.state !== "paused" || record.pause?.tier !== "hot" || this.ctx.table.entry(record.sandboxId)?.durableFailed) return undefined;
    return record.pause.pausedAt + this.ctx.settings.durablePauseAfterMs;
  }

  /**
   * Pauses a running sandbox. With memory (default) it is frozen in RAM (hot tier), its image is
   * written to disk in the background after `pauseImageAfterMs` (it stays frozen: a host reboot
   * then finds it on disk), and it leaves RAM after `durablePauseAfterMs`; without memory only
   * its filesystem is kept, on disk, now. 409 when already paused.
   */
  async pause(record: SandboxRecord, options: { memory?: boolean } = {}): Promise<void> {
    const { ctx } = this;
    if (record.state === "paused") throw new CubicleError("conflict", `sandbox "${record.sandboxId}" is already paused`);
    const memory = options.memory !== false;
    // Open streams would hang on a frozen agent: reset them like upstream does on pause.
    ctx.resetConnections(record.sandboxId);
    if (memory) {
      await ctx.ports.runtime.freeze(runtimeIdOf(record));
      await ctx.table.transition(record, "paused", { pause: { tier: "hot", pausedAt: Date.now(), memory: true }, network: record.network });
    } else {
      await this.checkpointToDisk(record, false, false);
    }
    await ctx.recordEvent(record.sandboxId, "paused", { tier: record.pause!.tier, memory });
    if (memory) this.schedulePauseImage(record);
  }

  /** Arms the background image write of a hot pause (cancelled by resume and by the sandbox's end). */
  schedulePauseImage(record: SandboxRecord): void {
    const { ctx } = this;
    const afterMs = ctx.settings.pauseImageAfterMs;
    const live = ctx.table.entry(record.sandboxId);
    if (afterMs < 0 || ctx.closed || !live) return;
    const pausedAt = record.pause!.pausedAt;
    this.cancelPauseImage(record.sandboxId);
    live.pauseImageTimer = setTimeout(
      () => {
        live.pauseImageTimer = undefined;
        const write = this.writePauseImage(record.sandboxId, pausedAt).finally(() => this.imageWrites.delete(write));
        this.imageWrites.add(write);
      },
      Math.max(0, pausedAt + afterMs - Date.now()),
    );
    live.pauseImageTimer.unref();
  }

  private cancelPauseImage(sandboxId: string): void {
    const live = this.ctx.table.entry(sandboxId);
    if (!live) return;
    clearTimeout(live.pauseImageTimer);
    live.pauseImageTimer = undefined;
  }

  /** Stops arming image writes and waits for those under way. */
  async close(): Promise<void> {
    for (const live of this.ctx.table.entries()) this.cancelPauseImage(live.record.sandboxId);
    await Promise.all([...this.imageWrites]);
  }

  /**
   * Writes a hot pause's memory and files to `paused/<id>` while the container stays frozen in
   * RAM (a dump of a frozen container leaves it frozen), and records the image in the store: a
   * host reboot, which takes the frozen processes, then leaves a durable pause for recovery, and
   * makeDurable() later needs no second dump (nothing ran since). Under the sandbox's lock, so a
   * resume that arrives meanwhile waits for it. Never throws: without an image the sandbox is
   * still paused, only not reboot-proof until makeDurable() dumps it.
   */
  private async writePauseImage(sandboxId: string, pausedAt: number): Promise<void> {
    const { ctx } = this;
    await ctx.mutex
      .run(sandboxId, async () => {
        const live = ctx.table.entry(sandboxId);
        const record = live?.record;
        // Resumed (and maybe paused again) since the timer was armed, killed, shutting down, or
        // makeDurable() got here first (a failed move to disk is not retried: see durableFailed).
        if (ctx.closed || !record || record.state !== "paused" || record.pause?.tier !== "hot" || record.pause.pausedAt !== pausedAt || record.pause.imageDir || live.durableFailed) return;
        const runtimeId = runtimeIdOf(record);
        const imageDir = this.pauseImageDir(sandboxId);
        const started = performance.now();
        try {
          await rm(imageDir, { recursive: true, force: true });
          await this.makePausedDir();
          ctx.dropIdleSockets(record);
          await ctx.ports.runtime.checkpoint(runtimeId, imageDir, { memory: true, leaveRunning: true });
        } catch (err) {
          const state = await ctx.ports.runtime.state(runtimeId).catch(() => "missing" as const);
          // A pause must stay a pause, whatever a failed dump did to the freezer.
          if (state === "running") await ctx.ports.runtime.freeze(runtimeId).catch(() => undefined);
          if (state === "missing" || state === "stopped") await ctx.markDead(record, `the paused sandbox was lost while its image was written: ${(err as Error).message}`);
          else log.warn("writing a paused sandbox's image failed; it stays frozen in RAM only (a host reboot would lose it)", { sandboxId, error: String(err) });
          return;
        }
        await ctx.table.update(record, { pause: { ...record.pause, imageDir } });
        await ctx.recordEvent(sandboxId, "pause-image-written", { ms: round(performance.now() - started) });
      })
      .catch((err) => log.error("writing or recording a paused sandbox's image failed", { sandboxId, error: String(err) }));
  }

  private async makePausedDir(): Promise<void> {
    // Search permission for others: the sandboxes' mapped root reads its image during a restore.
    await mkdir(this.pausedDir, { recursive: true, mode: 0o711 });
  }

  /**
   * Takes a resumed hot pause's image out of the way at once (a rename: the next pause writes a
   * fresh one at the same path, and recovery must never mistake it for the current state) and
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
    const { ctx } = this;
    const runtimeId = runtimeIdOf(record);
    const imageDir = this.pauseImageDir(record.sandboxId);
    await rm(imageDir, { recursive: true, force: true });
    await this.makePausedDir();
    try {
      // The runtime dumps a frozen container as it is (no thaw: nothing runs between pause and dump).
      ctx.dropIdleSockets(record);
      await ctx.ports.runtime.checkpoint(runtimeId, imageDir, { memory, leaveRunning: false });
    } catch (err) {
      await rm(imageDir, { recursive: true, force: true }).catch(() => undefined);
      const state = await ctx.ports.runtime.state(runtimeId).catch(() => "missing" as const);
      if (state === "running" && wasFrozen) await ctx.ports.runtime.freeze(runtimeId).catch(() => undefined);
      const lost = state === "missing" || state === "stopped";
      if (lost) await ctx.markDead(record, `pause to disk failed: ${(err as Error).message}`);
      throw storageFullOr(CubicleError.from(err), record.sandboxId, lost ? "" : wasFrozen ? "; the sandbox stays paused in memory" : "; the sandbox keeps running");
    }
    // Record the image first: a crash from here on finds a durable pause, not a vanished sandbox.
    const pause = { tier: "durable" as const, pausedAt: record.pause?.pausedAt ?? Date.now(), memory, imageDir };
    if (record.state === "paused") await ctx.table.update(record, { pause });
    else await ctx.table.transition(record, "paused", { pause });
    await ctx.releaseHostResources(record);
  }

  /**
   * Moves a hot-paused sandbox to disk (called by the reaper after the hot tier's time). The image
   * writePauseImage() made is reused: the sandbox stayed frozen since, so only the container and
   * the network go; without one (the write failed or is off) it is dumped now.
   */
  async makeDurable(sandboxId: string): Promise<void> {
    const { ctx } = this;
    await ctx.mutex.run(sandboxId, async () => {
      const live = ctx.table.entry(sandboxId);
      const record = live?.record;
      if (!record || record.state !== "paused" || record.pause?.tier !== "hot") return;
      this.cancelPauseImage(sandboxId);
      const imageDir = record.pause.imageDir;
      if (imageDir) {
        // Recorded before the release, as in checkpointToDisk: a crash midway finds a durable pause.
        await ctx.table.update(record, { pause: { ...record.pause, tier: "durable" } });
        await ctx.releaseHostResources(record);
      } else {
        try {
          await this.checkpointToDisk(record, true, true);
        } catch (err) {
          live.durableFailed = true;
          log.warn("moving a paused sandbox to disk failed; it stays frozen in RAM", { sandboxId, error: String(err) });
          return;
        }
      }
      await ctx.recordEvent(sandboxId, "paused-to-disk", { reusedPauseImage: imageDir !== undefined });
    });
  }

  /**
   * Resumes a paused sandbox (hot: thaw; durable: restore into a new network, re-init the agent)
   * and extends its TTL to at least `now + timeout`. Returns a running one unchanged but for the
   * TTL, unless `requirePaused` (409). The caller holds the sandbox's lock.
   */
  async resume(record: SandboxRecord, options: ResumeOptions): Promise<{ record: SandboxRecord; resumed: boolean }> {
    let resumed = false;
    if (record.state === "paused") {
      await this.resumePaused(record, options.memory !== false);
      resumed = true;
    } else if (options.requirePaused) {
      throw new CubicleError("conflict", `sandbox "${record.sandboxId}" is not paused`);
    }
    const wanted = Date.now() + options.timeoutSec * 1000;
    if (wanted > record.endAt || resumed) await this.ctx.table.update(record, { endAt: Math.max(record.endAt, wanted) });
    return { record, resumed };
  }

  private async resumePaused(record: SandboxRecord, memory: boolean): Promise<void> {
    const { ctx } = this;
    const pause = record.pause!;
    const runtimeId = runtimeIdOf(record);
    this.cancelPauseImage(record.sandboxId);
    if (pause.tier === "hot" && !memory) {
      // Replaced by a filesystem-only image at the same path: unrecorded first, so a failed
      // checkpoint below never leaves a record pointing at a deleted image.
      if (pause.imageDir) await ctx.table.update(record, { pause: { ...pause, imageDir: undefined } });
      // Reboot from the filesystem: write it to disk without memory, then restore that.
      await this.checkpointToDisk(record, false, true);
    }
    if (record.pause!.tier === "hot") {
      await ctx.ports.runtime.thaw(runtimeId);
      // Only after the thaw: were the thaw to fail, the image would still be the sandbox's state.
      if (record.pause!.imageDir) await this.discardPauseImage(record.pause!.imageDir);
    } else {
      const imageDir = record.pause!.imageDir!;
      const template = await ctx.templateOf(record);
      try {
        // A memory image's agent holds the sandbox's token; a filesystem-only restore starts a fresh agent.
        await ctx.starts.run("create", () => ctx.restoreInto(record, template, imageDir, record.pause!.memory && memory ? record.envdAccessToken : undefined));
      } catch (err) {
        // The image is intact: stay paused (durable) so a later resume can try again.
        await ctx.ports.runtime.destroy(runtimeId).catch(() => undefined);
        await ctx.ports.network.release(runtimeId).catch(() => undefined);
        await ctx.table.update(record, { network: undefined });
        throw CubicleError.from(err);
      }
      await rm(imageDir, { recursive: true, force: true }).catch(() => undefined);
    }
    ctx.table.entry(record.sandboxId)!.durableFailed = false;
    await ctx.table.transition(record, "running", { pause: undefined, network: record.network });
    await ctx.recordEvent(record.sandboxId, "resumed", { tier: pause.tier });
  }
}
