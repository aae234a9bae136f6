/**
 * The agent's envd server on port 49983 (plain HTTP/1.1): Connect RPCs for the process and
 * filesystem services, `/files`, `/health`, `/envs`, `/metrics` and `/init`.
 * Subsystems load on first use, and nothing runs while the sandbox is idle.
 */
import fs from "node:fs";
import http, { type IncomingMessage, type ServerResponse } from "node:http";
import os from "node:os";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import { toCubicleError } from "./errors.js";
import { parseInitBody } from "../protocol/index.js";
import { checkAccessToken, checkFilesAuth, checkInitAuth, usernameFromAuthorization } from "./auth.js";
import { createProcessService } from "./process/index.js";
import { findProcedure, parseProcedurePath, serveProcedure, writeConnectError } from "./rpc/connect.js";
import type { ServiceDefinition } from "./rpc/types.js";
import { applyGuestInit, checkGuestClock } from "./guest-machine.js";
import { applyInit, createAgentState, type AgentState } from "./state.js";
import { KEEP_IDLE_CONNECTIONS } from "./http/keep-alive.js";
import { abandonBody, readRequestBody } from "./http/request-body.js";
import { lookupUser, type AgentUser } from "./users.js";

const log = createLogger("agent");

/** A service, or a loader that imports it on first use. */
export type ServiceSource = ServiceDefinition | (() => Promise<ServiceDefinition>);

export type FilesHandler = (
  req: IncomingMessage,
  res: ServerResponse,
  opts: { username: string | undefined; defaultUser: string },
) => Promise<void>;

export interface AgentServerOptions {
  /** Shared agent state; a fresh one by default. */
  state?: AgentState;
  /** Services by full name; defaults to process.Process and filesystem.Filesystem. */
  services?: Record<string, ServiceSource>;
  /** The `/files` endpoint; defaults to src/agent/http/files.ts, loaded on first use. */
  filesHandler?: FilesHandler;
}

export interface AgentServer {
  server: http.Server;
  state: AgentState;
}

const initBodyLimit = 1024 * 1024;

/** Creates (does not start) the envd HTTP server of the agent. */
export function createAgentServer(options: AgentServerOptions = {}): AgentServer {
  const state = options.state ?? createAgentState();
  const services = new Map<string, Promise<ServiceDefinition> | ServiceDefinition | (() => Promise<ServiceDefinition>)>(
    Object.entries(options.services ?? defaultServices(state)),
  );
  const loadService = async (name: string): Promise<ServiceDefinition | undefined> => {
    const source = services.get(name);
    if (source === undefined) return undefined;
    if (typeof source === "function") {
      const loading = source();
      services.set(name, loading);
      loading.catch(() => services.set(name, source));
      return loading;
    }
    return source;
  };
  let filesHandler: FilesHandler | undefined = options.filesHandler;
  const loadFilesHandler = async (): Promise<FilesHandler> => (filesHandler ??= (await import("./http/files.js")).handleFilesRequest);

  const resolveUserFor = (req: IncomingMessage): (() => AgentUser) => {
    const requested = usernameFromAuthorization(req.headers);
    if (requested !== undefined) {
      // A named user is checked up front, like envd's authn middleware.
      const user = userOrUnauthenticated(requested, `invalid username: '${requested}'`);
      return () => user;
    }
    return () => userOrUnauthenticated(state.defaultUser, `invalid default user: '${state.defaultUser}'`);
  };

  async function route(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const method = req.method ?? "GET";
    let url: URL;
    try {
      url = new URL(req.url ?? "/", "http://agent.invalid");
    } catch {
      return sendJson(res, 400, { code: 400, message: "invalid request URL" });
    }
    const pathname = url.pathname;

    if (pathname === "/health" && (method === "GET" || method === "HEAD")) {
      res.writeHead(204, { "cache-control": "no-store" });
      return void res.end();
    }

    const procedurePath = method === "POST" ? parseProcedurePath(pathname) : undefined;
    const denied = checkAccessToken(state, method, pathname, req.headers);
    if (denied) {
      abandonBody(req);
      if (procedurePath) return writeConnectError(req, res, denied);
      return sendError(res, denied);
    }

    if (procedurePath) {
      const service = await loadService(procedurePath.service);
      const procedure = service && findProcedure(service, procedurePath.method);
      if (!procedure) {
        abandonBody(req);
        return sendJson(res, 404, { code: "unimplemented", message: `${pathname} is not implemented` });
      }
      let resolveUser: () => AgentUser;
      try {
        resolveUser = resolveUserFor(req);
      } catch (error) {
        abandonBody(req);
        return writeConnectError(req, res, toCubicleError(error));
      }
      return serveProcedure(req, res, procedure, { resolveUser });
    }

    switch (`${method} ${pathname}`) {
      case "GET /files":
      case "POST /files": {
        const denied = checkFilesAuth(state, method, url.searchParams, req.headers);
        if (denied) {
          abandonBody(req);
          return sendError(res, denied);
        }
        const handler = await loadFilesHandler();
        return handler(req, res, { username: url.searchParams.get("username") ?? undefined, defaultUser: state.defaultUser });
      }
      case "POST /init":
        return handleInit(req, res, state);
      case "GET /envs":
        return sendJson(res, 200, state.envVars);
      case "GET /metrics":
        return sendJson(res, 200, collectMetrics());
      default:
        abandonBody(req);
        return sendJson(res, 404, { code: 404, message: `${method} ${pathname} not found` });
    }
  }

  const server = http.createServer(
    {
      // No per-request timers: the agent sits behind the Cubicle router, and long uploads and
      // streams are normal. Node still runs a checker interval, pushed out as far as it goes.
      requestTimeout: 0,
      headersTimeout: 0,
      connectionsCheckingInterval: 2 ** 31 - 1,
      keepAliveTimeout: KEEP_IDLE_CONNECTIONS,
    },
    (req, res) => {
      // A guest resumed from a pause has a stale clock until it is set: before anything runs.
      checkGuestClock();
      route(req, res).catch((error) => {
        const e = toCubicleError(error);
        const fields = { method: req.method, url: req.url, error: e.message };
        if (e.httpStatus >= 500) log.error("request failed", fields);
        else log.debug("request refused", fields);
        if (res.headersSent) res.destroy();
        else sendError(res, e);
      });
    },
  );
  server.on("clientError", (error, socket) => {
    if (socket.writable && !(error as NodeJS.ErrnoException).code?.startsWith("ECONNRESET")) {
      socket.end("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
    } else socket.destroy();
  });
  return { server, state };
}

function defaultServices(state: AgentState): Record<string, ServiceSource> {
  let processService: ServiceDefinition | undefined;
  return {
    "process.Process": async () => (processService ??= createProcessService({ state })),
    "filesystem.Filesystem": async () => (await import("./filesystem/index.js")).filesystemService,
  };
}

function userOrUnauthenticated(name: string, message: string): AgentUser {
  try {
    return lookupUser(name);
  } catch (error) {
    throw new CubicleError("unauthenticated", message, { cause: error });
  }
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
  res.end(text);
}

/** Plain-HTTP error body as envd writes it: `{code, message}` with the HTTP status as code. */
function sendError(res: ServerResponse, error: CubicleError): void {
  sendJson(res, error.httpStatus, error.toE2bBody());
}

async function readJsonBody(req: IncomingMessage, res: ServerResponse, limit: number): Promise<unknown> {
  const text = (await readRequestBody(req, res, limit)).toString("utf8").trim();
  if (text === "") return {};
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new CubicleError("invalid_argument", `cannot decode the body as JSON: ${(error as Error).message}`);
  }
}

async function handleInit(req: IncomingMessage, res: ServerResponse, state: AgentState): Promise<void> {
  const denied = checkInitAuth(state, req.headers);
  if (denied) {
    abandonBody(req);
    return sendError(res, denied);
  }
  const request = parseInitBody(await readJsonBody(req, res, initBodyLimit));
  applyInit(state, request);
  await applyGuestInit(request);
  log.info("initialized", {
    defaultUser: state.defaultUser,
    defaultWorkdir: state.defaultWorkdir,
    envVars: Object.keys(state.envVars).length,
    secured: state.accessToken !== undefined,
    trustsCubicleCa: state.trustEnv.NODE_EXTRA_CA_CERTS !== undefined,
  });
  res.writeHead(204, { "cache-control": "no-store" });
  res.end();
}

// ---- /metrics ---------------------------------------------------------------------------

/** The body of `GET /metrics`, upstream envd's field names. */
export interface AgentMetrics {
  ts: number;
  cpu_count: number;
  cpu_used_pct: number;
  mem_total: number;
  mem_used: number;
  mem_cache: number;
  mem_total_mib: number;
  mem_used_mib: number;
  disk_used: number;
  disk_total: number;
  /**
   * Cubicle's: the busy CPU time (user, nice, system, irq, softirq) of the machine this agent
   * sees, since its boot, in µs. In a microVM that machine is the sandbox, and the idle tiers
   * read it (GUEST_CPU_NOTE); in a container it is the host's, and nothing reads it.
   */
  cubicle_cpu_busy_usec: number;
}

let lastCpuSample: { busy: number; total: number } | undefined;

function readText(file: string): string | undefined {
  try {
    return fs.readFileSync(file, "utf8");
  } catch {
    return undefined;
  }
}

function readNumber(file: string): number | undefined {
  const text = readText(file)?.trim();
  if (text === undefined || !/^\d+$/.test(text)) return undefined;
  return Number(text);
}

/** CPU use since the previous call (since boot on the first), from /proc/stat. */
function cpuUsedPct(): number {
  const line = readText("/proc/stat")?.split("\n", 1)[0];
  if (!line?.startsWith("cpu ")) return 0;
  const fields = line.trim().split(/\s+/).slice(1).map(Number);
  const idle = (fields[3] ?? 0) + (fields[4] ?? 0);
  const total = fields.slice(0, 8).reduce((a, b) => a + (Number.isFinite(b) ? b : 0), 0);
  const sample = { busy: total - idle, total };
  const previous = lastCpuSample ?? { busy: 0, total: 0 };
  lastCpuSample = sample;
  const dTotal = sample.total - previous.total;
  if (dTotal <= 0) return 0;
  return Math.round(((sample.busy - previous.busy) / dTotal) * 10000) / 100;
}

/** USER_HZ, the unit of /proc/stat: 100 on every Linux architecture Cubicle runs on. */
const CLOCK_TICKS_PER_SECOND = 100;

/** The busy time of /proc/stat's first line since boot, in µs (no state: any caller may ask). */
function cpuBusyUsec(): number {
  const line = readText("/proc/stat")?.split("\n", 1)[0];
  if (!line?.startsWith("cpu ")) return 0;
  const [user = 0, nice = 0, system = 0, , , irq = 0, softirq = 0] = line.trim().split(/\s+/).slice(1).map(Number);
  const ticks = [user, nice, system, irq, softirq].reduce((a, b) => a + (Number.isFinite(b) ? b : 0), 0);
  return ticks * (1_000_000 / CLOCK_TICKS_PER_SECOND);
}

/** Memory from the sandbox's cgroup when it has a limit (v2, then v1), else /proc/meminfo. */
function memory(): { total: number; used: number; cache: number } {
  const meminfo = new Map<string, number>();
  for (const line of (readText("/proc/meminfo") ?? "").split("\n")) {
    const m = /^(\w+):\s+(\d+)/.exec(line);
    if (m) meminfo.set(m[1]!, Number(m[2]) * 1024);
  }
  const hostTotal = meminfo.get("MemTotal") ?? os.totalmem();
  const v2Max = readText("/sys/fs/cgroup/memory.max")?.trim();
  if (v2Max && /^\d+$/.test(v2Max)) {
    const current = readNumber("/sys/fs/cgroup/memory.current") ?? 0;
    const file = /^file (\d+)$/m.exec(readText("/sys/fs/cgroup/memory.stat") ?? "");
    const cache = file ? Number(file[1]) : 0;
    return { total: Math.min(Number(v2Max), hostTotal), used: Math.max(0, current - cache), cache };
  }
  const v1Limit = readNumber("/sys/fs/cgroup/memory/memory.limit_in_bytes");
  if (v1Limit !== undefined && v1Limit < hostTotal) {
    const usage = readNumber("/sys/fs/cgroup/memory/memory.usage_in_bytes") ?? 0;
    const cacheMatch = /^(?:total_)?cache (\d+)$/m.exec(readText("/sys/fs/cgroup/memory/memory.stat") ?? "");
    const cache = cacheMatch ? Number(cacheMatch[1]) : 0;
    return { total: v1Limit, used: Math.max(0, usage - cache), cache };
  }
  const available = meminfo.get("MemAvailable") ?? os.freemem();
  const cache = (meminfo.get("Cached") ?? 0) + (meminfo.get("Buffers") ?? 0);
  return { total: hostTotal, used: Math.max(0, hostTotal - available), cache };
}

function disk(): { used: number; total: number } {
  try {
    const s = fs.statfsSync("/");
    return { total: s.blocks * s.bsize, used: (s.blocks - s.bfree) * s.bsize };
  } catch {
    return { total: 0, used: 0 };
  }
}

export function collectMetrics(): AgentMetrics {
  const mem = memory();
  const d = disk();
  const mib = 1024 * 1024;
  return {
    ts: Math.floor(Date.now() / 1000),
    cpu_count: os.availableParallelism?.() ?? os.cpus().length,
    cpu_used_pct: cpuUsedPct(),
    mem_total: mem.total,
    mem_used: mem.used,
    mem_cache: mem.cache,
    mem_total_mib: Math.floor(mem.total / mib),
    mem_used_mib: Math.floor(mem.used / mib),
    disk_used: d.used,
    disk_total: d.total,
    cubicle_cpu_busy_usec: cpuBusyUsec(),
  };
}
