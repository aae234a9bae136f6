import assert from "node:assert/strict";
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";

// codebase-fs serves a host directory through FUSE with per-path levels (see the top of
// codebase-fs.c). The test builds it itself, mounts a small tree and checks the levels from the
// host side of the mount: as root, which the daemon treats like anyone (no default_permissions).

const cSource = path.join(import.meta.dirname, "codebase-fs.c");

// The presented owner (the sandbox user's host ids) and the owner of what the daemon creates.
const VIEW_UID = 3101;
const VIEW_GID = 3102;
const OWNER_UID = 4201;
const OWNER_GID = 4202;

const RULES = [
  "default\tread",
  "none\t**/*.env",
  "none\tsecrets/**",
  "view\tdocs/**",
  "write\tdocs/notes.md", // no wildcard: beats docs/** however few characters it has
  "write\tsrc/**",
  "",
].join("\n");

function pkgConfig(...args: string[]): string[] {
  const result = spawnSync("pkg-config", [...args, "fuse3"], { encoding: "utf8" });
  assert.equal(result.status, 0, `pkg-config ${args.join(" ")} fuse3: ${result.stderr}`);
  return result.stdout.trim().split(/\s+/).filter(Boolean);
}

function skipReason(): string | false {
  if (process.getuid?.() !== 0) return "needs root (FUSE mount with allow_other, chown)";
  if (!fs.existsSync("/dev/fuse")) return "no /dev/fuse";
  if (spawnSync("pkg-config", ["--exists", "fuse3"]).status !== 0) return "libfuse3 development files are not installed (libfuse3-dev)";
  return false;
}

/** The build command scripts/build.mjs uses, into `output`. */
function build(output: string): void {
  const args = ["-O2", "-Wall", "-Werror", "-o", output, cSource, ...pkgConfig("--cflags"), "-static", ...pkgConfig("--libs", "--static")];
  const result = spawnSync("cc", args, { encoding: "utf8" });
  assert.equal(result.status, 0, `cc ${args.join(" ")}:\n${result.stderr}`);
}

function errorCode(action: () => unknown): string | undefined {
  try {
    action();
  } catch (err) {
    return (err as NodeJS.ErrnoException).code;
  }
  return undefined;
}

/** Asserts that a file system call fails with `code` (one of them, for an array). */
function fails(action: () => unknown, code: string | string[]): void {
  const codes = Array.isArray(code) ? code : [code];
  const actual = errorCode(action);
  assert.ok(actual !== undefined && codes.includes(actual), `expected ${codes.join(" or ")}, got ${actual ?? "success"}`);
}

describe("codebase-fs", { skip: skipReason() }, () => {
  let base: string;
  let binary: string;
  let source: string;
  let mnt: string;
  let rulesFile: string;
  let daemon: ChildProcess | undefined;
  let daemonExit: Promise<number | null>;

  const inMount = (...parts: string[]) => path.join(mnt, ...parts);
  const inSource = (...parts: string[]) => path.join(source, ...parts);

  function run(args: string[]) {
    return spawnSync(binary, args, { encoding: "utf8", timeout: 10_000 });
  }

  before(async () => {
    base = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-codebase-fs-"));
    binary = path.join(base, "codebase-fs");
    build(binary);

    source = path.join(base, "source");
    mnt = path.join(base, "mnt");
    fs.mkdirSync(mnt);
    const files: Record<string, string> = {
      "src/a.c": "int main(void) { return 0; }\n",
      "src/secret.env": "hidden in a write area\n",
      "docs/guide.md": "# Guide\n",
      "docs/notes.md": "notes\n",
      ".env": "TOKEN=host\n",
      "sub/dir/x.env": "TOKEN=nested\n",
      "secrets/key": "private key\n",
      README: "read me\n",
    };
    for (const [name, content] of Object.entries(files)) {
      fs.mkdirSync(path.dirname(inSource(name)), { recursive: true });
      fs.writeFileSync(inSource(name), content);
    }
    // Planted on the host side, as a sandbox with write access could have made it.
    fs.symlinkSync("/etc", inSource("src", "escape"));
    rulesFile = path.join(base, "rules");
    fs.writeFileSync(rulesFile, RULES);

    const args = ["--source", source, "--mount", mnt, "--rules", rulesFile, "--uid", `${VIEW_UID}`, "--gid", `${VIEW_GID}`, "--owner-uid", `${OWNER_UID}`, "--owner-gid", `${OWNER_GID}`];
    const child = spawn(binary, args, { stdio: ["ignore", "pipe", "pipe"] });
    daemon = child;
    daemonExit = new Promise((resolve) => child.once("exit", (code) => resolve(code)));
    let stderr = "";
    child.stderr.on("data", (chunk) => (stderr += chunk));
    await new Promise<void>((resolve, reject) => {
      let stdout = "";
      const timer = setTimeout(() => reject(new Error(`codebase-fs printed no "ready" in 10 s: ${stderr}`)), 10_000);
      child.stdout.on("data", (chunk) => {
        stdout += chunk;
        if (stdout.includes("ready\n")) {
          clearTimeout(timer);
          resolve();
        }
      });
      void daemonExit.then((code) => {
        clearTimeout(timer);
        reject(new Error(`codebase-fs exited with ${code} before it was ready: ${stderr}`));
      });
    });
  });

  after(async () => {
    if (daemon && daemon.exitCode === null && daemon.signalCode === null) {
      spawnSync("umount", ["-l", mnt]);
      const stopped = await Promise.race([daemonExit, new Promise((resolve) => setTimeout(() => resolve("timeout"), 5_000))]);
      if (stopped === "timeout") daemon.kill("SIGKILL");
    }
    if (base) fs.rmSync(base, { recursive: true, force: true });
  });

  test("hidden paths are neither listed nor reachable", () => {
    const root = fs.readdirSync(mnt).sort();
    assert.deepEqual(root, ["README", "docs", "src", "sub"]);
    assert.deepEqual(fs.readdirSync(inMount("sub", "dir")), []);
    assert.ok(!fs.readdirSync(inMount("src")).includes("secret.env"));
    for (const hidden of [".env", "sub/dir/x.env", "secrets", "secrets/key", "src/secret.env"]) {
      fails(() => fs.statSync(inMount(hidden)), "ENOENT");
      fails(() => fs.readFileSync(inMount(hidden)), "ENOENT");
    }
  });

  test("a view file is listed with its size but cannot be read", () => {
    assert.ok(fs.readdirSync(inMount("docs")).includes("guide.md"));
    const stat = fs.statSync(inMount("docs", "guide.md"));
    assert.equal(stat.size, "# Guide\n".length);
    assert.equal(stat.mode & 0o666, 0, "no read or write bits shown");
    assert.equal(fs.statSync(inMount("docs")).mode & 0o222, 0, "a view directory shows no write bits");
    fails(() => fs.readFileSync(inMount("docs", "guide.md")), "EACCES");
    fails(() => fs.writeFileSync(inMount("docs", "guide.md"), "changed"), "EACCES");
    fails(() => fs.writeFileSync(inMount("docs", "new.md"), "new"), "EACCES");
    assert.equal(fs.readFileSync(inSource("docs", "guide.md"), "utf8"), "# Guide\n");
  });

  test("a rule without wildcards beats a wildcard one", () => {
    fs.appendFileSync(inMount("docs", "notes.md"), "more\n");
    assert.equal(fs.readFileSync(inSource("docs", "notes.md"), "utf8"), "notes\nmore\n");
  });

  test("a read file can be read but not changed, and nothing can be created at a read path", () => {
    assert.equal(fs.readFileSync(inMount("README"), "utf8"), "read me\n");
    assert.equal(fs.statSync(inMount("README")).mode & 0o222, 0, "no write bits shown");
    fails(() => fs.writeFileSync(inMount("README"), "changed"), "EACCES");
    fails(() => fs.appendFileSync(inMount("README"), "more"), "EACCES");
    fails(() => fs.truncateSync(inMount("README"), 0), "EACCES");
    fails(() => fs.unlinkSync(inMount("README")), "EACCES");
    fails(() => fs.chmodSync(inMount("README"), 0o777), "EACCES");
    fails(() => fs.renameSync(inMount("README"), inMount("src", "README")), "EACCES");
    fails(() => fs.writeFileSync(inMount("NEW"), "new"), "EACCES");
    fails(() => fs.mkdirSync(inMount("newdir")), "EACCES");
    assert.equal(fs.readFileSync(inSource("README"), "utf8"), "read me\n");
  });

  test("every entry is presented as owned by the sandbox user", () => {
    for (const entry of ["", "README", "src", "src/a.c", "docs/guide.md"]) {
      const stat = fs.lstatSync(inMount(entry));
      assert.deepEqual([stat.uid, stat.gid], [VIEW_UID, VIEW_GID], entry || "the root");
    }
  });

  test("a write area allows editing, creating (owned by the codebase owner) and renaming files", () => {
    fs.writeFileSync(inMount("src", "a.c"), "int main(void) { return 1; }\n");
    assert.equal(fs.readFileSync(inSource("src", "a.c"), "utf8"), "int main(void) { return 1; }\n");

    fs.writeFileSync(inMount("src", "new.txt"), "new\n");
    const created = fs.statSync(inSource("src", "new.txt"));
    assert.deepEqual([created.uid, created.gid], [OWNER_UID, OWNER_GID]);
    fs.renameSync(inMount("src", "new.txt"), inMount("src", "renamed.txt"));
    assert.ok(!fs.existsSync(inSource("src", "new.txt")));
    assert.equal(fs.readFileSync(inSource("src", "renamed.txt"), "utf8"), "new\n");

    fs.mkdirSync(inMount("src", "lib"));
    const dir = fs.statSync(inSource("src", "lib"));
    assert.deepEqual([dir.uid, dir.gid], [OWNER_UID, OWNER_GID]);
    fs.chmodSync(inMount("src", "renamed.txt"), 0o6755);
    assert.equal(fs.statSync(inSource("src", "renamed.txt")).mode & 0o7777, 0o755, "set-id bits are dropped");
    fs.unlinkSync(inMount("src", "renamed.txt"));
    assert.ok(!fs.existsSync(inSource("src", "renamed.txt")));
  });

  test("renaming a directory is EXDEV, so mv falls back to per-file copies", () => {
    fails(() => fs.renameSync(inMount("src"), inMount("docs2")), "EXDEV");
    fails(() => fs.renameSync(inMount("src", "lib"), inMount("src", "lib2")), "EXDEV");
    assert.ok(fs.statSync(inSource("src", "lib")).isDirectory());
  });

  test("a hidden file cannot be replaced by a rename, reached by a hard link, written or moved away", () => {
    fails(() => fs.renameSync(inMount("src", "a.c"), inMount("src", "secret.env")), "EACCES");
    fails(() => fs.linkSync(inMount("src", "a.c"), inMount("src", "secret.env")), "EPERM");
    fails(() => fs.linkSync(inMount("src", "a.c"), inMount("src", "a-link.c")), "EPERM");
    fails(() => fs.writeFileSync(inMount("src", "secret.env"), "overwritten"), "EACCES");
    fails(() => fs.renameSync(inMount("src", "secret.env"), inMount("src", "visible.txt")), "ENOENT");
    fails(() => fs.unlinkSync(inMount("src", "secret.env")), "ENOENT");
    assert.equal(fs.readFileSync(inSource("src", "secret.env"), "utf8"), "hidden in a write area\n");
    assert.ok(fs.existsSync(inSource("src", "a.c")));
  });

  test("rmdir of a directory holding only hidden entries succeeds and hides it, as if it were empty; mkdir brings it back; the host keeps everything (HIDDEN_RMDIR_NOTE)", () => {
    fs.mkdirSync(inSource("src", "cfg", "deep"), { recursive: true });
    fs.writeFileSync(inSource("src", "cfg", "db.env"), "PASSWORD=host\n");
    fs.writeFileSync(inSource("src", "cfg", "deep", "x.env"), "TOKEN=deep\n");
    fs.writeFileSync(inSource("src", "cfg", "visible.txt"), "v\n");
    // A visible entry: ENOTEMPTY, as anywhere.
    fails(() => fs.rmdirSync(inMount("src", "cfg")), "ENOTEMPTY");
    fs.unlinkSync(inMount("src", "cfg", "visible.txt"));
    // deep/ holds only a hidden file: it goes; then cfg holds only hidden entries: it goes too.
    assert.deepEqual(fs.readdirSync(inMount("src", "cfg")), ["deep"]);
    fs.rmdirSync(inMount("src", "cfg", "deep"));
    assert.deepEqual(fs.readdirSync(inMount("src", "cfg")), []);
    fs.rmdirSync(inMount("src", "cfg"));
    fails(() => fs.statSync(inMount("src", "cfg")), "ENOENT");
    assert.ok(!fs.readdirSync(inMount("src")).includes("cfg"));
    fails(() => fs.writeFileSync(inMount("src", "cfg", "new.txt"), "x"), ["ENOENT", "EACCES"]);
    assert.equal(fs.readFileSync(inSource("src", "cfg", "db.env"), "utf8"), "PASSWORD=host\n", "the host keeps the hidden files");
    // mkdir brings it back, looking new and empty; the hidden entries stay hidden.
    fs.mkdirSync(inMount("src", "cfg"), { mode: 0o700 });
    assert.deepEqual(fs.readdirSync(inMount("src", "cfg")), []);
    assert.equal(fs.statSync(inMount("src", "cfg")).mode & 0o777, 0o700);
    fs.writeFileSync(inMount("src", "cfg", "again.txt"), "again\n");
    assert.equal(fs.readFileSync(inSource("src", "cfg", "again.txt"), "utf8"), "again\n");
    fails(() => fs.readFileSync(inMount("src", "cfg", "db.env")), "ENOENT");
    fails(() => fs.statSync(inMount("src", "cfg", "deep")), "ENOENT");
    // rm -rf of it works to the end, as on a directory without hidden entries.
    const rm = spawnSync("rm", ["-rf", inMount("src", "cfg")], { encoding: "utf8" });
    assert.equal(rm.status, 0, rm.stderr);
    fails(() => fs.statSync(inMount("src", "cfg")), "ENOENT");
    assert.ok(fs.existsSync(inSource("src", "cfg", "deep", "x.env")));
    // A read area's directory is not removed, hidden entries or not.
    fs.mkdirSync(inSource("ro"), { recursive: true });
    fs.writeFileSync(inSource("ro", "k.env"), "K=1\n");
    fails(() => fs.rmdirSync(inMount("ro")), "EACCES");
  });

  test("chown is refused unless it names the presented owner, and only regular files can be made", () => {
    fails(() => fs.chownSync(inMount("src", "a.c"), 0, 0), "EPERM");
    fs.chownSync(inMount("src", "a.c"), VIEW_UID, VIEW_GID);
    const mkfifo = spawnSync("mkfifo", [inMount("src", "fifo")], { encoding: "utf8" });
    assert.notEqual(mkfifo.status, 0);
    assert.match(mkfifo.stderr, /Operation not permitted/);
  });

  test("symlinks are shown as symlinks, with their target text, and can be made with any target", () => {
    assert.ok(fs.lstatSync(inMount("src", "escape")).isSymbolicLink());
    assert.equal(fs.readlinkSync(inMount("src", "escape")), "/etc");
    fs.symlinkSync("../../../anywhere", inMount("src", "made"));
    assert.equal(fs.readlinkSync(inSource("src", "made")), "../../../anywhere");
    const made = fs.lstatSync(inSource("src", "made"));
    assert.deepEqual([made.uid, made.gid], [OWNER_UID, OWNER_GID]);
  });

  test("a directory replaced by a symlink in the source is not followed by the daemon", () => {
    // From the host side the kernel would itself follow a symlink the daemon shows, into the
    // host's /etc; a lookup relative to a cwd inside the old `src` goes to the daemon as
    // "/src/passwd" instead, which is what a sandbox racing the daemon would make it resolve.
    const cwd = process.cwd();
    process.chdir(inMount("src"));
    fs.renameSync(inSource("src"), inSource("src.moved"));
    fs.symlinkSync("/etc", inSource("src"));
    try {
      let content: string | undefined;
      fails(() => (content = fs.readFileSync("passwd", "utf8")), ["ELOOP", "ENOENT", "EACCES"]);
      assert.equal(content, undefined);
      fails(() => fs.writeFileSync("hostname", "overwritten"), ["ELOOP", "ENOENT", "EACCES"]);
    } finally {
      process.chdir(cwd);
      fs.unlinkSync(inSource("src"));
      fs.renameSync(inSource("src.moved"), inSource("src"));
    }
    assert.ok(!fs.existsSync(inSource("src.moved")));
  });

  test("bad arguments and rules files are refused with a message", () => {
    const common = ["--mount", mnt, "--uid", "1", "--gid", "1", "--owner-uid", "1", "--owner-gid", "1"];
    const badRules = path.join(base, "bad-rules");
    for (const [content, problem] of [
      ["default\tread\nsrc/**\n", /line 2/],
      ["default\tread\nall\tsrc/**\n", /level must be/],
      ["default\tread\nwrite\t/src\n", /relative/],
      ["none\tsrc/**\n", /no default/],
      ["default\tread\ndefault\twrite\n", /second default/],
      ["default\tread\n" + "read\tx\n".repeat(1001), /more than 1000 rules/],
    ] as const) {
      fs.writeFileSync(badRules, content);
      const result = run(["--source", source, "--rules", badRules, ...common]);
      assert.equal(result.status, 2, result.stderr);
      assert.match(result.stderr, problem);
    }
    const notADirectory = run(["--source", rulesFile, "--rules", rulesFile, ...common]);
    assert.notEqual(notADirectory.status, 0);
    assert.match(notADirectory.stderr, /not a directory/);
    const missing = run(["--source", source, "--rules", rulesFile]);
    assert.notEqual(missing.status, 0);
    assert.match(missing.stderr, /--mount is required/);
  });

  test("whiteouts are bounded (4096 per mount, HIDDEN_RMDIR_NOTE): past that, such an rmdir is ENOTEMPTY again and the directory stays", () => {
    // Run late: it fills the mount's whiteouts.
    const count = 4097;
    for (let i = 0; i < count; i++) {
      fs.mkdirSync(inSource("src", "many", `d${i}`), { recursive: true });
      fs.writeFileSync(inSource("src", "many", `d${i}`, "x.env"), "K=1\n");
    }
    let hidden = 0;
    let refused = 0;
    for (let i = 0; i < count; i++) {
      const code = errorCode(() => fs.rmdirSync(inMount("src", "many", `d${i}`)));
      if (code === undefined) hidden++;
      else if (code === "ENOTEMPTY") refused++;
      else assert.fail(`rmdir d${i}: ${code}`);
    }
    // The earlier test's directory revived by mkdir gave its whiteout back; others may hold some.
    assert.ok(hidden <= 4096 && hidden >= 4090, `hidden ${hidden}`);
    assert.ok(refused >= 1, "the one past the bound is refused");
    assert.equal(fs.readdirSync(inMount("src", "many")).length, refused, "refused ones stay listed");
    assert.equal(fs.readdirSync(inSource("src", "many")).length, count, "the host keeps every directory");
  });

  test("unmounting stops the daemon with status 0", async () => {
    const result = spawnSync("umount", [mnt], { encoding: "utf8" });
    assert.equal(result.status, 0, result.stderr);
    assert.equal(await daemonExit, 0);
  });
});
