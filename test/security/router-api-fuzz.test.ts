/**
 * Property-based tests against a real server with a real sandbox: REST calls of any shape on
 * every route, and raw requests of any shape through the router (headers, Hosts, upgrades,
 * framing) towards a process in the sandbox that answers HTTP badly. Never a 5xx from the API,
 * never a hang, every error of the server's own an E2B body; afterwards the server process and
 * the sandbox live and GET /health answers 200.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import type { Sandbox } from "e2b";
import fc from "fast-check";
import { API_ROUTES } from "../../src/api/test-app.js";
import type { TestServer } from "../e2e/harness.js";
import {
  assertProperty,
  bodyText,
  createBody,
  FUZZ_RUNS,
  HOST_PATH_IN_TEXT,
  isE2bErrorBody,
  nastyString,
  otherBody,
  percentEncode,
  queryString,
  rawRequestParts,
  rawRequestText,
  type RawRequestParts,
} from "./fuzz.js";
import { assertServerSurvived, CLOSED_PORT, rawExchange, useWeirdSandbox, WEIRD_PORT } from "./sandbox-http.js";

let server: TestServer;
let sandbox: Sandbox;
useWeirdSandbox((made, madeSandbox) => {
  server = made;
  sandbox = madeSandbox;
});

async function assertServerAndSandboxLive(): Promise<void> {
  await assertServerSurvived(server);
  assert.equal((await sandbox.commands.run("echo alive")).stdout, "alive\n");
}

test(`REST calls of any shape on every route of a real server: 2xx or a 4xx E2B body, never 5xx (${FUZZ_RUNS} runs)`, async (t) => {
  // Only reads reach the live sandbox: a fuzzed timeout or kill would end it for the next runs.
  const readOnly = new Set(["GET /sandboxes/:id", "GET /sandboxes/:id/metrics"]);
  const call = fc.record({
    route: fc.constantFrom(...API_ROUTES),
    id: fc.oneof(fc.constant("LIVE"), fc.constantFrom("inosuchsandbox", "snap-" + "a".repeat(20)), nastyString),
    query: queryString,
    // Rarely a template that exists: such creates are real sandboxes, killed at once.
    body: bodyText(fc.oneof(createBody(fc.oneof({ weight: 1, arbitrary: fc.constant("base") }, { weight: 8, arbitrary: fc.constantFrom("nope", "", "BASE") })), otherBody)),
  });
  let created = 0;
  await assertProperty(
    t,
    "REST routes (real server)",
    fc.asyncProperty(call, async ({ route, id, query, body }) => {
      const live = id === "LIVE" && readOnly.has(`${route.method} ${route.path}`);
      const sandboxId = live ? sandbox.sandboxId : id === "LIVE" ? "inosuchsandbox" : id;
      const url = server.url + route.path.replace(":id", percentEncode(sandboxId)) + (query ? `?${query}` : "");
      const res = await fetch(url, {
        method: route.method,
        headers: { "x-api-key": server.apiKey, ...(route.method === "GET" ? {} : { "content-type": "application/json" }) },
        body: route.method === "GET" ? undefined : body,
        signal: AbortSignal.timeout(30_000),
      });
      const text = await res.text();
      if (res.status === 201 && route.path.endsWith("sandboxes")) {
        created++;
        await server.api("DELETE", `/sandboxes/${JSON.parse(text).sandboxID}`);
      }
      assert.ok(res.status < 500, `${route.method} ${url.slice(0, 200)} -> ${res.status} ${text.slice(0, 300)}`);
      if (res.status >= 400) {
        assert.ok(isE2bErrorBody(text, res.status), `${res.status} without an E2B body: ${text.slice(0, 300)}`);
        assert.doesNotMatch(text, HOST_PATH_IN_TEXT);
      }
    }),
  );
  t.diagnostic(`real sandboxes created (and killed) by fuzzed creates: ${created}`);
  await assertServerAndSandboxLive();
});

test(`raw requests of any shape through the router of a real server to a misbehaving sandbox process: no crash, no hang, E2B errors (${FUZZ_RUNS} runs)`, async (t) => {
  const ids = fc.oneof({ weight: 3, arbitrary: fc.constantFrom("LIVE", "inosuchsandbox") }, { weight: 1, arbitrary: nastyString.map((s) => s.replace(/[\r\n]/g, "")) });
  // Valid ports of the live sandbox go to its misbehaving server or a closed port, never to
  // its agent: fuzzing the agent is the agent's battery.
  const aim = (parts: RawRequestParts, port: number, weirdPath: string | null): RawRequestParts => {
    const valid = (text: string) => /^\s*\d{1,5}\s*$/.test(text) && Number(text) >= 1 && Number(text) <= 65535;
    const headers = parts.headers.map(([name, value]): [string, string] => {
      const resolved = value.replace("LIVE", sandbox.sandboxId);
      const lower = name.toLowerCase();
      if (lower === "e2b-sandbox-port" && valid(resolved)) return [name, String(port)];
      const hostPort = lower === "host" ? /^(\d+)-(.*)$/.exec(resolved) : null;
      if (hostPort && valid(hostPort[1]!)) return [name, `${port}-${hostPort[2]}`];
      return [name, resolved];
    });
    return { ...parts, headers, path: weirdPath ?? parts.path };
  };
  await assertProperty(
    t,
    "router over TCP (real server)",
    fc.asyncProperty(
      rawRequestParts(ids, "cubicle.test"),
      fc.constantFrom(WEIRD_PORT, WEIRD_PORT, CLOSED_PORT),
      fc.option(fc.constantFrom("/s042", "/s000", "/s101", "/garbage", "/silent"), { nil: null }),
      fc.boolean(),
      async (rawParts, port, weirdPath, halfClose) => {
        const request = rawRequestText(aim(rawParts, port, weirdPath));
        const { raw, timedOut, response } = await rawExchange(server, request, { halfClose: halfClose || rawParts.framing === "broken", timeoutMs: 5000 });
        assert.ok(!timedOut, `no answer and no close within 5 s for ${JSON.stringify(request.slice(0, 300))}`);
        if (!response) return;
        const fromSandbox = /\r\nx-weird-server: 1/i.test(response.headers);
        if (response.status >= 400 && !fromSandbox && rawParts.method !== "HEAD") {
          assert.ok(isE2bErrorBody(response.body, response.status), `${response.status} without an E2B body: ${raw.slice(0, 300)}\nfor ${JSON.stringify(request.slice(0, 300))}`);
        }
      },
    ),
  );
  await assertServerAndSandboxLive();
});
