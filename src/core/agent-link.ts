import { agentIsHealthy, dropIdleAgentSockets, initAgent, initAgentWhenUp, startInterpreterKernel, waitForAgent, warmUpAgent, type AgentInit } from "./agent-client.js";

/** What the core needs of a sandbox's agent, by the sandbox's address. */
export interface AgentLink {
  /** envd's /init; `currentToken` is the token the agent holds now; with `whenUpMs`, retried that long while unreachable. */
  init(address: string, init: AgentInit, options?: { currentToken?: string; whenUpMs?: number }): Promise<void>;
  waitUntilUp(address: string, timeoutMs: number): Promise<void>;
  isHealthy(address: string, timeoutMs?: number): Promise<boolean>;
  warmUp(address: string, user: string, timeoutMs?: number): Promise<void>;
  startKernel(address: string, timeoutMs: number): Promise<void>;
  dropIdleSockets(address: string): number;
}

export const httpAgentLink: AgentLink = {
  init: (address, init, options = {}) =>
    options.whenUpMs === undefined ? initAgent(address, init, options.currentToken) : initAgentWhenUp(address, init, options.currentToken, options.whenUpMs),
  waitUntilUp: waitForAgent,
  isHealthy: agentIsHealthy,
  warmUp: warmUpAgent,
  startKernel: startInterpreterKernel,
  dropIdleSockets: dropIdleAgentSockets,
};
