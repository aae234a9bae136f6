/**
 * The JavaScript/TypeScript kernel as the agent runs it — a real Node child — with ES module
 * syntax: imports of built-ins and of CommonJS and ESM-only packages (in the working directory's
 * node_modules and in the folders `require` also searches), dynamic import, exports, errors.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { JsKernel } from "./js-kernel.js";
import type { ErrorOutput, ExecutionOutput, ResultOutput } from "./types.js";

interface Ran {
  text: string | undefined;
  error: ErrorOutput | undefined;
  stdout: string;
  stderr: string;
}

async function run(kernel: JsKernel, code: string, timeoutMs = 10_000): Promise<Ran> {
  const outputs: ExecutionOutput[] = [];
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    await kernel.execute({ code, envVars: {} }, (output) => outputs.push(output), controller.signal);
  } finally {
    clearTimeout(timer);
  }
  const streamed = (type: string) => outputs.flatMap((o) => (o.type === type ? [(o as { text: string }).text] : [])).join("");
  return {
    text: outputs.find((o): o is ResultOutput => o.type === "result")?.text,
    error: outputs.find((o): o is ErrorOutput => o.type === "error"),
    stdout: streamed("stdout"),
    stderr: streamed("stderr"),
  };
}

async function ok(kernel: JsKernel, code: string): Promise<string | undefined> {
  const ran = await run(kernel, code);
  assert.equal(ran.error, undefined, `${code}\n→ ${JSON.stringify(ran.error)}`);
  assert.equal(ran.stderr, "", `${code}\n→ stderr ${ran.stderr}`);
  return ran.text;
}

function writeFiles(root: string, files: Record<string, string>): void {
  for (const [name, text] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(root, name)), { recursive: true });
    fs.writeFileSync(path.join(root, name), text);
  }
}

describe("JavaScript kernel: ES module syntax", () => {
  let root: string;
  let work: string;
  let js: JsKernel;
  let ts: JsKernel;

  before(async () => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-js-esm-"));
    work = path.join(root, "work");
    const home = path.join(root, "home");
    const nodePath = path.join(root, "shared-lib");
    writeFiles(work, {
      "node_modules/cjs-pkg/package.json": JSON.stringify({ name: "cjs-pkg", main: "lib/main.js" }),
      "node_modules/cjs-pkg/lib/main.js": "exports.greet = (n) => 'hello ' + n; exports.kind = 'cjs';",
      "node_modules/cjs-dynamic/index.js": "const api = {}; for (const k of ['alpha', 'beta']) api[k] = k.toUpperCase(); module.exports = api;",
      "node_modules/require-only/package.json": JSON.stringify({ name: "require-only", exports: { require: "./index.cjs" } }),
      "node_modules/require-only/index.cjs": "module.exports = { onlyRequire: true };",
      "node_modules/esm-only/package.json": JSON.stringify({ name: "esm-only", type: "module", exports: { ".": { import: "./index.js" }, "./extra": { import: "./extra.js" } } }),
      "node_modules/esm-only/index.js": "export default function twice(x) { return 2 * x }\nexport const named = 'esm named';",
      "node_modules/esm-only/extra.js": "export const extra = 'extra';",
      "node_modules/esm-tla/package.json": JSON.stringify({ name: "esm-tla", type: "module", main: "index.js" }),
      "node_modules/esm-tla/index.js": "export const ready = await new Promise((r) => setTimeout(() => r('awaited at load'), 20));",
      "node_modules/broken-esm/package.json": JSON.stringify({ name: "broken-esm", type: "module", main: "index.js" }),
      "node_modules/broken-esm/index.js": "export const = 1;",
      "node_modules/needs-missing/package.json": JSON.stringify({ name: "needs-missing", type: "module", main: "index.js" }),
      "node_modules/needs-missing/index.js": "import 'left-pad-never-installed';",
      "local.mjs": "export const local = 'local module';",
      "reexported.mjs": "globalThis.sideEffect = 'ran'; export const reexported = 1;",
      "util.js": "module.exports = { util: 'util via require resolution' };",
      "data.json": JSON.stringify({ answer: 42 }),
    });
    // Not under the working directory: where `require` finds them through NODE_PATH and ~/.node_modules.
    writeFiles(nodePath, {
      "shared-esm/package.json": JSON.stringify({ name: "shared-esm", type: "module", exports: { import: "./main.js" } }),
      "shared-esm/main.js": "export default 'shared default'; export const shared = 'shared named';",
    });
    writeFiles(home, {
      ".node_modules/home-cjs/package.json": JSON.stringify({ name: "home-cjs", main: "x.js" }),
      ".node_modules/home-cjs/x.js": "module.exports = function home() { return 'home cjs' };",
      ".node_modules/home-esm/package.json": JSON.stringify({ name: "home-esm", type: "module", main: "m.js" }),
      ".node_modules/home-esm/m.js": "export const home = 'home esm';",
    });
    const launch = { cwd: work, env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: home, NODE_PATH: nodePath } };
    js = new JsKernel({ language: "javascript", nodeCommand: [process.execPath], launch });
    ts = new JsKernel({ language: "typescript", nodeCommand: [process.execPath], launch });
    await Promise.all([js.start(), ts.start()]);
  });

  after(async () => {
    await Promise.all([js?.shutdown(), ts?.shutdown()]);
    fs.rmSync(root, { recursive: true, force: true });
  });

  it("imports built-ins in every form, and the names persist to later cells", async () => {
    assert.equal(await ok(js, "import fs from 'fs'\nimport { join } from 'node:path'\nimport * as os from 'os'"), undefined);
    assert.equal(await ok(js, "typeof fs.readFileSync + ' ' + join('a', 'b') + ' ' + typeof os.cpus"), "function a/b function");
    assert.equal(await ok(js, "import path, { basename as base } from 'path'; [path.sep, base('/x/y.txt')]"), "[ '/', 'y.txt' ]");
    assert.equal(await ok(js, "import 'node:util'\nimport {} from 'node:url'\n'side effects only'"), "side effects only");
  });

  it("imports CommonJS and ESM-only packages from the working directory's node_modules", async () => {
    assert.equal(await ok(js, "import cjs, { greet } from 'cjs-pkg'\n[cjs.kind, greet('you')]"), "[ 'cjs', 'hello you' ]");
    // Node's static analysis cannot see these names; module.exports has them.
    assert.equal(await ok(js, "import { alpha, beta } from 'cjs-dynamic'; alpha + beta"), "ALPHABETA");
    assert.equal(await ok(js, "import twice, { named } from 'esm-only'\nimport { extra } from 'esm-only/extra'\n[twice(21), named, extra]"), "[ 42, 'esm named', 'extra' ]");
    assert.equal(await ok(js, "import { ready } from 'esm-tla'; ready"), "awaited at load");
    assert.equal(await ok(js, "import twiceAgain from 'npm:esm-only@^1.0.0'\nimport { extra as e } from 'npm:esm-only/extra'\nimport { kind } from 'npm:cjs-pkg@1/lib/main.js'\n[twiceAgain(1), e, kind]"), "[ 2, 'extra', 'cjs' ]");
    // Node's loader finds no entry for `import` in this package's exports; require's is taken.
    assert.equal(await ok(js, "import { onlyRequire } from 'require-only'; onlyRequire"), "true");
  });

  it("imports packages from the folders require searches beyond the working directory", async () => {
    assert.equal(await ok(js, "import sharedDefault, { shared } from 'shared-esm'\n[sharedDefault, shared]"), "[ 'shared default', 'shared named' ]");
    assert.equal(await ok(js, "import home from 'home-cjs'\nimport { home as homeEsm } from 'home-esm'\nhome() + ', ' + homeEsm"), "home cjs, home esm");
    assert.equal(await ok(js, "const viaRequire = require('home-cjs'); viaRequire === home"), "true");
  });

  it("imports local files, JSON with an attribute, and files require would find without an extension", async () => {
    assert.equal(await ok(js, "import { local } from './local.mjs'\nimport data from './data.json' with { type: 'json' }\nimport { util } from './util'\n[local, data.answer, util]"), "[ 'local module', 42, 'util via require resolution' ]");
  });

  it("runs top-level await with imports, and dynamic import resolves like a static one", async () => {
    assert.equal(await ok(js, "import { setTimeout as sleep } from 'node:timers/promises'\nconst slept = await sleep(10, 'slept')\nslept"), "slept");
    assert.equal(await ok(js, "slept"), "slept");
    assert.equal(await ok(js, "const { shared: again } = await import('shared-esm'); again"), "shared named");
    assert.equal(await ok(js, "const load = async () => (await import('esm-only')).named; await load()"), "esm named");
  });

  it("mixes import with require and with re-declaring cells", async () => {
    assert.equal(await ok(js, "const req = require('cjs-pkg')\nimport viaImport from 'cjs-pkg'\nreq === viaImport"), "true");
    assert.equal(await ok(js, "import { greet as g } from 'cjs-pkg'\nconst counter = 1\ncounter"), "1");
    assert.equal(await ok(js, "import { greet as g } from 'cjs-pkg'\nconst counter = 2\ng(counter)"), "hello 2");
  });

  it("drops export keywords and evaluates export default", async () => {
    assert.equal(await ok(js, "export const exported = 5\nexport function exportedFn() { return exported + 1 }\nexport class Exported {}\nexport { exported as renamed }\nexportedFn()"), "6");
    assert.equal(await ok(js, "exported + exportedFn() + typeof Exported"), "11function");
    assert.equal(await ok(js, "export default { total: exported * 2 }"), "{ total: 10 }");
    assert.equal(await ok(js, "export default function defaultFn() { return 'named default' }\ndefaultFn()"), "named default");
    // Re-exports load the module (its side effects run) and bind nothing.
    assert.equal(await ok(js, "export * from './reexported.mjs'\nexport { reexported as other } from './reexported.mjs'\ntypeof reexported + ' ' + typeof other + ' ' + sideEffect"), "undefined undefined ran");
  });

  it("reports a missing module by name, without breaking the kernel", async () => {
    const missing = await run(js, "import nope from 'no-such-package-anywhere'\n'not reached'");
    assert.match(missing.error?.value ?? "", /no-such-package-anywhere/);
    assert.equal(missing.text, undefined);
    assert.match((await run(js, "import './no-such-file.mjs'")).error?.value ?? "", /no-such-file\.mjs/);
    const nested = await run(js, "import 'needs-missing'");
    assert.match(nested.error?.value ?? "", /left-pad-never-installed/);
    const dynamic = await run(js, "await import('also-missing')");
    assert.match(dynamic.error?.value ?? "", /also-missing/);
    assert.equal(await ok(js, "'still alive'"), "still alive");
  });

  it("reports a missing named export, a broken module and bad import syntax as SyntaxErrors", async () => {
    const named = await run(js, "import { notThere } from 'esm-only'");
    assert.equal(named.error?.name, "SyntaxError");
    assert.match(named.error?.value ?? "", /does not provide an export named 'notThere' \(line 1\)/);
    // One failing import binds none of the cell's names.
    const partly = await run(js, "import { named as boundTooEarly } from 'esm-only'\nimport { alsoNotThere } from 'esm-only'");
    assert.match(partly.error?.value ?? "", /alsoNotThere.*line 2/);
    assert.equal(await ok(js, "typeof boundTooEarly"), "undefined");
    assert.equal((await run(js, "import { x } from 'broken-esm'")).error?.name, "SyntaxError");
    for (const bad of ["import { from 'fs'", "import fs from", "import fs 'fs'", "import * from 'fs'", "import { a b } from 'fs'", "if (true) { import fs from 'fs' }", "import fs from 'fs' fs.x"]) {
      const ran = await run(js, bad);
      assert.equal(ran.error?.name, "SyntaxError", `${bad} → ${JSON.stringify(ran.error)}`);
    }
    // A syntax error in the cell's body loads nothing.
    const body = await run(js, "import 'needs-missing'\nconst = 1");
    assert.equal(body.error?.name, "SyntaxError");
    assert.doesNotMatch(body.error?.value ?? "", /left-pad/);
  });

  it("interrupts an import whose module never finishes loading", async () => {
    fs.writeFileSync(path.join(work, "hangs.mjs"), "await new Promise(() => {});");
    const started = Date.now();
    const ran = await run(js, "import './hangs.mjs'", 500);
    assert.equal(ran.error?.name, "Interrupted");
    assert.ok(Date.now() - started < 2_000);
    assert.equal(await ok(js, "1 + 1"), "2");
  });

  it("typescript: import type, inline type imports, imports and top-level await", async () => {
    assert.equal(
      await ok(ts, "import type { Stats } from 'node:fs'\nimport { readFileSync, type PathLike } from 'node:fs'\nimport twice, { named as n } from 'esm-only'\nconst file: PathLike = './data.json'\nconst parsed: { answer: number } = JSON.parse(readFileSync(file, 'utf8'))\ntwice(parsed.answer) + n.length"),
      "93",
    );
    // A named import the module lacks may be a type (tsc would drop it): skipped, not an error.
    assert.equal(await ok(ts, "import { named, SomeInterface } from 'esm-only'\ntypeof SomeInterface"), "undefined");
    // Only types: the import goes, module and all.
    assert.equal(await ok(ts, "import { type Missing } from 'types-only-package'\nconst v: Missing | number = await Promise.resolve(3)\nv"), "3");
    assert.equal(await ok(ts, "import cp = require('node:child_process')\ntypeof cp.spawn"), "function");
    assert.equal(await ok(ts, "export interface Shape { side: number }\nexport const square = (s: Shape): number => s.side ** 2\nsquare({ side: 4 })"), "16");
  });
});
