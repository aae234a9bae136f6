/**
 * The Connect protocol with the JSON codec over node:http (e2b-wire-protocol.md §5): unary
 * calls as `application/json`, server streams as `application/connect+json` envelopes closed
 * by an end-stream envelope. Services only see decoded messages and a RpcContext.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import { promisify } from "node:util";
import zlib from "node:zlib";
import { CubicleError } from "../../shared/cubicle-error.js";
import { createLogger } from "../../shared/log.js";
import { toCubicleError } from "../errors.js";
import { abandonBody, BodyBudget, readRequestBody } from "../http/request-body.js";
import type { AgentUser } from "../users.js";
import { EnvelopeParser, encodeEnvelope, envelopeFlags } from "../../protocol/index.js";
import type { RpcContext, ServiceDefinition, StreamHandler, UnaryHandler } from "./types.js";

const log = createLogger("agent-rpc");

/** Largest request body accepted (SendInput may carry sizeable stdin chunks). */
export const maxRequestBytes = 32 * 1024 * 1024;

const unaryContentType = "application/json";
const streamContentType = "application/connect+json";

export type Procedure =
  | { kind: "unary"; handler: UnaryHandler }
  | { kind: "stream"; handler: StreamHandler };

/** Finds the handler for `/<package>.<Service>/<Method>` among the services. */
export function findProcedure(service: ServiceDefinition, method: string): Procedure | undefined {
  if (Object.prototype.hasOwnProperty.call(service.unary, method)) return { kind: "unary", handler: service.unary[method]! };
  if (Object.prototype.hasOwnProperty.call(service.streams, method)) return { kind: "stream", handler: service.streams[method]! };
  return undefined;
}

/** Splits an RPC path into service and method names, or undefined if it is not one. */
export function parseProcedurePath(pathname: string): { service: string; method: string } | undefined {
  const match = /^\/([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+)\/([A-Za-z_]\w*)$/.exec(pathname);
  if (!match) return undefined;
  return { service: match[1]!, method: match[2]! };
}

/** Parses Connect-Timeout-Ms: at most 10 digits; absent or 0 means no deadline. */
export function parseTimeoutMs(value: string | string[] | undefined): number | undefined {
  if (value === undefined) return undefined;
  const text = Array.isArray(value) ? value[0] ?? "" : value;
  if (!/^\d{1,10}$/.test(text.trim())) {
    throw new CubicleError("invalid_argument", `invalid Connect-Timeout-Ms header: "${text}"`);
  }
  const ms = Number(text.trim());
  return ms > 0 ? ms : undefined;
}

export function isStreamContentType(contentType: string | undefined): boolean {
  return mediaType(contentType) === streamContentType;
}

function mediaType(contentType: string | undefined): string {
  return (contentType ?? "").split(";")[0]!.trim().toLowerCase();
}

/** The JSON body of a Connect error: a string code and a message. */
export function connectErrorBody(error: CubicleError): { code: string; message: string } {
  return { code: error.connectCode, message: error.message };
}

/** Writes a unary Connect error: HTTP status from the code table, JSON body with a string code. */
export function writeUnaryError(res: ServerResponse, error: CubicleError): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body = JSON.stringify(connectErrorBody(error));
  res.writeHead(error.httpStatus, { "content-type": unaryContentType, "content-length": Buffer.byteLength(body) });
  res.end(body);
}

/** Answers a streaming call that failed before it started: HTTP 200, only the end-stream envelope. */
export function writeStreamError(res: ServerResponse, error: CubicleError): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  res.writeHead(200, { "content-type": streamContentType });
  res.end(encodeEnvelope(envelopeFlags.endStream, JSON.stringify({ error: connectErrorBody(error) })));
}

/** Writes an error in the form the request expects (unary or stream, by its content type). */
export function writeConnectError(req: IncomingMessage, res: ServerResponse, error: CubicleError): void {
  if (isStreamContentType(req.headers["content-type"])) writeStreamError(res, error);
  else writeUnaryError(res, error);
}

export interface CallOptions {
  /** Resolves the user lazily: only procedures that need a user pay for (or fail on) it. */
  resolveUser: () => AgentUser;
}

/**
 * Serves one Connect call. Never throws: every failure becomes a Connect error response
 * (or, once a stream has started, its end-stream envelope).
 */
export async function serveProcedure(req: IncomingMessage, res: ServerResponse, procedure: Procedure, options: CallOptions): Promise<void> {
  const streaming = procedure.kind === "stream";
  const fail = (error: unknown) => {
    const e = toCubicleError(error);
    if (streaming) writeStreamError(res, e);
    else writeUnaryError(res, e);
  };
  try {
    if (req.method !== "POST") {
      res.writeHead(405, { allow: "POST", "content-type": unaryContentType });
      res.end(JSON.stringify({ code: "unimplemented", message: `method ${req.method} is not allowed, use POST` }));
      return;
    }
    const expected = streaming ? streamContentType : unaryContentType;
    if (mediaType(req.headers["content-type"]) !== expected) {
      // Connect answers a codec it does not speak with 415 (connect protocol spec, "Unsupported Media Type").
      res.writeHead(415, { "accept-post": `${unaryContentType}, ${streamContentType}` });
      res.end();
      abandonBody(req);
      return;
    }
    const timeoutMs = parseTimeoutMs(req.headers["connect-timeout-ms"]);
    const call = new CallScope(req, res, timeoutMs);
    const ctx = call.context(options.resolveUser);
    if (procedure.kind === "unary") await runUnary(req, res, procedure.handler, ctx, call);
    else await runStream(req, res, procedure.handler, ctx, call);
  } catch (error) {
    fail(error);
  }
}

/** Owns the abort signal of one call: client disconnect → canceled, deadline → deadline_exceeded. */
class CallScope {
  readonly controller = new AbortController();
  private deadline: NodeJS.Timeout | undefined;

  constructor(
    private readonly req: IncomingMessage,
    private readonly res: ServerResponse,
    readonly timeoutMs: number | undefined,
  ) {
    const onClose = () => {
      if (!res.writableFinished) this.abort(new CubicleError("canceled", "the client closed the connection"));
      this.dispose();
    };
    res.once("close", onClose);
    if (timeoutMs !== undefined) {
      this.deadline = setTimeout(() => this.abort(new CubicleError("deadline_exceeded", "context deadline exceeded")), timeoutMs);
    }
  }

  context(resolveUser: () => AgentUser): RpcContext {
    let user: AgentUser | undefined;
    const res = this.res;
    return {
      get user(): AgentUser {
        user ??= resolveUser();
        return user;
      },
      signal: this.controller.signal,
      headers: this.req.headers,
      timeoutMs: this.timeoutMs,
      needsDrain: () => res.writableNeedDrain,
      pendingBytes: () => res.writableLength,
      waitForDrain: () =>
        new Promise<void>((resolve) => {
          if (!res.writableNeedDrain || res.destroyed) return resolve();
          const done = () => {
            res.off("drain", done);
            res.off("close", done);
            resolve();
          };
          res.on("drain", done);
          res.on("close", done);
        }),
    };
  }

  abort(reason: CubicleError): void {
    if (!this.controller.signal.aborted) this.controller.abort(reason);
    this.dispose();
  }

  dispose(): void {
    if (this.deadline) clearTimeout(this.deadline);
    this.deadline = undefined;
  }

  /** Rejects when the call is aborted, so a handler that ignores the signal cannot hold the response. */
  aborted(): Promise<never> {
    const signal = this.controller.signal;
    const aborted = new Promise<never>((_, reject) => {
      if (signal.aborted) reject(signal.reason);
      else signal.addEventListener("abort", () => reject(signal.reason), { once: true });
    });
    aborted.catch(() => {});
    return aborted;
  }
}

function decodeJsonMessage(data: Buffer): Record<string, unknown> {
  const text = data.toString("utf8").trim();
  if (text === "") return {};
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new CubicleError("invalid_argument", `cannot decode the request message as JSON: ${(error as Error).message}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new CubicleError("invalid_argument", "the request message must be a JSON object");
  }
  return value as Record<string, unknown>;
}

const gunzipAsync = promisify(zlib.gunzip);

/** Decompresses off the event loop (libuv's pool), and no further than maxRequestBytes. */
async function gunzip(data: Buffer, budget: BodyBudget): Promise<Buffer> {
  let output: Buffer;
  try {
    output = await gunzipAsync(data, { maxOutputLength: maxRequestBytes });
  } catch (error) {
    throw new CubicleError("invalid_argument", `cannot decompress the request: ${(error as Error).message}`);
  }
  budget.take(output.length);
  return output;
}

function headerValue(req: IncomingMessage, name: string): string {
  const v = req.headers[name];
  return (Array.isArray(v) ? v[0] : v ?? "").trim().toLowerCase();
}

function checkEncoding(encoding: string): "gzip" | undefined {
  if (encoding === "" || encoding === "identity") return undefined;
  if (encoding === "gzip") return "gzip";
  throw new CubicleError("unimplemented", `unknown compression "${encoding}": supported encodings are gzip, identity`);
}

async function runUnary(req: IncomingMessage, res: ServerResponse, handler: UnaryHandler, ctx: RpcContext, call: CallScope): Promise<void> {
  try {
    const encoding = checkEncoding(headerValue(req, "content-encoding"));
    let body = await Promise.race([readRequestBody(req, res, maxRequestBytes), call.aborted()]);
    if (encoding === "gzip") body = await gunzip(body, new BodyBudget(res));
    const request = decodeJsonMessage(body);
    const response = await Promise.race([handler(request, ctx), call.aborted()]);
    const text = JSON.stringify(response ?? {});
    if (res.destroyed) return;
    res.writeHead(200, { "content-type": unaryContentType, "content-length": Buffer.byteLength(text) });
    res.end(text);
  } catch (error) {
    if (!res.destroyed) writeUnaryError(res, toCubicleError(error));
  } finally {
    call.dispose();
  }
}

/** Resolves with the first message envelope of a streaming request, as soon as it is complete. */
function readFirstEnvelope(req: IncomingMessage, res: ServerResponse, compressed: boolean): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parser = new EnvelopeParser(maxRequestBytes);
    const budget = new BodyBudget(res);
    let settled = false;
    const settle = (fn: () => void) => {
      if (settled) return;
      settled = true;
      req.off("data", onData);
      fn();
      // Drain whatever follows (a client stream's later messages are not read by anyone).
      req.resume();
    };
    const onData = (chunk: Buffer) => {
      try {
        budget.take(chunk.length);
        for (const envelope of parser.push(chunk)) {
          if (envelope.flags & envelopeFlags.endStream) continue;
          if (envelope.flags & envelopeFlags.compressed) {
            if (!compressed) throw new CubicleError("invalid_argument", "received a compressed message without Connect-Content-Encoding");
            return settle(() => gunzip(envelope.data, budget).then(resolve, reject));
          }
          return settle(() => resolve(envelope.data));
        }
      } catch (error) {
        abandonBody(req);
        settle(() => reject(error));
      }
    };
    req.on("data", onData);
    req.on("end", () =>
      settle(() =>
        reject(
          new CubicleError(
            "invalid_argument",
            parser.pendingBytes > 0 ? "the request ended in the middle of an envelope" : "the streaming request carried no message",
          ),
        ),
      ),
    );
    req.on("error", (error) => settle(() => reject(new CubicleError("canceled", `reading the request failed: ${error.message}`))));
  });
}

async function runStream(req: IncomingMessage, res: ServerResponse, handler: StreamHandler, ctx: RpcContext, call: CallScope): Promise<void> {
  let ended = false;
  const writeHead = () => {
    if (!res.headersSent) res.writeHead(200, { "content-type": streamContentType });
  };
  const send = (message: unknown) => {
    if (ended || res.destroyed) return;
    writeHead();
    res.write(encodeEnvelope(0, JSON.stringify(message)));
  };
  const finish = (error?: CubicleError) => {
    if (ended) return;
    ended = true;
    if (res.destroyed) return;
    writeHead();
    res.end(encodeEnvelope(envelopeFlags.endStream, JSON.stringify(error ? { error: connectErrorBody(error) } : {})));
  };
  try {
    const compressed = checkEncoding(headerValue(req, "connect-content-encoding")) === "gzip";
    const request = decodeJsonMessage(await Promise.race([readFirstEnvelope(req, res, compressed), call.aborted()]));
    await Promise.race([handler(request, ctx, send), call.aborted()]);
    finish();
  } catch (error) {
    const e = toCubicleError(error);
    if (e.code === "internal") log.warn("stream failed", { path: req.url, error: e.message });
    finish(e);
  } finally {
    call.dispose();
  }
}
