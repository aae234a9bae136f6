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
import { CubicleError } from "../../shared/cubicle-error.js";
import { createLogger } from "../../shared/log.js";
import { readEntryInfo, type EntryInfoJson } from "./entry-info.js";

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
  /** Attaches metadata to an entry (runs as root, outside the user's credentials). */
  decorateEntry?: (entry: EntryInfoJson) => EntryInfoJson;
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

export class DirectoryWatcher {
  private readonly watches = new Map<string, fs.FSWatcher>();
  private readonly snapshots = new Map<string, Map<string, KnownEntry>>();
  private pending: RawEvent[] = [];
  /** Events classified as the user, delivered after switching back to root. */
  private outbox: FilesystemEventJson[] = [];
  private flushScheduled = false;
  private closed = false;

  /** Starts watching; throws (as CubicleError) if the root cannot be watched. */
  constructor(
    readonly root: string,
    private readonly options: DirectoryWatcherOptions,
  ) {
    try {
      runAsUser(options.user, () => this.watchTree(root, false));
      this.deliver();
    } catch (reason) {
      this.close();
      const error = CubicleError.from(reason);
      throw new CubicleError(error.code, `error adding path ${root} to watcher: ${error.message}`, { cause: reason });
    }
  }

  close(): void {
    this.closed = true;
    for (const watch of this.watches.values()) watch.close();
    this.watches.clear();
    this.snapshots.clear();
    this.pending = [];
  }

  /** Adds watches for `directory` (and, if recursive, its subdirectories). Runs as the user. */
  private watchTree(directory: string, reportContents: boolean): void {
    if (this.closed || this.watches.has(directory)) return;
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

    const snapshot = new Map<string, KnownEntry>();
    this.snapshots.set(directory, snapshot);
    let names: string[] = [];
    try {
      names = fs.readdirSync(directory);
    } catch (reason) {
      if (directory === this.root) throw reason;
      return;
    }
    for (const name of names) {
      const child = path.join(directory, name);
      let stats: fs.BigIntStats;
      try {
        stats = fs.lstatSync(child, { bigint: true });
      } catch {
        continue;
      }
      snapshot.set(name, { ino: stats.ino, isDirectory: stats.isDirectory() });
      if (reportContents) this.emit(child, "EVENT_TYPE_CREATE", true);
      if (stats.isDirectory() && this.options.recursive) {
        try {
          this.watchTree(child, reportContents);
        } catch (reason) {
          // An unreadable subdirectory (EACCES for this user) or the inotify limit: skip it.
          log.debug("cannot watch subdirectory", { directory: child, error: (reason as Error).message });
        }
      }
    }
  }

  private unwatchTree(directory: string): void {
    for (const [watched, watch] of [...this.watches]) {
      if (watched === directory || watched.startsWith(directory + "/")) {
        watch.close();
        this.watches.delete(watched);
        this.snapshots.delete(watched);
      }
    }
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
        if (!known) snapshot.set(event.name, { ino: stats.ino, isDirectory: stats.isDirectory() });
        this.emit(target, stats.ctimeNs > stats.mtimeNs ? "EVENT_TYPE_CHMOD" : "EVENT_TYPE_WRITE", true);
        return;
      }

      if (!stats) {
        if (known) {
          snapshot.delete(event.name);
          if (known.isDirectory) this.unwatchTree(target);
          const renamed = known.ino >= 0n && appearedInodes.has(known.ino);
          this.emit(target, renamed ? "EVENT_TYPE_RENAME" : "EVENT_TYPE_REMOVE", false);
          return;
        }
        // Gone before we looked. If the batch mentions it again it was created and removed
        // (a temporary file): report the create so the later event reports the remove.
        const mentionedLater = batch.slice(index + 1).some((later) => later.directory === event.directory && later.name === event.name);
        if (mentionedLater && event.name !== path.basename(event.directory)) {
          snapshot.set(event.name, { ino: -1n, isDirectory: false });
          this.emit(target, "EVENT_TYPE_CREATE", false);
        }
        return;
      }

      if (known && known.ino === stats.ino) return;
      snapshot.set(event.name, { ino: stats.ino, isDirectory: stats.isDirectory() });
      if (known?.isDirectory) this.unwatchTree(target);
      this.emit(target, "EVENT_TYPE_CREATE", true);
      if (stats.isDirectory() && this.options.recursive) {
        try {
          // Entries made before the watch was added (mkdir -p, a moved-in tree) are reported.
          this.watchTree(target, true);
        } catch (reason) {
          log.debug("cannot watch new subdirectory", { directory: target, error: (reason as Error).message });
        }
      }
    });
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

  /** Hands queued events to the listener; runs as root (metadata lookups need it). */
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
