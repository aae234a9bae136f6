/**
 * Which REST calls the pinned `e2b` SDK can make, read from the SDK's own bundle, against what
 * this API serves: a new SDK version that calls something new fails here until it is served or
 * consciously listed as belonging to later work.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { test } from "node:test";
import { apiSchema } from "../protocol/index.js";

/** SDK calls Cubicle does not serve yet (404 today), and the work they belong to. */
const notYetServed: Record<string, string> = {
  "GET /volumes": "volumes",
  "POST /volumes": "volumes",
  "GET /volumes/{volumeID}": "volumes",
  "DELETE /volumes/{volumeID}": "volumes",
  "GET /volumecontent/{volumeID}/dir": "volumes",
  "POST /volumecontent/{volumeID}/dir": "volumes",
  "GET /volumecontent/{volumeID}/file": "volumes",
  "PUT /volumecontent/{volumeID}/file": "volumes",
  "GET /volumecontent/{volumeID}/path": "volumes",
  "PATCH /volumecontent/{volumeID}/path": "volumes",
  "DELETE /volumecontent/{volumeID}/path": "volumes",
};

/** envd's HTTP routes the SDK calls (served by the agent, not this API). */
const envdRoutes = new Set(["GET /files", "POST /files", "GET /health"]);

function sdkCalls(): string[] {
  const require = createRequire(import.meta.url);
  const bundle = fs.readFileSync(path.join(path.dirname(require.resolve("e2b")), "index.mjs"), "utf8");
  return [...new Set([...bundle.matchAll(/api\.(GET|POST|PUT|PATCH|DELETE)\("([^"]+)"/g)].map((match) => `${match[1]} ${match[2]}`))].sort();
}

test("every REST call of the pinned e2b SDK is served, or listed with the work it belongs to", () => {
  const served = new Set(Object.values(apiSchema.apiOperations).map((operation) => `${operation.method} ${operation.path}`));
  const calls = sdkCalls();
  assert.ok(calls.length > 20, `the SDK bundle was read (${calls.length} calls found)`);
  const unaccounted = calls.filter((call) => !served.has(call) && !envdRoutes.has(call) && !(call in notYetServed));
  assert.deepEqual(unaccounted, [], "SDK calls neither served nor listed");
  const stale = Object.keys(notYetServed).filter((call) => served.has(call) || !calls.includes(call));
  assert.deepEqual(stale, [], "listed as not served, but served now or no longer called: update the list");
});
