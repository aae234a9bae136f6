/**
 * The seam between the agent's Connect transport (src/agent/rpc) and its services
 * (src/agent/process, src/agent/filesystem). Services see decoded JSON messages and throw
 * CubicleError; the transport does framing, codes and the end-stream envelope.
 */
import type { AgentUser } from "../users.js";
import type { JsonObject } from "./proto-json.js";

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

/**
 * A request message as it arrived: the fields of its wire form `M` (generated from the .proto in
 * src/protocol/spec), every value still unknown. Handlers validate what they read through
 * proto-json.ts; other keys (proto field names such as `watcher_id`) are there as unknown too.
 */
export type Untrusted<M> = { readonly [K in keyof M]?: unknown } & JsonObject;

/** A unary procedure: one JSON message in, one out. */
export type UnaryHandler<Request = JsonObject, Response = unknown> = (request: Request, ctx: RpcContext) => Promise<Response>;

/**
 * A server-streaming procedure: call `send` for every message; resolve to end the stream
 * successfully, throw to end it with an error in the end-stream envelope.
 */
export type StreamHandler<Request = JsonObject, Response = unknown> = (request: Request, ctx: RpcContext, send: (message: Response) => void) => Promise<void>;

export interface ServiceDefinition {
  /** Fully qualified service name, e.g. "process.Process". */
  name: string;
  unary: Record<string, UnaryHandler>;
  streams: Record<string, StreamHandler>;
}

/** A generated method table (`ProcessMethods`, `FilesystemMethods` in src/protocol/generated). */
type MethodTable<M> = { [K in keyof M]: { kind: string; input: object; output: unknown } };

/**
 * The handlers of a generated service: every method of `M`, each with its request fields and its
 * response type, streams (server, client or both) under `streams`.
 */
export interface ServiceHandlers<M extends MethodTable<M>> {
  unary: { [K in keyof M as M[K]["kind"] extends "unary" ? K : never]: UnaryHandler<Untrusted<M[K]["input"]>, M[K]["output"]> };
  streams: { [K in keyof M as M[K]["kind"] extends "unary" ? never : K]: StreamHandler<Untrusted<M[K]["input"]>, M[K]["output"]> };
}

/** A service the transport can serve, checked against its generated method table `M`. */
export function defineService<M extends MethodTable<M>>(name: string, handlers: ServiceHandlers<M>): ServiceDefinition {
  return { name, unary: handlers.unary, streams: handlers.streams };
}
