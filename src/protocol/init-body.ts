/**
 * The body of envd's `POST /init`: what the server hands a sandbox's agent when it takes it into
 * use (access token, sandbox-wide env vars, default user and working directory). The server builds
 * it with `buildInitBody`; the agent, for which it is untrusted JSON, reads it with `parseInitBody`.
 */
import { CubicleError } from "../shared/cubicle-error.js";

/** The wire form: every field optional, unknown fields ignored (as upstream envd does). */
export interface InitBody {
  accessToken?: string;
  envVars?: Record<string, string>;
  defaultUser?: string;
  defaultWorkdir?: string;
  hostname?: string;
  /** RFC 3339 time of the server, for the sandbox's clock (upstream sets it; the agent ignores it). */
  timestamp?: string;
  /**
   * PEM certificates (Cubicle's CA) the sandbox must trust, so the egress proxy's TLS
   * interception works for every template; Cubicle's own field (older agents ignore it).
   */
  caCertificates?: string;
}

/** Most certificates, and most characters, `caCertificates` may hold. */
const MAX_CA_CERTIFICATES = 16;
const MAX_CA_CERTIFICATES_CHARS = 128 * 1024;

/**
 * `caCertificates` as PEM CERTIFICATE blocks only (base64 bodies re-wrapped at 64 columns, one
 * newline after each), so what the agent appends to the system bundle can only be certificates.
 * Throws an invalid_argument CubicleError for anything else.
 */
export function normalizeCaCertificates(pem: string): string {
  if (pem.length > MAX_CA_CERTIFICATES_CHARS) throw new CubicleError("invalid_argument", `"caCertificates" is longer than ${MAX_CA_CERTIFICATES_CHARS} characters`);
  const block = /-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----/g;
  const bodies: string[] = [];
  const rest = pem.replace(block, (_whole, body: string) => {
    bodies.push(body.replace(/\s+/g, ""));
    return "";
  });
  if (rest.trim() !== "" || bodies.length === 0) throw new CubicleError("invalid_argument", `"caCertificates" must be PEM CERTIFICATE blocks and nothing else`);
  if (bodies.length > MAX_CA_CERTIFICATES) throw new CubicleError("invalid_argument", `"caCertificates" holds more than ${MAX_CA_CERTIFICATES} certificates`);
  return bodies
    .map((body) => {
      if (!/^[A-Za-z0-9+/]+={0,2}$/.test(body) || body.length % 4 !== 0) throw new CubicleError("invalid_argument", `"caCertificates" holds a block that is not base64`);
      return `-----BEGIN CERTIFICATE-----\n${body.match(/.{1,64}/g)!.join("\n")}\n-----END CERTIFICATE-----\n`;
    })
    .join("");
}

/** What the server knows of a sandbox's identity when it inits its agent. */
export interface SandboxIdentity {
  accessToken?: string;
  envVars: Record<string, string>;
  defaultUser: string;
  defaultWorkdir: string;
  hostname?: string;
  /** PEM of the CA certificates the sandbox must trust (Cubicle's CA). */
  caCertificates?: string;
}

/** The `/init` body for a sandbox's identity, stamped with the server's time. */
export function buildInitBody(identity: SandboxIdentity, now: Date = new Date()): InitBody {
  const body: InitBody = { envVars: { ...identity.envVars }, defaultUser: identity.defaultUser, defaultWorkdir: identity.defaultWorkdir, timestamp: now.toISOString() };
  if (identity.accessToken !== undefined) body.accessToken = identity.accessToken;
  if (identity.hostname !== undefined) body.hostname = identity.hostname;
  if (identity.caCertificates !== undefined) body.caCertificates = identity.caCertificates;
  return body;
}

function optionalString(body: Record<string, unknown>, key: string): string | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "string") throw new CubicleError("invalid_argument", `"${key}" must be a string`);
  return v;
}

/**
 * Validates an `/init` body (already JSON-decoded, untrusted) into an InitBody. Throws an
 * invalid_argument CubicleError naming the field at fault.
 */
export function parseInitBody(body: unknown): InitBody {
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    throw new CubicleError("invalid_argument", "the init body must be a JSON object");
  }
  const b = body as Record<string, unknown>;
  const request: InitBody = {
    accessToken: optionalString(b, "accessToken"),
    defaultUser: optionalString(b, "defaultUser"),
    defaultWorkdir: optionalString(b, "defaultWorkdir"),
    hostname: optionalString(b, "hostname"),
    timestamp: optionalString(b, "timestamp"),
  };
  const caCertificates = optionalString(b, "caCertificates");
  if (caCertificates !== undefined && caCertificates.trim() !== "") request.caCertificates = normalizeCaCertificates(caCertificates);
  if (b.envVars !== undefined && b.envVars !== null) {
    if (typeof b.envVars !== "object" || Array.isArray(b.envVars)) throw new CubicleError("invalid_argument", `"envVars" must be an object`);
    const envVars: Record<string, string> = {};
    for (const [key, value] of Object.entries(b.envVars as Record<string, unknown>)) {
      if (typeof value !== "string") throw new CubicleError("invalid_argument", `env var "${key}" must be a string`);
      if (key === "" || key.includes("=") || key.includes("\0") || value.includes("\0")) {
        throw new CubicleError("invalid_argument", `env var "${key}" is not a valid name/value`);
      }
      envVars[key] = value;
    }
    request.envVars = envVars;
  }
  return request;
}
