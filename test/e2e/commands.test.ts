/**
 * `sandbox.commands.*` and `sandbox.pty.*` through the official `e2b` SDK against a real
 * server and real sandboxes: output, exit codes, users, envs, cwd, timeouts, background
 * processes, stdin, signals, terminals, and a sandbox killed while a command streams.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { after, before, test } from "node:test";
import { CommandExitError, Sandbox, TimeoutError } from "e2b";
import { e2eRuntime, startTestServer, useServerForSdk, type TestServer } from "./harness.js";

const devUser = "user";
const devHome = "/home/user";
const devExtraGroup = "sudo";
let server: TestServer;
let sandbox: Sandbox;

before(async () => {
  server = await startTestServer();
  useServerForSdk(server);
  sandbox = await Sandbox.create({ envs: { SANDBOX_WIDE: "from-init", OVERRIDE_ME: "init" } });
});

after(async () => {
  await sandbox?.kill().catch(() => undefined);
  await server?.stop();
});

test("run: stdout, stderr and exit code 0", async () => {
  const r = await sandbox.commands.run("echo hello; echo oops >&2");
  assert.equal(r.exitCode, 0);
  assert.equal(r.stdout, "hello\n");
  assert.equal(r.stderr, "oops\n");
});

test("run: non-zero exit → CommandExitError with upstream's error text", async () => {
  await assert.rejects(sandbox.commands.run("echo out; exit 3"), (e: unknown) => {
    assert.ok(e instanceof CommandExitError, String(e));
    assert.equal(e.exitCode, 3);
    assert.equal(e.error, "exit status 3");
    assert.equal(e.stdout, "out\n");
    return true;
  });
});

test("run: per-call envs override sandbox-wide envs, which are visible", async () => {
  const r = await sandbox.commands.run('echo "$SANDBOX_WIDE $OVERRIDE_ME $E2B_SANDBOX"', { envs: { OVERRIDE_ME: "call" } });
  assert.equal(r.stdout, "from-init call true\n");
});

test("run: default user, HOME/USER/LOGNAME, cwd = home", async () => {
  const r = await sandbox.commands.run('id -un; echo "$HOME $USER $LOGNAME"; pwd');
  assert.equal(r.stdout, `${devUser}\n${devHome} ${devUser} ${devUser}\n${devHome}\n`);
});

test("run: supplementary groups of the user", async () => {
  const r = await sandbox.commands.run("id -Gn");
  assert.ok(r.stdout.split(/\s+/).includes(devExtraGroup), r.stdout);
});

test("run: user root (home /root; cwd is the template's workdir, as on E2B)", async () => {
  const r = await sandbox.commands.run("id -u; echo $HOME; pwd", { user: "root" });
  assert.equal(r.stdout, "0\n/root\n/home/user\n");
});

test("run: unknown user → AuthenticationError-ish failure", async () => {
  await assert.rejects(sandbox.commands.run("true", { user: "no-such-user" as "root" }), /invalid username/);
});

test("run: cwd absolute and relative to home", async () => {
  assert.equal((await sandbox.commands.run("pwd", { cwd: "/tmp" })).stdout, "/tmp\n");
  await sandbox.commands.run("mkdir -p sub");
  assert.equal((await sandbox.commands.run("pwd", { cwd: "sub" })).stdout, `${devHome}/sub\n`);
});

test("run: missing cwd → invalid argument", async () => {
  await assert.rejects(sandbox.commands.run("pwd", { cwd: "/does/not/exist" }), /cwd '\/does\/not\/exist' does not exist/);
});

test("run: timeoutMs kills the command", async () => {
  const started = Date.now();
  await assert.rejects(sandbox.commands.run("sleep 30; echo never", { timeoutMs: 1500 }), (e: unknown) => {
    assert.ok(e instanceof TimeoutError, String(e));
    return true;
  });
  assert.ok(Date.now() - started < 5000);
  await new Promise((r) => setTimeout(r, 300));
  const running = await sandbox.commands.list();
  assert.ok(!running.some((p) => p.args.includes("sleep 30; echo never")), JSON.stringify(running));
});

test("run: large output (8 MB) arrives complete", async () => {
  const r = await sandbox.commands.run("head -c 6000000 /dev/zero | base64 -w 0");
  assert.equal(r.stdout.length, 8000000);
});

test("run: output is streamed as produced, not buffered to the end", async () => {
  const seen: number[] = [];
  const started = Date.now();
  await sandbox.commands.run("echo first; sleep 1.5; echo second", { onStdout: () => void seen.push(Date.now() - started) });
  assert.equal(seen.length, 2);
  assert.ok(seen[0]! < 1000 && seen[1]! >= 1400, JSON.stringify(seen));
});

test("background + list + connect + kill", async () => {
  const handle = await sandbox.commands.run("sleep 60", { background: true });
  const listed = await sandbox.commands.list();
  const entry = listed.find((p) => p.pid === handle.pid);
  assert.ok(entry, JSON.stringify(listed));
  assert.equal(entry.cmd, "/bin/bash");
  assert.deepEqual(entry.args, ["-l", "-c", "sleep 60"]);
  const attached = await sandbox.commands.connect(handle.pid);
  assert.equal(await sandbox.commands.kill(handle.pid), true);
  for (const h of [handle, attached]) {
    await assert.rejects(h.wait(), (e: unknown) => {
      assert.ok(e instanceof CommandExitError, String(e));
      assert.equal(e.exitCode, -1);
      assert.equal(e.error, "signal: killed");
      return true;
    });
  }
  assert.ok(!(await sandbox.commands.list()).some((p) => p.pid === handle.pid));
});

test("kill of an unknown pid → false", async () => {
  assert.equal(await sandbox.commands.kill(999_999), false);
});

test("connect to an unknown pid → error", async () => {
  await assert.rejects(sandbox.commands.connect(999_999));
});

test("late connect after exit still gets the end", async () => {
  const handle = await sandbox.commands.run("echo done; exit 4", { background: true });
  await assert.rejects(handle.wait());
  const late = await sandbox.commands.connect(handle.pid);
  await assert.rejects(late.wait(), (e: unknown) => e instanceof CommandExitError && e.exitCode === 4);
});

test("sendStdin + closeStdin", async () => {
  const handle = await sandbox.commands.run("cat; echo EOF", { background: true, stdin: true });
  await sandbox.commands.sendStdin(handle.pid, "abc\n");
  await handle.sendStdin("def\n");
  await sandbox.commands.closeStdin(handle.pid);
  const r = await handle.wait();
  assert.equal(r.stdout, "abc\ndef\nEOF\n");
});

test("sendStdin without stdin: true → error", async () => {
  const handle = await sandbox.commands.run("sleep 5", { background: true });
  await assert.rejects(sandbox.commands.sendStdin(handle.pid, "x"), /stdin not enabled or closed/);
  await handle.kill();
});

test("stdin defaults to /dev/null when not requested", async () => {
  const r = await sandbox.commands.run("cat; echo after");
  assert.equal(r.stdout, "after\n");
});

test("pty: create, input, resize, kill", async () => {
  let output = "";
  const decoder = new TextDecoder();
  const terminal = await sandbox.pty.create({ cols: 80, rows: 24, onData: (d) => void (output += decoder.decode(d, { stream: true })) });
  const until = async (re: RegExp) => {
    for (let i = 0; i < 100 && !re.test(output); i++) await new Promise((r) => setTimeout(r, 50));
    assert.match(output, re);
  };
  await sandbox.pty.sendInput(terminal.pid, new TextEncoder().encode("echo pty-$((40+2)) $TERM\n"));
  await until(/pty-42 xterm-256color/);
  await sandbox.pty.resize(terminal.pid, { cols: 123, rows: 45 });
  await sandbox.pty.sendInput(terminal.pid, new TextEncoder().encode("stty size; id -un; id -Gn; tty\n"));
  await until(/45 123/);
  await until(new RegExp(`\\b${devUser}\\b`));
  await until(new RegExp(`\\b${devExtraGroup}\\b`));
  await until(/\/dev\/pts\//);
  assert.ok((await sandbox.commands.list()).some((p) => p.pid === terminal.pid));
  assert.equal(await sandbox.pty.kill(terminal.pid), true);
  await assert.rejects(terminal.wait());
});

test("pty: exit via input ends with the exit code", async () => {
  const terminal = await sandbox.pty.create({ cols: 80, rows: 24, onData: () => {}, user: "root" });
  await sandbox.pty.sendInput(terminal.pid, new TextEncoder().encode("exit 0\n"));
  const r = await terminal.wait();
  assert.equal(r.exitCode, 0);
});


test("orphaned background processes are reaped (no zombies)", async () => {
  await sandbox.commands.run("for i in 1 2 3; do (sleep 0.1 &) ; done; sleep 0.5");
  const zombies = await sandbox.commands.run("ps -eo stat= | grep -c '^Z' || true");
  assert.equal(zombies.stdout.trim(), "0");
});

test("commands start through the agent's spawn addon, not a fork of the agent (SPAWN_NOTE)", { skip: e2eRuntime === "microvm" && "a microVM's processes live in its own kernel: the host cannot see them" }, async () => {
  // Seen from the host (the agent in the sandbox may be non-dumpable): the command's parent is
  // the agent, and the agent has the addon mapped.
  const marker = `t15a-spawn-${process.pid}-${Date.now()}`;
  const handle = await sandbox.commands.run(`exec -a ${marker} sleep 30`, { background: true, user: "root" });
  try {
    let hostPid: number | undefined;
    for (let i = 0; i < 100 && hostPid === undefined; i++) {
      for (const entry of readdirSync("/proc").filter((name) => /^\d+$/.test(name))) {
        const cmdline = readFileSafely(`/proc/${entry}/cmdline`);
        if (cmdline.startsWith(`${marker}\0`)) hostPid = Number(entry);
      }
      if (hostPid === undefined) await new Promise((r) => setTimeout(r, 20));
    }
    assert.ok(hostPid, "the command is visible on the host");
    const agentPid = /^PPid:\s+(\d+)$/m.exec(readFileSafely(`/proc/${hostPid}/status`))?.[1];
    assert.match(readFileSafely(`/proc/${agentPid}/cmdline`), /\/\.cubicle\/agent\.js/);
    assert.match(readFileSafely(`/proc/${agentPid}/maps`), /\/spawn\.node$/m);
    assert.equal(readFileSafely(`/proc/${hostPid}/oom_score_adj`).trim(), "1000");
  } finally {
    await handle.kill();
  }
});

function readFileSafely(file: string): string {
  try {
    return readFileSync(file, "utf8");
  } catch {
    return "";
  }
}

test("sudo works for the default user", async () => {
  const r = await sandbox.commands.run("sudo -n id -u");
  assert.equal(r.stdout, "0\n");
});

test("a sandbox killed while a command streams makes the SDK raise its sandbox-killed timeout", async () => {
  const victim = await Sandbox.create();
  // Killed once the stream is flowing (a slow guest, a TCG microVM, takes longer than a container to get there).
  let flowing!: () => void;
  const firstTick = new Promise<void>((resolve) => (flowing = resolve));
  const running = victim.commands.run("while true; do echo tick; sleep 0.1; done", { timeoutMs: 0, onStdout: () => flowing() });
  // Attach the expectation first: the rejection arrives while the kill is still in flight.
  const rejected = assert.rejects(running, (e: unknown) => {
    assert.ok(e instanceof TimeoutError, `expected TimeoutError, got ${String(e)}`);
    assert.match((e as Error).message, /killed|end of life|timed out/i);
    return true;
  });
  await firstTick;
  await new Promise((r) => setTimeout(r, 200));
  await Sandbox.kill(victim.sandboxId);
  await rejected;
});

test("root inside the sandbox is not root on the host, and the sandbox cannot reach the host", async () => {
  if (e2eRuntime === "microvm") {
    // Root of the guest's own kernel: not the host's kernel at all.
    const r = await sandbox.commands.run("uname -r", { user: "root" });
    assert.notEqual(r.stdout.trim(), readFileSync("/proc/sys/kernel/osrelease", "utf8").trim());
  } else {
    const r = await sandbox.commands.run("cat /proc/self/uid_map", { user: "root" });
    // Root inside is the first id of the sandbox's own host range (above 2^30), not host root.
    const [inside, outside, count] = r.stdout.trim().split(/\s+/).map(Number);
    assert.deepEqual([inside, count], [0, 65536], r.stdout);
    assert.ok(outside! >= 2 ** 30, r.stdout);
  }
  const probe = await sandbox.commands.run("timeout 2 bash -c 'echo > /dev/tcp/$(ip route | awk \"/default/ {print \\$3}\")/22' && echo reached || echo blocked");
  assert.equal(probe.stdout.trim(), "blocked");
});
