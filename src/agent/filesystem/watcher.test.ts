import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { isRoot, makeTempDir, measureEventLoop, rootUser, rpcContext, sleep, syntheticUser } from "./test-helpers.js";
import { DirectoryWatcher, type FilesystemEventJson } from "./watcher.js";
import { filesystemService } from "./index.js";
import { maxPolledWatchers } from "./watch-service.js";
import { CubicleError } from "../../shared/cubicle-error.js";

function collect(root: string, options: { recursive?: boolean; includeEntry?: boolean } = {}) {
  const events: FilesystemEventJson[] = [];
  const watcher = new DirectoryWatcher(root, {
    user: rootUser,
    recursive: options.recursive ?? false,
    includeEntry: options.includeEntry ?? false,
    onEvent: (event) => events.push(event),
  });
  const seen = () => events.map((event) => `${event.type.replace("EVENT_TYPE_", "").toLowerCase()} ${event.name}`);
  return { events, watcher, seen };
}

test("create, write, chmod, rename and remove are reported as upstream names them", async () => {
  const directory = makeTempDir();
  const { watcher, seen, events } = collect(directory, { includeEntry: true });
  fs.writeFileSync(path.join(directory, "a.txt"), "hello");
  await sleep(50);
  fs.appendFileSync(path.join(directory, "a.txt"), " world");
  await sleep(50);
  fs.chmodSync(path.join(directory, "a.txt"), 0o600);
  await sleep(50);
  fs.renameSync(path.join(directory, "a.txt"), path.join(directory, "b.txt"));
  await sleep(50);
  fs.rmSync(path.join(directory, "b.txt"));
  await sleep(100);
  watcher.close();

  assert.deepEqual(seen(), ["create a.txt", "write a.txt", "write a.txt", "chmod a.txt", "rename a.txt", "create b.txt", "remove b.txt"]);
  assert.equal(events[0]!.entry?.path, path.join(directory, "a.txt"));
  assert.equal(events[0]!.entry?.type, "FILE_TYPE_FILE");
  assert.equal(events.find((event) => event.type === "EVENT_TYPE_REMOVE")!.entry, undefined);
  fs.rmSync(directory, { recursive: true });
});

test("recursive watching follows new subdirectories and reports paths relative to the root", async () => {
  const directory = makeTempDir();
  fs.mkdirSync(path.join(directory, "existing"));
  const { watcher, seen } = collect(directory, { recursive: true });
  fs.writeFileSync(path.join(directory, "existing/one"), "");
  await sleep(50);
  fs.mkdirSync(path.join(directory, "new/deeper"), { recursive: true });
  await sleep(50);
  fs.writeFileSync(path.join(directory, "new/deeper/two"), "2");
  await sleep(100);
  fs.rmSync(path.join(directory, "new"), { recursive: true });
  await sleep(100);
  watcher.close();
  const events = seen();
  for (const expected of ["create existing/one", "create new", "create new/deeper", "create new/deeper/two", "write new/deeper/two", "remove new/deeper/two", "remove new"]) {
    assert.ok(events.includes(expected), `missing "${expected}" in ${JSON.stringify(events)}`);
  }
  fs.rmSync(directory, { recursive: true });
});

test("a non-recursive watch ignores subdirectory contents", async () => {
  const directory = makeTempDir();
  fs.mkdirSync(path.join(directory, "sub"));
  const { watcher, seen } = collect(directory);
  fs.writeFileSync(path.join(directory, "sub/inner"), "");
  fs.writeFileSync(path.join(directory, "top"), "");
  await sleep(100);
  watcher.close();
  assert.deepEqual(seen(), ["create top"]);
  fs.rmSync(directory, { recursive: true });
});

test("WatchDir streams start first, then events, and ends when the client goes away", async () => {
  const directory = makeTempDir();
  const controller = new AbortController();
  const messages: unknown[] = [];
  const done = filesystemService.streams.WatchDir!({ path: directory, recursive: true }, rpcContext(rootUser, controller.signal), (message) => messages.push(message));
  await sleep(20);
  fs.writeFileSync(path.join(directory, "x"), "");
  await sleep(100);
  controller.abort();
  await done;
  assert.deepEqual(messages[0], { start: {} });
  assert.deepEqual(messages[1], { filesystem: { name: "x", type: "EVENT_TYPE_CREATE" } });
  fs.rmSync(directory, { recursive: true });
});

test("WatchDir on a missing path or a file fails like upstream", async () => {
  const directory = makeTempDir();
  fs.writeFileSync(path.join(directory, "file"), "");
  const ctx = rpcContext(rootUser);
  await assert.rejects(filesystemService.streams.WatchDir!({ path: path.join(directory, "nope") }, ctx, () => {}), (reason: unknown) => reason instanceof CubicleError && reason.code === "not_found");
  await assert.rejects(filesystemService.streams.WatchDir!({ path: path.join(directory, "file") }, ctx, () => {}), (reason: unknown) => reason instanceof CubicleError && reason.code === "invalid_argument");
  fs.rmSync(directory, { recursive: true });
});

test("the polling watcher RPCs queue, drain and remove", async () => {
  const directory = makeTempDir();
  const ctx = rpcContext(rootUser);
  const { watcherId } = (await filesystemService.unary.CreateWatcher!({ path: directory, include_entry: true }, ctx)) as { watcherId: string };
  fs.writeFileSync(path.join(directory, "polled"), "");
  await sleep(100);
  const first = (await filesystemService.unary.GetWatcherEvents!({ watcherId }, ctx)) as { events: FilesystemEventJson[] };
  assert.equal(first.events[0]!.name, "polled");
  assert.equal(first.events[0]!.type, "EVENT_TYPE_CREATE");
  assert.equal(first.events[0]!.entry?.name, "polled");
  const second = (await filesystemService.unary.GetWatcherEvents!({ watcher_id: watcherId }, ctx)) as { events: FilesystemEventJson[] };
  assert.deepEqual(second.events, []);
  assert.deepEqual(await filesystemService.unary.RemoveWatcher!({ watcherId }, ctx), {});
  await assert.rejects(filesystemService.unary.GetWatcherEvents!({ watcherId }, ctx), (reason: unknown) => reason instanceof CubicleError && reason.code === "not_found");
  fs.rmSync(directory, { recursive: true });
});

test("a user cannot watch a directory it cannot read", { skip: !isRoot && "needs root" }, async () => {
  const directory = makeTempDir();
  fs.chmodSync(directory, 0o700);
  const user = syntheticUser("/tmp");
  await assert.rejects(filesystemService.streams.WatchDir!({ path: directory }, rpcContext(user), () => {}), (reason: unknown) => reason instanceof CubicleError && reason.code === "permission_denied");
  fs.rmSync(directory, { recursive: true });
});

test("WatchDir sends keepalives at the requested interval while idle", async () => {
  const directory = makeTempDir();
  const controller = new AbortController();
  const messages: unknown[] = [];
  const ctx = rpcContext(rootUser, controller.signal, { "keepalive-ping-interval": "1" });
  const done = filesystemService.streams.WatchDir!({ path: directory }, ctx, (message) => messages.push(message));
  await sleep(2300);
  controller.abort();
  await done;
  const keepalives = messages.filter((message) => JSON.stringify(message) === '{"keepalive":{}}').length;
  assert.ok(keepalives >= 1 && keepalives <= 2, `got ${keepalives} keepalives`);
  fs.rmSync(directory, { recursive: true });
});

/** Makes `directories` directories of `filesPerDirectory` empty files under `root`, 50 top-level ones. */
function makeTree(root: string, directories: number, filesPerDirectory: number): void {
  for (let index = 0; index < directories; index++) {
    const directory = path.join(root, `top${index % 50}`, `d${index}`);
    fs.mkdirSync(directory, { recursive: true });
    for (let file = 0; file < filesPerDirectory; file++) fs.writeFileSync(path.join(directory, `f${file}`), "");
  }
}

test("a recursive watch of a big tree does not hold up the agent, and sees events deep in it once started", async () => {
  const directory = makeTempDir();
  makeTree(directory, 4000, 10);
  const controller = new AbortController();
  const messages: Array<{ start?: object; filesystem?: FilesystemEventJson }> = [];
  let done: Promise<void> | undefined;
  const loop = await measureEventLoop(async () => {
    done = filesystemService.streams.WatchDir!({ path: directory, recursive: true }, rpcContext(rootUser, controller.signal), (message) => messages.push(message as never));
    while (messages.length === 0) await sleep(5);
  });
  try {
    assert.deepEqual(messages[0], { start: {} });
    assert.ok(loop.ticks >= 5, `only ${loop.ticks} timers ran while the tree was scanned`);
    assert.ok(loop.longestBusyMs < 100, `the event loop was held for ${Math.round(loop.longestBusyMs)} ms of CPU while the tree was scanned`);
    fs.writeFileSync(path.join(directory, "top49/d3999/late"), "");
    await sleep(150);
    assert.deepEqual(messages.slice(1), [{ filesystem: { name: "top49/d3999/late", type: "EVENT_TYPE_CREATE" } }]);
  } finally {
    controller.abort();
    await done;
    fs.rmSync(directory, { recursive: true });
  }
});

test("a tree over the watcher's limits is refused with failed_precondition, and a tree moved in later is reported", async (t) => {
  const directory = makeTempDir();
  t.after(() => fs.rmSync(directory, { recursive: true, force: true }));
  makeTree(path.join(directory, "big"), 30, 2);
  const options = { user: rootUser, recursive: true, includeEntry: false, onEvent: () => {} };
  const tooManyDirectories = new DirectoryWatcher(path.join(directory, "big"), { ...options, limits: { directories: 20, entries: 1000 } });
  await assert.rejects(tooManyDirectories.ready, (reason: unknown) => reason instanceof CubicleError && reason.code === "failed_precondition" && /more than 20 directories/.test(reason.message));
  const tooManyEntries = new DirectoryWatcher(path.join(directory, "big"), { ...options, limits: { directories: 1000, entries: 50 } });
  await assert.rejects(tooManyEntries.ready, (reason: unknown) => reason instanceof CubicleError && reason.code === "failed_precondition" && /more than 50 entries/.test(reason.message));

  fs.mkdirSync(path.join(directory, "watched"));
  const { watcher, seen } = collect(path.join(directory, "watched"), { recursive: true });
  await watcher.ready;
  fs.renameSync(path.join(directory, "big/top0"), path.join(directory, "watched/moved"));
  await sleep(150);
  watcher.close();
  assert.deepEqual(seen().slice(0, 4), ["create moved", "create moved/d0", "create moved/d0/f0", "create moved/d0/f1"]);
});

test("polled watchers are capped, and removing one makes room", async () => {
  const directory = makeTempDir();
  const ctx = rpcContext(rootUser);
  const ids: string[] = [];
  try {
    for (let index = 0; index < maxPolledWatchers; index++) {
      ids.push(((await filesystemService.unary.CreateWatcher!({ path: directory }, ctx)) as { watcherId: string }).watcherId);
    }
    await assert.rejects(filesystemService.unary.CreateWatcher!({ path: directory }, ctx), (reason: unknown) => reason instanceof CubicleError && reason.code === "resource_exhausted");
    await filesystemService.unary.RemoveWatcher!({ watcherId: ids.pop() }, ctx);
    ids.push(((await filesystemService.unary.CreateWatcher!({ path: directory }, ctx)) as { watcherId: string }).watcherId);
  } finally {
    for (const watcherId of ids) await filesystemService.unary.RemoveWatcher!({ watcherId }, ctx);
    fs.rmSync(directory, { recursive: true });
  }
});

test("WatchDir ends with resource_exhausted when its client stops reading the events", async () => {
  const directory = makeTempDir();
  let unread = 0;
  const ctx = { ...rpcContext(rootUser), pendingBytes: () => unread };
  const messages: unknown[] = [];
  const done = filesystemService.streams.WatchDir!({ path: directory }, ctx, (message) => {
    messages.push(message);
    unread += 4 * 1024 * 1024; // as if nothing sent were ever read
  });
  try {
    while (messages.length === 0) await sleep(5);
    for (let index = 0; index < 5; index++) fs.writeFileSync(path.join(directory, `f${index}`), "");
    await assert.rejects(
      Promise.race([done, sleep(3000).then(() => "still open")]),
      (reason: unknown) => reason instanceof CubicleError && reason.code === "resource_exhausted",
    );
  } finally {
    fs.rmSync(directory, { recursive: true });
  }
});
