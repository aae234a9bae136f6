/**
 * The unary filesystem operations of envd (wire-protocol §8.2), each run with the selected
 * user's permissions. Error codes and messages follow upstream envd's
 * `internal/services/filesystem`.
 */
import fs from "node:fs";
import path from "node:path";
import type { AgentUser } from "../users.js";
import { resolveUserPath } from "../users.js";
import { runAsUser } from "../as-user.js";
import { CubicleError, errnoName } from "../../shared/cubicle-error.js";
import { entryInfoFromStats, readEntryInfo, baseName, type EntryInfoJson } from "./entry-info.js";
import { readMetadata } from "./file-metadata.js";
import { fsFailure, syscallErrorText } from "../errors.js";

/** Resolves a request path for `user` (`~`, relative → home, empty → home). */
export function resolveRequestPath(requested: unknown, user: AgentUser): string {
  return resolveUserPath(typeof requested === "string" ? requested : "", user);
}

function isErrno(reason: unknown, ...codes: string[]): boolean {
  const code = errnoName(reason);
  return code !== undefined && codes.includes(code);
}

/**
 * Adds the file's metadata (its `user.e2b.*` xattrs) to an entry. Reads `actualPath` (default:
 * the entry's path) without following a final symlink; call it with the asking user's
 * credentials (inside `runAsUser`).
 */
export function withMetadata(entry: EntryInfoJson, actualPath = entry.path): EntryInfoJson {
  const metadata = readMetadata(actualPath);
  if (metadata) entry.metadata = metadata;
  return entry;
}

export function statPath(user: AgentUser, requested: unknown): { entry: EntryInfoJson } {
  const target = resolveRequestPath(requested, user);
  const entry = runAsUser(user, () => {
    let stats: fs.BigIntStats;
    try {
      stats = fs.lstatSync(target, { bigint: true });
    } catch (reason) {
      if (isErrno(reason, "ENOENT", "ENOTDIR")) {
        throw new CubicleError("not_found", `file not found: ${syscallErrorText("lstat", target, reason)}`, { cause: reason });
      }
      throw fsFailure("error getting file info", "lstat", target, reason);
    }
    return withMetadata(entryInfoFromStats(target, stats));
  });
  return { entry };
}

/** Entries one ListDir may return (~250 bytes of JSON each). */
export const maxListedEntries = 100_000;
/** How long one slice of a tree walk (ListDir, Remove) may hold the event loop. */
const walkSliceMs = 5;

/** Runs `step` as the user in slices of walkSliceMs until it reports it is done, yielding in between. */
async function inSlices(user: AgentUser, step: () => boolean): Promise<void> {
  for (;;) {
    const done = runAsUser(user, () => {
      const deadline = performance.now() + walkSliceMs;
      while (performance.now() < deadline) if (step()) return true;
      return false;
    });
    if (done) return;
    await new Promise((resolve) => setImmediate(resolve));
  }
}

/**
 * ListDir: entries to `depth` levels, like Go's filepath.WalkDir (lexical order, depth first,
 * symlinks not followed). The walk runs in slices, so a deep listing of a big tree does not
 * hold up other requests; more than maxListedEntries is failed_precondition.
 */
export async function listDirectory(user: AgentUser, requested: unknown, requestedDepth: unknown, maxEntries = maxListedEntries): Promise<{ entries: EntryInfoJson[] }> {
  let depth = Number(requestedDepth ?? 0);
  if (!Number.isFinite(depth) || depth <= 0) depth = 1; // upstream: 0 means the directory itself
  const requestedPath = resolveRequestPath(requested, user);

  const resolved = runAsUser(user, () => {
    let resolved: string;
    try {
      resolved = fs.realpathSync.native(requestedPath);
    } catch (reason) {
      if (isErrno(reason, "ENOENT", "ENOTDIR")) {
        throw new CubicleError("not_found", `directory not found: ${syscallErrorText("lstat", requestedPath, reason)}`, { cause: reason });
      }
      if (isErrno(reason, "ELOOP")) {
        throw new CubicleError("invalid_argument", `cyclic symlink or chain >255 links at "${requestedPath}"`, { cause: reason });
      }
      throw fsFailure("error resolving symlink", "lstat", requestedPath, reason);
    }
    let stats: fs.Stats;
    try {
      stats = fs.statSync(resolved);
    } catch (reason) {
      throw fsFailure("error getting file info", "stat", resolved, reason);
    }
    if (!stats.isDirectory()) throw new CubicleError("invalid_argument", `path is not a directory: ${requestedPath}`);
    return resolved;
  });

  const collected: EntryInfoJson[] = [];
  // Entries are reported under the requested path even when it is a symlink (§8.2).
  const stack: Array<{ directory: string; reported: string; level: number; names?: string[]; next: number }> = [
    { directory: resolved, reported: requestedPath, level: 1, next: 0 },
  ];
  await inSlices(user, () => {
    const frame = stack[stack.length - 1];
    if (!frame) return true;
    if (!frame.names) {
      try {
        frame.names = fs.readdirSync(frame.directory).sort();
      } catch (reason) {
        if (frame.level === 1) throw fsFailure("error reading directory", "open", frame.directory, reason);
        stack.pop(); // an unreadable or vanished subdirectory: list what the user can see
        return false;
      }
    }
    if (frame.next >= frame.names.length) {
      stack.pop();
      return false;
    }
    const name = frame.names[frame.next++]!;
    const actual = path.join(frame.directory, name);
    const reported = path.join(frame.reported, name);
    let entryStats: fs.BigIntStats;
    try {
      entryStats = fs.lstatSync(actual, { bigint: true });
    } catch {
      return false;
    }
    if (collected.length >= maxEntries) {
      throw new CubicleError("failed_precondition", `more than ${maxEntries} entries under ${requestedPath}: list it with a smaller depth`);
    }
    collected.push(withMetadata(entryInfoFromStats(reported, entryStats), actual));
    if (entryStats.isDirectory() && frame.level < depth) stack.push({ directory: actual, reported, level: frame.level + 1, next: 0 });
    return false;
  });

  return { entries: collected };
}

export function makeDirectory(user: AgentUser, requested: unknown): { entry: EntryInfoJson } {
  const target = resolveRequestPath(requested, user);
  const entry = runAsUser(user, () => {
    let existing: fs.Stats | undefined;
    try {
      existing = fs.statSync(target);
    } catch (reason) {
      if (!isErrno(reason, "ENOENT")) throw fsFailure("error getting file info", "stat", target, reason);
    }
    if (existing?.isDirectory()) throw new CubicleError("already_exists", `directory already exists: ${target}`);
    if (existing) throw new CubicleError("invalid_argument", `path already exists but it is not a directory: ${target}`);
    try {
      // Created as the user: every new directory on the way is owned by them.
      ensureDirectories(target);
    } catch (reason) {
      if (isErrno(reason, "ENOTDIR", "EEXIST")) {
        throw new CubicleError("invalid_argument", `error creating directory: ${syscallErrorText("mkdir", target, reason)}`, { cause: reason });
      }
      throw fsFailure("error creating directory", "mkdir", target, reason);
    }
    try {
      return readEntryInfo(target);
    } catch {
      return { name: baseName(target), type: "FILE_TYPE_DIRECTORY", path: target } as EntryInfoJson;
    }
  });
  return { entry };
}

/**
 * Creates `directory` and missing parents as the user (call inside `runAsUser`). Throws the
 * errno error of the step that failed: Node's recursive mkdir reports some failures below the
 * deepest existing parent (EROFS, for one) as ENOENT, so that step is retried alone to learn why.
 */
export function ensureDirectories(directory: string): void {
  try {
    fs.mkdirSync(directory, { recursive: true });
  } catch (reason) {
    if (!isErrno(reason, "ENOENT")) throw reason;
    let missing = directory;
    for (let parent = path.dirname(missing); parent !== missing && !fs.existsSync(parent); parent = path.dirname(parent)) missing = parent;
    fs.mkdirSync(missing); // throws the real reason
    fs.mkdirSync(directory, { recursive: true }); // it was a race: try again
  }
}

export function movePath(user: AgentUser, requestedSource: unknown, requestedDestination: unknown): { entry: EntryInfoJson } {
  const source = resolveRequestPath(requestedSource, user);
  const destination = resolveRequestPath(requestedDestination, user);
  const entry = runAsUser(user, () => {
    try {
      ensureDirectories(path.dirname(destination));
    } catch (reason) {
      throw fsFailure("error ensuring directories", "mkdir", path.dirname(destination), reason);
    }
    try {
      fs.renameSync(source, destination);
    } catch (reason) {
      if (isErrno(reason, "ENOENT")) {
        throw new CubicleError("not_found", `source file not found: ${syscallErrorText("rename", `${source} ${destination}`, reason)}`, {
          cause: reason,
        });
      }
      throw fsFailure("error renaming", "rename", `${source} ${destination}`, reason);
    }
    return withMetadata(entryInfoFromStats(destination, fs.lstatSync(destination, { bigint: true })));
  });
  return { entry };
}

/**
 * Remove, like upstream's os.RemoveAll: recursive, and a missing path is success. A directory
 * is removed in slices (depth first), so deleting a big tree does not hold up other requests.
 */
export async function removePath(user: AgentUser, requested: unknown): Promise<Record<string, never>> {
  const target = resolveRequestPath(requested, user);
  const fail = (operation: string, at: string, reason: unknown) => fsFailure("error removing file or directory", operation, at, reason);
  const stack: Array<{ directory: string; names?: string[]; next: number }> = [];
  runAsUser(user, () => {
    let stats: fs.Stats;
    try {
      stats = fs.lstatSync(target);
    } catch (reason) {
      if (isErrno(reason, "ENOENT")) return;
      throw fail("lstat", target, reason);
    }
    if (!stats.isDirectory()) {
      try {
        fs.unlinkSync(target);
      } catch (reason) {
        if (!isErrno(reason, "ENOENT")) throw fail("unlinkat", target, reason);
      }
      return;
    }
    stack.push({ directory: target, next: 0 });
  });
  await inSlices(user, () => {
    const frame = stack[stack.length - 1];
    if (!frame) return true;
    if (!frame.names) {
      try {
        frame.names = fs.readdirSync(frame.directory);
      } catch (reason) {
        if (!isErrno(reason, "ENOENT")) throw fail("open", frame.directory, reason);
        frame.names = [];
      }
    }
    if (frame.next >= frame.names.length) {
      stack.pop();
      try {
        fs.rmdirSync(frame.directory);
      } catch (reason) {
        if (!isErrno(reason, "ENOENT")) throw fail("unlinkat", frame.directory, reason);
      }
      return false;
    }
    const child = path.join(frame.directory, frame.names[frame.next++]!);
    let stats: fs.Stats;
    try {
      stats = fs.lstatSync(child);
    } catch (reason) {
      if (isErrno(reason, "ENOENT")) return false;
      throw fail("lstat", child, reason);
    }
    if (stats.isDirectory()) {
      stack.push({ directory: child, next: 0 });
      return false;
    }
    try {
      fs.unlinkSync(child);
    } catch (reason) {
      if (!isErrno(reason, "ENOENT")) throw fail("unlinkat", child, reason);
    }
    return false;
  });
  return {};
}
