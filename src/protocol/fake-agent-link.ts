/**
 * A stand-in AgentLink for unit tests: records every call, answers at once, and fails the
 * methods a test names.
 */
import http from "node:http";
import type { AgentInitOptions, AgentLink } from "./agent-link.js";
import type { InitBody } from "./init-body.js";

export type AgentLinkMethod = Exclude<keyof AgentLink, "httpAgent">;

export type AgentLinkCall =
  | { method: "init"; address: string; body: InitBody; options: AgentInitOptions }
  | { method: "waitUntilUp"; address: string; timeoutMs: number }
  | { method: "isHealthy"; address: string; timeoutMs: number | undefined }
  | { method: "warmUp"; address: string; user: string; timeoutMs: number | undefined }
  | { method: "startKernel"; address: string; timeoutMs: number }
  | { method: "sync"; address: string; accessToken: string | undefined }
  | { method: "dropIdleSockets"; address: string }
  | { method: "runningProcessCount"; address: string; accessToken: string | undefined }
  | { method: "guestCpuTimeUsec"; address: string; accessToken: string | undefined };

export interface FakeAgentLink extends AgentLink {
  /** Every call, in order. */
  readonly calls: AgentLinkCall[];
  /**
   * Failures by method: the error the method rejects with (`isHealthy` answers false instead,
   * `dropIdleSockets` throws). A function decides per call (undefined = succeed).
   */
  readonly failures: Partial<Record<AgentLinkMethod, Error | ((call: AgentLinkCall) => Error | undefined)>>;
  /** The calls of one method. */
  callsOf<M extends AgentLinkMethod>(method: M): Extract<AgentLinkCall, { method: M }>[];
  /** What `runningProcessCount` answers (default 0). */
  processCount: number;
  /** What `guestCpuTimeUsec` answers (default 0): a test adds to it to make a guest look busy. */
  guestCpuUsec: number;
}

/** A FakeAgentLink; its `httpAgent` is a real keep-alive agent, so proxying through it works. */
export function createFakeAgentLink(failures: FakeAgentLink["failures"] = {}): FakeAgentLink {
  const calls: AgentLinkCall[] = [];
  const failureFor = (call: AgentLinkCall): Error | undefined => {
    const failure = failures[call.method];
    return typeof failure === "function" ? failure(call) : failure;
  };
  const record = async (call: AgentLinkCall): Promise<void> => {
    calls.push(call);
    const error = failureFor(call);
    if (error) throw error;
  };
  const link = {
    httpAgent: new http.Agent({ keepAlive: true }),
    calls,
    failures,
    callsOf<M extends AgentLinkMethod>(method: M) {
      return calls.filter((call): call is Extract<AgentLinkCall, { method: M }> => call.method === method);
    },
    init: (address: string, body: InitBody, options: AgentInitOptions = {}) => record({ method: "init", address, body, options }),
    waitUntilUp: (address: string, timeoutMs: number) => record({ method: "waitUntilUp", address, timeoutMs }),
    isHealthy: async (address: string, timeoutMs?: number) => {
      const call: AgentLinkCall = { method: "isHealthy", address, timeoutMs };
      calls.push(call);
      return failureFor(call) === undefined;
    },
    warmUp: (address: string, user: string, timeoutMs?: number) => record({ method: "warmUp", address, user, timeoutMs }),
    startKernel: (address: string, timeoutMs: number) => record({ method: "startKernel", address, timeoutMs }),
    sync: (address: string, accessToken: string | undefined) => record({ method: "sync", address, accessToken }),
    processCount: 0,
    async runningProcessCount(address: string, accessToken: string | undefined) {
      const call: AgentLinkCall = { method: "runningProcessCount", address, accessToken };
      calls.push(call);
      const error = failureFor(call);
      if (error) throw error;
      return this.processCount;
    },
    guestCpuUsec: 0,
    async guestCpuTimeUsec(address: string, accessToken: string | undefined) {
      const call: AgentLinkCall = { method: "guestCpuTimeUsec", address, accessToken };
      calls.push(call);
      const error = failureFor(call);
      if (error) throw error;
      return this.guestCpuUsec;
    },
    dropIdleSockets: (address: string) => {
      const call: AgentLinkCall = { method: "dropIdleSockets", address };
      calls.push(call);
      const error = failureFor(call);
      if (error) throw error;
      return 0;
    },
  } satisfies FakeAgentLink;
  return link;
}
