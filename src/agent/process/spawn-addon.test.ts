import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { pbkdf2 } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { CubicleError } from "../../shared/cubicle-error.js";
import type { AgentUser } from "../users.js";
import type { EndEvent } from "./exit-status.js";
import { useRunAsHelper } from "./launch.js";
import { ManagedProcess, type SpawnSpec } from "./managed-process.js";
import { execCandidates, spawnAddonAvailable, useSpawnAddon } from "./spawn-addon.js";

// Built by scripts/build.mjs (the test runner builds first); setup-host.sh installs the compiler.
const addonFile = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../../dist/agent/spawn.node");
const isRoot = process.getuid?.() === 0;
const root: AgentUser = { name: "root", uid: 0, gid: 0, groups: [0], home: "/root", shell: "/bin/bash" };
/** Numeric ids need no passwd entry: 65534 is nobody on Debian, 27 and 100 are sudo and users. */
const other: AgentUser = { name: "t15a", uid: 65534, gid: 65534, groups: [65534, 27, 100], home: "/", shell: "/bin/sh" };
const env = { PATH: "/usr/bin:/bin", HOME: "/root", LANG: "C" };

interface Run {
  proc: ManagedProcess;
  stdout: string;
  stderr: string;
  end: EndEvent;
}

function spec(cmd: string, args: string[], options: Partial<SpawnSpec> = {}): SpawnSpec {
  return { config: { cmd, args, envs: {} }, cwd: "/tmp", env, user: root, stdin: false, ...options };
}

/** Starts a command and collects its output; `started` resolves with the process. */
function start(s: SpawnSpec): { started: Promise<ManagedProcess>; done: Promise<Run> } {
  const started = ManagedProcess.spawnCommand(s);
  const done = started.then(
    (proc) =>
      new Promise<Run>((resolve) => {
        const chunks = { stdout: [] as Buffer[], stderr: [] as Buffer[] };
        proc.subscribe({
          data: (kind, chunk) => void (kind !== "pty" && chunks[kind].push(chunk)),
          end: (end) => resolve({ proc, end, stdout: Buffer.concat(chunks.stdout).toString(), stderr: Buffer.concat(chunks.stderr).toString() }),
        });
      }),
  );
  return { started, done };
}

function run(cmd: string, args: string[], options: Partial<SpawnSpec> = {}): Promise<Run> {
  return start(spec(cmd, args, options)).done;
}

function sh(script: string, options: Partial<SpawnSpec> = {}): Promise<Run> {
  return run("/bin/sh", ["-c", script], options);
}

/** The test process's children that are zombies (state Z). */
function zombieChildren(): number[] {
  const zombies: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, "utf8");
      // pid (comm) state ppid ...: comm may hold spaces and parentheses, so parse after the last ')'.
      const [state, ppid] = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (Number(ppid) === process.pid && state === "Z") zombies.push(Number(entry));
    } catch {
      // exited meanwhile
    }
  }
  return zombies;
}

function openFds(): number {
  return fs.readdirSync("/proc/self/fd").length;
}

/** Running, not merely a zombie waiting for whoever inherited it. */
function isAlive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

describe("the spawn addon (SPAWN_NOTE)", () => {
  before(() => useSpawnAddon(addonFile));
  after(() => useSpawnAddon(undefined));

  it("is built and usable here", () => assert.ok(spawnAddonAvailable(), `${addonFile} is missing or unusable: run scripts/build.mjs with a C compiler installed`));

  it("streams stdout and stderr and reports the exit code", async () => {
    const result = await sh("echo out; echo err >&2; exit 3");
    assert.equal(result.stdout, "out\n");
    assert.equal(result.stderr, "err\n");
    assert.deepEqual(result.end, { exitCode: 3, exited: true, status: "exit status 3", error: "exit status 3" });
  });

  it("delivers a large output intact", async () => {
    const result = await sh("head -c 3000000 /dev/zero | tr '\\0' x");
    assert.equal(result.stdout.length, 3_000_000);
    assert.ok(/^x+$/.test(result.stdout));
  });

  it("writes stdin and closes it; without stdin the command reads /dev/null", async () => {
    const { started, done } = start(spec("/bin/cat", [], { stdin: true }));
    const proc = await started;
    await proc.writeStdin(Buffer.from("hello "));
    await proc.writeStdin(Buffer.from("world\n"));
    proc.closeStdin();
    assert.equal((await done).stdout, "hello world\n");
    const none = await sh("cat; readlink /proc/self/fd/0");
    assert.equal(none.stdout, "/dev/null\n");
    await assert.rejects(none.proc.writeStdin(Buffer.from("x")), /stdin not enabled or closed/);
  });

  it("passes exactly the environment given, and runs in the cwd", async () => {
    const result = await run("/usr/bin/env", [], { cwd: "/" });
    assert.equal(result.stdout, "PATH=/usr/bin:/bin\nHOME=/root\nLANG=C\n");
    assert.equal((await sh("pwd", { cwd: os.tmpdir() })).stdout, `${os.tmpdir()}\n`);
  });

  it("starts the command as a session and process group leader with default signals, an empty mask and only fds 0-2", async () => {
    const result = await sh('read -r _ _ _ _ pgid sid _ < /proc/$$/stat; echo "$$ $pgid $sid"; grep -E "^Sig(Blk|Ign)" /proc/self/status; ls /proc/self/fd');
    const [ids, blocked, ignored, ...fds] = result.stdout.trim().split("\n");
    const [pid, pgid, sid] = ids!.split(" ").map(Number);
    assert.equal(pid, result.proc.pid);
    assert.equal(pgid, pid);
    assert.equal(sid, pid);
    assert.equal(blocked, "SigBlk:\t0000000000000000");
    // Node ignores SIGPIPE; a command must not inherit that (`yes | head` relies on it).
    assert.equal(ignored, "SigIgn:\t0000000000000000");
    assert.deepEqual(fds, ["0", "1", "2", "3"], "ls's own directory fd is 3; nothing of the agent leaks");
  });

  it("marks the command and what it starts for the OOM killer, as root and as another user", { skip: !isRoot && "needs root" }, async () => {
    for (const user of [root, other]) {
      const result = await sh("cat /proc/self/oom_score_adj; (cat /proc/self/oom_score_adj)", { user });
      assert.equal(result.stdout, "1000\n1000\n", user.name);
    }
    assert.equal(fs.readFileSync("/proc/self/oom_score_adj", "utf8").trim(), "0", "the agent keeps its own score");
  });

  it("runs a command as another user with exactly its supplementary groups, for good, and leaves the agent's credentials alone", { skip: !isRoot && "needs root" }, async () => {
    const groupsBefore = process.getgroups!();
    const result = await sh('id -u; id -g; id -G; grep -E "^(Uid|Gid|CapEff)" /proc/self/status', { user: other });
    assert.equal(result.stdout, "65534\n65534\n65534 27 100\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\nCapEff:\t0000000000000000\n");
    const regain = await run("/usr/bin/perl", ["-e", "$< = 0; $> = 0; print qq($< $>\\n)"], { user: other });
    assert.equal(regain.stdout, "65534 65534\n");
    // glibc's credential wrappers would have switched every thread of the agent: raw syscalls must not.
    assert.equal(process.getuid!(), 0);
    assert.equal(process.geteuid!(), 0);
    assert.equal(process.getegid!(), 0);
    assert.deepEqual(process.getgroups!(), groupsBefore);
    const status = fs.readFileSync("/proc/self/status", "utf8");
    assert.match(status, /^Uid:\t0\t0\t0\t0$/m);
    // Root's commands get no supplementary groups, like run-as with "-".
    assert.equal((await run("/usr/bin/id", ["-G"], { user: { ...root, groups: [] } })).stdout, "0\n");
  });

  it("finds the command in the command's own PATH like execvp, skipping entries it may not execute", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "t15a-path-"));
    try {
      fs.mkdirSync(path.join(dir, "first"));
      fs.mkdirSync(path.join(dir, "second"));
      fs.writeFileSync(path.join(dir, "first", "t15a-tool"), "#!/bin/sh\necho first\n", { mode: 0o644 }); // not executable: EACCES
      fs.writeFileSync(path.join(dir, "second", "t15a-tool"), "#!/bin/sh\necho second\n", { mode: 0o755 });
      fs.writeFileSync(path.join(dir, "second", "t15a-noshebang"), "echo via sh $1\n", { mode: 0o755 }); // ENOEXEC: run by /bin/sh
      const PATH = `${dir}/missing:${dir}/first:${dir}/second:/usr/bin:/bin`;
      assert.equal((await run("t15a-tool", [], { env: { PATH } })).stdout, "second\n");
      assert.equal((await run("t15a-noshebang", ["arg"], { env: { PATH } })).stdout, "via sh arg\n");
      // Only a non-executable match: EACCES, like execvp.
      await assert.rejects(ManagedProcess.spawnCommand(spec("t15a-tool", [], { env: { PATH: `${dir}/first` } })), /spawn t15a-tool EACCES$/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    assert.deepEqual(execCandidates("ls", "/a::/b"), ["/a/ls", "ls", "/b/ls"]);
    assert.deepEqual(execCandidates("./x", "/a"), ["./x"]);
    assert.deepEqual(execCandidates("ls", undefined), ["/bin/ls", "/usr/bin/ls"]);
  });

  it("rejects a command that cannot start with Node's wording, as Node's spawn does", async () => {
    const failures: Array<[SpawnSpec, RegExp]> = [
      [spec("t15a-no-such-command", ["a"]), /^error starting process 't15a-no-such-command a': spawn t15a-no-such-command ENOENT$/],
      [spec("/no/such/file", []), /^error starting process '\/no\/such\/file': spawn \/no\/such\/file ENOENT$/],
      [spec("/etc/passwd", []), /^error starting process '\/etc\/passwd': spawn \/etc\/passwd EACCES$/],
      [spec("/bin/true", [], { cwd: "/no/such/dir" }), /^error starting process '\/bin\/true': spawn \/bin\/true ENOENT$/],
      [spec("/bin/true", ["a\0b"]), /^error starting process/],
    ];
    for (const [failing, message] of failures) {
      await assert.rejects(ManagedProcess.spawnCommand(failing), (error: unknown) => error instanceof CubicleError && error.code === "invalid_argument" && message.test(error.message));
    }
    // Node's own spawn (no run-as in between) words the same failure the same way.
    useSpawnAddon(null);
    useRunAsHelper("/nonexistent/t15a-run-as");
    try {
      await assert.rejects(ManagedProcess.spawnCommand(spec("t15a-no-such-command", ["a"])), (error: unknown) => (error as Error).message === "error starting process 't15a-no-such-command a': spawn t15a-no-such-command ENOENT");
    } finally {
      useRunAsHelper(undefined);
      useSpawnAddon(addonFile);
    }
    assert.deepEqual(zombieChildren(), []);
  });

  it("signals the whole process group, and reports the signal", async () => {
    const { started, done } = start(spec("/bin/sh", ["-c", "sleep 30 & echo $!; wait"]));
    const proc = await started;
    let background = 0;
    const unsubscribe = proc.subscribe({ data: (_kind, chunk) => void (background = Number(chunk.toString().trim())), end: () => {} });
    for (let i = 0; i < 200 && background === 0; i++) await new Promise((r) => setTimeout(r, 10));
    unsubscribe();
    assert.ok(background > 0 && isAlive(background));
    proc.signal("SIGTERM");
    const result = await done;
    assert.equal(result.end.status, "signal: terminated");
    for (let i = 0; i < 100 && isAlive(background); i++) await new Promise((r) => setTimeout(r, 10));
    assert.ok(!isAlive(background), "the background child got the signal too");
    const segv = await sh("kill -SEGV $$");
    assert.deepEqual(segv.end, { exitCode: -1, exited: false, status: "signal: segmentation fault", error: "signal: segmentation fault" });
  });

  it("kills the command when its lifetime passes", async () => {
    const { started, done } = start(spec("/bin/sleep", ["30"]));
    (await started).setLifetime(100);
    assert.equal((await done).end.status, "signal: killed");
  });

  it("starts many commands at once, alongside Node's own children and busy threadpool work, each with its own output and exit", async () => {
    const busy = Array.from({ length: 8 }, () => new Promise((resolve) => pbkdf2("x", "y", 50_000, 32, "sha256", resolve)));
    const nodeChildren = Array.from(
      { length: 10 },
      (_, i) => new Promise<number | null>((resolve) => spawn("/bin/sh", ["-c", `exit ${i}`]).once("exit", (code) => resolve(code))),
    );
    const runs = await Promise.all(Array.from({ length: 100 }, (_, i) => sh(`echo ${i}; exit ${i % 7}`)));
    runs.forEach((result, i) => {
      assert.equal(result.stdout, `${i}\n`);
      assert.equal(result.end.exitCode, i % 7);
    });
    assert.equal(new Set(runs.map((result) => result.proc.pid)).size, 100);
    assert.deepEqual(await Promise.all(nodeChildren), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], "libuv still reaps its own children");
    await Promise.all(busy);
  });

  it("leaves no zombie and no descriptor behind after 200 commands", async () => {
    // Warm up: the first command loads what stays loaded.
    await sh("true");
    await new Promise((r) => setTimeout(r, 100));
    const before = openFds();
    for (let batch = 0; batch < 10; batch++) {
      await Promise.all(
        Array.from({ length: 20 }, (_, i) =>
          i % 2 === 0
            ? sh("echo x")
            : start(spec("/bin/cat", [], { stdin: true })).started.then((proc) => {
                proc.closeStdin();
                return proc.ended;
              }),
        ),
      );
    }
    await new Promise((r) => setTimeout(r, 50));
    // Earlier tests' sockets may still be closing: fewer is fine, one more per command is not.
    assert.ok(openFds() <= before, `${openFds()} descriptors open after 200 commands, ${before} before`);
    assert.deepEqual(zombieChildren(), []);
  });
});
