import http, { type IncomingMessage, type ServerResponse } from "node:http";
import { createLogger } from "../../shared/log.js";
import type { ContextManager } from "./context-manager.js";
import { KEEP_IDLE_CONNECTIONS } from "../http/keep-alive.js";
import { NdjsonStream } from "./ndjson.js";

const log = createLogger("interpreter");

const MAX_BODY_BYTES = 64 * 1024 * 1024;

class HttpFailure extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

export interface InterpreterHttpOptions {
  contexts: ContextManager;
  keepaliveIntervalMs?: number;
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
    const segments = url.pathname.split("/").filter(Boolean).map(decodeURIComponent);
    const method = req.method ?? "GET";

    if (segments.length === 1 && segments[0] === "health" && method === "GET") {
      return sendJson(res, 200, "OK");
    }
    if (segments.length === 1 && segments[0] === "execute" && method === "POST") {
      return execute(req, res);
    }
    if (segments[0] === "contexts") {
      if (segments.length === 1 && method === "GET") return sendJson(res, 200, contexts.list());
      if (segments.length === 1 && method === "POST") {
        const body = await readJsonBody(req);
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
    const body = await readJsonBody(req);
    if (typeof body !== "object" || body === null || typeof (body as Record<string, unknown>).code !== "string") {
      throw new HttpFailure(400, "code must be a string");
    }
    const code = (body as { code: string }).code;
    const contextId = optionalString(body, "context_id");
    const language = optionalString(body, "language");
    if (contextId && language) throw new HttpFailure(400, "Only one of context_id or language can be provided, not both");
    const context = contextId ? contexts.get(contextId) : contexts.defaultContext(language);
    if (!context) throw new HttpFailure(404, `Context ${contextId} not found`);
    const envVars = stringRecord((body as Record<string, unknown>).env_vars);

    const stream = new NdjsonStream(res, { keepaliveIntervalMs: options.keepaliveIntervalMs });
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
      const failure = error instanceof HttpFailure ? error : new HttpFailure(500, (error as Error).message ?? String(error));
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

async function readJsonBody(req: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY_BYTES) throw new HttpFailure(413, "request body too large");
    chunks.push(chunk as Buffer);
  }
  const text = Buffer.concat(chunks).toString("utf8").trim();
  if (!text) return {};
  try {
    return JSON.parse(text);
  } catch {
    throw new HttpFailure(400, "request body must be JSON");
  }
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
