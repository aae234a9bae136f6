import { RESOURCE_FLOORS } from "../shared/config.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { decodePageCursor, encodePageCursor } from "../shared/page-cursor.js";
import type { SandboxState } from "../store/types.js";
import type { CreateSandboxRequest } from "../core/types.js";
import { MAX_TIMEOUT_SEC } from "../core/sandbox-manager.js";
import { parseBandwidthLimits } from "../network/bandwidth.js";
import { CODEBASE_BOUNDS, codebaseLevel } from "../codebases/codebase-service.js";
import type { CodebaseLevel } from "../store/index.js";
import { buildEgressPolicy, EGRESS_FIELDS } from "../network/egress-policy.js";
import { ENVD_PORT } from "../protocol/index.js";

function fail(message: string): never {
  throw new CubicleError("invalid_argument", message);
}

function asObject(body: unknown, what: string): Record<string, unknown> {
  if (body === undefined || body === null || body === "") return {};
  if (typeof body !== "object" || Array.isArray(body)) fail(`${what} must be a JSON object`);
  return body as Record<string, unknown>;
}

/** Bounds of what a create may carry besides resources (metadata is stored and listed; env vars reach execve). */
export const CREATE_BOUNDS = {
  templateIdChars: 256,
  metadataEntries: 100,
  metadataKeyChars: 256,
  metadataValueChars: 4096,
  envVarEntries: 1000,
  envVarNameChars: 256,
  // Linux refuses a single environment string longer than MAX_ARG_STRLEN (32 pages = 128 KiB).
  envVarValueBytes: 128 * 1024 - 1,
  networkJsonBytes: 64 * 1024,
} as const;

const envVarNamePattern = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** A key or value from the request in an error message: short and quoted. */
function shown(value: string): string {
  return JSON.stringify(value.length > 64 ? value.slice(0, 64) + "…" : value);
}

/** `envVars.NAME`, or `envVars["odd key…"]` for a key that is not a short plain name. */
function entryName(field: string, key: string): string {
  return /^[A-Za-z_][A-Za-z0-9_]{0,63}$/.test(key) ? `${field}.${key}` : `${field}[${shown(key)}]`;
}

/**
 * An object of string values. Built with Object.fromEntries, so a `__proto__` key stays an own
 * key instead of being swallowed by the prototype setter.
 */
function stringMap(value: unknown, field: string, maxEntries: number): Record<string, string> {
  if (value === undefined || value === null) return {};
  if (typeof value !== "object" || Array.isArray(value)) fail(`${field} must be an object of string values`);
  const entries = Object.entries(value as Record<string, unknown>);
  if (entries.length > maxEntries) fail(`${field} may have at most ${maxEntries} entries, not ${entries.length}`);
  for (const [key, v] of entries) if (typeof v !== "string") fail(`${entryName(field, key)} must be a string`);
  return Object.fromEntries(entries) as Record<string, string>;
}

function metadataMap(value: unknown): Record<string, string> {
  const metadata = stringMap(value, "metadata", CREATE_BOUNDS.metadataEntries);
  for (const [key, v] of Object.entries(metadata)) {
    if (key.length === 0 || key.length > CREATE_BOUNDS.metadataKeyChars) fail(`metadata keys must be 1–${CREATE_BOUNDS.metadataKeyChars} characters; ${shown(key)} is not`);
    if (v.length > CREATE_BOUNDS.metadataValueChars) fail(`${entryName("metadata", key)} is longer than ${CREATE_BOUNDS.metadataValueChars} characters`);
  }
  return metadata;
}

/** Env vars as a shell and execve take them: POSIX-style names, no NUL, values execve accepts. */
export function parseEnvVars(value: unknown, field = "envVars"): Record<string, string> {
  const envVars = stringMap(value, field, CREATE_BOUNDS.envVarEntries);
  for (const [name, v] of Object.entries(envVars)) {
    if (!envVarNamePattern.test(name) || name.length > CREATE_BOUNDS.envVarNameChars) {
      fail(`${field}: ${shown(name)} is not a valid variable name: use letters, digits and _, not starting with a digit, at most ${CREATE_BOUNDS.envVarNameChars} characters`);
    }
    if (v.includes("\0")) fail(`${field}.${name} contains a NUL character, which no environment variable can hold`);
    if (Buffer.byteLength(v) > CREATE_BOUNDS.envVarValueBytes) fail(`${field}.${name} is longer than ${CREATE_BOUNDS.envVarValueBytes} bytes`);
  }
  return envVars;
}

/** The `network` fields a create accepts; each is enforced (egress-policy.ts, the router). */
const NETWORK_FIELDS = ["allowOut", "denyOut", "rules", "egressProxy", "allowPublicTraffic", "maskRequestHost", "httpsPorts", "bandwidth"];

/**
 * `network` of a create: the E2B SandboxNetworkConfig. The egress fields are validated by the
 * policy they become (buildEgressPolicy: what cannot be enforced is refused); the object is
 * stored and echoed once valid. Every level is type-checked before anything serialises it, as
 * JSON.stringify of a deeply nested value overflows the stack.
 */
function parseNetwork(value: unknown, allowInternetAccess: boolean): Record<string, unknown> | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "object" || Array.isArray(value)) fail("network must be an object");
  const network = value as Record<string, unknown>;
  for (const key of Object.keys(network)) {
    if (!NETWORK_FIELDS.includes(key)) fail(`${entryName("network", key)} is not a network field (${NETWORK_FIELDS.join(", ")})`);
  }
  buildEgressPolicy(allowInternetAccess, network);
  parseBandwidthLimits(network.bandwidth, "network.bandwidth");
  if (network.allowPublicTraffic !== undefined && network.allowPublicTraffic !== null && typeof network.allowPublicTraffic !== "boolean") fail("network.allowPublicTraffic must be true or false");
  if (network.maskRequestHost !== undefined && network.maskRequestHost !== null) {
    if (typeof network.maskRequestHost !== "string" || !/^[A-Za-z0-9.:${}_-]{1,253}$/.test(network.maskRequestHost)) fail("network.maskRequestHost must be a host name (it may hold ${PORT})");
  }
  parseHttpsPorts(network.httpsPorts);
  if (Buffer.byteLength(JSON.stringify(network)) > CREATE_BOUNDS.networkJsonBytes) fail(`network must be at most ${CREATE_BOUNDS.networkJsonBytes / 1024} KiB of JSON`);
  return network;
}

/** Ports one sandbox may name in `network.httpsPorts`. */
const MAX_HTTPS_PORTS = 64;

/**
 * E2B `network.httpsPorts`: sandbox ports the router reaches over TLS (certificates not
 * verified, as upstream); envd's port cannot be one (it is always plain HTTP).
 */
function parseHttpsPorts(value: unknown): void {
  if (value === undefined || value === null) return;
  if (!Array.isArray(value) || value.length > MAX_HTTPS_PORTS) fail(`network.httpsPorts must be a list of at most ${MAX_HTTPS_PORTS} ports`);
  for (const port of value) {
    if (typeof port !== "number" || !Number.isInteger(port) || port < 1 || port > 65535) fail("network.httpsPorts must hold ports from 1 to 65535");
    if (port === ENVD_PORT) fail(`network.httpsPorts cannot list envd's port ${ENVD_PORT}`);
  }
}

/** The egress fields of `PUT /sandboxes/{id}/network` (SandboxNetworkUpdateConfig), validated. */
export function parseNetworkUpdate(body: unknown): { allowInternetAccess: boolean; egress: Record<string, unknown> } {
  const input = asObject(body, "the request body");
  const fields: readonly string[] = EGRESS_FIELDS;
  for (const key of Object.keys(input)) {
    if (!fields.includes(key) && key !== "allow_internet_access" && key !== "allowInternetAccess") fail(`${entryName("body", key)} is not a network update field (${[...fields, "allow_internet_access"].join(", ")})`);
  }
  // Upstream: an omitted field is cleared, so allow_internet_access falls back to true.
  const allowInternetAccess = optionalBool(input.allow_internet_access ?? input.allowInternetAccess, "allow_internet_access", true);
  buildEgressPolicy(allowInternetAccess, input);
  const egress = Object.fromEntries(fields.filter((key) => input[key] !== undefined && input[key] !== null).map((key) => [key, input[key]]));
  if (Buffer.byteLength(JSON.stringify(egress)) > CREATE_BOUNDS.networkJsonBytes) fail(`the network update must be at most ${CREATE_BOUNDS.networkJsonBytes / 1024} KiB of JSON`);
  return { allowInternetAccess, egress };
}

/**
 * Create fields Cubicle cannot enforce yet are refused, never accepted and ignored: workload
 * identity tokens (`iam`, which `${e2b.identity.tokens.*}` header placeholders need), MCP
 * servers (`mcp`). The SDK leaves each out unless it is used.
 */
function refuseUnsupported(input: Record<string, unknown>): void {
  const iam = input.iam as { tokens?: unknown } | null | undefined;
  const tokens = iam && typeof iam === "object" ? iam.tokens : undefined;
  if (iam !== undefined && iam !== null && !(tokens && typeof tokens === "object" && Object.keys(tokens).length === 0) && !(typeof iam === "object" && Object.keys(iam).length === 0)) {
    fail("iam (workload identity tokens) is not supported by this server; leave it out");
  }
  if (input.mcp !== undefined && input.mcp !== null) fail("mcp (MCP servers in the sandbox) is not supported by this server yet; leave it out");
}

/** Mounts of each kind one sandbox may have. */
const MAX_MOUNTS = 16;
/** Where a volume or codebase may not go: at or under the kernel's, the runtime's and the agent's trees. */
const RESERVED_MOUNT_ROOTS = ["/proc", "/sys", "/dev", "/run", "/.cubicle", "/etc/machine-id"];
/** System directories a mount may not replace (below them is allowed: /usr/local/data, /var/data). */
const SYSTEM_DIRS = new Set(["/bin", "/boot", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/root", "/sbin", "/tmp", "/usr", "/usr/bin", "/usr/lib", "/usr/sbin", "/usr/local", "/var", "/var/lib"]);

/** A mount point of a volume or codebase: absolute, plain, outside the kernel's and the agent's trees. */
function checkMountPath(path: unknown, where: string): string {
  if (typeof path !== "string" || !path.startsWith("/") || path.length > 1024 || /[\0\\]/.test(path)) fail(`${where}.path must be an absolute path`);
  const names = path.split("/").filter(Boolean);
  if (names.length === 0) fail(`${where}.path must not be /`);
  if (names.some((part) => part === "." || part === "..") || path.includes("//") || (path.length > 1 && path.endsWith("/"))) fail(`${where}.path must be a plain absolute path (no '.', '..', '//' or trailing '/')`);
  const reserved = RESERVED_MOUNT_ROOTS.find((root) => path === root || path.startsWith(`${root}/`));
  if (reserved) fail(`${where}.path: a volume or codebase cannot be mounted at or under ${reserved}`);
  if (SYSTEM_DIRS.has(path)) fail(`${where}.path: a volume or codebase cannot replace the system directory ${path}; mount it below (for example ${path}/data) or elsewhere`);
  return path;
}

/** Mount points of one create must not nest or repeat. */
function checkNoNesting(paths: readonly string[], field: string): void {
  for (const [index, path] of paths.entries()) {
    const clash = paths.find((other, otherIndex) => otherIndex !== index && (other === path || path.startsWith(`${other}/`)));
    if (clash) fail(`${field}: ${path} is at or inside ${clash}; mount points must not nest`);
  }
}

/**
 * Cubicle's `codebaseMounts` (CODEBASES_NOTE): `[{codebase, path, rules, default}]`; `rules`
 * maps glob patterns to levels (for example `src/**` to "write", `secrets/**` to "none"),
 * `default` is the level of what no rule matches (default "read").
 */
function parseCodebaseMounts(value: unknown): { codebaseMounts?: { codebase: string; path: string; rules: { pattern: string; level: CodebaseLevel }[]; defaultLevel: CodebaseLevel }[] } {
  const entries = mountEntries(value, "codebaseMounts", ["codebase", "path", "rules", "default"]);
  if (!entries) return {};
  const mounts = entries.map(({ where, entry }) => {
    const { codebase, path, rules, default: defaultLevel } = entry;
    if (typeof codebase !== "string" || codebase.length === 0 || codebase.length > 128) fail(`${where}.codebase must be a codebase's name or id`);
    if (rules !== undefined && rules !== null && (typeof rules !== "object" || Array.isArray(rules))) fail(`${where}.rules must be an object of pattern → level`);
    const patterns = Object.entries((rules ?? {}) as Record<string, unknown>);
    if (patterns.length > CODEBASE_BOUNDS.rules) fail(`${where}.rules has ${patterns.length} patterns; at most ${CODEBASE_BOUNDS.rules} are allowed`);
    const parsedRules = patterns.map(([pattern, level]) => {
      // What codebase-fs takes: names separated by single slashes, none of them '.' or '..'.
      const segments = pattern.split("/");
      if (pattern.length > CODEBASE_BOUNDS.patternChars || /[\0\t\n\r]/.test(pattern) || segments.some((segment) => segment === "" || segment === "." || segment === "..")) {
        fail(`${where}.rules: ${JSON.stringify(pattern.slice(0, 40))} is not a pattern (a relative glob like src/** or **/*.env: names separated by single '/', no '.' or '..', at most ${CODEBASE_BOUNDS.patternChars} characters)`);
      }
      return { pattern, level: codebaseLevel(level, `${where}.rules[${JSON.stringify(pattern.slice(0, 40))}]`) };
    });
    return { codebase, path: checkMountPath(path, where), rules: parsedRules, defaultLevel: defaultLevel === undefined ? ("read" as const) : codebaseLevel(defaultLevel, `${where}.default`) };
  });
  return { codebaseMounts: mounts };
}

/** E2B `volumeMounts`: `[{name, path}]`, each path absolute, plain and distinct from the others. */
function parseVolumeMounts(value: unknown): { volumeMounts?: { name: string; path: string }[] } {
  const entries = mountEntries(value, "volumeMounts", ["name", "path"]);
  if (!entries) return {};
  const mounts = entries.map(({ where, entry: { name, path } }) => {
    if (typeof name !== "string" || name.length === 0 || name.length > 128) fail(`${where}.name must be a volume's name or id`);
    return { name, path: checkMountPath(path, where) };
  });
  return { volumeMounts: mounts };
}

/**
 * The entries of a mount list (`volumeMounts`, `codebaseMounts`), each an object of only
 * `fields`; undefined for none (absent, null or empty).
 */
function mountEntries(value: unknown, field: string, fields: readonly string[]): { where: string; entry: Record<string, unknown> }[] | undefined {
  if (value === undefined || value === null) return undefined;
  const shape = `{${fields.join(", ")}}`;
  if (!Array.isArray(value)) fail(`${field} must be a list of ${shape}`);
  if (value.length === 0) return undefined;
  if (value.length > MAX_MOUNTS) fail(`${field} has ${value.length} entries; at most ${MAX_MOUNTS} are allowed`);
  return value.map((entry: unknown, index) => {
    const where = `${field}[${index}]`;
    if (typeof entry !== "object" || entry === null || Array.isArray(entry)) fail(`${where} must be ${shape}`);
    const unknown = Object.keys(entry).find((key) => !fields.includes(key));
    if (unknown !== undefined) fail(`${where}: ${JSON.stringify(unknown.slice(0, 40))} is not a mount field (${fields.join(", ")})`);
    return { where, entry: entry as Record<string, unknown> };
  });
}

function optionalBool(value: unknown, field: string, fallback: boolean): boolean {
  if (value === undefined || value === null) return fallback;
  if (typeof value !== "boolean") fail(`${field} must be true or false`);
  return value;
}

/** A timeout in whole seconds, 0 … 24 h. */
export function parseTimeoutSec(value: unknown, field: string, fallback: number): number {
  if (value === undefined || value === null) return fallback;
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0) fail(`${field} must be a whole number of seconds`);
  if (value > MAX_TIMEOUT_SEC) fail(`${field} must be at most ${MAX_TIMEOUT_SEC} seconds (24 hours)`);
  return value;
}

/** The operator's ceilings for what one create may ask for (CUBICLE_MAX_*). */
export interface CreateLimits {
  maxCpuCount: number;
  maxMemoryMB: number;
  maxDiskMB: number;
}

function resource(value: unknown, field: string, min: number, max: number, limitName: string): number | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "number" || !Number.isInteger(value)) fail(`${field} must be a whole number from ${min} to ${max}`);
  if (value < min) fail(`${field} must be at least ${min}`);
  if (value > max) fail(`${field} must be at most ${max} on this server (its limit ${limitName}); ask for less, or have the operator raise ${limitName}`);
  return value;
}

/** What parseCreateRequest needs from the server's configuration. */
export interface CreateParsingOptions {
  defaultTimeoutSec: number;
  limits: CreateLimits;
  /** Refuse v1 creates with `secure: false`, and make v1 creates without the field secure. */
  requireSecure: boolean;
}

/**
 * `NewSandbox` (v1, `POST /sandboxes`) and `NewSandboxV2` (`POST /v2/sandboxes`). v2 creates are
 * always secure and default to the server timeout; v1 defaults to 15 s and honours `secure`
 * (when the server requires secure sandboxes, a v1 create without it is secure and one with
 * `secure: false` is refused). `cpuCount`, `memoryMB` and `diskSizeMB` (Cubicle extensions) are
 * checked against the operator's limits.
 */
export function parseCreateRequest(body: unknown, version: 1 | 2, options: CreateParsingOptions): CreateSandboxRequest {
  const { defaultTimeoutSec, limits } = options;
  const input = asObject(body, "the request body");
  const templateId = input.templateID;
  if (typeof templateId !== "string" || templateId.trim() === "") fail("templateID is required (a template id, alias or snapshot id)");
  if (templateId.length > CREATE_BOUNDS.templateIdChars) fail(`templateID must be at most ${CREATE_BOUNDS.templateIdChars} characters`);
  const autoResume = input.autoResume;
  const lifecycle = asObject(input.lifecycle, "lifecycle");
  const autoResumeEnabled =
    autoResume && typeof autoResume === "object" ? optionalBool((autoResume as Record<string, unknown>).enabled, "autoResume.enabled", false) : optionalBool(lifecycle.autoResume, "lifecycle.autoResume", false);
  const secure = optionalBool(input.secure, "secure", options.requireSecure);
  if (version === 1 && !secure && options.requireSecure) {
    fail(
      "this server requires secure sandboxes (envd access tokens): secure: false is refused. Leave secure out or set it to true; " +
        "the operator can allow insecure sandboxes, which anyone who knows the sandbox id can control, with CUBICLE_REQUIRE_SECURE=false",
    );
  }
  const allowInternetAccess = optionalBool(input.allow_internet_access ?? input.allowInternetAccess, "allow_internet_access", true);
  refuseUnsupported(input);
  return {
    templateId: templateId.trim(),
    timeoutSec: parseTimeoutSec(input.timeout, "timeout", version === 2 ? defaultTimeoutSec : 15),
    // v2 creates are always secure; the field is still checked so a typo is not silently ignored.
    secure: secure || version === 2,
    allowInternetAccess,
    metadata: metadataMap(input.metadata),
    envVars: parseEnvVars(input.envVars),
    autoPause: optionalBool(input.autoPause, "autoPause", false) || lifecycle.onTimeout === "pause",
    autoResume: autoResumeEnabled,
    networkConfig: parseNetwork(input.network, allowInternetAccess),
    cpuCount: resource(input.cpuCount, "cpuCount", RESOURCE_FLOORS.cpuCount, limits.maxCpuCount, "CUBICLE_MAX_CPU_COUNT"),
    memoryMB: resource(input.memoryMB, "memoryMB", RESOURCE_FLOORS.memoryMB, limits.maxMemoryMB, "CUBICLE_MAX_MEMORY_MB"),
    diskSizeMB: resource(input.diskSizeMB, "diskSizeMB", RESOURCE_FLOORS.diskMB, limits.maxDiskMB, "CUBICLE_MAX_DISK_MB"),
    ...runtimeField(input.runtime),
    ...mountFields(input),
  };
}

/** `volumeMounts` and `codebaseMounts`, whose mount points must not nest across both. */
function mountFields(input: Record<string, unknown>): ReturnType<typeof parseVolumeMounts> & ReturnType<typeof parseCodebaseMounts> {
  const fields = { ...parseVolumeMounts(input.volumeMounts), ...parseCodebaseMounts(input.codebaseMounts) };
  checkNoNesting([...(fields.volumeMounts ?? []), ...(fields.codebaseMounts ?? [])].map((mount) => mount.path), "volumeMounts and codebaseMounts");
  return fields;
}

/** Cubicle's `runtime` extension of a create: `"container"` or `"microvm"`; absent = the template's. */
function runtimeField(value: unknown): { runtime?: "container" | "microvm" } {
  if (value === undefined || value === null) return {};
  if (value !== "container" && value !== "microvm") fail(`runtime must be "container" or "microvm", got ${JSON.stringify(value)?.slice(0, 40)}`);
  return { runtime: value };
}

export function parseTimeoutBody(body: unknown, field = "timeout"): number {
  const input = asObject(body, "the request body");
  if (input[field] === undefined) fail(`${field} is required (seconds)`);
  return parseTimeoutSec(input[field], field, 0);
}

/**
 * Decodes the doubly-encoded metadata filter exactly like upstream `parseFilters`: the query
 * layer already decoded once; unescape the whole value again, split on `&` and `=`, unescape parts.
 */
export function parseMetadataFilter(raw: string | undefined): Record<string, string> | undefined {
  if (raw === undefined || raw === "") return undefined;
  const whole = queryUnescape(raw);
  const out: Record<string, string> = {};
  for (const pair of whole.split("&")) {
    const parts = pair.split("=");
    if (parts.length !== 2) fail(`invalid metadata filter "${pair}": expected key=value pairs`);
    out[queryUnescape(parts[0]!)] = queryUnescape(parts[1]!);
  }
  return out;
}

function queryUnescape(value: string): string {
  try {
    return decodeURIComponent(value.replace(/\+/g, " "));
  } catch {
    fail(`invalid percent-encoding in "${value}"`);
  }
}

/**
 * One query parameter's value: a parameter given twice (`?limit=1&limit=2`) is refused instead
 * of reaching the parsers and the store as an array.
 */
export function singleQueryValue(query: Record<string, unknown> | undefined, name: string): string | undefined {
  const value = query?.[name];
  if (value === undefined) return undefined;
  if (typeof value !== "string") fail(`the query parameter ${name} may be given once`);
  return value;
}

export function parseStates(raw: string | string[] | undefined): SandboxState[] | undefined {
  if (raw === undefined) return undefined;
  const list = (Array.isArray(raw) ? raw : [raw]).flatMap((v) => v.split(",")).map((s) => s.trim()).filter(Boolean);
  for (const state of list) if (state !== "running" && state !== "paused") fail(`state must be running and/or paused, not "${state}"`);
  return list as SandboxState[];
}

export function parseLimit(raw: string | undefined): number {
  if (raw === undefined || raw === "") return 100;
  const limit = Number(raw);
  if (!Number.isInteger(limit) || limit < 1 || limit > 100) fail("limit must be a whole number from 1 to 100");
  return limit;
}

export function parseStartedAfter(raw: string | undefined): number | undefined {
  if (raw === undefined || raw === "") return undefined;
  const at = Date.parse(raw);
  if (Number.isNaN(at)) fail(`startedAfter must be an ISO 8601 time, not "${raw}"`);
  return at;
}

/** Paging cursor of `GET /v2/sandboxes`: the last sandbox's start time and id. */
export function encodeCursor(startedAt: number, sandboxId: string): string {
  return encodePageCursor(startedAt, sandboxId);
}

export function decodeCursor(raw: string | undefined): { startedAt: number; sandboxId: string } | undefined {
  const cursor = decodePageCursor(raw, (id) => /^[a-z0-9]+$/.test(id));
  return cursor && { startedAt: cursor.at, sandboxId: cursor.id };
}

/** An optional JSON object body (`{}`, empty or absent are all "no options"). */
export function parseBodyObject(body: unknown): Record<string, unknown> {
  return asObject(body, "the request body");
}

/** `memory` of pause / connect / resume: undefined = keep memory (the default). */
export function parseMemoryFlag(value: unknown): boolean | undefined {
  if (value === undefined || value === null) return undefined;
  return optionalBool(value, "memory", true);
}

/** Most sandboxes one fork request may make (the API spec's bound). */
export const MAX_FORK_COUNT = 100;

/** `SandboxForkRequest`: `{timeout?, count? 1–100}`. */
export function parseForkRequest(body: unknown, defaultTimeoutSec: number): { timeoutSec: number; count: number } {
  const input = asObject(body, "the request body");
  const count = input.count === undefined || input.count === null ? 1 : input.count;
  if (typeof count !== "number" || !Number.isInteger(count) || count < 1 || count > MAX_FORK_COUNT) fail(`count must be a whole number from 1 to ${MAX_FORK_COUNT}`);
  return { timeoutSec: parseTimeoutSec(input.timeout, "timeout", defaultTimeoutSec), count };
}
