/**
 * Shared pieces of the agent's property-based tests (`*.fuzz.test.ts`, fast-check): how many runs,
 * a raw HTTP/1.1 client that sends any bytes (headers Node's own client would refuse, bodies in
 * tiny pieces) and always gives up after a bound, and the checks every answer must pass.
 */
import assert from "node:assert/strict";
import net from "node:net";

/** Runs per property (shared with the API and router fuzz targets). */
export { fuzzRuns } from "../../test/security/fuzz.js";

/** Every answer must come within this (the agent never hangs on input). */
export const answerWithinMs = 5000;

export interface RawResponse {
  status: number;
  headers: Record<string, string>;
  /** The body, de-chunked. */
  body: Buffer;
}

export interface RawRequest {
  port: number;
  method: string;
  path: string;
  /** Raw header lines, sent as they are (no validation). */
  headers?: Array<[string, string]>;
  body?: Buffer;
  /** Body bytes per write (1 = a byte at a time). */
  chunkSize?: number;
  /** Send Content-Length (default) or chunked transfer encoding. */
  chunked?: boolean;
}

/**
 * Sends one request on its own connection (`Connection: close`) and resolves with the answer,
 * or rejects when no complete answer came within answerWithinMs.
 */
export function rawRequest(request: RawRequest): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(request.port, "127.0.0.1");
    const chunks: Buffer[] = [];
    let settled = false;
    const timer = setTimeout(() => finish(new Error(`no answer to ${request.method} ${request.path.slice(0, 80)} within ${answerWithinMs} ms`)), answerWithinMs);
    const finish = (error?: Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      if (error) return reject(error);
      try {
        resolve(parseResponse(Buffer.concat(chunks)));
      } catch (reason) {
        reject(reason as Error);
      }
    };
    socket.on("data", (chunk) => chunks.push(chunk));
    socket.on("error", (error) => {
      // A reset after a complete answer (the server closed while we were still sending) is fine.
      if (chunks.length > 0) finish();
      else finish(error);
    });
    socket.on("close", () => finish());
    const body = request.body ?? Buffer.alloc(0);
    const lines = [`${request.method} ${request.path} HTTP/1.1`, "host: agent.test", "connection: close"];
    for (const [name, value] of request.headers ?? []) lines.push(`${name}: ${value}`);
    lines.push(request.chunked ? "transfer-encoding: chunked" : `content-length: ${body.length}`);
    socket.write(lines.join("\r\n") + "\r\n\r\n");
    // Tiny pieces, but never more than 256 of them (a big body in 1-byte writes takes seconds).
    const size = Math.max(1, request.chunkSize ?? (body.length || 1), Math.ceil(body.length / 256));
    void (async () => {
      for (let offset = 0; offset < body.length && !settled; offset += size) {
        const piece = body.subarray(offset, offset + size);
        socket.write(request.chunked ? Buffer.concat([Buffer.from(`${piece.length.toString(16)}\r\n`), piece, Buffer.from("\r\n")]) : piece);
        if (size < body.length) await new Promise((r) => setImmediate(r));
      }
      if (request.chunked && !settled) socket.write("0\r\n\r\n");
    })();
  });
}

function parseResponse(raw: Buffer): RawResponse {
  const headerEnd = raw.indexOf("\r\n\r\n");
  if (headerEnd < 0) throw new Error(`incomplete answer: ${JSON.stringify(raw.toString("latin1").slice(0, 200))}`);
  const [statusLine, ...headerLines] = raw.subarray(0, headerEnd).toString("latin1").split("\r\n");
  const match = /^HTTP\/1\.1 (\d{3})/.exec(statusLine ?? "");
  if (!match) throw new Error(`not an HTTP answer: ${JSON.stringify(statusLine)}`);
  const headers: Record<string, string> = {};
  for (const line of headerLines) {
    const colon = line.indexOf(":");
    headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  let body = raw.subarray(headerEnd + 4);
  if (headers["transfer-encoding"] === "chunked") {
    const pieces: Buffer[] = [];
    let offset = 0;
    for (;;) {
      const lineEnd = body.indexOf("\r\n", offset);
      if (lineEnd < 0) break;
      const size = parseInt(body.subarray(offset, lineEnd).toString("latin1"), 16);
      if (!Number.isFinite(size) || size === 0) break;
      pieces.push(body.subarray(lineEnd + 2, lineEnd + 2 + size));
      offset = lineEnd + 2 + size + 2;
    }
    body = Buffer.concat(pieces);
  }
  return { status: Number(match[1]), headers, body };
}

/** No stack trace in anything a client sees. */
export function assertNoStack(response: RawResponse): void {
  assert.doesNotMatch(response.body.toString("latin1"), /\n\s+at [\w.<>]+ \(|node:internal/, "an answer carries a stack trace");
}

/** Plain HTTP (envd's `/files`, `/init`, …): a 2xx, or a 4xx with an envd `{code, message}` body; never a 5xx. */
export function assertHttpContained(response: RawResponse, context: string, method = "GET"): void {
  assertNoStack(response);
  assert.ok(response.status < 500 || response.status === 507, `${context}: answered ${response.status} ${response.body.toString().slice(0, 300)}`);
  if (method !== "HEAD" && response.status >= 400 && response.headers["content-type"]?.startsWith("application/json")) {
    const body = JSON.parse(response.body.toString()) as { code?: unknown; message?: unknown };
    assert.equal(body.code, response.status, `${context}: body code`);
    assert.equal(typeof body.message, "string", `${context}: body message`);
  }
}

/** Connect codes that mean a fault of the agent rather than of the input. */
const faultCodes = new Set(["internal", "unknown", "data_loss"]);

/**
 * A Connect answer: a unary success or error with a string code (not a fault), or a streaming
 * answer of well-formed envelopes whose end-stream carries no fault either.
 */
export function assertConnectContained(response: RawResponse, context: string): void {
  assertNoStack(response);
  const contentType = response.headers["content-type"] ?? "";
  if (contentType.startsWith("application/connect+json")) {
    assert.equal(response.status, 200, `${context}: a stream answers 200`);
    let offset = 0;
    let end: { error?: { code?: string; message?: string } } | undefined;
    while (offset + 5 <= response.body.length) {
      const flags = response.body[offset]!;
      const length = response.body.readUInt32BE(offset + 1);
      const payload = response.body.subarray(offset + 5, offset + 5 + length);
      offset += 5 + length;
      const message = JSON.parse(payload.toString()) as { error?: { code?: string; message?: string } };
      if (flags & 2) end = message;
    }
    assert.ok(end, `${context}: no end-stream envelope in ${JSON.stringify(response.body.toString().slice(0, 200))}`);
    assert.ok(!end.error || !faultCodes.has(end.error.code ?? "unknown"), `${context}: ended with ${JSON.stringify(end.error)}`);
    return;
  }
  if (response.status === 200) return;
  if (response.status === 415 || response.status === 405 || response.status === 404) return;
  const body = JSON.parse(response.body.toString()) as { code?: unknown; message?: unknown };
  assert.equal(typeof body.code, "string", `${context}: ${response.status} ${response.body.toString().slice(0, 200)}`);
  assert.ok(!faultCodes.has(body.code as string), `${context}: ${response.status} ${response.body.toString().slice(0, 300)}`);
}
