/**
 * Directory watching for `WatchDir` and the polling watcher RPCs, on inotify through
 * `fs.watch` (one non-recursive watch per directory; Node 20's own recursive mode on Linux is
 * not used). No polling.
 *
 * `fs.watch` only reports "rename" (IN_CREATE, IN_DELETE, IN_MOVED_FROM, IN_MOVED_TO) and
 * "change" (IN_MODIFY, IN_ATTRIB). They are turned into upstream's fsnotify event types
 * (create / write / remove / rename / chmod) with a snapshot of each watched directory:
 * - a name that appears (or now has another inode) → CREATE; this also covers the destination
 *   of a rename, which fsnotify reports as Create;
 * - a name that disappears → RENAME when its inode shows up elsewhere in the same batch of
 *   inotify events (the source of a rename), else REMOVE;
 * - "change" → WRITE when mtime equals ctime (a write sets both), CHMOD when ctime is newer
 *   (chmod/chown only touch ctime). `touch` therefore reads as WRITE where fsnotify says CHMOD.
 * Events of one inotify read arrive synchronously, so a batch is classified on setImmediate.
 */
import fs from "node:fs";
import path from "node:path";
import type { AgentUser } from "../users.js";
import { runAsUser } from "../as-user.js";
import { CubicleError, errnoName } from "../../shared/cubicle-error.js";
import { createLogger } from "../../shared/log.js";
import { readEntryInfo, type EntryInfoJson } from "./entry-info.js";
import { fsErrorCode } from "../errors.js";

const log = createLogger("agent.fs.watch");

export type EventTypeName =
  | "EVENT_TYPE_CREATE"
  | "EVENT_TYPE_WRITE"
  | "EVENT_TYPE_REMOVE"
  | "EVENT_TYPE_RENAME"
  | "EVENT_TYPE_CHMOD";

export interface FilesystemEventJson {
  /** Path relative to the watched directory. */
  name: string;
  type: EventTypeName;
  entry?: EntryInfoJson;
}

export interface DirectoryWatcherOptions {
  user: AgentUser;
  recursive: boolean;
  includeEntry: boolean;
  onEvent: (event: FilesystemEventJson) => void;
  /** Attaches metadata to an entry (called as root, outside the user's credentials). */
  decorateEntry?: (entry: EntryInfoJson) => EntryInfoJson;
  /** Called once, when the watcher closes (also when its start fails). */
  onClose?: () => void;
  /** Defaults: maxWatchedDirectories, maxKnownEntries. */
  limits?: { directories: number; entries: number };
}

interface KnownEntry {
  ino: bigint;
  isDirectory: boolean;
}

interface RawEvent {
  directory: string;
  kind: "rename" | "change";
  name: string;
}

/** Directories one watcher may watch: a recursive watch of a huge tree is refused, not half done. */
export const maxWatchedDirectories = 20_000;
/** Entries one watcher may keep in its snapshots (their memory is the agent's). */
export const maxKnownEntries = 500_000;
/** How long one slice of a directory scan may hold the event loop. */
const scanSliceMs = 5;

/** A directory being scanned: its names, and how far the scan got. */
interface ScanStep {
  directory: string;
  names: string[];
  next: number;
  reportContents: boolean;
}

export class DirectoryWatcher {
  /**
   * Settles once the directories present at the start are all watched (for a recursive watch
   * that is a whole tree, scanned in slices so that other requests go on meanwhile); rejects
   * (the watcher then closed) when the tree is too big for the limits (failed_precondition) or
   * the kernel's inotify limits are reached (resource_exhausted).
   */
  readonly ready: Promise<void>;
  private readonly watches = new Map<string, fs.FSWatcher>();
  private readonly snapshots = new Map<string, Map<string, KnownEntry>>();
  private pending: RawEvent[] = [];
  /** Events classified as the user, delivered after switching back to root. */
  private outbox: FilesystemEventJson[] = [];
  private flushScheduled = false;
  private closed = false;
  private scanQueue: ScanStep[] = [];
  private scanning = false;
  private initialScanDone = false;
  private knownEntries = 0;

  /** Starts watching; throws (as CubicleError) if the root cannot be watched. */
  constructor(
    readonly root: string,
    private readonly options: DirectoryWatcherOptions,
  ) {
    try {
      runAsUser(options.user, () => this.watchDirectory(root, false));
    } catch (reason) {
      this.close();
      const error = watchError(reason);
      throw new CubicleError(error.code, `error adding path ${root} to watcher: ${error.message}`, { cause: reason });
    }
    this.ready = this.scan().then(
      () => {
        this.initialScanDone = true;
      },
      (reason: unknown) => {
        this.close();
        const error = watchError(reason);
        throw new CubicleError(error.code, `error adding path ${root} to watcher: ${error.message}`, { cause: reason });
      },
    );
    this.ready.catch(() => {});
  }

  close(): void {
    if (!this.closed) this.options.onClose?.();
    this.closed = true;
    for (const watch of this.watches.values()) watch.close();
    this.watches.clear();
    this.snapshots.clear();
    this.pending = [];
    this.scanQueue = [];
  }

  /**
   * Adds the watch of one directory and queues the scan of its entries (which watches its
   * subdirectories when recursive). Runs as the user. Throws for the root and for the limits;
   * a subdirectory this user cannot read is skipped.
   */
  private watchDirectory(directory: string, reportContents: boolean): void {
    if (this.closed || this.watches.has(directory)) return;
    const limit = this.options.limits?.directories ?? maxWatchedDirectories;
    if (this.watches.size >= limit) {
      throw new CubicleError("failed_precondition", `more than ${limit} directories to watch: watch a smaller tree or without recursion`);
    }
    const watch = fs.watch(directory, { persistent: false }, (kind, name) => {
      if (name === null || name === undefined) return;
      this.enqueue({ directory, kind: kind as "rename" | "change", name: name.toString() });
    });
    watch.on("error", (reason) => {
      // A watched subdirectory that vanished: its parent reports the removal.
      log.debug("watch error", { directory, error: (reason as Error).message });
      this.unwatchTree(directory);
    });
    this.watches.set(directory, watch);
    this.snapshots.set(directory, new Map());
    let names: string[];
    try {
      names = fs.readdirSync(directory);
    } catch (reason) {
      if (directory === this.root) throw reason;
      return;
    }
    this.scanQueue.push({ directory, names, next: 0, reportContents });
  }

  /** Scans queued directories in slices of `scanSliceMs`, yielding to other work in between. */
  private async scan(): Promise<void> {
    if (this.scanning) return;
    this.scanning = true;
    try {
      while (!this.closed && this.scanQueue.length > 0) {
        runAsUser(this.options.user, () => this.scanSlice(performance.now() + scanSliceMs));
        this.deliver();
        if (this.scanQueue.length > 0) await new Promise((resolve) => setImmediate(resolve));
      }
    } finally {
      this.scanning = false;
    }
  }

  /** Runs as the user. */
  private scanSlice(deadline: number): void {
    while (this.scanQueue.length > 0) {
      const step = this.scanQueue[this.scanQueue.length - 1]!;
      const snapshot = this.snapshots.get(step.directory);
      if (!snapshot) {
        this.scanQueue.pop(); // unwatched meanwhile
        continue;
      }
      while (step.next < step.names.length) {
        if (performance.now() > deadline) return;
        const name = step.names[step.next++]!;
        const child = path.join(step.directory, name);
        let stats: fs.BigIntStats;
        try {
          stats = fs.lstatSync(child, { bigint: true });
        } catch {
          continue;
        }
        const limit = this.options.limits?.entries ?? maxKnownEntries;
        if (!snapshot.has(name) && this.knownEntries >= limit) {
          throw new CubicleError("failed_precondition", `more than ${limit} entries to watch: watch a smaller tree or without recursion`);
        }
        this.remember(snapshot, name, { ino: stats.ino, isDirectory: stats.isDirectory() });
        if (step.reportContents) this.emit(child, "EVENT_TYPE_CREATE", true);
        if (stats.isDirectory() && this.options.recursive) this.watchSubdirectory(child, step.reportContents);
        // A subdirectory's scan was queued: depth first, like the walk it replaces.
        if (this.scanQueue[this.scanQueue.length - 1] !== step) break;
      }
      if (step.next >= step.names.length) this.scanQueue.splice(this.scanQueue.indexOf(step), 1);
    }
  }

  /**
   * Watches a subdirectory. Failing for this user (EACCES) or vanished: skipped. Over a limit:
   * fatal during the initial scan (the watch would silently miss part of the tree), skipped
   * with a warning later (a tree moved in after the start).
   */
  private watchSubdirectory(directory: string, reportContents: boolean): void {
    try {
      this.watchDirectory(directory, reportContents);
    } catch (reason) {
      const error = watchError(reason);
      // A limit: this watcher's (failed_precondition) or the kernel's inotify ones (resource_exhausted).
      if (error.code === "failed_precondition" || error.code === "resource_exhausted") {
        if (!this.initialScanDone) throw error;
        log.warn("cannot watch new subdirectory", { directory, error: error.message });
        return;
      }
      log.debug("cannot watch subdirectory", { directory, error: error.message });
    }
  }

  /** Drops the watches of `directory` and of the subdirectories its snapshot knows. */
  private unwatchTree(directory: string): void {
    const watch = this.watches.get(directory);
    if (!watch) return;
    watch.close();
    this.watches.delete(directory);
    const snapshot = this.snapshots.get(directory);
    this.snapshots.delete(directory);
    if (!snapshot) return;
    this.knownEntries -= snapshot.size;
    for (const [name, known] of snapshot) if (known.isDirectory) this.unwatchTree(path.join(directory, name));
  }

  private enqueue(event: RawEvent): void {
    if (this.closed) return;
    this.pending.push(event);
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      const batch = this.pending;
      this.pending = [];
      if (this.closed || batch.length === 0) return;
      try {
        runAsUser(this.options.user, () => this.classify(batch));
      } catch (reason) {
        log.warn("cannot classify filesystem events", { root: this.root, error: (reason as Error).message });
      }
      this.deliver();
      // New subdirectories (recursive): their contents are scanned like the initial tree.
      if (this.scanQueue.length > 0) {
        this.scan().catch((reason: unknown) => {
          log.warn("cannot watch a new subtree", { root: this.root, error: (reason as Error).message });
          this.scanQueue = [];
        });
      }
    });
  }

  /** Turns one batch of raw inotify events into fsnotify-style events. Runs as the user. */
  private classify(batch: RawEvent[]): void {
    const current = new Map<string, fs.BigIntStats | null>();
    const statOf = (target: string): fs.BigIntStats | null => {
      if (!current.has(target)) {
        try {
          current.set(target, fs.lstatSync(target, { bigint: true }));
        } catch {
          current.set(target, null);
        }
      }
      return current.get(target)!;
    };
    // Where each (directory, name) is last mentioned in the batch.
    const lastMention = new Map<string, number>();
    batch.forEach((event, index) => lastMention.set(`${event.directory}\0${event.name}`, index));
    // Inodes that exist now under a name announced by a "rename" event: rename destinations.
    const appearedInodes = new Set<bigint>();
    for (const event of batch) {
      if (event.kind !== "rename") continue;
      const stats = statOf(path.join(event.directory, event.name));
      if (stats) appearedInodes.add(stats.ino);
    }

    batch.forEach((event, index) => {
      const snapshot = this.snapshots.get(event.directory);
      if (!snapshot) return;
      const target = path.join(event.directory, event.name);
      const known = snapshot.get(event.name);
      const stats = statOf(target);

      if (event.kind === "change") {
        if (!stats) return;
        if (!known) this.remember(snapshot, event.name, { ino: stats.ino, isDirectory: stats.isDirectory() });
        this.emit(target, stats.ctimeNs > stats.mtimeNs ? "EVENT_TYPE_CHMOD" : "EVENT_TYPE_WRITE", true);
        return;
      }

      if (!stats) {
        if (known) {
          this.forget(snapshot, event.name);
          if (known.isDirectory) this.unwatchTree(target);
          const renamed = known.ino >= 0n && appearedInodes.has(known.ino);
          this.emit(target, renamed ? "EVENT_TYPE_RENAME" : "EVENT_TYPE_REMOVE", false);
          return;
        }
        // Gone before we looked. If the batch mentions it again it was created and removed
        // (a temporary file): report the create so the later event reports the remove.
        const mentionedLater = lastMention.get(`${event.directory}\0${event.name}`)! > index;
        if (mentionedLater && event.name !== path.basename(event.directory)) {
          this.remember(snapshot, event.name, { ino: -1n, isDirectory: false });
          this.emit(target, "EVENT_TYPE_CREATE", false);
        }
        return;
      }

      if (known && known.ino === stats.ino) return;
      this.remember(snapshot, event.name, { ino: stats.ino, isDirectory: stats.isDirectory() });
      if (known?.isDirectory) this.unwatchTree(target);
      this.emit(target, "EVENT_TYPE_CREATE", true);
      if (stats.isDirectory() && this.options.recursive) {
        // Entries made before the watch was added (mkdir -p, a moved-in tree) are reported by the scan.
        this.watchSubdirectory(target, true);
      }
    });
  }

  private remember(snapshot: Map<string, KnownEntry>, name: string, entry: KnownEntry): void {
    if (!snapshot.has(name)) this.knownEntries++;
    snapshot.set(name, entry);
  }

  private forget(snapshot: Map<string, KnownEntry>, name: string): void {
    if (snapshot.delete(name)) this.knownEntries--;
  }

  private emit(target: string, type: EventTypeName, mayHaveEntry: boolean): void {
    if (this.closed) return;
    const event: FilesystemEventJson = { name: path.relative(this.root, target), type };
    if (this.options.includeEntry && mayHaveEntry) {
      try {
        event.entry = readEntryInfo(target);
      } catch {
        // Gone again: no entry, as upstream when the path cannot be stat-ed.
      }
    }
    this.outbox.push(event);
  }

  /** Hands queued events to the listener, as root (decorateEntry switches to the user itself). */
  private deliver(): void {
    const events = this.outbox;
    this.outbox = [];
    for (const event of events) {
      if (this.closed) return;
      if (event.entry && this.options.decorateEntry) {
        try {
          event.entry = this.options.decorateEntry(event.entry);
        } catch (reason) {
          log.debug("cannot decorate entry", { path: event.entry.path, error: (reason as Error).message });
        }
      }
      this.options.onEvent(event);
    }
  }
}

/** A failure to watch as a CubicleError; inotify's limits (inotify(7)) are resource_exhausted, not a full disk. */
function watchError(reason: unknown): CubicleError {
  if (reason instanceof CubicleError) return reason;
  const errno = errnoName(reason);
  if (errno === "ENOSPC") return new CubicleError("resource_exhausted", "the sandbox reached its limit of inotify watches (fs.inotify.max_user_watches): stop other watchers or watch fewer directories", { cause: reason });
  if (errno === "EMFILE") return new CubicleError("resource_exhausted", "the sandbox reached its limit of inotify instances (fs.inotify.max_user_instances): stop other watchers", { cause: reason });
  return new CubicleError(fsErrorCode(errno) ?? "internal", reason instanceof Error ? reason.message : String(reason), { cause: reason });
}
