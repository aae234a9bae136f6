import fs from "node:fs";
import path from "node:path";
import { canSwitchUser } from "../as-user.js";
import type { AgentUser } from "../users.js";

/** The sticky bit of a directory's mode (S_ISVTX). */
const STICKY = 0o1000;

/**
 * Upstream envd makes the missing parent directories of a written file as root and hands them to
 * the user, so the default user can write `/newdir/file.txt` although `/` is root's; the file
 * itself is still opened with the user's permissions (`user` cannot overwrite `/etc/passwd`).
 *
 * Making directories as root on a path a sandbox's user can change would let that user steer
 * root (swap an entry on the way for a symlink to `/etc` while root creates). So root makes them
 * only when the user can neither change the way there nor create them itself: on the path as
 * asked and on its real path, every existing ancestor is searchable by the user and no entry
 * can be made, renamed or replaced by it (its parent is not writable by the user, or is sticky
 * and neither it nor the entry is the user's). In every
 * other case nothing is done here and the caller makes them as the user, with the user's errors.
 * Directories made here are root's while the rest are made, then handed to the user (lchown).
 * Called only after the user's own attempt failed with EACCES; true when it got as far as making them (try again as the user).
 */
export function makeMissingParentsAsRoot(user: AgentUser, directory: string): boolean {
  if (user.uid === 0 || !canSwitchUser()) return false;
  const missing: string[] = [];
  let existing = path.resolve(directory);
  while (!entryExists(existing)) {
    const parent = path.dirname(existing);
    if (parent === existing) return false;
    missing.unshift(existing);
    existing = parent;
  }
  if (missing.length === 0 || !isDirectory(existing)) return false;
  // Both ways must be out of the user's hands: the one asked for (a link of the user's to /etc
  // would steer root there) and the real one (a root-owned link may lead through the user's
  // directories); root then creates along the real one, not along links.
  const real = fs.realpathSync(existing);
  if (!wayIsFixedFor(user, existing) || !wayIsFixedFor(user, real)) return false;
  const made: string[] = [];
  for (const dir of missing.map((name) => path.join(real, path.relative(existing, name)))) {
    try {
      fs.mkdirSync(dir, { mode: 0o755 });
      made.push(dir);
    } catch (reason) {
      // Made meanwhile by someone who could (root's processes): use it if it is a directory.
      if ((reason as NodeJS.ErrnoException).code !== "EEXIST" || !fs.lstatSync(dir).isDirectory()) break;
    }
  }
  for (const dir of made) fs.lchownSync(dir, user.uid, user.gid);
  return true;
}

function entryExists(file: string): boolean {
  try {
    fs.lstatSync(file);
    return true;
  } catch {
    return false;
  }
}

function isDirectory(file: string): boolean {
  try {
    return fs.statSync(file).isDirectory();
  } catch {
    return false;
  }
}

/**
 * `dir` and its ancestors are searchable by the user, `dir` is not writable by it, and no entry
 * on the way can be renamed by it. From the mode bits (access(2) would check the agent's real
 * uid, root, not the user it switches to); ACLs are not consulted.
 */
function wayIsFixedFor(user: AgentUser, dir: string): boolean {
  const dirStats = fs.statSync(dir);
  if (!permits(user, dirStats, 1) || permits(user, dirStats, 2)) return false;
  for (let child = dir, parent = path.dirname(dir); parent !== child; child = parent, parent = path.dirname(parent)) {
    const parentStats = fs.statSync(parent);
    if (!permits(user, parentStats, 1)) return false;
    if (!permits(user, parentStats, 2)) continue;
    // A writable parent protects its entries only when it is sticky and neither it nor the entry is the user's.
    if ((parentStats.mode & STICKY) === 0 || parentStats.uid === user.uid || fs.lstatSync(child).uid === user.uid) return false;
  }
  return true;
}

/** Whether the mode bits grant `user` the permission `bit` (4 read, 2 write, 1 search). */
function permits(user: AgentUser, stats: fs.Stats, bit: number): boolean {
  if (stats.uid === user.uid) return ((stats.mode >> 6) & bit) !== 0;
  if (stats.gid === user.gid || user.groups.includes(stats.gid)) return ((stats.mode >> 3) & bit) !== 0;
  return (stats.mode & bit) !== 0;
}
