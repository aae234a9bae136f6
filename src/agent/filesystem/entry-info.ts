/**
 * envd's `EntryInfo` in proto3 JSON (wire-protocol §8.1), built the way upstream's
 * `filesystem.GetEntryInfo` builds it: from lstat, symlinks reported with their target's type
 * and permission bits, `permissions` formatted like Go's `os.FileMode.String()`.
 */
import fs from "node:fs";
import path from "node:path";
import type { filesystemMessages } from "../../protocol/index.js";
import { readUserTableLines } from "../users.js";

/** The names of `filesystem.FileType` (src/protocol/spec/filesystem.proto). */
export type FileTypeName = filesystemMessages.FileType;

export interface EntryInfoJson {
  name: string;
  type: FileTypeName;
  path: string;
  /** int64 as a JSON string. */
  size: string;
  mode: number;
  permissions: string;
  owner: string;
  group: string;
  /** google.protobuf.Timestamp as RFC 3339. */
  modifiedTime?: string;
  symlinkTarget?: string;
  metadata?: Record<string, string>;
}

/** Builds the EntryInfo of `absolutePath` without following a final symlink. Throws errno errors. */
export function readEntryInfo(absolutePath: string): EntryInfoJson {
  return entryInfoFromStats(absolutePath, fs.lstatSync(absolutePath, { bigint: true }));
}

export function entryInfoFromStats(absolutePath: string, stats: fs.BigIntStats): EntryInfoJson {
  const mode = Number(stats.mode);
  let type = fileTypeOfMode(mode);
  let permissionBits = mode & 0o777;
  let symlinkTarget: string | undefined;

  if (stats.isSymbolicLink()) {
    // Upstream: EvalSymlinks, falling back to the link's own path when it cannot be resolved;
    // the reported type and mode are the target's, UNSPECIFIED/0 for a dangling link.
    try {
      symlinkTarget = fs.realpathSync.native(absolutePath);
    } catch {
      symlinkTarget = absolutePath;
    }
    try {
      const targetMode = Number(fs.statSync(absolutePath, { bigint: true }).mode);
      type = fileTypeOfMode(targetMode);
      permissionBits = targetMode & 0o777;
    } catch {
      type = "FILE_TYPE_UNSPECIFIED";
      permissionBits = 0;
    }
  }

  const entry: EntryInfoJson = {
    name: baseName(absolutePath),
    type,
    path: absolutePath,
    size: stats.size.toString(),
    mode: permissionBits,
    permissions: goFileModeString(mode),
    owner: userNameOf(Number(stats.uid)),
    group: groupNameOf(Number(stats.gid)),
    modifiedTime: timestampFromNs(stats.mtimeNs),
  };
  if (symlinkTarget !== undefined) entry.symlinkTarget = symlinkTarget;
  return entry;
}

/** Go's `FileInfo.Name()`: the last element, "/" for the root. */
export function baseName(absolutePath: string): string {
  return path.basename(absolutePath) || "/";
}

function fileTypeOfMode(mode: number): FileTypeName {
  switch (mode & fs.constants.S_IFMT) {
    case fs.constants.S_IFREG:
      return "FILE_TYPE_FILE";
    case fs.constants.S_IFDIR:
      return "FILE_TYPE_DIRECTORY";
    case fs.constants.S_IFLNK:
      return "FILE_TYPE_SYMLINK";
    default:
      return "FILE_TYPE_UNSPECIFIED";
  }
}

/**
 * Go's `os.FileMode.String()` for a Linux st_mode: the type letters in Go's order
 * ("dalTLDpSugct?", '-' when none) followed by rwxrwxrwx. E.g. `-rw-r--r--`, `drwxr-xr-x`,
 * `Lrwxrwxrwx` (symlink), `Dcrw-rw-rw-` (character device), `dtrwxrwxrwx` (sticky dir).
 */
export function goFileModeString(mode: number): string {
  const format = mode & fs.constants.S_IFMT;
  const flags: Array<[boolean, string]> = [
    [format === fs.constants.S_IFDIR, "d"],
    [format === fs.constants.S_IFLNK, "L"],
    [format === fs.constants.S_IFBLK || format === fs.constants.S_IFCHR, "D"],
    [format === fs.constants.S_IFIFO, "p"],
    [format === fs.constants.S_IFSOCK, "S"],
    [(mode & 0o4000) !== 0, "u"],
    [(mode & 0o2000) !== 0, "g"],
    [format === fs.constants.S_IFCHR, "c"],
    [(mode & 0o1000) !== 0, "t"],
  ];
  let letters = flags.filter(([set]) => set).map(([, letter]) => letter).join("");
  if (letters === "") letters = "-";
  const rwx = "rwxrwxrwx";
  let permissions = "";
  for (let bit = 0; bit < 9; bit++) permissions += mode & (1 << (8 - bit)) ? rwx[bit] : "-";
  return letters + permissions;
}

/** RFC 3339 with 0, 3, 6 or 9 fractional digits, as protobuf's JSON mapping writes Timestamps. */
export function timestampFromNs(ns: bigint): string | undefined {
  if (ns === 0n) return undefined;
  const seconds = ns / 1_000_000_000n;
  let nanos = ns % 1_000_000_000n;
  let wholeSeconds = seconds;
  if (nanos < 0n) {
    nanos += 1_000_000_000n;
    wholeSeconds -= 1n;
  }
  const base = new Date(Number(wholeSeconds) * 1000).toISOString().replace(/\.\d{3}Z$/, "");
  if (nanos === 0n) return `${base}Z`;
  const digits = nanos.toString().padStart(9, "0");
  if (nanos % 1_000_000n === 0n) return `${base}.${digits.slice(0, 3)}Z`;
  if (nanos % 1_000n === 0n) return `${base}.${digits.slice(0, 6)}Z`;
  return `${base}.${digits}Z`;
}

interface IdNameTable {
  mtimeMs: number;
  checkedAtMs: number;
  names: Map<number, string>;
}

const idTables = new Map<string, IdNameTable>();
/** A listing names the owner of every entry: the file's mtime is looked at this often, not each time. */
const recheckMs = 1000;

/** id → name from a passwd/group style file, re-read when the file changes. */
function nameOfId(file: string, id: number): string {
  let table = idTables.get(file);
  const now = performance.now();
  if (table && now - table.checkedAtMs < recheckMs) return table.names.get(id) ?? String(id);
  let mtimeMs = 0;
  try {
    mtimeMs = fs.statSync(file).mtimeMs;
  } catch {
    // No such file: numeric fallback below.
  }
  if (table) table.checkedAtMs = now;
  if (!table || table.mtimeMs !== mtimeMs) {
    const names = new Map<number, string>();
    // Unreadable (or not a regular file, see users.ts): numeric fallback below.
    for (const line of readUserTableLines(file)) {
      const [name, , idText] = line.split(":");
      const parsed = Number(idText);
      if (name && Number.isInteger(parsed) && !names.has(parsed)) names.set(parsed, name);
    }
    table = { mtimeMs, checkedAtMs: now, names };
    idTables.set(file, table);
  }
  // Upstream falls back to the numeric id when the lookup fails.
  return table.names.get(id) ?? String(id);
}

export function userNameOf(uid: number): string {
  return nameOfId("/etc/passwd", uid);
}

export function groupNameOf(gid: number): string {
  return nameOfId("/etc/group", gid);
}
