import fs from "node:fs";
import path from "node:path";
import { CubicleError } from "../shared/cubicle-error.js";
import { readRegularFileSync } from "./filesystem/regular-file.js";

/** A user of the sandbox as /etc/passwd and /etc/group describe it. */
export interface AgentUser {
  name: string;
  uid: number;
  gid: number;
  /** Supplementary group ids. */
  groups: number[];
  home: string;
  shell: string;
}

interface UserTables {
  passwdMtimeMs: number;
  groupMtimeMs: number;
  users: Map<string, AgentUser>;
}

let cached: UserTables | undefined;

function mtimeMs(file: string): number {
  try {
    return fs.statSync(file).mtimeMs;
  } catch {
    return 0;
  }
}

/** passwd and group files larger than this are not read (a sandbox's root could make one huge). */
const maxUserTableBytes = 16 * 1024 * 1024;

/** The entries of a passwd or group style file (no comments, no blank lines); none when unreadable. */
export function readUserTableLines(file: string): string[] {
  try {
    // Not readFileSync: the sandbox's root may have replaced the file with a FIFO (regular-file.ts).
    return readRegularFileSync(file, maxUserTableBytes).split("\n").filter((line) => line && !line.startsWith("#"));
  } catch {
    return [];
  }
}

/** Parses passwd and group, re-reading them only when they change (users may be added with useradd). */
function loadTables(root = "/"): UserTables {
  const passwdFile = path.join(root, "etc/passwd");
  const groupFile = path.join(root, "etc/group");
  const passwdMtimeMs = mtimeMs(passwdFile);
  const groupMtimeMs = mtimeMs(groupFile);
  if (cached && cached.passwdMtimeMs === passwdMtimeMs && cached.groupMtimeMs === groupMtimeMs) return cached;

  const membership = new Map<string, number[]>();
  for (const line of readUserTableLines(groupFile)) {
    const [, , gidText, members] = line.split(":");
    const gid = Number(gidText);
    for (const member of (members ?? "").split(",").filter(Boolean)) {
      membership.set(member, [...(membership.get(member) ?? []), gid]);
    }
  }
  const users = new Map<string, AgentUser>();
  for (const line of readUserTableLines(passwdFile)) {
    const [name, , uidText, gidText, , home, shell] = line.split(":");
    if (!name) continue;
    const gid = Number(gidText);
    users.set(name, {
      name,
      uid: Number(uidText),
      gid,
      groups: [...new Set([gid, ...(membership.get(name) ?? [])])],
      home: home || "/",
      shell: shell || "/bin/sh",
    });
  }
  cached = { passwdMtimeMs, groupMtimeMs, users };
  return cached;
}

/** Looks a user up by name; unknown names are an `invalid_argument` as upstream envd reports them. */
export function lookupUser(name: string): AgentUser {
  const user = loadTables().users.get(name);
  if (!user) throw new CubicleError("invalid_argument", `user "${name}" does not exist in this sandbox`);
  return user;
}

/**
 * Resolves a path the way envd does: `~` and `~/x` expand to the user's home, relative
 * paths resolve against the home, and the result is normalised.
 */
export function resolveUserPath(requested: string, user: AgentUser): string {
  // Node's fs refuses such a path with a TypeError; this is the caller's mistake, so say so.
  if (requested.includes("\0")) throw new CubicleError("invalid_argument", "invalid path: a path must not contain a NUL byte");
  if (requested === "") return user.home;
  let p = requested;
  if (p === "~") p = user.home;
  else if (p.startsWith("~/")) p = path.join(user.home, p.slice(2));
  else if (!path.isAbsolute(p)) p = path.join(user.home, p);
  return path.normalize(p);
}
