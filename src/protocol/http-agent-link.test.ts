import assert from "node:assert/strict";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { after, before, beforeEach, describe, it } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { encodeEnvelope, EnvelopeParser, envelopeFlags } from "./envelope.js";
import { HttpAgentLink } from "./http-agent-link.js";

interface Seen {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

/** A stand-in agent on 127.0.0.1: `answer` decides every response; requests are recorded. */
async function standIn(answer: (seen: Seen, res: http.ServerResponse) => void) {
  const seen: Seen[] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (chunk: Buffer) => chunks.push(chunk));
    req.on("end", () => {
      const request = { method: req.method ?? "", url: req.url ?? "", headers: req.headers, body: Buffer.concat(chunks) };
      seen.push(request);
      answer(request, res);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { seen, server, port: (server.address() as AddressInfo).port };
}

function refusedWith(code: string, pattern: RegExp) {
  return (error: unknown) => error instanceof CubicleError && error.code === code && pattern.test(error.message);
}

describe("HttpAgentLink", () => {
  let agent: Awaited<ReturnType<typeof standIn>>;
  let respond: (seen: Seen, res: http.ServerResponse) => void;
  let link: HttpAgentLink;

  before(async () => {
    agent = await standIn((seen, res) => respond(seen, res));
    link = new HttpAgentLink({ envdPort: agent.port, interpreterPort: agent.port });
  });
  beforeEach(() => {
    agent.seen.length = 0;
    respond = (_seen, res) => res.writeHead(204).end();
  });
  after(async () => {
    link.httpAgent.destroy();
    agent.server.closeAllConnections();
    await new Promise((resolve) => agent.server.close(resolve));
  });

  it("posts the /init body as JSON, with the current token when given", async () => {
    const body = { envVars: { A: "1" }, defaultUser: "user", defaultWorkdir: "/home/user", timestamp: "2026-01-01T00:00:00.000Z" };
    await link.init("127.0.0.1", body, { currentToken: "old" });
    const [seen] = agent.seen;
    assert.equal(seen!.method, "POST");
    assert.equal(seen!.url, "/init");
    assert.equal(seen!.headers["content-type"], "application/json");
    assert.equal(seen!.headers["x-access-token"], "old");
    assert.deepEqual(JSON.parse(seen!.body.toString()), body);
  });

  it("reports a refused init with the agent's answer", async () => {
    respond = (_seen, res) => res.writeHead(401).end('{"code":401,"message":"unauthorized"}');
    await assert.rejects(link.init("127.0.0.1", {}), refusedWith("internal", /refused its init \(401\).*unauthorized/));
    // With whenUpMs an answer is final too: no retries.
    await assert.rejects(link.init("127.0.0.1", {}, { whenUpMs: 1000 }), refusedWith("internal", /\(401\)/));
    assert.equal(agent.seen.length, 2);
  });

  it("an init whose answer was lost after the agent took it is retried under the new token, not refused", async () => {
    let token = "old";
    let first = true;
    respond = (seen, res) => {
      if (seen.headers["x-access-token"] !== token) return void res.writeHead(401).end('{"code":401,"message":"unauthorized"}');
      token = (JSON.parse(seen.body.toString()) as { accessToken: string }).accessToken;
      // The agent applied it, and its answer never arrives (a guest too slow for the request's deadline).
      if (first) {
        first = false;
        return void res.socket?.destroy();
      }
      res.writeHead(204).end();
    };
    await link.init("127.0.0.1", { accessToken: "new", envVars: {} }, { currentToken: "old", whenUpMs: 5000 });
    assert.deepEqual(agent.seen.map((s) => s.headers["x-access-token"]), ["old", "old", "new"]);
    assert.equal(token, "new");
    // A first attempt refused is final: the agent holds another token, nothing was applied.
    token = "someone-else";
    agent.seen.length = 0;
    await assert.rejects(link.init("127.0.0.1", { accessToken: "new", envVars: {} }, { currentToken: "old", whenUpMs: 1000 }), refusedWith("internal", /\(401\)/));
    assert.equal(agent.seen.length, 1);
  });

  it("answers health: up, healthy, and unhealthy on an error status", async () => {
    await link.waitUntilUp("127.0.0.1", 1000);
    assert.equal(await link.isHealthy("127.0.0.1"), true);
    respond = (_seen, res) => res.writeHead(503).end();
    assert.equal(await link.isHealthy("127.0.0.1"), false);
    assert.deepEqual(agent.seen.map((s) => `${s.method} ${s.url}`), ["GET /health", "GET /health", "GET /health"]);
  });

  it("waits for an agent that is not listening, then gives up as unavailable", async () => {
    const closed = new HttpAgentLink({ envdPort: 1 });
    assert.equal(await closed.isHealthy("127.0.0.1", 200), false);
    await assert.rejects(closed.waitUntilUp("127.0.0.1", 50), refusedWith("unavailable", /did not become ready within 50 ms/));
    await assert.rejects(closed.init("127.0.0.1", {}, { whenUpMs: 50 }), refusedWith("unavailable", /did not become ready/));
  });

  it("warms up through process.Process/Start: one envelope in, an end event out", async () => {
    respond = (_seen, res) => {
      res.writeHead(200, { "content-type": "application/connect+json" });
      res.write(encodeEnvelope(0, JSON.stringify({ event: { start: { pid: 7 } } })));
      res.write(encodeEnvelope(0, JSON.stringify({ event: { end: { exitCode: 0, exited: true, status: "exit status 0" } } })));
      res.end(encodeEnvelope(envelopeFlags.endStream, "{}"));
    };
    await link.warmUp("127.0.0.1", "user");
    const [seen] = agent.seen;
    assert.equal(seen!.url, "/process.Process/Start");
    assert.equal(seen!.headers["content-type"], "application/connect+json");
    assert.equal(seen!.headers.authorization, `Basic ${Buffer.from("user:").toString("base64")}`);
    const envelopes = new EnvelopeParser().push(seen!.body);
    assert.equal(envelopes.length, 1);
    assert.deepEqual(JSON.parse(envelopes[0]!.data.toString()), { process: { cmd: "/bin/bash", args: ["-l", "-c", "true"], envs: {} } });
  });

  it("fails a warm-up whose stream ends without the process's end", async () => {
    respond = (_seen, res) => {
      res.writeHead(200, { "content-type": "application/connect+json" });
      res.end(encodeEnvelope(envelopeFlags.endStream, JSON.stringify({ error: { code: "not_found", message: "no such file: /bin/bash (end)" } })));
    };
    await assert.rejects(link.warmUp("127.0.0.1", "user"), refusedWith("internal", /agent warm-up failed \(200\).*not_found/));
  });

  it("starts the python kernel: execute, list contexts, restart the python one", async () => {
    respond = (seen, res) => {
      if (seen.url === "/execute") return res.writeHead(200).end('{"type":"number_of_executions","execution_count":1}\n{"type":"end_of_execution"}\n');
      if (seen.url === "/contexts") return res.writeHead(200).end(JSON.stringify([{ id: "js-1", language: "javascript" }, { id: "py 1", language: "python" }]));
      res.writeHead(200).end("{}");
    };
    await link.startKernel("127.0.0.1", 1000);
    assert.deepEqual(agent.seen.map((s) => `${s.method} ${s.url}`), ["POST /execute", "GET /contexts", "POST /contexts/py%201/restart"]);
    assert.deepEqual(JSON.parse(agent.seen[0]!.body.toString()), { code: "pass" });
  });

  it("refuses a kernel that reports an error", async () => {
    respond = (_seen, res) => res.writeHead(200).end('{"type":"error","value":"no python"}\n{"type":"end_of_execution"}\n');
    await assert.rejects(link.startKernel("127.0.0.1", 1000), refusedWith("unavailable", /did not run code \(200\): no python/));
  });

  it("reads the guest's CPU time from /metrics with the token; junk, a bad value or an oversized answer is unavailable", async () => {
    respond = (_seen, res) => res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ cpu_used_pct: 1, cubicle_cpu_busy_usec: 1_230_000 }));
    assert.equal(await link.guestCpuTimeUsec("127.0.0.1", "tok"), 1_230_000);
    assert.equal(agent.seen[0]!.method, "GET");
    assert.equal(agent.seen[0]!.url, "/metrics");
    assert.equal(agent.seen[0]!.headers["x-access-token"], "tok");
    for (const body of ["{not json", JSON.stringify({ cpu_used_pct: 1 }), JSON.stringify({ cubicle_cpu_busy_usec: -5 }), JSON.stringify({ cubicle_cpu_busy_usec: "9" })]) {
      respond = (_seen, res) => res.writeHead(200).end(body);
      await assert.rejects(link.guestCpuTimeUsec("127.0.0.1", undefined), (error: unknown) => error instanceof CubicleError && error.code === "unavailable", body);
    }
    respond = (_seen, res) => res.writeHead(200).end(JSON.stringify({ pad: "x".repeat(100_000), cubicle_cpu_busy_usec: 1 }));
    await assert.rejects(link.guestCpuTimeUsec("127.0.0.1", undefined), /answered more than 65536 bytes/);
    respond = (_seen, res) => res.writeHead(401).end("no");
    await assert.rejects(link.guestCpuTimeUsec("127.0.0.1", undefined), refusedWith("unavailable", /401/));
  });

  it("drops the idle keep-alive sockets to one address only", async () => {
    const settle = () => new Promise((resolve) => setTimeout(resolve, 20));
    await settle();
    link.dropIdleSockets("127.0.0.1");
    await link.isHealthy("127.0.0.1");
    await settle();
    assert.equal(link.dropIdleSockets("10.0.0.9"), 0);
    assert.equal(link.dropIdleSockets("127.0.0.1"), 1);
    await settle();
    assert.equal(link.dropIdleSockets("127.0.0.1"), 0);
  });
});
