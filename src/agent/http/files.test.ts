import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import zlib from "node:zlib";
import type { AddressInfo } from "node:net";
import net from "node:net";
import { fifoWithDelayedWriter, isRoot, makeTempDir, withTmpfs } from "../filesystem/test-helpers.js";
import { handleFilesRequest } from "./files.js";
import { statPath } from "../filesystem/operations.js";
import { lookupUser } from "../users.js";

let server: http.Server;
let port: number;
let directory: string;

before(async () => {
  directory = makeTempDir("cubicle-files-");
  server = http.createServer((req, res) => {
    const username = new URL(req.url ?? "/", "http://x").searchParams.get("username") ?? undefined;
    void handleFilesRequest(req, res, { username, defaultUser: "root" });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  port = (server.address() as AddressInfo).port;
});

after(() => {
  server.close();
  fs.rmSync(directory, { recursive: true, force: true });
});

interface Reply {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

/** Sends a request, writing the body in `chunkSize`-byte pieces to shake out framing bugs. */
function send(method: string, query: Record<string, string>, headers: http.OutgoingHttpHeaders = {}, body?: Buffer, chunkSize = 7): Promise<Reply> {
  const search = new URLSearchParams(query).toString();
  return new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, method, path: `/files?${search}`, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (chunk: Buffer) => chunks.push(chunk));
      res.on("end", () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks) }));
    });
    req.on("error", reject);
    void (async () => {
      if (body) {
        for (let offset = 0; offset < body.length; offset += chunkSize) {
          req.write(body.subarray(offset, offset + chunkSize));
          if (offset % (chunkSize * 16) === 0) await new Promise((r) => setImmediate(r));
        }
      }
      req.end();
    })();
  });
}

function multipart(parts: Array<{ filename: string; data: string | Buffer; name?: string }>): { body: Buffer; contentType: string } {
  const boundary = "----cubicle-test-boundary";
  const pieces: Buffer[] = [];
  for (const part of parts) {
    // Raw UTF-8 in the filename, as undici's FormData sends it.
    pieces.push(Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="${part.name ?? "file"}"; filename="${part.filename}"\r\nContent-Type: application/octet-stream\r\n\r\n`, "utf8"));
    pieces.push(Buffer.isBuffer(part.data) ? part.data : Buffer.from(part.data));
    pieces.push(Buffer.from("\r\n"));
  }
  pieces.push(Buffer.from(`--${boundary}--\r\n`));
  return { body: Buffer.concat(pieces), contentType: `multipart/form-data; boundary=${boundary}` };
}

test("a multi-file multipart upload writes every part to its full-path filename", async () => {
  const { body, contentType } = multipart([
    { filename: path.join(directory, "dir one/ä ö.txt"), data: "unicode" },
    { filename: path.join(directory, "nested/a/b/c.bin"), data: Buffer.from([0, 1, 2, 255]) },
    { filename: path.join(directory, "empty"), data: "" },
  ]);
  const reply = await send("POST", {}, { "Content-Type": contentType }, body);
  assert.equal(reply.status, 200, reply.body.toString());
  const entries = JSON.parse(reply.body.toString());
  assert.deepEqual(entries, [
    { path: path.join(directory, "dir one/ä ö.txt"), name: "ä ö.txt", type: "file" },
    { path: path.join(directory, "nested/a/b/c.bin"), name: "c.bin", type: "file" },
    { path: path.join(directory, "empty"), name: "empty", type: "file" },
  ]);
  assert.equal(fs.readFileSync(path.join(directory, "dir one/ä ö.txt"), "utf8"), "unicode");
  assert.deepEqual([...fs.readFileSync(path.join(directory, "nested/a/b/c.bin"))], [0, 1, 2, 255]);
  assert.equal(fs.readFileSync(path.join(directory, "empty")).length, 0);
});

test("home-relative filenames resolve against the user's home", { skip: !isRoot && "needs root" }, async () => {
  const name = `cubicle-files-test-${process.pid}.txt`;
  const { body, contentType } = multipart([{ filename: name, data: "in home" }]);
  const reply = await send("POST", {}, { "Content-Type": contentType }, body);
  assert.equal(reply.status, 200, reply.body.toString());
  const home = lookupUser("root").home;
  assert.equal(JSON.parse(reply.body.toString())[0].path, path.join(home, name));
  fs.rmSync(path.join(home, name));
});

test("the same destination twice in one upload is a 400 and the first part stays written", async () => {
  const target = path.join(directory, "dup.txt");
  const { body, contentType } = multipart([
    { filename: target, data: "first" },
    { filename: target, data: "second" },
  ]);
  const reply = await send("POST", {}, { "Content-Type": contentType }, body);
  assert.equal(reply.status, 400);
  const error = JSON.parse(reply.body.toString());
  assert.equal(error.code, 400);
  assert.match(error.message, /you cannot upload multiple files to the same path/);
  assert.equal(fs.readFileSync(target, "utf8"), "first");
});

test("an octet-stream upload needs a path, and gzip bodies are decompressed", async () => {
  const target = path.join(directory, "octet/stream.txt");
  const content = Buffer.from("compressed ".repeat(1000));
  const reply = await send("POST", { path: target }, { "Content-Type": "application/octet-stream", "Content-Encoding": "gzip" }, zlib.gzipSync(content));
  assert.equal(reply.status, 200, reply.body.toString());
  assert.deepEqual(JSON.parse(reply.body.toString()), [{ path: target, name: "stream.txt", type: "file" }]);
  assert.deepEqual(fs.readFileSync(target), content);

  const missingPath = await send("POST", {}, { "Content-Type": "application/octet-stream" }, Buffer.from("x"));
  assert.equal(missingPath.status, 400);
  const badGzip = await send("POST", { path: target }, { "Content-Type": "application/octet-stream", "Content-Encoding": "gzip" }, Buffer.from("not gzip"));
  assert.equal(badGzip.status, 400);
  const unsupported = await send("POST", { path: target }, { "Content-Type": "text/plain" }, Buffer.from("x"));
  assert.equal(unsupported.status, 400);
});

test("a gzip multipart upload works too", async () => {
  const target = path.join(directory, "gz-multipart.txt");
  const { body, contentType } = multipart([{ filename: target, data: "zipped part" }]);
  const reply = await send("POST", {}, { "Content-Type": contentType, "Content-Encoding": "gzip" }, zlib.gzipSync(body));
  assert.equal(reply.status, 200, reply.body.toString());
  assert.equal(fs.readFileSync(target, "utf8"), "zipped part");
});

test("X-Metadata headers replace the metadata set, are returned and validated", async () => {
  const target = path.join(directory, "meta.txt");
  const first = await send("POST", { path: target }, { "Content-Type": "application/octet-stream", "X-Metadata-Owner": "alice", "x-metadata-stage": "draft" }, Buffer.from("1"));
  assert.equal(first.status, 200, first.body.toString());
  assert.deepEqual(JSON.parse(first.body.toString())[0].metadata, { owner: "alice", stage: "draft" });
  assert.deepEqual(statPath({ name: "root", uid: 0, gid: 0, groups: [0], home: "/root", shell: "/bin/sh" }, target).entry.metadata, { owner: "alice", stage: "draft" });

  const second = await send("POST", { path: target }, { "Content-Type": "application/octet-stream" }, Buffer.from("2"));
  assert.equal(JSON.parse(second.body.toString())[0].metadata, undefined);
  assert.equal(statPath({ name: "root", uid: 0, gid: 0, groups: [0], home: "/root", shell: "/bin/sh" }, target).entry.metadata, undefined, "an upload without headers clears it");

  const tooLong = await send("POST", { path: target }, { "Content-Type": "application/octet-stream", "X-Metadata-Big": "v".repeat(5000) }, Buffer.from("3"));
  assert.equal(tooLong.status, 400);
  assert.match(JSON.parse(tooLong.body.toString()).message, /total metadata size/);
});

test("a download returns raw bytes, gzip when asked, and upstream's errors", async () => {
  const target = path.join(directory, "download.bin");
  const content = Buffer.alloc(100_000, "abc");
  fs.writeFileSync(target, content);

  const plain = await send("GET", { path: target });
  assert.equal(plain.status, 200);
  assert.equal(plain.headers["content-length"], String(content.length));
  assert.deepEqual(plain.body, content);

  const zipped = await send("GET", { path: target }, { "Accept-Encoding": "gzip" });
  assert.equal(zipped.headers["content-encoding"], "gzip");
  assert.deepEqual(zlib.gunzipSync(zipped.body), content);
  assert.ok(zipped.body.length < content.length);

  const identity = await send("GET", { path: target }, { "Accept-Encoding": "gzip;q=0.5, identity" });
  assert.equal(identity.headers["content-encoding"], undefined);
  const refused = await send("GET", { path: target }, { "Accept-Encoding": "br, identity;q=0" });
  assert.equal(refused.status, 406);

  const missing = await send("GET", { path: path.join(directory, "missing") });
  assert.equal(missing.status, 404);
  assert.deepEqual(JSON.parse(missing.body.toString()), { code: 404, message: `path '${path.join(directory, "missing")}' does not exist` });

  const isDirectory = await send("GET", { path: directory });
  assert.equal(isDirectory.status, 400);
  assert.match(JSON.parse(isDirectory.body.toString()).message, /is a directory/);

  const unknownUser = await send("GET", { path: target, username: "no-such-user-here" });
  assert.equal(unknownUser.status, 401);
});

test("a non-root user cannot read or write where it has no permission, and owns what it writes", { skip: !isRoot && "needs root" }, async () => {
  const nobody = lookupUser("nobody");
  const secret = path.join(directory, "secret");
  fs.mkdirSync(secret, { mode: 0o700 });
  fs.writeFileSync(path.join(secret, "key"), "k");
  const shared = path.join(directory, "shared");
  fs.mkdirSync(shared);
  fs.chmodSync(shared, 0o777);

  const read = await send("GET", { path: path.join(secret, "key"), username: "nobody" });
  assert.equal(read.status, 403, read.body.toString());
  const write = await send("POST", { path: path.join(secret, "new"), username: "nobody" }, { "Content-Type": "application/octet-stream" }, Buffer.from("x"));
  assert.equal(write.status, 403, write.body.toString());
  assert.equal(fs.existsSync(path.join(secret, "new")), false);

  const { body, contentType } = multipart([{ filename: path.join(shared, "deep/dir/file.txt"), data: "mine" }]);
  const allowed = await send("POST", { username: "nobody" }, { "Content-Type": contentType }, body);
  assert.equal(allowed.status, 200, allowed.body.toString());
  assert.equal(fs.statSync(path.join(shared, "deep")).uid, nobody.uid);
  assert.equal(fs.statSync(path.join(shared, "deep/dir/file.txt")).uid, nobody.uid);
  assert.equal(fs.statSync(path.join(shared, "deep/dir/file.txt")).gid, nobody.gid);
});

test("missing parents the user could not make are made as root and handed to it, like upstream; nothing else is", { skip: !isRoot && "needs root" }, async () => {
  const nobody = lookupUser("nobody");
  // Searchable by everyone (a temp dir is 0700), under the sticky /tmp: no entry on the way is nobody's to rename.
  const base = path.join(directory, "parents");
  fs.mkdirSync(base);
  fs.chmodSync(directory, 0o755);
  const rootOnly = path.join(base, "ro");
  fs.mkdirSync(rootOnly, { mode: 0o755 });
  fs.writeFileSync(path.join(rootOnly, "existing"), "root's", { mode: 0o644 });
  const octet = { "Content-Type": "application/octet-stream" };

  const made = await send("POST", { path: path.join(rootOnly, "new/deeper/file.txt"), username: "nobody" }, octet, Buffer.from("mine"));
  assert.equal(made.status, 200, made.body.toString());
  for (const part of ["new", "new/deeper", "new/deeper/file.txt"]) {
    const stats = fs.statSync(path.join(rootOnly, part));
    assert.deepEqual([stats.uid, stats.gid], [nobody.uid, nobody.gid], `${part} is nobody's`);
  }
  assert.equal(fs.statSync(path.join(rootOnly, "new")).mode & 0o777, 0o755);
  const { body, contentType } = multipart([{ filename: path.join(rootOnly, "other/file.txt"), data: "mine too" }]);
  const multi = await send("POST", { username: "nobody" }, { "Content-Type": contentType }, body);
  assert.equal(multi.status, 200, multi.body.toString());
  assert.equal(fs.statSync(path.join(rootOnly, "other")).uid, nobody.uid);

  const overwrite = await send("POST", { path: path.join(rootOnly, "existing"), username: "nobody" }, octet, Buffer.from("x"));
  assert.equal(overwrite.status, 403, "an existing file keeps its permissions");
  assert.equal(fs.readFileSync(path.join(rootOnly, "existing"), "utf8"), "root's");
  const inRootDir = await send("POST", { path: path.join(rootOnly, "file-in-root-dir"), username: "nobody" }, octet, Buffer.from("x"));
  assert.equal(inRootDir.status, 403, "a new file directly in root's directory is still refused");

  // A way nobody could change (a root directory inside a world-writable, non-sticky one): nothing is made as root.
  const shared = path.join(base, "shared");
  fs.mkdirSync(shared);
  fs.chmodSync(shared, 0o777);
  fs.mkdirSync(path.join(shared, "ro2"), { mode: 0o755 });
  const swappable = await send("POST", { path: path.join(shared, "ro2/x/file"), username: "nobody" }, octet, Buffer.from("x"));
  assert.equal(swappable.status, 403, swappable.body.toString());
  assert.equal(fs.existsSync(path.join(shared, "ro2/x")), false);
  // Nor through a root-owned symlink whose real way nobody could change.
  fs.symlinkSync(path.join(shared, "ro2"), path.join(base, "link"));
  const linked = await send("POST", { path: path.join(base, "link/y/file"), username: "nobody" }, octet, Buffer.from("x"));
  assert.equal(linked.status, 403, linked.body.toString());
  assert.equal(fs.existsSync(path.join(shared, "ro2/y")), false);
  // Nor through a link of nobody's (in a directory it may write) to root's directory.
  fs.mkdirSync(path.join(base, "nobodys"), { mode: 0o755 });
  fs.chownSync(path.join(base, "nobodys"), nobody.uid, nobody.gid);
  fs.symlinkSync(rootOnly, path.join(base, "nobodys/link"));
  fs.lchownSync(path.join(base, "nobodys/link"), nobody.uid, nobody.gid);
  const steered = await send("POST", { path: path.join(base, "nobodys/link/planted/file"), username: "nobody" }, octet, Buffer.from("x"));
  assert.equal(steered.status, 403, steered.body.toString());
  assert.equal(fs.existsSync(path.join(rootOnly, "planted")), false);
  // Nor where nobody cannot search.
  fs.mkdirSync(path.join(base, "secret"), { mode: 0o700 });
  const hidden = await send("POST", { path: path.join(base, "secret/x/file"), username: "nobody" }, octet, Buffer.from("x"));
  assert.equal(hidden.status, 403, hidden.body.toString());
  assert.equal(fs.existsSync(path.join(base, "secret/x")), false);
});

test("concurrent uploads by different users each get their own ownership", { skip: !isRoot && "needs root" }, async () => {
  const nobody = lookupUser("nobody");
  const shared = path.join(directory, "concurrent");
  fs.mkdirSync(shared);
  fs.chmodSync(shared, 0o777);
  const big = Buffer.alloc(256 * 1024, "z");
  const uploads = Array.from({ length: 20 }, (_, index) => {
    const username = index % 2 === 0 ? "nobody" : "root";
    return send("POST", { path: path.join(shared, `${username}-${index}/f`), username }, { "Content-Type": "application/octet-stream" }, big, 4096);
  });
  const replies = await Promise.all(uploads);
  for (const reply of replies) assert.equal(reply.status, 200, reply.body.toString());
  for (let index = 0; index < 20; index++) {
    const expectedUid = index % 2 === 0 ? nobody.uid : 0;
    const username = index % 2 === 0 ? "nobody" : "root";
    const stats = fs.statSync(path.join(shared, `${username}-${index}/f`));
    assert.equal(stats.uid, expectedUid);
    assert.equal(stats.size, big.length);
    assert.equal(fs.statSync(path.join(shared, `${username}-${index}`)).uid, expectedUid);
  }
});

test("a full disk answers 507 (octet-stream and multipart) and the connection survives", { skip: !isRoot && "needs root (mounts a small tmpfs)" }, async () => {
  await withTmpfs("size=64k", async (small) => {
    const big = Buffer.alloc(512 * 1024, "f");
    const octet = await send("POST", { path: path.join(small, "octet") }, { "Content-Type": "application/octet-stream" }, big, 65536);
    assert.equal(octet.status, 507, octet.body.toString());
    assert.equal(JSON.parse(octet.body.toString()).code, 507);
    const { body, contentType } = multipart([{ filename: path.join(small, "form"), data: big }]);
    const form = await send("POST", {}, { "Content-Type": contentType }, body, 65536);
    assert.equal(form.status, 507, form.body.toString());
  });
});

/** The parsed `{code, message}` body of a reply, checked to be an envd error without a stack. */
function errorBody(reply: Reply): { code: number; message: string } {
  const body = JSON.parse(reply.body.toString()) as { code: number; message: string };
  assert.equal(body.code, reply.status);
  assert.equal(typeof body.message, "string");
  assert.doesNotMatch(body.message, /\n\s+at /, "no stack trace in a response");
  return body;
}

test("reading or writing a FIFO answers 400 at once instead of blocking the agent", async () => {
  const fifo = path.join(directory, "pipe");
  // Should the agent block on the FIFO, a writer shows up after 1.5 s and releases it: the test then fails on time, not by hanging.
  const release = await fifoWithDelayedWriter(fifo, 1500);
  try {
    const started = Date.now();
    const read = await send("GET", { path: fifo });
    assert.equal(read.status, 400, read.body.toString());
    assert.match(errorBody(read).message, /named pipe/);
    const write = await send("POST", { path: fifo }, { "Content-Type": "application/octet-stream" }, Buffer.from("x"));
    assert.equal(write.status, 400, write.body.toString());
    assert.match(errorBody(write).message, /named pipe/);
    const { body, contentType } = multipart([{ filename: fifo, data: "x" }]);
    const form = await send("POST", {}, { "Content-Type": contentType }, body);
    assert.equal(form.status, 400, form.body.toString());
    assert.ok(Date.now() - started < 1000, `the FIFO requests took ${Date.now() - started} ms`);
  } finally {
    release();
  }
});

test("sockets and devices are refused with 400 for reads and writes; a symlink to one too", async () => {
  const socketPath = path.join(directory, "sock");
  const listener = net.createServer().listen(socketPath);
  await new Promise((resolve) => listener.once("listening", resolve));
  fs.symlinkSync("/dev/zero", path.join(directory, "zero-link"));
  try {
    for (const [target, kind] of [
      [socketPath, /socket/],
      ["/dev/zero", /character device/],
      ["/dev/null", /character device/],
      [path.join(directory, "zero-link"), /character device/],
    ] as const) {
      const read = await send("GET", { path: target });
      assert.equal(read.status, 400, `read ${target}: ${read.body.toString()}`);
      assert.match(errorBody(read).message, kind);
      const write = await send("POST", { path: target }, { "Content-Type": "application/octet-stream" }, Buffer.from("x"));
      assert.equal(write.status, 400, `write ${target}: ${write.body.toString()}`);
      assert.match(errorBody(write).message, kind);
    }
  } finally {
    listener.close();
  }
});

test("a NUL byte in a path is a 400, for downloads, octet-stream and multipart uploads", async () => {
  const bad = path.join(directory, "a\0b");
  const read = await send("GET", { path: bad });
  assert.equal(read.status, 400, read.body.toString());
  assert.match(errorBody(read).message, /NUL/);
  const write = await send("POST", { path: bad }, { "Content-Type": "application/octet-stream" }, Buffer.from("x"));
  assert.equal(write.status, 400, write.body.toString());
  errorBody(write);
  const { body, contentType } = multipart([{ filename: bad, data: "x" }]);
  const form = await send("POST", {}, { "Content-Type": contentType }, body);
  assert.equal(form.status, 400, form.body.toString());
  errorBody(form);
});

test("a read-only filesystem refuses uploads with 403, not 500", { skip: !isRoot && "needs root (mounts a read-only tmpfs)" }, async () => {
  await withTmpfs("ro,size=64k", async (readOnly) => {
    const octet = await send("POST", { path: path.join(readOnly, "f") }, { "Content-Type": "application/octet-stream" }, Buffer.from("x"));
    assert.equal(octet.status, 403, octet.body.toString());
    assert.match(errorBody(octet).message, /read-only file system/);
    const nested = await send("POST", { path: path.join(readOnly, "dir/f") }, { "Content-Type": "application/octet-stream" }, Buffer.from("x"));
    assert.equal(nested.status, 403, nested.body.toString());
    errorBody(nested);
  });
});

test("over-long names, symlink loops and files used as directories are 4xx, never 500", async () => {
  const file = path.join(directory, "plain.txt");
  fs.writeFileSync(file, "x");
  fs.symlinkSync("loop-b", path.join(directory, "loop-a"));
  fs.symlinkSync("loop-a", path.join(directory, "loop-b"));
  const cases: Array<[string, number]> = [
    [path.join(directory, "n".repeat(300)), 400],
    [path.join(directory, "loop-a"), 400],
    [path.join(directory, "loop-a/below"), 400],
    [path.join(file, "below"), 404],
    ["/" + "d/".repeat(3000) + "f", 400],
  ];
  for (const [target, status] of cases) {
    const read = await send("GET", { path: target });
    assert.equal(read.status, status, `read ${target.slice(0, 80)}: ${read.body.toString().slice(0, 200)}`);
    errorBody(read);
    const write = await send("POST", { path: target }, { "Content-Type": "application/octet-stream" }, Buffer.from("x"));
    assert.ok(write.status >= 400 && write.status < 500, `write ${target.slice(0, 80)}: ${write.status} ${write.body.toString().slice(0, 200)}`);
    errorBody(write);
  }
});

test("a multipart upload cut in the middle of a part answers 400 and leaves no error unhandled", async () => {
  const uncaught: unknown[] = [];
  const onUncaught = (error: unknown) => uncaught.push(error);
  process.on("uncaughtException", onUncaught);
  try {
    for (const name of ["other", "file"]) {
      const { body, contentType } = multipart([{ name, filename: path.join(directory, `cut-${name}`), data: Buffer.alloc(5000, "c") }]);
      const reply = await send("POST", {}, { "Content-Type": contentType }, body.subarray(0, 300));
      assert.equal(reply.status, 400, reply.body.toString());
      errorBody(reply);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.deepEqual(uncaught.map(String), []);
  } finally {
    process.off("uncaughtException", onUncaught);
  }
});

test("browser-style forms: a plain field named file goes to the path query, a Blob part too; without a path it is a clear 400", async () => {
  const binaryData = Buffer.from(Array.from({ length: 1000 }, (_, index) => (index * 31) % 256));
  const shapes: Array<[string, (form: FormData) => void, Buffer]> = [
    ["a string field (no filename, no Content-Type)", (form) => form.append("file", "plain text\r\nwith CRLF"), Buffer.from("plain text\r\nwith CRLF")],
    ["a Blob (filename \"blob\")", (form) => form.append("file", new Blob([binaryData])), binaryData],
    ["a File with a bare name", (form) => form.append("file", new File([binaryData], "bare-name.bin")), binaryData],
  ];
  for (const [label, fill, expected] of shapes) {
    const target = path.join(directory, `form-${expected.length}-${label.length}.dat`);
    const form = new FormData();
    form.append("ignored", "another field before the file");
    fill(form);
    // undici serialises the form exactly as fetch sends it.
    const request = new Request("http://serialise.invalid/", { method: "POST", body: form });
    const reply = await send("POST", { path: target }, { "Content-Type": request.headers.get("content-type")! }, Buffer.from(await request.arrayBuffer()));
    assert.equal(reply.status, 200, `${label}: ${reply.body.toString()}`);
    assert.deepEqual(JSON.parse(reply.body.toString()), [{ path: target, name: path.basename(target), type: "file" }], label);
    assert.ok(fs.readFileSync(target).equals(expected), `${label}: content intact`);
  }
  const form = new FormData();
  form.append("file", "no destination");
  const request = new Request("http://serialise.invalid/", { method: "POST", body: form });
  const reply = await send("POST", {}, { "Content-Type": request.headers.get("content-type")! }, Buffer.from(await request.arrayBuffer()));
  assert.equal(reply.status, 400);
  assert.match(errorBody(reply).message, /part has no filename and there is no path query parameter/);
});

test("X-Metadata keys that name Object's own properties are plain keys, stored and returned", async () => {
  const target = path.join(directory, "proto-keys.txt");
  const reply = await send("POST", { path: target }, { "Content-Type": "application/octet-stream", "X-Metadata-__proto__": "p", "X-Metadata-Constructor": "c", "X-Metadata-toString": "t" }, Buffer.from("1"));
  assert.equal(reply.status, 200, reply.body.toString());
  const answered = JSON.parse(reply.body.toString())[0].metadata as Record<string, string>;
  assert.deepEqual(Object.entries(answered).sort(), [["__proto__", "p"], ["constructor", "c"], ["tostring", "t"]]);
  const stored = statPath({ name: "root", uid: 0, gid: 0, groups: [0], home: "/root", shell: "/bin/sh" }, target).entry.metadata!;
  assert.deepEqual(Object.keys(stored).sort(), ["__proto__", "constructor", "tostring"]);
  assert.equal(stored.constructor, "c");
});
