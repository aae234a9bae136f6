/**
 * `sandbox.files.*` through the official `e2b` SDK against a real server and real sandboxes:
 * reads and writes of every shape, metadata, watch events, users and permissions, errors.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { FileNotFoundError, FilesystemEventType, NotEnoughSpaceError, NotFoundError, Sandbox, type FilesystemEvent } from "e2b";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

const defaultUser = "user";
const home = "/home/user";
let server: TestServer;
let sandbox: Sandbox;
const base = `${home}/files-e2e`;

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

before(async () => {
  server = await startTestServer();
  useServerForSdk(server);
  sandbox = await Sandbox.create();
});

after(async () => {
  await sandbox?.kill().catch(() => undefined);
  await server?.stop();
});

test("write and read a string (home-relative path)", async () => {
  const relative = base.slice(home.length + 1) + "/hello.txt";
  const info = await sandbox.files.write(relative, "Hello, world!");
  assert.equal(info.path, `${base}/hello.txt`);
  assert.equal(info.name, "hello.txt");
  assert.equal(await sandbox.files.read(relative), "Hello, world!");
  assert.equal(await sandbox.files.read(`${base}/hello.txt`), "Hello, world!");
});

test("write and read bytes, blob and stream", async () => {
  const bytes = new Uint8Array(300_000).map((_, index) => index % 251);
  await sandbox.files.write(`${base}/bin/data.bin`, bytes.buffer);
  assert.deepEqual(await sandbox.files.read(`${base}/bin/data.bin`, { format: "bytes" }), bytes);
  const blob = await sandbox.files.read(`${base}/bin/data.bin`, { format: "blob" });
  assert.equal(blob.size, bytes.length);
  const stream = await sandbox.files.read(`${base}/bin/data.bin`, { format: "stream" });
  let total = 0;
  for await (const chunk of stream) total += chunk.length;
  assert.equal(total, bytes.length);
});

test("an empty file reads as an empty string", async () => {
  await sandbox.files.write(`${base}/empty.txt`, "");
  assert.equal(await sandbox.files.read(`${base}/empty.txt`), "");
});

test("multi-file write with directories and unicode names", async () => {
  const infos = await sandbox.files.write([
    { path: `${base}/multi/dir one/ä ö ü.txt`, data: "umlauts" },
    { path: `${base}/multi/日本/語.txt`, data: "japanese" },
    { path: "fs-dev-relative.txt", data: "relative" },
  ]);
  assert.deepEqual(
    infos.map((info) => info.path),
    [`${base}/multi/dir one/ä ö ü.txt`, `${base}/multi/日本/語.txt`, `${home}/fs-dev-relative.txt`],
  );
  assert.equal(await sandbox.files.read(`${base}/multi/dir one/ä ö ü.txt`), "umlauts");
  assert.equal(await sandbox.files.read(`${base}/multi/日本/語.txt`), "japanese");
  await sandbox.files.remove("fs-dev-relative.txt");
});

test("gzip upload and gzip download", async () => {
  const text = "zip me ".repeat(10_000);
  await sandbox.files.write(`${base}/gz/text.txt`, text, { gzip: true });
  assert.equal(await sandbox.files.read(`${base}/gz/text.txt`, { gzip: true }), text);
  assert.equal(await sandbox.files.read(`${base}/gz/text.txt`), text);
});

test("octet-stream upload from a stream", async () => {
  const stream = new ReadableStream<Uint8Array>({
    start(controller) {
      for (let index = 0; index < 10; index++) controller.enqueue(new TextEncoder().encode(`line ${index}\n`));
      controller.close();
    },
  });
  await sandbox.files.write(`${base}/streamed.txt`, stream);
  assert.equal((await sandbox.files.read(`${base}/streamed.txt`)).split("\n").length, 11);
});

test("metadata round trip: write, getInfo, list, replace", async () => {
  const info = await sandbox.files.write(`${base}/meta.txt`, "m", { metadata: { owner: "alice", "build-id": "42" } });
  assert.deepEqual(info.metadata, { owner: "alice", "build-id": "42" });
  assert.deepEqual((await sandbox.files.getInfo(`${base}/meta.txt`)).metadata, { owner: "alice", "build-id": "42" });
  const listed = (await sandbox.files.list(base)).find((entry) => entry.name === "meta.txt");
  assert.deepEqual(listed?.metadata, { owner: "alice", "build-id": "42" });
  await sandbox.files.write(`${base}/meta.txt`, "m2");
  assert.equal((await sandbox.files.getInfo(`${base}/meta.txt`)).metadata, undefined);
});

test("metadata is stored as user.e2b.* xattrs, and an xattr set inside the sandbox is metadata (getInfo, list, watch)", async () => {
  const file = `${base}/xattr.txt`;
  await sandbox.files.write(file, "x", { metadata: { owner: "alice" } });
  const read = await sandbox.commands.run(`python3 -c "import os; print(os.getxattr('${file}', 'user.e2b.owner').decode())"`);
  assert.equal(read.stdout.trim(), "alice");

  const watched = `${base}/xattr-watch`;
  await sandbox.files.makeDir(watched);
  const events: FilesystemEvent[] = [];
  const handle = await sandbox.files.watchDir(watched, (event) => void events.push(event), { includeEntry: true });
  try {
    // As the default user, as a program in the sandbox would: no API involved.
    const inner = `${watched}/inner.txt`;
    await sandbox.commands.run(`python3 -c "import os; open('${inner}', 'w').write('i'); os.setxattr('${inner}', 'user.e2b.author', b'ada'); open('${inner}', 'a').write('j')"`);
    assert.deepEqual((await sandbox.files.getInfo(inner)).metadata, { author: "ada" });
    assert.deepEqual((await sandbox.files.list(watched)).find((entry) => entry.name === "inner.txt")?.metadata, { author: "ada" });
    await sandbox.commands.run(`mv ${inner} ${watched}/renamed.txt`);
    assert.deepEqual((await sandbox.files.getInfo(`${watched}/renamed.txt`)).metadata, { author: "ada" }, "metadata follows the inode through a rename inside the sandbox");
    for (let waited = 0; waited < 5000 && !events.some((event) => event.entry?.metadata?.author === "ada"); waited += 100) await sleep(100);
    assert.ok(events.some((event) => event.name === "inner.txt" && event.type === FilesystemEventType.WRITE && event.entry?.metadata?.author === "ada"), `a watch event carries the metadata: ${JSON.stringify(events)}`);
  } finally {
    await handle.stop();
  }
  // Files without user.e2b.* attributes have no metadata field at all.
  await sandbox.commands.run(`touch ${file}.plain && python3 -c "import os; os.setxattr('${file}.plain', 'user.other', b'1')"`);
  assert.equal((await sandbox.files.getInfo(`${file}.plain`)).metadata, undefined);
});

test("a file the user cannot read shows them no metadata; they cannot set metadata on a file they cannot write", async () => {
  const secret = `${base}/root-only.txt`;
  await sandbox.files.write(secret, "s", { user: "root", metadata: { classified: "yes" } });
  await sandbox.commands.run(`chmod 600 ${secret}`, { user: "root" });
  assert.deepEqual((await sandbox.files.getInfo(secret, { user: "root" })).metadata, { classified: "yes" });
  const seenByUser = await sandbox.files.getInfo(secret);
  assert.equal(seenByUser.name, "root-only.txt", "the user can stat it");
  assert.equal(seenByUser.metadata, undefined, "but not read its attributes");
  const attempt = await sandbox.commands.run(`python3 -c "import os; os.setxattr('/etc/hostname', 'user.e2b.x', b'1')"`).catch((error: { stderr?: string }) => error);
  assert.match(String((attempt as { stderr?: string }).stderr), /PermissionError|Operation not permitted|Permission denied/);
  assert.equal((await sandbox.files.getInfo("/etc/hostname")).metadata, undefined);
});

test("reading a missing file throws FileNotFoundError", async () => {
  await assert.rejects(sandbox.files.read(`${base}/does-not-exist`), (error: unknown) => {
    assert.ok(error instanceof FileNotFoundError, String(error));
    assert.match((error as Error).message, /does not exist/);
    return true;
  });
});

test("exists and getInfo", async () => {
  assert.equal(await sandbox.files.exists(`${base}/hello.txt`), true);
  assert.equal(await sandbox.files.exists(`${base}/nope`), false);
  const info = await sandbox.files.getInfo(`${base}/hello.txt`);
  assert.equal(info.type, "file");
  assert.equal(info.size, 13);
  assert.equal(info.owner, defaultUser);
  assert.equal(info.group, defaultUser);
  assert.match(info.permissions, /^-rw-/);
  assert.ok(info.modifiedTime instanceof Date && Math.abs(info.modifiedTime.getTime() - Date.now()) < 60_000);
  await assert.rejects(sandbox.files.getInfo(`${base}/nope`), FileNotFoundError);
});

test("list with depth, and symlinks", async () => {
  // Throws CommandExitError when ln fails, which fails the test.
  const ln = await sandbox.commands.run(`ln -s ${base}/multi ${base}/link-to-multi`);
  assert.equal(ln.exitCode, 0, ln.stderr);
  const depth1 = await sandbox.files.list(base);
  const names1 = depth1.map((entry) => entry.name).sort();
  assert.ok(names1.includes("multi") && names1.includes("hello.txt"), names1.join(","));
  assert.ok(!depth1.some((entry) => entry.path.includes("/multi/")));
  const depth3 = await sandbox.files.list(base, { depth: 3 });
  assert.ok(depth3.some((entry) => entry.path === `${base}/multi/dir one/ä ö ü.txt`));
  const link = depth1.find((entry) => entry.name === "link-to-multi");
  assert.ok(link, `link-to-multi is not listed: ${names1.join(",")}`);
  assert.equal(link.path, `${base}/link-to-multi`);
  assert.equal(link.type, "dir", "a link to a directory has the directory's type");
  assert.equal(link.symlinkTarget, `${base}/multi`);
  assert.equal(depth1.find((entry) => entry.name === "multi")?.symlinkTarget, undefined, "a plain directory has no symlinkTarget");
  await assert.rejects(sandbox.files.list(`${base}/nope`), NotFoundError);
});

test("makeDir returns true, then false for an existing directory", async () => {
  assert.equal(await sandbox.files.makeDir(`${base}/made/a/b`), true);
  assert.equal(await sandbox.files.makeDir(`${base}/made/a/b`), false);
  assert.equal((await sandbox.files.getInfo(`${base}/made/a`)).owner, defaultUser);
});

test("rename and remove", async () => {
  await sandbox.files.write(`${base}/to-move.txt`, "moving");
  const moved = await sandbox.files.rename(`${base}/to-move.txt`, `${base}/moved/here.txt`);
  assert.equal(moved.path, `${base}/moved/here.txt`);
  assert.equal(await sandbox.files.exists(`${base}/to-move.txt`), false);
  assert.equal(await sandbox.files.read(`${base}/moved/here.txt`), "moving");
  await assert.rejects(sandbox.files.rename(`${base}/nope`, `${base}/x`), FileNotFoundError);
  await sandbox.files.remove(`${base}/moved`);
  assert.equal(await sandbox.files.exists(`${base}/moved`), false);
  await sandbox.files.remove(`${base}/moved`);
});

test("watchDir reports create, write, rename and remove, recursively", async () => {
  const watched = `${base}/watched`;
  await sandbox.files.makeDir(`${watched}/sub`);
  const events: FilesystemEvent[] = [];
  const handle = await sandbox.files.watchDir(watched, (event) => void events.push(event), { recursive: true, includeEntry: true });
  await sandbox.files.write(`${watched}/a.txt`, "a");
  await sandbox.files.write(`${watched}/sub/b.txt`, "b");
  await sleep(200);
  await sandbox.files.rename(`${watched}/a.txt`, `${watched}/c.txt`);
  await sleep(200);
  await sandbox.files.remove(`${watched}/c.txt`);
  await sleep(300);
  await handle.stop();
  const seen = events.map((event) => `${event.type} ${event.name}`);
  for (const expected of [
    `${FilesystemEventType.CREATE} a.txt`,
    `${FilesystemEventType.WRITE} a.txt`,
    `${FilesystemEventType.CREATE} sub/b.txt`,
    `${FilesystemEventType.RENAME} a.txt`,
    `${FilesystemEventType.CREATE} c.txt`,
    `${FilesystemEventType.REMOVE} c.txt`,
  ]) {
    assert.ok(seen.includes(expected), `missing "${expected}" in ${JSON.stringify(seen)}`);
  }
  const created = events.find((event) => event.name === "a.txt" && event.type === FilesystemEventType.CREATE);
  assert.equal(created?.entry?.path, `${watched}/a.txt`);
});

test("the default user cannot read /root; root can", async () => {
  await assert.rejects(sandbox.files.read("/root/.bashrc"), (error: unknown) => !(error instanceof FileNotFoundError) && /permission denied/.test(String(error)));
  await assert.rejects(sandbox.files.list("/root"), /permission denied/);
  await assert.rejects(sandbox.files.write("/root/not-allowed.txt", "x"), /permission denied/);
  assert.equal(await sandbox.files.exists("/root/not-allowed.txt", { user: "root" }), false);
  await sandbox.files.write("/root/fs-dev-root.txt", "root only", { user: "root" });
  assert.equal(await sandbox.files.read("/root/fs-dev-root.txt", { user: "root" }), "root only");
  assert.equal((await sandbox.files.getInfo("/root/fs-dev-root.txt", { user: "root" })).owner, "root");
  const rootList = await sandbox.files.list("/root", { user: "root" });
  assert.ok(rootList.some((entry) => entry.name === "fs-dev-root.txt"));
  await sandbox.files.remove("/root/fs-dev-root.txt", { user: "root" });
  // ~ is root's home for root.
  const rootHome = await sandbox.files.write("fs-dev-root-home.txt", "x", { user: "root" });
  assert.equal(rootHome.path, "/root/fs-dev-root-home.txt");
  await sandbox.files.remove("fs-dev-root-home.txt", { user: "root" });
});

test("writes make missing parents the default user could not make, like upstream; existing files keep their permissions", async () => {
  const top = `/newdir-${Date.now().toString(36)}`;
  const single = await sandbox.files.write(`${top}/file.txt`, "made");
  assert.equal(single.path, `${top}/file.txt`);
  assert.equal(await sandbox.files.read(`${top}/file.txt`), "made");
  await sandbox.files.write([
    { path: `${top}-multi/a.txt`, data: "a" },
    { path: `${top}-multi/deeper/b.txt`, data: "b" },
  ]);
  assert.equal(await sandbox.files.read(`${top}-multi/deeper/b.txt`), "b");
  const owners = await sandbox.commands.run(`stat -c '%U:%G %a %n' ${top} ${top}/file.txt ${top}-multi ${top}-multi/deeper ${top}-multi/deeper/b.txt`);
  assert.deepEqual(
    owners.stdout.trim().split("\n").map((line) => line.split(" ").slice(0, 1)[0]),
    Array(5).fill(`${defaultUser}:${defaultUser}`),
    owners.stdout,
  );
  await assert.rejects(sandbox.files.write("/etc/passwd", "x"), /permission denied/);
  await assert.rejects(sandbox.files.write("/etc/not-the-users.txt", "x"), /permission denied/);
  assert.match((await sandbox.files.read("/etc/passwd")), /^root:/);
  // Code in the sandbox cannot steer root's directory making: a link of the user's to /etc.
  await sandbox.commands.run(`ln -sfn /etc ${home}/link-to-etc`);
  await assert.rejects(sandbox.files.write(`${home}/link-to-etc/cubicle-planted/x`, "x"), /permission denied/);
  assert.equal(await sandbox.files.exists("/etc/cubicle-planted", { user: "root" }), false);
  await sandbox.commands.run(`rm -rf ${top} ${top}-multi ${home}/link-to-etc`, { user: "root" });
});

test("concurrent reads and writes as two users keep their identities", async () => {
  const tasks: Array<Promise<unknown>> = [];
  for (let index = 0; index < 30; index++) {
    const asRoot = index % 2 === 1;
    const target = asRoot ? `/root/fs-dev-concurrent-${index}.txt` : `${base}/concurrent/${index}.txt`;
    tasks.push(
      (async () => {
        await sandbox.files.write(target, `payload ${index} `.repeat(5000), asRoot ? { user: "root" } : undefined);
        const info = await sandbox.files.getInfo(target, asRoot ? { user: "root" } : undefined);
        assert.equal(info.owner, asRoot ? "root" : defaultUser, target);
        assert.equal((await sandbox.files.read(target, asRoot ? { user: "root" } : undefined)).length, `payload ${index} `.length * 5000);
        if (asRoot) await sandbox.files.remove(target, { user: "root" });
      })(),
    );
    if (!asRoot) tasks.push(assert.rejects(sandbox.files.read("/root/.profile"), /permission denied|not found/));
  }
  await Promise.all(tasks);
});

test("a full disk surfaces as NotEnoughSpaceError (writes past the sandbox's disk quota)", async () => {
  // diskSizeMB is a Cubicle extension of the create body; the SDK then connects to the sandbox.
  const created = await server.api("POST", "/v2/sandboxes", { templateID: "base", timeout: 120, diskSizeMB: 256 });
  assert.equal(created.status, 201, JSON.stringify(created.json));
  const small = await Sandbox.connect(created.json.sandboxID);
  try {
    await small.commands.run("head -c 300M /dev/zero > /home/user/fill || true");
    await assert.rejects(small.files.write("/home/user/more", "x".repeat(4_000_000)), NotEnoughSpaceError);
    await assert.rejects(small.files.write("/home/user/more-gzip", "x".repeat(4_000_000), { gzip: true }), NotEnoughSpaceError);
    // Space freed, writes work again.
    await small.commands.run("rm /home/user/fill");
    await small.files.write("/home/user/more", "x".repeat(4_000_000));
  } finally {
    await small.kill();
  }
});


test("a signed uploadUrl takes browser-style forms (a plain field, a Blob), as user and as root, and answers the entry list", async () => {
  for (const user of ["user", "root"] as const) {
    const directory = user === "root" ? "/root/form-uploads" : `${base}/form-uploads`;
    for (const [shape, fill] of [
      ["field", (form: FormData, text: string) => form.append("file", text)],
      ["blob", (form: FormData, text: string) => form.append("file", new Blob([text]))],
    ] as const) {
      const target = `${directory}/${shape}.txt`;
      const text = `a ${shape} from a form, as ${user}`;
      const url = await sandbox.uploadUrl(target, { user, useSignatureExpiration: 60_000 });
      const form = new FormData();
      form.append("note", "a field that is not the file");
      fill(form, text);
      const response = await fetch(url, { method: "POST", body: form });
      const answer = await response.text();
      assert.equal(response.status, 200, `${user} ${shape}: ${answer}`);
      assert.deepEqual(JSON.parse(answer), [{ path: target, name: `${shape}.txt`, type: "file" }]);
      assert.equal(await sandbox.files.read(target, { user }), text);
      const owner = await sandbox.commands.run(`stat -c %U ${target}`, { user: "root" });
      assert.equal(owner.stdout.trim(), user, "written as the signed URL's user");
    }
  }
});

test("signed download and upload URLs work without routing headers", async () => {
  await sandbox.files.write(`${base}/signed.txt`, "signed content");
  const downloadUrl = await sandbox.downloadUrl(`${base}/signed.txt`, { useSignatureExpiration: 60_000 });
  const download = await fetch(downloadUrl);
  assert.equal(download.status, 200);
  assert.equal(await download.text(), "signed content");
  const uploadUrl = await sandbox.uploadUrl(`${base}/uploaded.txt`);
  const form = new FormData();
  form.append("file", new Blob(["uploaded via url"]), `${base}/uploaded.txt`);
  const upload = await fetch(uploadUrl, { method: "POST", body: form });
  assert.equal(upload.status, 200);
  assert.equal(await sandbox.files.read(`${base}/uploaded.txt`), "uploaded via url");
  const tampered = await fetch(downloadUrl.replace(/signature=[^&]+/, "signature=v1_bogus"), { headers: { "e2b-sandbox-id": sandbox.sandboxId, "e2b-sandbox-port": "49983" } });
  assert.equal(tampered.status, 401);
});
