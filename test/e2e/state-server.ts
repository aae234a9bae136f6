/**
 * A sandbox workload whose state lives in process memory: a Python HTTP server on port 8000
 * answering `<secret>:<hits>`. Snapshot, pause and rollback tests check that it survives.
 */
import type { Sandbox } from "e2b";

export const STATE_SERVER_SCRIPT = `
import http.server
state = {"secret": "s3cret", "hits": 0}
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        state["hits"] += 1
        body = f"{state['secret']}:{state['hits']}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
`;

/** GET / on port 8000 of a sandbox, through the server's router. */
export async function hitStateServer(serverUrl: string, sandboxId: string): Promise<{ status: number; body: string }> {
  const res = await fetch(serverUrl + "/", { headers: { "e2b-sandbox-id": sandboxId, "e2b-sandbox-port": "8000" } });
  return { status: res.status, body: await res.text() };
}

/** The first answer of the state server, retrying while it starts. */
export async function hitWhenUp(serverUrl: string, sandboxId: string): Promise<string> {
  for (let i = 0; i < 100; i++) {
    const res = await hitStateServer(serverUrl, sandboxId).catch(() => undefined);
    if (res?.status === 200) return res.body;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`port 8000 of ${sandboxId} never answered`);
}

/** Starts the state server in a sandbox and waits for its first answer (`s3cret:1`). */
export async function startStateServer(serverUrl: string, sandbox: Sandbox): Promise<string> {
  await sandbox.files.write("/home/user/state_server.py", STATE_SERVER_SCRIPT);
  await sandbox.commands.run("python3 /home/user/state_server.py", { background: true });
  return hitWhenUp(serverUrl, sandbox.sandboxId);
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}
