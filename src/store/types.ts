import type { SandboxNetwork } from "../network/types.js";

/** The lifecycle states a sandbox record can be in. `killed` and `dead` are terminal. */
export type SandboxState = "starting" | "running" | "paused" | "killed" | "dead";

/** A sandbox as the store keeps it: everything needed to serve the API and to recover after a restart. */
export interface SandboxRecord {
  sandboxId: string;
  /**
   * The id the runtime and the network know this sandbox by (container, netns, directories).
   * Equal to sandboxId unless the sandbox came from a warm pool, which made it under its own id.
   * Records written before this field existed lack it: read it through `runtimeIdOf`.
   */
  runtimeId?: string;
  templateId: string;
  alias: string | undefined;
  clientId: string;
  state: SandboxState;
  /** Epoch ms. */
  startedAt: number;
  /** Epoch ms at which the reaper ends it. */
  endAt: number;
  cpuCount: number;
  memoryMB: number;
  diskSizeMB: number;
  metadata: Record<string, string>;
  envVars: Record<string, string>;
  secure: boolean;
  envdAccessToken: string | undefined;
  trafficAccessToken: string | undefined;
  allowInternetAccess: boolean;
  /** The E2B `network` config as the user sent it (stored and echoed even where not enforced yet). */
  networkConfig: Record<string, unknown> | undefined;
  lifecycle: { autoResume: boolean; onTimeout: "kill" | "pause" };
  /** The host-side network Cubicle made for it; undefined once released. */
  network: SandboxNetwork | undefined;
  runtime: "container" | "microvm";
  /** Volumes mounted in it (VOLUMES_NOTE): by id, with the name the create gave and where. */
  volumeMounts?: VolumeMount[];
  /** Codebases mounted in it with their permission tables (CODEBASES_NOTE). */
  codebaseMounts?: CodebaseMount[];
  /** Why it ended (killed, timeout, vanished …), for terminal states. */
  endReason: string | undefined;
  /** Set while paused: how, since when, and where a durable pause keeps its image. */
  pause?: PauseInfo;
  /**
   * Set while a running sandbox sleeps for idleness, below E2B's lifecycle (its state stays
   * `running` for the user, who sees the tier only in getInfo/list as `cubicleIdle`).
   */
  idle?: IdleInfo;
  /** The snapshot a sandbox was created from (create from snapshot, fork). */
  fromSnapshotId?: string;
  /** The lifetime asked for at create (seconds): an auto-resume grants it again. */
  timeoutSec?: number;
}

/**
 * A paused sandbox is either frozen in RAM (`hot`: cgroup freezer, network kept) or on disk
 * (`durable`: a checkpoint image, no container, no network).
 */
export interface PauseInfo {
  tier: "hot" | "durable";
  /** Epoch ms of the pause. */
  pausedAt: number;
  /** False = filesystem only: resuming starts the agent anew. */
  memory: boolean;
  /**
   * The runtime's id of the checkpoint image (`pause/<runtime id>`): always set in the durable
   * tier; in the hot tier once the image written in the background (the container still frozen)
   * is complete, so a host reboot can resume from it. Records of older versions held a
   * directory (`imageDir`); the store converts them on read.
   */
  imageId?: string;
}

/**
 * An idle running sandbox is either frozen in RAM (`frozen`: cgroup freezer, network kept) or
 * on disk (`disk`: a checkpoint image `pause/<sandbox id>` with its memory, no container, no
 * network). The next request or SDK call wakes it (core/lifecycle/idle.ts).
 */
export interface IdleInfo {
  tier: "frozen" | "disk";
  /** Epoch ms of the freeze (the move to disk counts from it). */
  since: number;
  /** The checkpoint image of the disk tier. */
  imageId?: string;
}

/** The runtime id of a sandbox record (older records have none: it was the sandbox id). */
export function runtimeIdOf(record: Pick<SandboxRecord, "sandboxId" | "runtimeId">): string {
  return record.runtimeId ?? record.sandboxId;
}

/** A snapshot: a checkpoint image of a sandbox that outlives it and can be restored into new ones. */
export interface SnapshotRecord {
  snapshotId: string;
  /** Names that resolve to this snapshot (a reused name moves to the newest snapshot). */
  names: string[];
  sourceSandboxId: string;
  /** Runtime id of the source at dump time (rollback accepts only its own snapshots). */
  sourceRuntimeId: string;
  templateId: string;
  /** Epoch ms. */
  createdAt: number;
  /** The runtime's id of the image (`snapshot/<snapshotId>`); older records held `imageDir`, converted on read. */
  imageId: string;
  sizeBytes: number;
  memory: boolean;
  /** The envd token the agent in the image holds: a restore must present it to re-init the agent. */
  agentAccessToken: string | undefined;
  cpuCount: number;
  memoryMB: number;
  diskSizeMB: number;
  /** The source's volume mounts: a restore mounts the same volumes (their content is not in the image). */
  volumeMounts?: VolumeMount[];
  /** The source's codebase mounts, likewise. */
  codebaseMounts?: CodebaseMount[];
  /** Hidden snapshots (a fork's one-off image) are not listed and are removed after use. */
  hidden?: boolean;
}

export interface SnapshotQuery {
  sourceSandboxId?: string;
  /** A snapshot id or name (an optional `:tag` is ignored). */
  name?: string;
  /** Cursor: strictly older than this (createdAt, snapshotId), newest first. */
  after?: { createdAt: number; snapshotId: string };
  limit?: number;
}

/** A warm-pool sandbox: created ahead, frozen, not yet anyone's. */
export interface PoolEntryRecord {
  runtimeId: string;
  templateId: string;
  /** Undefined until the network is made (the entry is recorded first, so a crash leaks nothing). */
  network: SandboxNetwork | undefined;
  createdAt: number;
  allowInternetAccess: boolean;
  /**
   * The access token the entry's agent was initialised with before the freeze (the template's
   * defaults, no env vars). Made for this entry and never shown to anyone before a claim: a
   * secure create without env vars takes it as its own and skips the /init round trip.
   */
  agentToken?: string;
}

export interface SandboxQuery {
  states?: SandboxState[];
  templateIds?: string[];
  /** All of these must match. */
  metadata?: Record<string, string>;
  /** Inclusive, epoch ms. */
  startedAfter?: number;
  order?: "asc" | "desc";
  /** Cursor: strictly after this (startedAt, sandboxId) in the chosen order. */
  after?: { startedAt: number; sandboxId: string };
  limit?: number;
}

/**
 * A secret as the store keeps it: the current version's value only, sealed with AES-256-GCM
 * (src/secrets seals and opens it; the store never sees the value in clear).
 */
export interface SecretRecord {
  /** `sec_` + random. */
  secretId: string;
  /** Lower-case, unique. */
  name: string;
  currentVersion: number;
  /** 12 random bytes, new for every version. */
  iv: Buffer;
  ciphertext: Buffer;
  /** GCM's 16-byte authentication tag. */
  authTag: Buffer;
  metadata: Record<string, string>;
  /** Epoch ms. */
  createdAt: number;
  updatedAt: number;
}

/** A new value for a secret: the version goes up by one; metadata is kept when undefined. */
export interface SecretValueUpdate {
  iv: Buffer;
  ciphertext: Buffer;
  authTag: Buffer;
  metadata: Record<string, string> | undefined;
  updatedAt: number;
}

export interface SecretQuery {
  /** Cursor: strictly after this (createdAt, secretId); oldest first. */
  after?: { createdAt: number; secretId: string };
  limit?: number;
}

/** One line of a template build's log, as the E2B build status shows it. */
export interface BuildLogEntry {
  /** ISO 8601. */
  timestamp: string;
  level: "debug" | "info" | "warn" | "error";
  message: string;
  /** The step it belongs to: "base", a step's 1-based number as a string, or "finalize". */
  step?: string;
}

/** A template build (E2B's build: one per `POST /v3/templates`). */
export interface TemplateBuildRecord {
  buildId: string;
  templateId: string;
  /** `waiting`: requested, not started (no `POST /v2/templates/{id}/builds/{buildId}` yet). */
  status: "waiting" | "building" | "ready" | "error";
  /** The build request as validated (steps, base, start and ready commands); absent while waiting. */
  spec?: unknown;
  cpuCount: number;
  memoryMB: number;
  /** The names the build was requested under (the template's aliases once it is built). */
  names: string[];
  /** The tags that point at this build once it is ready. */
  tags: string[];
  /** Layer images this build made (its cache entries), removed with the template. */
  layers?: string[];
  /** Why it failed, and at which step. */
  reason?: { message: string; step?: string };
  logs: BuildLogEntry[];
  /** Epoch ms. */
  createdAt: number;
  finishedAt?: number;
}

/** Where template builds are kept (the SQLite store); separate from Store, which the core uses. */
export interface TemplateBuildStore {
  /** Inserts or replaces the build's record. */
  putTemplateBuild(record: TemplateBuildRecord): Promise<void>;
  getTemplateBuild(buildId: string): Promise<TemplateBuildRecord | undefined>;
  /** Newest first. */
  listTemplateBuilds(templateId: string): Promise<TemplateBuildRecord[]>;
  deleteTemplateBuilds(templateId: string): Promise<void>;
  /** Builds left `waiting` or `building` by an earlier process (a restart cut them off). */
  unfinishedTemplateBuilds(): Promise<TemplateBuildRecord[]>;
}

/** What a template gives its sandboxes, whoever made it: names, user, workdir, env, resources. */
export interface TemplateDefaults {
  templateId: string;
  aliases: string[];
  defaultUser: string;
  defaultWorkdir: string;
  env: Record<string, string>;
  cpuCount: number;
  memoryMB: number;
  diskSizeMB: number;
}

/**
 * TEMPLATE_RECORDS_NOTE: a template as the store keeps it, whatever made it: a built-in recipe
 * (its tree built by mmdebstrap into the template cache, `<templateDir>/<id>/rootfs`), a build
 * through the template-build API, or an image imported by `./cubicle template import` (both
 * standing on a pulled or imported image's tree, or another template's, with a layer image of
 * what their steps changed). The store is the only list of templates: trees and layers on disk
 * are what records point at, never a record themselves, so a tree a build left half-made, or
 * one another server's store knows, is no template here until a record names it.
 */
export interface TemplateRecord extends TemplateDefaults {
  runtime: "container";
  /** What the template's files were made from (a recipe's hash, a build's step chain); another value means another tree. */
  recipeHash: string;
  /** ISO 8601. */
  builtAt: string;
  /** Disk space its own tree takes (allocated blocks); 0 for one standing on another's tree. */
  sizeBytes: number;
  /** A built-in recipe, or a build or import through the builder. */
  source: "recipe" | "build";
  /** The tree its sandboxes start from: the recipe's own, or the image or template it was built on. */
  rootfsDir: string;
  /** Builds: the image (kind `layer`) holding what the build's steps changed, over `rootfsDir`. */
  layerImageId?: string;
  /** Started in every sandbox of the template (in its warm snapshot, already running). */
  startCmd?: string;
  /** Run until it succeeds after startCmd; the template's sandboxes are ready then. */
  readyCmd?: string;
  /** The build that made the current files (its record is in the template builds). */
  buildId?: string;
  /** Tag → build id (E2B's template tags; `default` is the latest build). */
  tags?: Record<string, string>;
  public?: boolean;
}

/** Where template records are kept (the SQLite store): TEMPLATE_RECORDS_NOTE. */
export interface TemplateRecordStore {
  /** Inserts or replaces the template's record. */
  putTemplate(record: TemplateRecord): Promise<void>;
  getTemplate(templateId: string): Promise<TemplateRecord | undefined>;
  /** Sorted by id. */
  listTemplates(): Promise<TemplateRecord[]>;
  /** Whether there was one. */
  deleteTemplate(templateId: string): Promise<boolean>;
  /**
   * A number every put and delete changes, made by this process or another on the same
   * database (`./cubicle template import` beside a server): one indexed read tells a cache
   * whether the templates changed.
   */
  templatesVersion(): Promise<number>;
}

/** One egress audit record as stored: its sequence number, sandbox and time, the rest as JSON. */
export interface EgressAuditRow {
  seq: number;
  sandboxId: string;
  /** Epoch ms (the record's `time`). */
  time: number;
  body: string;
}

/** What one flush of the egress audit log changes, applied in one transaction. */
export interface EgressAuditChange {
  /** Rows written or rewritten (a connection's bytes grow after it was first written). */
  upserts: EgressAuditRow[];
  /** Per sandbox, rows with a smaller seq go (the log dropped them; MAX_SAFE_INTEGER: all). */
  dropBefore: { sandboxId: string; seq: number }[];
  /** Rows older than this (epoch ms) go: the retention. */
  dropOlderThan: number;
  /** The Prometheus counters' values now (name → value), when they changed since the last write. */
  counters?: Record<string, number>;
}

/**
 * Where the egress audit log keeps its records across restarts (the SQLite store). Synchronous:
 * a flush is one short transaction, run from a timer.
 */
export interface EgressAuditStore {
  writeEgressAudit(change: EgressAuditChange): void;
  /** The newest `limit` rows with time ≥ `since`, in seq order. */
  loadEgressAudit(since: number, limit: number): EgressAuditRow[];
  /** The counters as last written (none: {}). */
  loadEgressCounters(): Record<string, number>;
}

export interface EventRecord {
  sandboxId: string;
  at: number;
  kind: string;
  detail?: Record<string, unknown>;
}

/**
 * The data-access layer. SQLite by default; PostgreSQL later behind the same interface,
 * so methods are async even where SQLite answers synchronously.
 */
/** A permission level of a codebase path (AgentFense's): invisible, listed only, readable, writable. */
export type CodebaseLevel = "none" | "view" | "read" | "write";

/** A registered codebase (CODEBASES_NOTE): a host directory or a volume. */
export interface CodebaseRecord {
  codebaseId: string;
  name: string;
  source: { kind: "host"; path: string } | { kind: "volume"; volumeId: string };
  createdAt: number;
}

/** A codebase mounted in a sandbox at `path` with its permission table. */
export interface CodebaseMount {
  codebaseId: string;
  name: string;
  /** The codebase's directory on the host when it was mounted (a host path, or its volume's). */
  sourceDir: string;
  path: string;
  rules: { pattern: string; level: CodebaseLevel }[];
  defaultLevel: CodebaseLevel;
}

/** Codebase records (SqliteStore implements it beside Store). */
export interface CodebaseStore {
  /** Throws already_exists when the name is taken. */
  insertCodebase(record: CodebaseRecord): Promise<void>;
  listCodebases(): Promise<CodebaseRecord[]>;
  deleteCodebase(codebaseId: string): Promise<boolean>;
}

/** A volume mounted in a sandbox at `path`. */
export interface VolumeMount {
  volumeId: string;
  name: string;
  path: string;
}

/** A persistent volume (E2B `/volumes`): a btrfs subvolume with a qgroup limit (VOLUMES_NOTE). */
export interface VolumeRecord {
  volumeId: string;
  /** Unique on this server. */
  name: string;
  /** The bearer token of its content API (`/volumecontent/{volumeID}/…`). */
  token: string;
  /** Its quota (kernel-enforced). */
  sizeMB: number;
  createdAt: number;
}

/** Volume records (SqliteStore implements it beside Store). */
export interface VolumeStore {
  /** Throws already_exists when the name is taken. */
  insertVolume(record: VolumeRecord): Promise<void>;
  listVolumes(): Promise<VolumeRecord[]>;
  getVolume(volumeId: string): Promise<VolumeRecord | undefined>;
  deleteVolume(volumeId: string): Promise<boolean>;
}

export interface Store {
  insertSandbox(record: SandboxRecord): Promise<void>;
  updateSandbox(sandboxId: string, patch: Partial<Omit<SandboxRecord, "sandboxId">>): Promise<void>;
  getSandbox(sandboxId: string): Promise<SandboxRecord | undefined>;
  querySandboxes(query: SandboxQuery): Promise<SandboxRecord[]>;
  recordEvent(event: EventRecord): Promise<void>;
  listEvents(sandboxId: string): Promise<EventRecord[]>;
  /** Inserts a snapshot; its names are taken away from any older snapshot holding them. */
  insertSnapshot(record: SnapshotRecord): Promise<void>;
  getSnapshot(snapshotId: string): Promise<SnapshotRecord | undefined>;
  /** By id, or the newest snapshot holding that name. */
  findSnapshot(idOrName: string): Promise<SnapshotRecord | undefined>;
  /** Newest first; hidden snapshots are left out. */
  querySnapshots(query: SnapshotQuery): Promise<SnapshotRecord[]>;
  /** Every snapshot including hidden ones (recovery). */
  allSnapshots(): Promise<SnapshotRecord[]>;
  deleteSnapshot(snapshotId: string): Promise<boolean>;
  insertPoolEntry(entry: PoolEntryRecord): Promise<void>;
  deletePoolEntry(runtimeId: string): Promise<void>;
  /**
   * Records a sandbox made from a pool entry: inserts it and deletes the pool row of its
   * runtime id in one transaction, so a crash never finds the container owned twice or not at all.
   */
  claimPoolEntry(record: SandboxRecord): Promise<void>;
  listPoolEntries(): Promise<PoolEntryRecord[]>;
  /** Inserts a secret; a taken name is an `already_exists` CubicleError. */
  insertSecret(record: SecretRecord): Promise<void>;
  /** Stores a secret's new value as version + 1; undefined when there is no such secret. */
  updateSecretValue(secretId: string, update: SecretValueUpdate): Promise<SecretRecord | undefined>;
  /** Oldest first (createdAt, secretId), so pages stay stable while secrets are added. */
  querySecrets(query: SecretQuery): Promise<SecretRecord[]>;
  deleteSecret(secretId: string): Promise<boolean>;
  /** True when a sandbox record or pool entry of this store uses the runtime id. */
  knowsRuntimeId(runtimeId: string): Promise<boolean>;
  close(): Promise<void>;
}
