import assert from "node:assert/strict";
import { test } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { StartQueue } from "./start-queue.js";

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

const plenty = () => 8 * 1024 ** 3;

test("no more starts run at once than there are slots, and the others run in order", async () => {
  const queue = new StartQueue({ slots: 2, maxWaiting: 10, minAvailableBytes: 0, availableBytes: plenty });
  const gates = Array.from({ length: 5 }, deferred);
  const order: number[] = [];
  let running = 0;
  let most = 0;
  const runs = gates.map((gate, index) =>
    queue.run("create", async () => {
      order.push(index);
      most = Math.max(most, ++running);
      await gate.promise;
      running--;
    }),
  );
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(order, [0, 1]);
  assert.deepEqual(queue.counts(), { running: 2, waiting: 3, slots: 2 });
  for (const gate of gates) gate.resolve();
  await Promise.all(runs);
  assert.deepEqual(order, [0, 1, 2, 3, 4]);
  assert.equal(most, 2);
  assert.deepEqual(queue.counts(), { running: 0, waiting: 0, slots: 2 });
});

test("a user create goes before background starts that waited longer", async () => {
  const queue = new StartQueue({ slots: 1, maxWaiting: 10, minAvailableBytes: 0, availableBytes: plenty });
  const first = deferred();
  const order: string[] = [];
  const runs = [
    queue.run("background", async () => {
      order.push("refill-1");
      await first.promise;
    }),
    queue.run("background", async () => void order.push("refill-2")),
    queue.run("create", async () => void order.push("create")),
  ];
  await new Promise((r) => setImmediate(r));
  first.resolve();
  await Promise.all(runs);
  assert.deepEqual(order, ["refill-1", "create", "refill-2"]);
});

test("a failed start frees its slot", async () => {
  const queue = new StartQueue({ slots: 1, maxWaiting: 10, minAvailableBytes: 0, availableBytes: plenty });
  await assert.rejects(queue.run("create", async () => Promise.reject(new Error("boom"))), /boom/);
  assert.equal(await queue.run("create", async () => "next"), "next");
});

test("a create is refused at once with 429 and Retry-After when too many wait; background work still queues", async () => {
  const queue = new StartQueue({ slots: 1, maxWaiting: 2, minAvailableBytes: 0, availableBytes: plenty });
  const gate = deferred();
  const held = [0, 1, 2].map(() => queue.run("create", () => gate.promise));
  await new Promise((r) => setImmediate(r));
  let started = false;
  await assert.rejects(
    queue.run("create", async () => {
      started = true;
    }),
    (err: unknown) => {
      assert.ok(err instanceof CubicleError);
      assert.equal(err.httpStatus, 429);
      assert.ok(Number(err.details?.retryAfterSec) >= 1);
      return true;
    },
  );
  assert.equal(started, false, "nothing of the refused create ran");
  const background = queue.run("background", async () => "refilled");
  gate.resolve();
  await Promise.all(held);
  assert.equal(await background, "refilled");
});

test("a create is refused with 503 and Retry-After while the host is short of memory", async () => {
  let available = 100 * 1024 ** 2;
  const queue = new StartQueue({ slots: 4, maxWaiting: 10, minAvailableBytes: 256 * 1024 ** 2, availableBytes: () => available });
  await assert.rejects(queue.run("create", async () => undefined), (err: unknown) => err instanceof CubicleError && err.httpStatus === 503 && err.details?.retryAfterSec === 5);
  // Background work never fails for this: it only waits for a slot.
  assert.equal(await queue.run("background", async () => "ok"), "ok");
  available = 1024 ** 3;
  await new Promise((r) => setTimeout(r, 1100));
  assert.equal(await queue.run("create", async () => "served"), "served");
});
