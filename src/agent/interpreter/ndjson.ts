import type { ServerResponse } from "node:http";

/** Serialises one NDJSON line. JSON.stringify never emits a raw newline, so one object is one line. */
export function ndjsonLine(value: object): string {
  return JSON.stringify(value) + "\n";
}

export interface NdjsonStreamOptions {
  /** How often a `keepalive` line is written while nothing else is. Upstream: 5 s. */
  keepaliveIntervalMs?: number;
  /** Output held for a client that does not read, before the stream is cut. Default `maxBacklogBytes`. */
  maxBacklogBytes?: number;
}

/**
 * Kernel output is produced as fast as the code prints; a client that stops reading would make
 * the agent hold all of it. Past this much unsent output the response is cut, which interrupts
 * the execution like a client that went away (server.ts).
 */
export const maxBacklogBytes = 32 * 1024 * 1024;

/**
 * The body of a `POST /execute` answer. Writes never produce blank lines (the JS client
 * `JSON.parse`s every line, §10.1), and a `keepalive` goes out whenever the stream has been
 * quiet for the interval — which is also how a vanished client gets noticed.
 */
export class NdjsonStream {
  private readonly keepaliveTimer: NodeJS.Timeout;
  private ended = false;

  private readonly maxBacklogBytes: number;

  constructor(private readonly res: ServerResponse, options: NdjsonStreamOptions = {}) {
    this.maxBacklogBytes = options.maxBacklogBytes ?? maxBacklogBytes;
    res.writeHead(200, { "content-type": "application/x-ndjson", "cache-control": "no-store" });
    // Send the headers now: the client's requestTimeoutMs only covers the wait for them.
    res.flushHeaders();
    const interval = options.keepaliveIntervalMs ?? 5_000;
    this.keepaliveTimer = setInterval(() => this.write({ type: "keepalive" }), interval);
    this.keepaliveTimer.unref();
  }

  get closed(): boolean {
    return this.ended || this.res.destroyed;
  }

  write(value: object): void {
    if (this.closed) return;
    this.res.write(ndjsonLine(value));
    if (this.res.writableLength > this.maxBacklogBytes) {
      this.abandon();
      this.res.destroy();
    }
  }

  end(): void {
    if (this.ended) return;
    clearInterval(this.keepaliveTimer);
    if (!this.res.destroyed) this.res.end(ndjsonLine({ type: "end_of_execution" }));
    this.ended = true;
  }

  /** Stops the keepalives without writing anything more (the client is gone). */
  abandon(): void {
    clearInterval(this.keepaliveTimer);
    this.ended = true;
  }
}
