/**
 * Persistent shell sessions (SESSIONS_NOTE) through the official `e2b` SDK's `commands.run`
 * with `CUBICLE_SESSION` in the envs: cwd, exports and unsets persist per session and per user,
 * across `exit`, and across pause and resume; the call's own envs win for that call; bad names
 * are refused; a command without the variable is untouched.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { CommandExitError, InvalidArgumentError, Sandbox } from "e2b";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;
let sandbox: Sandbox;

before(async () => {
  server = await startTestServer();
  useServerForSdk(server);
  sandbox = await Sandbox.create("base");
});

after(async () => {
  await sandbox?.kill().catch(() => undefined);
  await server?.stop();
});

const inSession = (name: string, envs: Record<string, string> = {}) => ({ envs: { CUBICLE_SESSION: name, ...envs } });

test("a session keeps its cwd and exports between commands; other sessions and plain commands do not see them", async () => {
  await sandbox.commands.run("mkdir -p /tmp/proj/src && cd /tmp/proj && export STAGE=build", inSession("one"));
  assert.equal((await sandbox.commands.run("pwd; echo $STAGE", inSession("one"))).stdout, "/tmp/proj\nbuild\n");
  assert.equal((await sandbox.commands.run("cd src; pwd", inSession("one"))).stdout, "/tmp/proj/src\n");
  assert.equal((await sandbox.commands.run("pwd", inSession("one"))).stdout, "/tmp/proj/src\n");
  assert.equal((await sandbox.commands.run("pwd; echo [$STAGE]", inSession("two"))).stdout, "/home/user\n[]\n");
  assert.equal((await sandbox.commands.run("pwd; echo [$STAGE]")).stdout, "/home/user\n[]\n");
  // The process list shows the command as sent, not the session's wrapper.
  const handle = await sandbox.commands.run("sleep 30", { ...inSession("one"), background: true });
  try {
    const listed = (await sandbox.commands.list()).find((proc) => proc.pid === handle.pid);
    assert.deepEqual(listed?.args, ["-l", "-c", "sleep 30"]);
  } finally {
    await handle.kill();
  }
});

test("exit and unset persist; the call's own envs win for that call", async () => {
  await sandbox.commands.run("export KEEP=1 DROP=1", inSession("three"));
  await assert.rejects(sandbox.commands.run("unset DROP; cd /; exit 4", inSession("three")), (err: unknown) => err instanceof CommandExitError && err.exitCode === 4);
  assert.equal((await sandbox.commands.run("pwd; echo [$KEEP][$DROP]", inSession("three"))).stdout, "/\n[1][]\n");
  assert.equal((await sandbox.commands.run("echo $KEEP", inSession("three", { KEEP: "call" }))).stdout, "call\n");
  assert.equal((await sandbox.commands.run("echo $KEEP", inSession("three"))).stdout, "call\n", "the session keeps what the call exported");
});

test("sessions are per user, and survive a pause and resume", async () => {
  await sandbox.commands.run("cd /root && export WHO=root", { ...inSession("four"), user: "root" });
  assert.equal((await sandbox.commands.run("pwd; echo [$WHO]", inSession("four"))).stdout, "/home/user\n[]\n");
  await sandbox.commands.run("cd /tmp && export WHO=user", inSession("four"));
  await sandbox.pause();
  const resumed = await Sandbox.connect(sandbox.sandboxId);
  assert.equal((await resumed.commands.run("pwd; echo $WHO", inSession("four"))).stdout, "/tmp\nuser\n");
  assert.equal((await resumed.commands.run("pwd; echo $WHO", { ...inSession("four"), user: "root" })).stdout, "/root\nroot\n");
});

test("a session name that is not a plain name is refused", async () => {
  for (const name of ["../x", "", "a/b", ".hidden", "x".repeat(65)]) {
    await assert.rejects(sandbox.commands.run("true", inSession(name)), (err: unknown) => err instanceof InvalidArgumentError, JSON.stringify(name));
  }
});
