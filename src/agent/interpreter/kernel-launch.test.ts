import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { useRunAsHelper } from "../process/launch.js";
import { lookupUser } from "../users.js";
import { BashKernel } from "./bash-kernel.js";
import { JsKernel } from "./js-kernel.js";
import type { ExecutionOutput, Kernel, KernelLaunch } from "./types.js";

const runAs = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../../dist/agent/run-as");
const isRoot = process.getuid?.() === 0;

async function stdoutOf(kernel: Kernel, code: string): Promise<string> {
  const outputs: ExecutionOutput[] = [];
  await kernel.execute({ code, envVars: {} }, (output) => outputs.push(output), new AbortController().signal);
  const error = outputs.find((output) => output.type === "error");
  assert.equal(error, undefined, JSON.stringify(error));
  return outputs.map((output) => (output.type === "stdout" ? output.text : "")).join("");
}

describe("interpreter kernels are started like commands (process/launch.ts)", { skip: !(isRoot && fs.existsSync(runAs)) && "needs root and dist/agent/run-as" }, () => {
  const runtimeDir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-kernel-launch-"));
  fs.chmodSync(runtimeDir, 0o711);
  before(() => useRunAsHelper(runAs));
  after(() => {
    useRunAsHelper(undefined);
    fs.rmSync(runtimeDir, { recursive: true, force: true });
  });

  const nobody = lookupUser("nobody");
  const launches: Array<[string, KernelLaunch]> = [
    ["root", { cwd: "/tmp", env: { PATH: "/usr/bin:/bin" } }],
    ["nobody, with its groups", { cwd: "/tmp", env: { PATH: "/usr/bin:/bin" }, uid: nobody.uid, gid: nobody.gid, groups: [nobody.gid, 27] }],
  ];

  for (const [who, launch] of launches) {
    it(`runs a bash kernel as ${who}, marked for the OOM killer`, async () => {
      const kernel = new BashKernel({ launch, runtimeDir });
      await kernel.start();
      try {
        const [score, ids] = (await stdoutOf(kernel, "cat /proc/self/oom_score_adj; id -u; id -G")).split("\n");
        assert.equal(score, "1000");
        assert.equal(ids, String(launch.uid ?? 0));
      } finally {
        await kernel.shutdown();
      }
    });
  }

  it("runs a javascript kernel marked for the OOM killer, as its user with the user's groups", async () => {
    const launch = launches[1]![1];
    const kernel = new JsKernel({ language: "javascript", nodeCommand: [process.execPath], launch });
    await kernel.start();
    try {
      const text = await stdoutOf(kernel, "console.log(require('fs').readFileSync('/proc/self/oom_score_adj', 'utf8').trim(), process.getuid(), process.getgroups().sort((a, b) => a - b).join(','))");
      assert.equal(text.trim(), `1000 ${nobody.uid} 27,${nobody.gid}`);
    } finally {
      await kernel.shutdown();
    }
  });
});
