import assert from "node:assert/strict";
import { test } from "node:test";
import type { Microvm } from "./qemu.js";
import { SpareQemus, type Spare } from "./spare-qemus.js";

/** The pool's bookkeeping with spares that are records (the runtime's make QEMUs: microvm.test.ts, e2e microvm.test.ts). */
function pool(options: { perImage?: number; images?: number; stamp?: (imageId: string) => string; failFor?: string; exited?: Promise<void> } = {}) {
  const spawned: string[] = [];
  const discarded: string[] = [];
  let uid = 100;
  const spares = new SpareQemus({
    perImage: options.perImage ?? 1,
    images: options.images ?? 2,
    delayMs: 5,
    spawn: async (imageId, slot) => {
      await new Promise((resolve) => setTimeout(resolve, 2));
      if (imageId === options.failFor) throw new Error("QEMU did not start");
      if (imageId.startsWith("gone/")) return undefined;
      spawned.push(`${imageId}#${slot}`);
      return { imageId, stamp: options.stamp?.(imageId) ?? "v1", dir: `/spares/s${slot}`, vm: (options.exited ? { exited: options.exited } : {}) as Microvm, uid: uid++, tapName: `qs${slot}`, netnsName: `spare-s${slot}` } satisfies Spare;
    },
    discard: async (spare) => {
      discarded.push(spare.dir);
    },
  });
  const filled = async () => {
    await new Promise((resolve) => setTimeout(resolve, 20));
    await spares.settled();
  };
  return { spares, spawned, discarded, filled };
}

test("a wanted image gets its spares a little later, one at a time; a take hands one out once", async () => {
  const { spares, spawned, filled } = pool({ perImage: 2 });
  assert.equal(spares.take("snapshot/a", "v1"), undefined, "nothing before anything was wanted");
  spares.want("snapshot/a");
  assert.deepEqual(spares.counts(), {}, "not at once: the restore that asked runs first");
  await filled();
  assert.deepEqual(spares.counts(), { "snapshot/a": 2 });
  assert.deepEqual(spawned, ["snapshot/a#0", "snapshot/a#1"]);
  const taken = spares.take("snapshot/a", "v1");
  assert.equal(taken?.dir, "/spares/s0");
  assert.deepEqual(spares.counts(), { "snapshot/a": 1 });
  assert.ok(!spares.uids().has(taken!.uid), "a taken spare's uid is the guest's now, not the pool's");
  await spares.close();
});

test("a spare of an image rewritten under the same id is not handed out, and is ended", async () => {
  let version = "v1";
  const { spares, discarded, filled } = pool({ stamp: () => version });
  spares.want("warm/base-1");
  await filled();
  version = "v2";
  assert.equal(spares.take("warm/base-1", "v2"), undefined);
  await new Promise((resolve) => setTimeout(resolve, 5));
  assert.deepEqual(discarded, ["/spares/s0"]);
  assert.deepEqual(spares.counts(), {});
  await spares.close();
});

test("only the most recently wanted images keep spares; a removed image's end; close ends all", async () => {
  const { spares, discarded, filled } = pool({ images: 2 });
  spares.want("snapshot/a");
  await filled();
  spares.want("snapshot/b");
  await filled();
  spares.want("snapshot/c");
  await filled();
  assert.deepEqual(Object.keys(spares.counts()).sort(), ["snapshot/b", "snapshot/c"]);
  assert.deepEqual(discarded, ["/spares/s0"], "a's spare ended when a third image was wanted");
  await spares.drop("snapshot/b");
  assert.deepEqual(Object.keys(spares.counts()), ["snapshot/c"]);
  assert.equal(spares.take("snapshot/b", "v1"), undefined);
  await spares.close();
  assert.deepEqual(spares.counts(), {});
  assert.equal(discarded.length, 3);
  spares.want("snapshot/d");
  await filled();
  assert.deepEqual(spares.counts(), {}, "nothing is made after close");
});

test("an image that cannot be loaded or is gone keeps no spares, and the pool goes on with the others", async () => {
  const { spares, filled } = pool({ images: 3, failFor: "snapshot/bad" });
  spares.want("gone/x");
  spares.want("snapshot/bad");
  spares.want("snapshot/good");
  await filled();
  assert.deepEqual(spares.counts(), { "snapshot/good": 1 });
  // Wanted again after its removal: it gets spares again (a new image under that id).
  await spares.drop("snapshot/good");
  spares.want("snapshot/good");
  await filled();
  assert.deepEqual(spares.counts(), { "snapshot/good": 1 });
  await spares.close();
});

test("an image removed while its spare is being made does not keep it", async () => {
  const { spares, discarded } = pool();
  spares.want("snapshot/a");
  await new Promise((resolve) => setTimeout(resolve, 6));
  await spares.drop("snapshot/a");
  await spares.settled();
  await new Promise((resolve) => setTimeout(resolve, 10));
  assert.deepEqual(spares.counts(), {});
  assert.equal(discarded.length, 1, "the spare made meanwhile was ended");
  await spares.close();
});

test("perImage 0 makes nothing", async () => {
  const { spares, spawned, filled } = pool({ perImage: 0 });
  spares.want("snapshot/a");
  await filled();
  assert.deepEqual(spawned, []);
  await spares.close();
});

test("a spare whose QEMU ends while it waits leaves the pool, and its files go", async () => {
  let end!: () => void;
  const exited = new Promise<void>((resolve) => (end = resolve));
  const { spares, discarded, filled } = pool({ exited });
  spares.want("snapshot/a");
  await filled();
  assert.deepEqual(spares.counts(), { "snapshot/a": 1 });
  end();
  await new Promise((resolve) => setTimeout(resolve, 5));
  assert.deepEqual(spares.counts(), { "snapshot/a": 0 });
  assert.deepEqual(discarded, ["/spares/s0"]);
  assert.equal(spares.take("snapshot/a", "v1"), undefined);
  await spares.close();
});

test("a fill with nothing to make (the image has its spares) leaves the pool able to fill again and to close", async () => {
  const { spares, spawned } = pool();
  // Plain waits, not settled(): a fill that never ended would make settled() spin forever.
  const wait = () => new Promise((resolve) => setTimeout(resolve, 40));
  spares.want("snapshot/a");
  await wait();
  // Wanted again while it has its spare: the fill finds nothing to make and ends at once.
  spares.want("snapshot/a");
  await wait();
  assert.deepEqual(spawned, ["snapshot/a#0"]);
  // Taken: the next want makes another.
  assert.ok(spares.take("snapshot/a", "v1"));
  spares.want("snapshot/a");
  await wait();
  assert.deepEqual(spawned, ["snapshot/a#0", "snapshot/a#1"], "the pool filled again");
  await spares.close();
});
