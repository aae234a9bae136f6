// Development check and benchmark of network + container runtime together:
//   CUBICLE_TEST_ROOTFS=/var/tmp/rtdev-rootfs node --import tsx test/runtime-dev/smoke.ts [rounds] [--info] [--sysfs]
// Creates `rounds` sandboxes one after another (network allocate → runtime create → first
// GET /health answered by the agent at sandboxAddress:49983), prints phase timings and medians,
// and removes everything again.
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { createNetworkManager } from "../../src/network/index.js";
import { createContainerRuntime } from "../../src/runtime/index.js";
import { defaultRunDir } from "../../src/shared/config.js";

const rounds = Number(process.argv.find((a) => /^\d+$/.test(a)) ?? 10);
const showInfo = process.argv.includes("--info");
const rootfsDir = process.env.CUBICLE_TEST_ROOTFS;
if (!rootfsDir) {
  console.error("set CUBICLE_TEST_ROOTFS to a shifted rootfs (see test/runtime-dev/prepare-rootfs.ts)");
  process.exit(2);
}
const tag = `s${process.pid.toString(36)}`;
const stateDir = path.join(os.tmpdir(), `cubicle-smoke-${tag}`);
const network = createNetworkManager({ subnet: "10.232.0.0/24" }, { tableName: `cubicle_smoke_${tag}`, netnsPrefix: `cubicle-${tag}-` });
const runtime = createContainerRuntime(
  { stateDir, distDir: path.join(import.meta.dirname, "..", "..", "dist"), runcPath: "runc", runDir: defaultRunDir(stateDir) },
  { agentScript: path.join(import.meta.dirname, "health-agent.cjs"), sysfs: process.argv.includes("--sysfs") ? "sysfs" : "empty" },
);

function get(host: string, urlPath: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host, port: 49983, path: urlPath, timeout: 1000, agent: false }, (res) => {
      let body = "";
      res.on("data", (d) => (body += d));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on("error", reject);
    req.on("timeout", () => req.destroy(new Error("timeout")));
  });
}

async function waitForHealth(host: string, deadlineMs: number): Promise<number> {
  let attempts = 0;
  for (;;) {
    attempts++;
    try {
      const res = await get(host, "/health");
      if (res.status === 204) return attempts;
    } catch (err) {
      if (Date.now() > deadlineMs) throw err;
    }
    await new Promise((r) => setTimeout(r, 2));
  }
}

const median = (values: number[]) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
};

const rows: Record<string, number>[] = [];
await network.init();
await runtime.init();
try {
  for (let i = 0; i < rounds; i++) {
    const id = `${tag}x${i}`;
    const t0 = performance.now();
    const net = await network.allocate(id, { allowInternetAccess: true });
    const t1 = performance.now();
    try {
      await runtime.create({
        sandboxId: id,
        hostname: "sandbox",
        template: { templateId: "dev", rootfsDir, defaultUser: "root", defaultWorkdir: "/", env: {} },
        resources: { cpuCount: 1, memoryMiB: 512, diskMiB: 0, pidsLimit: 512 },
        network: net,
      });
      const t2 = performance.now();
      await waitForHealth(net.sandboxAddress, Date.now() + 10_000);
      const t3 = performance.now();
      rows.push({ allocateMs: t1 - t0, createMs: t2 - t1, ...runtime.lastCreateTimings, agentMs: t3 - t2, totalMs: t3 - t0 });
      if (showInfo && i === 0) {
        console.log(JSON.parse((await get(net.sandboxAddress, "/info")).body));
        console.log(await runtime.stats(id));
        console.log("state", await runtime.state(id), "list", await runtime.list());
      }
    } finally {
      const d0 = performance.now();
      await runtime.destroy(id);
      await network.release(id);
      const row = rows[i];
      if (row) row.destroyMs = performance.now() - d0;
    }
  }
} finally {
  const { runCommand } = await import("../../src/shared/exec.js");
  await runCommand(["nft", "delete", "table", "inet", `cubicle_smoke_${tag}`], { allowFailure: true });
  const { rm } = await import("node:fs/promises");
  await rm(stateDir, { recursive: true, force: true });
}
const keys = Object.keys(rows[0] ?? {});
for (const row of rows) console.log(keys.map((k) => `${k}=${(row[k] ?? 0).toFixed(1)}`).join(" "));
console.log("median", keys.map((k) => `${k}=${median(rows.map((r) => r[k] ?? 0)).toFixed(1)}`).join(" "));
