import fs from "node:fs/promises";
import path from "node:path";
import { randomBytes } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { CubicleError } from "../shared/cubicle-error.js";

export interface DirLockOptions {
  /** Give up after waiting this long for another holder. Default 30 min (a build takes minutes). */
  waitMs?: number;
  /** How often to look again while another process holds the lock. Default 500 ms. */
  pollMs?: number;
  /** Called once when the lock is held by another live process and we start waiting. */
  onWait?: (holderPid: number | undefined) => void;
}

interface LockOwner {
  pid: number;
  acquiredAt: string;
}

/** Releases a lock taken by {@link acquireDirLock}. Idempotent. */
export type ReleaseLock = () => Promise<void>;

const OWNER_FILE = "owner.json";
/** A lock directory without an owner file older than this was left by a crash mid-acquire. */
const OWNERLESS_GRACE_MS = 10_000;

/**
 * A cross-process lock made of a directory (`mkdir` is atomic) holding the owner's pid. A lock
 * whose owner is no longer alive is taken over, so a build killed mid-way does not block the
 * next start forever.
 */
export async function acquireDirLock(lockDir: string, options: DirLockOptions = {}): Promise<ReleaseLock> {
  const waitMs = options.waitMs ?? 30 * 60_000;
  const pollMs = options.pollMs ?? 500;
  const deadline = Date.now() + waitMs;
  let announcedWait = false;
  await fs.mkdir(path.dirname(lockDir), { recursive: true });

  for (;;) {
    try {
      await fs.mkdir(lockDir);
      const owner: LockOwner = { pid: process.pid, acquiredAt: new Date().toISOString() };
      await fs.writeFile(path.join(lockDir, OWNER_FILE), JSON.stringify(owner));
      let released = false;
      return async function releaseDirLock() {
        if (released) return;
        released = true;
        await fs.rm(lockDir, { recursive: true, force: true });
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw CubicleError.from(err);
    }

    const holder = await readOwner(lockDir);
    if (holder.stale) {
      await breakStaleLock(lockDir);
      continue;
    }
    if (Date.now() >= deadline) {
      throw new CubicleError(
        "deadline_exceeded",
        `waited ${waitMs} ms for the lock ${lockDir} held by pid ${holder.pid ?? "?"}; if no build is running, remove that directory`,
      );
    }
    if (!announcedWait) {
      announcedWait = true;
      options.onWait?.(holder.pid);
    }
    await sleep(pollMs);
  }
}

async function readOwner(lockDir: string): Promise<{ pid: number | undefined; stale: boolean }> {
  try {
    const owner = JSON.parse(await fs.readFile(path.join(lockDir, OWNER_FILE), "utf8")) as LockOwner;
    return { pid: owner.pid, stale: !isProcessAlive(owner.pid) };
  } catch {
    // No (complete) owner file yet: either the holder is between mkdir and writeFile, or it
    // died right there. Only the age of the directory tells them apart.
    try {
      const stats = await fs.stat(lockDir);
      return { pid: undefined, stale: Date.now() - stats.mtimeMs > OWNERLESS_GRACE_MS };
    } catch {
      return { pid: undefined, stale: false }; // released meanwhile; retry mkdir
    }
  }
}

/**
 * Moves a dead holder's lock aside and removes it. The rename is atomic, so of two processes
 * breaking the same lock only one succeeds; if the one that lost the race renamed a lock that a
 * live process had just taken, it puts it back.
 */
async function breakStaleLock(lockDir: string): Promise<void> {
  const aside = `${lockDir}.stale-${randomBytes(4).toString("hex")}`;
  try {
    await fs.rename(lockDir, aside);
  } catch {
    return; // someone else broke or released it
  }
  const moved = await readOwner(aside);
  if (moved.pid !== undefined && !moved.stale) {
    await fs.rename(aside, lockDir).catch(() => undefined);
    return;
  }
  await fs.rm(aside, { recursive: true, force: true });
}

function isProcessAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it exists but belongs to someone else.
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}
