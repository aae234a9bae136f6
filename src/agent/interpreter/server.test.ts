import assert from "node:assert/strict";
import type { AddressInfo } from "node:net";
import { after, before, describe, it } from "node:test";
import { ContextManager } from "./context-manager.js";
import { createInterpreterHttpServer } from "./server.js";
import type { ExecuteRequest, Kernel, OutputSink } from "./types.js";

/** A kernel that echoes code; `sleep:<ms>` waits (interruptibly), `count` reports its starts. */
class FakeKernel implements Kernel {
  static starts = 0;
  static interrupts = 0;
  exited = false;
  private running = 0;
  constructor(readonly language: string) {}
  async start() {
    FakeKernel.starts++;
  }
  async execute(request: ExecuteRequest, sink: OutputSink, signal: AbortSignal) {
    this.running++;
    assert.equal(this.running, 1, "two executions overlapped on one kernel");
    try {
      const sleep = /^sleep:(\d+)$/.exec(request.code);
      if (sleep) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, Number(sleep[1]));
          signal.addEventListener("abort", () => {
            FakeKernel.interrupts++;
            clearTimeout(timer);
            resolve();
          });
        });
      }
      sink({ type: "stdout", text: `${request.code} ${JSON.stringify(request.envVars)}`, timestamp: new Date().toISOString() });
      sink({ type: "result", is_main_result: true, text: `${this.language}:${request.code}` });
    } finally {
      this.running--;
    }
  }
  async shutdown() {
    this.exited = true;
  }
}

let base = "";
let close: () => Promise<void>;

before(async () => {
  const contexts = new ContextManager({
    kernelFactory: (language) => new FakeKernel(language),
    getEnvVars: () => ({}),
    getDefaultUser: () => "nobody-in-particular",
    getDefaultWorkdir: () => "/tmp",
  });
  const server = createInterpreterHttpServer({ contexts, keepaliveIntervalMs: 50 });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  close = async () => {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
    await contexts.close();
  };
});
after(() => close());

async function execute(body: object, signal?: AbortSignal) {
  const res = await fetch(`${base}/execute`, { method: "POST", body: JSON.stringify(body), signal });
  const text = await res.text();
  return { status: res.status, text, lines: res.ok ? text.trim().split("\n").map((line) => JSON.parse(line)) : [] };
}

describe("interpreter HTTP server", () => {
  it("answers /health", async () => {
    const res = await fetch(`${base}/health`);
    assert.equal(res.status, 200);
    assert.equal(await res.json(), "OK");
  });

  it("lists python and javascript contexts without starting kernels", async () => {
    const contexts = (await (await fetch(`${base}/contexts`)).json()) as { language: string; cwd: string }[];
    assert.deepEqual(contexts.map((c) => c.language).sort(), ["javascript", "python"]);
    assert.ok(contexts.every((c) => c.cwd === "/tmp"));
    assert.equal(FakeKernel.starts, 0);
  });

  it("runs the default python context and resolves language aliases", async () => {
    const run = await execute({ code: "x", env_vars: { A: "1" } });
    assert.equal(run.status, 200);
    assert.deepEqual(run.lines.map((l) => l.type), ["stdout", "result", "end_of_execution"]);
    assert.equal(run.lines[0].text, 'x {"A":"1"}');
    assert.equal(run.lines[1].text, "python:x");
    assert.equal((await execute({ code: "y", language: " JS " })).lines[1].text, "javascript:y");
    assert.equal((await execute({ code: "z", language: "ts" })).lines[1].text, "typescript:z");
  });

  it("refuses context_id with language, and unknown contexts", async () => {
    const both = await execute({ code: "1", context_id: "abc", language: "python" });
    assert.equal(both.status, 400);
    const unknown = await execute({ code: "1", context_id: "nope" });
    assert.equal(unknown.status, 404);
    assert.equal(unknown.text, "Context nope not found");
    assert.equal((await fetch(`${base}/contexts/nope`, { method: "DELETE" })).status, 404);
    assert.equal((await fetch(`${base}/contexts/nope/restart`, { method: "POST" })).status, 404);
  });

  it("creates, restarts and deletes contexts", async () => {
    const created = (await (await fetch(`${base}/contexts`, { method: "POST", body: JSON.stringify({ language: "Python", cwd: "/srv" }) })).json()) as {
      id: string;
      language: string;
      cwd: string;
    };
    assert.equal(created.language, "python");
    assert.equal(created.cwd, "/srv");
    assert.equal((await execute({ code: "q", context_id: created.id })).lines[1].text, "python:q");
    assert.equal((await fetch(`${base}/contexts/${created.id}/restart`, { method: "POST" })).status, 204);
    assert.equal((await fetch(`${base}/contexts/${created.id}`, { method: "DELETE" })).status, 204);
    assert.equal((await execute({ code: "q", context_id: created.id })).status, 404);
  });

  it("serialises calls on one context and sends keepalives while waiting", async () => {
    const [slow, fast] = await Promise.all([execute({ code: "sleep:150" }), execute({ code: "after" })]);
    assert.ok(slow.lines.some((l) => l.type === "keepalive"));
    assert.equal(fast.lines.find((l) => l.type === "result").text, "python:after");
  });

  it("interrupts the running execution when the client goes away", async () => {
    const interruptsBefore = FakeKernel.interrupts;
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 80);
    await assert.rejects(execute({ code: "sleep:10000" }, controller.signal));
    const next = await execute({ code: "next" });
    assert.equal(next.lines.find((l) => l.type === "result").text, "python:next");
    assert.equal(FakeKernel.interrupts, interruptsBefore + 1);
  });
});
