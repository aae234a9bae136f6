/**
 * CUBICLE_KSM=on (AGENT_MEMORY_MERGE_NOTE) against a real server and real sandboxes: the agent
 * runs with samepage merging on and a fixed address layout, and the sandbox's commands (root's
 * and the default user's) run with neither, so no user memory is merged across sandboxes. The
 * host's ksmd `run` setting is put back as found.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { after, before, test } from "node:test";
import { Sandbox } from "e2b";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

const KSM_RUN = "/sys/kernel/mm/ksm/run";
let server: TestServer;
let sandbox: Sandbox;
let ksmRunBefore: string | undefined;

before(async () => {
  ksmRunBefore = readFileSafely(KSM_RUN).trim() || undefined;
  server = await startTestServer({ extraEnv: { CUBICLE_KSM: "on" } });
  useServerForSdk(server);
  sandbox = await Sandbox.create();
});

after(async () => {
  await sandbox?.kill().catch(() => undefined);
  await server?.stop();
  if (ksmRunBefore !== undefined) writeFileSync(KSM_RUN, ksmRunBefore);
});

function readFileSafely(file: string): string {
  try {
    return readFileSync(file, "utf8");
  } catch {
    return "";
  }
}

/** The host pid of the process whose argv[0] is `marker`. */
async function hostPidOf(marker: string): Promise<number> {
  for (let i = 0; i < 200; i++) {
    for (const entry of readdirSync("/proc").filter((name) => /^\d+$/.test(name))) {
      if (readFileSafely(`/proc/${entry}/cmdline`).startsWith(`${marker}\0`)) return Number(entry);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`no process ${marker} on the host`);
}

const mergesAll = (pid: number | string) => /^ksm_merge_any:\s*yes$/m.exec(readFileSafely(`/proc/${pid}/ksm_stat`)) !== null;
/** ADDR_NO_RANDOMIZE (0x0040000) in the task's personality. */
const fixedLayout = (pid: number | string) => (Number.parseInt(readFileSafely(`/proc/${pid}/personality`).trim() || "0", 16) & 0x0040000) !== 0;

test("the host's ksmd runs, and the agent merges its memory with a fixed layout", async () => {
  assert.equal(readFileSafely(KSM_RUN).trim(), "1");
  const handle = await sandbox.commands.run(`exec -a t15-ksm-agent-${process.pid} sleep 30`, { background: true, user: "root" });
  try {
    const commandPid = await hostPidOf(`t15-ksm-agent-${process.pid}`);
    const agentPid = /^PPid:\s+(\d+)$/m.exec(readFileSafely(`/proc/${commandPid}/status`))?.[1];
    assert.match(readFileSafely(`/proc/${agentPid}/cmdline`), /\/\.cubicle\/agent\.js/);
    assert.ok(mergesAll(agentPid!), "the agent's memory is merged (ksm_merge_any)");
    assert.ok(fixedLayout(agentPid!), "the agent runs without address randomisation");
  } finally {
    await handle.kill();
  }
});

for (const user of ["root", "user"] as const) {
  test(`commands of ${user} neither merge nor lose address randomisation`, async () => {
    const marker = `t15-ksm-${user}-${process.pid}`;
    const handle = await sandbox.commands.run(`exec -a ${marker} sleep 30`, { background: true, user });
    try {
      const pid = await hostPidOf(marker);
      assert.equal(mergesAll(pid), false, "a user command's memory is not merged across sandboxes");
      assert.equal(fixedLayout(pid), false, "a user command has address randomisation");
    } finally {
      await handle.kill();
    }
    // And as the command sees itself.
    const seen = await sandbox.commands.run("grep ksm_merge_any /proc/self/ksm_stat; cat /proc/self/personality", { user });
    assert.match(seen.stdout, /ksm_merge_any: no/);
    assert.match(seen.stdout, /^0+$/m);
  });
}
