import assert from "node:assert/strict";
import { test } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { hostPattern, parsePort, parseRoute } from "./route-parsing.js";

const pattern = hostPattern("cubicle.test");
const isBadRequest = (err: unknown) => err instanceof CubicleError && err.httpStatus === 400;

test("ports are 1–65535 in plain decimal digits", () => {
  assert.equal(parsePort("49983", "p"), 49983);
  assert.equal(parsePort(" 8080 ", "p"), 8080);
  assert.equal(parsePort("65535", "p"), 65535);
  for (const bad of ["0", "65536", "-1", "abc", "", " ", "1e3", "0x50", "80.0", "+80", "99999999999999999999", "８０"]) {
    assert.throws(() => parsePort(bad, "E2b-Sandbox-Port"), (err: unknown) => isBadRequest(err) && /E2b-Sandbox-Port/.test((err as Error).message), bad);
  }
});

test("routing headers and Host: sandbox traffic, API traffic, or a 400", () => {
  assert.deepEqual(parseRoute({ id: "iabc", port: "49983", host: "127.0.0.1" }, pattern), { sandboxId: "iabc", port: 49983 });
  assert.deepEqual(parseRoute({ id: undefined, port: undefined, host: "8080-IABC.cubicle.test:3000" }, pattern), { sandboxId: "iabc", port: 8080 });
  assert.equal(parseRoute({ id: "iabc", port: undefined, host: "127.0.0.1:3000" }, pattern), undefined, "an id without a port is not routed");
  assert.equal(parseRoute({ id: undefined, port: undefined, host: "8080-iabc.other.test" }, pattern), undefined);
  assert.equal(parseRoute({ id: undefined, port: undefined, host: undefined }, pattern), undefined);
  assert.throws(() => parseRoute({ id: undefined, port: "49983", host: "x" }, pattern), isBadRequest, "a port without an id");
  assert.throws(() => parseRoute({ id: "iabc", port: "65536", host: "x" }, pattern), isBadRequest);
  assert.throws(() => parseRoute({ id: undefined, port: undefined, host: "99999-iabc.cubicle.test" }, pattern), isBadRequest);
  assert.throws(() => parseRoute({ id: undefined, port: undefined, host: "0-iabc.cubicle.test" }, pattern), isBadRequest);
});

test("the message quotes a bad value briefly", () => {
  assert.throws(() => parsePort("x".repeat(10_000), "E2b-Sandbox-Port"), (err: unknown) => isBadRequest(err) && (err as Error).message.length < 200);
});
