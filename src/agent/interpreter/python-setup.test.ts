import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { describe, it } from "node:test";
import { CHART_DESCRIBER_CODE, SETUP_CODE } from "./python-setup.js";

// The host's python has neither IPython nor matplotlib: this checks what needs neither (the code
// compiles, the helpers install, nothing heavy is imported, a non-figure describes as nothing).
// The charts themselves are checked in a real kernel by test/e2e/charts.test.ts.
const pythonPath = process.env.CUBICLE_PYTHON ?? "/usr/bin/python3";

function python(program: string): string {
  return execFileSync(pythonPath, ["-c", program], { encoding: "utf8", env: { PATH: "/usr/bin:/bin" } }).trim();
}

describe("python setup code", () => {
  it("compiles, including the chart describer compiled only on the first figure", () => {
    const out = python(
      `setup, describer = ${JSON.stringify(SETUP_CODE)}, ${JSON.stringify(CHART_DESCRIBER_CODE)}\ncompile(setup, "setup", "exec")\ncompile(describer, "describer", "exec")\nprint("ok")`,
    );
    assert.equal(out, "ok");
  });

  it("installs the _cubicle helper without importing matplotlib, numpy, pandas or Pillow", () => {
    const out = python(
      `${SETUP_CODE}\nimport sys, json\nhelper = sys.modules["_cubicle"]\nheavy = [m for m in ("matplotlib", "numpy", "pandas", "PIL", "PIL.Image") if m in sys.modules]\nprint(json.dumps({"heavy": heavy, "described": helper.describe_figure(object()), "names": [n for n in ("CHART_DESCRIBER", "_cubicle_setup") if n in globals()]}))`,
    );
    assert.deepEqual(JSON.parse(out), { heavy: [], described: null, names: [] });
  });

  it("the lazy Pillow hook leaves other imports and a missing PIL alone", () => {
    const out = python(
      `${SETUP_CODE}\nimport json\nimport email.utils\ntry:\n    import PIL.Image\n    outcome = "imported"\nexcept ImportError as error:\n    outcome = type(error).__name__\nprint(json.dumps([email.utils.__name__, outcome]))`,
    );
    const [other, pil] = JSON.parse(out) as [string, string];
    assert.equal(other, "email.utils");
    assert.ok(pil === "ModuleNotFoundError" || pil === "imported", pil);
  });

  it("env helper sets and restores per-call variables", () => {
    const out = python(
      `${SETUP_CODE}\nimport os, sys, json\nos.environ["KEEP"] = "old"\nhelper = sys.modules["_cubicle"]\nhelper.set_env(json.dumps({"KEEP": "new", "ONLY_NOW": "1"}))\nduring = [os.environ["KEEP"], os.environ["ONLY_NOW"]]\nhelper.restore_env()\nprint(json.dumps([during, os.environ["KEEP"], "ONLY_NOW" in os.environ]))`,
    );
    assert.deepEqual(JSON.parse(out), [["new", "1"], "old", false]);
  });
});
