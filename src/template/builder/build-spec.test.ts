import assert from "node:assert/strict";
import { test } from "node:test";
import { baseKey, parseBuildSpec, parseTemplateName, specWithoutCredentials, stepKey } from "./build-spec.js";

const hash = "ab".repeat(32);

test("parseBuildSpec takes what the SDK sends: every step type, start and ready commands", () => {
  const spec = parseBuildSpec({
    fromTemplate: "base",
    startCmd: "npm start",
    readyCmd: "sleep 1",
    force: false,
    steps: [
      { type: "ENV", args: ["A", "1", "B", ""] },
      { type: "RUN", args: ["echo hi", "root"], force: true },
      { type: "COPY", args: ["app", "/app", "", "0755"], filesHash: hash },
      { type: "WORKDIR", args: ["/app"] },
      { type: "USER", args: ["user"] },
    ],
  });
  assert.deepEqual(spec.base, { kind: "template", name: "base" });
  assert.deepEqual(spec.steps[0], { type: "ENV", vars: [["A", "1"], ["B", ""]], force: false });
  assert.deepEqual(spec.steps[1], { type: "RUN", command: "echo hi", user: "root", force: true });
  assert.deepEqual(spec.steps[2], { type: "COPY", src: "app", dest: "/app", user: undefined, mode: 0o755, filesHash: hash, force: false });
  assert.equal(spec.startCmd, "npm start");
  assert.equal(spec.readyCmd, "sleep 1");
  assert.deepEqual(parseBuildSpec({ fromImage: "python:3.12", fromImageRegistry: { type: "registry", username: "u", password: "p" } }).base, {
    kind: "image",
    reference: "python:3.12",
    credentials: { username: "u", password: "p" },
  });
  // The SDK's fromAWSRegistry and fromGCPRegistry (CLOUD_REGISTRIES_NOTE).
  const aws = parseBuildSpec({ fromImage: "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:1", fromImageRegistry: { type: "aws", awsAccessKeyId: "AKIAIOSFODNN7EXAMPLE", awsSecretAccessKey: "s3cr3t/key", awsRegion: "us-east-1" } });
  assert.deepEqual(aws.base, { kind: "image", reference: "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:1", aws: { accessKeyId: "AKIAIOSFODNN7EXAMPLE", secretAccessKey: "s3cr3t/key", region: "us-east-1" } });
  const key = JSON.stringify({ type: "service_account", client_email: "b@p.iam.gserviceaccount.com", private_key: "k" });
  assert.deepEqual(parseBuildSpec({ fromImage: "europe-docker.pkg.dev/p/r/app:1", fromImageRegistry: { type: "gcp", serviceAccountJson: key } }).base, { kind: "image", reference: "europe-docker.pkg.dev/p/r/app:1", credentials: { username: "_json_key", password: key } });
  // What the build record keeps: no credentials of any kind.
  assert.deepEqual(specWithoutCredentials(aws).base, { kind: "image", reference: "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:1" });
  assert.doesNotMatch(JSON.stringify(specWithoutCredentials(parseBuildSpec({ fromImage: "x", fromImageRegistry: { type: "registry", username: "u", password: "pw-kept-out" } }))), /pw-kept-out/);
});

test("parseBuildSpec refuses what it cannot honour, with the step in the message", () => {
  const bad: Array<[unknown, RegExp]> = [
    [null, /object/],
    [{}, /exactly one/],
    [{ fromTemplate: "a", fromImage: "b" }, /exactly one/],
    [{ fromImage: "has space" }, /not an image reference/],
    [{ fromImage: "x", fromImageRegistry: { type: "aws" } }, /awsAccessKeyId/],
    [{ fromImage: "x", fromImageRegistry: { type: "gcp", serviceAccountJson: "{}" } }, /service account key/],
    [{ fromImage: "x", fromImageRegistry: { type: "azure" } }, /not one of "registry", "aws", "gcp"/],
    [{ fromTemplate: "a", steps: {} }, /array/],
    [{ fromTemplate: "a", steps: [{ type: "ADD", args: [] }] }, /steps\[0\].*not one of/],
    [{ fromTemplate: "a", steps: [{ type: "RUN", args: [] }] }, /RUN takes/],
    [{ fromTemplate: "a", steps: [{ type: "RUN", args: ["x", "bad user!"] }] }, /not a user name/],
    [{ fromTemplate: "a", steps: [{ type: "RUN", args: [1] }] }, /array of strings/],
    [{ fromTemplate: "a", steps: [{ type: "COPY", args: ["a", "/b"] }] }, /filesHash/],
    [{ fromTemplate: "a", steps: [{ type: "COPY", args: ["../a", "/b"], filesHash: hash }] }, /inside the build context/],
    [{ fromTemplate: "a", steps: [{ type: "COPY", args: ["/etc", "/b"], filesHash: hash }] }, /inside the build context/],
    [{ fromTemplate: "a", steps: [{ type: "COPY", args: ["a", "/b", "", "999"], filesHash: hash }] }, /octal/],
    [{ fromTemplate: "a", steps: [{ type: "ENV", args: ["A"] }] }, /pairs/],
    [{ fromTemplate: "a", steps: [{ type: "ENV", args: ["1A", "x"] }] }, /not an environment variable name/],
    [{ fromTemplate: "a", steps: [{ type: "WORKDIR", args: ["relative"] }] }, /absolute/],
    [{ fromTemplate: "a", steps: [{ type: "RUN", args: ["a\0b"] }] }, /NUL/],
    [{ fromTemplate: "a", steps: Array.from({ length: 201 }, () => ({ type: "RUN", args: ["x"] })) }, /at most 200/],
  ];
  for (const [body, message] of bad) assert.throws(() => parseBuildSpec(body), message, JSON.stringify(body)?.slice(0, 80));
});

test("template names and tags", () => {
  assert.deepEqual(parseTemplateName("my-env"), { name: "my-env" });
  assert.deepEqual(parseTemplateName("my-env:v1.2"), { name: "my-env", tag: "v1.2" });
  for (const bad of ["", "My Env", "-x", "a/b", "x:", "x:bad tag", "a".repeat(64), 7]) assert.throws(() => parseTemplateName(bad), /must|string|empty/);
});

test("step keys: a chain over the base and the steps; force does not change a key", () => {
  const base = baseKey("template:base:abc");
  const run = parseBuildSpec({ fromTemplate: "a", steps: [{ type: "RUN", args: ["echo 1"] }] }).steps[0]!;
  const forced = parseBuildSpec({ fromTemplate: "a", steps: [{ type: "RUN", args: ["echo 1"], force: true }] }).steps[0]!;
  const other = parseBuildSpec({ fromTemplate: "a", steps: [{ type: "RUN", args: ["echo 2"] }] }).steps[0]!;
  assert.equal(stepKey(base, run), stepKey(base, forced));
  assert.notEqual(stepKey(base, run), stepKey(base, other));
  assert.notEqual(stepKey(base, run), stepKey(baseKey("template:base:def"), run), "another base, other keys");
  assert.match(stepKey(base, run), /^[0-9a-f]{64}$/);
});
