/**
 * Property-based tests (fast-check) of envd's port against an in-process agent server with its
 * real process and filesystem services: Connect envelopes, the JSON message of every RPC,
 * `/init`, and `/files` query strings and multipart bodies. For any input the agent answers
 * within a bound, never with a fault (5xx, Connect `internal`), never with a stack trace, and
 * still answers afterwards.
 *
 * Safety on the test host: requests run as `nobody` (the agent's default user here; `root` is
 * never named), paths stay in a scratch directory or resolve under nobody's missing home, and a
 * fuzzed `Start` only ever runs `/bin/true` or a missing command.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import zlib from "node:zlib";
import type { AddressInfo } from "node:net";
import { after, before, describe, it } from "node:test";
import fc from "fast-check";
import { computeFileSignature } from "../protocol/index.js";
import { closeAllWatchers } from "./filesystem/index.js";
import { makeTempDir, rootUser } from "./filesystem/test-helpers.js";
import { removePath } from "./filesystem/operations.js";
import { answerWithinMs, assertConnectContained, assertHttpContained, fuzzRuns, rawRequest, type RawResponse } from "./fuzz-support.js";
import { encodeEnvelope } from "../protocol/index.js";
import { createAgentServer } from "./server.js";

const agent = createAgentServer();
let port = 0;
let workspace = "";
let fifo = "";
let socketFile = "";
let socketServer: net.Server;
const stats: string[] = [];

before(async () => {
  workspace = makeTempDir("cubicle-fuzz-");
  fs.chmodSync(workspace, 0o777);
  fs.mkdirSync(path.join(workspace, "dir"), { mode: 0o777 });
  fs.writeFileSync(path.join(workspace, "file.txt"), "hello");
  fs.chmodSync(path.join(workspace, "file.txt"), 0o666);
  fifo = path.join(workspace, "fifo");
  fs.mkdirSync(path.join(workspace, "d2"), { mode: 0o777 });
  (await import("node:child_process")).execFileSync("mkfifo", ["-m", "666", fifo]);
  socketFile = path.join(workspace, "sock");
  socketServer = net.createServer().listen(socketFile);
  fs.symlinkSync("/dev/zero", path.join(workspace, "zero-link"));
  fs.symlinkSync("loop", path.join(workspace, "loop"));
  await new Promise<void>((resolve) => agent.server.listen(0, "127.0.0.1", resolve));
  port = (agent.server.address() as AddressInfo).port;
  resetState();
});

after(async () => {
  closeAllWatchers();
  agent.server.closeAllConnections();
  agent.server.close();
  socketServer.close();
  // Not fs.rmSync: fuzzed MakeDirs nest ~2000 deep, which overflows its recursion; the agent's Remove walks iteratively.
  await removePath(rootUser, workspace);
  for (const line of stats) console.log(`# fuzz ${line}`);
});

function resetState(): void {
  agent.state.accessToken = undefined;
  agent.state.defaultUser = "nobody";
  agent.state.defaultWorkdir = undefined;
  agent.state.envVars = {};
}

/** Runs a property and records its runs and time. */
async function check<T>(name: string, arbitrary: fc.Arbitrary<T>, runs: number, predicate: (value: T) => Promise<void>): Promise<void> {
  const started = performance.now();
  await fc.assert(fc.asyncProperty(arbitrary, predicate), { numRuns: runs, endOnFailure: true });
  stats.push(`${name}: ${runs} runs in ${Math.round(performance.now() - started)} ms`);
  // Whatever came before, the agent still answers.
  const health = await rawRequest({ port, method: "GET", path: "/health" });
  assert.equal(health.status, 204);
}

// ---- arbitraries ---------------------------------------------------------------------------

/** One path segment: never "/" or "..", so a path built from them stays where it starts. */
const segment = fc
  .string({ unit: fc.oneof(fc.constantFrom("a", "b", ".", " ", "\0", "~", "é", "日", "\n", "%", "\\", ":", "*"), fc.string({ minLength: 1, maxLength: 1, unit: "binary" })), maxLength: 12 })
  .filter((text) => !text.includes("/") && !text.includes(".."));

/** Paths a sandbox user might send: inside the scratch directory, relative (nobody's home), or odd. */
const pathArb: fc.Arbitrary<string> = fc.oneof(
  fc.array(segment, { maxLength: 4 }).map((parts) => path.posix.join(workspace, ...parts)),
  segment,
  fc.constantFrom("", "~", "~/", ".", "./", "dir", "file.txt"),
  fc.constant(null).map(() => path.join(workspace, "file.txt")),
  fc.constant(null).map(() => path.join(workspace, "dir")),
  fc.constant(null).map(() => fifo),
  fc.constant(null).map(() => socketFile),
  fc.constant(null).map(() => path.join(workspace, "zero-link")),
  fc.constant(null).map(() => path.join(workspace, "loop")),
  fc.constant(null).map(() => path.join(workspace, "file.txt", "below")),
  fc.constantFrom("/dev/null", "/dev/zero", "/dev/full", "/proc/self/mem", "/etc/shadow"),
  fc.nat({ max: 6000 }).map((length) => path.join(workspace, "n".repeat(length))),
  fc.nat({ max: 3000 }).map((depth) => path.join(workspace, "d/".repeat(depth))),
);

/** Values of the wrong type, extreme numbers and strings that fields may receive. */
const weird: fc.Arbitrary<unknown> = fc.oneof(
  fc.jsonValue({ maxDepth: 3 }),
  pathArb,
  fc.constantFrom(-1, 0, 2 ** 31, 2 ** 32, 2 ** 53, -(2 ** 63), 1e308, 1.5, "NaN", "Infinity", "-1", "9".repeat(40), "__proto__", "constructor", "", "\0", "SIGNAL_SIGKILL", "FILE_TYPE_FILE"),
  fc.string({ unit: "binary", maxLength: 64 }),
  fc.nat({ max: 200_000 }).map((length) => "x".repeat(length)),
);

/** A JSON object text whose keys may be `__proto__`, `constructor` and the fields a message has. */
function messageText(fields: string[]): fc.Arbitrary<string> {
  const key = fc.oneof(fc.constantFrom(...fields, "__proto__", "constructor", "prototype", "toString"), fc.string({ maxLength: 8 }));
  const objectText = fc
    .array(fc.tuple(key, fc.oneof(weird, fc.dictionary(fc.constantFrom(...fields, "__proto__", "size", "cols", "rows", "pid", "tag", "cmd", "stdin", "pty"), weird, { maxKeys: 4 }))), { maxLength: 6 })
    .map((entries) => "{" + entries.map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v) ?? "null"}`).join(",") + "}");
  return fc.oneof({ weight: 4, arbitrary: objectText }, { weight: 1, arbitrary: fc.jsonValue({ maxDepth: 2 }).map((value) => JSON.stringify(value) ?? "null") }, { weight: 1, arbitrary: fc.string({ maxLength: 40 }) });
}

/** A fuzzed Start only runs /bin/true or something missing, whatever else the message says. */
function safeStart(text: string): string {
  let message: unknown;
  try {
    message = JSON.parse(text);
  } catch {
    return text;
  }
  if (message === null || typeof message !== "object" || Array.isArray(message)) return text;
  const processField = (message as Record<string, unknown>).process;
  if (processField !== null && typeof processField === "object" && !Array.isArray(processField)) {
    const cmd = (processField as Record<string, unknown>).cmd;
    if (typeof cmd === "string" && !["/bin/true", "/nonexistent/cmd", ""].includes(cmd)) (processField as Record<string, unknown>).cmd = "/nonexistent/cmd";
  }
  return JSON.stringify(message);
}

const procedures: Record<string, { stream: boolean; fields: string[] }> = {
  "process.Process/Start": { stream: true, fields: ["process", "pty", "tag", "stdin"] },
  "process.Process/Connect": { stream: true, fields: ["process"] },
  "process.Process/List": { stream: false, fields: [] },
  "process.Process/SendInput": { stream: false, fields: ["process", "input"] },
  "process.Process/CloseStdin": { stream: false, fields: ["process"] },
  "process.Process/SendSignal": { stream: false, fields: ["process", "signal"] },
  "process.Process/Update": { stream: false, fields: ["process", "pty"] },
  "process.Process/StreamInput": { stream: true, fields: ["start", "data"] },
  "filesystem.Filesystem/Stat": { stream: false, fields: ["path"] },
  "filesystem.Filesystem/ListDir": { stream: false, fields: ["path", "depth"] },
  "filesystem.Filesystem/MakeDir": { stream: false, fields: ["path"] },
  "filesystem.Filesystem/Move": { stream: false, fields: ["source", "destination"] },
  "filesystem.Filesystem/Remove": { stream: false, fields: ["path"] },
  "filesystem.Filesystem/WatchDir": { stream: true, fields: ["path", "recursive", "includeEntry", "allowNetworkMounts"] },
  "filesystem.Filesystem/CreateWatcher": { stream: false, fields: ["path", "recursive", "includeEntry"] },
  "filesystem.Filesystem/GetWatcherEvents": { stream: false, fields: ["watcherId"] },
  "filesystem.Filesystem/RemoveWatcher": { stream: false, fields: ["watcherId"] },
};

/** Messages shaped like the real ones (nested where the proto nests), each field fuzzed. */
const selector = fc.record({ pid: weird, tag: weird, selector: fc.constant({}) }, { requiredKeys: [] });
const structured: Record<string, fc.Arbitrary<unknown>> = {
  "process.Process/Start": fc.record(
    {
      process: fc.record(
        { cmd: fc.constantFrom("/bin/true", "/nonexistent/cmd", "", "true"), args: fc.oneof(fc.array(weird, { maxLength: 4 }), fc.array(fc.string(), { maxLength: 4 }), weird), envs: fc.oneof(fc.dictionary(fc.string({ maxLength: 8 }), fc.oneof(fc.string(), weird), { maxKeys: 3 }), weird), cwd: fc.oneof({ weight: 3, arbitrary: fc.constant(null).map(() => workspace) }, pathArb, weird) },
        { requiredKeys: ["cmd"] },
      ),
      pty: fc.oneof(fc.record({ size: fc.record({ cols: weird, rows: weird }, { requiredKeys: [] }) }, { requiredKeys: [] }), weird),
      tag: weird,
      stdin: weird,
    },
    { requiredKeys: ["process"] },
  ),
  "process.Process/SendInput": fc.record({ process: fc.oneof(selector, weird), input: fc.oneof(fc.record({ stdin: weird, pty: weird }, { requiredKeys: [] }), weird) }, { requiredKeys: [] }),
  "process.Process/SendSignal": fc.record({ process: fc.oneof(selector, weird), signal: weird }, { requiredKeys: [] }),
  "process.Process/Update": fc.record({ process: fc.oneof(selector, weird), pty: fc.oneof(fc.record({ size: fc.record({ cols: weird, rows: weird }) }), weird) }, { requiredKeys: [] }),
  "process.Process/Connect": fc.record({ process: fc.oneof(selector, weird) }, { requiredKeys: [] }),
  "filesystem.Filesystem/ListDir": fc.record({ path: fc.oneof(pathArb, weird), depth: weird }, { requiredKeys: [] }),
  "filesystem.Filesystem/Move": fc.record({ source: fc.oneof(pathArb, weird), destination: fc.oneof(pathArb, weird) }, { requiredKeys: [] }),
  "filesystem.Filesystem/WatchDir": fc.record({ path: fc.oneof(pathArb, weird), recursive: weird, includeEntry: weird, allowNetworkMounts: weird }, { requiredKeys: [] }),
};
for (const name of ["Stat", "MakeDir", "Remove", "CreateWatcher"]) structured[`filesystem.Filesystem/${name}`] = fc.record({ path: fc.oneof(pathArb, weird), recursive: weird }, { requiredKeys: [] });

const rpcCall = fc.constantFrom(...Object.keys(procedures)).chain((name) =>
  fc.record({
    name: fc.constant(name),
    text: fc
      .oneof(messageText(procedures[name]!.fields), structured[name]?.map((message) => JSON.stringify(message)) ?? messageText(procedures[name]!.fields))
      .map((text) => (name === "process.Process/Start" ? safeStart(text) : text)),
    gzip: fc.boolean(),
    chunkSize: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 17 })),
    extraHeaders: fc.array(
      fc.tuple(
        fc.constantFrom("connect-timeout-ms", "keepalive-ping-interval", "authorization", "connect-protocol-version", "x-access-token"),
        fc.oneof(fc.constantFrom("0", "1", "-1", "99999999999", "abc", "Basic bm9ib2R5Og==", "Basic cm9vdA==", "Basic !!!", "Bearer x", ""), fc.string({ maxLength: 20, unit: "grapheme-ascii" })),
      ),
      { maxLength: 3 },
    ),
  }),
);

/** The nobody user's Basic header: a fuzzed call never picks root. */
const asNobody: [string, string] = ["authorization", `Basic ${Buffer.from("nobody:").toString("base64")}`];

function sendRpc(call: { name: string; text: string; gzip: boolean; chunkSize: number; extraHeaders: Array<[string, string]> }): Promise<RawResponse> {
  const { stream } = procedures[call.name]!;
  const headers: Array<[string, string]> = call.extraHeaders
    .filter(([name, value]) => !(name === "authorization" && !value.startsWith("Basic bm9ib2R5")) && /^[\t\x20-\x7e]*$/.test(value))
    .filter(([name]) => name !== "connect-timeout-ms");
  headers.push(asNobody, ["content-type", stream ? "application/connect+json" : "application/json"], ["connect-timeout-ms", "400"]);
  let payload: Buffer = Buffer.from(call.text);
  if (call.gzip) {
    payload = zlib.gzipSync(payload);
    headers.push([stream ? "connect-content-encoding" : "content-encoding", "gzip"]);
  }
  const body = stream ? encodeEnvelope(call.gzip ? 1 : 0, payload) : payload;
  return rawRequest({ port, method: "POST", path: `/${call.name}`, headers, body, chunkSize: call.chunkSize || undefined });
}

// ---- properties ----------------------------------------------------------------------------

describe("envd port (49983) under fuzzed input", () => {
  it("answers every RPC's fuzzed JSON message (wrong types, huge values, unicode, __proto__) with a result or a Connect error", async () => {
    await check("rpc-json-messages", rpcCall, fuzzRuns(2), async (call) => {
      const response = await sendRpc(call);
      assertConnectContained(response, `${call.name} ${call.text.slice(0, 200)}`);
    });
  });

  it("answers fuzzed Connect envelopes (random flags, lengths, truncation, compression, tiny chunks) on a streaming RPC", async () => {
    const envelopeBody = fc.oneof(
      // Well-formed header around a random payload, flags at random.
      fc.record({ flags: fc.integer({ min: 0, max: 255 }), payload: fc.uint8Array({ maxLength: 64 }) }).map(({ flags, payload }) => encodeEnvelope(flags, payload)),
      // A length prefix that lies (oversized, or more than what follows).
      fc.record({ flags: fc.integer({ min: 0, max: 3 }), length: fc.oneof(fc.constant(0xffffffff), fc.integer({ min: 0, max: 1 << 26 })), payload: fc.uint8Array({ maxLength: 32 }) }).map(({ flags, length, payload }) => {
        const header = Buffer.alloc(5);
        header[0] = flags;
        header.writeUInt32BE(length, 1);
        return Buffer.concat([header, payload]);
      }),
      // A valid message cut anywhere.
      fc.nat({ max: 40 }).map((cut) => encodeEnvelope(0, JSON.stringify({ process: { pid: 999999 } })).subarray(0, cut)),
      // Compressed flag with or without a real gzip payload.
      fc.boolean().map((real) => encodeEnvelope(1, real ? zlib.gzipSync('{"process":{"pid":1}}') : Buffer.from("not gzip"))),
      // Several envelopes, end-stream first, garbage after.
      fc.array(fc.record({ flags: fc.constantFrom(0, 1, 2, 3, 0x80), text: fc.string({ maxLength: 16 }) }), { maxLength: 4 }).map((parts) => Buffer.concat(parts.map(({ flags, text }) => encodeEnvelope(flags, text)))),
      fc.uint8Array({ maxLength: 128 }).map((bytes) => Buffer.from(bytes)),
    );
    const input = fc.record({
      body: envelopeBody,
      chunkSize: fc.integer({ min: 1, max: 9 }),
      encoding: fc.constantFrom(undefined, "gzip", "identity", "br", "GZIP", ""),
      chunked: fc.boolean(),
      rpc: fc.constantFrom("process.Process/Connect", "filesystem.Filesystem/WatchDir", "process.Process/StreamInput"),
    });
    await check("connect-envelopes", input, fuzzRuns(2), async ({ body, chunkSize, encoding, chunked, rpc }) => {
      const headers: Array<[string, string]> = [asNobody, ["content-type", "application/connect+json"], ["connect-timeout-ms", "300"]];
      if (encoding !== undefined) headers.push(["connect-content-encoding", encoding]);
      // WatchDir needs a path it may watch: anything else in the message is as fuzzed.
      const response = await rawRequest({ port, method: "POST", path: `/${rpc}`, headers, body, chunkSize, chunked });
      assertConnectContained(response, `${rpc} ${body.toString("hex").slice(0, 80)}`);
    });
  });

  it("answers fuzzed unary bodies: random bytes, bad JSON, wrong and missing content types and encodings", async () => {
    const input = fc.record({
      rpc: fc.constantFrom("filesystem.Filesystem/Stat", "process.Process/List", "filesystem.Filesystem/GetWatcherEvents", "process.Process/SendSignal"),
      body: fc.oneof(fc.uint8Array({ maxLength: 256 }).map((b) => Buffer.from(b)), fc.string({ maxLength: 64 }).map((s) => Buffer.from(s)), fc.constant(zlib.gzipSync("{}"))),
      contentType: fc.constantFrom("application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "application/connect+json", "application/proto", "text/plain", ""),
      encoding: fc.constantFrom(undefined, "gzip", "identity", "deflate", "x"),
      method: fc.constantFrom("POST", "POST", "POST", "GET", "PUT", "DELETE"),
    });
    await check("connect-unary-bodies", input, fuzzRuns(1), async ({ rpc, body, contentType, encoding, method }) => {
      const headers: Array<[string, string]> = [asNobody, ["content-type", contentType]];
      if (encoding) headers.push(["content-encoding", encoding]);
      const response = await rawRequest({ port, method, path: `/${rpc}`, headers, body });
      assertConnectContained(response, `${method} ${rpc} ${contentType} ${encoding}`);
    });
  });

  it("answers fuzzed /init bodies and tokens with 204 or a 4xx, and a secured agent refuses a re-init without its token", async () => {
    const initBody = fc.oneof(
      fc.record(
        { accessToken: weird, envVars: fc.oneof(weird, fc.dictionary(fc.string({ maxLength: 10 }), weird, { maxKeys: 5 })), defaultUser: fc.constantFrom("nobody", 7, null, ""), defaultWorkdir: weird, hostname: weird, timestamp: weird },
        { requiredKeys: [] },
      ).map((value) => JSON.stringify(value)),
      messageText(["accessToken", "envVars", "defaultUser", "defaultWorkdir"]),
      fc.uint8Array({ maxLength: 64 }).map((bytes) => Buffer.from(bytes).toString("latin1")),
    );
    const input = fc.record({ body: initBody, token: fc.option(fc.string({ maxLength: 12, unit: "grapheme-ascii" })), secured: fc.boolean() });
    try {
      await check("init", input, fuzzRuns(1), async ({ body, token, secured }) => {
        resetState();
        if (secured) agent.state.accessToken = "the-real-token";
        const headers: Array<[string, string]> = [["content-type", "application/json"]];
        if (token !== null && /^[\x20-\x7e]*$/.test(token)) headers.push(["x-access-token", token]);
        const response = await rawRequest({ port, method: "POST", path: "/init", headers, body: Buffer.from(body, "latin1") });
        assertHttpContained(response, `/init ${body.slice(0, 200)}`);
        if (secured && token !== "the-real-token") assert.equal(response.status, 401, "a secured agent was re-initialised without its token");
        // Whatever the init did, the default user must stay nobody for the rest of the suite.
        resetState();
      });
    } finally {
      resetState();
    }
  });

  it("answers fuzzed /files query strings and multipart bodies with 2xx or a 4xx/507 envd error", async () => {
    const query = fc.record(
      {
        path: pathArb,
        username: fc.constantFrom("nobody", "", "ghost", "nobody\0", "%"),
        signature: fc.string({ maxLength: 50 }),
        signature_expiration: fc.oneof(fc.string({ maxLength: 12 }), fc.integer().map(String), fc.constantFrom("1".repeat(25), "-1")),
      },
      { requiredKeys: [] },
    );
    const part = fc.record({
      filename: fc.oneof(pathArb, fc.constantFrom("", '"', "a\r\nb")),
      name: fc.constantFrom("file", "file", "other", ""),
      data: fc.uint8Array({ maxLength: 200 }),
      extraHeader: fc.constantFrom("", "Content-Type: text/plain\r\n", "Content-Transfer-Encoding: base64\r\n", "X: " + "y".repeat(1000) + "\r\n"),
    });
    const multipartBody = fc.record({ parts: fc.array(part, { maxLength: 4 }), boundary: fc.constantFrom("b0undary", "x", "-".repeat(70)), cut: fc.option(fc.nat({ max: 400 })) }).map(({ parts, boundary, cut }) => {
      const pieces: Buffer[] = [];
      for (const p of parts) {
        pieces.push(Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="${p.name}"; filename="${p.filename}"\r\n${p.extraHeader}\r\n`, "utf8"), Buffer.from(p.data), Buffer.from("\r\n"));
      }
      pieces.push(Buffer.from(`--${boundary}--\r\n`));
      const body = Buffer.concat(pieces);
      return { body: cut === null ? body : body.subarray(0, cut), contentType: `multipart/form-data; boundary=${boundary}` };
    });
    const input = fc.record({
      method: fc.constantFrom("GET", "GET", "POST", "POST", "POST", "HEAD", "PUT"),
      query,
      rawQuery: fc.option(fc.string({ maxLength: 40, unit: "grapheme-ascii" }).filter((text) => !/[\s#]/.test(text))),
      upload: fc.oneof(
        multipartBody,
        fc.uint8Array({ maxLength: 300 }).map((bytes) => ({ body: Buffer.from(bytes), contentType: "application/octet-stream" })),
        fc.record({ bytes: fc.uint8Array({ maxLength: 100 }), contentType: fc.constantFrom("text/plain", "multipart/form-data", "multipart/form-data; boundary=", "") }).map(({ bytes, contentType }) => ({ body: Buffer.from(bytes), contentType })),
      ),
      gzip: fc.constantFrom(undefined, "gzip", "br"),
      acceptEncoding: fc.constantFrom(undefined, "gzip", "identity;q=0", "br, identity;q=0", "*;q=0", "gzip;q=abc"),
      metadata: fc.array(fc.tuple(fc.string({ minLength: 1, maxLength: 10, unit: "grapheme-ascii" }).filter((k) => /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(k)), fc.string({ maxLength: 30, unit: "grapheme-ascii" })), { maxLength: 3 }),
      chunkSize: fc.integer({ min: 1, max: 64 }),
    });
    await check("files", input, fuzzRuns(2), async ({ method, query: q, rawQuery, upload, gzip, acceptEncoding, metadata, chunkSize }) => {
      const search = rawQuery ?? new URLSearchParams(Object.entries(q).map(([k, v]) => [k, String(v)])).toString();
      const headers: Array<[string, string]> = [];
      let body: Buffer | undefined;
      if (method === "POST" || method === "PUT") {
        headers.push(["content-type", upload.contentType]);
        body = upload.body;
        if (gzip === "gzip") body = zlib.gzipSync(body);
        if (gzip) headers.push(["content-encoding", gzip]);
        for (const [key, value] of metadata) if (/^[\t\x20-\x7e]*$/.test(value)) headers.push([`x-metadata-${key}`, value]);
      }
      if (acceptEncoding) headers.push(["accept-encoding", acceptEncoding]);
      const response = await rawRequest({ port, method, path: `/files?${search}`, headers, body, chunkSize });
      assertHttpContained(response, `${method} /files?${search.slice(0, 200)}`, method);
    });
  });

  it("never serves /files of a secured agent without its token or a valid signature", async () => {
    const input = fc.record({
      path: pathArb,
      username: fc.constantFrom("nobody", ""),
      signature: fc.oneof(fc.string({ maxLength: 50 }), fc.constant("v1_"), fc.constant(null).map(() => computeFileSignature("/x", "read", "", "wrong-token"))),
      expiration: fc.option(fc.oneof(fc.integer().map(String), fc.string({ maxLength: 20 }))),
      method: fc.constantFrom("GET", "POST"),
      token: fc.option(fc.constantFrom("", "wrong", "the-real-token-x", "THE-REAL-TOKEN")),
    });
    agent.state.accessToken = "the-real-token";
    try {
      await check("files-auth", input, fuzzRuns(1), async ({ path: target, username, signature, expiration, method, token }) => {
        const params = new URLSearchParams({ path: target, username, signature });
        if (expiration !== null) params.set("signature_expiration", expiration);
        const headers: Array<[string, string]> = [["content-type", "application/octet-stream"]];
        if (token !== null) headers.push(["x-access-token", token]);
        const response = await rawRequest({ port, method, path: `/files?${params}`, headers, body: method === "POST" ? Buffer.from("x") : undefined });
        assertHttpContained(response, `${method} /files?${params.toString().slice(0, 200)}`);
        assert.ok(response.status === 401 || response.status === 400, `served without a token or signature: ${response.status}`);
      });
    } finally {
      resetState();
    }
  });

  it("keeps answering: a FIFO read, a Start and a health check together, within the bound", async () => {
    // The fuzzed calls above may have removed or replaced the FIFO (nobody may, in the scratch directory).
    fs.rmSync(fifo, { force: true, recursive: true });
    (await import("node:child_process")).execFileSync("mkfifo", ["-m", "666", fifo]);
    const started = Date.now();
    const [read, run, health] = await Promise.all([
      rawRequest({ port, method: "GET", path: `/files?${new URLSearchParams({ path: fifo, username: "nobody" })}` }),
      sendRpc({ name: "process.Process/Start", text: JSON.stringify({ process: { cmd: "/bin/true" } }), gzip: false, chunkSize: 0, extraHeaders: [] }),
      rawRequest({ port, method: "GET", path: "/health" }),
    ]);
    assert.equal(read.status, 400);
    assertConnectContained(run, "Start /bin/true");
    assert.equal(health.status, 204);
    assert.ok(Date.now() - started < answerWithinMs);
  });
});
