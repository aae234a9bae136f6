import { test } from "node:test";
import assert from "node:assert/strict";
import { CubicleError } from "../../shared/cubicle-error.js";
import { normalizeRegistryHost, parseImageReference } from "./reference.js";

const DIGEST = `sha256:${"ab".repeat(32)}`;

test("a Docker Hub short name gets the library/ prefix, the Hub's API host and its tag", () => {
  const ref = parseImageReference("python:3.12");
  assert.equal(ref.registry, "registry-1.docker.io");
  assert.equal(ref.repository, "library/python");
  assert.equal(ref.tag, "3.12");
  assert.equal(ref.reference, "3.12");
  assert.equal(ref.canonical, "docker.io/library/python:3.12");
});

test("a user repository on the Hub defaults to latest", () => {
  const ref = parseImageReference("user/img");
  assert.deepEqual([ref.registry, ref.repository, ref.tag, ref.digest], ["registry-1.docker.io", "user/img", "latest", undefined]);
  assert.equal(parseImageReference("docker.io/ubuntu").repository, "library/ubuntu");
  assert.equal(parseImageReference("index.docker.io/library/ubuntu:22.04").registry, "registry-1.docker.io");
});

test("a first component with a port, a dot or localhost is a registry host", () => {
  const a = parseImageReference("localhost:5000/a/b:t");
  assert.deepEqual([a.registry, a.repository, a.tag], ["localhost:5000", "a/b", "t"]);
  const b = parseImageReference(`127.0.0.1:5000/x@${DIGEST}`);
  assert.deepEqual([b.registry, b.repository, b.tag, b.digest, b.reference], ["127.0.0.1:5000", "x", undefined, DIGEST, DIGEST]);
  const c = parseImageReference(`host.example/x:tag@${DIGEST}`);
  assert.deepEqual([c.registry, c.repository, c.tag, c.digest, c.reference], ["host.example", "x", "tag", DIGEST, DIGEST]);
  assert.equal(c.canonical, `host.example/x:tag@${DIGEST}`);
  assert.equal(parseImageReference("localhost/x").registry, "localhost");
  assert.equal(parseImageReference("[::1]:5000/x:1").registry, "[::1]:5000");
  assert.equal(parseImageReference("ghcr.io/org/sub/repo-name_x.y:v1.2-rc").repository, "org/sub/repo-name_x.y");
});

test("junk is refused with invalid_argument and a reason", () => {
  const bad: Array<[string, RegExp]> = [
    ["", /empty/],
    ["Python:3", /lower case/],
    ["python:", /tag '' is not valid/],
    ["python:-x", /tag/],
    ["a//b", /not a valid repository path component/],
    ["a/b/", /not a valid/],
    ["python@sha256:123", /digest/],
    [`python@md5:${"a".repeat(32)}`, /only sha256/],
    [`python@sha256:${"A".repeat(64)}`, /only sha256/],
    ["host:99999/x", /not a valid registry/],
    ["host:port/x", /not a valid registry/],
    ["py thon", /white space/],
    ["a/../b", /not a valid repository path component/],
    ["x__-y", /not a valid/],
    [`${"a".repeat(300)}/b`, /longer than 255/],
    ["localhost:5000/", /missing/],
  ];
  for (const [input, reason] of bad) {
    assert.throws(() => parseImageReference(input), (err: unknown) => {
      assert.ok(err instanceof CubicleError, input);
      assert.equal(err.code, "invalid_argument", input);
      assert.match(err.message, reason, input);
      return true;
    });
  }
});

test("registry names from a configuration are normalized", () => {
  assert.equal(normalizeRegistryHost("docker.io"), "registry-1.docker.io");
  assert.equal(normalizeRegistryHost("https://Index.Docker.io/"), "registry-1.docker.io");
  assert.equal(normalizeRegistryHost("localhost:5000"), "localhost:5000");
});
