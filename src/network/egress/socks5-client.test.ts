import assert from "node:assert/strict";
import net from "node:net";
import { after, before, test } from "node:test";
import { startSocks5Server, type Socks5Server } from "../../../test/support/socks5-server.js";
import { socks5Connect, Socks5Error } from "./socks5-client.js";

let echo: net.Server;
let echoPort: number;
const servers: { close(): Promise<void> }[] = [];

/** A loopback TCP server whose connections are destroyed when the tests end. */
async function listen(onConnection: (socket: net.Socket) => void): Promise<net.Server> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => {});
    onConnection(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  servers.push({
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  });
  return server;
}

before(async () => {
  echo = await listen((socket) => socket.pipe(socket));
  echoPort = (echo.address() as net.AddressInfo).port;
});

after(async () => {
  for (const server of servers) await server.close();
});

async function socks(options: Parameters<typeof startSocks5Server>[0] = {}): Promise<Socks5Server> {
  const server = await startSocks5Server({ host: "127.0.0.1", port: 0, ...options });
  servers.push(server);
  return server;
}

async function roundTrip(socket: net.Socket, text: string): Promise<string> {
  socket.resume();
  socket.write(text);
  let received = "";
  for await (const chunk of socket) {
    received += chunk;
    if (received.length >= text.length) break;
  }
  socket.destroy();
  return received;
}

test("tunnels to an IPv4 destination without authentication", async () => {
  const server = await socks();
  const socket = await socks5Connect({ proxy: { host: "127.0.0.1", port: server.port }, destination: { address: "127.0.0.1", port: echoPort } });
  assert.equal(await roundTrip(socket, "hello through socks"), "hello through socks");
  assert.deepEqual(server.connections, [{ address: "127.0.0.1", port: echoPort }]);
});

test("resolves the proxy's host name (localhost) on each dial", async () => {
  const server = await socks();
  const socket = await socks5Connect({ proxy: { host: "localhost", port: server.port }, destination: { address: "127.0.0.1", port: echoPort } });
  assert.equal(await roundTrip(socket, "x"), "x");
});

test("authenticates with username and password (RFC 1929)", async () => {
  const server = await socks({ username: "user", password: "s3cret" });
  const socket = await socks5Connect({ proxy: { host: "127.0.0.1", port: server.port, username: "user", password: "s3cret" }, destination: { address: "127.0.0.1", port: echoPort } });
  assert.equal(await roundTrip(socket, "authenticated"), "authenticated");
});

test("a wrong password, or none where one is needed, is an auth failure", async () => {
  const server = await socks({ username: "user", password: "s3cret" });
  const wrong = socks5Connect({ proxy: { host: "127.0.0.1", port: server.port, username: "user", password: "nope" }, destination: { address: "127.0.0.1", port: echoPort } });
  await assert.rejects(wrong, (err: Socks5Error) => err instanceof Socks5Error && err.kind === "auth" && /refused the username or password/.test(err.message));
  const none = socks5Connect({ proxy: { host: "127.0.0.1", port: server.port }, destination: { address: "127.0.0.1", port: echoPort } });
  await assert.rejects(none, (err: Socks5Error) => err.kind === "auth" && /none of our authentication methods/.test(err.message));
  assert.equal(server.connections.length, 0);
});

test("a proxy that is down is unreachable", async () => {
  const server = await socks();
  const port = server.port;
  await server.close();
  await assert.rejects(socks5Connect({ proxy: { host: "127.0.0.1", port }, destination: { address: "127.0.0.1", port: echoPort } }), (err: Socks5Error) => err.kind === "unreachable" && /unreachable: ECONNREFUSED/.test(err.message));
});

test("a refused CONNECT names the RFC 1928 reply", async () => {
  const server = await socks({ refuseWith: 2 });
  await assert.rejects(socks5Connect({ proxy: { host: "127.0.0.1", port: server.port }, destination: { address: "127.0.0.1", port: echoPort } }), (err: Socks5Error) => err.kind === "refused" && /not allowed by ruleset/.test(err.message));
  // A destination nobody listens on: the server answers "connection refused".
  const closed = await listen(() => {});
  const deadPort = (closed.address() as net.AddressInfo).port;
  await new Promise((resolve) => closed.close(resolve));
  const open = await socks();
  await assert.rejects(socks5Connect({ proxy: { host: "127.0.0.1", port: open.port }, destination: { address: "127.0.0.1", port: deadPort } }), (err: Socks5Error) => err.kind === "refused" && /connection refused/.test(err.message));
});

test("a silent proxy times out; a proxy speaking garbage is a protocol error", async () => {
  const silent = await listen(() => {});
  const garbage = await listen((socket) => socket.end("HTTP/1.1 400 Bad Request\r\n\r\n"));
  const flood = await listen((socket) => {
    socket.write(Buffer.from([5, 0]));
    socket.on("data", () => socket.write(Buffer.alloc(4096, 5)));
  });
  const port = (server: net.Server) => (server.address() as net.AddressInfo).port;
  const destination = { address: "127.0.0.1", port: echoPort };
  const started = Date.now();
  await assert.rejects(socks5Connect({ proxy: { host: "127.0.0.1", port: port(silent) }, destination, timeoutMs: 200 }), (err: Socks5Error) => err.kind === "timeout");
  assert.ok(Date.now() - started < 2000);
  await assert.rejects(socks5Connect({ proxy: { host: "127.0.0.1", port: port(garbage) }, destination }), (err: Socks5Error) => err.kind === "protocol");
  await assert.rejects(socks5Connect({ proxy: { host: "127.0.0.1", port: port(flood) }, destination }), (err: Socks5Error) => err.kind === "protocol");
});

test("refuses a destination that is not an IP literal and over-long credentials", async () => {
  await assert.rejects(socks5Connect({ proxy: { host: "127.0.0.1", port: 1 }, destination: { address: "example.com", port: 80 } }), (err: Socks5Error) => err.kind === "protocol");
  await assert.rejects(socks5Connect({ proxy: { host: "127.0.0.1", port: 1, username: "u".repeat(256), password: "p" }, destination: { address: "127.0.0.1", port: 80 } }), (err: Socks5Error) => err.kind === "auth");
});

test("an IPv6 destination is sent as ATYP 4", async () => {
  const server = await socks();
  const result = socks5Connect({ proxy: { host: "127.0.0.1", port: server.port }, destination: { address: "::ffff:127.0.0.1", port: echoPort } });
  const socket = await result.catch(() => undefined);
  socket?.destroy();
  assert.deepEqual(server.connections, [{ address: "0000:0000:0000:0000:0000:ffff:7f00:0001", port: echoPort }]);
});
