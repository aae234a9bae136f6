import assert from "node:assert/strict";
import { test } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { publicErrorBody, redactHostPaths } from "./error-bodies.js";

const hostDirs = ["/data/cubicle", "/var/lib/cubicle/templates"];

test("absolute host paths are removed from messages, wherever they stand", () => {
  const cases: [string, string][] = [
    ["ENOENT: no such file or directory, open '/var/lib/cubicle/sandboxes/iabc/config.json'", "ENOENT: no such file or directory, open '<host path>'"],
    ["copying /data/cubicle/sandboxes/iabc/upper to /data/cubicle/snapshots/snap-1 failed", "copying <host path> to <host path> failed"],
    ["runc: /tmp/cubicle-e2e-x/bundle: permission denied", "runc: <host path>: permission denied"],
    ["cgroup /sys/fs/cgroup/memory/cubicle/iabc busy (/proc/123/status)", "cgroup <host path> busy (<host path>)"],
    ["netns /run/netns/cubicle-iabc gone", "netns <host path> gone"],
    ["file:///etc/passwd", "file://<host path>"],
    ["under /work/wt/dist/agent.js", "under <host path>"],
    ["the template dir /var/lib/cubicle/templates", "the template dir <host path>"],
    ["/data/cubicle", "<host path>"],
  ];
  for (const [message, expected] of cases) assert.equal(redactHostPaths(message, hostDirs), expected, message);
});

test("what is not a host path stays: sandbox ids, endpoints, relative names, words that start like a root", () => {
  for (const message of [
    'sandbox "iabc" not found',
    "no such endpoint: GET /v2/sandboxes/iabc/whatever",
    "templateID is required (a template id, alias or snapshot id)",
    "the variable /variables and /libs/x and usr/lib",
    "limit must be a whole number from 1 to 100",
  ]) {
    assert.equal(redactHostPaths(message, hostDirs), message);
  }
});

test("stack frames and overlong messages do not reach a response", () => {
  const err = new Error("boom");
  const redacted = redactHostPaths(`${err.message}\n${err.stack}`, hostDirs);
  assert.doesNotMatch(redacted, /\n\s+at /);
  assert.doesNotMatch(redacted, /\/work\/|node:internal/);
  assert.ok(redactHostPaths("x".repeat(10_000)).length <= 1001);
});

test("a 4xx keeps its message, redacted; a 5xx says only what to do, with an error id", () => {
  const notFound = publicErrorBody(new CubicleError("not_found", "ENOENT: open '/data/cubicle/x'"), hostDirs);
  assert.deepEqual(notFound, { status: 404, body: { code: 404, message: "ENOENT: open '<host path>'" } });

  const internal = publicErrorBody(new CubicleError("internal", "runc run exited with 1: open /data/cubicle/sandboxes/iabc/config.json"), hostDirs);
  assert.equal(internal.status, 500);
  assert.equal(internal.body.code, 500);
  assert.match(internal.errorId!, /^[0-9a-f]{8}$/);
  assert.equal(internal.body.message, `internal error (error id ${internal.errorId}; the server log has the cause)`);

  const storage = publicErrorBody(new CubicleError("insufficient_storage", "ENOSPC writing /data/cubicle/snapshots/x"), hostDirs);
  assert.equal(storage.status, 507);
  assert.match(storage.body.message, /free some space/);
  assert.doesNotMatch(storage.body.message, /\//);
  assert.notEqual(publicErrorBody(new CubicleError("internal", "x")).errorId, internal.errorId, "each failure has its own id");
});
