/**
 * The launcher's sandbox verbs, WebSocket pass-through in the router, and envd calls the JS SDK
 * does not make (the Python sync client's polling watchers, connecting to a process by tag,
 * /envs and /metrics), over the wire as those clients send them.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import path from "node:path";
import { after, before, test } from "node:test";
import { Sandbox } from "e2b";
import WebSocket from "ws";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

const repoRoot = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..", "..");
let server: TestServer;
let sandbox: Sandbox;
let token: string;

before(async () => {
  server = await startTestServer();
  useServerForSdk(server);
  sandbox = await Sandbox.create({ envs: { FROM_CREATE: "yes" } });
  token = (await server.api("GET", `/sandboxes/${sandbox.sandboxId}`)).json.envdAccessToken;
});

after(async () => {
  await sandbox?.kill().catch(() => undefined);
  await server?.stop();
});

function cubicle(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [path.join(repoRoot, "dist", "cli.js"), ...args], { env: server.env }, (error, stdout, stderr) => {
      resolve({ code: error ? Number((error as NodeJS.ErrnoException & { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

function envdHeaders(extra: Record<string, string> = {}): Record<string, string> {
  return { "e2b-sandbox-id": sandbox.sandboxId, "e2b-sandbox-port": "49983", "x-access-token": token, "connect-protocol-version": "1", ...extra };
}

async function unary(procedure: string, body: unknown): Promise<{ status: number; json: any }> {
  const res = await fetch(`${server.url}/${procedure}`, { method: "POST", headers: envdHeaders({ "content-type": "application/json" }), body: JSON.stringify(body) });
  return { status: res.status, json: await res.json() };
}

/** One Connect envelope: flags 0, 4-byte big-endian length, JSON. */
function envelope(message: unknown): Uint8Array<ArrayBuffer> {
  const payload = Buffer.from(JSON.stringify(message));
  const frame = new Uint8Array(new ArrayBuffer(5 + payload.length));
  new DataView(frame.buffer).setUint32(1, payload.length);
  frame.set(payload, 5);
  return frame;
}

/** A Connect server stream, read to its end-stream frame: the messages and the end payload. */
async function stream(procedure: string, body: unknown, user = "user"): Promise<{ messages: any[]; end: any }> {
  const res = await fetch(`${server.url}/${procedure}`, {
    method: "POST",
    headers: envdHeaders({ "content-type": "application/connect+json", authorization: "Basic " + Buffer.from(`${user}:`).toString("base64") }),
    body: envelope(body),
  });
  assert.equal(res.status, 200);
  let buffer = Buffer.from(await res.arrayBuffer());
  const messages: any[] = [];
  let end: any;
  while (buffer.length >= 5) {
    const size = buffer.readUInt32BE(1);
    const payload = JSON.parse(buffer.subarray(5, 5 + size).toString("utf8"));
    if (buffer[0]! & 0x02) end = payload;
    else messages.push(payload);
    buffer = buffer.subarray(5 + size);
  }
  return { messages, end };
}

test("./cubicle sandbox ls, exec and kill drive a running server", async () => {
  const listed = await cubicle(["sandbox", "ls"]);
  assert.equal(listed.code, 0, listed.stderr);
  assert.match(listed.stdout, new RegExp(sandbox.sandboxId));

  const exec = await cubicle(["sandbox", "exec", sandbox.sandboxId, "--", "sh", "-c", "echo out; echo err >&2; id -u; exit 3"]);
  assert.equal(exec.stdout, "out\n0\n");
  assert.equal(exec.stderr, "err\n");
  assert.equal(exec.code, 3, "the command's exit code is the launcher's");
  const asUser = await cubicle(["sandbox", "exec", sandbox.sandboxId, "--user", "user", "--", "whoami"]);
  assert.equal(asUser.stdout, "user\n");

  const other = await Sandbox.create();
  const killed = await cubicle(["sandbox", "kill", other.sandboxId]);
  assert.equal(killed.code, 0, killed.stderr);
  assert.equal(await other.isRunning(), false);
  const again = await cubicle(["sandbox", "kill", other.sandboxId]);
  assert.notEqual(again.code, 0);
  assert.match(again.stderr, /not found/);
});

test("WebSocket upgrades pass through the router to a port inside the sandbox", async () => {
  // A minimal RFC 6455 echo server for short unfragmented text frames, written with python3's stdlib.
  const serverScript = [
    "import socket, hashlib, base64",
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 8765)); s.listen(4)",
    "while True:",
    "    c, _ = s.accept(); data = b''",
    "    while b'\\r\\n\\r\\n' not in data: data += c.recv(4096)",
    "    key = [l.split(b':', 1)[1].strip() for l in data.split(b'\\r\\n') if l.lower().startswith(b'sec-websocket-key')][0]",
    "    accept = base64.b64encode(hashlib.sha1(key + b'258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest())",
    "    c.sendall(b'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\nSec-WebSocket-Accept: ' + accept + b'\\r\\n\\r\\n')",
    "    while True:",
    "        head = c.recv(2)",
    "        if len(head) < 2 or head[0] & 0x0f == 8: break",
    "        mask = c.recv(4); payload = c.recv(head[1] & 0x7f)",
    "        text = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))",
    "        c.sendall(bytes([0x81, len(text)]) + text.upper())",
    "    c.close()",
  ].join("\n");
  await sandbox.files.write("/home/user/ws_echo.py", serverScript);
  await sandbox.commands.run("python3 /home/user/ws_echo.py", { background: true });

  const open = async (): Promise<WebSocket> => {
    for (let attempt = 0; ; attempt++) {
      const ws = new WebSocket(server.url.replace("http", "ws") + "/echo", { headers: { "e2b-sandbox-id": sandbox.sandboxId, "e2b-sandbox-port": "8765" } });
      const opened = await new Promise<boolean>((resolve) => {
        ws.once("open", () => resolve(true));
        ws.once("error", () => resolve(false));
      });
      if (opened) return ws;
      if (attempt > 50) throw new Error("the WebSocket server in the sandbox did not come up");
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  const ws = await open();
  const reply = new Promise<string>((resolve) => ws.once("message", (data) => resolve(data.toString())));
  ws.send("hello through the router");
  assert.equal(await reply, "HELLO THROUGH THE ROUTER");
  ws.close();

  const unknown = new WebSocket(server.url.replace("http", "ws") + "/", { headers: { "e2b-sandbox-id": "inosuchsandbox", "e2b-sandbox-port": "8765" } });
  const status = await new Promise<number>((resolve) => unknown.once("unexpected-response", (_req, res) => resolve(res.statusCode ?? 0)));
  assert.equal(status, 502);
});

test("polling watchers (the Python sync client's CreateWatcher / GetWatcherEvents / RemoveWatcher)", async () => {
  await sandbox.files.makeDir("/home/user/polled");
  const created = await unary("filesystem.Filesystem/CreateWatcher", { path: "/home/user/polled", recursive: true });
  assert.equal(created.status, 200);
  const watcherId = created.json.watcherId as string;
  assert.ok(watcherId);
  await sandbox.files.write("/home/user/polled/one.txt", "1");
  let events: { name: string; type: string }[] = [];
  for (let i = 0; i < 20 && !events.some((e) => e.name === "one.txt" && e.type === "EVENT_TYPE_CREATE"); i++) {
    await new Promise((r) => setTimeout(r, 100));
    events = events.concat((await unary("filesystem.Filesystem/GetWatcherEvents", { watcherId })).json.events ?? []);
  }
  assert.ok(events.some((e) => e.name === "one.txt" && e.type === "EVENT_TYPE_CREATE"), JSON.stringify(events));
  assert.equal((await unary("filesystem.Filesystem/RemoveWatcher", { watcherId })).status, 200);
  const gone = await unary("filesystem.Filesystem/GetWatcherEvents", { watcherId });
  assert.equal(gone.status, 404);
  assert.equal(gone.json.code, "not_found");
});

test("a process started with a tag can be connected to by that tag", async () => {
  const started = fetch(`${server.url}/process.Process/Start`, {
    method: "POST",
    headers: envdHeaders({ "content-type": "application/connect+json", authorization: "Basic " + Buffer.from("user:").toString("base64") }),
    body: envelope({ process: { cmd: "/bin/bash", args: ["-c", "sleep 0.5; echo tagged"] }, tag: "my-tag" }),
  });
  await new Promise((r) => setTimeout(r, 200));
  const attached = await stream("process.Process/Connect", { process: { tag: "my-tag" } });
  const output = attached.messages
    .map((m) => m.event?.data?.stdout)
    .filter(Boolean)
    .map((b64: string) => Buffer.from(b64, "base64").toString())
    .join("");
  assert.equal(output, "tagged\n");
  assert.ok(attached.messages.some((m) => m.event?.end), "the connected stream sees the end");
  assert.deepEqual(attached.end, {});
  await (await started).arrayBuffer();
  const missing = await stream("process.Process/Connect", { process: { tag: "no-such-tag" } });
  assert.equal(missing.end.error.code, "not_found");
});

test("envd /envs shows the sandbox's env vars and /metrics its usage, both behind the token", async () => {
  const envs = await fetch(`${server.url}/envs`, { headers: envdHeaders() });
  assert.equal(envs.status, 200);
  assert.equal((await envs.json()).FROM_CREATE, "yes");
  const denied = await fetch(`${server.url}/envs`, { headers: { "e2b-sandbox-id": sandbox.sandboxId, "e2b-sandbox-port": "49983" } });
  assert.equal(denied.status, 401);
  const metrics = await fetch(`${server.url}/metrics`, { headers: envdHeaders() });
  assert.equal(metrics.status, 200);
  const body = await metrics.json();
  assert.ok(body.mem_total > 0 || body.memTotal > 0, JSON.stringify(body));

  const sdkMetrics = await sandbox.getMetrics();
  assert.ok(sdkMetrics.length >= 1);
  assert.ok(sdkMetrics[0]!.memTotal > 0 && sdkMetrics[0]!.memUsed > 0, JSON.stringify(sdkMetrics[0]));
});

test("getMetrics({start, end}) returns only the 5 s samples in range, [] before the sandbox existed; the batch endpoint", async () => {
  const createdAt = new Date();
  const fresh = await Sandbox.create();
  try {
    // Samples accumulate in 5 s buckets while the sandbox runs.
    await new Promise((resolve) => setTimeout(resolve, 11_000));
    const all = await fresh.getMetrics();
    assert.ok(all.length >= 2, `two or more buckets after 11 s: ${JSON.stringify(all)}`);
    const stamps = all.map((metric) => metric.timestamp.getTime());
    assert.ok(stamps.every((stamp, index) => stamp % 5000 === 0 && (index === 0 || stamp - stamps[index - 1]! >= 5000)), `one per 5 s bucket: ${stamps}`);
    assert.ok(stamps[0]! >= Math.floor(createdAt.getTime() / 5000) * 5000 - 5000, "none from before the sandbox existed");
    const onlyFirst = await fresh.getMetrics({ start: new Date(stamps[0]!), end: new Date(stamps[0]! + 1000) });
    assert.deepEqual(onlyFirst.map((metric) => metric.timestamp.getTime()), [stamps[0]]);
    assert.deepEqual(await fresh.getMetrics({ start: new Date(createdAt.getTime() - 7_200_000), end: new Date(createdAt.getTime() - 3_600_000) }), []);
    const bad = await server.api("GET", `/sandboxes/${fresh.sandboxId}/metrics?start=soon`);
    assert.equal(bad.status, 400);
    const batch = await server.api("GET", `/sandboxes/metrics?sandbox_ids=${fresh.sandboxId},${sandbox.sandboxId}`);
    assert.equal(batch.status, 200);
    assert.deepEqual(Object.keys(batch.json.sandboxes).sort(), [fresh.sandboxId, sandbox.sandboxId].sort());
    assert.ok(batch.json.sandboxes[fresh.sandboxId].memUsed > 0);
  } finally {
    await fresh.kill();
  }
});
