import http, { type IncomingMessage, type ServerResponse } from "node:http";
import { CubicleError } from "../../shared/cubicle-error.js";
import { createLogger } from "../../shared/log.js";
import { constantTimeEquals } from "../../shared/compare.js";
import { headerString } from "../../shared/headers.js";
import { accessTokenHeader, unauthorizedMessage } from "../auth.js";
import { toCubicleError } from "../errors.js";
import { abandonBody, readRequestBody } from "../http/request-body.js";
import type { ContextManager } from "./context-manager.js";
import { KEEP_IDLE_CONNECTIONS } from "../http/keep-alive.js";
import { NdjsonStream } from "./ndjson.js";

const log = createLogger("interpreter");

/** `/execute` carries the code (and per-call env vars). */
const MAX_EXECUTE_BODY_BYTES = 64 * 1024 * 1024;
/** `/contexts` carries a language and a cwd: anyone may call it (see `requiresToken`), so little. */
const MAX_CONTEXTS_BODY_BYTES = 64 * 1024;

class HttpFailure extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

export interface InterpreterHttpOptions {
  contexts: ContextManager;
  keepaliveIntervalMs?: number;
  /** See NdjsonStreamOptions. */
  maxBacklogBytes?: number;
  /** The envd access token of the sandbox (AgentState.accessToken), read on every request. */
  getAccessToken?: () => string | undefined;
}

/**
 * Which requests need the access token when the sandbox has one. Everything that runs code or
 * reaches a kernel's output does (`POST /execute`, and any path not listed here). Left open:
 * `GET /health` (the template's ready check) and the `/contexts` calls, because the JS SDK
 * (`@e2b/code-interpreter` 2.8) sends no `X-Access-Token` there (e2b-wire-protocol.md §2.4):
 * listing, creating (capped), restarting and deleting contexts. None of them runs code or shows
 * a kernel's output; a wrong token is refused even there.
 */
function requiresToken(method: string, segments: string[]): boolean {
  if (segments.length === 1 && segments[0] === "health" && method === "GET") return false;
  if (segments[0] === "contexts") return false;
  return true;
}

/**
 * The HTTP face of the code interpreter (e2b-wire-protocol.md §10): `/health`, `/execute`
 * (NDJSON) and `/contexts`. Errors are plain text, as the upstream server sends them and as the
 * SDK prints them (`<status> <statusText>: <body>`).
 */
export function createInterpreterHttpServer(options: InterpreterHttpOptions): http.Server {
  const { contexts } = options;

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? "/", "http://interpreter");
    const rawSegments = url.pathname.split("/").filter(Boolean);
    const method = req.method ?? "GET";

    // Before the body is read, and before anything else is looked at: a caller without the
    // token makes the agent hold nothing and learns nothing.
    const token = options.getAccessToken?.();
    if (token !== undefined) {
      const presented = headerString(req.headers, accessTokenHeader);
      if (presented !== undefined ? !constantTimeEquals(token, presented) : requiresToken(method, rawSegments)) {
        abandonBody(req);
        return sendJson(res, 401, { code: 401, message: unauthorizedMessage });
      }
    }

    let segments: string[];
    try {
      segments = rawSegments.map(decodeURIComponent);
    } catch {
      throw new HttpFailure(400, `malformed percent-encoding in ${url.pathname}`);
    }

    if (segments.length === 1 && segments[0] === "health" && method === "GET") {
      return sendJson(res, 200, "OK");
    }
    if (segments.length === 1 && segments[0] === "execute" && method === "POST") {
      return execute(req, res);
    }
    if (segments[0] === "contexts") {
      if (segments.length === 1 && method === "GET") return sendJson(res, 200, contexts.list());
      if (segments.length === 1 && method === "POST") {
        const body = jsonObject(await readJsonBody(req, res, MAX_CONTEXTS_BODY_BYTES));
        const context = contexts.create({ language: optionalString(body, "language"), cwd: optionalString(body, "cwd") });
        return sendJson(res, 200, context.info);
      }
      const id = segments[1]!;
      if (segments.length === 2 && method === "DELETE") {
        if (!(await contexts.delete(id))) throw new HttpFailure(404, `Context ${id} not found`);
        return sendEmpty(res);
      }
      if (segments.length === 3 && segments[2] === "restart" && method === "POST") {
        const context = contexts.get(id);
        if (!context) throw new HttpFailure(404, `Context ${id} not found`);
        await context.restart();
        return sendEmpty(res);
      }
    }
    throw new HttpFailure(404, `${method} ${url.pathname} not found`);
  }

  async function execute(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const body = jsonObject(await readJsonBody(req, res, MAX_EXECUTE_BODY_BYTES));
    const code = body.code;
    if (typeof code !== "string") throw new HttpFailure(400, "code must be a string");
    const contextId = optionalString(body, "context_id");
    const language = optionalString(body, "language");
    if (contextId && language) throw new HttpFailure(400, "Only one of context_id or language can be provided, not both");
    const context = contextId ? contexts.get(contextId) : contexts.defaultContext(language);
    if (!context) throw new HttpFailure(404, `Context ${contextId} not found`);
    const envVars = stringRecord(body.env_vars);

    const stream = new NdjsonStream(res, { keepaliveIntervalMs: options.keepaliveIntervalMs, maxBacklogBytes: options.maxBacklogBytes });
    const abort = new AbortController();
    // The client went away (its timeoutMs, or a crash): interrupt the kernel so the context is free again (§10.1).
    res.on("close", () => {
      if (!res.writableFinished) {
        stream.abandon();
        abort.abort();
      }
    });
    try {
      await context.execute({ code, envVars }, (output) => stream.write(output), abort.signal);
    } catch (error) {
      if (!abort.signal.aborted) {
        log.error("execution failed", { context: context.id, reason: (error as Error).message });
        stream.write({ type: "error", name: "ExecutionError", value: (error as Error).message, traceback: "" });
      }
    } finally {
      stream.end();
    }
  }

  return http.createServer({ keepAliveTimeout: KEEP_IDLE_CONNECTIONS }, (req, res) => {
    handle(req, res).catch((error: unknown) => {
      const failure = asHttpFailure(error);
      if (failure.status >= 500) log.error("interpreter request failed", { url: req.url, reason: failure.message });
      if (res.headersSent) {
        res.destroy();
        return;
      }
      res.writeHead(failure.status, { "content-type": "text/plain; charset=utf-8" });
      res.end(failure.message);
    });
  });
}

/** What a handler threw, as the status and message to answer with. */
function asHttpFailure(error: unknown): HttpFailure {
  if (error instanceof HttpFailure) return error;
  const cubicleError = toCubicleError(error);
  return new HttpFailure(cubicleError.httpStatus, cubicleError.message);
}

async function readJsonBody(req: IncomingMessage, res: ServerResponse, limit: number): Promise<unknown> {
  let body: Buffer;
  try {
    body = await readRequestBody(req, res, limit);
  } catch (error) {
    if (error instanceof CubicleError && error.details?.limitBytes !== undefined) throw new HttpFailure(413, `request body larger than ${limit} bytes`);
    throw error;
  }
  const text = body.toString("utf8").trim();
  if (!text) return {};
  try {
    return JSON.parse(text);
  } catch {
    throw new HttpFailure(400, "request body must be JSON");
  }
}

/** The request body as a JSON object (an empty body is `{}`). */
function jsonObject(body: unknown): Record<string, unknown> {
  if (typeof body !== "object" || body === null || Array.isArray(body)) throw new HttpFailure(400, "the request body must be a JSON object");
  return body as Record<string, unknown>;
}

function optionalString(body: unknown, key: string): string | undefined {
  if (typeof body !== "object" || body === null) return undefined;
  const value = (body as Record<string, unknown>)[key];
  if (value === undefined || value === null || value === "") return undefined;
  if (typeof value !== "string") throw new HttpFailure(400, `${key} must be a string`);
  return value;
}

function stringRecord(value: unknown): Record<string, string> {
  if (typeof value !== "object" || value === null) return {};
  const record: Record<string, string> = {};
  for (const [key, entry] of Object.entries(value)) {
    if (entry !== undefined && entry !== null) record[key] = String(entry);
  }
  return record;
}

function sendJson(res: ServerResponse, status: number, value: unknown): void {
  const body = JSON.stringify(value);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

function sendEmpty(res: ServerResponse): void {
  res.writeHead(204);
  res.end();
}
