import { readFileSync } from "node:fs";
import { CubicleError } from "../shared/cubicle-error.js";

/**
 * ADMISSION_NOTE: starting a sandbox (runc or a CRIU restore, then the agent coming up) costs
 * the host CPU, and on a 2-core machine 50 of them at once starve each other until agents miss
 * their 15 s to answer: creates failed with 503 although the host could serve every one of them
 * in turn. Starts therefore take a slot (a few per core) and wait for one in arrival order; the
 * time waiting does not count against the agent's start timeout. User creates go before
 * background starts (warm-pool refills, warm-snapshot builds). A create that cannot be served
 * is refused before any work is done: 429 with Retry-After when too many already wait, 503 with
 * Retry-After when the host is short of memory.
 */
export interface StartQueueOptions {
  /** Starts that run at once. */
  slots: number;
  /** Creates that may wait for a slot; one more is refused (429). */
  maxWaiting: number;
  /** Memory the host must keep available (MemAvailable) to start anything: below it, 503. */
  minAvailableBytes: number;
  /** Reads MemAvailable (bytes); /proc/meminfo by default. */
  availableBytes?: () => number;
}

export type StartPriority = "create" | "background";

interface Waiter {
  priority: StartPriority;
  enqueuedAt: number;
  grant: () => void;
}

/** Typical time one start holds a slot, for Retry-After (seconds, updated as starts finish). */
const INITIAL_START_SEC = 0.5;

export class StartQueue {
  private running = 0;
  private readonly waiting: Waiter[] = [];
  private averageStartSec = INITIAL_START_SEC;
  private availableAt = 0;
  private availableCache = Infinity;

  constructor(private readonly options: StartQueueOptions) {}

  /** Starts waiting and running now (tests). */
  counts(): { running: number; waiting: number; slots: number } {
    return { running: this.running, waiting: this.waiting.length, slots: this.options.slots };
  }

  /**
   * Checks, before any work, that a create can be served at all; throws the 429/503 to answer
   * with. A background start is never refused: it only waits for a slot.
   */
  private admit(priority: StartPriority): void {
    if (priority !== "create") return;
    const waitingCreates = this.waiting.filter((waiter) => waiter.priority === "create").length;
    if (waitingCreates >= this.options.maxWaiting) {
      const retryAfterSec = this.retryAfterSec(waitingCreates);
      throw new CubicleError("resource_exhausted", `${waitingCreates} sandbox creates are already waiting to start on this server; retry in ${retryAfterSec} s`, {
        details: { retryAfterSec },
      });
    }
    if (this.available() < this.options.minAvailableBytes) {
      throw new CubicleError("unavailable", `the server is short of memory to start another sandbox (less than ${Math.round(this.options.minAvailableBytes / 1024 ** 2)} MiB available); retry later or kill sandboxes you no longer need`, {
        details: { retryAfterSec: 5 },
      });
    }
  }

  /** Runs `start` in a slot, waiting for one (creates first, then background work, each in order). */
  async run<T>(priority: StartPriority, start: () => Promise<T>): Promise<T> {
    this.admit(priority);
    if (this.running >= this.options.slots || this.waiting.length > 0) {
      await new Promise<void>((grant) => {
        this.waiting.push({ priority, enqueuedAt: Date.now(), grant });
      });
    } else {
      this.running++;
    }
    const started = performance.now();
    try {
      return await start();
    } finally {
      const seconds = (performance.now() - started) / 1000;
      this.averageStartSec = this.averageStartSec * 0.9 + seconds * 0.1;
      this.running--;
      this.next();
    }
  }

  private next(): void {
    while (this.running < this.options.slots && this.waiting.length > 0) {
      const index = this.waiting.findIndex((waiter) => waiter.priority === "create");
      const [waiter] = this.waiting.splice(index >= 0 ? index : 0, 1);
      this.running++;
      waiter!.grant();
    }
  }

  private retryAfterSec(ahead: number): number {
    return Math.max(1, Math.ceil((ahead / Math.max(1, this.options.slots)) * this.averageStartSec));
  }

  private available(): number {
    const now = Date.now();
    if (now - this.availableAt > 1000) {
      this.availableAt = now;
      this.availableCache = (this.options.availableBytes ?? readMemAvailable)();
    }
    return this.availableCache;
  }
}

function readMemAvailable(): number {
  try {
    const match = /^MemAvailable:\s+(\d+) kB/m.exec(readFileSync("/proc/meminfo", "utf8"));
    return match ? Number(match[1]) * 1024 : Infinity;
  } catch {
    return Infinity;
  }
}
