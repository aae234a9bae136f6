/**
 * ES module syntax in the JavaScript and TypeScript contexts, through the official
 * `@e2b/code-interpreter` SDK against a real server and a real `code-interpreter-v1` sandbox:
 * imports of Node built-ins and of packages "installed" in the sandbox (written with
 * sandbox.files.write, as the sandbox has no internet: a CommonJS one and an ESM-only one in the
 * working directory's node_modules, an ESM-only one in ~/.node_modules), top-level await,
 * dynamic import, require alongside, exports, TypeScript, and the errors of bad imports.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Sandbox, type Context } from "@e2b/code-interpreter";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;
let sandbox: Sandbox;

const packages: Record<string, string> = {
  "/home/user/node_modules/cjs-counter/package.json": JSON.stringify({ name: "cjs-counter", version: "1.0.0", main: "lib/index.js" }),
  "/home/user/node_modules/cjs-counter/lib/index.js": "let count = 0;\nmodule.exports = function next() { return ++count; };\nmodule.exports.label = 'cjs-counter';\n",
  "/home/user/node_modules/esm-greeter/package.json": JSON.stringify({ name: "esm-greeter", version: "1.0.0", type: "module", exports: { ".": { import: "./src/index.js" } } }),
  "/home/user/node_modules/esm-greeter/src/index.js": "export default function greet(name) { return `hello, ${name}`; }\nexport const punctuation = '!';\n",
  "/home/user/.node_modules/global-esm/package.json": JSON.stringify({ name: "global-esm", version: "1.0.0", type: "module", exports: { import: "./main.js" } }),
  "/home/user/.node_modules/global-esm/main.js": "export const where = 'global';\nexport default 'global default';\n",
  "/home/user/slow-module.mjs": "await new Promise(() => {});\n",
  "/tmp/other-project/node_modules/only-here/package.json": JSON.stringify({ name: "only-here", type: "module", exports: "./index.js" }),
  "/tmp/other-project/node_modules/only-here/index.js": "export const here = 'other project';\n",
};

before(async () => {
  server = await startTestServer({ defaultTemplates: ["base", "code-interpreter-v1"] });
  useServerForSdk(server);
  sandbox = await Sandbox.create();
  await sandbox.files.write(Object.entries(packages).map(([path, data]) => ({ path, data })));
});

after(async () => {
  await sandbox?.kill().catch(() => undefined);
  await server?.stop();
});

/** Runs JavaScript in the default context (or in `context`), asserting that it went without error. */
async function ok(code: string, context?: Context): Promise<string | undefined> {
  const execution = await (context ? sandbox.runCode(code, { context }) : sandbox.runCode(code, { language: "js" }));
  assert.equal(execution.error, undefined, `${code}\n→ ${JSON.stringify(execution.error)}`);
  assert.deepEqual(execution.logs.stderr, [], `${code}\n→ stderr ${execution.logs.stderr.join("")}`);
  return execution.text;
}

test("built-ins imported in every form stay bound in later calls", async () => {
  assert.equal(await ok("import fs from 'fs'\nimport { join } from 'node:path'\nimport * as os from 'os'"), undefined);
  assert.equal(await ok("[typeof fs.readdirSync, join('/home', 'user'), typeof os.hostname()]"), "[ 'function', '/home/user', 'string' ]");
  assert.equal(await ok("import { readFileSync } from 'node:fs'\nreadFileSync('/home/user/node_modules/cjs-counter/package.json', 'utf8').includes('cjs-counter')"), "true");
});

test("packages installed in the working directory: CommonJS and ESM-only, default and named", async () => {
  assert.equal(await ok("import next, { label } from 'cjs-counter'\nimport greet, { punctuation } from 'esm-greeter'\ngreet(label) + punctuation"), "hello, cjs-counter!");
  assert.equal(await ok("next() + next()"), "3");
  // Deno's npm: specifiers, as in E2B's examples, name the installed package.
  assert.equal(await ok("import greetAgain from \"npm:esm-greeter@1.0.0\"\ngreetAgain('npm')"), "hello, npm");
  // require sees the same CommonJS module instance.
  assert.equal(await ok("const counter = require('cjs-counter')\ncounter === next && counter()"), "3");
});

test("a package in ~/.node_modules imports as require would find it", async () => {
  assert.equal(await ok("import whereDefault, { where } from 'global-esm'\n`${whereDefault} / ${where}`"), "global default / global");
});

test("top-level await and dynamic import", async () => {
  assert.equal(await ok("const { punctuation: p } = await import('esm-greeter')\nconst waited = await new Promise((r) => setTimeout(() => r(p.repeat(3)), 20))\nwaited"), "!!!");
  assert.equal(await ok("waited"), "!!!");
  assert.equal(await ok("const mod = await import('global-esm'); mod.where"), "global");
});

test("a context resolves imports from its own working directory", async () => {
  const context = await sandbox.createCodeContext({ language: "javascript", cwd: "/tmp/other-project" });
  try {
    assert.equal(await ok("import { here } from 'only-here'\nhere", context), "other project");
    // /home/user/node_modules is not on this context's path; ~/.node_modules still is.
    const missing = await sandbox.runCode("import greet from 'esm-greeter'", { context });
    assert.match(missing.error?.value ?? "", /esm-greeter/);
    assert.equal(await ok("import { where } from 'global-esm'\nwhere", context), "global");
  } finally {
    await sandbox.removeCodeContext(context);
  }
});

test("export is dropped from declarations and export default evaluates its expression", async () => {
  assert.equal(await ok("export const exported = 20\nexport function plusOne(n) { return n + 1 }\nexport { exported as alias }\nplusOne(exported)"), "21");
  assert.equal(await ok("export default { doubled: exported * 2 }"), "{ doubled: 40 }");
});

test("typescript: import type, imports of built-ins and packages, top-level await", async () => {
  const execution = await sandbox.runCode(
    [
      "import type { Stats } from 'node:fs'",
      "import { statSync, type PathLike } from 'node:fs'",
      "import greet, { punctuation } from 'esm-greeter'",
      "const target: PathLike = '/home/user'",
      "const stats: Stats = statSync(target)",
      "const who: string = await Promise.resolve(stats.isDirectory() ? 'directory' : 'file')",
      "greet(who) + punctuation",
    ].join("\n"),
    { language: "ts" },
  );
  assert.equal(execution.error, undefined, JSON.stringify(execution.error));
  assert.equal(execution.text, "hello, directory!");
});

test("bad imports fail clearly and the kernel keeps working", async () => {
  const missing = await sandbox.runCode("import nothing from 'not-installed-anywhere'\n'unreached'", { language: "js" });
  assert.match(missing.error?.value ?? "", /not-installed-anywhere/);
  assert.equal(missing.text, undefined);

  const dynamicMissing = await sandbox.runCode("await import('./no-such-file.mjs')", { language: "js" });
  assert.match(dynamicMissing.error?.value ?? "", /no-such-file\.mjs/);

  const badSyntax = await sandbox.runCode("import { readFileSync from 'fs'", { language: "js" });
  assert.equal(badSyntax.error?.name, "SyntaxError");
  assert.match(badSyntax.error?.value ?? "", /import declaration.*line 1/);

  const nested = await sandbox.runCode("if (true) {\n  import fs from 'fs'\n}", { language: "js" });
  assert.equal(nested.error?.name, "SyntaxError");
  assert.match(nested.error?.value ?? "", /top level.*await import/);

  const noSuchExport = await sandbox.runCode("import { shout } from 'esm-greeter'", { language: "js" });
  assert.equal(noSuchExport.error?.name, "SyntaxError");
  assert.match(noSuchExport.error?.value ?? "", /does not provide an export named 'shout'/);

  await assert.rejects(sandbox.runCode("import './slow-module.mjs'", { language: "js", timeoutMs: 1_000 }), /timed out|timeout/i);
  assert.equal(await ok("greet('still here')"), "hello, still here");
});
