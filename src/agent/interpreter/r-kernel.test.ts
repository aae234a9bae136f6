import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { RKernel, rKernelSpec, rSetEnvCode, rStringExpression, R_RESTORE_ENV_CODE } from "./r-kernel.js";

describe("the R kernel spec", () => {
  it("never puts user text into R source: strings travel as base64 of their UTF-8", () => {
    const hostile = '"); system("id"); ("\\ é\n';
    const expression = rStringExpression(hostile);
    const [, base64] = /^rawToChar\(jsonlite::base64_dec\("([A-Za-z0-9+/=]*)"\)\)$/.exec(expression) ?? [];
    assert.equal(Buffer.from(base64 ?? "", "base64").toString("utf8"), hostile);
    const setCode = rSetEnvCode({ 'A"B': hostile });
    assert.ok(!setCode.includes(hostile) && !setCode.includes('A"B'));
  });

  it("restores what it replaced, unsetting what was unset", () => {
    assert.match(R_RESTORE_ENV_CODE, /Sys\.unsetenv/);
    assert.match(rSetEnvCode({ A: "1" }), /unset = NA/);
  });

  it("starts IRkernel with the connection file, without reading or writing .RData", () => {
    const command = rKernelSpec("/usr/bin/R").command("/run/k/connection.json");
    assert.equal(command.file, "/usr/bin/R");
    assert.deepEqual(command.args.slice(-3), ["IRkernel::main()", "--args", "/run/k/connection.json"]);
    assert.ok(command.args.includes("--no-restore") && command.args.includes("--no-save"));
  });
});

describe("RKernel", () => {
  it("says which template has R when IRkernel is not installed, and counts as exited", async () => {
    const kernel = new RKernel({ irkernelDir: "/nonexistent/IRkernel", launch: { cwd: "/tmp", env: {} } });
    await assert.rejects(kernel.start(), /no R kernel.*code-interpreter-v1/);
    assert.equal(kernel.exited, true);
  });
});
