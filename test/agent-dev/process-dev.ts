/**
 * SDK-driven checks of the agent's process service, run against one agent in debug mode:
 *
 *   ip netns exec agentdev-proc node --import tsx src/agent/main.ts &
 *   ip netns exec agentdev-proc node --import tsx test/agent-dev/process-dev.ts
 *
 * The script inits the agent itself (POST /init: default user, env vars), so it needs a
 * non-root account with a home and a supplementary group: DEV_USER (default `cubdev`,
 * uid 1500, home /home/cubdev, member of `cubextra`). Each check prints PASS/FAIL; the exit
 * code is the number of failures. The lead turns these into e2e tests against real sandboxes.
 */
import assert from "node:assert/strict";
import { CommandExitError, Sandbox, TimeoutError } from "e2b";

process.env.E2B_DEBUG = "true";
process.env.E2B_API_KEY ??= "e2b_0123456789abcdef0123456789abcdef01234567";

const agentUrl = process.env.AGENT_URL ?? "http://localhost:49983";
const devUser = process.env.DEV_USER ?? "cubdev";
const devHome = process.env.DEV_HOME ?? `/home/${devUser}`;
const devExtraGroup = process.env.DEV_EXTRA_GROUP ?? "cubextra";

let failures = 0;
async function check(name: string, fn: () => Promise<void>): Promise<void> {
  const started = Date.now();
  try {
    await fn();
    console.log(`PASS ${name} (${Date.now() - started} ms)`);
  } catch (error) {
    failures++;
    console.log(`FAIL ${name}: ${(error as Error)?.stack ?? error}`);
  }
}

async function init(body: Record<string, unknown>, token?: string): Promise<number> {
  const res = await fetch(`${agentUrl}/init`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(token ? { "x-access-token": token } : {}) },
    body: JSON.stringify(body),
  });
  return res.status;
}

async function main(): Promise<void> {
  assert.equal(await init({ defaultUser: devUser, envVars: { SANDBOX_WIDE: "from-init", OVERRIDE_ME: "init" } }), 204);
  const sandbox = await Sandbox.create();

  await check("run: stdout, stderr and exit code 0", async () => {
    const r = await sandbox.commands.run("echo hello; echo oops >&2");
    assert.equal(r.exitCode, 0);
    assert.equal(r.stdout, "hello\n");
    assert.equal(r.stderr, "oops\n");
  });

  await check("run: non-zero exit → CommandExitError with upstream's error text", async () => {
    await assert.rejects(sandbox.commands.run("echo out; exit 3"), (e: unknown) => {
      assert.ok(e instanceof CommandExitError, String(e));
      assert.equal(e.exitCode, 3);
      assert.equal(e.error, "exit status 3");
      assert.equal(e.stdout, "out\n");
      return true;
    });
  });

  await check("run: per-call envs override sandbox-wide envs, which are visible", async () => {
    const r = await sandbox.commands.run('echo "$SANDBOX_WIDE $OVERRIDE_ME $E2B_SANDBOX"', { envs: { OVERRIDE_ME: "call" } });
    assert.equal(r.stdout, "from-init call true\n");
  });

  await check("run: default user, HOME/USER/LOGNAME, cwd = home", async () => {
    const r = await sandbox.commands.run('id -un; echo "$HOME $USER $LOGNAME"; pwd');
    assert.equal(r.stdout, `${devUser}\n${devHome} ${devUser} ${devUser}\n${devHome}\n`);
  });

  await check("run: supplementary groups of the user", async () => {
    const r = await sandbox.commands.run("id -Gn");
    assert.ok(r.stdout.split(/\s+/).includes(devExtraGroup), r.stdout);
  });

  await check("run: user root", async () => {
    const r = await sandbox.commands.run("id -u; pwd", { user: "root" });
    assert.equal(r.stdout, "0\n/root\n");
  });

  await check("run: unknown user → AuthenticationError-ish failure", async () => {
    await assert.rejects(sandbox.commands.run("true", { user: "no-such-user" as "root" }), /invalid username/);
  });

  await check("run: cwd absolute and relative to home", async () => {
    assert.equal((await sandbox.commands.run("pwd", { cwd: "/tmp" })).stdout, "/tmp\n");
    await sandbox.commands.run("mkdir -p sub");
    assert.equal((await sandbox.commands.run("pwd", { cwd: "sub" })).stdout, `${devHome}/sub\n`);
  });

  await check("run: missing cwd → invalid argument", async () => {
    await assert.rejects(sandbox.commands.run("pwd", { cwd: "/does/not/exist" }), /cwd '\/does\/not\/exist' does not exist/);
  });

  await check("run: timeoutMs kills the command", async () => {
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

  await check("run: large output (8 MB) arrives complete", async () => {
    const r = await sandbox.commands.run("head -c 6000000 /dev/zero | base64 -w 0");
    assert.equal(r.stdout.length, 8000000);
  });

  await check("run: output is streamed as produced, not buffered to the end", async () => {
    const seen: number[] = [];
    const started = Date.now();
    await sandbox.commands.run("echo first; sleep 1.5; echo second", { onStdout: () => void seen.push(Date.now() - started) });
    assert.equal(seen.length, 2);
    assert.ok(seen[0]! < 1000 && seen[1]! >= 1400, JSON.stringify(seen));
  });

  await check("background + list + connect + kill", async () => {
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

  await check("kill of an unknown pid → false", async () => {
    assert.equal(await sandbox.commands.kill(999_999), false);
  });

  await check("connect to an unknown pid → error", async () => {
    await assert.rejects(sandbox.commands.connect(999_999));
  });

  await check("late connect after exit still gets the end", async () => {
    const handle = await sandbox.commands.run("echo done; exit 4", { background: true });
    await assert.rejects(handle.wait());
    const late = await sandbox.commands.connect(handle.pid);
    await assert.rejects(late.wait(), (e: unknown) => e instanceof CommandExitError && e.exitCode === 4);
  });

  await check("sendStdin + closeStdin", async () => {
    const handle = await sandbox.commands.run("cat; echo EOF", { background: true, stdin: true });
    await sandbox.commands.sendStdin(handle.pid, "abc\n");
    await handle.sendStdin("def\n");
    await sandbox.commands.closeStdin(handle.pid);
    const r = await handle.wait();
    assert.equal(r.stdout, "abc\ndef\nEOF\n");
  });

  await check("sendStdin without stdin: true → error", async () => {
    const handle = await sandbox.commands.run("sleep 5", { background: true });
    await assert.rejects(sandbox.commands.sendStdin(handle.pid, "x"), /stdin not enabled or closed/);
    await handle.kill();
  });

  await check("stdin defaults to /dev/null when not requested", async () => {
    const r = await sandbox.commands.run("cat; echo after");
    assert.equal(r.stdout, "after\n");
  });

  await check("pty: create, input, resize, kill", async () => {
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

  await check("pty: exit via input ends with the exit code", async () => {
    const terminal = await sandbox.pty.create({ cols: 80, rows: 24, onData: () => {}, user: "root" });
    await sandbox.pty.sendInput(terminal.pid, new TextEncoder().encode("exit 0\n"));
    const r = await terminal.wait();
    assert.equal(r.exitCode, 0);
  });

  await check("health, envs and token enforcement (raw HTTP)", async () => {
    assert.equal((await fetch(`${agentUrl}/health`)).status, 204);
    assert.equal(await init({ defaultUser: devUser, accessToken: "secret-token", envVars: { A: "1" } }), 204);
    try {
      const denied = await fetch(`${agentUrl}/envs`);
      assert.equal(denied.status, 401);
      assert.equal((await denied.json()).code, 401);
      const allowed = await fetch(`${agentUrl}/envs`, { headers: { "x-access-token": "secret-token" } });
      assert.deepEqual(await allowed.json(), { A: "1" });
      await assert.rejects(sandbox.commands.run("true"));
      assert.equal((await fetch(`${agentUrl}/health`)).status, 204);
      assert.equal(await init({ defaultUser: devUser }), 401, "a re-init without the current token is refused");
    } finally {
      assert.equal(await init({ defaultUser: devUser, envVars: { SANDBOX_WIDE: "from-init" } }, "secret-token"), 204);
    }
  });
}

main()
  .catch((error) => {
    failures++;
    console.log(`FAIL setup: ${error?.stack ?? error}`);
  })
  .finally(() => {
    console.log(failures === 0 ? "all checks passed" : `${failures} check(s) failed`);
    process.exit(failures);
  });
