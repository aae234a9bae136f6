import type { ResultOutput } from "./types.js";

/** Jupyter mimetype → E2B result field, as the upstream server maps them (template/server/api/models/result.py). */
const fieldByMimetype: Record<string, keyof ResultOutput> = {
  "text/plain": "text",
  "text/html": "html",
  "text/markdown": "markdown",
  "image/svg+xml": "svg",
  "image/png": "png",
  "image/jpeg": "jpeg",
  "application/pdf": "pdf",
  "text/latex": "latex",
  "application/json": "json",
  "application/javascript": "javascript",
  "e2b/data": "data",
  "e2b/chart": "chart",
};

/** Binary formats travel as base64; some kernels end it with the newline `b2a_base64` adds. */
const base64Mimetypes = new Set(["image/png", "image/jpeg", "application/pdf"]);

/** Mimetypes whose value is JSON itself rather than text. */
const structuredMimetypes = new Set(["application/json", "e2b/data", "e2b/chart"]);

/**
 * Turns an `execute_result` / `display_data` mime bundle (from any kernel) into a `result` line.
 * Mimetypes without an E2B field, and values a field cannot hold (a text field that is not text,
 * a chart without a type), go to `extra` under their mimetype, as upstream keeps unknown formats.
 */
export function resultFromMimeBundle(bundle: Record<string, unknown>, isMainResult: boolean): ResultOutput {
  const result: ResultOutput = { type: "result", is_main_result: isMainResult };
  const fields = result as unknown as Record<string, unknown>;
  const extra: Record<string, unknown> = {};
  for (const [mimetype, raw] of Object.entries(bundle)) {
    const field = fieldByMimetype[mimetype];
    let value = field && structuredMimetypes.has(mimetype) ? raw : joinLines(raw);
    if (base64Mimetypes.has(mimetype) && typeof value === "string") value = value.trimEnd();
    if (field && fits(mimetype, value)) fields[field] = value;
    else extra[mimetype] = raw;
  }
  // Upstream strips the quotes Python's repr puts around a string result.
  const text = result.text;
  if (text !== undefined && text.length >= 2 && text.startsWith("'") && text.endsWith("'")) result.text = text.slice(1, -1);
  if (Object.keys(extra).length > 0) result.extra = extra;
  return result;
}

function fits(mimetype: string, value: unknown): boolean {
  switch (mimetype) {
    case "application/json":
      return value !== undefined;
    case "e2b/data":
      return isRecord(value) || typeof value === "string";
    case "e2b/chart":
      // The SDK hands `chart` to users as a typed chart: one without a type would only mislead.
      return isRecord(value) && typeof value.type === "string";
    default:
      return typeof value === "string";
  }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** nbformat allows multi-line strings as arrays of lines; kernels may send either. */
function joinLines(value: unknown): unknown {
  return Array.isArray(value) && value.every((line) => typeof line === "string") ? value.join("") : value;
}
