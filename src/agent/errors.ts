/**
 * How the agent reports a failure: an errno (or Node argument error) turned into a CubicleError
 * code, so a 4xx for every failure the caller caused, 507 for a full disk, 500 only for genuine
 * faults; and for filesystem calls the Go-style text upstream envd writes
 * (`lstat /x: no such file or directory`).
 *
 * The shared table (src/shared/cubicle-error.ts, `errnoToCode`) covers the common errnos; the
 * agent meets more of them on user-chosen paths (a read-only /proc, a symlink loop, a busy
 * executable), so it keeps its own, wider one here.
 */
import { CubicleError, errnoName, errnoToCode, type ErrorCode } from "../shared/cubicle-error.js";

const agentErrnoCodes: Record<string, ErrorCode> = {
  EROFS: "permission_denied",
  ELOOP: "invalid_argument",
  ENXIO: "invalid_argument",
  ENODEV: "invalid_argument",
  EOVERFLOW: "invalid_argument",
  EFBIG: "insufficient_storage",
  ETXTBSY: "failed_precondition",
  EBUSY: "failed_precondition",
  EXDEV: "failed_precondition",
  ENOTEMPTY: "failed_precondition",
  EMLINK: "failed_precondition",
  EOPNOTSUPP: "failed_precondition",
  ENOTSUP: "failed_precondition",
  EMFILE: "resource_exhausted",
  ENFILE: "resource_exhausted",
  ENOMEM: "resource_exhausted",
  EAGAIN: "resource_exhausted",
  // Node's own argument checks, e.g. a path with a NUL byte that slipped past resolveUserPath.
  ERR_INVALID_ARG_VALUE: "invalid_argument",
  ERR_INVALID_ARG_TYPE: "invalid_argument",
};

/**
 * Anything thrown as a CubicleError, through the agent's errno table: what every request
 * handler answers with (CubicleError.from knows only the shared table).
 */
export function toCubicleError(reason: unknown): CubicleError {
  if (reason instanceof CubicleError) return reason;
  const code = fsErrorCode(errnoName(reason));
  if (code === undefined) return CubicleError.from(reason);
  return new CubicleError(code, reason instanceof Error ? reason.message : String(reason), { cause: reason });
}

/** The error code of an errno (or Node error code), if it has one; undefined means a genuine fault. */
export function fsErrorCode(errno: string | undefined): ErrorCode | undefined {
  if (errno === undefined) return undefined;
  return agentErrnoCodes[errno] ?? errnoToCode(errno);
}


const errnoDescriptions: Record<string, string> = {
  ENOENT: "no such file or directory",
  EACCES: "permission denied",
  EPERM: "operation not permitted",
  ENOTDIR: "not a directory",
  EISDIR: "is a directory",
  EEXIST: "file exists",
  ENOTEMPTY: "directory not empty",
  EXDEV: "invalid cross-device link",
  ELOOP: "too many levels of symbolic links",
  ENOSPC: "no space left on device",
  EDQUOT: "disk quota exceeded",
  EROFS: "read-only file system",
  EBUSY: "device or resource busy",
  ENAMETOOLONG: "file name too long",
  ETXTBSY: "text file busy",
  ENXIO: "no such device or address",
  EFBIG: "file too large",
  EMFILE: "too many open files",
  ENFILE: "too many open files in system",
  EINVAL: "invalid argument",
  ERR_INVALID_ARG_VALUE: "invalid argument",
  ERR_INVALID_ARG_TYPE: "invalid argument",
};

/** Go-style text of a failed syscall, e.g. `lstat /x: no such file or directory`. */
export function syscallErrorText(operation: string, target: string, reason: unknown): string {
  const errno = errnoName(reason);
  const text = (errno && errnoDescriptions[errno]) ?? (reason instanceof Error ? reason.message : String(reason));
  return `${operation} ${target}: ${text}`;
}

/**
 * A failed path operation as a CubicleError: `<prefix>: <op> <target>: <errno text>`, with the
 * code from the errno, or `fallback` when the errno means nothing the caller did.
 */
export function fsFailure(prefix: string, operation: string, target: string, reason: unknown, fallback: ErrorCode = "internal"): CubicleError {
  if (reason instanceof CubicleError) return reason;
  const code = fsErrorCode(errnoName(reason)) ?? fallback;
  return new CubicleError(code, `${prefix}: ${syscallErrorText(operation, target, reason)}`, { cause: reason });
}
