/**
 * Codebases (CODEBASES_NOTE) against a real server and real sandboxes: registration (host
 * directories under CUBICLE_CODEBASE_ROOTS, volumes) and its bad inputs, and a mount with
 * AgentFense's four levels checked from inside the sandbox, as its user and as its root:
 * `none` paths are invisible, `view` paths listed but unreadable, `read` paths not writable,
 * `write` paths land in the codebase; directory renames and hard links cannot move a file past
 * its rule. A mounted codebase is not unregistered.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { Sandbox, Volume } from "e2b";
import { hostLeftovers, processesUnder, startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;
let roots: string;
let repo: string;

before(async () => {
  roots = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-codebases-"));
  repo = path.join(roots, "repo");
  for (const [file, text] of Object.entries({
    "README": "read me\n",
    ".env": "API_KEY=host-secret\n",
    "src/main.c": "int main(void) { return 0; }\n",
    "src/config.env": "DB_PASSWORD=host-secret\n",
    "docs/guide.md": "the guide\n",
    "secrets/key": "host-secret\n",
  })) {
    fs.mkdirSync(path.dirname(path.join(repo, file)), { recursive: true });
    fs.writeFileSync(path.join(repo, file), text);
  }
  // microVMs beside the containers (the template runs in containers unless a create asks).
  server = await startTestServer({ extraEnv: { CUBICLE_CODEBASE_ROOTS: roots, CUBICLE_MICROVM: process.env.CUBICLE_E2E_MICROVM ?? "tcg" } });
  useServerForSdk(server);
  process.env.E2B_VOLUME_API_URL = server.url;
});

after(async () => {
  await server?.stop();
  fs.rmSync(roots, { recursive: true, force: true });
});

const RULES = { "**/*.env": "none", "secrets/**": "none", "docs/**": "view", "src/**": "write" };

/** Exit code and output of a shell line in the sandbox (never throws on a failing command). */
async function sh(sandbox: Sandbox, line: string, user: "user" | "root" = "user"): Promise<{ code: number; out: string }> {
  const result = await sandbox.commands.run(`${line} 2>&1; echo "rc=$?"`, { user });
  const code = Number(/rc=(\d+)\s*$/.exec(result.stdout)?.[1] ?? -1);
  return { code, out: result.stdout.replace(/rc=\d+\s*$/, "") };
}

/**
 * The level battery at /workspace (RULES, default read), as the sandbox's user and as its root:
 * none is invisible, view listed but unreadable, read not writable, metadata tricks refused.
 */
async function assertFenced(sandbox: Sandbox): Promise<void> {
  for (const user of ["user", "root"] as const) {
    const listing = await sh(sandbox, "ls -a /workspace /workspace/src", user);
    assert.equal(listing.code, 0, listing.out);
    for (const hidden of [".env", "secrets", "config.env"]) assert.doesNotMatch(listing.out, new RegExp(`(^|\\s)${hidden.replace(".", "\\.")}(\\s|$)`), `${user} sees ${hidden}`);
    for (const visible of ["README", "docs", "src", "main.c"]) assert.match(listing.out, new RegExp(visible), `${user} misses ${visible}`);
    for (const line of ["cat /workspace/.env", "cat /workspace/secrets/key", "ls /workspace/secrets", "cat /workspace/src/config.env"]) {
      const attempt = await sh(sandbox, line, user);
      assert.notEqual(attempt.code, 0, `${user}: ${line}`);
      assert.doesNotMatch(attempt.out, /host-secret/);
      assert.match(attempt.out, /No such file/, `${user}: ${line}: ${attempt.out}`);
    }
    // view: listed with its size, not readable.
    assert.equal((await sh(sandbox, "stat -c %s /workspace/docs/guide.md", user)).out.trim(), "10");
    assert.match((await sh(sandbox, "cat /workspace/docs/guide.md", user)).out, /Permission denied/);
    // read: readable, not writable.
    assert.equal((await sh(sandbox, "cat /workspace/README", user)).out, "read me\n");
    assert.notEqual((await sh(sandbox, "echo x >> /workspace/README", user)).code, 0);
    assert.notEqual((await sh(sandbox, "rm /workspace/README", user)).code, 0);
    assert.notEqual((await sh(sandbox, "touch /workspace/new-at-top", user)).code, 0);
    // Metadata tricks on read and view paths.
    for (const line of ["chmod 666 /workspace/README", "chmod 644 /workspace/docs/guide.md", "truncate -s 0 /workspace/README", "touch -d 2000-01-01 /workspace/README", "chown 0:0 /workspace/README"]) {
      assert.notEqual((await sh(sandbox, line, user)).code, 0, `${user}: ${line}`);
    }
    // A symlink from elsewhere to a hidden path resolves through the daemon, which hides it.
    assert.doesNotMatch((await sh(sandbox, `ln -sf /workspace/secrets/key /tmp/k-${user}; cat /tmp/k-${user}`, user)).out, /host-secret/);
  }
}

describe("registration", () => {
  test("a host directory under the roots or a volume registers; anything else is refused", async () => {
    const created = await server.api("POST", "/codebases", { name: "app", hostPath: repo });
    assert.equal(created.status, 201, JSON.stringify(created.json));
    assert.equal(created.json.hostPath, fs.realpathSync(repo));
    assert.equal((await server.api("POST", "/codebases", { name: "app", hostPath: repo })).status, 409);
    for (const [body, pattern] of [
      [{ name: "etc", hostPath: "/etc" }, /CUBICLE_CODEBASE_ROOTS/],
      [{ name: "rel", hostPath: "repo" }, /absolute/],
      [{ name: "file", hostPath: path.join(repo, "README") }, /existing directory/],
      [{ name: "both", hostPath: repo, volume: "x" }, /exactly one/],
      [{ name: "../x", hostPath: repo }, /name/],
      [{ name: "extra", hostPath: repo, mode: "rw" }, /not a codebase field/],
      [{ name: "novol", volume: "no-such-volume" }, /no volume/],
    ] as const) {
      const res = await server.api("POST", "/codebases", body);
      assert.equal(res.status, 400, JSON.stringify(body));
      assert.match(res.json.message, pattern);
    }
    // A symlink under the roots that points out of them is judged by where it points.
    fs.symlinkSync("/etc", path.join(roots, "etc-link"));
    assert.equal((await server.api("POST", "/codebases", { name: "sneaky", hostPath: path.join(roots, "etc-link") })).status, 400);
    const volume = await Volume.create("cb-volume");
    await volume.writeFile("/notes.txt", "on a volume");
    assert.equal((await server.api("POST", "/codebases", { name: "on-volume", volume: "cb-volume" })).status, 201);
    const listed = (await server.api("GET", "/codebases")).json as { name: string }[];
    assert.deepEqual(listed.map((codebase) => codebase.name).sort(), ["app", "on-volume"]);
  });

  test("bad codebaseMounts are refused before anything starts", async () => {
    for (const codebaseMounts of [
      [{ codebase: "no-such", path: "/workspace" }],
      [{ codebase: "app", path: "/workspace", rules: { "src/**": "admin" } }],
      [{ codebase: "app", path: "/workspace", rules: { "/etc/**": "read" } }],
      [{ codebase: "app", path: "/proc/x" }],
      [{ codebase: "app", path: "/workspace", default: "all" }],
    ]) {
      const res = await server.api("POST", "/v2/sandboxes", { templateID: "base", codebaseMounts });
      assert.equal(res.status, 400, JSON.stringify(codebaseMounts));
    }
  });
});

describe("a mounted codebase", () => {
  test("none, view, read and write mean AgentFense's levels, for the sandbox's user and its root", async () => {
    const created = await server.api("POST", "/v2/sandboxes", {
      templateID: "base",
      timeout: 300,
      codebaseMounts: [
        { codebase: "app", path: "/workspace", rules: RULES, default: "read" },
        { codebase: "on-volume", path: "/notes", default: "write" },
      ],
    });
    assert.equal(created.status, 201, JSON.stringify(created.json));
    const sandbox = await Sandbox.connect(created.json.sandboxID);
    try {
      await assertFenced(sandbox);
      // write: lands in the codebase on the host.
      assert.equal((await sh(sandbox, "echo changed > /workspace/src/main.c && echo new > /workspace/src/new.txt")).code, 0);
      assert.equal(fs.readFileSync(path.join(repo, "src/main.c"), "utf8"), "changed\n");
      assert.equal(fs.readFileSync(path.join(repo, "src/new.txt"), "utf8"), "new\n");
      // A file cannot be moved past its rule: not by renaming a directory, not by a hard link,
      // not by renaming a writable file onto a hidden name.
      assert.notEqual((await sh(sandbox, "mv /workspace/src /workspace/src2", "root")).code, 0);
      assert.notEqual((await sh(sandbox, "ln /workspace/src/new.txt /workspace/src/linked", "root")).code, 0);
      assert.notEqual((await sh(sandbox, "mv /workspace/src/new.txt /workspace/src/x.env", "root")).code, 0);
      assert.equal(fs.existsSync(path.join(repo, "src2")), false);
      assert.equal(fs.readFileSync(path.join(repo, ".env"), "utf8"), "API_KEY=host-secret\n");
      // The volume codebase with default write.
      assert.equal((await sh(sandbox, "cat /notes/notes.txt && echo more >> /notes/notes.txt")).out, "on a volume");
      const res = await server.api("DELETE", "/codebases/app");
      assert.equal(res.status, 400, JSON.stringify(res.json));
      assert.match(res.json.message, /mounted by sandbox/);
      const volumeId = (await Volume.list()).find((volume) => volume.name === "cb-volume")!.volumeId;
      const volumeDelete = await server.api("DELETE", `/volumes/${volumeId}`);
      assert.equal(volumeDelete.status, 400, "a volume under a codebase is not deleted");
      assert.match(volumeDelete.json.message, /codebase on-volume/);
      // A snapshot keeps the mounts and their rules: a sandbox made from it is fenced the same way.
      const snapshot = await sandbox.createSnapshot();
      const copy = await Sandbox.create(snapshot.snapshotId);
      try {
        assert.doesNotMatch((await sh(copy, "cat /workspace/.env /workspace/secrets/key", "root")).out, /host-secret/);
        assert.equal((await sh(copy, "echo from-copy > /workspace/src/copy.txt")).code, 0);
        assert.equal(fs.readFileSync(path.join(repo, "src/copy.txt"), "utf8"), "from-copy\n");
      } finally {
        await copy.kill();
      }
      // A server restart keeps the sandbox's codebase served (its codebase-fs is its own process).
      await server.crashAndRestart();
      const again = await Sandbox.connect(sandbox.sandboxId);
      assert.equal((await sh(again, "cat /workspace/src/copy.txt")).out, "from-copy\n");
      assert.notEqual((await sh(again, "cat /workspace/.env")).code, 0);
      // Last (they change its mounts): root's mount tricks. A bind of the mount elsewhere is the
      // same daemon answering; unmounting it shows the empty directory below.
      const bound = await sh(again, "mkdir -p /mnt/again && mount --bind /workspace /mnt/again; cat /mnt/again/.env /mnt/again/secrets/key /mnt/again/docs/guide.md", "root");
      assert.doesNotMatch(bound.out, /host-secret|the guide/, bound.out);
      await sh(again, "umount /mnt/again; umount /workspace", "root");
      assert.doesNotMatch((await sh(again, "cat /workspace/.env /workspace/secrets/key", "root")).out, /host-secret/);
    } finally {
      await sandbox.kill();
    }
    assert.equal((await server.api("DELETE", "/codebases/app")).status, 204);
    assert.equal((await server.api("DELETE", "/codebases/app")).status, 404);
    assert.equal(fs.readFileSync(path.join(repo, "README"), "utf8"), "read me\n", "unregistering leaves the files");
  });
});

describe("microVMs", () => {
  test("a microVM mounts a codebase over virtiofs with the same table, enforced on the host below the guest's kernel; a kill leaves nothing", async () => {
    assert.equal((await server.api("POST", "/codebases", { name: "vm-app", hostPath: repo })).status, 201);
    const created = await server.api("POST", "/v2/sandboxes", {
      templateID: "base",
      runtime: "microvm",
      timeout: 300,
      codebaseMounts: [{ codebase: "vm-app", path: "/workspace", rules: RULES, default: "read" }],
    });
    assert.equal(created.status, 201, JSON.stringify(created.json));
    const sandbox = await Sandbox.connect(created.json.sandboxID);
    try {
      assert.equal((await server.api("GET", `/sandboxes/${sandbox.sandboxId}`)).json.runtime, "microvm");
      await assertFenced(sandbox);
      assert.equal((await sh(sandbox, "echo from-vm > /workspace/src/vm.txt && stat -c '%u %g' /workspace/src/vm.txt")).out, "1000 1000\n");
      assert.equal(fs.readFileSync(path.join(repo, "src/vm.txt"), "utf8"), "from-vm\n");
      assert.notEqual((await sh(sandbox, "mv /workspace/src /workspace/src2", "root")).code, 0);
      assert.notEqual((await sh(sandbox, "ln /workspace/src/vm.txt /workspace/src/linked", "root")).code, 0);
      // The guest's root owns its kernel: it mounts the share again elsewhere, and the host's
      // daemon still answers for every path.
      const again = await sh(sandbox, "umount /workspace && mkdir -p /mnt/again && mount -t virtiofs codebase-0 /mnt/again && ls -a /mnt/again; cat /mnt/again/.env /mnt/again/secrets/key /mnt/again/docs/guide.md", "root");
      assert.match(again.out, /README/, again.out);
      assert.doesNotMatch(again.out, /host-secret|the guide/, again.out);
    } finally {
      await sandbox.kill();
    }
    const guests = path.join(server.runDir, "microvm");
    assert.deepEqual(await processesUnder(guests), [], "no virtiofsd or codebase-fs outlives the guest");
    assert.deepEqual(hostLeftovers(server.stateDir).mounts, []);
    assert.equal(fs.readFileSync(path.join(repo, "README"), "utf8"), "read me\n");
    assert.equal((await server.api("DELETE", "/codebases/vm-app")).status, 204);
  });
});
