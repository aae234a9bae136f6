import { randomBytes } from "node:crypto";
import type { apiSchema } from "../protocol/index.js";
import { CubicleError } from "../shared/cubicle-error.js";

/** The top-level directories of a Linux host whose paths never belong in a response. */
const HOST_ROOTS = ["tmp", "var", "run", "proc", "sys", "dev", "etc", "usr", "home", "root", "opt", "srv", "mnt", "media", "boot", "lib", "lib32", "lib64", "bin", "sbin", "snap", "nix", "work", "data"];
/** What ends a path inside a message: whitespace, quotes, brackets, list punctuation, and ": ". */
const PATH_TAIL = "(?:[^\\s'\"`,;)\\]}>:]|:(?!\\s|$))*";
const hostRootPattern = new RegExp(`(?<![\\w.~-])/(?:${HOST_ROOTS.join("|")})(?![\\w.-])${PATH_TAIL}`, "g");
const REDACTED = "<host path>";
/** Longest message a response carries; causes (runc's stderr …) can be pages long. */
const MAX_MESSAGE_CHARS = 1000;

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/**
 * Removes what a client must not learn about the host from a message: absolute paths under the
 * given directories (the state and template directories, wherever they are) and under the
 * host's usual top-level directories, and stack frames. Sandbox ids, URLs' paths and relative
 * names stay.
 */
export function redactHostPaths(message: string, hostDirs: readonly string[] = []): string {
  let out = message.replace(/\n\s+at .*/g, "");
  for (const dir of hostDirs) {
    const trimmed = dir.replace(/\/+$/, "");
    if (trimmed.length < 2 || !trimmed.startsWith("/")) continue;
    out = out.replace(new RegExp(`${escapeRegExp(trimmed)}(?![\\w.-])${PATH_TAIL}`, "g"), REDACTED);
  }
  out = out.replace(hostRootPattern, REDACTED);
  return out.length > MAX_MESSAGE_CHARS ? out.slice(0, MAX_MESSAGE_CHARS) + "…" : out;
}

/** What a 5xx says instead of its cause: what the client can do, per status. */
const genericServerMessages: Record<number, string> = {
  500: "internal error",
  501: "not implemented by this server",
  502: "a sandbox did not answer as expected",
  503: "the server cannot serve this right now; retry in a moment",
  504: "the operation timed out on the server; retry",
  507: "the server has not enough disk space for this: free some space (delete snapshots or paused sandboxes) and retry",
};

export interface PublicError {
  status: number;
  body: apiSchema.Error;
  /** Set for 5xx: the id in the message, to log next to the real cause. */
  errorId?: string;
}

/**
 * The E2B body `{code, message}` of an error, safe to send: a 4xx keeps its message (it says what
 * was wrong with the request) with host paths and stack frames removed; a 5xx says only what the
 * client can do and carries a short error id, which the caller logs with the real cause.
 */
export function publicErrorBody(error: CubicleError, hostDirs: readonly string[] = []): PublicError {
  const status = error.httpStatus;
  if (status < 500) return { status, body: { code: status, message: redactHostPaths(error.message, hostDirs) } };
  const errorId = randomBytes(4).toString("hex");
  const generic = genericServerMessages[status] ?? "server error";
  return { status, body: { code: status, message: `${generic} (error id ${errorId}; the server log has the cause)` }, errorId };
}
