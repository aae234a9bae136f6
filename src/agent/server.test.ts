import assert from "node:assert/strict";
import type { AddressInfo } from "node:net";
import { after, before, describe, it } from "node:test";
import { computeFileSignature } from "../protocol/index.js";
import { EnvelopeParser, encodeEnvelope } from "../protocol/index.js";
import { createAgentServer } from "./server.js";

const filesCalls: Array<{ method: string; username: string | undefined; defaultUser: string }> = [];
const agent = createAgentServer({
  filesHandler: async (req, res, opts) => {
    filesCalls.push({ method: req.method!, ...opts });
    req.resume();
    res.writeHead(200, { "content-type": "application/json" }).end("[]");
  },
});
let base: string;

before(async () => {
  await new Promise<void>((r) => agent.server.listen(0, "127.0.0.1", r));
  base = `http://127.0.0.1:${(agent.server.address() as AddressInfo).port}`;
});

after(() => {
  agent.server.closeAllConnections();
  agent.server.close();
});

function init(body: unknown, token?: string) {
  return fetch(`${base}/init`, { method: "POST", body: JSON.stringify(body), headers: token ? { "x-access-token": token } : {} });
}

function rpc(path: string, body: unknown, headers: Record<string, string> = {}) {
  return fetch(`${base}${path}`, { method: "POST", body: JSON.stringify(body), headers: { "content-type": "application/json", ...headers } });
}

describe("agent server", () => {
  it("answers /health with 204 and no body", async () => {
    const res = await fetch(`${base}/health`);
    assert.equal(res.status, 204);
    assert.equal(await res.text(), "");
  });

  it("applies /init and serves the env vars at /envs; a re-init replaces them", async () => {
    assert.equal((await init({ envVars: { A: "1", B: "2" }, defaultUser: "root", defaultWorkdir: "/tmp", timestamp: new Date().toISOString() })).status, 204);
    assert.deepEqual(await (await fetch(`${base}/envs`)).json(), { A: "1", B: "2" });
    assert.equal(agent.state.defaultWorkdir, "/tmp");
    assert.equal((await init({ envVars: { C: "3" } })).status, 204);
    assert.deepEqual(await (await fetch(`${base}/envs`)).json(), { C: "3" });
    assert.equal(agent.state.defaultWorkdir, undefined);
    assert.equal((await init("not an object")).status, 400);
    const bad = await fetch(`${base}/init`, { method: "POST", body: "{oops" });
    assert.equal(bad.status, 400);
  });

  it("serves /metrics with upstream's fields", async () => {
    const m = (await (await fetch(`${base}/metrics`)).json()) as Record<string, number>;
    for (const key of ["ts", "cpu_count", "cpu_used_pct", "mem_total", "mem_used", "mem_cache", "mem_total_mib", "mem_used_mib", "disk_used", "disk_total", "cubicle_cpu_busy_usec"]) {
      assert.equal(typeof m[key], "number", key);
    }
    assert.ok(m.mem_total! > 0 && m.disk_total! > 0);
  });

  it("dispatches RPCs and picks the user from Basic auth", async () => {
    const list = await rpc("/process.Process/List", {});
    assert.equal(list.status, 200);
    assert.deepEqual(await list.json(), { processes: [] });
    const missing = await rpc("/process.Process/Nope", {});
    assert.equal(missing.status, 404);
    const unknownUser = await rpc("/process.Process/List", {}, { authorization: `Basic ${Buffer.from("ghost:").toString("base64")}` });
    assert.equal(unknownUser.status, 401);
    assert.deepEqual(await unknownUser.json(), { code: "unauthenticated", message: "invalid username: 'ghost'" });
  });

  it("runs a command through Start as the Basic user", async () => {
    const res = await fetch(`${base}/process.Process/Start`, {
      method: "POST",
      headers: { "content-type": "application/connect+json", authorization: "Basic cm9vdDo=" },
      body: new Uint8Array(encodeEnvelope(0, JSON.stringify({ process: { cmd: "/bin/bash", args: ["-c", "id -un"] }, stdin: false }))),
    });
    const events = new EnvelopeParser().push(Buffer.from(await res.arrayBuffer())).map((e) => JSON.parse(e.data.toString()));
    assert.equal(Buffer.from(events[1].event.data.stdout, "base64").toString(), "root\n");
    assert.deepEqual(events.at(-1), {});
  });

  it("enforces the access token, with exemptions and the files signature", async () => {
    assert.equal((await init({ accessToken: "tok", defaultUser: "root" })).status, 204);
    try {
      const denied = await fetch(`${base}/envs`);
      assert.equal(denied.status, 401);
      const body = (await denied.json()) as { code: number; message: string };
      assert.equal(body.code, 401);
      assert.match(body.message, /unauthorized access/);
      assert.equal((await fetch(`${base}/health`)).status, 204);
      assert.equal((await rpc("/process.Process/List", {})).status, 401);
      assert.equal((await rpc("/process.Process/List", {}, { "x-access-token": "tok" })).status, 200);

      const stream = await fetch(`${base}/process.Process/Start`, { method: "POST", headers: { "content-type": "application/connect+json" }, body: new Uint8Array(encodeEnvelope(0, "{}")) });
      assert.equal(stream.status, 200);
      const end = new EnvelopeParser().push(Buffer.from(await stream.arrayBuffer()));
      assert.equal(JSON.parse(end[0]!.data.toString()).error.code, "unauthenticated");

      filesCalls.length = 0;
      const unsigned = await fetch(`${base}/files?path=/x`);
      assert.equal(unsigned.status, 401);
      assert.deepEqual(await unsigned.json(), { code: 401, message: "missing signature query parameter" });
      const exp = Math.floor(Date.now() / 1000) + 60;
      const sig = computeFileSignature("/x", "read", "root", "tok", exp);
      const signed = await fetch(`${base}/files?path=/x&username=root&signature=${encodeURIComponent(sig)}&signature_expiration=${exp}`);
      assert.equal(signed.status, 200);
      const expiredSig = computeFileSignature("/x", "write", "", "tok", 1000);
      const expired = await fetch(`${base}/files?path=/x&signature=${encodeURIComponent(expiredSig)}&signature_expiration=1000`, { method: "POST" });
      assert.deepEqual(await expired.json(), { code: 401, message: "signature is already expired" });
      assert.deepEqual(filesCalls, [{ method: "GET", username: "root", defaultUser: "root" }]);

      assert.equal((await init({ defaultUser: "root" })).status, 401, "re-init needs the current token");
    } finally {
      assert.equal((await init({ defaultUser: "root" }, "tok")).status, 204);
    }
    assert.equal((await fetch(`${base}/envs`)).status, 200);
  });

  it("answers unknown paths with 404 JSON", async () => {
    const res = await fetch(`${base}/nope`);
    assert.equal(res.status, 404);
    assert.equal(((await res.json()) as { code: number }).code, 404);
  });
});
