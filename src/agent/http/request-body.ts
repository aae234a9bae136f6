/**
 * Request bodies held in memory (Connect unary messages, the first message of a stream, /init,
 * the interpreter's /execute): each is capped, and so is their sum over all requests of both
 * ports, so that many large requests at once cannot exhaust the agent's memory (the sandbox's
 * memory limit is the agent's too). File uploads are streamed to disk and never count here.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import { CubicleError } from "../../shared/cubicle-error.js";

/** Bytes of request bodies held at once by the whole agent. */
export const maxBufferedBodyBytes = 256 * 1024 * 1024;

let budgetBytes = maxBufferedBodyBytes;
let bufferedBytes = 0;

/** Changes the agent-wide budget (tests); returns a function that restores it. */
export function setBodyBudgetBytes(bytes: number): () => void {
  const previous = budgetBytes;
  budgetBytes = bytes;
  return () => (budgetBytes = previous);
}

/** Bytes currently held (for tests). */
export function bufferedBodyBytes(): number {
  return bufferedBytes;
}

/**
 * Reserves `bytes` of the agent-wide budget until the response `res` closes. Throws
 * resource_exhausted (429, retryable) when the budget is spent.
 */
export class BodyBudget {
  private held = 0;
  private released = false;

  constructor(res: ServerResponse) {
    res.once("close", () => this.release());
  }

  take(bytes: number): void {
    if (this.released) return;
    if (bufferedBytes + bytes > budgetBytes) {
      throw new CubicleError("resource_exhausted", "the sandbox agent is receiving too many large requests at once: retry later");
    }
    bufferedBytes += bytes;
    this.held += bytes;
  }

  release(): void {
    if (this.released) return;
    this.released = true;
    bufferedBytes -= this.held;
    this.held = 0;
  }
}

/** A body over its own limit: `details.limitBytes` tells it from a spent agent-wide budget. */
export function bodyTooLarge(limit: number): CubicleError {
  return new CubicleError("resource_exhausted", `request body is larger than ${limit} bytes`, { details: { limitBytes: limit } });
}

/** How long the rest of an abandoned body is read and thrown away before the connection is closed. */
export const abandonedBodyGraceMs = 2000;

/**
 * Stops keeping a request's body whose answer is already decided: the rest is read and thrown
 * away as it arrives, and if it has not all arrived after abandonedBodyGraceMs, the connection
 * is closed. Closing at once would make the kernel reset a socket with unread data, and the
 * client could lose the answer with it; never closing would let a peer that stops sending in
 * the middle of a body hold the connection.
 */
export function abandonBody(req: IncomingMessage): void {
  req.unpipe();
  req.removeAllListeners("data");
  // An async iterator (the multipart reader) reads through 'readable': it must let go too.
  req.removeAllListeners("readable");
  req.resume();
  if (req.complete) return;
  const socket = req.socket;
  const timer = setTimeout(() => {
    if (!req.complete) socket.destroy();
  }, abandonedBodyGraceMs);
  timer.unref();
  req.once("end", () => clearTimeout(timer));
  socket.once("close", () => clearTimeout(timer));
}

/**
 * Reads a whole request body of at most `limit` bytes. Rejects with resource_exhausted when it
 * is larger (bodyTooLarge) or the agent-wide budget is spent (after abandonBody: the caller can
 * still answer), and with canceled when the client goes away.
 */
export function readRequestBody(req: IncomingMessage, res: ServerResponse, limit: number): Promise<Buffer> {
  const budget = new BodyBudget(res);
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let settled = false;
    const fail = (error: CubicleError) => {
      if (settled) return;
      settled = true;
      budget.release();
      reject(error);
    };
    req.on("data", (chunk: Buffer) => {
      if (settled) return;
      size += chunk.length;
      try {
        if (size > limit) throw bodyTooLarge(limit);
        budget.take(chunk.length);
      } catch (error) {
        abandonBody(req);
        return fail(error as CubicleError);
      }
      chunks.push(chunk);
    });
    req.on("end", () => {
      if (settled) return;
      settled = true;
      resolve(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks));
    });
    req.on("error", (error) => fail(new CubicleError("canceled", `reading the request failed: ${error.message}`)));
    req.on("aborted", () => fail(new CubicleError("canceled", "the client aborted the request")));
  });
}
