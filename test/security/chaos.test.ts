/**
 * Chaos: the server is killed (SIGKILL) in the middle of 200 concurrent creates, snapshots and
 * pauses, and started again on the same state. Every sandbox the API acknowledged is then
 * running and answers, or is truthfully reported gone; every acknowledged snapshot is listed and
 * restores; nothing is leaked on the host (containers, network namespaces, veths, mounts,
 * cgroups, nftables elements, layers, images), and no half-written image is listed. Then a
 * simulated host reboot (containers, namespaces, mounts and the nftables table gone, the state
 * directory kept) brings paused sandboxes back. CUBICLE_CHAOS_RUNS repeats the crash (default 1).
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { simulateHostReboot, startTestServer, type TestServer } from "../e2e/harness.js";

const RUNS = Number(process.env.CUBICLE_CHAOS_RUNS ?? 1);
const OPERATIONS = 200;

let server: TestServer;

before(async () => {
  // Paused sandboxes write their image after 200 ms, so the crash catches some of those too.
  server = await startTestServer({ extraEnv: { CUBICLE_PAUSE_IMAGE_AFTER_MS: "200", CUBICLE_WARM_SNAPSHOT: "none" } });
});

after(async () => {
  await server?.stop();
});

const pool = () => path.join(server.runDir, "pool");

function list(dir: string): string[] {
  return fs.existsSync(dir) ? fs.readdirSync(dir).sort() : [];
}

/** An envd command through the router, the way the SDK runs one, as a liveness check. */
async function answers(sandboxId: string, token: string | undefined): Promise<boolean> {
  const res = await fetch(server.url + "/health", {
    headers: { "e2b-sandbox-id": sandboxId, "e2b-sandbox-port": "49983", ...(token ? { "x-access-token": token } : {}) },
    signal: AbortSignal.timeout(10_000),
  }).catch(() => undefined);
  return res?.status === 204 || res?.status === 200;
}

interface Acknowledged {
  creates: Map<string, string | undefined>;
  snapshots: string[];
  pauses: string[];
}

/** Fires the operations and kills the server while they are under way. */
async function operationsCutByACrash(sources: { sandboxID: string }[]): Promise<{ acknowledged: Acknowledged; touched: string[] }> {
  const acknowledged: Acknowledged = { creates: new Map(), snapshots: [], pauses: [] };
  let answered = 0;
  const operations: Promise<void>[] = [];
  for (let i = 0; i < OPERATIONS; i++) {
    const source = sources[i % sources.length]!;
    const kind = i % 8 === 3 ? "snapshot" : i % 8 === 7 ? "pause" : "create";
    const call =
      kind === "create"
        ? server.api("POST", "/v2/sandboxes", { templateID: "base", timeout: 600, metadata: { chaos: "1" } }).then((res) => {
            if (res.status === 201) acknowledged.creates.set(res.json.sandboxID, res.json.envdAccessToken);
          })
        : kind === "snapshot"
          ? server.api("POST", `/sandboxes/${source.sandboxID}/snapshots`, {}).then((res) => {
              if (res.status === 201) acknowledged.snapshots.push(res.json.snapshotID);
            })
          : server.api("POST", `/sandboxes/${source.sandboxID}/pause`, { memory: i % 16 === 7 }).then((res) => {
              if (res.status === 204) acknowledged.pauses.push(source.sandboxID);
            });
    operations.push(call.catch(() => undefined).finally(() => answered++));
  }
  // Crash once 30 creates were acknowledged (or after 30 s): a hundred more are then waiting
  // or mid-start, snapshots and pauses mid-dump.
  const deadline = Date.now() + 30_000;
  while (acknowledged.creates.size < 30 && answered < OPERATIONS && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  let touched: string[] = [];
  await server.crashAndRestart(() => {
    touched = [...new Set([...list(path.join(pool(), "sandboxes")), ...list(path.join(pool(), "layers"))])];
  });
  await Promise.allSettled(operations);
  return { acknowledged, touched };
}

async function liveSandboxes(): Promise<{ sandboxID: string; state: string }[]> {
  const res = await server.api("GET", "/v2/sandboxes?state=running,paused&limit=100");
  assert.equal(res.status, 200);
  let page = res.json as { sandboxID: string; state: string }[];
  let next = res.headers.get("x-next-token");
  while (next) {
    const more = await server.api("GET", `/v2/sandboxes?state=running,paused&limit=100&nextToken=${encodeURIComponent(next)}`);
    page = page.concat(more.json);
    next = more.headers.get("x-next-token");
  }
  return page;
}

/** Nothing of a sandbox that is not live is left on the host. */
function assertNothingLeaked(live: Set<string>, touched: string[]): void {
  const containers = (JSON.parse(execFileSync("runc", ["list", "--format", "json"], { encoding: "utf8" }) || "null") ?? []) as { id: string; bundle: string }[];
  const ours = containers.filter((c) => c.bundle.startsWith(pool() + "/")).map((c) => c.id.replace(/^cubicle-/, ""));
  assert.deepEqual(ours.filter((id) => !live.has(id)), [], "containers of dead sandboxes");
  for (const dir of ["sandboxes", "layers"]) assert.deepEqual(list(path.join(pool(), dir)).filter((id) => !live.has(id)), [], `${dir} of dead sandboxes`);
  const mounts = fs.readFileSync("/proc/mounts", "utf8").split("\n").map((line) => line.split(" ")[1] ?? "");
  const sandboxMounts = mounts.filter((m) => m.startsWith(path.join(pool(), "sandboxes") + "/")).map((m) => m.split("/").at(-2)!);
  assert.deepEqual(sandboxMounts.filter((id) => !live.has(id)), [], "mounts of dead sandboxes");
  const namespaces = execFileSync("ip", ["netns", "list"], { encoding: "utf8" }).split("\n").map((line) => line.split(" ")[0]!.replace(/^cubicle-/, ""));
  assert.deepEqual(touched.filter((id) => !live.has(id) && namespaces.includes(id)), [], "network namespaces of dead sandboxes");
  for (const id of touched.filter((candidate) => !live.has(candidate))) {
    for (const controller of ["memory", "pids", "cpu", "freezer"]) {
      const dir = `/sys/fs/cgroup/${controller}/cubicle/${id}`;
      assert.ok(!fs.existsSync(dir), `cgroup ${dir} of a dead sandbox`);
    }
  }
  // Host ends of veth pairs carry the address .1 of a sandbox's /30 in this server's subnet.
  const subnet = server.env.CUBICLE_SUBNET!.split(".").slice(0, 2).join(".") + ".";
  const links = JSON.parse(execFileSync("ip", ["-j", "-4", "addr", "show"], { encoding: "utf8" })) as { ifname: string; addr_info: { local: string }[] }[];
  const veths = links.filter((link) => link.addr_info.some((a) => a.local.startsWith(subnet)));
  const running = [...live].length;
  assert.ok(veths.length <= running, `${veths.length} host veths for ${running} live sandboxes`);
  // Each sandbox with a network has one element in the policy map (and a chain of its own).
  const map = execFileSync("nft", ["-j", "list", "map", "inet", server.env.CUBICLE_NFT_TABLE!, "sandbox_policy"], { encoding: "utf8" });
  const elements = (JSON.parse(map).nftables.find((item: { map?: { elem?: unknown[] } }) => item.map)?.map?.elem ?? []) as unknown[];
  assert.ok(elements.length <= running, `${elements.length} policy map elements for ${running} live sandboxes`);
}

for (let run = 1; run <= RUNS; run++) {
  test(`SIGKILL during ${OPERATIONS} concurrent creates, snapshots and pauses loses nothing acknowledged and leaks nothing (run ${run} of ${RUNS})`, { timeout: 600_000 }, async () => {
    const sources: { sandboxID: string; envdAccessToken?: string }[] = [];
    for (let i = 0; i < 6; i++) {
      const res = await server.api("POST", "/v2/sandboxes", { templateID: "base", timeout: 600, metadata: { chaos: "source" } });
      assert.equal(res.status, 201, JSON.stringify(res.json));
      sources.push(res.json);
    }
    const { acknowledged, touched } = await operationsCutByACrash(sources);
    console.log(`chaos run ${run}: acknowledged ${acknowledged.creates.size} creates, ${acknowledged.snapshots.length} snapshots, ${acknowledged.pauses.length} pauses before the crash; ${touched.length} sandboxes had reached the host`);

    const live = await liveSandboxes();
    const byId = new Map(live.map((s) => [s.sandboxID, s.state]));
    // Every acknowledged create is running and answers, or is reported gone (then nothing of it is left).
    let lost = 0;
    for (const [sandboxId, token] of acknowledged.creates) {
      const info = await server.api("GET", `/sandboxes/${sandboxId}`);
      if (info.status === 404) {
        assert.ok(!byId.has(sandboxId), `${sandboxId} is listed but not found`);
        lost++;
        continue;
      }
      assert.equal(info.status, 200);
      if (info.json.state === "running") assert.ok(await answers(sandboxId, token), `acknowledged sandbox ${sandboxId} is reported running but does not answer`);
    }
    assert.equal(lost, 0, `${lost} acknowledged sandboxes were lost`);
    // Acknowledged pauses stay paused (and resume); the source sandboxes are all there.
    for (const sandboxId of new Set(acknowledged.pauses)) assert.equal(byId.get(sandboxId), "paused", `acknowledged pause of ${sandboxId}`);
    for (const source of sources) assert.ok(byId.has(source.sandboxID), `source ${source.sandboxID} survived`);
    // Every listed snapshot is whole: acknowledged ones are listed, their image is complete.
    const snapshots = ((await server.api("GET", "/snapshots?limit=100")).json as { snapshotID: string }[]).map((s) => s.snapshotID);
    for (const snapshotId of acknowledged.snapshots) assert.ok(snapshots.includes(snapshotId), `acknowledged snapshot ${snapshotId} is listed`);
    const images = list(path.join(pool(), "images", "snapshots"));
    assert.deepEqual(images, [...snapshots].sort(), "the images on disk are exactly the listed snapshots (no partial image)");
    for (const snapshotId of snapshots) assert.ok(fs.existsSync(path.join(pool(), "images", "snapshots", snapshotId, "meta.json")), `${snapshotId} is complete`);
    if (snapshots.length > 0) {
      const restored = await server.api("POST", "/v2/sandboxes", { templateID: snapshots[0], timeout: 60 });
      assert.equal(restored.status, 201, JSON.stringify(restored.json));
      assert.ok(await answers(restored.json.sandboxID, restored.json.envdAccessToken), "a sandbox restored from a snapshot taken during the chaos answers");
      await server.api("DELETE", `/sandboxes/${restored.json.sandboxID}`);
    }
    const paused = live.filter((s) => s.state === "paused").slice(0, 3);
    for (const sandbox of paused) {
      const resumed = await server.api("POST", `/sandboxes/${sandbox.sandboxID}/connect`, { timeout: 60 });
      assert.ok(resumed.status === 200 || resumed.status === 201, `resume of ${sandbox.sandboxID}: ${JSON.stringify(resumed.json)}`);
    }

    assertNothingLeaked(new Set((await liveSandboxes()).map((s) => s.sandboxID)), touched);

    // Clean up for the next run: kill everything, delete the snapshots; nothing may be left then.
    for (const sandbox of await liveSandboxes()) await server.api("DELETE", `/sandboxes/${sandbox.sandboxID}`);
    for (const snapshotId of snapshots) await server.api("DELETE", `/templates/${snapshotId}`);
    assertNothingLeaked(new Set(), touched);
    assert.deepEqual(list(path.join(pool(), "images", "snapshots")), []);
  });
}

test("a simulated host reboot brings paused sandboxes back, hot and durable, with their memory", { timeout: 300_000 }, async () => {
  const sandboxes: { sandboxID: string; envdAccessToken: string }[] = [];
  for (let i = 0; i < 3; i++) {
    const res = await server.api("POST", "/v2/sandboxes", { templateID: "base", timeout: 600 });
    assert.equal(res.status, 201);
    sandboxes.push(res.json);
  }
  // Memory to find again: a file in /dev/shm (tmpfs, saved with the processes' memory).
  for (const [index, sandbox] of sandboxes.entries()) {
    const ran = await fetch(server.url + "/files?path=/dev/shm/mark&username=root", {
      method: "POST",
      headers: { "e2b-sandbox-id": sandbox.sandboxID, "e2b-sandbox-port": "49983", "x-access-token": sandbox.envdAccessToken, "content-type": "application/octet-stream" },
      body: `mark-${index}`,
    });
    assert.equal(ran.status, 200, await ran.text());
  }
  assert.equal((await server.api("POST", `/sandboxes/${sandboxes[0]!.sandboxID}/pause`, {})).status, 204);
  assert.equal((await server.api("POST", `/sandboxes/${sandboxes[1]!.sandboxID}/pause`, {})).status, 204);
  assert.equal((await server.api("POST", `/sandboxes/${sandboxes[2]!.sandboxID}/pause`, { memory: false })).status, 204);
  // The hot pauses' images are written shortly after (CUBICLE_PAUSE_IMAGE_AFTER_MS).
  const images = () => list(path.join(pool(), "images", "paused")).filter((name) => !name.includes(".partial-"));
  for (let i = 0; i < 100 && images().length < 3; i++) await new Promise((r) => setTimeout(r, 100));
  assert.equal(images().length, 3, `pause images: ${images().join(", ")}`);

  await server.crashAndRestart(() => simulateHostReboot(server, sandboxes.map((s) => s.sandboxID)));

  for (const [index, sandbox] of sandboxes.entries()) {
    const info = await server.api("GET", `/sandboxes/${sandbox.sandboxID}`);
    assert.equal(info.json.state, "paused", `${sandbox.sandboxID} after the reboot: ${JSON.stringify(info.json)}\n${server.log().slice(-4000)}`);
    const resumed = await server.api("POST", `/sandboxes/${sandbox.sandboxID}/connect`, { timeout: 60 });
    assert.equal(resumed.status, 201, JSON.stringify(resumed.json));
    const read = await fetch(server.url + "/files?path=/dev/shm/mark&username=root", {
      headers: { "e2b-sandbox-id": sandbox.sandboxID, "e2b-sandbox-port": "49983", "x-access-token": sandbox.envdAccessToken },
    });
    if (index < 2) {
      assert.equal(await read.text(), `mark-${index}`, "memory came back with the hot pause");
    } else {
      assert.equal(read.status, 404, "a pause without memory reboots the processes: /dev/shm is empty");
    }
    await server.api("DELETE", `/sandboxes/${sandbox.sandboxID}`);
  }
});
