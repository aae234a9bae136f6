import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { apiAnswers, exchange as exchangeWith, RESUMING_ID, SANDBOX_ID, sandboxProcess, startRouterTestServer, type RouterTestServer } from "./test-server.js";

/**
 * The API port's HTTP server with a real router in front of a stand-in API, and stand-in
 * "sandboxes" that are raw TCP servers on loopback: the router forwards to 127.0.0.1 at the port
 * a request names, so a test's sandbox process answers whatever bytes it likes.
 */
let server: RouterTestServer;
let port: number;

before(async () => {
  server = await startRouterTestServer();
  port = server.port;
});

after(() => server.close());

const exchange = (text: string, options?: { resetAfterWrite?: boolean }) => exchangeWith(port, text, options);

/** Status and JSON body of a raw HTTP/1.1 response. */
function parseResponse(raw: string): { status: number; body: any } {
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(raw)?.[1] ?? 0);
  const text = raw.slice(raw.indexOf("\r\n\r\n") + 4);
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    body = text;
  }
  return { status, body };
}

async function assertServerAlive(): Promise<void> {
  assert.deepEqual(server.unhandled.splice(0).map(String), [], "nothing was thrown that would end the server process");
  assert.ok(await apiAnswers(port));
}

function assertE2bError(body: any, status: number): void {
  assert.equal(typeof body, "object", `an E2B error body, not ${JSON.stringify(body)}`);
  assert.equal(body.code, status);
  assert.equal(typeof body.message, "string");
}

test("a sandbox process answering with a status below 100 gets the client a 502 E2B body, and the server keeps serving", { timeout: 20_000 }, async () => {
  for (const statusLine of ["HTTP/1.1 042 Weird", "HTTP/1.1 000 Zero", "HTTP/1.1 099 X", "HTTP/1.1 101 Switching Protocols"]) {
    const sandbox = await sandboxProcess(`${statusLine}\r\ncontent-length: 2\r\n\r\nhi`);
    try {
      const res = await fetch(`http://127.0.0.1:${port}/`, { headers: { "e2b-sandbox-id": SANDBOX_ID, "e2b-sandbox-port": String(sandbox.port) }, signal: AbortSignal.timeout(5000) });
      assert.equal(res.status, 502, statusLine);
      assertE2bError(await res.json(), 502);
    } finally {
      sandbox.close();
    }
    await assertServerAlive();
  }
});

test("a sandbox process answering garbage gets the client a 502 E2B body", { timeout: 20_000 }, async () => {
  for (const answer of [
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "HTTP/1.1 1000 Big\r\n\r\n",
    "HTTP/1.1 abc\r\n\r\n",
    "\x00\x01\x02garbage\r\n\r\n",
    "HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\n\r\n",
    "",
  ]) {
    const sandbox = await sandboxProcess(answer);
    try {
      const res = await fetch(`http://127.0.0.1:${port}/`, { headers: { "e2b-sandbox-id": SANDBOX_ID, "e2b-sandbox-port": String(sandbox.port) }, signal: AbortSignal.timeout(5000) });
      assert.equal(res.status, 502, JSON.stringify(answer));
      assertE2bError(await res.json(), 502);
    } finally {
      sandbox.close();
    }
  }
  await assertServerAlive();
});

const badPorts = ["65536", "-1", "abc", "0", "", "1e3", "0x50", "49983.0", "99999999999999999999"];

test("a request with an invalid E2b-Sandbox-Port gets 400 with an E2B body", { timeout: 20_000 }, async () => {
  for (const badPort of badPorts) {
    const res = await fetch(`http://127.0.0.1:${port}/health`, { headers: { "e2b-sandbox-id": SANDBOX_ID, "e2b-sandbox-port": badPort }, signal: AbortSignal.timeout(5000) });
    assert.equal(res.status, 400, `port ${JSON.stringify(badPort)}`);
    const body = await res.json();
    assertE2bError(body, 400);
    assert.match(body.message, /port/i);
  }
  const byHost = await exchange(`GET / HTTP/1.1\r\nHost: 99999-${SANDBOX_ID}.cubicle.test\r\nConnection: close\r\n\r\n`);
  assert.equal(parseResponse(byHost).status, 400);
  assertE2bError(parseResponse(byHost).body, 400);
  await assertServerAlive();
});

test("a WebSocket upgrade with an invalid port, by header or Host, gets 400 and does not end the server", { timeout: 20_000 }, async () => {
  const upgrade = (headers: string) => `GET /ws HTTP/1.1\r\n${headers}Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`;
  for (const badPort of badPorts) {
    const raw = await exchange(upgrade(`Host: 127.0.0.1\r\nE2b-Sandbox-Id: ${SANDBOX_ID}\r\nE2b-Sandbox-Port: ${badPort}\r\n`));
    const { status, body } = parseResponse(raw);
    assert.equal(status, 400, `port ${JSON.stringify(badPort)}: ${raw}`);
    assertE2bError(body, 400);
  }
  for (const host of [`99999-${SANDBOX_ID}.cubicle.test`, `0-${SANDBOX_ID}.cubicle.test`, `65536-${SANDBOX_ID}.cubicle.test:80`]) {
    const { status, body } = parseResponse(await exchange(upgrade(`Host: ${host}\r\n`)));
    assert.equal(status, 400, host);
    assertE2bError(body, 400);
  }
  await assertServerAlive();
});

test("a WebSocket upgrade to a port where nothing listens gets 502, and one to an unknown sandbox 502 not found", { timeout: 20_000 }, async () => {
  const closed = await sandboxProcess("");
  closed.close();
  const upgrade = (id: string, p: number) => `GET / HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: ${id}\r\nE2b-Sandbox-Port: ${p}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n`;
  const refused = parseResponse(await exchange(upgrade(SANDBOX_ID, closed.port)));
  assert.equal(refused.status, 502);
  assertE2bError(refused.body, 502);
  const unknown = parseResponse(await exchange(upgrade("inosuch", 49983)));
  assert.equal(unknown.status, 502);
  assert.deepEqual(unknown.body, { message: "The sandbox was not found", sandboxId: "inosuch", code: 502 });
  await assertServerAlive();
});

test("clients that reset their connection mid-upgrade or mid-request do not end the server", { timeout: 20_000 }, async () => {
  const sandbox = await sandboxProcess("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
  try {
    for (let i = 0; i < 5; i++) {
      // The resuming sandbox keeps the upgrade waiting; the client is gone by the time it answers.
      await exchange(`GET / HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: ${RESUMING_ID}\r\nE2b-Sandbox-Port: ${sandbox.port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n`, { resetAfterWrite: true });
      await exchange(`GET / HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: inosuch\r\nE2b-Sandbox-Port: 49983\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n`, { resetAfterWrite: true });
      await exchange(`POST / HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: ${SANDBOX_ID}\r\nE2b-Sandbox-Port: ${sandbox.port}\r\nContent-Length: 100\r\n\r\npartial`, { resetAfterWrite: true });
      await exchange(`POST / HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: ${RESUMING_ID}\r\nE2b-Sandbox-Port: ${sandbox.port}\r\nContent-Length: 100\r\n\r\npartial`, { resetAfterWrite: true });
    }
    await new Promise((r) => setTimeout(r, 300));
  } finally {
    sandbox.close();
  }
  await assertServerAlive();
});

test("an upgrade that is not sandbox traffic gets an E2B error body", { timeout: 20_000 }, async () => {
  const { status, body } = parseResponse(await exchange(`GET /v2/sandboxes HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n`));
  assert.ok(status >= 400 && status < 500, String(status));
  assertE2bError(body, status);
  await assertServerAlive();
});

test("requests Node cannot parse get an E2B body: bad request line 400, header overflow 431, bad framing 400", { timeout: 20_000 }, async () => {
  const cases: [string, number][] = [
    ["GARBAGE\r\n\r\n", 400],
    ["GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400],
    ["GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400],
    [`GET / HTTP/1.1\r\nHost: x\r\nX-Big: ${"a".repeat(20_000)}\r\n\r\n`, 431],
    ["POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400],
    ["GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400],
  ];
  for (const [request, expected] of cases) {
    const { status, body } = parseResponse(await exchange(request));
    assert.equal(status, expected, JSON.stringify(request.slice(0, 60)));
    assertE2bError(body, expected);
  }
  await assertServerAlive();
});

test("an Expect header other than 100-continue gets 417 with an E2B body", { timeout: 20_000 }, async () => {
  const { status, body } = parseResponse(await exchange("GET /health HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\nConnection: close\r\n\r\n"));
  assert.equal(status, 417);
  assertE2bError(body, 417);
  await assertServerAlive();
});

test("signed /files URLs that are malformed are not routed and do not end the server", { timeout: 20_000 }, async () => {
  for (const url of ["/files?signature=v1_x", "/files?%zz=1&signature=%", `/files?signature=${"v1_" + "A".repeat(43)}&path=%ff%fe`, `/files?signature=${"A".repeat(5000)}`]) {
    const res = await fetch(`http://127.0.0.1:${port}${url}`, { signal: AbortSignal.timeout(5000) });
    assert.equal(res.status, 200, `${url} goes to the API`);
    await res.arrayBuffer();
  }
  await assertServerAlive();
});

test("a sandbox answering before the request body is in (a 401 on an upload) leaves the client's connection usable", { timeout: 30_000 }, async () => {
  const net = await import("node:net");
  const { upstream, upstreamPort } = await earlyAnsweringUpstream();
  const socket = net.connect(port, "127.0.0.1");
  try {
    let received = "";
    socket.on("data", (chunk) => (received += chunk.toString("latin1")));
    const answers = () => received.split("HTTP/1.1 401").length - 1;
    const until = async (count: number) => {
      const deadline = Date.now() + 10_000;
      while (answers() < count && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      assert.equal(answers(), count, `answers so far: ${JSON.stringify(received.slice(0, 500))}`);
    };
    const head = (method: string, length: number) =>
      `${method} /upload HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: ${SANDBOX_ID}\r\nE2b-Sandbox-Port: ${upstreamPort}\r\nContent-Length: ${length}\r\n\r\n`;
    const bodyBytes = 8 * 1024 * 1024;
    socket.write(head("POST", bodyBytes));
    socket.write(Buffer.alloc(64 * 1024));
    await until(1);
    // The rest of the body, then a second request on the same connection: it must be answered.
    const rest = Buffer.alloc(bodyBytes - 64 * 1024);
    for (let offset = 0; offset < rest.length; offset += 1024 * 1024) socket.write(rest.subarray(offset, offset + 1024 * 1024));
    socket.write(head("POST", 0));
    await until(2);
  } finally {
    socket.destroy();
    upstream.close();
  }
  await assertServerAlive();
});

test("an answer given before the body is in, on a Connection: close request, is not followed by a reset while the client still sends", { timeout: 30_000 }, async () => {
  const net = await import("node:net");
  const { upstream, upstreamPort } = await earlyAnsweringUpstream();
  try {
    // A sandbox's early answer (forwarded), and the router's own (an unknown sandbox).
    for (const [sandboxId, status] of [
      [SANDBOX_ID, "401"],
      ["no-such-sandbox", "502"],
    ] as const) {
      // Half-open: a client that has not yet read the server's close keeps sending (Node's
      // default would stop writing at the server's FIN and hide the reset).
      const socket = net.connect({ port, host: "127.0.0.1", allowHalfOpen: true });
      let received = "";
      let failure: Error | undefined;
      let sending = true;
      let closedWhileSending = false;
      socket.on("data", (chunk) => (received += chunk.toString("latin1")));
      socket.on("error", (error) => (failure = error));
      socket.on("end", () => {
        closedWhileSending = sending;
        socket.end();
      });
      const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
      try {
        const bodyBytes = 8 * 1024 * 1024;
        socket.write(`POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nE2b-Sandbox-Id: ${sandboxId}\r\nE2b-Sandbox-Port: ${upstreamPort}\r\nContent-Length: ${bodyBytes}\r\n\r\n`);
        socket.write(Buffer.alloc(64 * 1024));
        const deadline = Date.now() + 10_000;
        while (!received.includes("\r\n\r\n") && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
        assert.match(received, new RegExp(`^HTTP/1\\.1 ${status}`), sandboxId);
        // The client had not seen the answer yet and goes on sending: closing now would reset it.
        await new Promise((r) => setTimeout(r, 100));
        const rest = Buffer.alloc(bodyBytes - 64 * 1024);
        for (let offset = 0; offset < rest.length; offset += 1024 * 1024) {
          const last = offset + 1024 * 1024 >= rest.length;
          socket.write(rest.subarray(offset, offset + 1024 * 1024));
          if (last) sending = false;
          else await new Promise((r) => setTimeout(r, 20));
        }
        await Promise.race([closed, new Promise((r) => setTimeout(r, 10_000))]);
        assert.equal(failure, undefined, `${sandboxId}: the client's connection failed with ${String(failure)}`);
        assert.equal(closedWhileSending, false, `${sandboxId}: the server closed while the body was still arriving`);
        assert.ok(socket.readableEnded, `${sandboxId}: the server closes once the body is in`);
      } finally {
        socket.destroy();
      }
    }
  } finally {
    upstream.close();
  }
  await assertServerAlive();
});

/** A sandbox's server that answers 401 at once, without reading the request's body. */
async function earlyAnsweringUpstream(): Promise<{ upstream: import("node:http").Server; upstreamPort: number }> {
  const http = await import("node:http");
  const upstream = http.createServer((_req, res) => {
    res.writeHead(401, { "content-type": "application/json", "content-length": 2 });
    res.end("{}");
  });
  await new Promise<void>((resolve) => upstream.listen(0, "127.0.0.1", resolve));
  return { upstream, upstreamPort: (upstream.address() as import("node:net").AddressInfo).port };
}
