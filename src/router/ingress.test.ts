import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { openCertificateAuthority } from "../network/index.js";
import { ENVD_PORT, INTERPRETER_PORT } from "../protocol/index.js";
import { maskedHost, trafficTokenRefusal } from "./sandbox-router.js";
import { RESUMING_ID, SANDBOX_ID, startRouterTestServer, type RouterTestServer } from "./test-server.js";

const TOKEN = "traffic-token-0123456789";

/** A server "in the sandbox" that answers every request with the headers it received (over TLS with `tls`). */
async function headerEcho(tls?: { key: string | Buffer; cert: string | Buffer }): Promise<{ port: number; close(): void }> {
  const handler = (req: http.IncomingMessage, res: http.ServerResponse) => {
    req.resume();
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ ...req.headers, "x-seen-over": tls ? "tls" : "plain" }));
  };
  const server = tls ? https.createServer(tls, handler) : http.createServer(handler);
  // Upgrades: a 101, then the request head it got, then an echo of what follows.
  server.on("upgrade", (req, socket) => {
    socket.on("error", () => undefined);
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n${JSON.stringify(req.headers)}\n`);
    socket.pipe(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

/** A GET through the router with any headers, Host included (fetch drops a Host header). */
function request(routerPort: number, headers: Record<string, string>): Promise<{ status: number; body: any }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port: routerPort, path: "/x", headers, agent: false, timeout: 5000 }, (res) => {
      let text = "";
      res.on("data", (d) => (text += d));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: text ? JSON.parse(text) : undefined }));
    });
    req.on("timeout", () => req.destroy(new Error("timed out")));
    req.on("error", reject);
    req.end();
  });
}

/** Sends an upgrade request through the router; resolves the status line and what followed the head. */
function upgrade(routerPort: number, hostHeader: string, extraHeaders: Record<string, string> = {}): Promise<{ status: number; rest: string }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(routerPort, "127.0.0.1");
    let received = "";
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no complete answer: ${JSON.stringify(received)}`));
    }, 5000);
    const finish = () => {
      const end = received.indexOf("\r\n\r\n");
      if (end === -1) return false;
      const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(received)?.[1] ?? 0);
      const rest = received.slice(end + 4);
      // A 101 is done once the echoed head and our ping are back; an error once its body is in.
      if (status === 101 ? !rest.includes("ping") : !rest.endsWith("}")) return false;
      clearTimeout(timer);
      socket.destroy();
      resolve({ status, rest });
      return true;
    };
    socket.on("connect", () => {
      const headers = Object.entries(extraHeaders).map(([k, v]) => `${k}: ${v}\r\n`).join("");
      socket.write(`GET /ws HTTP/1.1\r\nHost: ${hostHeader}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n${headers}\r\n`);
      setTimeout(() => socket.writable && socket.write("ping"), 50);
    });
    socket.on("data", (d) => {
      received += d.toString("latin1");
      finish();
    });
    socket.on("error", () => undefined);
    socket.on("close", () => {
      if (!finish()) {
        clearTimeout(timer);
        reject(new Error(`closed early: ${JSON.stringify(received)}`));
      }
    });
  });
}

describe("traffic access token", () => {
  let server: RouterTestServer;
  let sandbox: { port: number; close(): void };
  before(async () => {
    server = await startRouterTestServer({ ingress: { trafficAccessToken: TOKEN }, resumeDelayMs: 10 });
    sandbox = await headerEcho();
  });
  after(async () => {
    sandbox.close();
    await server.close();
  });

  const get = (host: string, headers: Record<string, string> = {}) => request(server.port, { host, ...headers });

  test("a request without the token gets a 403 E2B body and never reaches the sandbox", async () => {
    const res = await get(`${sandbox.port}-${SANDBOX_ID}.cubicle.test`);
    assert.equal(res.status, 403);
    const body = res.body;
    assert.equal(body.code, 403);
    assert.equal(body.sandboxId, SANDBOX_ID);
    assert.match(body.message, /e2b-traffic-access-token' is missing/);
  });

  test("a wrong token, a prefix of it, or an empty one gets a 403", async () => {
    for (const token of ["wrong", TOKEN.slice(0, -1), TOKEN + "x", `${TOKEN}, ${TOKEN}`]) {
      const res = await get(`${sandbox.port}-${SANDBOX_ID}.cubicle.test`, { "e2b-traffic-access-token": token });
      assert.equal(res.status, 403, token);
      assert.match(res.body.message, /is invalid/);
    }
    const res = await get(`${sandbox.port}-${SANDBOX_ID}.cubicle.test`, { "e2b-traffic-access-token": "" });
    assert.equal(res.status, 403);
  });

  test("the right token is let through, by Host or by E2b-Sandbox-* headers", async () => {
    const res = await get(`${sandbox.port}-${SANDBOX_ID}.cubicle.test`, { "E2B-Traffic-Access-Token": TOKEN });
    assert.equal(res.status, 200);
    assert.equal(res.body["e2b-traffic-access-token"], TOKEN, "forwarded as upstream does");
    const byHeaders = await request(server.port, { "e2b-sandbox-id": SANDBOX_ID, "e2b-sandbox-port": String(sandbox.port), "e2b-traffic-access-token": TOKEN });
    assert.equal(byHeaders.status, 200);
    const refused = await request(server.port, { "e2b-sandbox-id": SANDBOX_ID, "e2b-sandbox-port": String(sandbox.port) });
    assert.equal(refused.status, 403);
  });

  test("upgrades need the token too", async () => {
    const host = `${sandbox.port}-${SANDBOX_ID}.cubicle.test`;
    const missing = await upgrade(server.port, host);
    assert.equal(missing.status, 403);
    assert.match(JSON.parse(missing.rest).message, /is missing/);
    const wrong = await upgrade(server.port, host, { "e2b-traffic-access-token": "nope" });
    assert.equal(wrong.status, 403);
    const right = await upgrade(server.port, host, { "e2b-traffic-access-token": TOKEN });
    assert.equal(right.status, 101);
    assert.match(right.rest, /ping$/, "bytes flow both ways after the 101");
  });

  test("a paused sandbox is not woken by traffic without its token, and is with it", async () => {
    const host = `${sandbox.port}-${RESUMING_ID}.cubicle.test`;
    const before = server.resumes;
    const refused = await get(host);
    assert.equal(refused.status, 403);
    assert.equal((await upgrade(server.port, host)).status, 403);
    assert.equal(server.resumes, before, "no resume for refused traffic");
    const res = await get(host, { "e2b-traffic-access-token": TOKEN });
    assert.equal(res.status, 200);
    assert.equal(server.resumes, before + 1);
  });

  test("envd's port keeps envd's own token; every other port, the interpreter's too, needs the traffic token", () => {
    assert.equal(trafficTokenRefusal({}, ENVD_PORT, TOKEN), undefined);
    assert.match(trafficTokenRefusal({}, INTERPRETER_PORT, TOKEN) ?? "", /missing/);
    assert.equal(trafficTokenRefusal({ "e2b-traffic-access-token": TOKEN }, INTERPRETER_PORT, TOKEN), undefined);
    assert.equal(trafficTokenRefusal({}, 8080, undefined), undefined, "no token: public traffic");
    assert.equal(server.unhandled.length, 0);
  });
});

describe("maskRequestHost", () => {
  let server: RouterTestServer;
  let sandbox: { port: number; close(): void };
  before(async () => {
    server = await startRouterTestServer({ ingress: { maskRequestHost: "localhost:${PORT}" } });
    sandbox = await headerEcho();
  });
  after(async () => {
    sandbox.close();
    await server.close();
  });

  test("the sandbox receives the masked Host with the port filled in, and the client's in X-Forwarded-Host", async () => {
    const original = `${sandbox.port}-${SANDBOX_ID}.cubicle.test`;
    const res = await request(server.port, { host: original, "x-forwarded-host": "spoofed.example" });
    assert.equal(res.status, 200);
    const seen = res.body;
    assert.equal(seen.host, `localhost:${sandbox.port}`);
    assert.equal(seen["x-forwarded-host"], original);
  });

  test("an upgrade is masked the same way", async () => {
    const original = `${sandbox.port}-${SANDBOX_ID}.cubicle.test`;
    const res = await upgrade(server.port, original, { "X-Forwarded-Host": "spoofed.example" });
    assert.equal(res.status, 101);
    const seen = JSON.parse(res.rest.slice(0, res.rest.indexOf("\n")));
    assert.equal(seen.host, `localhost:${sandbox.port}`);
    assert.equal(seen["x-forwarded-host"], original);
  });

  test("envd's port is not masked; a mask that is no Host value is refused, never injected", () => {
    assert.equal(maskedHost(ENVD_PORT, "localhost:${PORT}"), undefined);
    assert.equal(maskedHost(8080, "${PORT}-${PORT}.example.com"), "8080-8080.example.com");
    assert.equal(maskedHost(8080, undefined), undefined);
    for (const bad of ["a\r\nX-Evil: 1", "a b", "é.example.com", "x".repeat(300)]) {
      assert.throws(() => maskedHost(8080, bad), (e: Error & { code?: string }) => e.code === "invalid_argument", JSON.stringify(bad));
    }
  });
});

describe("an invalid maskRequestHost", () => {
  let server: RouterTestServer;
  let sandbox: { port: number; close(): void };
  before(async () => {
    server = await startRouterTestServer({ ingress: { maskRequestHost: "evil\r\nX-Injected: 1" } });
    sandbox = await headerEcho();
  });
  after(async () => {
    sandbox.close();
    await server.close();
  });

  test("gets the client a 400 on both paths, and nothing reaches the sandbox with an injected header", async () => {
    const host = `${sandbox.port}-${SANDBOX_ID}.cubicle.test`;
    const res = await request(server.port, { host });
    assert.equal(res.status, 400);
    assert.match(res.body.message, /maskRequestHost/);
    const up = await upgrade(server.port, host);
    assert.equal(up.status, 400);
    assert.equal(server.unhandled.length, 0);
  });
});

describe("httpsPorts (HTTPS_PORTS_NOTE)", () => {
  let server: RouterTestServer;
  let plainServer: RouterTestServer;
  let tlsSandbox: { port: number; close(): void };
  let plainSandbox: { port: number; close(): void };
  let dir: string;
  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbs-https-ports-"));
    // A certificate no client could verify for 127.0.0.1: another name, an unknown CA.
    const credentials = await (await openCertificateAuthority(path.join(dir, "ca"))).issue(["sandbox-own.invalid"]);
    tlsSandbox = await headerEcho(credentials);
    plainSandbox = await headerEcho();
    server = await startRouterTestServer({ ingress: { httpsPorts: [tlsSandbox.port] } });
    plainServer = await startRouterTestServer({ ingress: {} });
  });
  after(async () => {
    tlsSandbox.close();
    plainSandbox.close();
    await server.close();
    await plainServer.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("a listed port is reached over TLS without checking its certificate; other ports stay plain HTTP", async () => {
    const res = await request(server.port, { host: `${tlsSandbox.port}-${SANDBOX_ID}.cubicle.test` });
    assert.equal(res.status, 200);
    assert.equal(res.body["x-seen-over"], "tls");
    const again = await request(server.port, { host: `${tlsSandbox.port}-${SANDBOX_ID}.cubicle.test` });
    assert.equal(again.body["x-seen-over"], "tls", "a kept-alive TLS connection is reused");
    const plain = await request(server.port, { host: `${plainSandbox.port}-${SANDBOX_ID}.cubicle.test` });
    assert.equal(plain.status, 200);
    assert.equal(plain.body["x-seen-over"], "plain");
    assert.equal(server.unhandled.length, 0);
  });

  test("without httpsPorts the same TLS port gets plain HTTP and answers nothing usable (502)", async () => {
    const res = await request(plainServer.port, { host: `${tlsSandbox.port}-${SANDBOX_ID}.cubicle.test` });
    assert.equal(res.status, 502);
  });

  test("an upgrade to a listed port goes over TLS, bytes both ways", async () => {
    const res = await upgrade(server.port, `${tlsSandbox.port}-${SANDBOX_ID}.cubicle.test`);
    assert.equal(res.status, 101);
    assert.match(res.rest, /ping$/);
  });
});
