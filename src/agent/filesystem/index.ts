/**
 * The agent's `filesystem.Filesystem` Connect service (wire-protocol §8). Handlers get decoded
 * JSON requests (camelCase or proto field names) and return proto3 JSON responses; failures are
 * thrown as CubicleError and framed by the transport.
 */
import { filesystemMessages } from "../../protocol/index.js";
import { defineService, type ServiceDefinition } from "../rpc/types.js";
import { listDirectory, makeDirectory, movePath, removePath, statPath } from "./operations.js";
import { createWatcher, getWatcherEvents, removeWatcher, watchDirStream } from "./watch-service.js";

export const filesystemService: ServiceDefinition = defineService<filesystemMessages.FilesystemMethods>(filesystemMessages.FilesystemService.typeName, {
  unary: {
    Stat: async function stat(request, ctx) {
      return statPath(ctx.user, request?.path);
    },
    ListDir: async function listDir(request, ctx) {
      return listDirectory(ctx.user, request?.path, request?.depth);
    },
    MakeDir: async function makeDir(request, ctx) {
      return makeDirectory(ctx.user, request?.path);
    },
    Move: async function move(request, ctx) {
      return movePath(ctx.user, request?.source, request?.destination);
    },
    Remove: async function remove(request, ctx) {
      return removePath(ctx.user, request?.path);
    },
    CreateWatcher: async function createWatcherHandler(request, ctx) {
      return createWatcher(request ?? {}, ctx);
    },
    GetWatcherEvents: async function getWatcherEventsHandler(request) {
      return getWatcherEvents(request ?? {});
    },
    RemoveWatcher: async function removeWatcherHandler(request) {
      return removeWatcher(request ?? {});
    },
  },
  streams: {
    WatchDir: async function watchDir(request, ctx, send) {
      await watchDirStream(request ?? {}, ctx, send);
    },
  },
});

export { closeAllWatchers } from "./watch-service.js";
export type { EntryInfoJson } from "./entry-info.js";
export type { FilesystemEventJson } from "./watcher.js";
