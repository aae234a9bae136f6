/**
 * The seam between the agent's Connect transport (src/agent/rpc) and its services
 * (src/agent/process, src/agent/filesystem). Services see decoded JSON messages and throw
 * CubicleError; the transport does framing, codes and the end-stream envelope.
 */
import type { AgentUser } from "../users.js";

export interface RpcContext {
  /** The user chosen by the Basic auth header, or the sandbox default user. */
  user: AgentUser;
  /** Aborted when the client goes away or Connect-Timeout-Ms passes. */
  signal: AbortSignal;
  /** Request headers, lower-cased names. */
  headers: Record<string, string | string[] | undefined>;
  /** Connect-Timeout-Ms of the request, if any (ms). */
  timeoutMs: number | undefined;
  /**
   * Streams only: true while the response is backed up (the client reads slower than the
   * handler sends). A producer that can pause (process output) should pause, then resume
   * after `waitForDrain`.
   */
  needsDrain?: () => boolean;
  /** Resolves once the response buffer has drained or the connection is gone. */
  waitForDrain?: () => Promise<void>;
  /** Streams only: bytes sent but not yet taken by the client (a producer that cannot pause caps it). */
  pendingBytes?: () => number;
}

/** A unary procedure: one JSON message in, one out. */
export type UnaryHandler = (request: any, ctx: RpcContext) => Promise<unknown>;

/**
 * A server-streaming procedure: call `send` for every message; resolve to end the stream
 * successfully, throw to end it with an error in the end-stream envelope.
 */
export type StreamHandler = (request: any, ctx: RpcContext, send: (message: unknown) => void) => Promise<void>;

export interface ServiceDefinition {
  /** Fully qualified service name, e.g. "process.Process". */
  name: string;
  unary: Record<string, UnaryHandler>;
  streams: Record<string, StreamHandler>;
}
