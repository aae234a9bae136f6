import { EventEmitter } from "node:events";
import type { NetworkManager } from "../network/types.js";
import type { Runtime } from "../runtime/types.js";
import type { SandboxRecord, SandboxQuery, Store } from "../store/types.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import { agentIsHealthy, initAgent, waitForAgent } from "./agent-client.js";
import { newSandboxId, newToken } from "./ids.js";
import { KeyedMutex } from "./keyed-mutex.js";
import type { CreateSandboxRequest, TemplateCatalog, TemplateInfo } from "./types.js";

const log = createLogger("core");

/** The most a sandbox may live from one timeout call: 24 h, as upstream's highest tier. */
export const MAX_TIMEOUT_SEC = 24 * 60 * 60;
const AGENT_READY_TIMEOUT_MS = 15_000;

export interface SandboxManagerOptions {
  store: Store;
  runtime: Runtime;
  network: NetworkManager;
  templates: TemplateCatalog;
  /** Processes per sandbox. */
  pidsLimit?: number;
}

/** Where the router sends traffic for a live sandbox. */
export interface RouteTarget {
  sandboxId: string;
  address: string;
}

export interface SandboxManagerEvents {
  /** A sandbox stopped serving (killed, expired, vanished): open connections must be reset. */
  ended: [sandboxId: string];
}

/**
 * The sandbox state machine: create, kill, timeouts, connect, recovery after a restart.
 * Keeps live sandboxes in memory for the router and mirrors every change into the store.
 */
export class SandboxManager extends EventEmitter<SandboxManagerEvents> {
  private readonly live = new Map<string, SandboxRecord>();
  private readonly mutex = new KeyedMutex();
  private reaperTimer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(private readonly options: SandboxManagerOptions) {
    super();
  }

  /** The router's lookup: only running sandboxes with a network get traffic. */
  routeTarget(sandboxId: string): RouteTarget | undefined {
    const record = this.live.get(sandboxId);
    if (!record || record.state !== "running" || !record.network) return undefined;
    return { sandboxId, address: record.network.sandboxAddress };
  }

  /** Access token of a live sandbox, for routing signed `/files` URLs that carry no sandbox id. */
  liveSandboxes(): SandboxRecord[] {
    return [...this.live.values()];
  }

  async create(request: CreateSandboxRequest): Promise<SandboxRecord> {
    if (this.closed) throw new CubicleError("unavailable", "the server is shutting down; try again shortly");
    const template = await this.options.templates.resolve(request.templateId);
    if (!template) {
      throw new CubicleError("not_found", `template "${request.templateId}" not found; list templates with \`./cubicle template ls\``);
    }
    const sandboxId = newSandboxId();
    const now = Date.now();
    const record: SandboxRecord = {
      sandboxId,
      templateId: template.templateId,
      alias: template.aliases.includes(request.templateId) ? request.templateId : template.aliases[0],
      clientId: "cubicle",
      state: "starting",
      startedAt: now,
      endAt: now + request.timeoutSec * 1000,
      cpuCount: request.cpuCount ?? template.cpuCount,
      memoryMB: request.memoryMB ?? template.memoryMB,
      diskSizeMB: template.diskSizeMB,
      metadata: request.metadata,
      envVars: request.envVars,
      secure: request.secure,
      envdAccessToken: request.secure ? newToken() : undefined,
      trafficAccessToken: undefined,
      allowInternetAccess: request.allowInternetAccess,
      networkConfig: request.networkConfig,
      lifecycle: { autoResume: request.autoResume, onTimeout: request.autoPause ? "pause" : "kill" },
      network: undefined,
      runtime: this.options.runtime.name,
      endReason: undefined,
    };
    await this.options.store.insertSandbox(record);
    this.live.set(sandboxId, record);
    try {
      await this.startSandbox(record, template);
    } catch (err) {
      log.warn("create failed", { sandboxId, error: String(err) });
      await this.teardown(record, "create failed");
      record.state = "dead";
      record.endReason = `create failed: ${(err as Error).message}`;
      await this.options.store.updateSandbox(sandboxId, { state: "dead", endReason: record.endReason, network: undefined });
      throw CubicleError.from(err);
    }
    record.state = "running";
    await this.options.store.updateSandbox(sandboxId, { state: "running", network: record.network });
    await this.options.store.recordEvent({ sandboxId, at: Date.now(), kind: "created", detail: { templateId: record.templateId } });
    this.scheduleReaper();
    return record;
  }

  private async startSandbox(record: SandboxRecord, template: TemplateInfo): Promise<void> {
    const network = await this.options.network.allocate(record.sandboxId, { allowInternetAccess: record.allowInternetAccess });
    record.network = network;
    await this.options.store.updateSandbox(record.sandboxId, { network });
    await this.options.runtime.create({
      sandboxId: record.sandboxId,
      hostname: record.sandboxId,
      template: template.image,
      resources: {
        cpuCount: record.cpuCount,
        memoryMiB: record.memoryMB,
        diskMiB: record.diskSizeMB,
        pidsLimit: this.options.pidsLimit ?? 4096,
      },
      network,
    });
    await waitForAgent(network.sandboxAddress, AGENT_READY_TIMEOUT_MS);
    await initAgent(network.sandboxAddress, {
      accessToken: record.envdAccessToken,
      envVars: record.envVars,
      defaultUser: template.image.defaultUser,
      defaultWorkdir: template.image.defaultWorkdir,
      hostname: record.sandboxId,
      timestamp: new Date().toISOString(),
    });
  }

  /** Removes the container and the network; never throws (cleanup must go on). */
  private async teardown(record: SandboxRecord, reason: string): Promise<void> {
    this.emit("ended", record.sandboxId);
    try {
      await this.options.runtime.destroy(record.sandboxId);
    } catch (err) {
      log.error("runtime destroy failed", { sandboxId: record.sandboxId, reason, error: String(err) });
    }
    try {
      await this.options.network.release(record.sandboxId);
    } catch (err) {
      log.error("network release failed", { sandboxId: record.sandboxId, reason, error: String(err) });
    }
  }

  /** A sandbox the API can talk about: live, or paused. Throws not_found otherwise. */
  async get(sandboxId: string): Promise<SandboxRecord> {
    const record = this.live.get(sandboxId);
    if (record && (record.state === "running" || record.state === "paused")) return record;
    throw new CubicleError("not_found", `sandbox "${sandboxId}" not found`);
  }

  async list(query: SandboxQuery): Promise<SandboxRecord[]> {
    const states = query.states?.length ? query.states : ["running", "paused"];
    // A template filter names an id or an alias; the store keeps ids.
    const templateIds = query.templateIds
      ? await Promise.all(query.templateIds.map(async (idOrAlias) => (await this.options.templates.resolve(idOrAlias))?.templateId ?? idOrAlias))
      : undefined;
    return this.options.store.querySandboxes({ ...query, templateIds, states: states.filter((s) => s === "running" || s === "paused") });
  }

  /** Kills a sandbox. Resolves false when there is no such live sandbox (E2B's kill → false). */
  async kill(sandboxId: string, reason = "killed"): Promise<boolean> {
    return this.mutex.run(sandboxId, async () => {
      const record = this.live.get(sandboxId);
      if (!record || record.state === "killed" || record.state === "dead" || record.state === "starting") return false;
      record.state = "killed";
      this.live.delete(sandboxId);
      await this.teardown(record, reason);
      await this.options.store.updateSandbox(sandboxId, { state: "killed", endReason: reason, network: undefined });
      await this.options.store.recordEvent({ sandboxId, at: Date.now(), kind: "killed", detail: { reason } });
      this.scheduleReaper();
      return true;
    });
  }

  /** E2B setTimeout: `endAt = now + timeout`; shortening is allowed. */
  async setTimeout(sandboxId: string, timeoutSec: number): Promise<void> {
    await this.mutex.run(sandboxId, async () => {
      const record = await this.get(sandboxId);
      record.endAt = Date.now() + timeoutSec * 1000;
      await this.options.store.updateSandbox(sandboxId, { endAt: record.endAt });
    });
    this.scheduleReaper();
  }

  /** E2B connect: returns a running sandbox and only ever extends its TTL. */
  async connect(sandboxId: string, timeoutSec: number): Promise<{ record: SandboxRecord; resumed: boolean }> {
    const record = await this.mutex.run(sandboxId, async () => {
      const current = await this.get(sandboxId);
      if (current.state === "paused") {
        throw new CubicleError("unimplemented", `sandbox "${sandboxId}" is paused and resuming is not available yet`);
      }
      const wanted = Date.now() + timeoutSec * 1000;
      if (wanted > current.endAt) {
        current.endAt = wanted;
        await this.options.store.updateSandbox(sandboxId, { endAt: current.endAt });
      }
      return current;
    });
    this.scheduleReaper();
    return { record, resumed: false };
  }

  /** One timer for the earliest end: no polling when nothing is due. */
  private scheduleReaper(): void {
    if (this.reaperTimer) clearTimeout(this.reaperTimer);
    this.reaperTimer = undefined;
    if (this.closed) return;
    let next = Infinity;
    for (const record of this.live.values()) {
      if (record.state === "running" && record.endAt < next) next = record.endAt;
    }
    if (next === Infinity) return;
    // setTimeout overflows past 2^31-1 ms; wake up at least that often.
    const delay = Math.min(Math.max(0, next - Date.now()), 2 ** 31 - 1);
    this.reaperTimer = setTimeout(() => void this.reap(), delay);
    this.reaperTimer.unref();
  }

  private async reap(): Promise<void> {
    const now = Date.now();
    const due = [...this.live.values()].filter((r) => r.state === "running" && r.endAt <= now);
    await Promise.all(
      due.map(async (record) => {
        log.info("sandbox reached its end of life", { sandboxId: record.sandboxId });
        // Pause-on-timeout comes with the lifecycle milestone; until then a timeout kills.
        await this.kill(record.sandboxId, "timeout").catch((err) => log.error("reaper kill failed", { error: String(err) }));
      }),
    );
    this.scheduleReaper();
  }

  /**
   * After a restart: adopt sandboxes that still run, mark vanished ones dead, and remove
   * whatever the runtime or network still holds that no live sandbox owns.
   */
  async recover(): Promise<{ adopted: string[]; dead: string[]; orphansRemoved: string[] }> {
    const adopted: string[] = [];
    const dead: string[] = [];
    const orphansRemoved: string[] = [];
    const records = await this.options.store.querySandboxes({ states: ["starting", "running", "paused"], order: "asc" });
    for (const record of records) {
      let alive = false;
      if (record.state === "running" && record.network) {
        const state = await this.options.runtime.state(record.sandboxId);
        if (state === "frozen") await this.options.runtime.thaw(record.sandboxId);
        if (state === "running" || state === "frozen") {
          await this.options.network.adopt(record.sandboxId, record.network, { allowInternetAccess: record.allowInternetAccess });
          alive = await agentIsHealthy(record.network.sandboxAddress);
        }
      }
      if (alive) {
        this.live.set(record.sandboxId, record);
        adopted.push(record.sandboxId);
        await this.options.store.recordEvent({ sandboxId: record.sandboxId, at: Date.now(), kind: "adopted" });
      } else {
        const reason = record.state === "starting" ? "server stopped during create" : "vanished while the server was down";
        await this.teardown(record, reason);
        await this.options.store.updateSandbox(record.sandboxId, { state: "dead", endReason: reason, network: undefined });
        await this.options.store.recordEvent({ sandboxId: record.sandboxId, at: Date.now(), kind: "dead", detail: { reason } });
        dead.push(record.sandboxId);
      }
    }
    for (const sandboxId of await this.options.runtime.list()) {
      if (this.live.has(sandboxId)) continue;
      await this.options.runtime.destroy(sandboxId).catch((err) => log.error("orphan destroy failed", { sandboxId, error: String(err) }));
      orphansRemoved.push(sandboxId);
    }
    for (const netnsName of await this.options.network.listNamespaces()) {
      const sandboxId = netnsName.replace(/^cubicle-/, "");
      // Namespaces of sandboxes this store never knew belong to another server on the host.
      if (this.live.has(sandboxId) || !(await this.options.store.getSandbox(sandboxId))) continue;
      await this.options.network.release(sandboxId).catch((err) => log.error("orphan network release failed", { sandboxId, error: String(err) }));
      if (!orphansRemoved.includes(sandboxId)) orphansRemoved.push(sandboxId);
    }
    this.scheduleReaper();
    if (adopted.length || dead.length || orphansRemoved.length) log.info("recovered", { adopted, dead, orphansRemoved });
    return { adopted, dead, orphansRemoved };
  }

  /** Stops timers; sandboxes keep running (they are adopted on the next start). */
  close(): void {
    this.closed = true;
    if (this.reaperTimer) clearTimeout(this.reaperTimer);
  }

  /** Kills every live sandbox (used by tests and `cubicle down --kill`). */
  async killAll(reason = "server shutdown"): Promise<void> {
    await Promise.all([...this.live.keys()].map((id) => this.kill(id, reason)));
  }
}
