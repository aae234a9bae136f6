import { test } from "node:test";
import assert from "node:assert/strict";
import { CubicleError } from "../../shared/cubicle-error.js";
import { defaultCommand, parseImageConfig } from "./image-config.js";

const DIFF = `sha256:${"0".repeat(64)}`;

test("reads Env, WorkingDir, User, Entrypoint, Cmd and the diff ids", () => {
  const config = parseImageConfig(
    JSON.stringify({
      architecture: "amd64",
      os: "linux",
      config: {
        Env: ["PATH=/usr/bin", "LANG=C.UTF-8", "EMPTY=", "X=a=b", "PATH=/bin"],
        WorkingDir: "/app",
        User: "1000:1000",
        Entrypoint: ["/entry.sh"],
        Cmd: ["python3", "-m", "http.server"],
        Labels: { a: "b" },
        ExposedPorts: { "8000/tcp": {} },
      },
      rootfs: { type: "layers", diff_ids: [DIFF] },
    }),
  );
  assert.deepEqual(config.envMap, { PATH: "/bin", LANG: "C.UTF-8", EMPTY: "", X: "a=b" });
  assert.equal(config.env.length, 5);
  assert.equal(config.workingDir, "/app");
  assert.equal(config.user, "1000:1000");
  assert.deepEqual(defaultCommand(config), ["/entry.sh", "python3", "-m", "http.server"]);
  assert.deepEqual(config.diffIds, [DIFF]);
  assert.deepEqual(config.labels, { a: "b" });
  assert.deepEqual(config.exposedPorts, ["8000/tcp"]);
});

test("a config without a config section has empty defaults", () => {
  const config = parseImageConfig('{"architecture":"amd64","os":"linux","config":null}');
  assert.deepEqual([config.env, config.workingDir, config.user, config.entrypoint, config.cmd], [[], "", "", [], []]);
});

test("refuses other platforms and malformed configs clearly", () => {
  const cases: Array<[string, RegExp]> = [
    ['{"architecture":"arm64","os":"linux"}', /built for linux\/arm64; Cubicle runs linux\/amd64/],
    ['{"architecture":"amd64","os":"windows"}', /windows\/amd64/],
    ['{"os":"linux"}', /unknown architecture/],
    ["not json", /not JSON/],
    ["[]", /not a JSON object/],
    ['{"architecture":"amd64","os":"linux","config":{"Cmd":"ls"}}', /Cmd must be a list/],
    ['{"architecture":"amd64","os":"linux","rootfs":{"diff_ids":["md5:1"]}}', /not a sha256/],
  ];
  for (const [input, message] of cases) {
    assert.throws(() => parseImageConfig(input), (err: unknown) => err instanceof CubicleError && err.code === "failed_precondition" && message.test(err.message), input);
  }
  assert.throws(() => parseImageConfig(Buffer.alloc(5 * 1024 * 1024, 0x20)), /larger than/);
});
