/**
 * Crash recovery: the server is SIGKILLed with sandboxes running; on restart it adopts the
 * ones still alive, reports vanished ones dead, and leaves nothing behind after kills.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import { after, before, test } from "node:test";
import { Sandbox, SandboxNotFoundError } from "e2b";
import { e2eRuntime, guestQemuPids, hostLeftovers, startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;

before(async () => {
  server = await startTestServer();
  useServerForSdk(server);
});

after(async () => {
  await server?.stop();
});

function netnsList(): string[] {
  return execFileSync("ip", ["netns", "list"], { encoding: "utf8" })
    .split("\n")
    .map((line) => line.split(" ")[0]!)
    .filter(Boolean);
}

function nftRuleset(): string {
  try {
    return execFileSync("nft", ["list", "table", "inet", server.env.CUBICLE_NFT_TABLE!], { encoding: "utf8" });
  } catch {
    return "";
  }
}

/** Ends a sandbox's processes without the server: its container's, or its microVM's QEMU. */
async function killBehindTheServersBack(sandboxId: string): Promise<void> {
  if (e2eRuntime === "microvm") {
    const pids = guestQemuPids(server, sandboxId);
    assert.ok(pids.length > 0, "the victim's QEMU runs");
    for (const pid of pids) process.kill(pid, "SIGKILL");
    for (let i = 0; i < 100 && guestQemuPids(server, sandboxId).length > 0; i++) await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(guestQemuPids(server, sandboxId), [], "the victim's QEMU is gone");
    return;
  }
  execFileSync("runc", ["kill", `cubicle-${sandboxId}`, "KILL"], { stdio: "ignore" });
  for (let i = 0; i < 50; i++) {
    const state = execFileSync("runc", ["state", `cubicle-${sandboxId}`], { encoding: "utf8" });
    if (JSON.parse(state).status === "stopped") break;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Where the runtime under test keeps a sandbox's run files. */
const sandboxRunDir = (sandboxId: string) => (e2eRuntime === "microvm" ? `${server.runDir}/microvm/${sandboxId}` : `${server.runDir}/pool/sandboxes/${sandboxId}`);

test("after a SIGKILL of the server, running sandboxes are adopted and vanished ones are dead", async () => {
  const survivor = await Sandbox.create({ metadata: { role: "survivor" } });
  const victim = await Sandbox.create({ metadata: { role: "victim" } });
  await survivor.files.write("/home/user/note.txt", "still here");
  await survivor.commands.run("sleep 600", { background: true });
  const survivorInfo = await server.api("GET", `/sandboxes/${survivor.sandboxId}`);
  const victimInfo = await server.api("GET", `/sandboxes/${victim.sandboxId}`);
  assert.equal(survivorInfo.status, 200);

  assert.ok(fs.existsSync(sandboxRunDir(survivor.sandboxId)), "the runtime keeps the sandbox's files where this test looks");
  const serverPid = server.pid();
  await server.crashAndRestart().catch(async (err) => {
    throw err;
  });
  assert.notEqual(server.pid(), serverPid);
  // The restart happened; simulate a sandbox that vanished while the server was down by
  // crashing again with the victim's container removed behind the server's back.
  const crashedPid = server.pid();
  process.kill(crashedPid, "SIGKILL");
  await new Promise((r) => setTimeout(r, 300));
  await killBehindTheServersBack(victim.sandboxId);
  await server.crashAndRestart();

  // The survivor works as before: same files, processes, token.
  const adopted = await Sandbox.connect(survivor.sandboxId);
  assert.equal((await adopted.files.read("/home/user/note.txt")), "still here");
  const ps = await adopted.commands.run("pgrep -x sleep | wc -l");
  assert.equal(ps.stdout.trim(), "1");
  const after = await server.api("GET", `/sandboxes/${survivor.sandboxId}`);
  assert.equal(after.json.envdAccessToken, survivorInfo.json.envdAccessToken);
  assert.deepEqual(after.json.metadata, { role: "survivor" });

  // The victim is reported dead and its leftovers are gone.
  await assert.rejects(Sandbox.getInfo(victim.sandboxId), SandboxNotFoundError);
  const listed = await Sandbox.list({ query: { metadata: { role: "victim" } } }).nextItems();
  assert.equal(listed.length, 0);
  assert.ok(!netnsList().includes(`cubicle-${victim.sandboxId}`), "victim netns removed");
  assert.ok(!nftRuleset().includes(victimInfo.json.sandboxID ?? "never"), "victim rules removed");

  assert.equal(await adopted.kill(), true);

  const leftovers = hostLeftovers(server.stateDir);
  assert.deepEqual(leftovers.containers, []);
  assert.deepEqual(leftovers.mounts, []);
  assert.ok(!netnsList().some((n) => n === `cubicle-${survivor.sandboxId}` || n === `cubicle-${victim.sandboxId}`));
  assert.ok(!fs.existsSync(sandboxRunDir(survivor.sandboxId)), "sandbox dir removed");
  assert.deepEqual([...guestQemuPids(server, survivor.sandboxId), ...guestQemuPids(server, victim.sandboxId)], [], "no QEMU left");
});
