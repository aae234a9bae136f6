import assert from "node:assert/strict";
import { EventEmitter } from "node:events";
import fs from "node:fs";
import type { LookupFunction } from "node:net";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { Agent, fetch as undiciFetch } from "undici";
import { WebSocket, WebSocketServer } from "ws";
import { openCertificateAuthority, type CertificateAuthority } from "../network/index.js";
import { createFakeAgentLink } from "../protocol/fake-agent-link.js";
import { SandboxRouter } from "../router/index.js";
import { SANDBOX_ID, startRouterTestServer, type RouterTestServer } from "../router/test-server.js";
import { certificateNamesFor, listenHttps, tlsCredentialsFor } from "./https-listener.js";

const DOMAIN = "cubicle.test";
let dir: string;
let ca: CertificateAuthority;
let server: RouterTestServer;
let sandboxHttp: { port: number; close(): Promise<void> };

/** Every name resolves to loopback: no DNS is asked. */
const loopback: LookupFunction = (_hostname, options, callback) => {
  if ((options as { all?: boolean }).all) (callback as unknown as (e: null, a: { address: string; family: number }[]) => void)(null, [{ address: "127.0.0.1", family: 4 }]);
  else callback(null, "127.0.0.1", 4);
};

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbs-https-test-"));
  ca = await openCertificateAuthority(path.join(dir, "ca"));
  const credentials = await tlsCredentialsFor({ domain: DOMAIN, tlsCertFile: undefined, tlsKeyFile: undefined }, ca);
  server = await startRouterTestServer({ https: credentials });
  // A stand-in sandbox: an HTTP server with a WebSocket echo.
  const { createServer } = await import("node:http");
  const http = createServer((req, res) => {
    req.resume();
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ fromSandbox: true, host: req.headers.host, path: req.url }));
  });
  const wss = new WebSocketServer({ server: http });
  wss.on("connection", (socket) => socket.on("message", (data) => socket.send(`echo:${data.toString()}`)));
  await new Promise<void>((resolve) => http.listen(0, "127.0.0.1", resolve));
  sandboxHttp = {
    port: (http.address() as net.AddressInfo).port,
    close: async () => {
      for (const client of wss.clients) client.terminate();
      wss.close();
      http.closeAllConnections();
      await new Promise<void>((resolve) => http.close(() => resolve()));
    },
  };
});

after(async () => {
  await sandboxHttp?.close();
  await server?.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

test("https://<port>-<sandboxId>.<domain>:<port>/ reaches the sandbox's port, verified against Cubicle's CA", async () => {
  const dispatcher = new Agent({ connect: { ca: ca.certificatePem, lookup: loopback } });
  try {
    const res = await undiciFetch(`https://${sandboxHttp.port}-${SANDBOX_ID}.${DOMAIN}:${server.httpsPort}/hello?x=1`, { dispatcher, signal: AbortSignal.timeout(5000) });
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { fromSandbox: true, host: `${sandboxHttp.port}-${SANDBOX_ID}.${DOMAIN}:${server.httpsPort}`, path: "/hello?x=1" });
    // The rest of the HTTPS port is the API, as on the plain port.
    const api = await undiciFetch(`https://${DOMAIN}:${server.httpsPort}/health`, { dispatcher, signal: AbortSignal.timeout(5000) });
    assert.deepEqual(await api.json(), { api: true });
  } finally {
    await dispatcher.close();
  }
});

test("a client that does not trust the CA is refused in the handshake", async () => {
  const dispatcher = new Agent({ connect: { lookup: loopback } });
  try {
    await assert.rejects(undiciFetch(`https://${sandboxHttp.port}-${SANDBOX_ID}.${DOMAIN}:${server.httpsPort}/`, { dispatcher, signal: AbortSignal.timeout(5000) }), (err: Error) => /SELF_SIGNED|UNABLE_TO_VERIFY|unable to verify/i.test(String((err.cause as Error)?.message ?? err.cause ?? err)));
  } finally {
    await dispatcher.close();
  }
});

test("a WebSocket upgrade over wss:// reaches the sandbox and echoes", async () => {
  const socket = new WebSocket(`wss://${sandboxHttp.port}-${SANDBOX_ID}.${DOMAIN}:${server.httpsPort}/ws`, { ca: ca.certificatePem, lookup: loopback as never, handshakeTimeout: 5000 });
  try {
    await new Promise<void>((resolve, reject) => {
      socket.once("open", () => resolve());
      socket.once("error", reject);
    });
    const reply = new Promise<string>((resolve) => socket.once("message", (data) => resolve(data.toString())));
    socket.send("over tls");
    assert.equal(await reply, "echo:over tls");
  } finally {
    socket.terminate();
  }
});

test("bytes that are not TLS, or not HTTP inside TLS, cost the server nothing", async () => {
  const raw = await new Promise<string>((resolve) => {
    const socket = net.connect(server.httpsPort!, "127.0.0.1");
    let received = "";
    socket.on("connect", () => socket.end("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    socket.on("data", (d) => (received += d.toString("latin1")));
    socket.on("error", () => undefined);
    socket.on("close", () => resolve(received));
    setTimeout(() => socket.destroy(), 3000);
  });
  assert.ok(!raw.includes("api"), "plain HTTP on the TLS port gets no answer of the API");
  const dispatcher = new Agent({ connect: { ca: ca.certificatePem, lookup: loopback } });
  try {
    const res = await undiciFetch(`https://${DOMAIN}:${server.httpsPort}/health`, { dispatcher, signal: AbortSignal.timeout(5000) });
    assert.equal(res.status, 200);
    await res.body?.cancel();
  } finally {
    await dispatcher.close();
  }
  assert.deepEqual(server.unhandled, []);
});

test("the certificate covers *.<domain> and <domain>; the operator's own files are used when given", async () => {
  assert.deepEqual(certificateNamesFor("cubicle.test"), ["*.cubicle.test", "cubicle.test"]);
  assert.deepEqual(certificateNamesFor("Cubicle.Localhost:3000"), ["*.cubicle.localhost", "cubicle.localhost"]);
  assert.deepEqual(certificateNamesFor("localhost"), ["localhost"]);
  const own = await ca.issue(["own.example.com"]);
  fs.writeFileSync(path.join(dir, "own.crt"), own.cert);
  fs.writeFileSync(path.join(dir, "own.key"), own.key);
  const credentials = await tlsCredentialsFor({ domain: DOMAIN, tlsCertFile: path.join(dir, "own.crt"), tlsKeyFile: path.join(dir, "own.key") }, ca);
  assert.equal(credentials.cert.toString(), own.cert);
  await assert.rejects(tlsCredentialsFor({ domain: DOMAIN, tlsCertFile: path.join(dir, "missing.crt"), tlsKeyFile: path.join(dir, "own.key") }, ca), /CUBICLE_TLS_CERT: cannot read/);
});

test("a port in use is a clear startup error; unusable credentials too", async () => {
  const source = Object.assign(new EventEmitter(), { routeTarget: () => undefined, liveSandboxes: () => [] });
  const router = new SandboxRouter(source, DOMAIN, { agentLink: createFakeAgentLink() });
  const credentials = await tlsCredentialsFor({ domain: DOMAIN, tlsCertFile: undefined, tlsKeyFile: undefined }, ca);
  await assert.rejects(listenHttps(router, () => undefined, credentials, "127.0.0.1", server.httpsPort!), (err: Error & { code?: string }) => err.code === "failed_precondition" && /in use \(CUBICLE_HTTPS_PORT\)/.test(err.message));
  await assert.rejects(listenHttps(router, () => undefined, { key: "not a key", cert: "not a cert" }, "127.0.0.1", 0), /certificate or key is unusable/);
  const { server: listening, port } = await listenHttps(router, () => undefined, credentials, "127.0.0.1", 0);
  assert.ok(port > 0);
  await new Promise<void>((resolve) => listening.close(() => resolve()));
});
