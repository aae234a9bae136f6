/**
 * Opening files on paths a sandbox user chose, without ever blocking the agent.
 *
 * The agent does its path work synchronously (as-user.ts explains why), so an `open` that
 * blocks stops every request of the sandbox: opening a FIFO for reading waits for a writer,
 * for writing waits for a reader, and a device may never end (`/dev/zero`). Only regular
 * files are read or written through the file API. The type is checked before the open
 * (stat), the open itself is non-blocking (O_NONBLOCK: a FIFO opens at once or fails with
 * ENXIO, fifo(7)), and the type is checked again on the descriptor (fstat), so a regular file
 * swapped for a FIFO between the stat and the open is refused too.
 *
 * O_NONBLOCK stays set on the descriptor; for a regular file it changes nothing (open(2):
 * "O_NONBLOCK ... has no effect for regular files and block devices").
 */
import fs from "node:fs";
import { CubicleError, errnoName } from "../../shared/cubicle-error.js";
import { fsFailure } from "../errors.js";

const { O_RDONLY, O_WRONLY, O_CREAT, O_TRUNC, O_NONBLOCK, O_NOCTTY } = fs.constants;

/** What a non-regular file is, for messages ("a named pipe (FIFO)"). */
export function describeFileType(stats: fs.Stats | fs.BigIntStats): string {
  if (stats.isFIFO()) return "a named pipe (FIFO)";
  if (stats.isSocket()) return "a socket";
  if (stats.isCharacterDevice()) return "a character device";
  if (stats.isBlockDevice()) return "a block device";
  if (stats.isDirectory()) return "a directory";
  if (stats.isSymbolicLink()) return "a symbolic link";
  return "not a regular file";
}

/** The 400 for a path that is not a regular file (a directory has its own, upstream, message). */
export function notRegularFile(target: string, stats: fs.Stats | fs.BigIntStats): CubicleError {
  if (stats.isDirectory()) return new CubicleError("invalid_argument", `path '${target}' is a directory`);
  return new CubicleError("invalid_argument", `path '${target}' is ${describeFileType(stats)}, not a regular file: only regular files can be read or written`);
}

function closeQuietly(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    // nothing to do
  }
}

/** Checks the opened descriptor is a regular file; closes it and throws otherwise. */
function checkDescriptor(fd: number, target: string): fs.Stats;
function checkDescriptor(fd: number, target: string, bigint: true): fs.BigIntStats;
function checkDescriptor(fd: number, target: string, bigint = false): fs.Stats | fs.BigIntStats {
  const stats = fs.fstatSync(fd, { bigint });
  if (stats.isFile()) return stats;
  closeQuietly(fd);
  throw notRegularFile(target, stats);
}

export interface OpenedFile<S = fs.Stats> {
  fd: number;
  stats: S;
}

/**
 * Opens an existing regular file for reading (symlinks followed, as `/files` does). Throws
 * CubicleError: not_found (ENOENT, ENOTDIR), invalid_argument for a directory or a special
 * file, and the mapped errno otherwise. Call inside runAsUser.
 */
export function openRegularFileForReading(target: string): OpenedFile {
  let stats: fs.Stats;
  try {
    stats = fs.statSync(target);
  } catch (reason) {
    const errno = errnoName(reason);
    if (errno === "ENOENT" || errno === "ENOTDIR") throw new CubicleError("not_found", `path '${target}' does not exist`, { cause: reason });
    throw fsFailure(`error checking if path exists '${target}'`, "stat", target, reason);
  }
  if (!stats.isFile()) throw notRegularFile(target, stats);
  let fd: number;
  try {
    fd = fs.openSync(target, O_RDONLY | O_NONBLOCK | O_NOCTTY);
  } catch (reason) {
    throw fsFailure(`error opening file '${target}'`, "open", target, reason);
  }
  return { fd, stats: checkDescriptor(fd, target) };
}

/**
 * Opens a regular file for writing, creating it (mode 0666 less the umask) or truncating it.
 * An existing directory or special file is refused before the open, and a special file that
 * appears in between is refused after it, without blocking (a FIFO without a reader: ENXIO).
 * The stats are the descriptor's (bigint: the file's identity for its metadata). Call inside
 * runAsUser.
 */
export function openRegularFileForWriting(target: string): OpenedFile<fs.BigIntStats> {
  let existing: fs.Stats | undefined;
  try {
    existing = fs.statSync(target);
  } catch (reason) {
    const errno = errnoName(reason);
    // A dangling symlink stats as ENOENT: open creates its target, as before.
    if (errno !== "ENOENT") throw fsFailure("error getting file info", "stat", target, reason);
  }
  if (existing && !existing.isFile()) throw notRegularFile(target, existing);
  let fd: number;
  try {
    fd = fs.openSync(target, O_WRONLY | O_CREAT | O_TRUNC | O_NONBLOCK | O_NOCTTY, 0o666);
  } catch (reason) {
    // ENXIO: a FIFO without a reader took the file's place after the stat.
    if (errnoName(reason) === "ENXIO") throw new CubicleError("invalid_argument", `path '${target}' is a named pipe (FIFO) or a device, not a regular file`, { cause: reason });
    if (errnoName(reason) === "ENOSPC" || errnoName(reason) === "EDQUOT") throw fsFailure("not enough inodes available", "open", target, reason);
    throw fsFailure("error opening file", "open", target, reason);
  }
  return { fd, stats: checkDescriptor(fd, target, true) };
}

/**
 * Reads a small regular file the agent itself relies on (/etc/passwd, /etc/group) that a
 * sandbox's root may have replaced with a FIFO or a device: such a file, or
 * one larger than `maxBytes`, is an error instead of a blocked or exhausted agent.
 */
export function readRegularFileSync(file: string, maxBytes: number): string {
  const fd = fs.openSync(file, O_RDONLY | O_NONBLOCK | O_NOCTTY);
  try {
    const stats = fs.fstatSync(fd);
    if (!stats.isFile()) throw new CubicleError("failed_precondition", `${file} is ${describeFileType(stats)}, not a regular file`);
    if (stats.size > maxBytes) throw new CubicleError("failed_precondition", `${file} is larger than ${maxBytes} bytes`);
    // One byte more than expected, to see the end in one read; grows if the file grew meanwhile.
    let buffer = Buffer.alloc(Math.min(stats.size + 1, maxBytes + 1));
    let length = 0;
    for (;;) {
      if (length === buffer.length) {
        if (length > maxBytes) throw new CubicleError("failed_precondition", `${file} is larger than ${maxBytes} bytes`);
        const grown = Buffer.alloc(Math.min(buffer.length * 2, maxBytes + 1));
        buffer.copy(grown);
        buffer = grown;
      }
      const read = fs.readSync(fd, buffer, length, buffer.length - length, null);
      if (read === 0) break;
      length += read;
    }
    if (length > maxBytes) throw new CubicleError("failed_precondition", `${file} is larger than ${maxBytes} bytes`);
    return buffer.subarray(0, length).toString("utf8");
  } finally {
    closeQuietly(fd);
  }
}
