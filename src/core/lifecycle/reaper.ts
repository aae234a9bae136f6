import { CubicleError } from "../../shared/cubicle-error.js";
import { log, type LifecycleContext } from "./context.js";
import type { PauseTiers } from "./pause.js";

/**
 * Ends sandboxes at their end of life (kill, or pause when their lifecycle says so) and moves hot
 * pauses to disk when their time in RAM is up, on one timer armed for the earliest due time.
 */
export class Reaper {
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly ctx: LifecycleContext,
    private readonly pauses: PauseTiers,
    private readonly verbs: { pause(sandboxId: string): Promise<void>; kill(sandboxId: string, reason: string): Promise<boolean> },
  ) {}

  schedule(): void {
    this.stop();
    if (this.ctx.closed) return;
    let next = Infinity;
    for (const record of this.ctx.table.records()) {
      if (record.state === "running" && record.endAt < next) next = record.endAt;
      next = Math.min(next, this.pauses.durableDueAt(record) ?? Infinity);
    }
    if (next === Infinity) return;
    // setTimeout overflows past 2^31-1 ms; wake up at least that often.
    const delay = Math.min(Math.max(0, next - Date.now()), 2 ** 31 - 1);
    this.timer = setTimeout(() => void this.reap(), delay);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private async reap(): Promise<void> {
    const now = Date.now();
    const records = this.ctx.table.records();
    const due = records.filter((r) => r.state === "running" && r.endAt <= now);
    const toDisk = records.filter((r) => (this.pauses.durableDueAt(r) ?? Infinity) <= now);
    await Promise.all([
      ...due.map(async (record) => {
        log.info("sandbox reached its end of life", { sandboxId: record.sandboxId, onTimeout: record.lifecycle.onTimeout });
        if (record.lifecycle.onTimeout === "pause") {
          await this.verbs.pause(record.sandboxId).catch(async (err) => {
            if (err instanceof CubicleError && err.code === "conflict") return;
            log.error("pause at timeout failed; killing", { sandboxId: record.sandboxId, error: String(err) });
            await this.verbs.kill(record.sandboxId, "timeout").catch(() => undefined);
          });
        } else {
          await this.verbs.kill(record.sandboxId, "timeout").catch((err) => log.error("reaper kill failed", { error: String(err) }));
        }
      }),
      ...toDisk.map((record) => this.pauses.makeDurable(record.sandboxId)),
    ]);
    this.schedule();
  }
}
