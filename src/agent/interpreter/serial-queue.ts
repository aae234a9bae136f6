/**
 * Runs tasks one at a time in arrival order. A task whose signal is aborted while it waits
 * is dropped without running (a client that went away before its turn).
 */
export class SerialQueue {
  private tail: Promise<void> = Promise.resolve();
  private waiting = 0;
  private running = false;

  /** Number of tasks queued or running. */
  get size(): number {
    return this.waiting + (this.running ? 1 : 0);
  }

  run<T>(task: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    this.waiting++;
    const result = this.tail.then(async () => {
      this.waiting--;
      signal?.throwIfAborted();
      this.running = true;
      try {
        return await task();
      } finally {
        this.running = false;
      }
    });
    this.tail = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }
}
