import fs from "node:fs";
import path from "node:path";
import { CubicleError } from "../shared/cubicle-error.js";

export interface ShiftResult {
  /** Entries whose owner was shifted (a hard-linked inode counts once). */
  entries: number;
  /** Disk space the tree takes, like `du -s` (allocated blocks, hard links once). */
  sizeBytes: number;
}

/**
 * Moves every file of `rootDir` (the directory itself included) into a user-namespace range:
 * uid and gid each gain `base`, so root inside a sandbox (mapped to `base`) owns what root owned.
 *
 * chown(2) clears the setuid and setgid bits of regular files; they are put back afterwards so
 * `sudo` and friends keep working inside the sandbox. Symbolic links are changed themselves
 * (lchown), never followed. File capabilities (`security.capability`) are cleared by chown as
 * well and not restored: Debian's minimal trees have none, and a user namespace would need them
 * rewritten for its root anyway.
 *
 * Synchronous on purpose: ~10–40k entries take well under a second this way, much less than the
 * overhead of as many promises.
 */
export function shiftOwnership(rootDir: string, base: number): ShiftResult {
  const seenInodes = new Set<string>();
  const result: ShiftResult = { entries: 0, sizeBytes: 0 };

  const shiftOne = (entryPath: string): void => {
    const stats = fs.lstatSync(entryPath);
    if (stats.nlink > 1 && !stats.isDirectory()) {
      // A hard link to an inode already shifted through another name: shifting it again would
      // add `base` twice.
      const inode = `${stats.dev}:${stats.ino}`;
      if (seenInodes.has(inode)) return;
      seenInodes.add(inode);
    }
    fs.lchownSync(entryPath, stats.uid + base, stats.gid + base);
    if (!stats.isSymbolicLink() && (stats.mode & 0o6000) !== 0) {
      fs.chmodSync(entryPath, stats.mode & 0o7777);
    }
    result.entries += 1;
    result.sizeBytes += stats.blocks * 512;
  };

  const walk = (dir: string): void => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const entryPath = path.join(dir, entry.name);
      shiftOne(entryPath);
      if (entry.isDirectory()) walk(entryPath);
    }
  };

  if (!fs.lstatSync(rootDir).isDirectory()) {
    throw new CubicleError("invalid_argument", `shiftOwnership: ${rootDir} is not a directory`);
  }
  shiftOne(rootDir);
  walk(rootDir);
  return result;
}
