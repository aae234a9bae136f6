/**
 * The server↔agent contract in one place: the agent's ports, the `/init` body, signed file URLs,
 * the Connect envelope, the generated message types, and the `AgentLink` the server talks through.
 * The agent, the router, the CLI and the core import it; nothing else restates any of it.
 */
export { ENVD_PORT, INTERPRETER_PORT } from "./ports.js";
export { buildInitBody, parseInitBody, type InitBody, type SandboxIdentity } from "./init-body.js";
export { computeFileSignature, fileOperationOf, fileSignaturePattern, fileSignaturesEqual, type FileOperation } from "./file-signature.js";
export {
  defaultMaxMessageBytes,
  encodeEnvelope,
  EnvelopeParser,
  envelopeFlags,
  knownEnvelopeFlags,
  type Envelope,
  type EnvelopeParserOptions,
} from "./envelope.js";
export { AGENT_READY_TIMEOUT_MS, type AgentInitOptions, type AgentLink } from "./agent-link.js";
export { HttpAgentLink, type HttpAgentLinkOptions } from "./http-agent-link.js";
