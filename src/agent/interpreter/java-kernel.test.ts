import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import { describe, it } from "node:test";
import { JAVA_KERNEL_CLASS, JAVA_KERNEL_DIR, JAVA_KERNEL_SOURCE } from "./java-kernel-program.js";
import { JavaKernel, javaExecuteLine, MarkedLineSplitter, type JavaKernelMessage } from "./java-kernel.js";
import type { ExecutionOutput } from "./types.js";

const marker = "\u0001m:";

function split(chunks: string[]): Array<JavaKernelMessage | { raw: string }> {
  const seen: Array<JavaKernelMessage | { raw: string }> = [];
  const splitter = new MarkedLineSplitter(marker, (message) => seen.push(message), (raw) => seen.push({ raw }));
  for (const chunk of chunks) splitter.push(chunk);
  return seen;
}

describe("MarkedLineSplitter", () => {
  it("tells messages from raw output, fed one character at a time", () => {
    const stream = `${marker}{"type":"stdout","text":"a\\nb"}\nraw line\npartial${marker}{"type":"done"}\n`;
    assert.deepEqual(split([...stream]), [{ type: "stdout", text: "a\nb" }, { raw: "raw line\n" }, { raw: "partial" }, { type: "done" }]);
  });

  it("holds a line until its end arrives and drops malformed messages", () => {
    assert.deepEqual(split([`${marker}{"type":"re`, `ady"}`]), []);
    assert.deepEqual(split([`${marker}{not json\n`, `${marker}{"type":"done"}\n`]), [{ type: "done" }]);
  });

  it("keeps multi-byte text that arrives split across chunks intact (the stream is decoded as UTF-8 first)", () => {
    assert.deepEqual(split([`${marker}{"type":"result","text":"é`, `😀"}\n`]), [{ type: "result", text: "é😀" }]);
  });
});

describe("javaExecuteLine", () => {
  it("is one line of base64 fields, whatever the code and env vars hold", () => {
    const line = javaExecuteLine({ code: "System.out.println(\"a b\");\nint x = 1;", envVars: { "ODD NAME": "v\nw", E: "" } });
    assert.ok(line.endsWith("\n") && !line.slice(0, -1).includes("\n"));
    const [kind, ...fields] = line.slice(0, -1).split(" ");
    assert.equal(kind, "X");
    assert.deepEqual(fields.map((field) => Buffer.from(field, "base64").toString("utf8")), ["System.out.println(\"a b\");\nint x = 1;", "ODD NAME", "v\nw", "E", ""]);
  });
});

describe("the Java kernel program", () => {
  it("is one public class named as the recipe compiles it, without template-literal holes", () => {
    assert.match(JAVA_KERNEL_SOURCE, new RegExp(`public final class ${JAVA_KERNEL_CLASS} \\{`));
    assert.ok(!JAVA_KERNEL_SOURCE.includes("${"));
  });
});

describe("JavaKernel without the kernel program", () => {
  it("says which template has Java instead of starting a JVM", async () => {
    const kernel = new JavaKernel({ classPath: "/nonexistent", launch: { cwd: "/tmp", env: {} } });
    await assert.rejects(kernel.start(), /no Java kernel.*code-interpreter-v1/);
  });
});

const compiled = fs.existsSync(`${JAVA_KERNEL_DIR}/${JAVA_KERNEL_CLASS}.class`);
function hasJava(): boolean {
  try {
    execFileSync("java", ["-version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

async function run(kernel: JavaKernel, code: string, envVars: Record<string, string> = {}, signal = new AbortController().signal) {
  const outputs: ExecutionOutput[] = [];
  await kernel.execute({ code, envVars }, (output) => outputs.push(output), signal);
  return outputs;
}

describe("JavaKernel (a real JVM)", { skip: compiled && hasJava() ? false : `no java or no ${JAVA_KERNEL_DIR} here (the code-interpreter template has both)` }, () => {
  it("keeps state, streams, returns values and errors, sees per-call env vars, interrupts", async () => {
    const kernel = new JavaKernel({ launch: { cwd: "/tmp", env: { PATH: "/usr/bin:/bin", HOME: "/tmp" } } });
    await kernel.start();
    try {
      await run(kernel, "int x = 20;");
      const outputs = await run(kernel, 'System.out.println("hi");\nx * 2 + 2');
      assert.deepEqual(outputs.map((o) => o.type), ["number_of_executions", "stdout", "result"]);
      assert.equal((outputs[2] as { text?: string }).text, "42");
      const failed = await run(kernel, "int y = 1 / 0;");
      assert.equal((failed.find((o) => o.type === "error") as { name?: string }).name, "java.lang.ArithmeticException");
      const env = await run(kernel, 'System.getenv("ONLY_NOW")', { ONLY_NOW: "1" });
      assert.equal((env.find((o) => o.type === "result") as { text?: string }).text, "1");
      assert.equal((await run(kernel, 'System.getenv("ONLY_NOW") == null')).find((o) => o.type === "result")?.type === "result", true);
      const controller = new AbortController();
      setTimeout(() => controller.abort(), 500);
      const interrupted = await run(kernel, "while (true) {}", {}, controller.signal);
      assert.equal((interrupted.find((o) => o.type === "error") as { name?: string }).name, "Interrupted");
    } finally {
      await kernel.shutdown();
    }
  });
});

describe("MarkedLineSplitter with a long line", () => {
  it("takes a 20 MB message in 64 KiB chunks in linear time", () => {
    const text = "x".repeat(20 * 2 ** 20);
    const stream = `${marker}${JSON.stringify({ type: "stdout", text })}\n`;
    const started = performance.now();
    const seen = split(stream.match(/[^]{1,65536}/g)!);
    assert.equal((seen[0] as { text: string }).text.length, text.length);
    assert.ok(performance.now() - started < 2_000, `took ${performance.now() - started} ms`);
  });
});
