import assert from "node:assert/strict";
import { test } from "node:test";
import { fakeHost, fakeTemplates, until } from "./test-fakes.js";
import { WarmPool } from "./warm-pool.js";

/** The counting fakes, and a catalog with the base template under two names. */
function fakes(options: { failCreates?: number } = {}) {
  return { ...fakeHost(options), templates: fakeTemplates };
}

test("the pool fills to its size, hands each entry out once, refills, and drains to nothing", async () => {
  const f = fakes();
  const pool = new WarmPool({ ...f, sizes: { base: 3, missing: 2 }, pidsLimit: 100 });
  await pool.start();
  await until(() => pool.counts().base?.ready === 3);
  assert.deepEqual(Object.keys(pool.counts()), ["base"], "a pool for an unknown template is skipped");
  assert.equal([...f.containers.values()].filter((s) => s === "frozen").length, 3);

  const claimed = new Set<string>();
  for (let i = 0; i < 5; i++) {
    const claim = pool.claim({ templateIdOrAlias: i % 2 ? "base-alias" : "base", cpuCount: undefined, memoryMB: undefined });
    if (!claim) continue;
    assert.equal(claim.template.templateId, "base");
    assert.match(claim.entry.runtimeId, /^i[a-z0-9]{20}$/, "an entry's id is a valid future sandbox id");
    claimed.add(claim.entry.runtimeId);
  }
  assert.equal(claimed.size, 3, "three entries, each handed out once, then none");
  assert.equal(pool.claim({ templateIdOrAlias: "base", cpuCount: 4, memoryMB: undefined }), undefined, "other resources never take a pool entry");
  assert.equal(pool.claim({ templateIdOrAlias: "other", cpuCount: undefined, memoryMB: undefined }), undefined);
  await until(() => pool.counts().base?.ready === 3);

  await pool.drain();
  for (const id of claimed) f.containers.delete(id);
  assert.equal(f.containers.size, 0);
  assert.equal(f.networks.size, claimed.size, "only the claimed entries' networks remain (their sandboxes own them)");
  assert.equal(f.rows.size, claimed.size);
  assert.ok(f.agent.callsOf("warmUp").length > 0, "entries are warmed up before the freeze");
});

test("failed pool creates clean up after themselves and leftovers of a crash are discarded", async () => {
  const f = fakes({ failCreates: 100 });
  const pool = new WarmPool({ ...f, sizes: { base: 2 }, pidsLimit: 100 });
  await pool.start();
  await until(() => pool.counts().base?.creating === 0);
  assert.equal(f.containers.size, 0);
  assert.equal(f.networks.size, 0);
  assert.equal(f.rows.size, 0);
  await pool.drain();

  await f.store.insertPoolEntry({ runtimeId: "pold", templateId: "base", network: undefined, createdAt: 0, allowInternetAccess: true });
  f.containers.set("pold", "frozen");
  f.network.begin("pold", { allowInternetAccess: true });
  const again = new WarmPool({ ...f, sizes: {}, pidsLimit: 100 });
  assert.deepEqual(await again.discardRecorded(), ["pold"]);
  assert.equal(f.containers.size + f.networks.size + f.rows.size, 0);
});
