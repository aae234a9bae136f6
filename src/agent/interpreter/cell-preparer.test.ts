import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import { inlineMaxChars, prepareCellOffLoop, setCellPreparerEntry } from "./cell-preparer.js";
import { prepareCell } from "./js-source.js";
import { measureEventLoop } from "../filesystem/test-helpers.js";

describe("cell preparation off the event loop", () => {
  // The worker runs this module's source (in a sandbox: the agent's bundle); Node 20 workers do
  // not inherit tsx's loader, so the worker registers it first.
  const source = new URL("./cell-preparer.ts", import.meta.url).href;
  setCellPreparerEntry({ eval: `import("tsx/esm/api").then(({ register }) => { register(); return import(${JSON.stringify(source)}); });` }, 1500);
  after(() => setCellPreparerEntry(undefined));

  it("prepares small and large cells exactly as prepareCell does", async () => {
    const small = "const a: number = 1\na + 1";
    assert.deepEqual(await prepareCellOffLoop(small, { typescript: true }), prepareCell(small, { typescript: true }));
    const large = "let total = 0\n" + "total += [1, 2, 3].map((n) => n * 2).length;\n".repeat(200) + "total";
    assert.ok(large.length > inlineMaxChars);
    assert.deepEqual(await prepareCellOffLoop(large, { typescript: false }), prepareCell(large, { typescript: false }));
  });

  it("keeps the agent responsive on a pathological TypeScript cell, and fails it after the time limit", async () => {
    // Inline, this took ~4 s of the event loop (the bracket scans are quadratic).
    const pathological = "(".repeat(60_000);
    let failure: unknown;
    // The worker's CPU counts in the process's too: what shows the event loop free is that its timers ran all along.
    const loop = await measureEventLoop(() => prepareCellOffLoop(pathological, { typescript: true }).catch((error: unknown) => (failure = error)));
    assert.ok(loop.ticks >= 50, `only ${loop.ticks} timers ran in the 1.5 s the cell was being prepared`);
    assert.match((failure as Error).message, /could not be prepared within 1.5 s/);
    // The preparer was replaced: the next large cell works.
    const next = "1 + 1;\n".repeat(500);
    assert.equal((await prepareCellOffLoop(next, { typescript: true })).code, prepareCell(next, { typescript: true }).code);
  });
});
