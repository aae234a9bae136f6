import assert from "node:assert/strict";
import { PassThrough } from "node:stream";
import { test } from "node:test";
import { runCommand } from "../shared/exec.js";
import { parseBuildArgs, TemplateBuildStatus } from "./template-commands.js";

function capture(): { stream: NodeJS.WriteStream; text: () => string } {
  const stream = new PassThrough() as unknown as NodeJS.WriteStream & PassThrough;
  let text = "";
  stream.on("data", (chunk: Buffer) => (text += chunk.toString()));
  (stream as { columns?: number }).columns = 100;
  return { stream, text: () => text };
}

test("parseBuildArgs: the flags of `template build -f`, and clear errors", () => {
  assert.deepEqual(parseBuildArgs(["-f", "Dockerfile", "--name", "x", "--cpu", "2", "--memory", "2048", "--skip-cache", "--context", "ctx"]), {
    skipCache: true,
    dockerfile: "Dockerfile",
    name: "x",
    cpuCount: 2,
    memoryMB: 2048,
    context: "ctx",
  });
  assert.throws(() => parseBuildArgs(["-f", "Dockerfile"]), /usage/);
  assert.throws(() => parseBuildArgs(["-f", "D", "--name", "x", "--cpu", "0"]), /positive integer/);
  assert.throws(() => parseBuildArgs(["-f", "D", "--name", "x", "--wat"]), /unknown option/);
  assert.throws(() => parseBuildArgs(["-f"]), /needs a value/);
});

test("TemplateBuildStatus: one status line per template, finished lines kept, stderr written above it", async () => {
  const { stream, text } = capture();
  const stderrWrite = process.stderr.write;
  const status = new TemplateBuildStatus(stream);
  assert.notEqual(process.stderr.write, stderrWrite, "stderr goes through the status line while it is shown");
  status.update("base", "downloading packages");
  process.stderr.write("");
  status.update("base", "extracting archives");
  status.update("code-interpreter-v1", "bootstrapping");
  status.stop();
  await new Promise((resolve) => setImmediate(resolve));
  const out = text();
  assert.match(out, /building template base \[\d+\.\ds\]: downloading packages/);
  assert.match(out, /building template base \[\d+\.\ds\]: extracting archives/);
  assert.match(out, /template base built in \d+\.\d s\n/);
  assert.match(out, /template code-interpreter-v1 built in/);
  assert.equal(process.stderr.write, stderrWrite, "stderr restored");
});

test("runCommand hands over stderr line by line while the command runs, and still returns it", async () => {
  const lines: string[] = [];
  const result = await runCommand(["/bin/sh", "-c", "printf 'I: one...\\nI: tw' >&2; sleep 0.05; printf 'o\\n\\nlast' >&2"], { onStderrLine: (line) => lines.push(line) });
  assert.deepEqual(lines, ["I: one...", "I: two"]);
  assert.equal(result.stderr, "I: one...\nI: two\n\nlast");
});
