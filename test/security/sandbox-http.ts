/**
 * Helpers of the router/API battery and its fuzz: a raw HTTP exchange with the server, and a
 * process inside a sandbox that answers HTTP the way no well-behaved server would.
 */
import assert from "node:assert/strict";
import { after, before } from "node:test";
import { Sandbox } from "e2b";
import { exchangeTimed } from "../../src/router/test-server.js";
import { startTestServer, useServerForSdk, type TestServer } from "../e2e/harness.js";
import { isE2bErrorBody, parseRawResponse } from "./fuzz.js";

/** Port of the misbehaving server inside the sandbox. */
export const WEIRD_PORT = 8042;
/** A port inside the sandbox where nothing listens. */
export const CLOSED_PORT = 8043;

/**
 * A raw TCP "HTTP server" for /usr/bin/python3 in the sandbox: it answers by request path with
 * a status below 100, a 101 nobody asked for, bytes that are not HTTP, or nothing at all.
 */
const WEIRD_SERVER = String.raw`
import socket, threading
answers = {
    b"/s042": b"HTTP/1.1 042 Weird\r\nContent-Length: 2\r\n\r\nhi",
    b"/s000": b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
    b"/s099": b"HTTP/1.1 099 Almost\r\nContent-Length: 0\r\n\r\n",
    b"/s101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"/garbage": b"\x00\x01\x02 this is not HTTP\r\n\r\n",
    b"/silent": b"",
}
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", ${WEIRD_PORT}))
srv.listen(128)
def handle(conn):
    try:
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        parts = data.split(b" ")
        path = parts[1] if len(parts) > 1 else b"/"
        conn.sendall(answers.get(path, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Weird-Server: 1\r\n\r\nok"))
    except Exception:
        pass
    finally:
        conn.close()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
`;

/** Starts the misbehaving server in the sandbox and waits until the router reaches it. */
export async function startWeirdServer(server: TestServer, sandbox: Sandbox): Promise<void> {
  await sandbox.files.write("/home/user/weird_server.py", WEIRD_SERVER);
  await sandbox.commands.run(`/usr/bin/python3 /home/user/weird_server.py >/tmp/weird.log 2>&1`, { background: true });
  for (let attempt = 0; attempt < 100; attempt++) {
    const res = await fetch(server.url + "/ok", { headers: { "e2b-sandbox-id": sandbox.sandboxId, "e2b-sandbox-port": String(WEIRD_PORT) } }).catch(() => undefined);
    if (res?.status === 200 && (await res.text()) === "ok") return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error("the misbehaving server in the sandbox did not come up");
}

/** Sends raw bytes to the server's port; what comes back until it closes, parsed. */
export async function rawExchange(server: TestServer, text: string, options: { resetAfterWrite?: boolean; halfClose?: boolean; timeoutMs?: number } = {}) {
  const port = Number(new URL(server.url).port);
  const { raw, timedOut } = await exchangeTimed(port, text, { timeoutMs: 5000, ...options });
  return { raw, timedOut, response: parseRawResponse(raw) };
}

/** Asserts a raw response with this status and an E2B error body; returns the body. */
export function assertRawE2bError(raw: string, status: number): { code: number; message: string } {
  const response = parseRawResponse(raw);
  assert.ok(response, `an HTTP response, not ${JSON.stringify(raw.slice(0, 200))}`);
  assert.equal(response.status, status, raw.slice(0, 300));
  assert.ok(isE2bErrorBody(response.body, status), `an E2B body: ${response.body.slice(0, 300)}`);
  return JSON.parse(response.body);
}

/** An upgrade request (WebSocket handshake) with these extra header lines. */
export function upgradeRequest(headerLines: string[], path = "/"): string {
  return [`GET ${path} HTTP/1.1`, ...headerLines, "Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="].join("\r\n") + "\r\n\r\n";
}

/**
 * The fixture of the router/API battery and its fuzz: a server and one sandbox running the
 * misbehaving server, made before the file's tests (handed to `ready`) and removed after them.
 */
export function useWeirdSandbox(ready: (server: TestServer, sandbox: Sandbox) => void): void {
  let server: TestServer | undefined;
  let sandbox: Sandbox | undefined;
  before(async () => {
    server = await startTestServer();
    useServerForSdk(server);
    sandbox = await Sandbox.create({ timeoutMs: 600_000 });
    await startWeirdServer(server, sandbox);
    ready(server, sandbox);
  });
  after(async () => {
    await sandbox?.kill().catch(() => undefined);
    await server?.stop();
  });
}

/** The contained outcome's other half: the server process runs and answers its health check. */
export async function assertServerSurvived(server: TestServer): Promise<void> {
  assert.doesNotThrow(() => process.kill(server.pid(), 0), `the server process is gone:\n${server.log().slice(-3000)}`);
  const res = await fetch(server.url + "/health", { signal: AbortSignal.timeout(10_000) });
  assert.equal(res.status, 200);
}
