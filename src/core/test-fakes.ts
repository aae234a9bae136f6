import { egressPolicyOf } from "../network/egress-policy.js";
import type { EgressPolicy } from "../network/egress-types.js";
import type { NetworkManager, NetworkPolicy, SandboxNetwork } from "../network/types.js";
import { imageId, type ImageInfo, type ImageKind, type ImageStore, type PendingImage } from "../runtime/images.js";
import type { CheckpointInfo, CheckpointOptions, CheckpointTarget, Runtime, RuntimeState, SandboxSpec, SandboxStats } from "../runtime/types.js";
import { CubicleError } from "../shared/cubicle-error.js";
import type { EventRecord, PoolEntryRecord, SandboxQuery, SandboxRecord, SecretQuery, SecretRecord, SecretValueUpdate, SnapshotQuery, SnapshotRecord, Store } from "../store/types.js";
import { createFakeAgentLink, type AgentLinkCall } from "../protocol/fake-agent-link.js";
import type { InitBody } from "../protocol/index.js";
import { SandboxManager, type SandboxManagerOptions } from "./sandbox-manager.js";
import type { CreateSandboxRequest, TemplateCatalog, TemplateInfo } from "./types.js";

/**
 * Typed fakes of the ports below the core (runtime, network, store; the agent link's is
 * src/protocol/fake-agent-link.ts) for unit tests
 * that run without root: they keep what a real one would hold in maps, record the calls, and
 * fail on demand (`failNext`). Each implements its interface, so a change of a port breaks them
 * at compile time instead of hiding behind a cast.
 */

type RuntimeStep = "create" | "restore" | "checkpoint" | "thaw" | "freeze" | "destroy" | "foreground";

/** Images in memory: allocate → commit makes an id exist, as a real store's rename does. */
export class FakeImageStore implements ImageStore {
  readonly committed = new Map<string, ImageInfo>();

  constructor(private readonly runtime: "container" | "microvm" = "container") {}
  private readonly pending = new Map<string, { memory: boolean }>();

  async allocate(kind: ImageKind, name: string): Promise<PendingImage> {
    const id = imageId(kind, name);
    if (this.committed.has(id)) throw new CubicleError("already_exists", `image ${id} exists`);
    this.pending.set(id, { memory: false });
    return { id, kind, name, dir: `/fake-images/${id}.partial` };
  }

  /** What the runtime wrote into a pending image. */
  written(pending: PendingImage, memory: boolean): void {
    this.pending.set(pending.id, { memory });
  }

  async commit(pending: PendingImage): Promise<ImageInfo> {
    const written = this.pending.get(pending.id);
    if (!written) throw new CubicleError("internal", `image ${pending.id} was not allocated`);
    this.pending.delete(pending.id);
    const info: ImageInfo = { id: pending.id, kind: pending.kind, runtime: this.runtime, sizeBytes: 4096, memory: written.memory, createdAt: new Date().toISOString() };
    this.committed.set(pending.id, info);
    return info;
  }

  async abandon(pending: PendingImage): Promise<void> {
    this.pending.delete(pending.id);
  }

  async exists(id: string): Promise<boolean> {
    return this.committed.has(id);
  }

  async info(id: string): Promise<ImageInfo | undefined> {
    return this.committed.get(id);
  }

  async list(kind: ImageKind): Promise<string[]> {
    return [...this.committed.values()].filter((image) => image.kind === kind).map((image) => image.id);
  }

  async remove(id: string): Promise<void> {
    this.committed.delete(id);
  }

  usedBytes(): number {
    return [...this.committed.values()].reduce((sum, image) => sum + image.sizeBytes, 0);
  }
}

export class FakeRuntime implements Runtime {
  readonly name: "container" | "microvm";
  readonly images: FakeImageStore;
  /** Containers on the "host" by runtime id. */
  readonly containers = new Map<string, "running" | "frozen">();
  /** Every call, as "step id". */
  readonly calls: string[] = [];
  /** Every restore asked for: into which sandbox, from which image, as the same machine or a new one. */
  readonly restores: { sandboxId: string; imageId: string; sameMachine: boolean }[] = [];
  /** Sandboxes created with `spec.background` that were not given foreground() yet. */
  readonly background = new Set<string>();
  /** Steps that fail once (or `failCreates` times for create), with this error. */
  readonly failNext = new Map<RuntimeStep, Error>();
  private failCreates: number;
  private readonly exitListeners: ((runtimeId: string) => void)[] = [];

  constructor(options: { failCreates?: number; fingerprint?: () => string; name?: "container" | "microvm" } = {}) {
    this.failCreates = options.failCreates ?? 0;
    this.name = options.name ?? "container";
    this.images = new FakeImageStore(this.name);
    if (options.fingerprint) this.memoryImageFingerprint = options.fingerprint;
  }

  memoryImageFingerprint?: () => string | undefined;

  private step(step: RuntimeStep, id: string): void {
    this.calls.push(`${step} ${id}`);
    const failure = this.failNext.get(step);
    if (failure) {
      this.failNext.delete(step);
      throw failure;
    }
  }

  async init(): Promise<void> {}

  async create(spec: SandboxSpec): Promise<void> {
    if (this.failCreates > 0) {
      this.failCreates--;
      throw new Error("boom: no sandboxes in unit tests");
    }
    this.step("create", spec.sandboxId);
    await spec.networkReady;
    this.containers.set(spec.sandboxId, "running");
    if (spec.background) this.background.add(spec.sandboxId);
  }

  async destroy(id: string): Promise<void> {
    this.step("destroy", id);
    this.containers.delete(id);
    this.background.delete(id);
  }

  async state(id: string): Promise<RuntimeState> {
    return this.containers.get(id) ?? "missing";
  }

  async list(): Promise<string[]> {
    return [...this.containers.keys()];
  }

  async freeze(id: string): Promise<void> {
    this.step("freeze", id);
    if (!this.containers.has(id)) throw new CubicleError("not_found", `no container ${id}`);
    this.containers.set(id, "frozen");
  }

  async thaw(id: string): Promise<void> {
    this.step("thaw", id);
    if (!this.containers.has(id)) throw new CubicleError("not_found", `no container ${id}`);
    this.containers.set(id, "running");
  }

  async foreground(id: string): Promise<void> {
    this.step("foreground", id);
    if (!this.containers.has(id)) throw new CubicleError("not_found", `no container ${id}`);
    this.background.delete(id);
  }

  async setHostname(): Promise<void> {}

  /** CPU time per container (µs) that cpuTimeUsec reports: a test adds to it to make a sandbox look busy. */
  readonly cpuUsec = new Map<string, number>();

  /** Set: cpuTimeUsec answers `unimplemented`, as a microVM runtime's does (GUEST_CPU_NOTE). */
  cpuTimeUnknown = false;

  /** What idleCpuShare answers (undefined: the idle tiers' default). */
  idleShare: number | undefined;

  async idleCpuShare(): Promise<number | undefined> {
    return this.idleShare;
  }

  async cpuTimeUsec(id: string): Promise<number> {
    if (this.cpuTimeUnknown) throw new CubicleError("unimplemented", "this runtime cannot tell a sandbox's CPU time");
    if (!this.containers.has(id)) throw new CubicleError("not_found", `no container ${id}`);
    return this.cpuUsec.get(id) ?? 0;
  }

  /** Runtime ids whose stats were read, in order. */
  readonly statsReads: string[] = [];

  async stats(id: string): Promise<SandboxStats> {
    this.statsReads.push(id);
    if (!this.containers.has(id)) throw new CubicleError("not_found", `no container ${id}`);
    return { cpuUsedPct: 0, cpuCount: 1, memUsedBytes: 0, memTotalBytes: 0, memCacheBytes: 0, diskUsedBytes: 0, diskTotalBytes: 0 };
  }

  /** Allocates, "writes" and commits an image, as a real checkpoint does; a failure leaves none. */
  async checkpoint(id: string, target: CheckpointTarget, options: CheckpointOptions): Promise<CheckpointInfo & { imageId: string }> {
    const pending = await this.images.allocate(target.kind, target.name);
    try {
      this.step("checkpoint", id);
      if (!this.containers.has(id)) throw new CubicleError("not_found", `no container ${id}`);
      this.images.written(pending, options.memory);
    } catch (err) {
      await this.images.abandon(pending);
      throw err;
    }
    const info = await this.images.commit(pending);
    if (!options.leaveRunning) this.containers.delete(id);
    return { sizeBytes: info.sizeBytes, frozenMs: 1, memory: options.memory, imageId: info.id };
  }

  async restore(spec: SandboxSpec, imageId: string): Promise<void> {
    this.restores.push({ sandboxId: spec.sandboxId, imageId, sameMachine: spec.sameMachine === true });
    this.step("restore", spec.sandboxId);
    await spec.networkReady;
    if (!(await this.images.exists(imageId))) throw new CubicleError("not_found", `no image ${imageId}`);
    this.containers.set(spec.sandboxId, "running");
    await spec.whenRunning?.();
  }

  onExit(listener: (runtimeId: string) => void): void {
    this.exitListeners.push(listener);
  }

  async watch(): Promise<void> {}

  /** The sandbox's processes end on their own (as an OOM kill would end them). */
  exit(id: string): void {
    this.containers.delete(id);
    for (const listener of this.exitListeners) listener(id);
  }
}

export class FakeNetwork implements NetworkManager {
  readonly networks = new Map<string, SandboxNetwork>();
  readonly policies = new Map<string, NetworkPolicy>();
  private next = 1;

  async init(): Promise<void> {}

  private plan(id: string): SandboxNetwork {
    const n = this.next++;
    const address = `10.200.${Math.floor(n / 64)}.${(n % 64) * 4 + 2}`;
    return { netnsName: `cubicle-${id}`, netnsPath: `/run/netns/cubicle-${id}`, hostInterface: `veth${n}`, hostAddress: address.replace(/\d+$/, (d) => String(Number(d) - 1)), sandboxAddress: address, prefixLength: 30 };
  }

  async allocate(id: string, policy: NetworkPolicy): Promise<SandboxNetwork> {
    return this.begin(id, policy).ready;
  }

  begin(id: string, policy: NetworkPolicy): { network: SandboxNetwork; ready: Promise<SandboxNetwork> } {
    const network = this.plan(id);
    this.networks.set(id, network);
    this.policies.set(id, policy);
    return { network, ready: Promise.resolve(network) };
  }

  async adopt(id: string, network: SandboxNetwork, policy?: NetworkPolicy): Promise<void> {
    this.networks.set(id, network);
    if (policy) this.policies.set(id, policy);
  }

  async applyPolicy(id: string, policy: NetworkPolicy): Promise<void> {
    this.policies.set(id, policy);
  }

  async release(id: string): Promise<void> {
    this.networks.delete(id);
    this.policies.delete(id);
  }

  async listRuntimeIds(): Promise<string[]> {
    return [...this.networks.keys()];
  }

  sandboxAt(address: string): { sandboxId: string; policy: EgressPolicy } | undefined {
    for (const [id, network] of this.networks) {
      if (network.sandboxAddress === address) return { sandboxId: id, policy: egressPolicyOf(this.policies.get(id) ?? { allowInternetAccess: false }) };
    }
    return undefined;
  }

  async pin(): Promise<void> {}

  close(): void {}
}

/** A store in memory (the SQLite store's semantics for what the core uses). */
export class MemoryStore implements Store {
  readonly sandboxes = new Map<string, SandboxRecord>();
  readonly events: EventRecord[] = [];
  readonly snapshots = new Map<string, SnapshotRecord>();
  /** Pool entries by runtime id. */
  readonly rows = new Map<string, PoolEntryRecord>();
  readonly secrets = new Map<string, SecretRecord>();

  private static copy<T>(value: T): T {
    return structuredClone(value);
  }

  async insertSandbox(record: SandboxRecord): Promise<void> {
    if (this.sandboxes.has(record.sandboxId)) throw new Error(`sandbox ${record.sandboxId} exists`);
    this.sandboxes.set(record.sandboxId, MemoryStore.copy(record));
  }

  async updateSandbox(sandboxId: string, patch: Partial<Omit<SandboxRecord, "sandboxId">>): Promise<void> {
    const current = this.sandboxes.get(sandboxId);
    if (current) this.sandboxes.set(sandboxId, MemoryStore.copy({ ...current, ...patch }));
  }

  async getSandbox(sandboxId: string): Promise<SandboxRecord | undefined> {
    const record = this.sandboxes.get(sandboxId);
    return record && MemoryStore.copy(record);
  }

  async querySandboxes(query: SandboxQuery): Promise<SandboxRecord[]> {
    const rows = [...this.sandboxes.values()].filter(
      (r) => (!query.states?.length || query.states.includes(r.state)) && (!query.templateIds || query.templateIds.includes(r.templateId)),
    );
    rows.sort((a, b) => (a.startedAt - b.startedAt || a.sandboxId.localeCompare(b.sandboxId)) * (query.order === "asc" ? 1 : -1));
    return rows.slice(0, query.limit ?? rows.length).map(MemoryStore.copy);
  }

  async recordEvent(event: EventRecord): Promise<void> {
    this.events.push(MemoryStore.copy(event));
  }

  async listEvents(sandboxId: string): Promise<EventRecord[]> {
    return this.events.filter((e) => e.sandboxId === sandboxId);
  }

  async insertSnapshot(record: SnapshotRecord): Promise<void> {
    for (const other of this.snapshots.values()) other.names = other.names.filter((name) => !record.names.includes(name));
    this.snapshots.set(record.snapshotId, MemoryStore.copy(record));
  }

  async getSnapshot(snapshotId: string): Promise<SnapshotRecord | undefined> {
    return this.snapshots.get(snapshotId);
  }

  async findSnapshot(idOrName: string): Promise<SnapshotRecord | undefined> {
    return this.snapshots.get(idOrName) ?? [...this.snapshots.values()].reverse().find((s) => s.names.includes(idOrName));
  }

  async querySnapshots(query: SnapshotQuery): Promise<SnapshotRecord[]> {
    const rows = [...this.snapshots.values()].filter((s) => !s.hidden && (!query.sourceSandboxId || s.sourceSandboxId === query.sourceSandboxId));
    return rows.reverse().slice(0, query.limit ?? rows.length);
  }

  async allSnapshots(): Promise<SnapshotRecord[]> {
    return [...this.snapshots.values()];
  }

  async deleteSnapshot(snapshotId: string): Promise<boolean> {
    return this.snapshots.delete(snapshotId);
  }

  async insertPoolEntry(entry: PoolEntryRecord): Promise<void> {
    this.rows.set(entry.runtimeId, MemoryStore.copy(entry));
  }

  async deletePoolEntry(runtimeId: string): Promise<void> {
    this.rows.delete(runtimeId);
  }

  async claimPoolEntry(record: SandboxRecord): Promise<void> {
    await this.insertSandbox(record);
    this.rows.delete(record.runtimeId ?? record.sandboxId);
  }

  async listPoolEntries(): Promise<PoolEntryRecord[]> {
    return [...this.rows.values()];
  }

  async insertSecret(record: SecretRecord): Promise<void> {
    if ([...this.secrets.values()].some((s) => s.name === record.name)) throw new CubicleError("already_exists", `a secret named "${record.name}" already exists`);
    this.secrets.set(record.secretId, MemoryStore.copy(record));
  }

  async updateSecretValue(secretId: string, update: SecretValueUpdate): Promise<SecretRecord | undefined> {
    const current = this.secrets.get(secretId);
    if (!current) return undefined;
    const next = { ...current, ...update, metadata: update.metadata ?? current.metadata, currentVersion: current.currentVersion + 1 };
    this.secrets.set(secretId, MemoryStore.copy(next));
    return MemoryStore.copy(next);
  }

  async querySecrets(query: SecretQuery): Promise<SecretRecord[]> {
    const after = query.after;
    const rows = [...this.secrets.values()]
      .sort((a, b) => a.createdAt - b.createdAt || (a.secretId < b.secretId ? -1 : 1))
      .filter((s) => !after || s.createdAt > after.createdAt || (s.createdAt === after.createdAt && s.secretId > after.secretId));
    return rows.slice(0, query.limit ?? rows.length).map(MemoryStore.copy);
  }

  async deleteSecret(secretId: string): Promise<boolean> {
    return this.secrets.delete(secretId);
  }

  async knowsRuntimeId(runtimeId: string): Promise<boolean> {
    return this.rows.has(runtimeId) || [...this.sandboxes.values()].some((r) => (r.runtimeId ?? r.sandboxId) === runtimeId);
  }

  async close(): Promise<void> {}
}

/**
 * The fakes together, for what boots unclaimed sandboxes (warm pool, warm snapshots) and for the
 * manager. Creates fail `failCreates` times first (Infinity: always).
 */
export function fakeHost(options: { failCreates?: number; fingerprint?: () => string } = {}) {
  const runtime = new FakeRuntime(options);
  const network = new FakeNetwork();
  const store = new MemoryStore();
  const agent = createFakeAgentLink();
  return { runtime, network, store, agent, containers: runtime.containers, networks: network.networks, rows: store.rows };
}

/** The base template under two names, as the catalog the manager tests use. */
export const fakeTemplate: TemplateInfo = {
  templateId: "base",
  aliases: ["base", "base-alias"],
  cpuCount: 1,
  memoryMB: 512,
  diskSizeMB: 0,
  image: { templateId: "base", rootfsDir: "/x", defaultUser: "user", defaultWorkdir: "/home/user", env: {} },
};

export const fakeTemplates: TemplateCatalog = {
  async resolve(idOrAlias) {
    return fakeTemplate.aliases.includes(idOrAlias) || idOrAlias === fakeTemplate.templateId ? fakeTemplate : undefined;
  },
};

/** A create request with the defaults the API would fill in. */
export function createRequest(overrides: Partial<CreateSandboxRequest> = {}): CreateSandboxRequest {
  return { templateId: "base", timeoutSec: 300, secure: true, allowInternetAccess: true, metadata: {}, envVars: {}, autoPause: false, autoResume: false, networkConfig: undefined, ...overrides };
}

/** A SandboxManager on the fakes, with no warm pool and no background pause image writes unless `options` say otherwise. */
export function fakeManager(options: Partial<SandboxManagerOptions> = {}) {
  const host = fakeHost();
  const manager = new SandboxManager({
    ...host,
    templates: fakeTemplates,
    admission: { slots: 4, maxWaiting: 100, minAvailableBytes: 0 },
    pauseImageAfterMs: -1,
    ...options,
  });
  return { ...host, manager, close: () => manager.close() };
}

/** Runs `body` on a fakeManager and closes it afterwards, also when `body` throws. */
export async function withFakeManager(options: Partial<SandboxManagerOptions>, body: (f: ReturnType<typeof fakeManager>) => Promise<void>): Promise<void> {
  const f = fakeManager(options);
  try {
    await body(f);
  } finally {
    await f.close();
  }
}

/** Waits (5 ms steps, `timeoutMs` at most) until `check` holds, and fails the test if it never does. */
export async function until(check: () => boolean, timeoutMs = 2500): Promise<void> {
  for (const deadline = Date.now() + timeoutMs; !check() && Date.now() < deadline; ) await new Promise((r) => setTimeout(r, 5));
  if (!check()) throw new Error("condition not reached in time");
}

/** The last /init the fake agent link sent to an address. */
export function lastInit(agent: ReturnType<typeof createFakeAgentLink>, address: string): InitBody | undefined {
  return agent.callsOf("init").filter((call) => call.address === address).at(-1)?.body;
}

/** A failure for FakeAgentLink.failures that strikes once, or for the calls `only` picks. */
export function failOnce(error: Error, only: (call: AgentLinkCall) => boolean = () => true): (call: AgentLinkCall) => Error | undefined {
  let spent = false;
  return (call) => {
    if (spent || !only(call)) return undefined;
    spent = true;
    return error;
  };
}
