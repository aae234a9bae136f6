import { CubicleError } from "../../shared/cubicle-error.js";
import { roundMs } from "../../shared/log.js";
import { runtimeIdOf, type SandboxRecord } from "../../store/types.js";
import { imageId } from "../../runtime/images.js";
import { log, storageFullOr, type LifecycleContext } from "./context.js";

/** How long a microVM's `sync` may take before its disk is saved anyway. */
const GUEST_SYNC_TIMEOUT_MS = 30_000;

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

  /** The id of a sandbox's pause image (one per sandbox, named by its id; the runtime's ImageStore keeps it). */
  pauseImageId(sandboxId: string): string {
    return imageId("pause", sandboxId);
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
    // Asleep for idleness (idle.ts): with memory it is paused where it sleeps (frozen: hot; on
    // disk: durable, its image becomes the pause's); a filesystem-only pause needs it awake.
    if (record.idle && !memory) await ctx.wakeLocked(record);
    const idle = record.idle;
    // Open streams would hang on a frozen agent: reset them like upstream does on pause.
    ctx.resetConnections(record.sandboxId);
    if (idle?.tier === "disk") {
      await ctx.table.transition(record, "paused", { pause: { tier: "durable", pausedAt: Date.now(), memory: true, imageId: idle.imageId }, idle: undefined });
    } else if (memory) {
      if (idle?.tier !== "frozen") await ctx.ports.runtime.freeze(runtimeIdOf(record));
      await ctx.table.transition(record, "paused", { pause: { tier: "hot", pausedAt: Date.now(), memory: true }, network: record.network, idle: undefined });
    } else {
      await this.checkpointToDisk(record, false, false);
    }
    await ctx.recordEvent(record.sandboxId, "paused", { tier: record.pause!.tier, memory, ...(idle ? { fromIdle: idle.tier } : {}) });
    if (record.pause!.tier === "hot") this.schedulePauseImage(record);
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
        if (ctx.closed || !record || record.state !== "paused" || record.pause?.tier !== "hot" || record.pause.pausedAt !== pausedAt || record.pause.imageId || live.durableFailed) return;
        const runtimeId = runtimeIdOf(record);
        const started = performance.now();
        let image;
        try {
          await ctx.ports.runtime.images.remove(this.pauseImageId(sandboxId));
          ctx.dropIdleSockets(record);
          image = await ctx.ports.runtime.checkpoint(runtimeId, { kind: "pause", name: sandboxId }, { memory: true, leaveRunning: true });
        } catch (err) {
          const state = await ctx.ports.runtime.state(runtimeId).catch(() => "missing" as const);
          // A pause must stay a pause, whatever a failed dump did to the freezer.
          if (state === "running") await ctx.ports.runtime.freeze(runtimeId).catch(() => undefined);
          if (state === "missing" || state === "stopped") await ctx.markDead(record, `the paused sandbox was lost while its image was written: ${(err as Error).message}`);
          else log.warn("writing a paused sandbox's image failed; it stays frozen in RAM only (a host reboot would lose it)", { sandboxId, error: String(err) });
          return;
        }
        await ctx.table.update(record, { pause: { ...record.pause, imageId: image.imageId } });
        await ctx.recordEvent(sandboxId, "pause-image-written", { ms: roundMs(performance.now() - started) });
      })
      .catch((err) => log.error("writing or recording a paused sandbox's image failed", { sandboxId, error: String(err) }));
  }

  /**
   * Writes a running or hot-paused sandbox to disk (durable tier): checkpoint, container gone,
   * network released. On failure the sandbox is left as it truthfully is (still frozen or running,
   * or marked dead when the runtime lost it) and the error is thrown.
   */
  /**
   * Removes a pause image that is no longer the sandbox's state, in the background (a resume
   * does not wait for a large deletion); a failure is logged, not thrown (the resume happened).
   */
  private async removeImage(id: string): Promise<void> {
    await this.ctx.ports.runtime.images.remove(id, { background: true }).catch((err) => log.error("removing a stale pause image failed", { imageId: id, error: String(err) }));
  }

  /**
   * A microVM's kernel writes its files to its disk when it likes: before its disk alone is
   * saved, `sync` runs in it (MICROVM_FILES_NOTE; a frozen guest is thawed for it, and the
   * checkpoint stops it again). A sync that fails leaves the disk as a crash would: logged.
   */
  private async syncGuest(record: SandboxRecord, frozen: boolean): Promise<void> {
    const { ctx } = this;
    if (!record.network) return;
    try {
      if (frozen) await ctx.ports.runtime.thaw(runtimeIdOf(record));
      await ctx.ports.agent.sync(record.network.sandboxAddress, record.envdAccessToken, GUEST_SYNC_TIMEOUT_MS);
    } catch (err) {
      log.warn("sync in a microVM before saving its disk failed; its disk is saved as a crash would leave it", { sandboxId: record.sandboxId, error: String(err) });
    }
  }

  private async checkpointToDisk(record: SandboxRecord, memory: boolean, wasFrozen: boolean): Promise<void> {
    const { ctx } = this;
    const runtimeId = runtimeIdOf(record);
    await ctx.ports.runtime.images.remove(this.pauseImageId(record.sandboxId));
    if (!memory && record.runtime === "microvm") await this.syncGuest(record, wasFrozen);
    let image;
    try {
      // The runtime dumps a frozen container as it is (no thaw: nothing runs between pause and dump).
      ctx.dropIdleSockets(record);
      image = await ctx.ports.runtime.checkpoint(runtimeId, { kind: "pause", name: record.sandboxId }, { memory, leaveRunning: false });
    } catch (err) {
      // A failed checkpoint leaves no image (the runtime abandons what it wrote).
      const state = await ctx.ports.runtime.state(runtimeId).catch(() => "missing" as const);
      if (state === "running" && wasFrozen) await ctx.ports.runtime.freeze(runtimeId).catch(() => undefined);
      const lost = state === "missing" || state === "stopped";
      if (lost) await ctx.markDead(record, `pause to disk failed: ${(err as Error).message}`);
      throw storageFullOr(CubicleError.from(err), record.sandboxId, lost ? "" : wasFrozen ? "; the sandbox stays paused in memory" : "; the sandbox keeps running");
    }
    // Record the image first: a crash from here on finds a durable pause, not a vanished sandbox.
    const pause = { tier: "durable" as const, pausedAt: record.pause?.pausedAt ?? Date.now(), memory, imageId: image.imageId };
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
      const pauseImage = record.pause.imageId;
      if (pauseImage) {
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
      await ctx.recordEvent(sandboxId, "paused-to-disk", { reusedPauseImage: pauseImage !== undefined });
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
      if (pause.imageId) await ctx.table.update(record, { pause: { ...pause, imageId: undefined } });
      // Reboot from the filesystem: write it to disk without memory, then restore that.
      await this.checkpointToDisk(record, false, true);
    }
    if (record.pause!.tier === "hot") {
      await ctx.ports.runtime.thaw(runtimeId);
      // Only after the thaw: were the thaw to fail, the image would still be the sandbox's state.
      // The store moves it aside at once (the next pause writes a fresh one under the same id,
      // and recovery must never mistake it for the current state) and deletes it in the background.
      if (record.pause!.imageId) await this.removeImage(record.pause!.imageId);
    } else {
      const pauseImage = record.pause!.imageId!;
      const template = await ctx.templateOf(record);
      try {
        // A memory image's agent holds the sandbox's token; a filesystem-only restore starts a fresh agent.
        // The same machine: it keeps its machine id, and its boot id unless it boots from its files.
        await ctx.starts.run("create", () => ctx.restoreInto(record, template, pauseImage, record.pause!.memory && memory ? record.envdAccessToken : undefined, true));
      } catch (err) {
        // The image is intact: stay paused (durable) so a later resume can try again.
        await ctx.ports.runtime.destroy(runtimeId).catch(() => undefined);
        await ctx.ports.network.release(runtimeId).catch(() => undefined);
        await ctx.table.update(record, { network: undefined });
        throw CubicleError.from(err);
      }
      await this.removeImage(pauseImage);
    }
    ctx.table.entry(record.sandboxId)!.durableFailed = false;
    await ctx.table.transition(record, "running", { pause: undefined, network: record.network });
    await ctx.recordEvent(record.sandboxId, "resumed", { tier: pause.tier });
  }
}
