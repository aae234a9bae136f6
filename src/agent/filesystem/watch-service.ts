/**
 * `WatchDir` (server stream, JS SDK and Python async) and the polling trio `CreateWatcher` /
 * `GetWatcherEvents` / `RemoveWatcher` (Python sync `watch_dir`), on DirectoryWatcher.
 */
import crypto from "node:crypto";
import fs from "node:fs";
import type { AgentUser } from "../users.js";
import type { RpcContext, Untrusted } from "../rpc/types.js";
import { runAsUser } from "../as-user.js";
import type { filesystemMessages } from "../../protocol/index.js";
import { CubicleError } from "../../shared/cubicle-error.js";
import { DirectoryWatcher, type FilesystemEventJson } from "./watcher.js";
import { resolveRequestPath, withMetadata } from "./operations.js";
import { fsFailure, syscallErrorText } from "../errors.js";

/** Filesystem magic numbers of network mounts (include/uapi/linux/magic.h), as upstream. */
const networkFilesystemTypes = new Set([0x6969, 0xff534d42, 0x517b, 0xfe534d42, 0x65735546]);

/** Polled events kept per watcher; the oldest are dropped beyond this. */
const maxQueuedEvents = 10_000;
/**
 * Events a WatchDir client has not read yet, in bytes, before its stream is ended: events
 * cannot be paused (the filesystem does not wait), so a client that stops reading would make
 * the agent hold them all.
 */
export const maxWatchBacklogBytes = 8 * 1024 * 1024;
/** Watchers (streams and polled ones) alive at once in one agent. */
export const maxActiveWatchers = 1024;

let activeWatchers = 0;

/** WatchDir's and CreateWatcher's request (the same fields), not validated yet. */
export type WatchRequest = Untrusted<filesystemMessages.WatchDirRequest>;

/**
 * Validates the request like upstream and starts a watcher; resolves once the directories
 * present now are all watched (DirectoryWatcher.ready). The caller must close it; `onEvent`
 * may be called before this resolves.
 */
export async function startWatcher(user: AgentUser, request: WatchRequest, onEvent: (event: FilesystemEventJson) => void): Promise<DirectoryWatcher> {
  const watchPath = resolveRequestPath(request.path, user);
  runAsUser(user, () => {
    let stats: fs.Stats;
    try {
      stats = fs.statSync(watchPath);
    } catch (reason) {
      const code = (reason as NodeJS.ErrnoException).code;
      if (code === "ENOENT" || code === "ENOTDIR") {
        throw new CubicleError("not_found", `path ${watchPath} not found: ${syscallErrorText("stat", watchPath, reason)}`, { cause: reason });
      }
      throw fsFailure(`error statting path ${watchPath}`, "stat", watchPath, reason);
    }
    if (!stats.isDirectory()) throw new CubicleError("invalid_argument", `path ${watchPath} not a directory`);
    const allowNetworkMounts = request.allowNetworkMounts ?? request.allow_network_mounts ?? false;
    if (!allowNetworkMounts && networkFilesystemTypes.has(Number(fs.statfsSync(watchPath).type))) {
      throw new CubicleError("invalid_argument", `cannot watch path on network filesystem: ${watchPath}`);
    }
  });
  if (activeWatchers >= maxActiveWatchers) {
    throw new CubicleError("resource_exhausted", `${maxActiveWatchers} watchers are active in this sandbox: stop some before watching more`);
  }
  // Counted from here: a watcher that fails to start closes itself, which counts it out again.
  activeWatchers++;
  const watcher = new DirectoryWatcher(watchPath, {
    user,
    recursive: request.recursive === true,
    includeEntry: (request.includeEntry ?? request.include_entry) === true,
    onEvent,
    decorateEntry: (entry) => runAsUser(user, () => withMetadata(entry)),
    onClose: () => activeWatchers--,
  });
  try {
    await watcher.ready;
  } catch (reason) {
    watcher.close();
    throw reason;
  }
  return watcher;
}

/** `WatchDir`: `start`, then `filesystem` events and `keepalive`s until the client goes away. */
export async function watchDirStream(request: WatchRequest, ctx: RpcContext, send: (message: filesystemMessages.WatchDirResponse) => void): Promise<void> {
  if (ctx.signal.aborted) return;
  let lastSendMs = Date.now();
  // `start` goes first: events seen while a big tree is still being scanned wait for it.
  let early: FilesystemEventJson[] | undefined = [];
  let backedUp: (error: CubicleError) => void = () => {};
  const tooSlow = new Promise<never>((_, reject) => (backedUp = reject));
  tooSlow.catch(() => {});
  const watcher = await startWatcher(ctx.user, request, (event) => {
    if (early) return void early.push(event);
    send({ filesystem: event });
    lastSendMs = Date.now();
    if ((ctx.pendingBytes?.() ?? 0) > maxWatchBacklogBytes) {
      watcher.close();
      backedUp(new CubicleError("resource_exhausted", `the client did not read ${maxWatchBacklogBytes} bytes of watch events: read them as they come`));
    }
  });
  if (ctx.signal.aborted) {
    watcher.close();
    return;
  }
  send({ start: {} });
  for (const event of early) send({ filesystem: event });
  early = undefined;

  // Keepalive-Ping-Interval (seconds) while idle, as upstream's GetKeepAliveTicker; default 90 s.
  const header = ctx.headers["keepalive-ping-interval"];
  const intervalSeconds = Number(Array.isArray(header) ? header[0] : header);
  const keepaliveMs = (Number.isFinite(intervalSeconds) && intervalSeconds > 0 ? intervalSeconds : 90) * 1000;
  const keepalive = setInterval(() => {
    if (Date.now() - lastSendMs < keepaliveMs) return;
    send({ keepalive: {} });
    lastSendMs = Date.now();
  }, Math.min(keepaliveMs, 1000));
  keepalive.unref();

  try {
    const clientGone = new Promise<void>((resolve) => {
      if (ctx.signal.aborted) return resolve();
      ctx.signal.addEventListener("abort", () => resolve(), { once: true });
    });
    await Promise.race([clientGone, tooSlow]);
  } finally {
    clearInterval(keepalive);
    watcher.close();
  }
}

interface PolledWatcher {
  watcher: DirectoryWatcher;
  events: FilesystemEventJson[];
}

const polledWatchers = new Map<string, PolledWatcher>();
/** Polled watchers outlive their request: a client that forgets RemoveWatcher leaks one each. */
export const maxPolledWatchers = 256;

export async function createWatcher(request: WatchRequest, ctx: RpcContext): Promise<filesystemMessages.CreateWatcherResponse> {
  if (polledWatchers.size >= maxPolledWatchers) {
    throw new CubicleError("resource_exhausted", `${maxPolledWatchers} polled watchers are active in this sandbox: remove some (RemoveWatcher) before creating more`);
  }
  const watcherId = crypto.randomUUID();
  const events: FilesystemEventJson[] = [];
  const watcher = await startWatcher(ctx.user, request, (event) => {
    events.push(event);
    if (events.length > maxQueuedEvents) events.splice(0, events.length - maxQueuedEvents);
  });
  if (ctx.signal.aborted) {
    // The client is gone and never learns the id: nobody would remove this watcher.
    watcher.close();
    throw ctx.signal.reason;
  }
  polledWatchers.set(watcherId, { watcher, events });
  return { watcherId };
}

type WatcherRequest = Untrusted<filesystemMessages.GetWatcherEventsRequest | filesystemMessages.RemoveWatcherRequest>;

function watcherIdOf(request: WatcherRequest): unknown {
  return request.watcherId ?? request.watcher_id ?? "";
}

/** The polled watcher a request names; only a string can name one (ids are UUIDs). */
function polledWatcherOf(id: unknown): PolledWatcher | undefined {
  return typeof id === "string" ? polledWatchers.get(id) : undefined;
}

export function getWatcherEvents(request: WatcherRequest): filesystemMessages.GetWatcherEventsResponse {
  const id = watcherIdOf(request);
  const polled = polledWatcherOf(id);
  if (!polled) throw new CubicleError("not_found", `watcher with id ${id} not found`);
  return { events: polled.events.splice(0, polled.events.length) };
}

export function removeWatcher(request: WatcherRequest): filesystemMessages.RemoveWatcherResponse {
  const id = watcherIdOf(request);
  const polled = polledWatcherOf(id);
  if (!polled) throw new CubicleError("not_found", `watcher with id ${id} not found`);
  polled.watcher.close();
  // Found, so a string.
  polledWatchers.delete(String(id));
  return {};
}

/** Closes every polled watcher (agent shutdown, tests). */
export function closeAllWatchers(): void {
  for (const polled of polledWatchers.values()) polled.watcher.close();
  polledWatchers.clear();
}
