import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { SerialQueue } from "./serial-queue.js";

const tick = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe("SerialQueue", () => {
  it("runs tasks one at a time in order", async () => {
    const queue = new SerialQueue();
    const events: string[] = [];
    const task = (name: string, ms: number) => async () => {
      events.push(`start ${name}`);
      await tick(ms);
      events.push(`end ${name}`);
      return name;
    };
    const results = await Promise.all([queue.run(task("a", 20)), queue.run(task("b", 1)), queue.run(task("c", 5))]);
    assert.deepEqual(results, ["a", "b", "c"]);
    assert.deepEqual(events, ["start a", "end a", "start b", "end b", "start c", "end c"]);
  });

  it("keeps going after a failing task", async () => {
    const queue = new SerialQueue();
    await assert.rejects(queue.run(async () => Promise.reject(new Error("boom"))), /boom/);
    assert.equal(await queue.run(async () => 1), 1);
  });

  it("drops a waiting task whose signal aborts before its turn", async () => {
    const queue = new SerialQueue();
    const controller = new AbortController();
    let ran = false;
    const first = queue.run(() => tick(20));
    const second = queue.run(async () => {
      ran = true;
    }, controller.signal);
    assert.equal(queue.size, 2);
    controller.abort();
    await first;
    await assert.rejects(second);
    assert.equal(ran, false);
    assert.equal(queue.size, 0);
  });
});
