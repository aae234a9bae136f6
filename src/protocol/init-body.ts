/**
 * The body of envd's `POST /init`: what the server hands a sandbox's agent when it takes it into
 * use (access token, sandbox-wide env vars, default user and working directory). The server builds
 * it with `buildInitBody`; the agent, for which it is untrusted JSON, reads it with `parseInitBody`.
 */
import { randomBytes, randomUUID } from "node:crypto";
import { CubicleError } from "../shared/cubicle-error.js";

/** The wire form: every field optional, unknown fields ignored (as upstream envd does). */
export interface InitBody {
  accessToken?: string;
  envVars?: Record<string, string>;
  defaultUser?: string;
  defaultWorkdir?: string;
  hostname?: string;
  /** RFC 3339 time of the server, for the sandbox's clock (a microVM guest's agent sets its clock by it: GUEST_MACHINE_NOTE). */
  timestamp?: string;
  /**
   * A new machine's identity, sent after a restore that makes one (a fork, a create from a
   * snapshot): a microVM guest's agent takes it (GUEST_MACHINE_NOTE); a container's ignores it
   * (its runtime gives it its ids). Cubicle's own field.
   */
  machine?: MachineIdentity;
  /**
   * PEM certificates (Cubicle's CA) the sandbox must trust, so the egress proxy's TLS
   * interception works for every template; Cubicle's own field (older agents ignore it).
   */
  caCertificates?: string;
}

export interface MachineIdentity {
  /** 32 lowercase hex digits (/etc/machine-id). */
  machineId: string;
  /** A UUID (the kernel's boot_id form). */
  bootId: string;
  /** Base64 of 32 to 512 fresh random bytes. */
  entropy: string;
}

/** A new machine's identity, from the host's randomness. */
export function newMachineIdentity(): MachineIdentity {
  return { machineId: randomBytes(16).toString("hex"), bootId: randomUUID(), entropy: randomBytes(64).toString("base64") };
}

function parseMachineIdentity(value: unknown): MachineIdentity | undefined {
  if (value === undefined || value === null) return undefined;
  const fail = (why: string): never => {
    throw new CubicleError("invalid_argument", `"machine" ${why}`);
  };
  if (typeof value !== "object" || Array.isArray(value)) fail("must be an object");
  const { machineId, bootId, entropy } = value as Record<string, unknown>;
  if (typeof machineId !== "string" || !/^[0-9a-f]{32}$/.test(machineId)) fail("machineId must be 32 lowercase hex digits");
  if (typeof bootId !== "string" || !/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(bootId)) fail("bootId must be a lowercase UUID");
  if (typeof entropy !== "string" || !/^[A-Za-z0-9+/]{43,684}={0,2}$/.test(entropy)) fail("entropy must be base64 of 32 to 512 bytes");
  return { machineId: machineId as string, bootId: bootId as string, entropy: entropy as string };
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
  /** A new machine's identity (a fork, a create from a snapshot). */
  machine?: MachineIdentity;
  /** PEM of the CA certificates the sandbox must trust (Cubicle's CA). */
  caCertificates?: string;
}

/** The `/init` body for a sandbox's identity, stamped with the server's time. */
export function buildInitBody(identity: SandboxIdentity, now: Date = new Date()): InitBody {
  const body: InitBody = { envVars: { ...identity.envVars }, defaultUser: identity.defaultUser, defaultWorkdir: identity.defaultWorkdir, timestamp: now.toISOString() };
  if (identity.accessToken !== undefined) body.accessToken = identity.accessToken;
  if (identity.hostname !== undefined) body.hostname = identity.hostname;
  if (identity.caCertificates !== undefined) body.caCertificates = identity.caCertificates;
  if (identity.machine !== undefined) body.machine = identity.machine;
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
  const machine = parseMachineIdentity(b.machine);
  if (machine) request.machine = machine;
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
