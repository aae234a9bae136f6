import { CubicleError } from "../shared/cubicle-error.js";
import type { SandboxRecord, SandboxState, Store } from "../store/types.js";
import { runtimeIdOf } from "../store/types.js";

/**
 * The states a sandbox may move to from each state. `killed` and `dead` are terminal; a change
 * of pause tier (hot → durable) or of network is no change of state (`update`).
 */
const NEXT_STATES: Record<SandboxState, readonly SandboxState[]> = {
  starting: ["running", "dead"],
  running: ["paused", "killed", "dead"],
  paused: ["running", "killed", "dead"],
  killed: [],
  dead: [],
};

/** The record fields other than the state that change while a sandbox lives. */
export type SandboxPatch = Partial<Pick<SandboxRecord, "network" | "pause" | "endAt" | "runtimeId" | "allowInternetAccess" | "networkConfig" | "idle">>;

/** How a sandbox ends: killed (by a user or its timeout) or dead (it failed or vanished). */
export interface Ending {
  state: "killed" | "dead";
  reason: string;
}

/** What the table keeps beside a live sandbox's record while this process runs (never stored). */
export interface LiveSandbox {
  record: SandboxRecord;
  /** A claimed pool entry's agent being given its identity: traffic waits for it. */
  initialising?: Promise<void>;
  /** Starts what `initialising` still waits for at once (a claim's policy and thaw: POLICY_CLAIM_NOTE). */
  hurry?: () => void;
  /** A snapshot or fork dump is under way: a second one is refused, not queued. */
  dumping: boolean;
  /** Its move from the hot pause tier to disk failed: not retried until it is resumed and paused again. */
  durableFailed: boolean;
  /** The pending background write of a hot pause's image. */
  pauseImageTimer?: NodeJS.Timeout;
  /** Idle tiers (lifecycle/idle.ts): the last traffic or API call that reached it (epoch ms). */
  activeAt: number;
  /** Idle tiers: forwarded requests and streams open now (a sandbox with one is never idle). */
  openStreams: number;
  /** Idle tiers: the pending check for idleness, or move to disk. */
  idleTimer?: NodeJS.Timeout;
  /** Idle tiers: a CPU-time reading taken while it was quiet, compared at the next check. */
  cpuMark?: { atMs: number; usec: number };
  /** Idle tiers: a freeze or a move to disk is under way (traffic then waits for a wake). */
  idleMoving: boolean;
  /** Idle tiers: the wake every concurrent request shares. */
  waking?: Promise<void>;
  /** Idle tiers: its move to disk failed: it stays frozen until woken (not retried before). */
  idleDiskFailed: boolean;
}

/**
 * The live sandboxes (starting, running, paused) of this server, mirrored into the store. Every
 * change of a record goes through here: `transition()` for a state change (checked against
 * NEXT_STATES), `update()` for the other fields, `end()` as the one way a sandbox ends. Callers
 * hold the sandbox's lock (KeyedMutex) around a change.
 */
export class SandboxTable {
  private readonly live = new Map<string, LiveSandbox>();

  constructor(
    private readonly store: Store,
    /** Removes what an ended sandbox holds on the host (connections, container, network, images); never throws. */
    private readonly teardown: (record: SandboxRecord, reason: string) => Promise<void>,
  ) {}

  get(sandboxId: string): SandboxRecord | undefined {
    return this.live.get(sandboxId)?.record;
  }

  /** The transient state kept beside a live sandbox; undefined once it ended. */
  entry(sandboxId: string): LiveSandbox | undefined {
    return this.live.get(sandboxId);
  }

  /** True while `record` is still the live one of its id (it did not end or get replaced). */
  isLive(record: SandboxRecord): boolean {
    return this.live.get(record.sandboxId)?.record === record;
  }

  records(): SandboxRecord[] {
    return [...this.live.values()].map((entry) => entry.record);
  }

  entries(): LiveSandbox[] {
    return [...this.live.values()];
  }

  byRuntimeId(runtimeId: string): SandboxRecord | undefined {
    for (const { record } of this.live.values()) if (runtimeIdOf(record) === runtimeId) return record;
    return undefined;
  }

  /** Records a new `starting` sandbox (store first: a crash then finds what to clean up). */
  async add(record: SandboxRecord): Promise<void> {
    this.checkNew(record);
    await this.store.insertSandbox(record);
    this.track(record);
  }

  /** Records a sandbox made from a warm-pool entry, in the store transaction that removes the entry. */
  async addClaimed(record: SandboxRecord): Promise<void> {
    this.checkNew(record);
    await this.store.claimPoolEntry(record);
    this.track(record);
  }

  /** Takes over a sandbox the store already holds (recovery after a restart). */
  adopt(record: SandboxRecord): void {
    this.track(record);
  }

  /** Changes fields other than the state, in the record and the store. */
  async update(record: SandboxRecord, patch: SandboxPatch): Promise<void> {
    Object.assign(record, patch);
    await this.store.updateSandbox(record.sandboxId, patch);
  }

  /** Moves a live sandbox to another live state (never to an end: see end()), with its other changes. */
  async transition(record: SandboxRecord, to: "running" | "paused", patch: SandboxPatch = {}): Promise<void> {
    this.checkMove(record, to);
    record.state = to;
    Object.assign(record, patch);
    await this.store.updateSandbox(record.sandboxId, { state: to, ...patch });
  }

  /**
   * Ends a sandbox: gone from the table, recorded as ended (before the teardown: the store must
   * not list it running meanwhile; a crash in between leaves orphans that recovery removes), its
   * connections reset, its container, network and images removed, an event recorded. Also ends
   * records that are not live (recovery's vanished ones).
   */
  async end(record: SandboxRecord, ending: Ending): Promise<void> {
    this.checkMove(record, ending.state);
    const held = { ...record };
    this.untrack(record);
    record.state = ending.state;
    record.endReason = ending.reason;
    record.network = undefined;
    record.pause = undefined;
    record.idle = undefined;
    await this.store.updateSandbox(record.sandboxId, { state: ending.state, endReason: ending.reason, network: undefined, pause: undefined, idle: undefined });
    await this.teardown(held, ending.reason);
    await this.store.recordEvent({ sandboxId: record.sandboxId, at: Date.now(), kind: ending.state, detail: { reason: ending.reason } });
  }

  private track(record: SandboxRecord): void {
    this.live.set(record.sandboxId, { record, dumping: false, durableFailed: false, activeAt: Date.now(), openStreams: 0, idleMoving: false, idleDiskFailed: false });
  }

  private untrack(record: SandboxRecord): void {
    const entry = this.live.get(record.sandboxId);
    if (entry?.record !== record) return;
    clearTimeout(entry.pauseImageTimer);
    clearTimeout(entry.idleTimer);
    this.live.delete(record.sandboxId);
  }

  private checkNew(record: SandboxRecord): void {
    if (record.state !== "starting") throw new CubicleError("internal", `a new sandbox starts in state "starting", not "${record.state}"`);
    if (this.live.has(record.sandboxId)) throw new CubicleError("internal", `sandbox "${record.sandboxId}" is in the table already`);
  }

  private checkMove(record: SandboxRecord, to: SandboxState): void {
    if (!NEXT_STATES[record.state].includes(to)) {
      throw new CubicleError("internal", `sandbox "${record.sandboxId}" cannot go from "${record.state}" to "${to}"`);
    }
  }
}
