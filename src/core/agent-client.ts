import http from "node:http";
import { CubicleError } from "../shared/cubicle-error.js";

/** Port of envd inside every sandbox. */
export const ENVD_PORT = 49983;
/** Port of the code interpreter inside every sandbox. */
export const INTERPRETER_PORT = 49999;

/** How long a new or restored sandbox's agent may take to answer (a loaded host boots slowly). */
export const AGENT_READY_TIMEOUT_MS = 15_000;

/** Keep-alive sockets to the agents: the server talks to them on every create and proxied call. */
export const agentHttpAgent = new http.Agent({ keepAlive: true, maxSockets: 256, maxFreeSockets: 64, keepAliveMsecs: 10_000 });

interface AgentResponse {
  status: number;
  body: string;
}

function requestAgent(
  address: string,
  method: string,
  path: string,
  body: unknown,
  timeoutMs: number,
  extraHeaders: Record<string, string> = {},
  port = ENVD_PORT,
): Promise<AgentResponse> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : Buffer.isBuffer(body) ? body : Buffer.from(JSON.stringify(body));
    const req = http.request(
      {
        host: address,
        port,
        method,
        path,
        agent: agentHttpAgent,
        timeout: timeoutMs,
        headers: { ...(payload ? { "content-type": "application/json", "content-length": payload.length } : {}), ...extraHeaders },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (chunk: Buffer) => chunks.push(chunk));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString("utf8") }));
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(new Error(`agent at ${address} did not answer within ${timeoutMs} ms`)));
    req.on("error", reject);
    req.end(payload);
  });
}

/**
 * Waits until the agent in a new sandbox answers `GET /health`. Polls with a short interval:
 * a refused connection inside a fresh namespace costs microseconds.
 */
export async function waitForAgent(address: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  await whileUnreachable(timeoutMs, async () => {
    const res = await requestAgent(address, "GET", "/health", undefined, Math.max(100, deadline - Date.now()));
    if (res.status !== 204 && res.status !== 200) throw new Error(`health answered ${res.status}`);
  });
}

/**
 * Runs `attempt` again, 1 ms then doubling to 20 ms apart, while it fails with anything but a
 * CubicleError (the agent is not listening yet, or not well); a CubicleError is its answer and
 * is thrown at once. After `timeoutMs` the last failure becomes "unavailable".
 */
async function whileUnreachable<T>(timeoutMs: number, attempt: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (let delayMs = 1; ; delayMs = Math.min(delayMs * 2, 20)) {
    try {
      return await attempt();
    } catch (err) {
      if (err instanceof CubicleError) throw err;
      if (Date.now() > deadline) throw new CubicleError("unavailable", `the sandbox agent did not become ready within ${timeoutMs} ms: ${(err as Error).message ?? String(err)}`);
    }
    await new Promise((r) => setTimeout(r, delayMs));
  }
}

/** Quick liveness probe used by recovery; false instead of throwing. */
export async function agentIsHealthy(address: string, timeoutMs = 2000): Promise<boolean> {
  try {
    const res = await requestAgent(address, "GET", "/health", undefined, timeoutMs);
    return res.status === 204 || res.status === 200;
  } catch {
    return false;
  }
}

/**
 * Runs the command an SDK's first `commands.run` runs (`/bin/bash -l -c true`, as upstream's
 * SDK sends it) once through the agent's process service, so its first-call costs (JIT, the
 * first spawn, reading passwd and the profile files) are paid before a warm-pool entry is
 * frozen, not by the user's first command. It runs as `user`, the template's default user, so
 * the same path is warm (switching credentials through setpriv, that user's profile files).
 * Nothing is left behind: the process exits.
 */
export async function warmUpAgent(address: string, user: string, timeoutMs = 5000): Promise<void> {
  const message = Buffer.from(JSON.stringify({ process: { cmd: "/bin/bash", args: ["-l", "-c", "true"], envs: {} } }));
  // A Connect server-stream request: one envelope (flags 0, big-endian length, JSON message).
  const envelope = Buffer.alloc(5 + message.length);
  envelope.writeUInt32BE(message.length, 1);
  message.copy(envelope, 5);
  const res = await requestAgent(address, "POST", "/process.Process/Start", envelope, timeoutMs, {
    "content-type": "application/connect+json",
    "connect-protocol-version": "1",
    authorization: `Basic ${Buffer.from(`${user}:`).toString("base64")}`,
  });
  if (res.status !== 200 || !res.body.includes('"end"')) throw new CubicleError("internal", `agent warm-up failed (${res.status}): ${res.body.slice(0, 300)}`);
}

/**
 * Starts the default (Python) kernel of the code interpreter so that it is running but blank:
 * an `/execute` of `pass` starts it, a restart of its context replaces it with a fresh one
 * (no history, execution count 0) that starts at once. Throws when the sandbox has no working
 * interpreter (an error line, or no end of the execution).
 */
export async function startInterpreterKernel(address: string, timeoutMs: number): Promise<void> {
  const call = (method: string, path: string, body?: unknown) => requestAgent(address, method, path, body, timeoutMs, {}, INTERPRETER_PORT);
  const res = await call("POST", "/execute", { code: "pass" });
  const lines = res.body.split("\n").filter(Boolean).map((line) => JSON.parse(line) as { type?: string; value?: string });
  const error = lines.find((line) => line.type === "error");
  if (res.status !== 200 || error || !lines.some((line) => line.type === "end_of_execution")) {
    throw new CubicleError("unavailable", `the interpreter did not run code (${res.status}): ${error?.value ?? res.body.slice(0, 300)}`);
  }
  const contexts = JSON.parse((await call("GET", "/contexts")).body) as { id: string; language: string }[];
  const python = contexts.find((context) => context.language === "python");
  if (!python) throw new CubicleError("internal", "the interpreter lists no python context");
  const restarted = await call("POST", `/contexts/${encodeURIComponent(python.id)}/restart`);
  if (restarted.status >= 300) throw new CubicleError("internal", `restarting the python context failed (${restarted.status}): ${restarted.body.slice(0, 300)}`);
}

export interface AgentInit {
  accessToken?: string;
  envVars: Record<string, string>;
  defaultUser: string;
  defaultWorkdir: string;
  hostname?: string;
  timestamp: string;
}

/**
 * Hands the sandbox its identity: env vars, access token and default user (envd's /init).
 * An agent that already holds a token (a restored image, a re-init) accepts a new init only
 * with that token: pass it as `currentToken`.
 */
export async function initAgent(address: string, init: AgentInit, currentToken?: string): Promise<void> {
  const res = await requestAgent(address, "POST", "/init", init, 5000, currentToken ? { "x-access-token": currentToken } : {});
  if (res.status < 200 || res.status >= 300) {
    throw new CubicleError("internal", `the sandbox agent refused its init (${res.status}): ${res.body.slice(0, 500)}`);
  }
}

/**
 * initAgent() for an agent that should be listening already (a restored one: its listening
 * socket comes back with it), without a health probe first: retried like waitForAgent while the
 * agent cannot be reached, never when it answers with an error.
 */
export async function initAgentWhenUp(address: string, init: AgentInit, currentToken: string | undefined, timeoutMs: number): Promise<void> {
  await whileUnreachable(timeoutMs, () => initAgent(address, init, currentToken));
}

/**
 * Destroys the idle keep-alive sockets the server holds to one sandbox address. Before a memory
 * dump (snapshot, fork, pause to disk) no idle TCP connection should be left for CRIU to carry
 * into an image that will be restored at another address.
 */
export function dropIdleAgentSockets(address: string): number {
  let dropped = 0;
  for (const [name, sockets] of Object.entries(agentHttpAgent.freeSockets)) {
    // http.Agent names connections "<host>:<port>:<localAddress>…".
    if (!name.startsWith(`${address}:`)) continue;
    for (const socket of sockets ?? []) {
      socket.destroy();
      dropped++;
    }
  }
  return dropped;
}
