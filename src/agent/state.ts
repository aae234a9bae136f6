/**
 * What the Cubicle server tells the agent through `POST /init` (src/protocol/init-body.ts):
 * the access token, sandbox-wide env vars, the default user and working directory.
 * Calling /init again replaces all of it: a warm pool re-inits a sandbox when it is claimed.
 */
import fs from "node:fs";
import type { InitBody } from "../protocol/index.js";
import { createLogger } from "../shared/log.js";
import { installCaCertificates } from "./ca-trust.js";

const log = createLogger("agent");

export interface AgentState {
  /** When set, requests need `X-Access-Token` (or a file signature) to match it. */
  accessToken: string | undefined;
  /** Sandbox-wide env vars: every process gets them, under its own per-call envs. */
  envVars: Record<string, string>;
  /** The user of requests without a Basic auth header. */
  defaultUser: string;
  /** Working directory of processes started without a cwd; undefined = the user's home. */
  defaultWorkdir: string | undefined;
  /**
   * Variables pointing TLS clients at the CA bundle once `/init` installed Cubicle's CA
   * (SSL_CERT_FILE, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, NODE_EXTRA_CA_CERTS); under envVars.
   * Kept across re-inits: the certificate stays in the bundle.
   */
  trustEnv: Record<string, string>;
}

/** upstream envd falls back to root when no default user was given. */
const fallbackUser = "root";

export function createAgentState(env: NodeJS.ProcessEnv = process.env): AgentState {
  return {
    accessToken: undefined,
    envVars: {},
    defaultUser: env.CUBICLE_AGENT_DEFAULT_USER || fallbackUser,
    defaultWorkdir: undefined,
    trustEnv: {},
  };
}

/** The sandbox-wide environment of the processes the agent starts: the CA variables, then /init's env vars. */
export function sandboxEnvironment(state: AgentState): Record<string, string> {
  return { ...state.trustEnv, ...state.envVars };
}

/**
 * Replaces the state with an init request. Fields left out fall back to their defaults
 * (a re-init is a fresh start, not a merge). The hostname is set best-effort.
 */
export function applyInit(state: AgentState, request: InitBody, env: NodeJS.ProcessEnv = process.env, root = "/"): void {
  const fresh = createAgentState(env);
  if (request.caCertificates) {
    // A failure leaves the sandbox usable (only intercepted TLS fails): logged, not refused.
    try {
      state.trustEnv = installCaCertificates(request.caCertificates, root).env;
    } catch (error) {
      log.warn("could not install the CA certificates", { error: (error as Error).message });
    }
  }
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
