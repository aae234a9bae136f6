/**
 * Volumes through the official `e2b` SDK's `Volume` against a real server: the REST routes
 * (create, list, get, delete, their status codes and bodies), the content API (files,
 * directories, metadata), its isolation (tokens, `..`, NUL bytes, symlinks planted on the host,
 * the quota), persistence across a server restart, and bad `volumeMounts` refused on create.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { AuthenticationError, Sandbox, Volume, VolumeError, VolumeNotFoundError, VolumePathNotFoundError } from "e2b";
import { hostLeftovers, processesUnder, simulateHostReboot, startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;
/** Every volume made here, destroyed in `after` whatever its test did. */
const made: string[] = [];

before(async () => {
  // microVMs beside the containers (the template runs in containers unless a create asks).
  server = await startTestServer({ extraEnv: { CUBICLE_MICROVM: process.env.CUBICLE_E2E_MICROVM ?? "tcg" } });
  useServerForSdk(server);
  // The server returns no `domain` with a volume: the SDK finds the content API through this.
  process.env.E2B_VOLUME_API_URL = server.url;
});

after(async () => {
  for (const volumeId of made) await Volume.destroy(volumeId).catch(() => undefined);
  await server?.stop();
});

async function createVolume(name: string): Promise<Volume> {
  const volume = await Volume.create(name);
  made.push(volume.volumeId);
  return volume;
}

const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

/** A raw call, for what the SDK hides: status codes and error bodies. */
async function raw(urlPath: string, headers: Record<string, string> = {}, method = "GET"): Promise<{ status: number; text: string; json: any }> {
  const res = await fetch(server.url + urlPath, { method, headers });
  const text = await res.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON
  }
  return { status: res.status, text, json };
}

/** The SDK turns any status but 401/404/429/503 into `VolumeError("<status>: <message>")`. */
async function rejectsWithStatus(promise: Promise<unknown>, status: number, label: string): Promise<void> {
  await assert.rejects(promise, (err: Error) => {
    assert.ok(err instanceof VolumeError, `${label}: ${String(err)}`);
    assert.match(err.message, new RegExp(`^${status}: `), label);
    return true;
  }, label);
}

/** Entry paths as volume-absolute paths, whichever form the server answers in. */
const absolute = (entryPath: string) => "/" + entryPath.replace(/^\/+/, "");

describe("REST", () => {
  test("create, get, list and delete a volume; the list holds no tokens; an unknown id is a 404", async () => {
    const created = await server.api("POST", "/volumes", { name: "rest-vol" });
    assert.equal(created.status, 201, JSON.stringify(created.json));
    const { volumeID, name, token } = created.json;
    made.push(volumeID);
    assert.equal(name, "rest-vol");
    assert.ok(typeof volumeID === "string" && volumeID.length > 0);
    assert.ok(typeof token === "string" && token.length >= 16, "the token is a bearer secret: it must not be guessable");
    const got = await server.api("GET", `/volumes/${volumeID}`);
    assert.equal(got.status, 200);
    assert.deepEqual([got.json.volumeID, got.json.name, got.json.token], [volumeID, "rest-vol", token]);
    const entry = (await server.api("GET", "/volumes")).json.find((v: { volumeID: string }) => v.volumeID === volumeID);
    assert.equal(entry?.name, "rest-vol");
    assert.equal(entry.token, undefined);
    assert.equal((await server.api("DELETE", `/volumes/${volumeID}`)).status, 204);
    assert.equal((await server.api("GET", `/volumes/${volumeID}`)).status, 404);
    assert.equal((await server.api("DELETE", `/volumes/${volumeID}`)).status, 404);
  });

  test("a taken name is a 409, bad names and sizes are 400s, a missing or wrong API key is a 401", async () => {
    await createVolume("taken");
    const duplicate = await server.api("POST", "/volumes", { name: "taken" });
    assert.equal(duplicate.status, 409);
    assert.equal(duplicate.json.code, 409);
    assert.equal(typeof duplicate.json.message, "string");
    await rejectsWithStatus(Volume.create("taken"), 409, "SDK duplicate");
    for (const name of ["", "x".repeat(64), "a b", "a/b", "../up", ".hidden", "-dash", "ünï", "a\u0000b"]) {
      const res = await server.api("POST", "/volumes", { name });
      assert.equal(res.status, 400, JSON.stringify(name));
      assert.equal(res.json.code, 400);
    }
    for (const name of ["x".repeat(63), "A.b_c-9"]) {
      const res = await server.api("POST", "/volumes", { name });
      assert.equal(res.status, 201, name);
      made.push(res.json.volumeID);
    }
    for (const sizeMB of [0, -1, 1.5, 1048577, "16"]) {
      const res = await server.api("POST", "/volumes", { name: `sized-${String(sizeMB)}`, sizeMB });
      assert.equal(res.status, 400, `sizeMB ${String(sizeMB)}`);
    }
    const volume = await createVolume("not-a-key");
    for (const headers of [{}, { "x-api-key": "e2b_wrong" }, { "x-api-key": volume.token }] as Record<string, string>[]) {
      assert.equal((await raw("/volumes", headers)).status, 401, JSON.stringify(headers));
      assert.equal((await raw(`/volumes/${volume.volumeId}`, headers, "DELETE")).status, 401);
    }
    assert.ok(await Volume.getInfo(volume.volumeId), "the unauthenticated delete deleted nothing");
  });
});

describe("content API", () => {
  test("Volume: create, list, getInfo, connect, destroy; a destroyed volume's files and token are gone", async () => {
    const volume = await createVolume("sdk-vol");
    assert.equal(volume.name, "sdk-vol");
    assert.ok((await Volume.list()).some((v) => v.volumeId === volume.volumeId && v.name === "sdk-vol"));
    const info = await Volume.getInfo(volume.volumeId);
    assert.deepEqual(info, { volumeId: volume.volumeId, name: "sdk-vol", token: volume.token, domain: undefined });
    await volume.writeFile("/hello.txt", "hi");
    assert.equal(await (await Volume.connect(volume.volumeId)).readFile("/hello.txt"), "hi");
    await assert.rejects(Volume.getInfo("no-such-volume"), VolumeNotFoundError);

    assert.equal(await Volume.destroy(volume.volumeId), true);
    assert.equal(await Volume.destroy(volume.volumeId), false);
    const again = await createVolume("sdk-vol");
    assert.deepEqual(await again.list("/"), [], "a new volume of the same name starts empty");
    await assert.rejects(new Volume(again.volumeId, again.name, volume.token).list("/"), AuthenticationError);
  });

  test("files: text, bytes and Blob round-trip; uid/gid default to 1000; explicit uid, gid and mode", async () => {
    const volume = await createVolume("files-vol");
    const written = await volume.writeFile("/notes.txt", "hello volume");
    assert.deepEqual([written.name, absolute(written.path), written.type, written.size, written.uid, written.gid], ["notes.txt", "/notes.txt", "file", 12, 1000, 1000]);
    assert.equal(await volume.readFile("/notes.txt"), "hello volume");
    await volume.writeFile("/notes.txt", "v2", { force: true });
    assert.equal(await volume.readFile("/notes.txt"), "v2");

    const bytes = Uint8Array.from({ length: 1024 }, (_, i) => i % 256);
    // The SDK's type takes an ArrayBuffer, not a Uint8Array (its runtime takes both).
    await volume.writeFile("/all.bin", bytes.buffer);
    assert.deepEqual(await volume.readFile("/all.bin", { format: "bytes" }), bytes);
    await volume.writeFile("/blob.txt", new Blob(["from a blob"]));
    assert.equal(await volume.readFile("/blob.txt"), "from a blob");

    // Not the defaults, so the assertion can tell them apart.
    const owned = await volume.writeFile("/owned.txt", "x", { uid: 1001, gid: 1002, mode: 0o640 });
    assert.deepEqual([owned.uid, owned.gid, owned.mode & 0o777], [1001, 1002, 0o640]);
    const info = await volume.getInfo("/owned.txt");
    assert.deepEqual([info.uid, info.gid, info.mode & 0o777, info.size], [1001, 1002, 0o640, 1]);
    for (const time of [info.atime, info.mtime, info.ctime]) assert.ok(Math.abs(time.getTime() - Date.now()) < 60_000, String(time));
    const updated = await volume.updateMetadata("/owned.txt", { mode: 0o600 });
    assert.equal(updated.mode & 0o777, 0o600);
    assert.equal((await volume.getInfo("/owned.txt")).mode & 0o777, 0o600);
  });

  test("directories: makeDir with and without parents, list at depth 1 and 2, exists, remove; missing paths are 404s", async () => {
    const volume = await createVolume("dirs-vol");
    const dir = await volume.makeDir("/a/b", { force: true });
    assert.deepEqual([dir.name, absolute(dir.path), dir.type, dir.uid, dir.gid], ["b", "/a/b", "directory", 1000, 1000]);
    await assert.rejects(volume.makeDir("/missing/child"), VolumePathNotFoundError);
    await volume.writeFile("/a/b/deep.txt", "deep");
    await volume.writeFile("/top.txt", "top");
    const top = await volume.list("/");
    assert.deepEqual(top.map((e) => [absolute(e.path), e.type]).sort(), [["/a", "directory"], ["/top.txt", "file"]]);
    const twoDeep = await volume.list("/", { depth: 2 });
    assert.deepEqual(twoDeep.map((e) => absolute(e.path)).sort(), ["/a", "/a/b", "/top.txt"]);
    assert.equal(await volume.exists("/a/b/deep.txt"), true);
    assert.equal(await volume.exists("/nope"), false);
    for (const call of [() => volume.readFile("/nope"), () => volume.getInfo("/nope"), () => volume.list("/nope"), () => volume.remove("/nope")]) {
      await assert.rejects(call, VolumePathNotFoundError);
    }
    const missing = await raw(`/volumecontent/${volume.volumeId}/path?path=%2Fnope`, bearer(volume.token));
    assert.equal(missing.status, 404);
    assert.deepEqual([typeof missing.json?.code, typeof missing.json?.message], ["string", "string"], "volumecontent errors have a string code");

    await volume.remove("/top.txt");
    await volume.remove("/a"); // not empty
    assert.deepEqual(await volume.list("/"), []);
  });
});

describe("isolation", () => {
  test("no token, a wrong one, another volume's and the API key are 401s that show nothing", async () => {
    const [a, b] = [await createVolume("iso-a"), await createVolume("iso-b")];
    await a.writeFile("/secret.txt", "a-secret-content");
    const url = `/volumecontent/${a.volumeId}/file?path=%2Fsecret.txt`;
    assert.equal((await raw(url, bearer(a.token))).text, "a-secret-content", "its own token opens it");
    const refused: [string, Record<string, string>][] = [
      ["no token", {}],
      ["a wrong token", bearer("not-a-token")],
      ["b's token", bearer(b.token)],
      ["the API key", bearer(server.apiKey)],
      ["the API key header", { "x-api-key": server.apiKey }],
      ["no Bearer scheme", { authorization: a.token }],
    ];
    for (const [label, headers] of refused) {
      const res = await raw(url, headers);
      assert.equal(res.status, 401, label);
      assert.equal(typeof res.json?.code, "string", label);
      assert.ok(!res.text.includes("a-secret-content"), label);
    }
    const withBsToken = new Volume(a.volumeId, a.name, b.token);
    await assert.rejects(withBsToken.readFile("/secret.txt"), AuthenticationError);
    await assert.rejects(withBsToken.writeFile("/planted.txt", "x"), AuthenticationError);
    assert.equal(await a.exists("/planted.txt"), false);
    // Ambiguous in the contract for an unknown id: "wrong token" or "unknown volume".
    assert.ok([401, 404].includes((await raw(`/volumecontent/no-such-volume/path?path=%2F`, bearer(a.token))).status));
    const traversingId = await raw(`/volumecontent/${encodeURIComponent(`../${a.volumeId}`)}/file?path=%2Fsecret.txt`, bearer(a.token));
    assert.ok(traversingId.status >= 400 && !traversingId.text.includes("a-secret-content"), `${traversingId.status}`);
  });

  test("paths escaping the root and paths with a NUL byte are 400s for every operation", async () => {
    const [volume, neighbour] = [await createVolume("escape"), await createVolume("escape-neighbour")];
    await neighbour.writeFile("/keep.txt", "keep", { mode: 0o644 });
    const passwd = await raw(`/volumecontent/${volume.volumeId}/file?path=${encodeURIComponent("../".repeat(12) + "etc/passwd")}`, bearer(volume.token));
    assert.equal(passwd.status, 400);
    assert.doesNotMatch(passwd.text, /root:.*:0:0:/);
    for (const p of ["../../etc/passwd", "/../x", "/a/../../etc/passwd", "..", "/..", "/a\u0000b", "/notes.txt\u0000.png"]) {
      await rejectsWithStatus(volume.readFile(p), 400, `read ${JSON.stringify(p)}`);
      await rejectsWithStatus(volume.getInfo(p), 400, `getInfo ${JSON.stringify(p)}`);
      await rejectsWithStatus(volume.list(p), 400, `list ${JSON.stringify(p)}`);
    }
    // Writes aim at the neighbour volume, not the host, in case one gets through.
    const intoNeighbour = [`../${neighbour.volumeId}/keep.txt`, `/sub/../../${neighbour.volumeId}/keep.txt`, "/../x", "/a\u0000b"];
    for (const p of intoNeighbour) {
      await rejectsWithStatus(volume.writeFile(p, "overwritten", { force: true }), 400, `write ${JSON.stringify(p)}`);
      await rejectsWithStatus(volume.makeDir(`${p}/made`, { force: true }), 400, `makeDir ${JSON.stringify(p)}`);
      await rejectsWithStatus(volume.updateMetadata(p, { mode: 0o777 }), 400, `updateMetadata ${JSON.stringify(p)}`);
      await rejectsWithStatus(volume.remove(p), 400, `remove ${JSON.stringify(p)}`);
    }
    assert.equal(await neighbour.readFile("/keep.txt"), "keep");
    assert.equal((await neighbour.getInfo("/keep.txt")).mode & 0o777, 0o644);
    assert.deepEqual(await volume.list("/"), []);
  });

  test("bad query values and metadata bodies are 400s that change nothing; force=false does not overwrite", async () => {
    const volume = await createVolume("bad-params");
    await volume.writeFile("/f.txt", "original", { mode: 0o644 });
    const base = `${server.url}/volumecontent/${volume.volumeId}`;
    const call = (method: string, urlPath: string, body?: string, type = "application/json") =>
      fetch(base + urlPath, { method, headers: { ...bearer(volume.token), "content-type": type }, ...(body === undefined ? {} : { body }) });
    for (const [method, urlPath, body] of [
      ["PUT", "/file?path=/f.txt&uid=65536", "x"],
      ["PUT", "/file?path=/f.txt&gid=-1", "x"],
      ["PUT", "/file?path=/f.txt&mode=4096", "x"],
      ["PUT", "/file?path=/f.txt&mode=0x1ff", "x"],
      ["PUT", "/file?path=/f.txt&force=maybe", "x"],
      ["PUT", "/file", "x"],
      ["POST", "/dir?path=/d&uid=99999999999", undefined],
      ["POST", "/dir?path=/d&force=1", undefined],
      ["GET", "/dir?path=/&depth=0", undefined],
      ["GET", "/dir?path=/&depth=65", undefined],
      ["GET", "/dir?path=/&depth=two", undefined],
      ["PATCH", "/path?path=/f.txt", "[1]"],
      ["PATCH", "/path?path=/f.txt", '{"owner":"root"}'],
      ["PATCH", "/path?path=/f.txt", '{"mode":"777"}'],
      ["PATCH", "/path?path=/f.txt", '{"uid":-5}'],
      ["PATCH", "/path?path=/f.txt", "{not json"],
    ] as const) {
      const res = await call(method, urlPath, body, method === "PUT" ? "application/octet-stream" : "application/json");
      assert.equal(res.status, 400, `${method} ${urlPath} ${body ?? ""}: ${await res.text()}`);
    }
    assert.equal(await volume.readFile("/f.txt"), "original");
    const info = await volume.getInfo("/f.txt");
    assert.deepEqual([info.mode & 0o7777, info.uid, info.gid], [0o644, 1000, 1000]);
    assert.equal(await volume.exists("/d"), false);
    // force=false: an existing file stays (409); a new one is written.
    const kept = await call("PUT", "/file?path=/f.txt&force=false", "replaced", "application/octet-stream");
    assert.equal(kept.status, 409, await kept.text());
    assert.equal(await volume.readFile("/f.txt"), "original");
    assert.equal((await call("PUT", "/file?path=/new.txt&force=false", "new", "application/octet-stream")).status, 201);
    assert.equal(await volume.readFile("/new.txt"), "new");
    // An unknown field of a volume is refused too.
    const extra = await server.api("POST", "/volumes", { name: "extra-field", sizeMB: 16, public: true });
    assert.equal(extra.status, 400);
    assert.match(extra.json.message, /not a volume field/);
  });

  test("a symlink planted in the volume on the host is never followed", async () => {
    const volume = await createVolume("links");
    const marker = `marker-${randomBytes(6).toString("hex")}`;
    await volume.writeFile(`/${marker}`, "m");
    // The SDK cannot make a symlink; a sandbox (or a host admin) could. Plant them beside the marker.
    const hostRoot = [server.runDir, server.stateDir].map((dir) => dirHolding(dir, marker, 7)).find(Boolean);
    assert.ok(hostRoot, `the volume's files were not found under ${server.runDir} or ${server.stateDir}`);
    const outside = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-volume-outside-"));
    const secret = path.join(outside, "secret.txt");
    fs.writeFileSync(secret, "host-secret-content", { mode: 0o644 });
    fs.symlinkSync(secret, path.join(hostRoot, "file-link"));
    fs.symlinkSync(outside, path.join(hostRoot, "dir-link"));
    const statBefore = fs.statSync(secret);
    const ignore = () => undefined;
    try {
      await assert.rejects(volume.readFile("/file-link"));
      await assert.rejects(volume.readFile("/dir-link/secret.txt"));
      for (const p of ["/file-link", "/dir-link/secret.txt"]) {
        assert.ok(!(await raw(`/volumecontent/${volume.volumeId}/file?path=${encodeURIComponent(p)}`, bearer(volume.token))).text.includes("host-secret-content"), p);
      }
      const listed = await volume.list("/dir-link").catch(() => []);
      assert.ok(!listed.some((e) => e.name === "secret.txt"), "listed the link's target");
      const info = await volume.getInfo("/file-link").catch(ignore);
      if (info) assert.equal(info.type, "symlink", "getInfo followed the link");
      await volume.updateMetadata("/file-link", { mode: 0o600, uid: 4242 }).catch(ignore);
      await volume.updateMetadata("/dir-link/secret.txt", { mode: 0o600 }).catch(ignore);
      await volume.writeFile("/dir-link/planted.txt", "x").catch(ignore);
      await volume.makeDir("/dir-link/made/deeper", { force: true }).catch(ignore);
      await volume.remove("/dir-link/secret.txt").catch(ignore);
      await volume.writeFile("/file-link", "overwritten", { force: true }).catch(ignore);
      await volume.remove("/dir-link").catch(ignore);
      const statAfter = fs.statSync(secret);
      assert.equal(fs.readFileSync(secret, "utf8"), "host-secret-content");
      assert.deepEqual([statAfter.mode & 0o777, statAfter.uid], [statBefore.mode & 0o777, statBefore.uid]);
      assert.deepEqual(fs.readdirSync(outside), ["secret.txt"]);
    } finally {
      fs.rmSync(outside, { recursive: true, force: true });
    }
  });

  test("a write past the quota is a 507; the server keeps answering; a small write works once it is removed", async () => {
    const created = await server.api("POST", "/volumes", { name: "small", sizeMB: 16 });
    assert.equal(created.status, 201, JSON.stringify(created.json));
    made.push(created.json.volumeID);
    const volume = await Volume.connect(created.json.volumeID);
    // Random bytes: nothing a compressing filesystem could shrink under the limit.
    await rejectsWithStatus(volume.writeFile("/big.bin", Uint8Array.from(randomBytes(32 * 1024 * 1024)).buffer), 507, "32 MiB into 16 MB");
    assert.equal((await fetch(server.url + "/health")).status, 200);
    assert.ok((await Volume.list()).some((v) => v.volumeId === volume.volumeId));
    if (await volume.exists("/big.bin")) await volume.remove("/big.bin");
    await volume.writeFile("/small.txt", "fits");
    assert.equal(await volume.readFile("/small.txt"), "fits");
  });
});

describe("durability and sandboxes", () => {
  test("a volume, its token and its files survive a server restart and a host reboot", async () => {
    const volume = await createVolume("durable");
    await volume.makeDir("/d", { force: true });
    await volume.writeFile("/d/f.txt", "still here", { mode: 0o600 });
    await server.crashAndRestart();
    const info = await Volume.getInfo(volume.volumeId);
    assert.deepEqual([info.name, info.token], ["durable", volume.token]);
    assert.equal(await volume.readFile("/d/f.txt"), "still here", "the old token still opens it");
    assert.equal((await volume.getInfo("/d/f.txt")).mode & 0o777, 0o600);
    // A reboot takes every mount and loop device; the server mounts the volume's image again.
    await server.crashAndRestart(() => simulateHostReboot(server, []));
    assert.equal(await volume.readFile("/d/f.txt"), "still here");
    await volume.writeFile("/d/after-reboot.txt", "written");
    assert.equal(await volume.readFile("/d/after-reboot.txt"), "written");
  });

  test("a create whose volumeMounts name no volume, or a relative path, is a 400 that says so and starts nothing", async () => {
    const volume = await createVolume("mountable");
    for (const volumeMounts of [
      [{ name: "no-such-volume", path: "/mnt/v" }],
      [{ name: volume.name, path: "mnt/v" }],
      [{ name: volume.name, path: "/etc" }],
      [{ name: volume.name, path: "/proc/v" }],
      [
        { name: volume.name, path: "/mnt/a" },
        { name: volume.volumeId, path: "/mnt/b" },
      ],
    ]) {
      const res = await server.api("POST", "/v2/sandboxes", { templateID: "base", volumeMounts });
      assert.equal(res.status, 400, JSON.stringify(volumeMounts));
      assert.match(res.json.message, /volume/i);
    }
    await assert.rejects(Sandbox.create({ volumeMounts: { "/mnt/v": "no-such-volume" } }), /^\w*Error: 400: .*volume/i);
    assert.deepEqual((await server.api("GET", "/v2/sandboxes")).json, [], "no sandbox was started");
  });

  test("a mounted volume: shared by two sandboxes, owners kept both ways, nosuid, quota inside, not deletable while mounted, kept by a snapshot", async () => {
    const volume = await createVolume("shared");
    await volume.writeFile("/from-api.txt", "written by the API");
    const small = (await server.api("POST", "/volumes", { name: "small-mounted", sizeMB: 8 })).json as { volumeID: string };
    made.push(small.volumeID);
    const first = await Sandbox.create("base", { volumeMounts: { "/mnt/shared": volume, "/mnt/small": "small-mounted" } });
    const second = await Sandbox.create("base", { volumeMounts: { "/mnt/v": volume.name } });
    const fromSnapshot: Sandbox[] = [];
    try {
      const seen = await first.commands.run("stat -c '%U %G %a' /mnt/shared/from-api.txt; cat /mnt/shared/from-api.txt");
      assert.equal(seen.stdout, "user user 644\nwritten by the API");
      await first.commands.run("echo from-first > /mnt/shared/first.txt");
      assert.equal((await second.commands.run("cat /mnt/v/first.txt")).stdout, "from-first\n", "another sandbox sees the write at once");
      assert.equal(await volume.readFile("/first.txt"), "from-first\n");
      assert.equal((await volume.getInfo("/first.txt")).uid, 1000, "the sandbox's user owns what it wrote");
      await first.commands.run("echo root > /mnt/shared/root.txt", { user: "root" });
      assert.equal((await volume.getInfo("/root.txt")).uid, 0);
      // nosuid: a setuid-root copy of id made by root inside does not raise the user.
      await first.commands.run("cp /usr/bin/id /mnt/shared/suid-id && chmod 4755 /mnt/shared/suid-id", { user: "root" });
      assert.equal((await first.commands.run("/mnt/shared/suid-id -u")).stdout.trim(), "1000");
      // The small volume's quota holds inside the sandbox too: ENOSPC, and nothing else is full.
      const full = await first.commands.run("{ head -c 32M /dev/zero > /mnt/small/big; } 2>&1; echo rc=$?");
      assert.match(full.stdout, /No space left on device\nrc=1\n$/, full.stdout);
      assert.equal((await first.commands.run("echo fine > /mnt/shared/after-full && echo fine > /tmp/after-full && cat /mnt/shared/after-full /tmp/after-full")).stdout, "fine\nfine\n");
      const res = await server.api("DELETE", `/volumes/${volume.volumeId}`);
      assert.equal(res.status, 400, JSON.stringify(res.json));
      assert.match(res.json.message, /in use by sandbox/);
      // A snapshot keeps the mount, not the content: a sandbox from it sees the volume as it is now.
      const snapshot = await first.createSnapshot();
      await volume.writeFile("/after-snapshot.txt", "later");
      fromSnapshot.push(await Sandbox.create(snapshot.snapshotId));
      assert.equal((await fromSnapshot[0]!.commands.run("cat /mnt/shared/after-snapshot.txt")).stdout, "later");
    } finally {
      for (const sandbox of [first, second, ...fromSnapshot]) await sandbox.kill().catch(() => undefined);
    }
    assert.equal(await Volume.destroy(volume.volumeId), true, "deletable once no sandbox mounts it");
  });
});

describe("microVMs", () => {
  test("a microVM mounts a volume over virtiofs: shared with a container both ways at once, owners as in a container, nosuid, no device nodes, the quota, a server restart; a kill leaves nothing", async () => {
    const volume = await createVolume("vm-shared");
    await volume.writeFile("/from-api.txt", "written by the API");
    const small = (await server.api("POST", "/volumes", { name: "vm-small", sizeMB: 8 })).json as { volumeID: string };
    made.push(small.volumeID);
    const created = await server.api("POST", "/v2/sandboxes", {
      templateID: "base",
      runtime: "microvm",
      timeout: 300,
      volumeMounts: [{ name: "vm-shared", path: "/mnt/shared" }, { name: "vm-small", path: "/mnt/small" }],
    });
    assert.equal(created.status, 201, JSON.stringify(created.json));
    const vm = await Sandbox.connect(created.json.sandboxID);
    const box = await Sandbox.create("base", { volumeMounts: { "/mnt/v": volume } });
    try {
      assert.equal((await server.api("GET", `/sandboxes/${vm.sandboxId}`)).json.runtime, "microvm");
      const seen = await vm.commands.run("stat -c '%U %G %a' /mnt/shared/from-api.txt; cat /mnt/shared/from-api.txt");
      assert.equal(seen.stdout, "user user 644\nwritten by the API");
      await vm.commands.run("echo from-vm > /mnt/shared/vm.txt");
      assert.equal((await box.commands.run("cat /mnt/v/vm.txt")).stdout, "from-vm\n", "the container sees the guest's write at once");
      assert.equal((await volume.getInfo("/vm.txt")).uid, 1000, "the guest's user owns what it wrote");
      await box.commands.run("echo from-box > /mnt/v/box.txt");
      assert.equal((await vm.commands.run("cat /mnt/shared/box.txt")).stdout, "from-box\n", "the guest sees the container's write at once");
      await vm.commands.run("echo root > /mnt/shared/root.txt", { user: "root" });
      assert.equal((await volume.getInfo("/root.txt")).uid, 0);
      await vm.commands.run("cp /usr/bin/id /mnt/shared/suid-id && chmod 4755 /mnt/shared/suid-id", { user: "root" });
      assert.equal((await vm.commands.run("/mnt/shared/suid-id -u")).stdout.trim(), "1000", "nosuid in the guest");
      assert.equal((await box.commands.run("/mnt/v/suid-id -u")).stdout.trim(), "1000", "nosuid in the container");
      const mknod = await vm.commands.run("mknod /mnt/shared/disk b 8 0 2>&1; echo rc=$?", { user: "root" });
      assert.doesNotMatch(mknod.stdout, /rc=0$/m, `the guest's root makes no device node on the host: ${mknod.stdout}`);
      const full = await vm.commands.run("{ head -c 32M /dev/zero > /mnt/small/big; } 2>&1; echo rc=$?");
      assert.match(full.stdout, /No space left on device\nrc=1\n$/, `a write past the quota fails in the guest: ${full.stdout}`);
      assert.equal((await vm.commands.run("echo fine > /mnt/shared/after-full && cat /mnt/shared/after-full")).stdout, "fine\n");
      const res = await server.api("DELETE", `/volumes/${volume.volumeId}`);
      assert.equal(res.status, 400, JSON.stringify(res.json));
      assert.match(res.json.message, /in use by sandbox/);
      // A server restart adopts the guest with its share; the kill below still ends its virtiofsd.
      await server.crashAndRestart();
      assert.equal((await (await Sandbox.connect(vm.sandboxId)).commands.run("cat /mnt/shared/box.txt")).stdout, "from-box\n");
    } finally {
      for (const sandbox of [vm, box]) await sandbox.kill().catch(() => undefined);
    }
    assert.deepEqual(await processesUnder(path.join(server.runDir, "microvm")), [], "no virtiofsd outlives the guest");
    assert.deepEqual(hostLeftovers(server.stateDir).mounts, []);
    assert.equal(await volume.readFile("/vm.txt"), "from-vm\n", "the volume keeps what the guest wrote");
  });
});

/** The directory under `root` (at most `depth` levels down, symlinks not followed) holding `name`. */
function dirHolding(root: string, name: string, depth: number): string | undefined {
  let entries: fs.Dirent[];
  try {
    entries = fs.readdirSync(root, { withFileTypes: true });
  } catch {
    return undefined;
  }
  if (entries.some((e) => e.name === name && e.isFile())) return root;
  if (depth === 0) return undefined;
  for (const e of entries) {
    const found = e.isDirectory() ? dirHolding(path.join(root, e.name), name, depth - 1) : undefined;
    if (found) return found;
  }
  return undefined;
}
