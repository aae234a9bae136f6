/**
 * What the server needs of a sandbox's agent, by the sandbox's address. `HttpAgentLink` speaks to
 * real agents; `FakeAgentLink` stands in for them in unit tests.
 */
import type http from "node:http";
import type { InitBody } from "./init-body.js";

/** How long a new or restored sandbox's agent may take to answer (a loaded host boots slowly). */
export const AGENT_READY_TIMEOUT_MS = 15_000;
/** The same for a microVM: its kernel boots first (TCG on a loaded 2-core host: tens of seconds). */
const MICROVM_READY_TIMEOUT_MS = 120_000;

/** How long a freshly booted sandbox of `runtime` may take until its agent answers. */
export function agentReadyTimeoutMs(runtime: string | undefined): number {
  return runtime === "microvm" ? MICROVM_READY_TIMEOUT_MS : AGENT_READY_TIMEOUT_MS;
}

export interface AgentInitOptions {
  /**
   * An agent that already holds a token (a restored image, a re-init) accepts a new init only
   * with that token.
   */
  currentToken?: string;
  /**
   * For an agent that should be listening already (a restored one: its listening socket comes
   * back with it): retry for up to this long while it cannot be reached, never when it answers
   * with an error. Unset = one attempt.
   */
  whenUpMs?: number;
}

export interface AgentLink {
  /**
   * The keep-alive connections to the agents: the server talks to them on every create, and the
   * router proxies SDK traffic to them through it.
   */
  readonly httpAgent: http.Agent;
  /** Hands the sandbox its identity (envd's `/init`). Throws a CubicleError when refused. */
  init(address: string, body: InitBody, options?: AgentInitOptions): Promise<void>;
  /** Resolves once `GET /health` answers; a CubicleError "unavailable" after `timeoutMs`. */
  waitUntilUp(address: string, timeoutMs: number): Promise<void>;
  /** A quick liveness probe: false instead of throwing. */
  isHealthy(address: string, timeoutMs?: number): Promise<boolean>;
  /**
   * Runs what an SDK's first `commands.run` runs, once, as `user`, so its first-call costs are
   * paid before a warm sandbox is frozen.
   */
  warmUp(address: string, user: string, timeoutMs?: number): Promise<void>;
  /**
   * Runs `sync` in the sandbox as root and waits for it: a microVM's kernel then has its dirty
   * files on its disk (before a filesystem-only checkpoint). Throws when it did not run.
   */
  sync(address: string, accessToken: string | undefined, timeoutMs: number): Promise<void>;
  /** Starts the interpreter's default (Python) kernel and leaves it running but blank. */
  startKernel(address: string, timeoutMs: number): Promise<void>;
  /**
   * How many processes the agent's process service runs now (envd's `process.Process/List`:
   * commands started through it, PTYs included), so that a sandbox running a command is not
   * frozen for idleness. `accessToken` is the sandbox's envd token, if it has one. Throws when
   * the agent does not answer well: the caller cannot tell, and must take it as busy.
   */
  runningProcessCount(address: string, accessToken: string | undefined, timeoutMs?: number): Promise<number>;
  /**
   * The busy CPU time (µs since boot) of the machine the agent runs on, from its `/metrics`
   * (GUEST_CPU_NOTE): a microVM's own CPU use, without its emulator's. The agent is untrusted:
   * a wrong answer only makes its own sandbox look idle (frozen sooner) or busy (kept awake).
   */
  guestCpuTimeUsec(address: string, accessToken: string | undefined, timeoutMs?: number): Promise<number>;
  /**
   * Destroys the idle keep-alive sockets to one address (before a memory dump, so that no idle
   * connection is carried into an image restored elsewhere). Returns how many.
   */
  dropIdleSockets(address: string): number;
}
