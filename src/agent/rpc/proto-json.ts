/**
 * Reading proto3 JSON request messages by hand (e2b-wire-protocol.md §5.4): fields by their
 * lowerCamelCase or proto name, 32-bit ints as numbers or strings, bytes as base64 (standard or
 * URL-safe), enums by name or number. Anything malformed is an `invalid_argument`.
 */
import { CubicleError } from "../../shared/cubicle-error.js";

export type JsonObject = Record<string, unknown>;

function invalid(message: string): CubicleError {
  return new CubicleError("invalid_argument", message);
}

/** The value of a field by its JSON name or, failing that, its proto name. */
export function field(message: JsonObject, jsonName: string, protoName = jsonName): unknown {
  const v = message[jsonName];
  return v === undefined || v === null ? (message[protoName] ?? undefined) : v;
}

export function optionalObject(message: JsonObject, jsonName: string, protoName?: string): JsonObject | undefined {
  const v = field(message, jsonName, protoName);
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "object" || Array.isArray(v)) throw invalid(`field "${jsonName}" must be an object`);
  return v as JsonObject;
}

export function optionalString(message: JsonObject, jsonName: string, protoName?: string): string | undefined {
  const v = field(message, jsonName, protoName);
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "string") throw invalid(`field "${jsonName}" must be a string`);
  return v;
}

export function optionalBool(message: JsonObject, jsonName: string, protoName?: string): boolean | undefined {
  const v = field(message, jsonName, protoName);
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "boolean") throw invalid(`field "${jsonName}" must be a boolean`);
  return v;
}

export function optionalUint32(message: JsonObject, jsonName: string, protoName?: string): number | undefined {
  const v = field(message, jsonName, protoName);
  if (v === undefined || v === null) return undefined;
  const n = typeof v === "string" && /^\d+$/.test(v) ? Number(v) : v;
  if (typeof n !== "number" || !Number.isInteger(n) || n < 0 || n > 0xffffffff) throw invalid(`field "${jsonName}" must be a uint32`);
  return n;
}

export function stringArray(message: JsonObject, jsonName: string, protoName?: string): string[] {
  const v = field(message, jsonName, protoName);
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v) || v.some((item) => typeof item !== "string")) throw invalid(`field "${jsonName}" must be a list of strings`);
  return v as string[];
}

export function stringMap(message: JsonObject, jsonName: string, protoName?: string): Record<string, string> {
  const v = field(message, jsonName, protoName);
  if (v === undefined || v === null) return {};
  if (typeof v !== "object" || Array.isArray(v)) throw invalid(`field "${jsonName}" must be a map of strings`);
  const out: Record<string, string> = {};
  for (const [key, value] of Object.entries(v as JsonObject)) {
    if (typeof value !== "string") throw invalid(`field "${jsonName}.${key}" must be a string`);
    out[key] = value;
  }
  return out;
}

/** `bytes` fields: standard base64 with or without padding, or URL-safe base64. */
export function optionalBytes(message: JsonObject, jsonName: string, protoName?: string): Buffer | undefined {
  const v = field(message, jsonName, protoName);
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "string" || !/^[A-Za-z0-9+/_-]*={0,2}$/.test(v)) throw invalid(`field "${jsonName}" must be base64`);
  return Buffer.from(v.replace(/-/g, "+").replace(/_/g, "/"), "base64");
}

/** An enum given by value name or number; returns the number. */
export function optionalEnum(message: JsonObject, jsonName: string, values: Record<string, number>, protoName?: string): number | undefined {
  const v = field(message, jsonName, protoName);
  if (v === undefined || v === null) return undefined;
  if (typeof v === "number" && Number.isInteger(v)) return v;
  if (typeof v === "string" && Object.prototype.hasOwnProperty.call(values, v)) return values[v];
  throw invalid(`field "${jsonName}" has an unknown value ${JSON.stringify(v)}`);
}

/** `bytes` for a response: standard base64 with padding. */
export function bytesToJson(data: Uint8Array): string {
  return Buffer.from(data.buffer, data.byteOffset, data.length).toString("base64");
}
