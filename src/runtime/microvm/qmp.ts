import { EventEmitter } from "node:events";
import net from "node:net";
import { CubicleError } from "../../shared/cubicle-error.js";

/** A QMP line longer than this ends the connection (QEMU's replies here are a few hundred bytes). */
const MAX_LINE_BYTES = 1 << 20;
const DEFAULT_TIMEOUT_MS = 10_000;

export interface QmpEvent {
  event: string;
  data?: unknown;
  timestamp?: { seconds: number; microseconds: number };
}

interface Pending {
  resolve: (value: unknown) => void;
  reject: (reason: Error) => void;
  timer: NodeJS.Timeout;
  command: string;
}

/**
 * A client of QEMU's machine protocol (QMP, docs/interop/qmp-spec.txt) on a unix socket: one
 * JSON object per line; the server greets, the client enters command mode with
 * `qmp_capabilities`, then each command gets a `return` or an `error` carrying the command's
 * `id`, and events (`{"event": …}`) come in between. Emits "event" (QmpEvent) and "close".
 */
export class QmpClient extends EventEmitter {
  private buffer = "";
  private sequence = 0;
  private readonly pending = new Map<string, Pending>();
  private closedError: Error | undefined;
  /** Settles when the connection ends: QEMU quit or died, or close() was called. */
  readonly closed: Promise<void>;

  private constructor(private readonly socket: net.Socket) {
    super();
    this.closed = new Promise((resolve) => socket.once("close", () => resolve()));
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.onData(chunk));
    socket.on("error", () => {});
    socket.resume();
    socket.on("close", () => {
      this.closedError ??= new CubicleError("unavailable", "QMP: QEMU closed the connection");
      for (const [id, waiter] of this.pending) {
        clearTimeout(waiter.timer);
        waiter.reject(new CubicleError("unavailable", `QMP ${waiter.command}: QEMU closed the connection`));
        this.pending.delete(id);
      }
      this.emit("close");
    });
  }

  /** Connects to `socketPath`, reads the greeting and enters command mode. */
  static async connect(socketPath: string, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<QmpClient> {
    const socket = net.connect(socketPath);
    const greeting = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => fail(new CubicleError("deadline_exceeded", `QMP ${socketPath}: no greeting within ${timeoutMs} ms`)), timeoutMs);
      let text = "";
      const onData = (chunk: Buffer) => {
        text += chunk.toString("utf8");
        if (text.length > MAX_LINE_BYTES) return fail(new CubicleError("internal", `QMP ${socketPath}: greeting too long`));
        const newline = text.indexOf("\n");
        if (newline < 0) return;
        // Paused until the client's own reader is attached, so nothing after the greeting is lost.
        socket.pause();
        socket.off("data", onData);
        clearTimeout(timer);
        try {
          const parsed = JSON.parse(text.slice(0, newline)) as { QMP?: unknown };
          if (!parsed.QMP) throw new Error("not a QMP greeting");
        } catch (err) {
          return fail(new CubicleError("internal", `QMP ${socketPath}: bad greeting: ${(err as Error).message}`));
        }
        // Anything after the greeting line belongs to the client proper.
        const rest = text.slice(newline + 1);
        if (rest) socket.unshift(Buffer.from(rest, "utf8"));
        resolve();
      };
      const fail = (err: Error) => {
        clearTimeout(timer);
        socket.destroy();
        reject(err);
      };
      socket.on("data", onData);
      socket.once("error", (err) => fail(new CubicleError("unavailable", `QMP ${socketPath}: ${err.message}`, { cause: err })));
    });
    await greeting;
    socket.removeAllListeners("error");
    const client = new QmpClient(socket);
    await client.execute("qmp_capabilities", undefined, timeoutMs);
    return client;
  }

  /** Runs a QMP command and returns its `return` value; an `error` reply throws. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<T> {
    if (this.closedError) return Promise.reject(new CubicleError("unavailable", `QMP ${command}: the connection is closed`));
    const id = `c${++this.sequence}`;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new CubicleError("deadline_exceeded", `QMP ${command}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve: resolve as (value: unknown) => void, reject, timer, command });
      this.socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + "\n");
    });
  }

  /** Closes the connection (QEMU keeps running). */
  close(): void {
    this.closedError ??= new CubicleError("unavailable", "QMP: closed");
    this.socket.destroy();
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    for (;;) {
      const newline = this.buffer.indexOf("\n");
      if (newline < 0) break;
      const line = this.buffer.slice(0, newline).trim();
      this.buffer = this.buffer.slice(newline + 1);
      if (line) this.onLine(line);
    }
    if (this.buffer.length > MAX_LINE_BYTES) {
      this.closedError = new CubicleError("internal", "QMP: a line longer than 1 MiB");
      this.socket.destroy();
    }
  }

  private onLine(line: string): void {
    let message: { id?: unknown; return?: unknown; error?: { class?: string; desc?: string }; event?: string };
    try {
      message = JSON.parse(line);
    } catch {
      return;
    }
    if (typeof message.event === "string") {
      this.emit("event", message as QmpEvent);
      return;
    }
    const waiter = typeof message.id === "string" ? this.pending.get(message.id) : undefined;
    if (!waiter) return;
    this.pending.delete(message.id as string);
    clearTimeout(waiter.timer);
    if (message.error) waiter.reject(new CubicleError("internal", `QMP ${waiter.command}: ${message.error.class ?? "Error"}: ${message.error.desc ?? "no description"}`));
    else waiter.resolve(message.return);
  }
}
