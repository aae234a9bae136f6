import assert from "node:assert/strict";
import { test } from "node:test";
import { FakeRuntime } from "../core/test-fakes.js";
import type { SandboxSpec } from "./types.js";
import { RuntimeSet } from "./runtime-set.js";

function spec(sandboxId: string, runtime?: "container" | "microvm"): SandboxSpec {
  return {
    sandboxId,
    ...(runtime ? { runtime } : {}),
    hostname: sandboxId,
    template: { templateId: "base", rootfsDir: "/srv/base", defaultUser: "user", defaultWorkdir: "/home/user", env: {} },
    resources: { cpuCount: 1, memoryMiB: 512, diskMiB: 1024, pidsLimit: 100 },
    network: { netnsPath: "/run/netns/x", sandboxAddress: "10.0.0.2", hostAddress: "10.0.0.1" } as SandboxSpec["network"],
  };
}

test("a runtime set sends creates to the named runtime (default the first) and every later call to the sandbox's own", async () => {
  const container = new FakeRuntime();
  const microvm = new FakeRuntime({ name: "microvm" });
  const set = new RuntimeSet([container, microvm]);
  assert.equal(set.name, "container");
  assert.ok(set.runs("microvm") && set.runs("container"));
  await set.create(spec("a"));
  await set.create(spec("b", "microvm"));
  assert.ok(container.containers.has("a") && !container.containers.has("b"));
  assert.ok(microvm.containers.has("b") && !microvm.containers.has("a"));
  await set.freeze("b");
  assert.equal(microvm.containers.get("b"), "frozen");
  assert.equal(await set.state("b"), "frozen");
  assert.deepEqual((await set.list()).sort(), ["a", "b"]);

  // Images: one id space; a restore goes to the runtime that made the image.
  const made = await set.checkpoint("b", { kind: "snapshot", name: "snap-b" }, { memory: true, leaveRunning: true });
  assert.equal(made.imageId, "snapshot/snap-b");
  assert.equal(await set.images.exists("snapshot/snap-b"), true);
  assert.equal((await set.images.info("snapshot/snap-b"))?.runtime, "microvm");
  await set.restore(spec("c"), "snapshot/snap-b");
  assert.ok(microvm.containers.has("c"), "restored on the image's runtime");
  assert.deepEqual(await set.images.list("snapshot"), ["snapshot/snap-b"]);
  await set.images.remove("snapshot/snap-b");
  assert.equal(await set.images.exists("snapshot/snap-b"), false);
  await assert.rejects(set.restore(spec("d"), "snapshot/none"), /does not exist/);

  await set.destroy("b");
  assert.ok(!microvm.containers.has("b"));
  assert.equal(await set.state("b"), "missing");
  await set.destroy("never-made");
  await assert.rejects(set.freeze("never-made"), /does not exist/);
});

test("a runtime set finds a sandbox's runtime after a restart; an absent runtime is a clear refusal", async () => {
  const container = new FakeRuntime();
  const microvm = new FakeRuntime({ name: "microvm" });
  await microvm.create(spec("survivor", "microvm"));
  const set = new RuntimeSet([container, microvm]);
  await set.thaw("survivor");
  assert.ok(microvm.calls.includes("thaw survivor"), "found on the host by its state");
  const only = new RuntimeSet([container]);
  assert.equal(only.runs("microvm"), false);
  await assert.rejects(only.create(spec("x", "microvm")), /cannot run microvm sandboxes/);
  assert.throws(() => new RuntimeSet([]), /at least one/);
  assert.throws(() => new RuntimeSet([container, new FakeRuntime()]), /each runtime once/);
});
