/**
 * The server↔agent contract in one place: the agent's ports, the `/init` body, signed file URLs,
 * the Connect envelope, the generated message types, and the `AgentLink` the server talks through.
 * The agent, the router, the CLI and the core import it; nothing else restates any of it.
 */
export { ENVD_PORT, INTERPRETER_PORT } from "./ports.js";
export { buildInitBody, newMachineIdentity, normalizeCaCertificates, parseInitBody, type InitBody, type MachineIdentity, type SandboxIdentity } from "./init-body.js";
export { computeFileSignature, fileOperationOf, fileSignaturePattern, type FileOperation } from "./file-signature.js";
export {
  defaultMaxMessageBytes,
  encodeEnvelope,
  EnvelopeParser,
  envelopeFlags,
  knownEnvelopeFlags,
  type Envelope,
  type EnvelopeParserOptions,
} from "./envelope.js";
export { AGENT_READY_TIMEOUT_MS, agentReadyTimeoutMs, type AgentInitOptions, type AgentLink } from "./agent-link.js";
export { HttpAgentLink, type HttpAgentLinkOptions } from "./http-agent-link.js";
/** envd's `process.Process` messages in their Connect JSON form (generated from spec/process.proto). */
export * as processMessages from "./generated/process.js";
/** envd's `filesystem.Filesystem` messages in their Connect JSON form (generated from spec/filesystem.proto). */
export * as filesystemMessages from "./generated/filesystem.js";
/** The REST API's bodies (generated from spec/api.openapi.json). */
export * as apiSchema from "./generated/api.js";
