import assert from "node:assert/strict";
import { test } from "node:test";
import { KeyedMutex } from "./keyed-mutex.js";

test("operations on one key run one at a time, other keys do not wait", async () => {
  const mutex = new KeyedMutex();
  const order: string[] = [];
  const slow = mutex.run("a", async () => {
    order.push("a1 start");
    await new Promise((r) => setTimeout(r, 30));
    order.push("a1 end");
  });
  const second = mutex.run("a", async () => {
    order.push("a2");
  });
  const other = mutex.run("b", async () => {
    order.push("b");
  });
  await Promise.all([slow, second, other]);
  assert.deepEqual(order, ["a1 start", "b", "a1 end", "a2"]);
  await assert.rejects(mutex.run("a", async () => Promise.reject(new Error("boom"))), /boom/);
  assert.equal(await mutex.run("a", async () => 7), 7, "a failed operation releases the key");
});
