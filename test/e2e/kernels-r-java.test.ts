/**
 * R (IRkernel) and Java (the jshell-based kernel, java-kernel-program.ts) through the official
 * `@e2b/code-interpreter` SDK against a real server and a real `code-interpreter-v1` sandbox:
 * results, streams, errors, state, env vars (per call and sandbox-wide), cwd, contexts,
 * timeouts, a dying kernel, huge output and bad input.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
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

const stdoutOf = (execution: { logs: { stdout: string[] } }) => execution.logs.stdout.join("");

/**
 * IRkernel publishes a cell's visible value as display_data, not execute_result, so (as with
 * upstream's server) it is a result that is not the main one: `execution.text` stays unset.
 */
const rValue = (execution: { results: Array<{ text?: string; isMainResult: boolean }> }) => {
  assert.ok(execution.results.every((r) => !r.isMainResult));
  return execution.results.at(-1)?.text;
};

describe("r", () => {
  test("the last value prints as R prints it, and state persists", async () => {
    const first = await sandbox.runCode("x <- 40", { language: "r" });
    assert.equal(first.error, undefined, first.error?.traceback);
    const execution = await sandbox.runCode("x <- x + 2\nx", { language: "r" });
    assert.equal(execution.error, undefined, execution.error?.traceback);
    assert.equal(rValue(execution), "[1] 42");
    assert.ok((execution.executionCount ?? 0) > 1);
    const vector = await sandbox.runCode("c(1.5, 2, 3)", { language: "r" });
    assert.equal(rValue(vector), "[1] 1.5 2.0 3.0");
    assert.match(vector.results[0]?.html ?? "", /<li>1.5<\/li>/);
  });

  test("stdout and stderr stream while the cell runs", async () => {
    const seen: string[] = [];
    const execution = await sandbox.runCode('cat("one\\n")\nSys.sleep(0.3)\nmessage("two")\ninvisible(NULL)', {
      language: "r",
      onStdout: (m) => void seen.push(`out:${m.line}`),
      onStderr: (m) => void seen.push(`err:${m.line}`),
    });
    assert.equal(execution.error, undefined, execution.error?.traceback);
    assert.equal(seen[0], "out:one\n");
    assert.match(seen[1] ?? "", /^err:two\n/);
    assert.equal(seen.length, 2);
    assert.equal(execution.results.length, 0);
  });

  test("errors carry name, value and traceback; a syntax error is an error too", async () => {
    const runtime = await sandbox.runCode('f <- function() stop("bad input")\nf()', { language: "r" });
    assert.ok(runtime.error, "no error for stop()");
    assert.match(runtime.error.value, /bad input/);
    const syntax = await sandbox.runCode("x <- (1 + ", { language: "r" });
    assert.ok(syntax.error, "no error for a syntax error");
    assert.match(`${syntax.error.value}\n${syntax.error.traceback}`, /unexpected|parse|incomplete/i);
    const still = await sandbox.runCode("x", { language: "r" });
    assert.equal(rValue(still), "[1] 42");
  });

  test("per-call env vars apply once and are reverted; sandbox-wide ones are there", async () => {
    const withEnv = await sandbox.runCode('Sys.getenv("CALL_ONLY")', { language: "r", envs: { CALL_ONLY: "yes \"quoted\" é" } });
    assert.equal(rValue(withEnv), '[1] "yes \\"quoted\\" é"');
    const after = await sandbox.runCode('Sys.getenv("CALL_ONLY", unset = NA)', { language: "r" });
    assert.equal(rValue(after), "[1] NA");
    const overridden = await sandbox.runCode('Sys.getenv("SANDBOX_WIDE")', { language: "r", envs: { SANDBOX_WIDE: "for this call" } });
    assert.equal(rValue(overridden), '[1] "for this call"');
    const sandboxWide = await sandbox.runCode('Sys.getenv("SANDBOX_WIDE")', { language: "r" });
    assert.equal(rValue(sandboxWide), '[1] "from-envd"');
  });

  test("a context of its own: language, cwd, separate state", async () => {
    const context = await sandbox.createCodeContext({ language: "r", cwd: "/tmp" });
    assert.equal(context.language, "r");
    assert.equal(context.cwd, "/tmp");
    assert.equal(rValue(await sandbox.runCode("getwd()", { context })), '[1] "/tmp"');
    await sandbox.runCode('writeLines("from r", "from-r.txt")', { context });
    assert.equal(await sandbox.files.read("/tmp/from-r.txt"), "from r\n");
    assert.equal(rValue(await sandbox.runCode("exists('x')", { context })), "[1] FALSE");
    await sandbox.removeCodeContext(context);
  });

  test("a plot comes back as png, a data.frame as html", async () => {
    const plot = await sandbox.runCode("plot(1:10, main = 'squares')", { language: "r" });
    assert.equal(plot.error, undefined, plot.error?.traceback);
    const png = plot.results.find((r) => r.png);
    assert.ok(png, `no png among ${JSON.stringify(plot.results.map((r) => r.formats()))}`);
    assert.equal(Buffer.from(png.png!, "base64").subarray(1, 4).toString(), "PNG");
    const frame = await sandbox.runCode("data.frame(a = 1:2, b = c('x', 'y'))", { language: "r" });
    assert.match(frame.results[0]?.html ?? "", /<table/);
  });

  test("timeoutMs interrupts a busy loop and the kernel keeps its state", async () => {
    const started = performance.now();
    await assert.rejects(sandbox.runCode("while (TRUE) {}", { language: "r", timeoutMs: 1_500 }), /timed out|timeout/i);
    const next = await sandbox.runCode("x", { language: "r" });
    assert.equal(rValue(next), "[1] 42");
    assert.ok(performance.now() - started < 10_000, "the next call waited for the interrupted one too long");
  });

  test("a huge output arrives whole", async () => {
    const execution = await sandbox.runCode('for (i in 1:20) cat(strrep("x", 99999), "\\n", sep = "")', { language: "r", timeoutMs: 60_000 });
    assert.equal(execution.error, undefined, execution.error?.traceback);
    assert.equal(stdoutOf(execution).length, 20 * 100_000);
  });

  test("a dying kernel is an error, then restarts without the old state", async () => {
    const death = await sandbox.runCode("tools::pskill(Sys.getpid(), 9)", { language: "r" });
    assert.equal(death.error?.name, "UnexpectedEndOfExecution");
    const next = await sandbox.runCode("exists('x')", { language: "r" });
    assert.equal(rValue(next), "[1] FALSE");
  });
});

describe("java", () => {
  test("the last expression is the result, and state persists", async () => {
    const first = await sandbox.runCode("int x = 40;\nString greet(String who) { return \"hello \" + who; }", { language: "java", timeoutMs: 120_000 });
    assert.equal(first.error, undefined, first.error?.traceback);
    assert.equal(first.results.length, 0);
    const execution = await sandbox.runCode("x += 2;\nx", { language: "java" });
    assert.equal(execution.error, undefined, execution.error?.traceback);
    assert.equal(execution.text, "42");
    assert.equal((await sandbox.runCode('greet("world")', { language: "java" })).text, "hello world");
    assert.equal((await sandbox.runCode("java.util.List.of(1, 2, 3)", { language: "java" })).text, "[1, 2, 3]");
  });

  test("System.out and System.err stream while the cell runs", async () => {
    const seen: string[] = [];
    const execution = await sandbox.runCode('System.out.println("one");\nThread.sleep(300);\nSystem.err.println("two");', {
      language: "java",
      onStdout: (m) => void seen.push(`out:${m.line}`),
      onStderr: (m) => void seen.push(`err:${m.line}`),
    });
    assert.equal(execution.error, undefined, execution.error?.traceback);
    assert.deepEqual(seen, ["out:one\n", "err:two\n"]);
  });

  test("a runtime exception carries its class, message and stack", async () => {
    const execution = await sandbox.runCode("int[] small = new int[1];\nint boom(int[] a) { return a[5]; }\nboom(small)", { language: "java" });
    assert.equal(execution.error?.name, "java.lang.ArrayIndexOutOfBoundsException");
    assert.match(execution.error?.value ?? "", /5/);
    assert.match(execution.error?.traceback ?? "", /boom/);
  });

  test("compile errors and unfinished code are errors; nothing after them runs", async () => {
    const typeError = await sandbox.runCode('int y = "text";\nSystem.out.println("after");', { language: "java" });
    assert.equal(typeError.error?.name, "CompilationException");
    assert.match(typeError.error?.value ?? "", /incompatible types/);
    assert.equal(stdoutOf(typeError), "");
    const unfinished = await sandbox.runCode("for (int i = 0; i < 3; i++) {", { language: "java" });
    assert.equal(unfinished.error?.name, "CompilationException");
    const unknown = await sandbox.runCode("undefinedThing.call()", { language: "java" });
    assert.equal(unknown.error?.name, "CompilationException");
    assert.equal((await sandbox.runCode("x", { language: "java" })).text, "42");
  });

  test("per-call env vars are seen by System.getenv and reverted; sandbox-wide ones are there", async () => {
    const withEnv = await sandbox.runCode('System.getenv("CALL_ONLY")', { language: "java", envs: { CALL_ONLY: "yes é" } });
    assert.equal(withEnv.error, undefined, withEnv.error?.traceback);
    assert.equal(withEnv.text, "yes é");
    const child = await sandbox.runCode(
      'var pb = new ProcessBuilder("sh", "-c", "echo $CALL_ONLY");\npb.environment();\nnew String(pb.start().getInputStream().readAllBytes()).trim()',
      { language: "java", envs: { CALL_ONLY: "child sees it" } },
    );
    assert.equal(child.text, "child sees it");
    const after = await sandbox.runCode('String.valueOf(System.getenv("CALL_ONLY"))', { language: "java" });
    assert.equal(after.text, "null");
    const sandboxWide = await sandbox.runCode('System.getenv("SANDBOX_WIDE")', { language: "java" });
    assert.equal(sandboxWide.text, "from-envd");
  });

  test("an env var name the JVM refuses is a clear error", async () => {
    const execution = await sandbox.runCode("1 + 1", { language: "java", envs: { "BAD=NAME": "1" } });
    assert.equal(execution.error?.name, "java.lang.IllegalArgumentException");
    assert.equal((await sandbox.runCode('String.valueOf(System.getenv("BAD"))', { language: "java" })).text, "null");
  });

  test("a context of its own: cwd is user.dir and relative paths resolve there", async () => {
    const context = await sandbox.createCodeContext({ language: "java", cwd: "/tmp" });
    assert.equal(context.language, "java");
    const dir = await sandbox.runCode('System.getProperty("user.dir")', { context, timeoutMs: 120_000 });
    assert.equal(dir.text, "/tmp", dir.error?.traceback);
    const written = await sandbox.runCode('java.nio.file.Files.writeString(java.nio.file.Path.of("from-java.txt"), "from java");\nnew java.io.File("from-java.txt").getAbsolutePath()', { context });
    assert.equal(written.text, "/tmp/from-java.txt");
    assert.equal(await sandbox.files.read("/tmp/from-java.txt"), "from java");
    const isolated = await sandbox.runCode("x", { context });
    assert.equal(isolated.error?.name, "CompilationException");
    await sandbox.removeCodeContext(context);
  });

  test("timeoutMs stops an infinite loop and the kernel keeps its state", async () => {
    const started = performance.now();
    await assert.rejects(sandbox.runCode("while (true) { x = x + 0; }", { language: "java", timeoutMs: 1_500 }), /timed out|timeout/i);
    const next = await sandbox.runCode("x", { language: "java" });
    assert.equal(next.text, "42");
    assert.ok(performance.now() - started < 10_000, "the next call waited for the interrupted one too long");
  });

  test("timeoutMs stops a loop that prints without end", async () => {
    const seen: string[] = [];
    await assert.rejects(
      sandbox.runCode("for (long i = 0; ; i++) System.out.println(i);", { language: "java", timeoutMs: 1_500, onStdout: (m) => void seen.push(m.line) }),
      /timed out|timeout/i,
    );
    assert.ok(seen.length > 0, "no output streamed before the timeout");
    assert.equal((await sandbox.runCode("x", { language: "java" })).text, "42");
    // Nothing the stopped cell had half printed turns up in a later cell's output.
    const clean = await sandbox.runCode('System.out.println("only this");', { language: "java" });
    assert.equal(stdoutOf(clean), "only this\n");
  });

  test("a huge output arrives whole and in order", async () => {
    const execution = await sandbox.runCode("for (int i = 0; i < 200000; i++) System.out.println(i);", { language: "java", timeoutMs: 60_000 });
    assert.equal(execution.error, undefined, execution.error?.traceback);
    const lines = stdoutOf(execution).split("\n");
    assert.equal(lines.length, 200_001);
    assert.equal(lines[199_999], "199999");
  });

  test("a dying kernel is an error, then restarts without the old state", async () => {
    const death = await sandbox.runCode("System.exit(3);", { language: "java" });
    assert.equal(death.error?.name, "UnexpectedEndOfExecution");
    const next = await sandbox.runCode("1 + 1", { language: "java", timeoutMs: 120_000 });
    assert.equal(next.text, "2");
    assert.equal((await sandbox.runCode("x", { language: "java" })).error?.name, "CompilationException");
  });
});

test("an unknown language is refused with a clear error", async () => {
  // The SDK shows only the status of a 400 here (the server says "unsupported language ...").
  await assert.rejects(sandbox.runCode("1", { language: "cobol" }), /400/);
  await assert.rejects(sandbox.createCodeContext({ language: "cobol" }), /400/);
});
