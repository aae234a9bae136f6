import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { describe, it } from "node:test";
import { computeFileSignature } from "../protocol/index.js";
import { checkAccessToken, checkFilesAuth, checkInitAuth, usernameFromAuthorization } from "./auth.js";
import { createAgentState } from "./state.js";

function stateWithToken(token?: string) {
  const state = createAgentState({});
  state.accessToken = token;
  return state;
}

/** The formula of e2b-wire-protocol.md §6.3, written out independently. */
function referenceSignature(path: string, op: string, user: string, token: string, exp?: number): string {
  const raw = [path, op, user, token, ...(exp === undefined ? [] : [String(exp)])].join(":");
  return "v1_" + createHash("sha256").update(raw).digest("base64").replace(/=/g, "");
}

function query(params: Record<string, string>): URLSearchParams {
  return new URLSearchParams(params);
}

describe("file signatures", () => {
  const token = "tok-123";
  const now = Date.parse("2030-01-01T00:00:00Z");
  const future = Math.floor(now / 1000) + 60;
  const past = Math.floor(now / 1000) - 1;

  it("computes the documented formula, without padding", () => {
    const sig = computeFileSignature("/home/user/a.txt", "read", "user", token, future);
    assert.equal(sig, referenceSignature("/home/user/a.txt", "read", "user", token, future));
    assert.ok(!sig.endsWith("="));
    assert.equal(computeFileSignature("a", "write", "", token), referenceSignature("a", "write", "", token));
  });

  it("accepts a valid signature for the right operation", () => {
    const sig = referenceSignature("dir/ä b.txt", "write", "", token, future);
    const q = query({ path: "dir/ä b.txt", signature: sig, signature_expiration: String(future) });
    assert.equal(checkFilesAuth(stateWithToken(token), "POST", q, {}, now), undefined);
    const asRead = checkFilesAuth(stateWithToken(token), "GET", q, {}, now);
    assert.equal(asRead?.message, "invalid signature");
  });

  it("refuses an expired signature with upstream's exact text", () => {
    const sig = referenceSignature("/x", "read", "user", token, past);
    const error = checkFilesAuth(stateWithToken(token), "GET", query({ path: "/x", username: "user", signature: sig, signature_expiration: String(past) }), {}, now);
    assert.equal(error?.httpStatus, 401);
    assert.equal(error?.message, "signature is already expired");
  });

  it("refuses a wrong or missing signature", () => {
    const wrong = checkFilesAuth(stateWithToken(token), "GET", query({ path: "/x", signature: "v1_nope" }), {}, now);
    assert.equal(wrong?.message, "invalid signature");
    const tampered = referenceSignature("/x", "read", "", token);
    assert.equal(checkFilesAuth(stateWithToken(token), "GET", query({ path: "/y", signature: tampered }), {}, now)?.message, "invalid signature");
    const missing = checkFilesAuth(stateWithToken(token), "GET", query({ path: "/x" }), {}, now);
    assert.equal(missing?.message, "missing signature query parameter");
    assert.equal(missing?.toE2bBody().code, 401);
  });

  it("accepts the access token header instead, and refuses a wrong one", () => {
    assert.equal(checkFilesAuth(stateWithToken(token), "GET", query({ path: "/x" }), { "x-access-token": token }, now), undefined);
    assert.equal(
      checkFilesAuth(stateWithToken(token), "GET", query({ path: "/x" }), { "x-access-token": "other" }, now)?.message,
      "access token present in header but does not match",
    );
  });

  it("needs nothing when the sandbox has no token", () => {
    assert.equal(checkFilesAuth(stateWithToken(undefined), "GET", query({ path: "/x" }), {}, now), undefined);
  });
});

describe("access token", () => {
  it("guards everything but the exempt paths", () => {
    const state = stateWithToken("t");
    assert.equal(checkAccessToken(state, "GET", "/health", {}), undefined);
    assert.equal(checkAccessToken(state, "POST", "/files", {}), undefined);
    assert.equal(checkAccessToken(state, "GET", "/envs", {})?.httpStatus, 401);
    assert.equal(checkAccessToken(state, "POST", "/process.Process/List", {})?.connectCode, "unauthenticated");
    assert.equal(checkAccessToken(state, "POST", "/process.Process/List", { "x-access-token": "t" }), undefined);
    assert.equal(checkAccessToken(stateWithToken(undefined), "GET", "/envs", {}), undefined);
  });

  it("lets only the token holder re-init", () => {
    assert.equal(checkInitAuth(stateWithToken(undefined), {}), undefined);
    assert.equal(checkInitAuth(stateWithToken("t"), {})?.httpStatus, 401);
    assert.equal(checkInitAuth(stateWithToken("t"), { "x-access-token": "t" }), undefined);
  });
});

describe("Basic user", () => {
  it("reads the user name of Basic base64(user:)", () => {
    assert.equal(usernameFromAuthorization({ authorization: "Basic cm9vdDo=" }), "root");
    assert.equal(usernameFromAuthorization({ authorization: `Basic ${Buffer.from("user:").toString("base64")}` }), "user");
    assert.equal(usernameFromAuthorization({}), undefined);
    assert.equal(usernameFromAuthorization({ authorization: "Bearer x" }), undefined);
    assert.equal(usernameFromAuthorization({ authorization: `Basic ${Buffer.from("nocolon").toString("base64")}` }), undefined);
  });
});
