import assert from "node:assert/strict";
import net, { type AddressInfo } from "node:net";
import { after, before, describe, it } from "node:test";
import { ContextManager } from "./context-manager.js";
import { createInterpreterHttpServer, type InterpreterHttpOptions } from "./server.js";
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
      const flood = /^flood:(\d+)$/.exec(request.code);
      for (let index = 0; flood && index < Number(flood[1]) && !signal.aborted; index++) {
        sink({ type: "stdout", text: "x".repeat(1 << 20), timestamp: new Date().toISOString() });
        await new Promise((resolve) => setImmediate(resolve));
      }
      if (flood && signal.aborted) FakeKernel.interrupts++;
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

/** An interpreter server on a free port with these contexts; `close` stops both. */
async function startServer(contexts: ContextManager, options: Omit<InterpreterHttpOptions, "contexts">): Promise<{ base: string; close: () => Promise<void> }> {
  const server = createInterpreterHttpServer({ contexts, ...options });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    base: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: async () => {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
      await contexts.close();
    },
  };
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
  ({ base, close } = await startServer(contexts, { keepaliveIntervalMs: 50 }));
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

describe("interpreter HTTP server with an access token (a secure sandbox)", () => {
  let secured = "";
  let closeSecured: () => Promise<void>;
  const executed: string[] = [];

  before(async () => {
    const contexts = new ContextManager({
      kernelFactory: (language) => {
        const kernel = new FakeKernel(language);
        const run = kernel.execute.bind(kernel);
        kernel.execute = (request, sink, signal) => {
          executed.push(request.code);
          return run(request, sink, signal);
        };
        return kernel;
      },
      getEnvVars: () => ({}),
      getDefaultUser: () => "nobody-in-particular",
      getDefaultWorkdir: () => "/tmp",
      maxContexts: 6,
    });
    ({ base: secured, close: closeSecured } = await startServer(contexts, { getAccessToken: () => "secret-token", maxBacklogBytes: 4 * 1024 * 1024 }));
  });
  after(() => closeSecured());

  const post = (path: string, body: unknown, headers: Record<string, string> = {}) =>
    fetch(`${secured}${path}`, { method: "POST", body: typeof body === "string" ? body : JSON.stringify(body), headers: { "content-type": "application/json", ...headers } });

  it("refuses /execute without the token or with a wrong one (401, envd's body) and runs nothing", async () => {
    const attempts: Array<Record<string, string>> = [{}, { "x-access-token": "wrong" }, { "x-access-token": "" }, { "x-access-token": "secret-token-not" }, { "x-access-token": "secret-toke" }];
    for (const headers of attempts) {
      const res = await post("/execute", { code: "must-not-run" }, headers);
      assert.equal(res.status, 401, JSON.stringify(headers));
      const body = (await res.json()) as { code: number; message: string };
      assert.equal(body.code, 401);
      assert.match(body.message, /access token/);
    }
    assert.deepEqual(executed, []);
    const allowed = await post("/execute", { code: "allowed" }, { "x-access-token": "secret-token" });
    assert.equal(allowed.status, 200);
    assert.match(await allowed.text(), /python:allowed/);
    assert.deepEqual(executed, ["allowed"]);
  });

  it("keeps /health and /contexts open without a token (the SDK sends none there), but refuses a wrong token", async () => {
    assert.equal((await fetch(`${secured}/health`)).status, 200);
    assert.equal((await fetch(`${secured}/contexts`)).status, 200);
    const created = await post("/contexts", { language: "python" });
    assert.equal(created.status, 200);
    const { id } = (await created.json()) as { id: string };
    assert.equal((await post(`/contexts/${id}/restart`, "")).status, 204);
    assert.equal((await fetch(`${secured}/contexts/${id}`, { method: "DELETE" })).status, 204);
    assert.equal((await fetch(`${secured}/contexts`, { headers: { "x-access-token": "wrong" } })).status, 401);
    assert.equal((await post("/contexts", {}, { "x-access-token": "wrong" })).status, 401);
    assert.equal((await fetch(`${secured}/contexts`, { headers: { "x-access-token": "secret-token" } })).status, 200);
  });

  it("bounds what an unauthenticated /contexts caller can do: a cap on contexts, known languages, sane cwds, small bodies", async () => {
    const ids: string[] = [];
    let refused: Response | undefined;
    for (let index = 0; index < 10 && !refused; index++) {
      const res = await post("/contexts", { language: "bash" });
      if (res.status === 200) ids.push(((await res.json()) as { id: string }).id);
      else refused = res;
    }
    assert.equal(refused?.status, 429);
    assert.match(await refused!.text(), /at most 6 code contexts/);
    assert.equal(ids.length, 6, "the python and javascript defaults do not count");
    const bash = await post("/execute", { code: "b", language: "bash" }, { "x-access-token": "secret-token" });
    assert.match(await bash.text(), /bash:b/, "the default contexts stay usable when the cap is reached");
    await fetch(`${secured}/contexts/${ids.pop()}`, { method: "DELETE" });
    assert.equal((await post("/contexts", {})).status, 200, "deleting one makes room");

    for (const body of [{ language: "cobol" }, { language: "x".repeat(10_000) }, { language: 7 }, { cwd: "/tmp/a\0b" }, { cwd: "/" + "d".repeat(5000) }, { cwd: ["/tmp"] }, [1, 2], "null"]) {
      const res = await post("/contexts", body);
      assert.equal(res.status, 400, JSON.stringify(body).slice(0, 80));
    }
    assert.equal((await post("/contexts", { cwd: "x".repeat(100_000) })).status, 413);
    assert.equal((await post("/execute", { code: "1", language: "cobol" }, { "x-access-token": "secret-token" })).status, 400);
  });

  it("cuts an execution whose client stops reading once its output backs up, and interrupts it", async () => {
    const interruptsBefore = FakeKernel.interrupts;
    const socket = net.connect(Number(new URL(secured).port), "127.0.0.1");
    socket.on("error", () => {});
    const body = JSON.stringify({ code: "flood:500" });
    socket.write(`POST /execute HTTP/1.1\r\nhost: x\r\nx-access-token: secret-token\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`);
    socket.pause(); // and never read: a paused socket does not even see the close
    for (let i = 0; i < 200 && FakeKernel.interrupts === interruptsBefore; i++) await new Promise((resolve) => setTimeout(resolve, 50));
    socket.destroy();
    assert.equal(FakeKernel.interrupts, interruptsBefore + 1, "the execution went on for a client that does not read");
    const next = await post("/execute", { code: "after-flood" }, { "x-access-token": "secret-token" });
    assert.match(await next.text(), /python:after-flood/);
  });

  it("answers a malformed path with 400, not 500", async () => {
    assert.equal((await fetch(`${secured}/contexts/%E0%A4%A`, { method: "DELETE" })).status, 400);
  });
});
