import assert from "node:assert/strict";
import { test } from "node:test";
import { parseImageId } from "../runtime/images.js";
import { fakeHost, fakeTemplate } from "./test-fakes.js";
import type { TemplateInfo } from "./types.js";
import { WarmSnapshots } from "./warm-snapshots.js";

const template: TemplateInfo = {
  ...fakeTemplate,
  templateId: "code-interpreter-v1",
  aliases: ["code-interpreter-v1", "ci"],
  image: { ...fakeTemplate.image, templateId: "code-interpreter-v1" },
};

/** The counting fakes, with creates that always fail (no real sandbox). */
function fakes(kit: { fingerprint: string }) {
  return fakeHost({ failCreates: Infinity, fingerprint: () => kit.fingerprint });
}

test("an image is used only while its template and kit fingerprints are current; a failed build leaves nothing", async () => {
  const kit = { fingerprint: "kit-1" };
  let recipe = "recipe-1";
  const f = fakes(kit);
  const snapshots = new WarmSnapshots({ ...f, templates: ["ci"], pidsLimit: 100, templateFingerprint: async () => recipe });
  assert.equal(snapshots.isEnabled(template), true, "configured by alias");
  assert.equal(snapshots.isEnabled({ ...template, templateId: "base", aliases: ["base"] }), false);

  // Nothing built yet: no image, a build starts (and fails here: no real runtime).
  assert.equal(await snapshots.imageFor(template), undefined);
  await snapshots.close();
  assert.deepEqual(snapshots.counts()[template.templateId], undefined);
  assert.equal(f.networks.size, 0, "the failed build released its network");
  assert.equal(f.rows.size, 0, "and its pool row");

  // An image made under the current fingerprints is found (as after a restart).
  const fresh = new WarmSnapshots({ ...f, templates: ["ci"], pidsLimit: 100, templateFingerprint: async () => recipe });
  const [built] = await f.runtime.images.list("warm");
  assert.equal(built, undefined, "a failed build leaves no image");
  const id = await fresh.currentImageId(template);
  f.containers.set("source", "running");
  await f.runtime.checkpoint("source", { kind: "warm", name: parseImageId(id).name }, { memory: true, leaveRunning: false });
  assert.equal(await fresh.imageFor(template), id);
  assert.equal(fresh.counts()[template.templateId]?.ready, true);

  kit.fingerprint = "kit-2";
  assert.equal(await fresh.imageFor(template), undefined, "a new agent kit invalidates memory images");
  kit.fingerprint = "kit-1";
  recipe = "recipe-2";
  assert.equal(await fresh.imageFor(template), undefined, "so does a new template recipe");
  await fresh.close();
  assert.deepEqual(await f.runtime.images.list("warm"), [], "the rebuild removed the stale image");
});

test("a template of another runtime gets warm images only where that runtime runs, keyed by that runtime's kit", async () => {
  const f = fakeHost({ failCreates: Infinity, fingerprint: ((runtime?: string) => `kit-of-${runtime ?? "the default"}`) as () => string });
  const snapshots = new WarmSnapshots({ ...f, templates: ["ci"], pidsLimit: 100, templateFingerprint: async () => "recipe" });
  const microvmTemplate: TemplateInfo = { ...template, runtime: "microvm" };
  assert.equal(snapshots.isEnabled(microvmTemplate), false, "a container-only host makes no microVM images");
  const runtime = f.runtime as typeof f.runtime & { runs?: (name: string) => boolean };
  runtime.runs = () => true;
  assert.equal(snapshots.isEnabled(microvmTemplate), true);
  assert.notEqual(await snapshots.currentImageId(microvmTemplate), await snapshots.currentImageId(template), "the microVM kit keys its image");
  assert.equal(await snapshots.currentImageId({ ...template, runtime: undefined }), await snapshots.currentImageId(template));
  await snapshots.close();
});
