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

const structuredMimetypes = new Set(["application/json", "e2b/data", "e2b/chart"]);

/** Turns an `execute_result` / `display_data` mime bundle into a `result` line. */
export function resultFromMimeBundle(bundle: Record<string, unknown>, isMainResult: boolean): ResultOutput {
  const result: ResultOutput = { type: "result", is_main_result: isMainResult };
  const extra: Record<string, unknown> = {};
  for (const [mimetype, value] of Object.entries(bundle)) {
    const field = fieldByMimetype[mimetype];
    if (field) (result as unknown as Record<string, unknown>)[field] = structuredMimetypes.has(mimetype) ? value : joinLines(value);
    else extra[mimetype] = value;
  }
  // Upstream strips the quotes Python's repr puts around a string result.
  const text = result.text;
  if (text !== undefined && text.length >= 2 && text.startsWith("'") && text.endsWith("'")) result.text = text.slice(1, -1);
  if (Object.keys(extra).length > 0) result.extra = extra;
  return result;
}

/** nbformat allows multi-line strings as arrays of lines; kernels may send either. */
function joinLines(value: unknown): unknown {
  return Array.isArray(value) && value.every((line) => typeof line === "string") ? value.join("") : value;
}
