/**
 * Warm pools: creates claim frozen sandboxes made ahead. A claimed sandbox must be
 * indistinguishable from a fresh one (own hostname, env, token, nothing left over), concurrent
 * claims get distinct sandboxes, the pool refills, and a restart leaves nothing behind.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import { after, before, test } from "node:test";
import { Sandbox } from "e2b";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;
const POOL_SIZE = 2;

before(async () => {
  // A v1 create without `secure` is insecure only where the server allows it (the claim test relies on it).
  server = await startTestServer({ extraEnv: { CUBICLE_POOL_SIZE: `base=${POOL_SIZE}`, CUBICLE_REQUIRE_SECURE: "false" } });
  useServerForSdk(server);
});

after(async () => {
  await server?.stop();
});

async function poolReady(): Promise<number> {
  const res = await server.api("GET", "/pools");
  return res.json?.base?.ready ?? 0;
}

async function waitForPool(count: number, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if ((await poolReady()) >= count) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`the pool did not reach ${count}: ${JSON.stringify((await server.api("GET", "/pools")).json)}\n${server.log().slice(-3000)}`);
}

/** Containers of this server on the host (runc list, bundles under its state dir). */
function containers(): string[] {
  const list = (JSON.parse(execFileSync("runc", ["list", "--format", "json"], { encoding: "utf8" })) ?? []) as { id: string; status: string; bundle: string }[];
  return list.filter((c) => c.bundle.startsWith(server.runDir + "/")).map((c) => `${c.id}:${c.status}`);
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

/** What a fresh sandbox looks like from the inside: its name, env, and only the agent running. */
async function assertFresh(sandbox: Sandbox, marker: string): Promise<void> {
  const run = await sandbox.commands.run("hostname; echo $MARKER; ls -A /home/user /tmp | tr '\\n' ' '; echo; ps -eo comm= | sort | tr '\\n' ' '", { envs: {} });
  const [hostname, env, files, processes] = run.stdout.split("\n");
  assert.equal(hostname, sandbox.sandboxId, "the sandbox's own id as hostname");
  assert.equal(env, marker);
  assert.doesNotMatch(files ?? "", /claimed-by/, "no files of another sandbox");
  // tini (comm "init"), the agent (node, run through its loader: comm "ld-linux-x86-64"), and
  // this command's shell, ps, sort and tr.
  const others = (processes ?? "").split(" ").filter((p) => p && !["init", "tini", "node", "ld-linux-x86-64", "bash", "sh", "ps", "sort", "tr"].includes(p));
  assert.deepEqual(others, [], `only the agent runs: ${processes}`);
}

test("a create claims a frozen pool sandbox that is indistinguishable from a fresh one", async () => {
  await waitForPool(POOL_SIZE);
  const claimMs: number[] = [];
  for (let i = 0; i < 3; i++) {
    await waitForPool(POOL_SIZE);
    const started = performance.now();
    const sandbox = await Sandbox.create({ envs: { MARKER: `m${i}` } });
    const run = await sandbox.commands.run("true");
    claimMs.push(performance.now() - started);
    assert.equal(run.exitCode, 0);
    // The entry was made under the id its sandbox takes, and runc sees the direct thaw.
    assert.ok(containers().includes(`cubicle-${sandbox.sandboxId}:running`), `the claimed container runs under the sandbox's id: ${containers().join(", ")}`);
    await assertFresh(sandbox, `m${i}`);
    await sandbox.files.write("/home/user/claimed-by", sandbox.sandboxId);
    const token = (await server.api("GET", `/sandboxes/${sandbox.sandboxId}`)).json.envdAccessToken;
    assert.ok(token && token.length >= 16);
    const denied = await fetch(server.url + "/filesystem.Filesystem/Stat", {
      method: "POST",
      headers: { "e2b-sandbox-id": sandbox.sandboxId, "e2b-sandbox-port": "49983", "content-type": "application/json" },
      body: JSON.stringify({ path: "/" }),
    });
    assert.equal(denied.status, 401, "a claimed sandbox demands its token");
    await sandbox.kill();
  }
  console.log(`pool claim → first command: median ${median(claimMs).toFixed(1)} ms (${claimMs.map((v) => v.toFixed(0)).join(", ")})`);
});

/** Filesystem.Stat on / through the router, with or without an access token. */
async function statRoot(sandboxId: string, token?: string): Promise<number> {
  const res = await fetch(server.url + "/filesystem.Filesystem/Stat", {
    method: "POST",
    headers: { "e2b-sandbox-id": sandboxId, "e2b-sandbox-port": "49983", "content-type": "application/json", ...(token ? { "x-access-token": token } : {}) },
    body: JSON.stringify({ path: "/" }),
  });
  await res.arrayBuffer();
  return res.status;
}

test("a claim without env vars keeps the entry's own token: distinct per sandbox, demanded, and gone with a v1 insecure create", async () => {
  await waitForPool(POOL_SIZE);
  // Secure (the v2 SDK always is) and no env vars: the entry's agent was given its identity
  // and a token of its own before the freeze; the claim hands that token to its creator.
  const [a, b] = await Promise.all([Sandbox.create(), Sandbox.create()]);
  try {
    const tokens = await Promise.all([a, b].map(async (s) => (await server.api("GET", `/sandboxes/${s.sandboxId}`)).json.envdAccessToken as string));
    assert.ok(tokens.every((t) => t && t.length >= 16));
    assert.notEqual(tokens[0], tokens[1], "each claimed sandbox has a token of its own");
    assert.equal(await statRoot(a.sandboxId), 401, "the token is demanded");
    assert.equal(await statRoot(a.sandboxId, tokens[1]), 401, "another sandbox's token does not open it");
    assert.equal(await statRoot(a.sandboxId, tokens[0]), 200);
    const run = await a.commands.run("whoami; pwd; hostname");
    assert.equal(run.stdout, `user\n/home/user\n${a.sandboxId}\n`, "the template's default user and workdir, its own hostname");
  } finally {
    await Promise.all([a.kill(), b.kill()]);
  }
  // A v1 create without `secure` gets no token: the claim re-initialises the agent, which then
  // must not ask for the entry's token any more.
  await waitForPool(POOL_SIZE);
  const created = await server.api("POST", "/sandboxes", { templateID: "base", timeout: 60 });
  assert.equal(created.status, 201, JSON.stringify(created.json));
  try {
    assert.equal(created.json.envdAccessToken ?? null, null);
    assert.equal(await statRoot(created.json.sandboxID), 200, "an insecure sandbox needs no token");
  } finally {
    await server.api("DELETE", `/sandboxes/${created.json.sandboxID}`);
  }
});

test("10 concurrent creates get distinct, clean sandboxes and the pool refills", async () => {
  await waitForPool(POOL_SIZE);
  const sandboxes = await Promise.all(Array.from({ length: 10 }, (_, i) => Sandbox.create({ envs: { MARKER: `c${i}` }, metadata: { i: String(i) } })));
  try {
    assert.equal(new Set(sandboxes.map((s) => s.sandboxId)).size, 10);
    await Promise.all(sandboxes.map((s, i) => assertFresh(s, `c${i}`)));
    await Promise.all(sandboxes.map((s) => s.files.write("/home/user/claimed-by", s.sandboxId)));
    for (const s of sandboxes) assert.equal(await s.files.read("/home/user/claimed-by"), s.sandboxId);
    const listed = await Sandbox.list().nextItems();
    assert.equal(listed.length, 10, "pool entries are not listed");
    await waitForPool(POOL_SIZE);
  } finally {
    await Promise.all(sandboxes.map((s) => s.kill()));
  }
  assert.equal(containers().length, POOL_SIZE, `only the pool's containers are left: ${containers().join(", ")}`);
});

test("after a crash the old pool entries are discarded, the pool is made again, and claimed sandboxes are adopted", async () => {
  await waitForPool(POOL_SIZE);
  const claimed = await Sandbox.create({ envs: { MARKER: "survivor" } });
  await waitForPool(POOL_SIZE);
  await server.crashAndRestart();
  await waitForPool(POOL_SIZE);
  const left = containers();
  assert.equal(left.length, POOL_SIZE + 1, `one claimed sandbox and a fresh pool, nothing else: ${left.join(", ")} ${JSON.stringify((await server.api("GET", "/pools")).json)}`);
  const adopted = await Sandbox.connect(claimed.sandboxId);
  assert.equal((await adopted.commands.run("echo $MARKER")).stdout, "survivor\n");
  // A pooled sandbox pauses and resumes under its runtime id like any other.
  await adopted.pause();
  const resumed = await Sandbox.connect(claimed.sandboxId);
  assert.equal((await resumed.commands.run("echo back")).stdout, "back\n");
  await adopted.kill();
});

test("a claimed sandbox reports its own id as hostname", async () => {
  await waitForPool(POOL_SIZE);
  const sandbox = await Sandbox.create();
  try {
    assert.equal((await sandbox.commands.run("hostname")).stdout.trim(), sandbox.sandboxId);
  } finally {
    await sandbox.kill();
  }
});

/** The cpu cgroup directory of a sandbox and its weight file (v1 cpu.shares, v2 cpu.weight). */
function cpuCgroup(sandboxId: string): { dir: string; weightFile: string; threadsFile: string; low: string; normal: string } {
  const v2 = fs.existsSync("/sys/fs/cgroup/cgroup.controllers");
  return v2
    ? { dir: `/sys/fs/cgroup/cubicle/${sandboxId}`, weightFile: "cpu.weight", threadsFile: "cgroup.threads", low: "1", normal: "100" }
    : { dir: `/sys/fs/cgroup/cpu/cubicle/${sandboxId}`, weightFile: "cpu.shares", threadsFile: "tasks", low: "2", normal: "1024" };
}

/** Nice value of each thread in a sandbox's cgroup (field 19 of /proc/TID/stat), seen from the host. */
function threadNiceValues(sandboxId: string): number[] {
  const { dir, threadsFile } = cpuCgroup(sandboxId);
  const tids = fs.readFileSync(`${dir}/${threadsFile}`, "utf8").split("\n").filter(Boolean);
  return tids.flatMap((tid) => {
    const stat = fs.readFileSync(`/proc/${tid}/stat`, "utf8");
    // Fields after the command (which is in parentheses and may hold spaces): state is field 3.
    return [Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16])];
  });
}

test("pool entries wait with the lowest CPU weight; a claimed sandbox has a normal create's and its processes nice 0", async () => {
  await waitForPool(POOL_SIZE);
  const pooled = containers().filter((c) => c.endsWith(":paused")).map((c) => c.slice("cubicle-".length, -":paused".length));
  assert.equal(pooled.length, POOL_SIZE, containers().join(" "));
  for (const id of pooled) {
    const { dir, weightFile, low } = cpuCgroup(id);
    assert.equal(fs.readFileSync(`${dir}/${weightFile}`, "utf8").trim(), low, `pool entry ${id}'s cgroup weight`);
  }
  const sandbox = await Sandbox.create();
  try {
    assert.ok(pooled.includes(sandbox.sandboxId), "the create claimed a pool entry");
    const { dir, weightFile, normal } = cpuCgroup(sandbox.sandboxId);
    assert.equal(fs.readFileSync(`${dir}/${weightFile}`, "utf8").trim(), normal, "the claimed sandbox's cgroup weight is a normal create's");
    const run = await sandbox.commands.run("cut -d' ' -f19 /proc/self/stat; nice");
    assert.equal(run.stdout, "0\n0\n", "a command runs at nice 0");
    const nice = threadNiceValues(sandbox.sandboxId);
    assert.ok(nice.length > 0 && nice.every((value) => value === 0), `every thread of the claimed sandbox at nice 0: ${nice}`);
    // The other entry still waits at the low priority.
    const other = pooled.find((id) => id !== sandbox.sandboxId)!;
    assert.equal(fs.readFileSync(`${cpuCgroup(other).dir}/${cpuCgroup(other).weightFile}`, "utf8").trim(), cpuCgroup(other).low);
  } finally {
    await sandbox.kill();
  }
});
