/**
 * Property-based tests of the router: its header and Host parsing as a unit, and the API port's
 * HTTP server (router, upgrades, clientError) fed raw requests of any shape while a stand-in
 * sandbox process answers with any bytes. The server must never throw out of a handler or leave
 * a complete request unanswered, and every error it answers itself is an E2B body.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import fc from "fast-check";
import { assertProperty, FUZZ_RUNS, isE2bErrorBody, nastyString, parseRawResponse, portText, rawRequestParts, rawRequestText, upstreamAnswer, type RawRequestParts } from "../../test/security/fuzz.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { hostPattern, parseRoute } from "./route-parsing.js";
import { apiAnswers, exchangeTimed, RESUMING_ID, SANDBOX_ID, sandboxProcess, startRouterTestServer, type RouterTestServer } from "./test-server.js";

test(`routing headers and Hosts of any shape: a route with a real port, no route, or a 400 (${FUZZ_RUNS} runs)`, async (t) => {
  const pattern = hostPattern("cubicle.test");
  const optional = (arb: fc.Arbitrary<string>) => fc.option(arb, { nil: undefined });
  const host = fc.oneof(nastyString, fc.tuple(portText, nastyString).map(([p, id]) => `${p}-${id}.cubicle.test`), fc.tuple(portText, fc.stringMatching(/^[a-z0-9]{1,8}$/)).map(([p, id]) => `${p}-${id}.cubicle.test:3000`));
  await assertProperty(
    t,
    "parseRoute",
    fc.property(optional(nastyString), optional(portText), optional(host), (id, port, hostValue) => {
      try {
        const route = parseRoute({ id, port, host: hostValue }, pattern);
        if (route) {
          assert.ok(Number.isInteger(route.port) && route.port >= 1 && route.port <= 65535, `port ${route.port}`);
          assert.ok(route.sandboxId.length > 0);
        }
      } catch (err) {
        assert.ok(err instanceof CubicleError && err.httpStatus === 400, String(err));
      }
    }),
  );
});

let server: RouterTestServer;
let sandbox: { port: number; close(): void };
let answer = "";

before(async () => {
  server = await startRouterTestServer({ resumeDelayMs: 5, liveSandboxes: [{ sandboxId: SANDBOX_ID, envdAccessToken: "token", state: "running" }] });
  sandbox = await sandboxProcess(() => answer);
});

after(async () => {
  sandbox?.close();
  await server?.close();
});

/**
 * Test traffic goes to loopback only where the test listens: every port that would be routed
 * becomes the stand-in sandbox's port (unknown ids are answered 502 before any connection).
 */
function aimedAtStandIn(parts: RawRequestParts): RawRequestParts {
  const valid = (text: string) => /^\s*\d{1,5}\s*$/.test(text) && Number(text) >= 1 && Number(text) <= 65535;
  const headers = parts.headers.map(([name, value]): [string, string] => {
    const lower = name.toLowerCase();
    if (lower === "e2b-sandbox-port" && valid(value)) return [name, String(sandbox.port)];
    const hostPort = lower === "host" ? /^(\d+)-(.*)$/.exec(value) : null;
    if (hostPort && valid(hostPort[1]!)) return [name, `${sandbox.port}-${hostPort[2]}`];
    return [name, value];
  });
  return { ...parts, headers };
}

test(`raw requests of any shape, plain and upgrades, against any sandbox answer: no crash, E2B errors (${FUZZ_RUNS} runs)`, async (t) => {
  const ids = fc.oneof({ weight: 3, arbitrary: fc.constantFrom(SANDBOX_ID, RESUMING_ID, "inosuch", SANDBOX_ID.toUpperCase()) }, { weight: 1, arbitrary: nastyString.map((s) => s.replace(/[\r\n]/g, "")) });
  await assertProperty(
    t,
    "router over TCP (in process)",
    fc.asyncProperty(rawRequestParts(ids, "cubicle.test"), upstreamAnswer, fc.boolean(), async (rawParts, upstream, halfClose) => {
      answer = upstream;
      const request = rawRequestText(aimedAtStandIn(rawParts));
      // A body shorter than its Content-Length waits for the rest: the client's EOF ends that wait.
      const { raw, timedOut } = await exchangeTimed(server.port, request, { halfClose: halfClose || rawParts.framing === "broken", timeoutMs: 3000 });
      assert.deepEqual(server.unhandled.splice(0).map(String), [], "nothing thrown that would end the server");
      assert.ok(!timedOut, `no answer and no close within 3 s for ${JSON.stringify(request.slice(0, 300))}`);
      const response = parseRawResponse(raw);
      if (!response) return; // Dropped: a reset, or a request Node could not even answer.
      const fromSandbox = /\r\nx-fake-sandbox: 1/i.test(response.headers);
      // A response to HEAD has no body (RFC 9110 §9.3.2).
      if (response.status >= 400 && !fromSandbox && rawParts.method !== "HEAD") assert.ok(isE2bErrorBody(response.body, response.status), `${response.status} without an E2B body: ${raw.slice(0, 300)}\nfor ${JSON.stringify(request.slice(0, 300))}`);
    }),
  );
  assert.ok(await apiAnswers(server.port), "the server still answers");
});
