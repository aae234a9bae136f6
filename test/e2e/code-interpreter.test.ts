/**
 * `runCode` and code contexts through the official `@e2b/code-interpreter` SDK against a real
 * server and a real `code-interpreter-v1` sandbox: python on ipykernel, javascript, typescript,
 * bash, plots, DataFrames, errors, env vars, interrupts.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Sandbox } from "@e2b/code-interpreter";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;
let sandbox: Sandbox;

before(async () => {
  server = await startTestServer({ defaultTemplates: ["base", "code-interpreter-v1"] });
  useServerForSdk(server);
  sandbox = await Sandbox.create({ envs: { SANDBOX_WIDE: "from-envd" } });
});

after(async () => {
  await sandbox?.kill().catch(() => undefined);
  await server?.stop();
});

test("first runCode starts the python kernel", async () => {
  const execution = await sandbox.runCode("1+1");
  assert.equal(execution.text, "2");
});

test("state persists across runCode calls", async () => {
  await sandbox.runCode("counter = 40");
  const execution = await sandbox.runCode("counter += 2\ncounter");
  assert.equal(execution.text, "42");
  assert.ok((execution.executionCount ?? 0) > 1);
});

test("onStdout/onStderr stream while the cell runs", async () => {
  const seen: string[] = [];
  const execution = await sandbox.runCode(
    "import sys, time\nprint('one')\ntime.sleep(0.3)\nprint('two', file=sys.stderr)\n'done'",
    { onStdout: (m) => void seen.push(`out:${m.line}`), onStderr: (m) => void seen.push(`err:${m.line}`) },
  );
  assert.deepEqual(seen, ["out:one\n", "err:two\n"]);
  assert.deepEqual(execution.logs.stdout, ["one\n"]);
  assert.deepEqual(execution.logs.stderr, ["two\n"]);
  assert.equal(execution.text, "done");
});

test("errors carry name, value and traceback", async () => {
  const execution = await sandbox.runCode("def f():\n    raise ValueError('bad input')\nf()");
  assert.equal(execution.error?.name, "ValueError");
  assert.equal(execution.error?.value, "bad input");
  assert.match(execution.error?.traceback.replace(/\x1b\[[0-9;]*m/g, "") ?? "", /f\(\)/);
});

test("matplotlib figure comes back as png", async () => {
  const execution = await sandbox.runCode("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\nplt.show()");
  assert.equal(execution.error, undefined, execution.error?.traceback);
  const png = execution.results.find((r) => r.png);
  assert.ok(png, `no png among ${JSON.stringify(execution.results.map((r) => r.formats()))}`);
  assert.ok(Buffer.from(png.png!, "base64").subarray(1, 4).toString() === "PNG");
});

test("matplotlib figures also come back as chart data (line, bar, several axes)", async () => {
  const line = await sandbox.runCode(
    "import matplotlib.pyplot as plt\nplt.figure()\nplt.plot([1, 2, 3], [1, 4, 9], label='squares')\nplt.title('growth')\nplt.xlabel('n')\nplt.ylabel('n^2')\nplt.show()",
  );
  const lineChart = line.results.find((r) => r.chart)?.chart as any;
  assert.ok(lineChart, `no chart among ${JSON.stringify(line.results.map((r) => r.formats()))}`);
  assert.equal(lineChart.type, "line");
  assert.equal(lineChart.title, "growth");
  assert.equal(lineChart.x_label, "n");
  assert.deepEqual(lineChart.elements[0].points, [[1, 1], [2, 4], [3, 9]]);
  assert.equal(lineChart.elements[0].label, "squares");

  const bar = await sandbox.runCode("plt.figure()\nplt.bar(['a', 'b'], [3, 5])\nplt.show()");
  const barChart = bar.results.find((r) => r.chart)?.chart as any;
  assert.equal(barChart.type, "bar");
  assert.deepEqual(barChart.elements.map((e: { label: string; value: number }) => [e.label, e.value]), [["a", 3], ["b", 5]]);

  const both = await sandbox.runCode("fig, (left, right) = plt.subplots(1, 2)\nleft.plot([0, 1], [0, 1])\nright.scatter([1, 2], [3, 4])\nplt.show()");
  const superChart = both.results.find((r) => r.chart)?.chart as any;
  assert.equal(superChart.type, "superchart");
  assert.deepEqual(superChart.elements.map((c: { type: string }) => c.type), ["line", "scatter"]);
});

test("pandas DataFrame comes back as html and data", async () => {
  const execution = await sandbox.runCode("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', None], 'c': [1.5, float('nan')]})");
  assert.equal(execution.error, undefined, execution.error?.traceback);
  const main = execution.results.find((r) => r.isMainResult)!;
  assert.match(main.html ?? "", /<table/);
  assert.deepEqual(main.data, { a: [1, 2], b: ["x", null], c: [1.5, null] });
});

test("per-call env vars apply once and are reverted", async () => {
  const withEnv = await sandbox.runCode("import os\nos.environ.get('CALL_ONLY')", { envs: { CALL_ONLY: "yes" } });
  assert.equal(withEnv.text, "yes");
  const after = await sandbox.runCode("import os\nstr(os.environ.get('CALL_ONLY'))");
  assert.equal(after.text, "None");
  const sandboxWide = await sandbox.runCode("os.environ.get('SANDBOX_WIDE')");
  assert.equal(sandboxWide.text, "from-envd");
});

test("contexts: create, list, run, restart, delete", async () => {
  const context = await sandbox.createCodeContext({ cwd: "/tmp" });
  assert.equal(context.language, "python");
  assert.equal(context.cwd, "/tmp");
  const listed = await sandbox.listCodeContexts();
  assert.ok(listed.some((c) => c.id === context.id));
  assert.ok(listed.some((c) => c.language === "javascript"));
  await sandbox.runCode("isolated = 7", { context });
  assert.equal((await sandbox.runCode("import os\nos.getcwd()", { context })).text, "/tmp");
  assert.equal((await sandbox.runCode("isolated", { context })).text, "7");
  const fromDefault = await sandbox.runCode("isolated");
  assert.equal(fromDefault.error?.name, "NameError");
  await sandbox.restartCodeContext(context);
  assert.equal((await sandbox.runCode("isolated", { context })).error?.name, "NameError");
  await sandbox.removeCodeContext(context);
  assert.ok(!(await sandbox.listCodeContexts()).some((c) => c.id === context.id));
  await assert.rejects(sandbox.runCode("1", { context }), /not found/i);
});

test("timeoutMs interrupts the kernel and the context stays usable", async () => {
  await sandbox.runCode("survivor = 'still here'");
  const started = performance.now();
  await assert.rejects(sandbox.runCode("import time\nwhile True: time.sleep(0.1)", { timeoutMs: 1_000 }), /timed out|timeout/i);
  const next = await sandbox.runCode("survivor");
  assert.equal(next.text, "still here");
  assert.ok(performance.now() - started < 6_000, "the next call waited for the interrupted one too long");
});

test("a dying kernel is an error, then restarts", async () => {
  const death = await sandbox.runCode("import os\nos._exit(3)");
  assert.equal(death.error?.name, "UnexpectedEndOfExecution");
  const next = await sandbox.runCode("2*21");
  assert.equal(next.text, "42");
});

test("javascript: state, console, last expression", async () => {
  await sandbox.runCode("const greeting = 'hello'; let n = 1", { language: "js" });
  const lines: string[] = [];
  const execution = await sandbox.runCode("console.log(greeting, n); n += 1; ({ n, list: [1, 2] })", {
    language: "javascript",
    onStdout: (m) => void lines.push(m.line),
  });
  assert.equal(execution.error, undefined, JSON.stringify(execution.error));
  assert.deepEqual(lines, ["hello 1\n"]);
  assert.equal(execution.text, "{ n: 2, list: [ 1, 2 ] }");
});

test("javascript: top-level await and errors", async () => {
  const awaited = await sandbox.runCode("await new Promise((r) => setTimeout(() => r(5), 50))", { language: "js" });
  assert.equal(awaited.text, "5");
  const failed = await sandbox.runCode("null.x", { language: "js" });
  assert.equal(failed.error?.name, "TypeError");
});

test("typescript: types are stripped", async () => {
  const execution = await sandbox.runCode(
    "interface P { x: number }\nconst double = (p: P): number => p.x * 2;\nconst value: number = double({ x: 21 } as P);\nvalue",
    { language: "ts" },
  );
  assert.equal(execution.error, undefined, JSON.stringify(execution.error));
  assert.equal(execution.text, "42");
});

test("javascript context: timeout interrupts a busy loop", async () => {
  const context = await sandbox.createCodeContext({ language: "javascript" });
  await sandbox.runCode("var kept = 'yes'", { context });
  await assert.rejects(sandbox.runCode("while (true) {}", { context, timeoutMs: 1_000 }), /timed out|timeout/i);
  assert.equal((await sandbox.runCode("kept", { context })).text, "yes");
  await sandbox.removeCodeContext(context);
});

test("javascript: timeout interrupts a pending await; cells can be re-run", async () => {
  const context = await sandbox.createCodeContext({ language: "ts" });
  await sandbox.runCode("const kept: string = 'yes'", { context });
  await sandbox.runCode("const kept: string = 'again'", { context });
  await assert.rejects(sandbox.runCode("await new Promise(() => {})", { context, timeoutMs: 1_000 }), /timed out|timeout/i);
  assert.equal((await sandbox.runCode("kept", { context })).text, "again");
  await sandbox.removeCodeContext(context);
});

test("bash: timeout interrupts a loop and the shell survives", async () => {
  await sandbox.runCode("KEEP=1", { language: "bash" });
  await assert.rejects(sandbox.runCode("while true; do sleep 0.1; done", { language: "bash", timeoutMs: 1_000 }), /timed out|timeout/i);
  const after = await sandbox.runCode("echo keep=$KEEP; false", { language: "bash" });
  assert.equal(after.logs.stdout.join(""), "keep=1\n");
  assert.equal(after.error?.name, "ExitCodeError");
});

test("python kernel runs as the default user in the template's workdir", async () => {
  const execution = await sandbox.runCode("import os, pwd\npwd.getpwuid(os.getuid()).pw_name + ' ' + os.getcwd()");
  assert.equal(execution.text, "user /home/user");
});

test("bash runs with state", async () => {
  await sandbox.runCode("export GREETING=hi; cd /tmp", { language: "bash" });
  const execution = await sandbox.runCode("echo $GREETING from $(pwd); echo oops >&2", { language: "bash" });
  assert.deepEqual(execution.logs.stdout.join(""), "hi from /tmp\n");
  assert.deepEqual(execution.logs.stderr.join(""), "oops\n");
});

test("unsupported languages answer with a clear error", async () => {
  // r and java have kernels now (kernels-r-java.test.ts).
  await assert.rejects(sandbox.runCode("1", { language: "cobol" }), /400/);
});

test("the interpreter and envd live in one sandbox: files written by code are visible to files.read", async () => {
  await sandbox.runCode("open('/home/user/from-python.txt', 'w').write('written by python')");
  assert.equal(await sandbox.files.read("/home/user/from-python.txt"), "written by python");
  const run = await sandbox.commands.run("python3 -c 'import numpy, pandas, matplotlib; print(\"ok\")'");
  assert.equal(run.stdout, "ok\n");
});
