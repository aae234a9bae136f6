/**
 * Property-based tests (fast-check) of the code interpreter's port (49999) against an in-process
 * server with echoing fake kernels (no code runs): fuzzed `/execute` and `/contexts` bodies,
 * paths, methods and tokens. Every answer comes within the bound, is never a 5xx nor carries a
 * stack, `/execute` never runs without the token, and a 200 is well-formed NDJSON.
 */
import assert from "node:assert/strict";
import type { AddressInfo } from "node:net";
import { after, before, describe, it } from "node:test";
import fc from "fast-check";
import { assertNoStack, fuzzRuns, rawRequest, type RawResponse } from "../fuzz-support.js";
import { ContextManager } from "./context-manager.js";
import { createInterpreterHttpServer } from "./server.js";
import type { ExecuteRequest, Kernel, OutputSink } from "./types.js";

const token = "fuzz-token";
const executed: string[] = [];

class EchoKernel implements Kernel {
  exited = false;
  constructor(readonly language: string) {}
  async start() {}
  async execute(request: ExecuteRequest, sink: OutputSink) {
    executed.push(request.code);
    sink({ type: "stdout", text: request.code.slice(0, 100), timestamp: new Date().toISOString() });
    sink({ type: "result", is_main_result: true, text: JSON.stringify(request.envVars).slice(0, 100) });
  }
  async shutdown() {
    this.exited = true;
  }
}

const contexts = new ContextManager({
  kernelFactory: (language) => new EchoKernel(language),
  getEnvVars: () => ({}),
  getDefaultUser: () => "nobody",
  getDefaultWorkdir: () => "/tmp",
  maxContexts: 32,
});
const server = createInterpreterHttpServer({ contexts, getAccessToken: () => token, keepaliveIntervalMs: 1000 });
let port = 0;

before(async () => {
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  port = (server.address() as AddressInfo).port;
});

after(async () => {
  server.closeAllConnections();
  await new Promise((resolve) => server.close(resolve));
  await contexts.close();
});

const weird: fc.Arbitrary<unknown> = fc.oneof(
  fc.jsonValue({ maxDepth: 3 }),
  fc.constantFrom("", "python", "PYTHON ", "js", "ts", "bash", "r", "java", "cobol", "__proto__", "toString", "constructor", "/tmp", "/tmp/a\0b", "~", "relative/dir", -1, 1e308, null, true, [], {}),
  fc.string({ unit: "binary", maxLength: 40 }),
  fc.nat({ max: 100_000 }).map((length) => "l".repeat(length)),
);

/** An object text that may carry `__proto__` and the request's own fields, in any type. */
function bodyText(fields: string[]): fc.Arbitrary<string> {
  const objectText = fc
    .array(fc.tuple(fc.oneof(fc.constantFrom(...fields, "__proto__", "constructor"), fc.string({ maxLength: 6 })), weird), { maxLength: 6 })
    .map((entries) => "{" + entries.map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v) ?? "null"}`).join(",") + "}");
  return fc.oneof(
    { weight: 4, arbitrary: objectText },
    { weight: 1, arbitrary: fc.jsonValue({ maxDepth: 2 }).map((value) => JSON.stringify(value) ?? "") },
    { weight: 1, arbitrary: fc.string({ maxLength: 30 }) },
  );
}

function contained(response: RawResponse, context: string): void {
  assertNoStack(response);
  assert.ok(response.status < 500, `${context}: ${response.status} ${response.body.toString().slice(0, 300)}`);
}

function timed<T>(name: string, runs: number, run: () => Promise<T>): Promise<T> {
  const started = performance.now();
  return run().finally(() => console.log(`# fuzz ${name}: ${runs} runs in ${Math.round(performance.now() - started)} ms`));
}

describe("code interpreter port (49999) under fuzzed input", () => {
  it("answers fuzzed /execute bodies and tokens: 401 without the token, else a 4xx or well-formed NDJSON", async () => {
    const runs = fuzzRuns(2);
    const input = fc.record({
      body: bodyText(["code", "context_id", "language", "env_vars"]),
      tokenHeader: fc.option(fc.constantFrom(token, token, token, "", "wrong", token.toUpperCase(), `${token}x`)),
      chunkSize: fc.integer({ min: 1, max: 50 }),
      chunked: fc.boolean(),
    });
    await timed("interpreter-execute", runs, () =>
      fc.assert(
        fc.asyncProperty(input, async ({ body, tokenHeader, chunkSize, chunked }) => {
          const before = executed.length;
          const headers: Array<[string, string]> = [["content-type", "application/json"]];
          if (tokenHeader !== null) headers.push(["x-access-token", tokenHeader]);
          const response = await rawRequest({ port, method: "POST", path: "/execute", headers, body: Buffer.from(body), chunkSize, chunked });
          contained(response, `/execute ${body.slice(0, 200)}`);
          if (tokenHeader !== token) {
            assert.equal(response.status, 401);
            assert.deepEqual(Object.keys(JSON.parse(response.body.toString())), ["code", "message"]);
            assert.equal(executed.length, before, "code ran without the token");
          } else if (response.status === 200) {
            const lines = response.body.toString().split("\n");
            assert.equal(lines.pop(), "", "the stream ends with a newline");
            const outputs = lines.map((line) => JSON.parse(line) as { type: string });
            assert.equal(outputs.at(-1)?.type, "end_of_execution");
          }
        }),
        { numRuns: runs },
      ),
    );
  });

  it("answers fuzzed /contexts calls (create, list, delete, restart, odd paths and methods) without a token, never with a 5xx", async () => {
    const runs = fuzzRuns(2);
    const input = fc.record({
      method: fc.constantFrom("GET", "POST", "POST", "DELETE", "PUT", "PATCH"),
      path: fc.oneof(
        fc.constantFrom("/contexts", "/contexts/", "/contexts//restart", "/contexts/%", "/contexts/%E0%A4%A", "/contexts/%00/restart", "/health", "/execute/x", "/", "//contexts", "/contexts?x=1"),
        fc.string({ maxLength: 20, unit: "grapheme-ascii" }).map((id) => `/contexts/${encodeURIComponent(id)}`),
        fc.string({ maxLength: 20, unit: "grapheme-ascii" }).map((id) => `/contexts/${encodeURIComponent(id)}/restart`),
        fc.constant(null).map(() => `/contexts/${contexts.list()[0]?.id ?? "none"}/restart`),
        fc.constant(null).map(() => `/contexts/${contexts.list().at(-1)?.id ?? "none"}`),
      ),
      body: bodyText(["language", "cwd"]),
      tokenHeader: fc.option(fc.constantFrom(token, "wrong")),
    });
    await timed("interpreter-contexts", runs, () =>
      fc.assert(
        fc.asyncProperty(input, async ({ method, path, body, tokenHeader }) => {
          const headers: Array<[string, string]> = [["content-type", "application/json"]];
          if (tokenHeader !== null) headers.push(["x-access-token", tokenHeader]);
          const response = await rawRequest({ port, method, path, headers, body: Buffer.from(body) });
          contained(response, `${method} ${path} ${body.slice(0, 100)}`);
          if (tokenHeader === "wrong") assert.equal(response.status, 401);
          assert.ok(contexts.list().length <= 32 + 6, "more contexts than the cap and the six per-language defaults");
        }),
        { numRuns: runs },
      ),
    );
  });
});
