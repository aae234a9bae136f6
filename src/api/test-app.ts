import { randomBytes } from "node:crypto";
import http from "node:http";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { FastifyInstance } from "fastify";
import { parseSnapshotName } from "../core/snapshot-names.js";
import type { CreateSandboxRequest } from "../core/types.js";
import type { SandboxManager } from "../core/sandbox-manager.js";
import type { SandboxStats } from "../runtime/types.js";
import { SandboxMetrics } from "../core/metrics.js";
import { EgressAuditLog } from "../network/index.js";
import { SecretVault } from "../secrets/index.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { SqliteStore } from "../store/index.js";
import type { SandboxRecord } from "../store/types.js";
import { createApiApp, type ApiOptions } from "./app.js";
import { TemplateBuilder } from "../template/builder/template-builder.js";

export const TEST_KEY = "e2b_" + "ab".repeat(20);

/** Every route of the API, with `:id` where a sandbox (or template) id goes. */
export const API_ROUTES: { method: "GET" | "POST" | "PUT" | "DELETE"; path: string }[] = [
  { method: "POST", path: "/sandboxes" },
  { method: "POST", path: "/v2/sandboxes" },
  { method: "GET", path: "/sandboxes" },
  { method: "GET", path: "/v2/sandboxes" },
  { method: "GET", path: "/sandboxes/:id" },
  { method: "DELETE", path: "/sandboxes/:id" },
  { method: "POST", path: "/sandboxes/:id/timeout" },
  { method: "POST", path: "/sandboxes/:id/refreshes" },
  { method: "POST", path: "/sandboxes/:id/connect" },
  { method: "POST", path: "/v2/sandboxes/:id/connect" },
  { method: "POST", path: "/sandboxes/:id/resume" },
  { method: "POST", path: "/sandboxes/:id/pause" },
  { method: "POST", path: "/sandboxes/:id/snapshots" },
  { method: "GET", path: "/snapshots" },
  { method: "DELETE", path: "/templates/:id" },
  { method: "POST", path: "/sandboxes/:id/fork" },
  { method: "POST", path: "/sandboxes/:id/rollback" },
  { method: "GET", path: "/pools" },
  { method: "GET", path: "/warm-snapshots" },
  { method: "GET", path: "/sandboxes/metrics" },
  { method: "GET", path: "/sandboxes/:id/metrics" },
  { method: "GET", path: "/templates" },
  { method: "GET", path: "/secrets" },
  { method: "POST", path: "/secrets" },
  { method: "GET", path: "/secrets/:id" },
  { method: "POST", path: "/secrets/:id" },
  { method: "DELETE", path: "/secrets/:id" },
  { method: "GET", path: "/sandboxes/:id/network/egress" },
  { method: "GET", path: "/metrics" },
  { method: "PUT", path: "/sandboxes/:id/network" },
  { method: "POST", path: "/v3/templates" },
  { method: "POST", path: "/v2/templates" },
  { method: "GET", path: "/templates/:id/files/:id" },
  { method: "PUT", path: "/template-files/:id" },
  { method: "POST", path: "/v2/templates/:id/builds/:id" },
  { method: "DELETE", path: "/templates/:id/builds/:id" },
  { method: "GET", path: "/templates/:id/builds" },
  { method: "GET", path: "/templates/:id/builds/:id/status" },
  { method: "GET", path: "/templates/aliases/:id" },
  { method: "GET", path: "/templates/:id/tags" },
  { method: "POST", path: "/templates/tags" },
  { method: "DELETE", path: "/templates/tags" },
];

/**
 * An in-memory stand-in for the SandboxManager, as strict as the real one about ids: unknown
 * sandboxes are not_found, a second pause a conflict. `failWith` makes every call throw that
 * (to exercise the 5xx path).
 */
export function fakeManager(options: { failWith?: () => unknown; stats?: SandboxStats } = {}) {
  const records = new Map<string, SandboxRecord>();
  // The real metrics history, over these records and a fixed sample.
  const sampleStats = options.stats ?? { cpuCount: 1, cpuUsedPct: 0, memUsedBytes: 0, memTotalBytes: 1, memCacheBytes: 0, diskUsedBytes: 0, diskTotalBytes: 1 };
  const metrics = new SandboxMetrics({
    running: () => new Map([...records.values()].filter((record) => record.state === "running").map((record) => [record.sandboxId, record.sandboxId])),
    isKnown: (id) => records.has(id),
    stats: async () => sampleStats,
  });
  let counter = 0;
  const fail = () => {
    if (options.failWith) throw options.failWith();
  };
  const get = async (id: string): Promise<SandboxRecord> => {
    fail();
    const record = records.get(id);
    if (!record) throw new CubicleError("not_found", `sandbox "${id}" not found`);
    return record;
  };
  const manager = {
    records,
    async create(request: CreateSandboxRequest): Promise<SandboxRecord> {
      fail();
      if (request.templateId !== "base") throw new CubicleError("not_found", `template or snapshot "${request.templateId}" not found`);
      const now = Date.now();
      const record: SandboxRecord = {
        sandboxId: `ifake${counter++}`,
        templateId: "base",
        alias: undefined,
        clientId: "cubicle",
        state: "running",
        startedAt: now,
        endAt: now + request.timeoutSec * 1000,
        cpuCount: request.cpuCount ?? 1,
        memoryMB: request.memoryMB ?? 512,
        diskSizeMB: request.diskSizeMB ?? 1024,
        metadata: request.metadata,
        envVars: request.envVars,
        secure: request.secure,
        envdAccessToken: request.secure ? "token" : undefined,
        trafficAccessToken: undefined,
        allowInternetAccess: request.allowInternetAccess,
        networkConfig: request.networkConfig,
        lifecycle: { autoResume: request.autoResume, onTimeout: request.autoPause ? "pause" : "kill" },
        network: undefined,
        runtime: "container",
        endReason: undefined,
      };
      records.set(record.sandboxId, record);
      return record;
    },
    get,
    async list() {
      fail();
      return [...records.values()];
    },
    async kill(id: string) {
      fail();
      return records.delete(id);
    },
    async setTimeout(id: string) {
      await get(id);
    },
    async updateNetwork(id: string, update: { allowInternetAccess: boolean; egress: Record<string, unknown> }) {
      const record = await get(id);
      record.allowInternetAccess = update.allowInternetAccess;
      record.networkConfig = { ...(record.networkConfig ?? {}), allowOut: undefined, denyOut: undefined, rules: undefined, egressProxy: undefined, ...update.egress };
    },
    async connect(id: string) {
      return { record: await get(id), resumed: false };
    },
    async resume(id: string) {
      await get(id);
      throw new CubicleError("conflict", `sandbox "${id}" is not paused`);
    },
    async pause(id: string) {
      const record = await get(id);
      if (record.state === "paused") throw new CubicleError("conflict", `sandbox "${id}" is already paused`);
      record.state = "paused";
    },
    async createSnapshot(id: string, name: unknown) {
      await get(id);
      const parsed = parseSnapshotName(name);
      return { snapshotId: "snap-" + "a".repeat(20), names: parsed ? [parsed] : [] };
    },
    async listSnapshots() {
      fail();
      return [];
    },
    async deleteSnapshot() {
      fail();
      return false;
    },
    async fork(id: string) {
      await get(id);
      return [];
    },
    async rollback(id: string, snapshotId: string) {
      await get(id);
      throw new CubicleError("not_found", `snapshot "${snapshotId}" not found`);
    },
    async metrics(id: string, range: { start?: number; end?: number } = {}) {
      const record = await get(id);
      return metrics.range(id, record.state === "running" ? id : undefined, range.start, range.end);
    },
    async latestMetrics(ids: string[]) {
      fail();
      return metrics.latest(new Map(ids.filter((id) => records.has(id)).map((id) => [id, records.get(id)!.state === "running" ? id : undefined])));
    },
    liveSandboxes: () => [...records.values()],
    poolCounts: () => ({}),
    warmSnapshotCounts: () => ({}),
  };
  return manager;
}

/**
 * The API on a fake manager, not listening (use `app.inject`); secrets in a real vault over an
 * in-memory SQLite store (closed with the app), a real egress audit log.
 */
export async function testApp(overrides: Partial<Omit<ApiOptions, "manager">> & { manager?: ReturnType<typeof fakeManager> } = {}): Promise<FastifyInstance> {
  const manager = overrides.manager ?? fakeManager();
  const secretStore = overrides.secrets ? undefined : new SqliteStore(":memory:");
  const secrets = overrides.secrets ?? (await SecretVault.open(secretStore!, randomBytes(32)));
  // A real template builder (its records in SQLite, its files in a temp dir) with no templates
  // and no sandboxes: requests are validated and stored; a build fails at its base.
  const buildDir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-test-app-builds-"));
  const buildStore = new SqliteStore(":memory:");
  const unavailable = async (): Promise<never> => {
    throw new CubicleError("unavailable", "no sandboxes in the test app");
  };
  const templateBuilder =
    overrides.templateBuilder ??
    new TemplateBuilder({
      filesDir: path.join(buildDir, "files"),
      store: buildStore,
      catalog: { resolve: async () => undefined, fingerprint: async () => "", invalidate: () => undefined, isBuiltIn: (name) => name === "base" },
      sandboxes: { start: unavailable, commit: unavailable, destroy: async () => undefined, imageExists: async () => false, removeImage: async () => undefined, warm: unavailable, removeWarm: async () => undefined, inUse: async () => false },
      uploadKey: randomBytes(32),
      maxUploadBytes: 1024 * 1024,
    });
  const app = createApiApp({
    apiKey: TEST_KEY,
    domain: "cubicle.test",
    defaultTimeoutSec: 300,
    createLimits: { maxCpuCount: 2, maxMemoryMB: 4096, maxDiskMB: 65536 },
    requireSecure: true,
    hostDirs: ["/srv/cubicle-state", "/var/lib/cubicle/templates"],
    isReady: () => true,
    listTemplates: async () => [],
    serverFactory: (handler) => http.createServer(handler),
    egressAudit: new EgressAuditLog(),
    ...overrides,
    templateBuilder,
    secrets,
    manager: manager as unknown as SandboxManager,
  });
  if (secretStore) app.addHook("onClose", async () => secretStore.close());
  app.addHook("onClose", async () => {
    await templateBuilder.close();
    await buildStore.close();
    fs.rmSync(buildDir, { recursive: true, force: true });
  });
  await app.ready();
  return app;
}

/** Collects what the server logs to stderr while `run` runs. */
export async function capturingStderr<T>(run: () => Promise<T>): Promise<{ result: T; logged: string }> {
  const original = process.stderr.write.bind(process.stderr);
  let logged = "";
  process.stderr.write = ((chunk: string | Uint8Array) => {
    logged += chunk.toString();
    return true;
  }) as typeof process.stderr.write;
  try {
    return { result: await run(), logged };
  } finally {
    process.stderr.write = original;
  }
}
