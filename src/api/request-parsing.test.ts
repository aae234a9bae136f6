import assert from "node:assert/strict";
import { test } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { decodeCursor, encodeCursor, parseCreateRequest, parseLimit, parseMetadataFilter, parseStates } from "./request-parsing.js";

test("metadata filters decode the SDK's double encoding like upstream parseFilters", () => {
  // On the wire: metadata=user%252520id%3Da%252526b%26app%3Dprod; the query layer decodes once.
  const onceDecoded = new URLSearchParams("metadata=user%252520id%3Da%252526b%26app%3Dprod").get("metadata")!;
  assert.deepEqual(parseMetadataFilter(onceDecoded), { "user id": "a&b", app: "prod" });
  assert.equal(parseMetadataFilter(undefined), undefined);
  assert.throws(() => parseMetadataFilter("novalue"), CubicleError);
  assert.throws(() => parseMetadataFilter("a=b=c"), CubicleError);
});

test("v2 creates are secure with the server's default timeout; v1 honours secure and defaults to 15 s", () => {
  const v2 = parseCreateRequest({ templateID: "base" }, 2, 300);
  assert.equal(v2.secure, true);
  assert.equal(v2.timeoutSec, 300);
  assert.equal(v2.allowInternetAccess, true);
  const v1 = parseCreateRequest({ templateID: "base", secure: false, allow_internet_access: false }, 1, 300);
  assert.equal(v1.secure, false);
  assert.equal(v1.timeoutSec, 15);
  assert.equal(v1.allowInternetAccess, false);
  const paused = parseCreateRequest({ templateID: "base", autoPause: true, autoResume: { enabled: true } }, 2, 300);
  assert.equal(paused.autoPause, true);
  assert.equal(paused.autoResume, true);
});

test("invalid create bodies are invalid_argument errors naming the field", () => {
  const cases: [unknown, RegExp][] = [
    [undefined, /templateID/],
    [[], /object/],
    [{ templateID: "" }, /templateID/],
    [{ templateID: "base", timeout: 1.5 }, /timeout/],
    [{ templateID: "base", timeout: 10 ** 9 }, /24 hours/],
    [{ templateID: "base", envVars: { A: 1 } }, /envVars\.A/],
    [{ templateID: "base", secure: "yes" }, /secure/],
    [{ templateID: "base", memoryMB: 5 }, /memoryMB/],
  ];
  for (const [body, message] of cases) {
    assert.throws(() => parseCreateRequest(body, 2, 300), (err: unknown) => err instanceof CubicleError && err.httpStatus === 400 && message.test(err.message));
  }
});

test("list parameters: states, limits and opaque cursors", () => {
  assert.deepEqual(parseStates("running,paused"), ["running", "paused"]);
  assert.deepEqual(parseStates(["running", "paused"]), ["running", "paused"]);
  assert.throws(() => parseStates("dead"), CubicleError);
  assert.equal(parseLimit(undefined), 100);
  assert.throws(() => parseLimit("0"), CubicleError);
  assert.throws(() => parseLimit("101"), CubicleError);
  const token = encodeCursor(1700000000123, "iabc123");
  assert.deepEqual(decodeCursor(token), { startedAt: 1700000000123, sandboxId: "iabc123" });
  assert.throws(() => decodeCursor("garbage!!"), CubicleError);
});
