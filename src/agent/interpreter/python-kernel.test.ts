import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { describe, it } from "node:test";
import { PythonKernel } from "./python-kernel.js";
import type { ExecutionOutput } from "./types.js";

const pythonPath = process.env.CUBICLE_PYTHON ?? "/usr/bin/python3";

function hasIpykernel(): boolean {
  try {
    execFileSync(pythonPath, ["-c", "import ipykernel"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

async function run(kernel: PythonKernel, code: string, envVars: Record<string, string> = {}, signal = new AbortController().signal) {
  const outputs: ExecutionOutput[] = [];
  await kernel.execute({ code, envVars }, (output) => outputs.push(output), signal);
  return outputs;
}

describe("PythonKernel (a real ipykernel)", { skip: hasIpykernel() ? false : `${pythonPath} has no ipykernel` }, () => {
  it("keeps state, streams, returns results and errors, interrupts, and reports its death", async () => {
    const kernel = new PythonKernel({ pythonPath, launch: { cwd: "/tmp", env: { PATH: "/usr/bin:/bin", HOME: "/tmp" } } });
    await kernel.start();
    try {
      await run(kernel, "x = 20");
      const outputs = await run(kernel, "print('hi')\nx * 2 + 2");
      assert.deepEqual(
        outputs.map((o) => o.type),
        ["number_of_executions", "stdout", "result"],
      );
      assert.equal(outputs.find((o) => o.type === "result" && o.text === "42")?.type, "result");

      const failed = await run(kernel, "raise KeyError('k')");
      const error = failed.find((o) => o.type === "error");
      assert.equal(error?.type === "error" && error.name, "KeyError");

      const env = await run(kernel, "import os\nos.environ['ONLY_NOW']", { ONLY_NOW: "1" });
      assert.equal(env.find((o) => o.type === "result")?.type === "result" && (env.find((o) => o.type === "result") as { text?: string }).text, "1");
      const reverted = await run(kernel, "'ONLY_NOW' in os.environ");
      assert.equal((reverted.find((o) => o.type === "result") as { text?: string }).text, "False");

      const controller = new AbortController();
      setTimeout(() => controller.abort(), 300);
      const interrupted = await run(kernel, "import time\nwhile True: time.sleep(0.05)", {}, controller.signal);
      assert.equal((interrupted.find((o) => o.type === "error") as { name?: string }).name, "KeyboardInterrupt");
      assert.equal((await run(kernel, "x")).find((o) => o.type === "result")?.type, "result");

      const death = await run(kernel, "import os\nos._exit(1)");
      assert.equal((death.find((o) => o.type === "error") as { name?: string }).name, "UnexpectedEndOfExecution");
      assert.equal(kernel.exited, true);
    } finally {
      await kernel.shutdown();
    }
  });
});
