import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { buildInitBody, newMachineIdentity, parseInitBody } from "./init-body.js";

function refused(body: unknown, message: string | RegExp): void {
  assert.throws(
    () => parseInitBody(body),
    (error: unknown) => {
      assert.ok(error instanceof CubicleError);
      assert.equal(error.code, "invalid_argument");
      if (typeof message === "string") assert.equal(error.message, message);
      else assert.match(error.message, message);
      return true;
    },
  );
}

describe("/init body", () => {
  it("parses every field and ignores unknown ones", () => {
    const body = { accessToken: "t", envVars: { A: "1", B: "" }, defaultUser: "user", defaultWorkdir: "/home/user", hostname: "h", timestamp: "2026-01-01T00:00:00.000Z", extra: 1 };
    assert.deepEqual(parseInitBody(body), { accessToken: "t", envVars: { A: "1", B: "" }, defaultUser: "user", defaultWorkdir: "/home/user", hostname: "h", timestamp: "2026-01-01T00:00:00.000Z" });
  });

  it("treats null and missing fields as absent", () => {
    const parsed = parseInitBody({ accessToken: null, envVars: null });
    assert.equal(parsed.accessToken, undefined);
    assert.equal(parsed.envVars, undefined);
  });

  it("refuses what is not a JSON object", () => {
    for (const body of [null, "x", 1, [], true]) refused(body, "the init body must be a JSON object");
  });

  it("refuses fields of the wrong type, naming them", () => {
    refused({ accessToken: 1 }, `"accessToken" must be a string`);
    refused({ defaultUser: {} }, `"defaultUser" must be a string`);
    refused({ envVars: [] }, `"envVars" must be an object`);
    refused({ envVars: "A=1" }, `"envVars" must be an object`);
    refused({ envVars: { A: 1 } }, `env var "A" must be a string`);
  });

  it("refuses env vars a process could not receive", () => {
    refused({ envVars: { "": "x" } }, /env var "" is not a valid name\/value/);
    refused({ envVars: { "A=B": "x" } }, /not a valid name\/value/);
    refused({ envVars: { "A\0": "x" } }, /not a valid name\/value/);
    refused({ envVars: { A: "x\0y" } }, /not a valid name\/value/);
  });

  it("builds what it parses back, stamped with the server's time", () => {
    const now = new Date("2026-12-05T14:00:00.000Z");
    const env = { K: "v" };
    const body = buildInitBody({ accessToken: "tok", envVars: env, defaultUser: "user", defaultWorkdir: "/home/user" }, now);
    assert.deepEqual(body, { accessToken: "tok", envVars: { K: "v" }, defaultUser: "user", defaultWorkdir: "/home/user", timestamp: "2026-12-05T14:00:00.000Z" });
    assert.notEqual(body.envVars, env);
    assert.deepEqual(parseInitBody(JSON.parse(JSON.stringify(body))), { ...body, hostname: undefined });
    assert.equal("accessToken" in buildInitBody({ envVars: {}, defaultUser: "root", defaultWorkdir: "/" }), false);
  });

  it("carries a new machine's identity, fresh each time, and refuses one that is not well formed (GUEST_MACHINE_NOTE)", () => {
    const machine = newMachineIdentity();
    assert.notDeepEqual(newMachineIdentity(), machine);
    assert.equal(Buffer.from(machine.entropy, "base64").length, 64);
    const body = buildInitBody({ envVars: {}, defaultUser: "user", defaultWorkdir: "/", machine });
    assert.deepEqual(parseInitBody(JSON.parse(JSON.stringify(body))).machine, machine);
    refused({ machine: "x" }, /"machine" must be an object/);
    refused({ machine: { ...machine, machineId: "../../etc/passwd" } }, /machineId must be 32 lowercase hex digits/);
    refused({ machine: { ...machine, machineId: machine.machineId + "\n" } }, /machineId/);
    refused({ machine: { ...machine, bootId: "not-a-uuid" } }, /bootId must be a lowercase UUID/);
    refused({ machine: { ...machine, entropy: "" } }, /entropy must be base64 of 32 to 512 bytes/);
    refused({ machine: { ...machine, entropy: "A".repeat(100_000) } }, /entropy/);
  });
});
