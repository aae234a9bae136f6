/**
 * Property-based tests of the REST API in process (fastify's inject, a stand-in manager): every
 * route, with bodies and query strings of any shape, answers a 2xx or a 4xx with an E2B body —
 * never a 5xx, never a host path — and the parsers only ever throw 400 CubicleErrors.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import fc from "fast-check";
import type { FastifyInstance } from "fastify";
import { assertProperty, bodyText, createBody, FUZZ_RUNS, HOST_PATH_IN_TEXT, nastyJson, nastyString, otherBody, percentEncode, queryString } from "../../test/security/fuzz.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { decodeCursor, parseCreateRequest, parseLimit, parseMetadataFilter, parseStartedAfter, parseStates, type CreateParsingOptions } from "./request-parsing.js";
import { API_ROUTES, fakeManager, TEST_KEY, testApp } from "./test-app.js";

let app: FastifyInstance;
let manager: ReturnType<typeof fakeManager>;
let existingId: string;

before(async () => {
  manager = fakeManager();
  app = await testApp({ manager });
  existingId = (await manager.create({ templateId: "base", timeoutSec: 60, secure: true, allowInternetAccess: true, metadata: {}, envVars: {}, autoPause: false, autoResume: false, networkConfig: undefined })).sandboxId;
});

after(() => app.close());

const options: CreateParsingOptions = { defaultTimeoutSec: 300, limits: { maxCpuCount: 2, maxMemoryMB: 4096, maxDiskMB: 65536 }, requireSecure: true };

/** Runs `parse` and accepts a result or a 400 CubicleError; anything else fails the property. */
function resultOrBadRequest(parse: () => unknown): void {
  try {
    parse();
  } catch (err) {
    if (!(err instanceof CubicleError) || err.httpStatus !== 400) throw new Error(`not a 400 CubicleError: ${String(err)}`);
  }
}

test(`create bodies of any shape parse to a request or a 400 (${FUZZ_RUNS} runs, v1 and v2)`, async (t) => {
  const bodies = fc.oneof(createBody(fc.constantFrom("base", "nope")), nastyJson);
  await assertProperty(
    t,
    "parseCreateRequest",
    fc.property(bodies, fc.constantFrom(1 as const, 2 as const), (body, version) => {
      resultOrBadRequest(() => {
        const request = parseCreateRequest(body, version, options);
        // What passes is within bounds.
        for (const [value, max] of [[request.cpuCount, 2], [request.memoryMB, 4096], [request.diskSizeMB, 65536]] as const) {
          if (value !== undefined) assert.ok(Number.isInteger(value) && value <= max);
        }
        for (const name of Object.keys(request.envVars)) assert.match(name, /^[A-Za-z_][A-Za-z0-9_]*$/);
        assert.equal(request.secure, true, "this server requires secure sandboxes");
      });
    }),
  );
});

test(`query parameter parsers give a value or a 400 for any string (${FUZZ_RUNS} runs)`, async (t) => {
  await assertProperty(
    t,
    "query parsers",
    fc.property(nastyString, (raw) => {
      for (const parse of [parseMetadataFilter, parseLimit, parseStates, parseStartedAfter, decodeCursor]) resultOrBadRequest(() => parse(raw));
    }),
  );
});

test(`every route answers any body and query with 2xx or a 4xx E2B body, never 5xx (${FUZZ_RUNS} runs)`, async (t) => {
  const request = fc.record({
    route: fc.constantFrom(...API_ROUTES),
    id: fc.oneof(fc.constant("EXISTING"), fc.constantFrom("inosuch", "snap-" + "a".repeat(20)), nastyString),
    query: queryString,
    body: bodyText(fc.oneof(createBody(fc.constantFrom("base", "nope", "")), otherBody)),
    contentType: fc.constantFrom("application/json", "application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded", "", "application/json\u0000"),
    key: fc.oneof({ weight: 9, arbitrary: fc.constant(TEST_KEY) }, { weight: 1, arbitrary: nastyString }),
  });
  await assertProperty(
    t,
    "REST routes (in process)",
    fc.asyncProperty(request, async ({ route, id, query, body, contentType, key }) => {
      const sandboxId = id === "EXISTING" ? existingId : id;
      const url = route.path.replace(":id", percentEncode(sandboxId)) + (query ? `?${query}` : "");
      const headers: Record<string, string> = { "x-api-key": key.replace(/[^\t\x20-\x7e]/g, "") };
      if (contentType) headers["content-type"] = contentType.replace(/\u0000/g, "");
      const res = await app.inject({ method: route.method, url, headers, payload: route.method === "GET" ? undefined : body });
      assert.ok(res.statusCode < 500, `${route.method} ${url.slice(0, 200)} -> ${res.statusCode} ${res.body.slice(0, 300)}`);
      if (res.statusCode >= 400) {
        const parsed = res.json();
        assert.equal(parsed.code, res.statusCode, res.body.slice(0, 300));
        assert.equal(typeof parsed.message, "string");
        assert.doesNotMatch(parsed.message, HOST_PATH_IN_TEXT);
      }
      // The stand-in's one sandbox is killed now and then; bring it back.
      if (!manager.records.has(existingId)) existingId = (await manager.create({ templateId: "base", timeoutSec: 60, secure: true, allowInternetAccess: true, metadata: {}, envVars: {}, autoPause: false, autoResume: false, networkConfig: undefined })).sandboxId;
      assert.equal(({} as Record<string, unknown>).polluted, undefined, "no prototype pollution");
    }),
  );
});
