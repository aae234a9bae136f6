/**
 * What the Cubicle server tells the agent through `POST /init` (upstream envd's init body):
 * the access token, sandbox-wide env vars, the default user and working directory.
 * Calling /init again replaces all of it: a warm pool re-inits a sandbox when it is claimed.
 */
import fs from "node:fs";
import { CubicleError } from "../shared/cubicle-error.js";

export interface AgentState {
  /** When set, requests need `X-Access-Token` (or a file signature) to match it. */
  accessToken: string | undefined;
  /** Sandbox-wide env vars: every process gets them, under its own per-call envs. */
  envVars: Record<string, string>;
  /** The user of requests without a Basic auth header. */
  defaultUser: string;
  /** Working directory of processes started without a cwd; undefined = the user's home. */
  defaultWorkdir: string | undefined;
}

/** The body of `POST /init`; every field optional, unknown fields ignored. */
export interface InitRequest {
  accessToken?: string;
  envVars?: Record<string, string>;
  defaultUser?: string;
  defaultWorkdir?: string;
  hostname?: string;
  timestamp?: string;
}

/** upstream envd falls back to root when no default user was given. */
const fallbackUser = "root";

export function createAgentState(env: NodeJS.ProcessEnv = process.env): AgentState {
  return {
    accessToken: undefined,
    envVars: {},
    defaultUser: env.CUBICLE_AGENT_DEFAULT_USER || fallbackUser,
    defaultWorkdir: undefined,
  };
}

function optionalString(body: Record<string, unknown>, key: string): string | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "string") throw new CubicleError("invalid_argument", `"${key}" must be a string`);
  return v;
}

/** Validates an /init body (already JSON-decoded) into an InitRequest. */
export function parseInitRequest(body: unknown): InitRequest {
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    throw new CubicleError("invalid_argument", "the init body must be a JSON object");
  }
  const b = body as Record<string, unknown>;
  const request: InitRequest = {
    accessToken: optionalString(b, "accessToken"),
    defaultUser: optionalString(b, "defaultUser"),
    defaultWorkdir: optionalString(b, "defaultWorkdir"),
    hostname: optionalString(b, "hostname"),
    timestamp: optionalString(b, "timestamp"),
  };
  if (b.envVars !== undefined && b.envVars !== null) {
    if (typeof b.envVars !== "object" || Array.isArray(b.envVars)) throw new CubicleError("invalid_argument", `"envVars" must be an object`);
    const envVars: Record<string, string> = {};
    for (const [key, value] of Object.entries(b.envVars as Record<string, unknown>)) {
      if (typeof value !== "string") throw new CubicleError("invalid_argument", `env var "${key}" must be a string`);
      if (key === "" || key.includes("=") || key.includes("\0") || value.includes("\0")) {
        throw new CubicleError("invalid_argument", `env var "${key}" is not a valid name/value`);
      }
      envVars[key] = value;
    }
    request.envVars = envVars;
  }
  return request;
}

/**
 * Replaces the state with an init request. Fields left out fall back to their defaults
 * (a re-init is a fresh start, not a merge). The hostname is set best-effort.
 */
export function applyInit(state: AgentState, request: InitRequest, env: NodeJS.ProcessEnv = process.env): void {
  const fresh = createAgentState(env);
  state.accessToken = request.accessToken || undefined;
  state.envVars = { ...(request.envVars ?? {}) };
  state.defaultUser = request.defaultUser || fresh.defaultUser;
  state.defaultWorkdir = request.defaultWorkdir || undefined;
  if (request.hostname) setHostname(request.hostname, env);
}

/**
 * Only inside a sandbox: as the container's first process (pid 1) or when told so. A dev agent
 * run on a host (even in a netns) shares the host's UTS namespace and must not rename it.
 */
function setHostname(hostname: string, env: NodeJS.ProcessEnv): void {
  if (process.pid !== 1 && env.CUBICLE_AGENT_SET_HOSTNAME !== "1") return;
  if (!/^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$/.test(hostname)) return;
  try {
    // Works as root in the sandbox's own UTS namespace; elsewhere it fails harmlessly.
    fs.writeFileSync("/proc/sys/kernel/hostname", hostname);
  } catch {
    // not permitted here (e.g. a dev host): keep the current name
  }
}
