import assert from "node:assert/strict";
import { test } from "node:test";
import { CubicleError } from "../../shared/cubicle-error.js";
import { RuntimeSet } from "../../runtime/runtime-set.js";
import { createRequest, failOnce, fakeTemplate, fakeTemplates, FakeRuntime, lastInit, until, withFakeManager } from "../test-fakes.js";

test("a cold create records the sandbox, makes its network and container, and hands its agent its identity", async () => {
  await withFakeManager({}, async (f) => {
    const record = await f.manager.create(createRequest({ envVars: { A: "1" }, templateId: "base-alias" }));
    assert.equal(record.state, "running");
    assert.equal(record.alias, "base-alias");
    assert.equal(f.containers.get(record.sandboxId), "running");
    assert.ok(f.networks.has(record.sandboxId));
    assert.equal(f.store.sandboxes.get(record.sandboxId)?.state, "running");
    const init = lastInit(f.agent, record.network!.sandboxAddress)!;
    assert.equal(init.accessToken, record.envdAccessToken);
    assert.deepEqual(init.envVars, { A: "1" });
    assert.equal(init.hostname, record.sandboxId);
    assert.deepEqual(
      f.store.events.map((e) => e.kind),
      ["created"],
    );
    assert.equal(await f.manager.get(record.sandboxId), record);
  });
});

test("a create that fails ends the sandbox dead and leaves nothing on the host", async () => {
  await withFakeManager({}, async (f) => {
    f.agent.failures.init = failOnce(new CubicleError("internal", "the sandbox agent refused its init (500)"));
    await assert.rejects(f.manager.create(createRequest()), /refused its init/);
    const [stored] = f.store.sandboxes.values();
    assert.equal(stored.state, "dead");
    assert.match(stored.endReason!, /create failed/);
    assert.equal(f.containers.size, 0);
    assert.equal(f.networks.size, 0);
    assert.deepEqual(await f.manager.list({}), []);
  });
});

test("an unknown template or snapshot is a 404; a snapshot's name creates from the snapshot with the source's resources", async () => {
  await withFakeManager({}, async (f) => {
    await assert.rejects(f.manager.create(createRequest({ templateId: "nope" })), (err: CubicleError) => err.code === "not_found");
    const source = await f.manager.create(createRequest({ memoryMB: 1024 }));
    await f.manager.createSnapshot(source.sandboxId, "my-snap");
    const restored = await f.manager.create(createRequest({ templateId: "my-snap" }));
    assert.equal(restored.memoryMB, 1024);
    assert.ok(restored.fromSnapshotId);
    assert.ok(f.runtime.calls.includes(`restore ${restored.sandboxId}`));
    assert.equal(lastInit(f.agent, restored.network!.sandboxAddress)?.accessToken, restored.envdAccessToken, "the restored agent gets the new sandbox's token");
  });
});

test("a create takes a warm-pool entry when one fits: its id, its network, no cold boot", async () => {
  await withFakeManager({ poolSizes: { base: 1 } }, async (f) => {
    await f.manager.startPools();
    await until(() => f.manager.poolCounts().base?.ready === 1);
    const [entry] = f.rows.values();
    assert.ok(entry, "the pool made an entry");
    const record = await f.manager.create(createRequest());
    assert.equal(record.sandboxId, entry.runtimeId);
    assert.equal(f.containers.get(record.sandboxId), "running", "thawed");
    assert.equal(f.rows.has(record.sandboxId), false, "the pool row is gone with the claim");
    assert.equal(record.envdAccessToken, entry.agentToken, "a secure create without env vars keeps the entry's token: no /init");
    assert.equal(f.manager.routeTarget(record.sandboxId)?.address, record.network!.sandboxAddress);
    // The entry was made at background CPU priority and got the normal one back while frozen.
    const steps = f.runtime.calls.filter((call) => call.endsWith(` ${record.sandboxId}`));
    assert.deepEqual(steps, ["create", "freeze", "foreground", "thaw"].map((step) => `${step} ${record.sandboxId}`));
    assert.equal(f.runtime.background.has(record.sandboxId), false, "claimed: no longer a background start");
    assert.ok([...f.rows.keys()].every((id) => f.runtime.background.has(id) || !f.containers.has(id)), "waiting entries stay at background priority");
    // A claim whose entry cannot be thawed is dropped and the create boots cold instead.
    await until(() => f.manager.poolCounts().base?.ready === 1);
    f.runtime.failNext.set("thaw", new Error("thaw failed"));
    const cold = await f.manager.create(createRequest());
    assert.equal(cold.state, "running");
    assert.equal([...f.store.sandboxes.values()].filter((r) => r.state === "dead").length, 1);
    await f.manager.killAll();
  });
});

test("a pool claim with a network policy of its own applies it before any traffic reaches the sandbox", async () => {
  await withFakeManager({ poolSizes: { base: 1 } }, async (f) => {
    await f.manager.startPools();
    await until(() => f.manager.poolCounts().base?.ready === 1);
    const [entry] = f.rows.values();
    assert.equal(f.network.policies.get(entry!.runtimeId)?.allowInternetAccess, true, "pool entries allow public egress");
    const record = await f.manager.create(createRequest({ allowInternetAccess: false, networkConfig: { allowOut: ["example.com"] } }));
    assert.equal(record.sandboxId, entry!.runtimeId, "claimed");
    // POLICY_CLAIM_NOTE: at the 201 it is still frozen, and still under the entry's open policy.
    assert.equal(f.runtime.containers.get(record.sandboxId), "frozen", "nothing in it runs under the entry's policy");
    assert.equal(f.network.policies.get(record.sandboxId)?.allowInternetAccess, true);
    // The router's lookup, as the router does it: no target while the policy is being applied
    // (routeTarget), and resumeForTraffic starts that step at once (LiveSandbox.hurry) and waits for it.
    const target = f.manager.routeTarget(record.sandboxId) ?? (await f.manager.resumeForTraffic(record.sandboxId));
    assert.equal(target?.address, record.network!.sandboxAddress);
    const applied = f.network.policies.get(record.sandboxId);
    assert.equal(applied?.allowInternetAccess, false);
    assert.deepEqual(applied?.network?.allowOut, ["example.com"]);
    assert.equal(f.runtime.containers.get(record.sandboxId), "running", "thawed once its policy is in place");
    await f.manager.killAll();
  });
});

test("a pool claim with a policy of its own and no traffic is given its policy and thawed shortly after the 201 all the same", async () => {
  await withFakeManager({ poolSizes: { base: 1 } }, async (f) => {
    await f.manager.startPools();
    await until(() => f.manager.poolCounts().base?.ready === 1);
    const record = await f.manager.create(createRequest({ networkConfig: { denyOut: ["10.0.0.0/8"] } }));
    assert.equal(f.runtime.containers.get(record.sandboxId), "frozen");
    await until(() => f.runtime.containers.get(record.sandboxId) === "running");
    assert.deepEqual(f.network.policies.get(record.sandboxId)?.network?.denyOut, ["10.0.0.0/8"]);
    const claimCalls = f.runtime.calls.filter((call) => call.endsWith(record.sandboxId));
    assert.equal(claimCalls.at(-1), `thaw ${record.sandboxId}`, "thawed last");
    await f.manager.killAll();
  });
});

test("a pool claim without a policy of its own is thawed before its 201", async () => {
  await withFakeManager({ poolSizes: { base: 1 } }, async (f) => {
    await f.manager.startPools();
    await until(() => f.manager.poolCounts().base?.ready === 1);
    const record = await f.manager.create(createRequest());
    assert.equal(f.runtime.containers.get(record.sandboxId), "running");
    assert.ok(f.manager.routeTarget(record.sandboxId), "traffic goes through at once");
    await f.manager.killAll();
  });
});

test("with a runtime set, a create's runtime picks the runtime; the record says which; one the host lacks is refused", async () => {
  const container = new FakeRuntime();
  const microvm = new FakeRuntime({ name: "microvm" });
  await withFakeManager({ runtime: new RuntimeSet([container, microvm]) }, async (f) => {
    const vm = await f.manager.create({ ...createRequest(), runtime: "microvm" });
    assert.equal(vm.runtime, "microvm");
    assert.ok(microvm.containers.has(vm.sandboxId), "made by the microvm runtime");
    const box = await f.manager.create(createRequest());
    assert.equal(box.runtime, "container");
    assert.ok(container.containers.has(box.sandboxId));
    await f.manager.kill(vm.sandboxId);
    assert.ok(!microvm.containers.has(vm.sandboxId), "killed on its own runtime");
  });
  await withFakeManager({}, async (f) => {
    await assert.rejects(f.manager.create({ ...createRequest(), runtime: "microvm" }), /cannot run microvm sandboxes/);
  });
});

test("a template's runtime (CUBICLE_TEMPLATE_RUNTIME) is its sandboxes' unless a create names one; its pool entries run there; no warm snapshot for it; a host without it refuses with the reason", async () => {
  const vmTemplate = { ...fakeTemplate, templateId: "vm-base", aliases: ["vm-base"], runtime: "microvm" as const };
  const templates = { resolve: async (name: string) => (name === "vm-base" ? vmTemplate : fakeTemplates.resolve(name)) };
  const container = new FakeRuntime();
  const microvm = new FakeRuntime({ name: "microvm" });
  await withFakeManager({ runtime: new RuntimeSet([container, microvm]), templates, poolSizes: { "vm-base": 1 }, warmSnapshotTemplates: ["vm-base"] }, async (f) => {
    await f.manager.startPools();
    await until(() => f.manager.poolCounts()["vm-base"]?.ready === 1);
    const [entry] = [...microvm.containers.keys()];
    assert.ok(entry, "the pool entry is a microVM");
    assert.equal(container.containers.size, 0, "and no container");
    const vm = await f.manager.create(createRequest({ templateId: "vm-base" }));
    assert.equal(vm.runtime, "microvm");
    assert.equal(vm.sandboxId, entry, "the create claimed the microVM entry");
    assert.equal(f.manager.poolCounts()["vm-base"]?.ready, 0);
    await until(() => f.manager.poolCounts()["vm-base"]?.ready === 1);
    const overridden = await f.manager.create(createRequest({ templateId: "vm-base", runtime: "container" }));
    assert.equal(overridden.runtime, "container");
    assert.ok(container.containers.has(overridden.sandboxId), "a create that names another runtime boots there");
    assert.equal(f.manager.poolCounts()["vm-base"]?.ready, 1, "and leaves the microVM entry");
    assert.equal(f.manager.warmSnapshotCounts()["vm-base"], undefined, "no warm snapshot (a container image) for it");
    await f.manager.killAll();
  });
  await withFakeManager({ templates }, async (f) => {
    await assert.rejects(f.manager.create(createRequest({ templateId: "vm-base" })), (err: CubicleError) => err.code === "failed_precondition" && /cannot run microvm sandboxes \(template vm-base runs there/.test(err.message));
    const box = await f.manager.create(createRequest({ templateId: "vm-base", runtime: "container" }));
    assert.equal(box.runtime, "container");
    await f.manager.killAll();
  });
});
