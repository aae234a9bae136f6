import { randomBytes } from "node:crypto";
import { constants, type Stats } from "node:fs";
import { link, lstat, mkdir, open, readdir, readlink, rename, rmdir, unlink, type FileHandle } from "node:fs/promises";
import type { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { CubicleError } from "../shared/cubicle-error.js";
import { CANONICAL_ID_BASE } from "./volume-service.js";

/**
 * VOLUME_PATHS_NOTE: the content API works on a volume's directory from the host, so a path
 * must never lead out of it — not by `..`, and not by a symlink that something inside the
 * volume made (a sandbox that mounts it may plant one and swap it in at any time). Paths are
 * taken apart into names ('..' is refused, '.' and empty names dropped), and the walk opens
 * each directory relative to the one before through its file descriptor
 * (`/proc/self/fd/<fd>/<name>`, O_NOFOLLOW | O_DIRECTORY): a symlink anywhere on the way fails
 * the open (ELOOP), and a directory renamed meanwhile is still the one opened. The last name is
 * then acted on relative to its parent's descriptor with calls that do not follow a symlink
 * (O_NOFOLLOW opens, lstat, unlink, rmdir, rename). Removal descends the same way. Symlinks
 * are listed (type `symlink`, with their target) but never followed.
 */
const MAX_PATH_BYTES = 4096;
const MAX_NAME_BYTES = 255;
/** Entries one listing returns at most (a deep tree is refused, not half listed). */
export const MAX_LIST_ENTRIES = 10_000;
const MAX_DEPTH = 64;
/** The sandbox's default user: owner of what is written without uid/gid. */
const DEFAULT_OWNER = 1000;
/** Ids a sandbox can see (its user namespace maps 0..65535). */
const ID_COUNT = 65_536;

export interface VolumeEntryStat {
  name: string;
  type: "file" | "directory" | "symlink" | "unknown";
  path: string;
  size: number;
  mode: number;
  uid: number;
  gid: number;
  atime: string;
  mtime: string;
  ctime: string;
  target?: string;
}

export interface Ownership {
  uid?: number;
  gid?: number;
  mode?: number;
}

/** The names of a volume path; `/` is []. Refuses what could leave the volume or is not a path. */
export function pathNames(raw: unknown): string[] {
  if (typeof raw !== "string" || raw.length === 0) throw new CubicleError("invalid_argument", "path is required");
  if (raw.includes("\0")) throw new CubicleError("invalid_argument", "path must not contain a NUL byte");
  if (Buffer.byteLength(raw) > MAX_PATH_BYTES) throw new CubicleError("invalid_argument", `path must be at most ${MAX_PATH_BYTES} bytes`);
  const names = raw.split("/").filter((name) => name !== "" && name !== ".");
  for (const name of names) {
    if (name === "..") throw new CubicleError("invalid_argument", "path must not contain '..': paths are inside the volume");
    if (Buffer.byteLength(name) > MAX_NAME_BYTES) throw new CubicleError("invalid_argument", `a path component is longer than ${MAX_NAME_BYTES} bytes`);
  }
  return names;
}

/** The ids a sandbox sees for ids on disk (outside its range: nobody, 65534). */
function visibleId(id: number): number {
  return id >= CANONICAL_ID_BASE && id < CANONICAL_ID_BASE + ID_COUNT ? id - CANONICAL_ID_BASE : 65_534;
}

function checkedId(value: number | undefined, what: string): number | undefined {
  if (value === undefined) return undefined;
  if (!Number.isInteger(value) || value < 0 || value >= ID_COUNT) throw new CubicleError("invalid_argument", `${what} must be an integer from 0 to ${ID_COUNT - 1}`);
  return value;
}

function checkedMode(value: number | undefined): number | undefined {
  if (value === undefined) return undefined;
  if (!Number.isInteger(value) || value < 0 || value > 0o7777) throw new CubicleError("invalid_argument", "mode must be permission bits from 0 to 0o7777");
  return value;
}

/** Errors of the file system as API errors. */
function asApiError(err: unknown, where: string): CubicleError {
  if (err instanceof CubicleError) return err;
  const code = (err as NodeJS.ErrnoException).code;
  switch (code) {
    case "ENOENT":
      return new CubicleError("not_found", `${where} not found`);
    case "ELOOP":
      return new CubicleError("invalid_argument", `${where} is or goes through a symlink: the volume API does not follow symlinks`);
    case "ENOTDIR":
      return new CubicleError("invalid_argument", `${where}: a component of the path is not a directory`);
    case "EISDIR":
      return new CubicleError("invalid_argument", `${where} is a directory`);
    case "EEXIST":
      return new CubicleError("already_exists", `${where} already exists`);
    case "ENOTEMPTY":
      return new CubicleError("failed_precondition", `${where} is not empty`);
    case "EDQUOT":
    case "ENOSPC":
      return new CubicleError("insufficient_storage", `the volume is full (its quota): ${where} could not be written`);
    case "ENAMETOOLONG":
      return new CubicleError("invalid_argument", `${where}: a name is too long`);
    default:
      return CubicleError.from(err);
  }
}

const at = (dir: FileHandle, name: string) => `/proc/self/fd/${dir.fd}/${name}`;

function display(names: readonly string[]): string {
  return `/${names.join("/")}`;
}

function entryStat(stats: Stats, names: readonly string[], target?: string): VolumeEntryStat {
  const type = stats.isFile() ? "file" : stats.isDirectory() ? "directory" : stats.isSymbolicLink() ? "symlink" : "unknown";
  return {
    name: names.at(-1) ?? "",
    type,
    path: display(names),
    size: stats.size,
    mode: stats.mode & 0o7777,
    uid: visibleId(stats.uid),
    gid: visibleId(stats.gid),
    atime: stats.atime.toISOString(),
    mtime: stats.mtime.toISOString(),
    ctime: stats.ctime.toISOString(),
    ...(target !== undefined ? { target } : {}),
  };
}

/** The content of one volume directory (VOLUME_PATHS_NOTE). */
export class VolumeContent {
  constructor(private readonly root: string) {}

  async stat(rawPath: unknown): Promise<VolumeEntryStat> {
    const names = pathNames(rawPath);
    return this.withParent(names, false, (parent, name) => this.statAt(parent, name, names));
  }

  async list(rawPath: unknown, depth: number): Promise<VolumeEntryStat[]> {
    const names = pathNames(rawPath);
    if (!Number.isInteger(depth) || depth < 1 || depth > MAX_DEPTH) throw new CubicleError("invalid_argument", `depth must be an integer from 1 to ${MAX_DEPTH}`);
    const dir = await this.openDir(names, false);
    try {
      const out: VolumeEntryStat[] = [];
      await this.listInto(dir, names, depth, out);
      return out;
    } finally {
      await dir.close();
    }
  }

  async makeDir(rawPath: unknown, owner: Ownership, parents: boolean): Promise<VolumeEntryStat> {
    const names = pathNames(rawPath);
    if (names.length === 0) throw new CubicleError("already_exists", "/ is the volume's root");
    const wanted = { uid: checkedId(owner.uid, "uid"), gid: checkedId(owner.gid, "gid"), mode: checkedMode(owner.mode) };
    return this.withParent(names, parents, async (parent, name) => {
      try {
        await mkdir(at(parent, name), wanted.mode ?? 0o755);
      } catch (err) {
        // An existing directory is made already; anything else there is a conflict.
        if ((err as NodeJS.ErrnoException).code !== "EEXIST" || !(await lstat(at(parent, name))).isDirectory()) throw asApiError(err, display(names));
        return this.statAt(parent, name, names);
      }
      await this.own(parent, name, wanted, true);
      return this.statAt(parent, name, names);
    }, wanted);
  }

  /**
   * Writes `body` to the path, made next to it and renamed in place: a file there is replaced,
   * unless `overwrite` is false (the API's `force=false`): then one there is already_exists.
   */
  async writeFile(rawPath: unknown, body: Readable, owner: Ownership, overwrite = true): Promise<VolumeEntryStat> {
    const names = pathNames(rawPath);
    if (names.length === 0) throw new CubicleError("invalid_argument", "/ is the volume's root directory, not a file");
    const wanted = { uid: checkedId(owner.uid, "uid"), gid: checkedId(owner.gid, "gid"), mode: checkedMode(owner.mode) };
    return this.withParent(names, true, async (parent, name) => {
      let existing: Stats | undefined;
      try {
        existing = await lstat(at(parent, name));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw asApiError(err, display(names));
      }
      if (existing?.isDirectory()) throw new CubicleError("invalid_argument", `${display(names)} is a directory`);
      if (existing && !overwrite) throw new CubicleError("already_exists", `${display(names)} already exists (force=false)`);
      const temporary = `.${name.slice(0, 200)}.upload-${randomBytes(6).toString("hex")}`;
      const file = await open(at(parent, temporary), constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, wanted.mode ?? (existing ? existing.mode & 0o7777 : 0o644));
      try {
        await file.chown(CANONICAL_ID_BASE + (wanted.uid ?? (existing ? visibleId(existing.uid) : DEFAULT_OWNER)), CANONICAL_ID_BASE + (wanted.gid ?? (existing ? visibleId(existing.gid) : DEFAULT_OWNER)));
        if (wanted.mode !== undefined || existing) await file.chmod(wanted.mode ?? existing!.mode & 0o7777);
        // The stream closes the file when the body is written.
        await pipeline(body, file.createWriteStream());
        // Without overwrite, a link fails if something took the name meanwhile (EEXIST); a rename would replace it.
        if (overwrite) await rename(at(parent, temporary), at(parent, name));
        else await link(at(parent, temporary), at(parent, name)).then(() => unlink(at(parent, temporary)));
      } catch (err) {
        await file.close().catch(() => undefined);
        await unlink(at(parent, temporary)).catch(() => undefined);
        throw asApiError(err, display(names));
      }
      return this.statAt(parent, name, names);
    });
  }

  /** An open regular file and its size, for streaming out. */
  async readFile(rawPath: unknown): Promise<{ stream: Readable; size: number }> {
    const names = pathNames(rawPath);
    if (names.length === 0) throw new CubicleError("invalid_argument", "/ is a directory");
    return this.withParent(names, false, async (parent, name) => {
      let file: FileHandle;
      try {
        file = await open(at(parent, name), constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
      } catch (err) {
        throw asApiError(err, display(names));
      }
      const stats = await file.stat();
      if (!stats.isFile()) {
        await file.close();
        throw new CubicleError("invalid_argument", `${display(names)} is not a regular file`);
      }
      return { stream: file.createReadStream({ autoClose: true }), size: stats.size };
    });
  }

  async updateMetadata(rawPath: unknown, input: unknown): Promise<VolumeEntryStat> {
    const names = pathNames(rawPath);
    if (typeof input !== "object" || input === null || Array.isArray(input)) throw new CubicleError("invalid_argument", "the body must be a JSON object: {uid, gid, mode}");
    const body = input as Record<string, unknown>;
    for (const key of Object.keys(body)) if (!["uid", "gid", "mode"].includes(key)) throw new CubicleError("invalid_argument", `${JSON.stringify(key.slice(0, 64))} is not a metadata field (uid, gid, mode)`);
    const number = (value: unknown, what: string) => {
      if (value === undefined || value === null) return undefined;
      if (typeof value !== "number") throw new CubicleError("invalid_argument", `${what} must be a number`);
      return value;
    };
    const wanted = { uid: checkedId(number(body.uid, "uid"), "uid"), gid: checkedId(number(body.gid, "gid"), "gid"), mode: checkedMode(number(body.mode, "mode")) };
    return this.withParent(names, false, async (parent, name) => {
      await this.own(parent, name, wanted, false);
      return this.statAt(parent, name, names);
    });
  }

  async remove(rawPath: unknown): Promise<void> {
    const names = pathNames(rawPath);
    if (names.length === 0) throw new CubicleError("invalid_argument", "the volume's root cannot be removed: delete the volume instead");
    await this.withParent(names, false, (parent, name) => this.removeAt(parent, name, display(names), { entries: 0 }));
  }

  // ---- walking ----

  /** Opens the directory at `names` (VOLUME_PATHS_NOTE); with `make`, missing ones are made. */
  private async openDir(names: readonly string[], make: boolean, owner: Ownership = {}): Promise<FileHandle> {
    let dir = await open(this.root, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
    try {
      for (let i = 0; i < names.length; i++) {
        const name = names[i]!;
        let next: FileHandle;
        try {
          next = await open(at(dir, name), constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
        } catch (err) {
          if (!make || (err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
          await mkdir(at(dir, name), owner.mode ?? 0o755).catch((mkdirErr: NodeJS.ErrnoException) => {
            if (mkdirErr.code !== "EEXIST") throw mkdirErr;
          });
          await this.own(dir, name, owner, true);
          next = await open(at(dir, name), constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
        }
        await dir.close();
        dir = next;
      }
      return dir;
    } catch (err) {
      await dir.close();
      throw asApiError(err, display(names));
    }
  }

  /** Runs `act` on the last name of `names` with its parent directory open. */
  private async withParent<T>(names: readonly string[], makeParents: boolean, act: (parent: FileHandle, name: string) => Promise<T>, owner: Ownership = {}): Promise<T> {
    if (names.length === 0) {
      // The root itself: "." of the root directory.
      const root = await open(this.root, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
      try {
        return await act(root, ".");
      } finally {
        await root.close();
      }
    }
    const parent = await this.openDir(names.slice(0, -1), makeParents, owner);
    try {
      return await act(parent, names.at(-1)!);
    } catch (err) {
      throw asApiError(err, display(names));
    } finally {
      await parent.close();
    }
  }

  private async statAt(parent: FileHandle, name: string, names: readonly string[]): Promise<VolumeEntryStat> {
    const stats = await lstat(at(parent, name));
    const target = stats.isSymbolicLink() ? await readlink(at(parent, name)) : undefined;
    return entryStat(stats, names, target);
  }

  /** Sets the owner (canonical ids on disk) and mode; `made`: defaults for what is new. */
  private async own(parent: FileHandle, name: string, wanted: Ownership, made: boolean): Promise<void> {
    if (!made && wanted.uid === undefined && wanted.gid === undefined && wanted.mode === undefined) return;
    let handle: FileHandle;
    try {
      // O_PATH cannot chown; a symlink is refused by O_NOFOLLOW (ELOOP).
      handle = await open(at(parent, name), constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    } catch (err) {
      throw asApiError(err, name);
    }
    try {
      const stats = await handle.stat();
      const uid = wanted.uid ?? (made ? DEFAULT_OWNER : visibleId(stats.uid));
      const gid = wanted.gid ?? (made ? DEFAULT_OWNER : visibleId(stats.gid));
      await handle.chown(CANONICAL_ID_BASE + uid, CANONICAL_ID_BASE + gid);
      if (wanted.mode !== undefined) await handle.chmod(wanted.mode);
    } finally {
      await handle.close();
    }
  }

  private async listInto(dir: FileHandle, names: readonly string[], depth: number, out: VolumeEntryStat[]): Promise<void> {
    const entries = await readdir(`/proc/self/fd/${dir.fd}`);
    entries.sort();
    for (const name of entries) {
      if (out.length >= MAX_LIST_ENTRIES) throw new CubicleError("resource_exhausted", `the listing has more than ${MAX_LIST_ENTRIES} entries: list a smaller depth or a subdirectory`);
      const childNames = [...names, name];
      let stat: VolumeEntryStat;
      try {
        stat = await this.statAt(dir, name, childNames);
      } catch (err) {
        // Removed while we listed: skip it.
        if ((err as NodeJS.ErrnoException).code === "ENOENT") continue;
        throw err;
      }
      out.push(stat);
      if (stat.type !== "directory" || depth <= 1) continue;
      let child: FileHandle;
      try {
        child = await open(at(dir, name), constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
      } catch {
        continue; // replaced by something else meanwhile
      }
      try {
        await this.listInto(child, childNames, depth - 1, out);
      } finally {
        await child.close();
      }
    }
  }

  private async removeAt(parent: FileHandle, name: string, where: string, budget: { entries: number }): Promise<void> {
    if (++budget.entries > 1_000_000) throw new CubicleError("resource_exhausted", `${where} has too many entries to remove at once`);
    const stats = await lstat(at(parent, name));
    if (!stats.isDirectory()) return void (await unlink(at(parent, name)));
    const dir = await open(at(parent, name), constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
    try {
      for (const child of await readdir(`/proc/self/fd/${dir.fd}`)) await this.removeAt(dir, child, where, budget);
    } finally {
      await dir.close();
    }
    await rmdir(at(parent, name));
  }
}
