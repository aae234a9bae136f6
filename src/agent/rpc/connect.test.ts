import assert from "node:assert/strict";
import http from "node:http";
import net from "node:net";
import type { AddressInfo } from "node:net";
import { after, before, describe, it } from "node:test";
import { CubicleError, type ErrorCode } from "../../shared/cubicle-error.js";
import { lookupUser } from "../users.js";
import { findProcedure, parseProcedurePath, parseTimeoutMs, serveProcedure } from "./connect.js";
import { EnvelopeParser, encodeEnvelope } from "../../protocol/index.js";
import { abandonedBodyGraceMs, bufferedBodyBytes, setBodyBudgetBytes } from "../http/request-body.js";
import type { RpcContext, ServiceDefinition } from "./types.js";

let lastAbortReason: unknown;
const aborted = new Set<string>();

const testService: ServiceDefinition = {
  name: "test.Echo",
  unary: {
    Echo: async (request) => ({ echoed: request }),
    Fail: async (request) => {
      throw new CubicleError((request.code as ErrorCode | undefined) ?? "not_found", "no such thing");
    },
    Crash: async () => {
      throw new Error("boom");
    },
    WhoAmI: async (_request, ctx) => ({ user: ctx.user.name }),
  },
  streams: {
    Count: async (request, _ctx, send) => {
      for (let i = 0; i < Number(request.n ?? 3); i++) send({ i });
    },
    FailAfterOne: async (_request, _ctx, send) => {
      send({ i: 0 });
      throw new CubicleError("permission_denied", "nope");
    },
    Hang: async (request, ctx: RpcContext) => {
      await new Promise<void>((resolve) =>
        ctx.signal.addEventListener("abort", () => {
          lastAbortReason = ctx.signal.reason;
          aborted.add(String(request.id));
          resolve();
        }),
      );
    },
  },
};

let server: http.Server;
let port: number;

before(async () => {
  server = http.createServer((req, res) => {
    const path = parseProcedurePath(new URL(req.url!, "http://x").pathname);
    const procedure = path && path.service === testService.name ? findProcedure(testService, path.method) : undefined;
    if (!procedure) {
      res.writeHead(404).end();
      return;
    }
    void serveProcedure(req, res, procedure, { resolveUser: () => lookupUser("root") });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  port = (server.address() as AddressInfo).port;
});

after(() => {
  server.closeAllConnections();
  server.close();
});

interface RawResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

/** Sends a request, writing the body in chunks of `chunkSize` bytes with a pause between them. */
function request(path: string, headers: Record<string, string>, body: Buffer, chunkSize = body.length || 1): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, path, method: "POST", headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks) }));
    });
    req.on("error", reject);
    void (async () => {
      for (let i = 0; i < body.length; i += chunkSize) {
        req.write(body.subarray(i, i + chunkSize));
        await new Promise((r) => setImmediate(r));
      }
      req.end();
    })();
  });
}

function unary(method: string, body: unknown, headers: Record<string, string> = {}) {
  return request(`/test.Echo/${method}`, { "content-type": "application/json", ...headers }, Buffer.from(typeof body === "string" ? body : JSON.stringify(body)));
}

function stream(method: string, message: unknown, headers: Record<string, string> = {}, chunkSize?: number) {
  return request(`/test.Echo/${method}`, { "content-type": "application/connect+json", ...headers }, encodeEnvelope(0, JSON.stringify(message)), chunkSize);
}

function envelopes(body: Buffer): Array<{ flags: number; json: any }> {
  return new EnvelopeParser().push(body).map((e) => ({ flags: e.flags, json: JSON.parse(e.data.toString()) }));
}

describe("Connect unary", () => {
  it("answers 200 application/json with the handler's message", async () => {
    const res = await unary("Echo", { a: 1 });
    assert.equal(res.status, 200);
    assert.equal(res.headers["content-type"], "application/json");
    assert.deepEqual(JSON.parse(res.body.toString()), { echoed: { a: 1 } });
  });

  it("maps errors to the HTTP status of §5.3 with a string code", async () => {
    for (const [code, status, connectCode] of [
      ["not_found", 404, "not_found"],
      ["invalid_argument", 400, "invalid_argument"],
      ["unauthenticated", 401, "unauthenticated"],
      ["deadline_exceeded", 504, "deadline_exceeded"],
      ["unavailable", 503, "unavailable"],
      ["unimplemented", 501, "unimplemented"],
    ] as const) {
      const res = await unary("Fail", { code });
      assert.equal(res.status, status, code);
      assert.deepEqual(JSON.parse(res.body.toString()), { code: connectCode, message: "no such thing" });
    }
    const crash = await unary("Crash", {});
    assert.equal(crash.status, 500);
    assert.equal(JSON.parse(crash.body.toString()).code, "internal");
  });

  it("turns malformed JSON into invalid_argument, never a crash", async () => {
    for (const body of ["{nope", "[1,2]", "42", "null"]) {
      const res = await unary("Echo", body);
      assert.equal(res.status, 400, body);
      assert.equal(JSON.parse(res.body.toString()).code, "invalid_argument");
    }
    assert.equal((await unary("Echo", "")).status, 200, "an empty body is the empty message");
  });

  it("answers 415 to a content type it does not speak", async () => {
    const res = await request("/test.Echo/Echo", { "content-type": "application/proto" }, Buffer.from([1, 2]));
    assert.equal(res.status, 415);
  });

  it("gives handlers the lazily resolved user", async () => {
    const res = await unary("WhoAmI", {});
    assert.deepEqual(JSON.parse(res.body.toString()), { user: "root" });
  });
});

describe("Connect server streams", () => {
  it("sends message envelopes then an empty end-stream envelope", async () => {
    const res = await stream("Count", { n: 3 });
    assert.equal(res.status, 200);
    assert.equal(res.headers["content-type"], "application/connect+json");
    assert.deepEqual(envelopes(res.body), [
      { flags: 0, json: { i: 0 } },
      { flags: 0, json: { i: 1 } },
      { flags: 0, json: { i: 2 } },
      { flags: 2, json: {} },
    ]);
  });

  it("reads a request envelope delivered one byte at a time", async () => {
    const res = await stream("Count", { n: 2 }, {}, 1);
    assert.deepEqual(envelopes(res.body).map((e) => e.flags), [0, 0, 2]);
  });

  it("puts errors in the end-stream envelope with HTTP 200", async () => {
    const res = await stream("FailAfterOne", {});
    assert.equal(res.status, 200);
    assert.deepEqual(envelopes(res.body), [
      { flags: 0, json: { i: 0 } },
      { flags: 2, json: { error: { code: "permission_denied", message: "nope" } } },
    ]);
  });

  it("answers a malformed request envelope with invalid_argument in the end-stream", async () => {
    const res = await request("/test.Echo/Count", { "content-type": "application/connect+json" }, Buffer.from([0, 0, 0, 0, 9, 0x7b]));
    assert.equal(res.status, 200);
    assert.deepEqual(envelopes(res.body), [{ flags: 2, json: { error: { code: "invalid_argument", message: "the request ended in the middle of an envelope" } } }]);
    const notJson = await request("/test.Echo/Count", { "content-type": "application/connect+json" }, encodeEnvelope(0, "{x"));
    assert.equal(envelopes(notJson.body)[0]!.json.error.code, "invalid_argument");
  });

  it("ends with deadline_exceeded when Connect-Timeout-Ms passes", async () => {
    const started = Date.now();
    const res = await stream("Hang", { id: "deadline" }, { "connect-timeout-ms": "200" });
    assert.ok(Date.now() - started >= 190);
    assert.deepEqual(envelopes(res.body), [{ flags: 2, json: { error: { code: "deadline_exceeded", message: "context deadline exceeded" } } }]);
    assert.ok(aborted.has("deadline"));
  });

  it("aborts the handler's signal when the client goes away", async () => {
    const req = http.request({ host: "127.0.0.1", port, path: "/test.Echo/Hang", method: "POST", headers: { "content-type": "application/connect+json" } });
    req.on("error", () => {});
    req.end(encodeEnvelope(0, JSON.stringify({ id: "disconnect" })));
    await new Promise((r) => setTimeout(r, 100));
    req.destroy();
    for (let i = 0; i < 50 && !aborted.has("disconnect"); i++) await new Promise((r) => setTimeout(r, 10));
    assert.ok(aborted.has("disconnect"));
    assert.equal((lastAbortReason as CubicleError).code, "canceled");
  });

  it("validates Connect-Timeout-Ms", () => {
    assert.equal(parseTimeoutMs(undefined), undefined);
    assert.equal(parseTimeoutMs("0"), undefined);
    assert.equal(parseTimeoutMs("60000"), 60000);
    assert.throws(() => parseTimeoutMs("-1"), (e: unknown) => e instanceof CubicleError && e.code === "invalid_argument");
    assert.throws(() => parseTimeoutMs("12345678901"));
  });
});

/**
 * Streams `totalBytes` of body after the headers until the server answers, and returns the
 * status line and body of that answer (what a client that cannot stop sending sees).
 */
function sendUntilAnswered(path: string, contentType: string, totalBytes: number, prefix: Buffer = Buffer.alloc(0)): Promise<{ status: number; body: string; sentBytes: number }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1");
    let answer = "";
    let sent = 0;
    let answered = false;
    socket.on("data", (chunk) => {
      answer += chunk.toString("latin1");
      answered = true;
    });
    socket.on("error", () => {});
    socket.on("close", () => {
      const match = /^HTTP\/1\.1 (\d{3})/.exec(answer);
      if (!match) return reject(new Error(`no answer after ${sent} bytes: the connection was cut (${JSON.stringify(answer.slice(0, 100))})`));
      resolve({ status: Number(match[1]), body: answer.slice(answer.indexOf("\r\n\r\n") + 4), sentBytes: sent });
    });
    socket.write(`POST ${path} HTTP/1.1\r\nhost: x\r\ncontent-type: ${contentType}\r\ncontent-length: ${totalBytes}\r\n\r\n`);
    socket.write(prefix);
    sent = prefix.length;
    const chunk = Buffer.alloc(256 * 1024, 0x20);
    const pump = () => {
      while (!answered && sent < totalBytes && !socket.destroyed) {
        const piece = chunk.subarray(0, Math.min(chunk.length, totalBytes - sent));
        sent += piece.length;
        if (!socket.write(piece)) return void socket.once("drain", pump);
      }
    };
    pump();
    setTimeout(() => socket.destroy(), 20_000).unref();
  });
}

describe("Connect request size", () => {
  it("answers an oversized unary body with resource_exhausted instead of cutting the connection, without holding it", async () => {
    const res = await sendUntilAnswered("/test.Echo/Echo", "application/json", 64 * 1024 * 1024, Buffer.from('{"a":"'));
    assert.equal(res.status, 429);
    assert.match(res.body, /"code":"resource_exhausted"/);
    assert.match(res.body, /larger than 33554432 bytes/);
    assert.equal(bufferedBodyBytes(), 0, "nothing of the refused body stays held");
  });

  it("closes the connection of an oversized body that stops arriving, a while after answering it", async () => {
    const socket = net.connect(port, "127.0.0.1");
    socket.on("error", () => {});
    let answer = "";
    socket.on("data", (chunk) => (answer += chunk.toString("latin1")));
    const closed = new Promise<number>((resolve) => socket.once("close", () => resolve(Date.now())));
    socket.write(`POST /test.Echo/Echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${64 * 1024 * 1024}\r\n\r\n`);
    socket.write(Buffer.alloc(33 * 1024 * 1024, 0x20)); // over the limit, then nothing more
    for (let i = 0; i < 200 && !answer.includes("resource_exhausted"); i++) await new Promise((r) => setTimeout(r, 10));
    const answeredAt = Date.now();
    assert.match(answer, /^HTTP\/1\.1 429/);
    const closedAt = await Promise.race([closed, new Promise<number>((resolve) => setTimeout(() => resolve(-1), 6000))]);
    socket.destroy();
    assert.ok(closedAt > 0, "the agent kept the connection of a body that stopped arriving");
    assert.ok(closedAt - answeredAt >= abandonedBodyGraceMs - 200, `closed ${closedAt - answeredAt} ms after the answer`);
  });

  it("answers an oversized streaming envelope in the end-stream envelope", async () => {
    const header = Buffer.from([0, 0xff, 0xff, 0xff, 0xff]);
    const res = await sendUntilAnswered("/test.Echo/Count", "application/connect+json", 1024 * 1024, header);
    assert.equal(res.status, 200);
    assert.match(res.body, /resource_exhausted/);
  });
});

describe("agent-wide request budget", () => {
  it("refuses a body that would take the agent past its budget with a retryable 429, and frees the budget when a request ends", async () => {
    const restore = setBodyBudgetBytes(1024 * 1024);
    const held = net.connect(port, "127.0.0.1");
    held.on("error", () => {});
    try {
      // 700 KB of a 900 KB body: received and held, waiting for the rest.
      held.write(`POST /test.Echo/Echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${900 * 1024}\r\n\r\n`);
      held.write(Buffer.alloc(700 * 1024, 0x20));
      for (let i = 0; i < 100 && bufferedBodyBytes() < 700 * 1024; i++) await new Promise((r) => setTimeout(r, 10));
      assert.equal(bufferedBodyBytes(), 700 * 1024);

      const refused = await sendUntilAnswered("/test.Echo/Echo", "application/json", 700 * 1024);
      assert.equal(refused.status, 429);
      assert.match(refused.body, /too many large requests at once/);

      held.destroy();
      for (let i = 0; i < 100 && bufferedBodyBytes() > 0; i++) await new Promise((r) => setTimeout(r, 10));
      assert.equal(bufferedBodyBytes(), 0);
      const body = Buffer.from(JSON.stringify({ pad: "x".repeat(700 * 1024) }));
      const accepted = await unary("Echo", body.toString());
      assert.equal(accepted.status, 200);
    } finally {
      held.destroy();
      restore();
    }
  });
});
