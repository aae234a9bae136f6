/**
 * What a client may send for a secret (E2B `NewSecret`, `SecretUpdate`), checked before anything
 * is stored. A message may quote a name or a metadata entry, never the value.
 */
import { CubicleError } from "../shared/cubicle-error.js";

export const SECRET_BOUNDS = {
  nameBytes: 128,
  valueBytes: 64 * 1024,
  metadataEntries: 32,
  metadataKeyBytes: 128,
  metadataValueBytes: 1024,
  metadataTotalBytes: 8192,
} as const;

/** Secret ids are `sec_` + this; names may not start with it (upstream reserves it). */
export const SECRET_ID_PREFIX = "sec_";

// The SDK's own check (validateSecretName): a name is interpolated into `${e2b.secrets.<name>}`.
const UNUSABLE_NAME_CHARS = /[{}\p{Cc}]/u;
// In a `u` pattern a surrogate pair is one code point: this matches only lone halves, which
// UTF-8 cannot carry (they would be stored as U+FFFD).
const LONE_SURROGATE = /[\uD800-\uDFFF]/u;

export interface NewSecretInput {
  name: string;
  value: string;
  metadata: Record<string, string>;
}

export interface SecretUpdateInput {
  value: string;
  /** Undefined: the metadata stays as it is. */
  metadata: Record<string, string> | undefined;
}

function fail(message: string): never {
  throw new CubicleError("invalid_argument", message);
}

/** A name or metadata entry in a message: short, quoted, escaped. */
function shown(text: string): string {
  return JSON.stringify(text.length > 64 ? text.slice(0, 64) + "…" : text);
}

function bodyObject(body: unknown, shape: string): Record<string, unknown> {
  if (typeof body !== "object" || body === null || Array.isArray(body)) fail(`the request body must be a JSON object ${shape}`);
  return body as Record<string, unknown>;
}

/** The stored form of a secret name (lower-case), or a 400 saying what is wrong with it. */
export function parseSecretName(raw: unknown): string {
  if (typeof raw !== "string" || raw === "") fail("name is required: a non-empty string");
  if (LONE_SURROGATE.test(raw)) fail("name is not well-formed Unicode (it holds a lone surrogate)");
  if (UNUSABLE_NAME_CHARS.test(raw)) fail(`secret name ${shown(raw)} is not usable: a name cannot contain '{', '}' or control characters, because it is interpolated into the '\${e2b.secrets.<name>}' placeholder`);
  const name = raw.toLowerCase();
  if (Buffer.byteLength(name) > SECRET_BOUNDS.nameBytes) fail(`name is longer than ${SECRET_BOUNDS.nameBytes} bytes`);
  if (name.startsWith(SECRET_ID_PREFIX)) fail(`names starting with "${SECRET_ID_PREFIX}" are reserved for secret ids; choose another name`);
  // "." and ".." cannot be named in a URL path (clients resolve them away before sending).
  if (name === "." || name === "..") fail(`${shown(name)} cannot be a secret name`);
  return name;
}

function parseSecretValue(raw: unknown): string {
  if (typeof raw !== "string") fail("value is required: a string");
  if (raw === "") fail("value must not be empty");
  if (LONE_SURROGATE.test(raw)) fail("value is not well-formed Unicode (it holds a lone surrogate)");
  if (Buffer.byteLength(raw) > SECRET_BOUNDS.valueBytes) fail(`value is longer than ${SECRET_BOUNDS.valueBytes} bytes`);
  return raw;
}

/** `SecretMetadata`: string values, within upstream's bounds; undefined when absent or null. */
export function parseSecretMetadata(raw: unknown): Record<string, string> | undefined {
  if (raw === undefined || raw === null) return undefined;
  if (typeof raw !== "object" || Array.isArray(raw)) fail("metadata must be an object of string values");
  const entries = Object.entries(raw as Record<string, unknown>);
  if (entries.length > SECRET_BOUNDS.metadataEntries) fail(`metadata may have at most ${SECRET_BOUNDS.metadataEntries} entries, not ${entries.length}`);
  let totalBytes = 0;
  for (const [key, value] of entries) {
    if (typeof value !== "string") fail(`metadata[${shown(key)}] must be a string`);
    const keyBytes = Buffer.byteLength(key);
    if (keyBytes === 0 || keyBytes > SECRET_BOUNDS.metadataKeyBytes) fail(`metadata keys must be 1–${SECRET_BOUNDS.metadataKeyBytes} bytes; ${shown(key)} is not`);
    const valueBytes = Buffer.byteLength(value);
    if (valueBytes > SECRET_BOUNDS.metadataValueBytes) fail(`metadata[${shown(key)}] is longer than ${SECRET_BOUNDS.metadataValueBytes} bytes`);
    totalBytes += keyBytes + valueBytes;
  }
  if (totalBytes > SECRET_BOUNDS.metadataTotalBytes) fail(`metadata is ${totalBytes} bytes in all (keys and values); at most ${SECRET_BOUNDS.metadataTotalBytes}`);
  // fromEntries: a `__proto__` key stays an own key.
  return Object.fromEntries(entries) as Record<string, string>;
}

/** `POST /secrets` `{name, value, metadata?}`. */
export function parseNewSecret(body: unknown): NewSecretInput {
  const input = bodyObject(body, "{name, value, metadata?}");
  return { name: parseSecretName(input.name), value: parseSecretValue(input.value), metadata: parseSecretMetadata(input.metadata) ?? {} };
}

/** `POST /secrets/{secretID}` `{value, metadata?}`. */
export function parseSecretUpdate(body: unknown): SecretUpdateInput {
  const input = bodyObject(body, "{value, metadata?}");
  return { value: parseSecretValue(input.value), metadata: parseSecretMetadata(input.metadata) };
}
