/**
 * The one error type of Cubicle. A code maps to an HTTP status (for E2B REST bodies
 * `{code, message}`) and to a Connect code (for envd RPCs), in one table.
 */
export type ErrorCode =
  | "invalid_argument"
  | "unauthenticated"
  | "permission_denied"
  | "not_found"
  | "already_exists"
  | "conflict"
  | "failed_precondition"
  | "resource_exhausted"
  | "insufficient_storage"
  | "deadline_exceeded"
  | "canceled"
  | "unimplemented"
  | "unavailable"
  | "bad_gateway"
  | "internal";

interface CodeMapping {
  httpStatus: number;
  connectCode: string;
}

const codeTable: Record<ErrorCode, CodeMapping> = {
  invalid_argument: { httpStatus: 400, connectCode: "invalid_argument" },
  unauthenticated: { httpStatus: 401, connectCode: "unauthenticated" },
  permission_denied: { httpStatus: 403, connectCode: "permission_denied" },
  not_found: { httpStatus: 404, connectCode: "not_found" },
  already_exists: { httpStatus: 409, connectCode: "already_exists" },
  conflict: { httpStatus: 409, connectCode: "aborted" },
  failed_precondition: { httpStatus: 400, connectCode: "failed_precondition" },
  resource_exhausted: { httpStatus: 429, connectCode: "resource_exhausted" },
  insufficient_storage: { httpStatus: 507, connectCode: "resource_exhausted" },
  deadline_exceeded: { httpStatus: 504, connectCode: "deadline_exceeded" },
  canceled: { httpStatus: 499, connectCode: "canceled" },
  unimplemented: { httpStatus: 501, connectCode: "unimplemented" },
  unavailable: { httpStatus: 503, connectCode: "unavailable" },
  bad_gateway: { httpStatus: 502, connectCode: "unavailable" },
  internal: { httpStatus: 500, connectCode: "internal" },
};

export class CubicleError extends Error {
  readonly code: ErrorCode;
  readonly details?: Record<string, unknown>;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; details?: Record<string, unknown> }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = "CubicleError";
    this.code = code;
    this.details = options?.details;
  }

  get httpStatus(): number {
    return codeTable[this.code].httpStatus;
  }

  get connectCode(): string {
    return codeTable[this.code].connectCode;
  }

  /** The E2B REST error body: `code` equals the HTTP status (the SDK branches on it). */
  toE2bBody(): { code: number; message: string } {
    return { code: this.httpStatus, message: this.message };
  }

  /** Turns anything thrown into a CubicleError, keeping the original as the cause. */
  static from(reason: unknown, fallback: ErrorCode = "internal"): CubicleError {
    if (reason instanceof CubicleError) return reason;
    if (reason instanceof Error) {
      const errno = errnoName(reason);
      const mapped = errno ? errnoToCode(errno) : undefined;
      return new CubicleError(mapped ?? fallback, reason.message, { cause: reason });
    }
    return new CubicleError(fallback, String(reason), { cause: reason });
  }
}

const EDQUOT_LINUX = 122;

/**
 * The errno name of a Node error (ENOENT …), or its other string code. libuv has no name for
 * EDQUOT (a quota is full: a sandbox's disk, the image budget); it is named here.
 */
export function errnoName(reason: unknown): string | undefined {
  const { code, errno } = (reason ?? {}) as NodeJS.ErrnoException;
  if (errno === -EDQUOT_LINUX) return "EDQUOT";
  return typeof code === "string" ? code : undefined;
}

/** Maps a Node errno string (ENOENT, EACCES …) to an error code, if it has an obvious one. */
export function errnoToCode(errno: string): ErrorCode | undefined {
  switch (errno) {
    case "ENOENT":
    case "ENOTDIR":
      return "not_found";
    case "EEXIST":
      return "already_exists";
    case "EACCES":
    case "EPERM":
      return "permission_denied";
    case "ENOSPC":
    case "EDQUOT":
      return "insufficient_storage";
    case "EINVAL":
    case "EISDIR":
    case "ENAMETOOLONG":
      return "invalid_argument";
    default:
      return undefined;
  }
}
