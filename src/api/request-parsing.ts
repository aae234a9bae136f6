import { CubicleError } from "../shared/cubicle-error.js";
import { decodePageCursor, encodePageCursor } from "../shared/page-cursor.js";
import type { SandboxState } from "../store/types.js";
import type { CreateSandboxRequest } from "../core/types.js";
import { MAX_TIMEOUT_SEC } from "../core/sandbox-manager.js";

function fail(message: string): never {
  throw new CubicleError("invalid_argument", message);
}

function asObject(body: unknown, what: string): Record<string, unknown> {
  if (body === undefined || body === null || body === "") return {};
  if (typeof body !== "object" || Array.isArray(body)) fail(`${what} must be a JSON object`);
  return body as Record<string, unknown>;
}

function stringMap(value: unknown, field: string): Record<string, string> {
  if (value === undefined || value === null) return {};
  if (typeof value !== "object" || Array.isArray(value)) fail(`${field} must be an object of string values`);
  const out: Record<string, string> = {};
  for (const [key, v] of Object.entries(value as Record<string, unknown>)) {
    if (typeof v !== "string") fail(`${field}.${key} must be a string`);
    out[key] = v;
  }
  return out;
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

function optionalPositiveInt(value: unknown, field: string, min: number): number | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "number" || !Number.isInteger(value) || value < min) fail(`${field} must be a whole number of at least ${min}`);
  return value;
}

/**
 * `NewSandbox` (v1, `POST /sandboxes`) and `NewSandboxV2` (`POST /v2/sandboxes`). v2 creates are
 * always secure and default to the server timeout; v1 honours `secure` and defaults to 15 s.
 */
export function parseCreateRequest(body: unknown, version: 1 | 2, defaultTimeoutSec: number): CreateSandboxRequest {
  const input = asObject(body, "the request body");
  const templateId = input.templateID;
  if (typeof templateId !== "string" || templateId.trim() === "") fail("templateID is required (a template id, alias or snapshot id)");
  const autoResume = input.autoResume;
  const lifecycle = asObject(input.lifecycle, "lifecycle");
  const autoResumeEnabled =
    autoResume && typeof autoResume === "object" ? optionalBool((autoResume as Record<string, unknown>).enabled, "autoResume.enabled", false) : optionalBool(lifecycle.autoResume, "lifecycle.autoResume", false);
  const network = input.network;
  if (network !== undefined && network !== null && (typeof network !== "object" || Array.isArray(network))) fail("network must be an object");
  return {
    templateId: templateId.trim(),
    timeoutSec: parseTimeoutSec(input.timeout, "timeout", version === 2 ? defaultTimeoutSec : 15),
    // v2 creates are always secure; the field is still checked so a typo is not silently ignored.
    secure: optionalBool(input.secure, "secure", false) || version === 2,
    allowInternetAccess: optionalBool(input.allow_internet_access ?? input.allowInternetAccess, "allow_internet_access", true),
    metadata: stringMap(input.metadata, "metadata"),
    envVars: stringMap(input.envVars, "envVars"),
    autoPause: optionalBool(input.autoPause, "autoPause", false) || lifecycle.onTimeout === "pause",
    autoResume: autoResumeEnabled,
    networkConfig: (network as Record<string, unknown> | undefined) ?? undefined,
    cpuCount: optionalPositiveInt(input.cpuCount, "cpuCount", 1),
    memoryMB: optionalPositiveInt(input.memoryMB, "memoryMB", 128),
  };
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
