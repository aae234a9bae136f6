export { SandboxManager, MAX_TIMEOUT_SEC, DEFAULT_FORK_TIMEOUT_SEC } from "./sandbox-manager.js";
export type { RouteTarget, SandboxManagerOptions, ForkOutcome, ResumeOptions } from "./sandbox-manager.js";
export { encodeSnapshotCursor, decodeSnapshotCursor } from "./snapshot-names.js";
export type { TemplateCatalog, TemplateInfo, CreateSandboxRequest } from "./types.js";
export { newApiKey } from "./ids.js";
