export { SandboxManager, MAX_TIMEOUT_SEC, DEFAULT_FORK_TIMEOUT_SEC } from "./sandbox-manager.js";
export type { RouteTarget, SandboxManagerOptions, ForkOutcome, ResumeOptions } from "./sandbox-manager.js";
export { encodeSnapshotCursor, decodeSnapshotCursor } from "./snapshot-names.js";
export type { TemplateCatalog, TemplateInfo, CreateSandboxRequest } from "./types.js";
export { newApiKey } from "./ids.js";
export { ENVD_PORT, INTERPRETER_PORT } from "./agent-client.js";
export { httpAgentLink, type AgentLink } from "./agent-link.js";
