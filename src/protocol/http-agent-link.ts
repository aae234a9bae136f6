/** The AgentLink to real agents: plain HTTP/1.1 to envd and the interpreter on the sandbox's address. */
import http from "node:http";
import { CubicleError } from "../shared/cubicle-error.js";
import type { AgentInitOptions, AgentLink } from "./agent-link.js";
import { encodeEnvelope, EnvelopeParser, envelopeFlags, knownEnvelopeFlags } from "./envelope.js";
import type { StartRequest, StartResponse } from "./generated/process.js";
import type { InitBody } from "./init-body.js";
import { ENVD_PORT, INTERPRETER_PORT } from "./ports.js";

export interface HttpAgentLinkOptions {
  /** Default ENVD_PORT; tests point it at a stand-in. */
  envdPort?: number;
  /** Default INTERPRETER_PORT. */
  interpreterPort?: number;
  /** Default a keep-alive agent of up to 256 sockets. */
  httpAgent?: http.Agent;
}

interface AgentResponse {
  status: number;
  body: Buffer;
}

/** The most of a process list read (a few thousand processes; the pids limit is 4096 by default). */
const maxListBytes = 4 * 1024 * 1024;
/** An agent's JSON answer as an object; a failed status or a body that is not a JSON object is `unavailable`. */
function agentJson(res: AgentResponse, doing: string, what: string): Record<string, unknown> {
  if (res.status !== 200) throw new CubicleError("unavailable", `the sandbox agent did not ${doing} (${res.status}): ${snippet(res.body, 200)}`);
  let parsed: unknown;
  try {
    parsed = JSON.parse(res.body.toString("utf8"));
  } catch {
    throw new CubicleError("unavailable", `the sandbox agent's ${what} is not JSON`);
  }
  if (typeof parsed !== "object" || parsed === null) throw new CubicleError("unavailable", `the sandbox agent's ${what} is not a JSON object`);
  return parsed as Record<string, unknown>;
}

/** A `/metrics` answer is a few hundred bytes; an agent that sends more is cut off. */
const maxMetricsBytes = 64 * 1024;

/** The command an SDK's first `commands.run` sends (`/bin/bash -l -c true`). */
const warmUpRequest: StartRequest = { process: { cmd: "/bin/bash", args: ["-l", "-c", "true"], envs: {} } };

export class HttpAgentLink implements AgentLink {
  readonly httpAgent: http.Agent;
  private readonly envdPort: number;
  private readonly interpreterPort: number;

  constructor(options: HttpAgentLinkOptions = {}) {
    this.httpAgent = options.httpAgent ?? new http.Agent({ keepAlive: true, maxSockets: 256, maxFreeSockets: 64, keepAliveMsecs: 10_000 });
    this.envdPort = options.envdPort ?? ENVD_PORT;
    this.interpreterPort = options.interpreterPort ?? INTERPRETER_PORT;
  }

  async init(address: string, body: InitBody, options: AgentInitOptions = {}): Promise<void> {
    let sent = false;
    const once = async () => {
      const headers: Record<string, string> = options.currentToken ? { "x-access-token": options.currentToken } : {};
      const mayHaveApplied = sent;
      sent = true;
      let res = await this.request(address, this.envdPort, "POST", "/init", json(body), 5000, headers);
      // An earlier attempt that timed out may have reached a slow agent (a guest under load) and
      // given it the new token: the same body again, under that token, is the same init.
      if (res.status === 401 && mayHaveApplied && body.accessToken && body.accessToken !== options.currentToken) {
        res = await this.request(address, this.envdPort, "POST", "/init", json(body), 5000, { "x-access-token": body.accessToken });
      }
      if (res.status < 200 || res.status >= 300) {
        throw new CubicleError("internal", `the sandbox agent refused its init (${res.status}): ${snippet(res.body, 500)}`);
      }
    };
    await (options.whenUpMs === undefined ? once() : whileUnreachable(options.whenUpMs, once));
  }

  /** Polls with a short interval: a refused connection inside a fresh namespace costs microseconds. */
  async waitUntilUp(address: string, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    await whileUnreachable(timeoutMs, async () => {
      const res = await this.request(address, this.envdPort, "GET", "/health", undefined, Math.max(100, deadline - Date.now()));
      if (res.status !== 204 && res.status !== 200) throw new Error(`health answered ${res.status}`);
    });
  }

  async isHealthy(address: string, timeoutMs = 2000): Promise<boolean> {
    try {
      const res = await this.request(address, this.envdPort, "GET", "/health", undefined, timeoutMs);
      return res.status === 204 || res.status === 200;
    } catch {
      return false;
    }
  }

  /**
   * The command goes through the agent's process service (a Connect server stream), as `user`
   * (the template's default user), so the same path is warm: switching credentials, that user's
   * profile files. Nothing is left behind: the process exits.
   */
  async warmUp(address: string, user: string, timeoutMs = 5000): Promise<void> {
    const res = await this.request(address, this.envdPort, "POST", "/process.Process/Start", encodeEnvelope(0, JSON.stringify(warmUpRequest)), timeoutMs, {
      "content-type": "application/connect+json",
      "connect-protocol-version": "1",
      authorization: `Basic ${Buffer.from(`${user}:`).toString("base64")}`,
    });
    if (res.status !== 200 || !streamEnded(res.body)) throw new CubicleError("internal", `agent warm-up failed (${res.status}): ${snippet(res.body, 300)}`);
  }

  async sync(address: string, accessToken: string | undefined, timeoutMs: number): Promise<void> {
    const request: StartRequest = { process: { cmd: "/bin/sync", args: [], envs: {} } };
    const res = await this.request(address, this.envdPort, "POST", "/process.Process/Start", encodeEnvelope(0, JSON.stringify(request)), timeoutMs, {
      "content-type": "application/connect+json",
      "connect-protocol-version": "1",
      authorization: `Basic ${Buffer.from("root:").toString("base64")}`,
      ...(accessToken ? { "x-access-token": accessToken } : {}),
    });
    if (res.status !== 200 || !streamEnded(res.body)) throw new CubicleError("unavailable", `sync in the sandbox failed (${res.status}): ${snippet(res.body, 300)}`);
  }

  /**
   * An `/execute` of `pass` starts the kernel; a restart of its context replaces it with a fresh
   * one (no history, execution count 0) that starts at once. Throws when the sandbox has no
   * working interpreter (an error line, or no end of the execution).
   */
  async startKernel(address: string, timeoutMs: number): Promise<void> {
    const call = (method: string, path: string, body?: unknown) => this.request(address, this.interpreterPort, method, path, body === undefined ? undefined : json(body), timeoutMs);
    const res = await call("POST", "/execute", { code: "pass" });
    const text = res.body.toString("utf8");
    const lines = text.split("\n").filter(Boolean).map((line) => JSON.parse(line) as { type?: string; value?: string });
    const error = lines.find((line) => line.type === "error");
    if (res.status !== 200 || error || !lines.some((line) => line.type === "end_of_execution")) {
      throw new CubicleError("unavailable", `the interpreter did not run code (${res.status}): ${error?.value ?? text.slice(0, 300)}`);
    }
    const contexts = JSON.parse((await call("GET", "/contexts")).body.toString("utf8")) as { id: string; language: string }[];
    const python = contexts.find((context) => context.language === "python");
    if (!python) throw new CubicleError("internal", "the interpreter lists no python context");
    const restarted = await call("POST", `/contexts/${encodeURIComponent(python.id)}/restart`);
    if (restarted.status >= 300) throw new CubicleError("internal", `restarting the python context failed (${restarted.status}): ${snippet(restarted.body, 300)}`);
  }

  async runningProcessCount(address: string, accessToken: string | undefined, timeoutMs = 2000): Promise<number> {
    const headers: Record<string, string> = { "connect-protocol-version": "1", ...(accessToken ? { "x-access-token": accessToken } : {}) };
    const res = await this.request(address, this.envdPort, "POST", "/process.Process/List", json({}), timeoutMs, headers, maxListBytes);
    const { processes } = agentJson(res, "list its processes", "process list");
    // proto3 JSON leaves out an empty repeated field.
    if (processes === undefined) return 0;
    if (!Array.isArray(processes)) throw new CubicleError("unavailable", "the sandbox agent's process list has no processes array");
    return processes.length;
  }

  async guestCpuTimeUsec(address: string, accessToken: string | undefined, timeoutMs = 2000): Promise<number> {
    const headers: Record<string, string> = accessToken ? { "x-access-token": accessToken } : {};
    const res = await this.request(address, this.envdPort, "GET", "/metrics", undefined, timeoutMs, headers, maxMetricsBytes);
    const usec = agentJson(res, "give its metrics", "metrics").cubicle_cpu_busy_usec;
    if (typeof usec !== "number" || !Number.isFinite(usec) || usec < 0) throw new CubicleError("unavailable", "the sandbox agent's metrics have no CPU time");
    return usec;
  }

  dropIdleSockets(address: string): number {
    let dropped = 0;
    for (const [name, sockets] of Object.entries(this.httpAgent.freeSockets)) {
      // http.Agent names connections "<host>:<port>:<localAddress>…".
      if (!name.startsWith(`${address}:`)) continue;
      for (const socket of sockets ?? []) {
        socket.destroy();
        dropped++;
      }
    }
    return dropped;
  }

  /** One request; an answer longer than `maxBodyBytes` fails it (the agent is untrusted). */
  private request(
    address: string,
    port: number,
    method: string,
    path: string,
    payload: Buffer | undefined,
    timeoutMs: number,
    extraHeaders: Record<string, string> = {},
    maxBodyBytes = Infinity,
  ): Promise<AgentResponse> {
    return new Promise((resolve, reject) => {
      const req = http.request(
        {
          host: address,
          port,
          method,
          path,
          agent: this.httpAgent,
          timeout: timeoutMs,
          headers: { ...(payload ? { "content-type": "application/json", "content-length": payload.length } : {}), ...extraHeaders },
        },
        (res) => {
          const chunks: Buffer[] = [];
          let bytes = 0;
          res.on("data", (chunk: Buffer) => {
            bytes += chunk.length;
            if (bytes > maxBodyBytes) return req.destroy(new Error(`agent at ${address} answered more than ${maxBodyBytes} bytes`));
            chunks.push(chunk);
          });
          res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
          res.on("error", reject);
        },
      );
      req.on("timeout", () => req.destroy(new Error(`agent at ${address} did not answer within ${timeoutMs} ms`)));
      req.on("error", reject);
      req.end(payload);
    });
  }
}

function json(body: unknown): Buffer {
  return Buffer.from(JSON.stringify(body));
}

function snippet(body: Buffer, chars: number): string {
  return body.toString("utf8").slice(0, chars);
}

/** True when a process stream's messages include the process's end event. */
function streamEnded(body: Buffer): boolean {
  try {
    return new EnvelopeParser(undefined, { knownFlags: knownEnvelopeFlags })
      .push(body)
      .some((envelope) => !(envelope.flags & envelopeFlags.endStream) && (JSON.parse(envelope.data.toString("utf8")) as StartResponse).event?.end !== undefined);
  } catch {
    return false;
  }
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
