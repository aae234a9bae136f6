import fs from "node:fs";
import Database from "better-sqlite3";
import { CubicleError } from "../shared/cubicle-error.js";
import { sandboxFromBody, snapshotFromBody } from "./legacy-records.js";
import type {
  EgressAuditChange,
  EgressAuditRow,
  EgressAuditStore,
  EventRecord,
  PoolEntryRecord,
  SandboxQuery,
  SandboxRecord,
  SecretQuery,
  SecretRecord,
  SecretValueUpdate,
  SnapshotQuery,
  SnapshotRecord,
  Store,
  TemplateBuildRecord,
  VolumeRecord,
  VolumeStore,
  CodebaseRecord,
  CodebaseStore,
  TemplateBuildStore,
  TemplateRecord,
  TemplateRecordStore,
} from "./types.js";

const schema = `
CREATE TABLE IF NOT EXISTS sandboxes (
  sandbox_id TEXT PRIMARY KEY,
  template_id TEXT NOT NULL,
  state TEXT NOT NULL,
  started_at INTEGER NOT NULL,
  end_at INTEGER NOT NULL,
  body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sandboxes_state_started ON sandboxes (state, started_at);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  sandbox_id TEXT NOT NULL,
  at INTEGER NOT NULL,
  kind TEXT NOT NULL,
  detail TEXT
);
CREATE INDEX IF NOT EXISTS events_sandbox ON events (sandbox_id, at);
CREATE TABLE IF NOT EXISTS snapshots (
  snapshot_id TEXT PRIMARY KEY,
  source_sandbox_id TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  hidden INTEGER NOT NULL DEFAULT 0,
  body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_source ON snapshots (source_sandbox_id, created_at);
CREATE TABLE IF NOT EXISTS snapshot_names (
  name TEXT PRIMARY KEY,
  snapshot_id TEXT NOT NULL REFERENCES snapshots (snapshot_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS snapshot_names_snapshot ON snapshot_names (snapshot_id);
CREATE TABLE IF NOT EXISTS pool_entries (
  runtime_id TEXT PRIMARY KEY,
  template_id TEXT NOT NULL,
  body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
  secret_id TEXT PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  current_version INTEGER NOT NULL,
  iv BLOB NOT NULL,
  ciphertext BLOB NOT NULL,
  auth_tag BLOB NOT NULL,
  metadata TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS secrets_created ON secrets (created_at, secret_id);
CREATE TABLE IF NOT EXISTS template_builds (
  build_id TEXT PRIMARY KEY,
  template_id TEXT NOT NULL,
  status TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS template_builds_template ON template_builds (template_id, created_at);
CREATE TABLE IF NOT EXISTS templates (
  template_id TEXT PRIMARY KEY,
  source TEXT NOT NULL,
  body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS template_changes (
  one INTEGER PRIMARY KEY CHECK (one = 1),
  version INTEGER NOT NULL
);
INSERT OR IGNORE INTO template_changes (one, version) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS egress_audit (
  seq INTEGER PRIMARY KEY,
  sandbox_id TEXT NOT NULL,
  time INTEGER NOT NULL,
  body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS egress_audit_sandbox ON egress_audit (sandbox_id, seq);
CREATE INDEX IF NOT EXISTS egress_audit_time ON egress_audit (time);
CREATE TABLE IF NOT EXISTS egress_counters (
  name TEXT PRIMARY KEY,
  value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS codebases (
  codebase_id TEXT PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  created_at INTEGER NOT NULL,
  body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
  volume_id TEXT PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  created_at INTEGER NOT NULL,
  body TEXT NOT NULL
);
`;

interface SandboxRow {
  body: string;
}

/** The tables of named records: (id, unique name, created_at, body). */
const NAMED_TABLES = {
  volumes: { name: "volumes", idColumn: "volume_id", noun: "volume" },
  codebases: { name: "codebases", idColumn: "codebase_id", noun: "codebase" },
} as const;
type NamedTable = (typeof NAMED_TABLES)[keyof typeof NAMED_TABLES];

interface SecretRow {
  secret_id: string;
  name: string;
  current_version: number;
  iv: Buffer;
  ciphertext: Buffer;
  auth_tag: Buffer;
  metadata: string;
  created_at: number;
  updated_at: number;
}

/**
 * SQLite store: one file in the state directory, WAL mode. Columns that queries filter on
 * are real columns; the rest of the record is a JSON body.
 */
export class SqliteStore implements Store, TemplateBuildStore, TemplateRecordStore, EgressAuditStore, VolumeStore, CodebaseStore {
  private readonly db: Database.Database;
  private readonly insertStmt: Database.Statement;
  private readonly updateStmt: Database.Statement;
  private readonly getStmt: Database.Statement;
  private readonly eventStmt: Database.Statement;
  private readonly deletePoolStmt: Database.Statement;

  constructor(file: string) {
    ownerOnly(file);
    this.db = new Database(file);
    this.db.pragma("journal_mode = WAL");
    this.db.pragma("synchronous = NORMAL");
    this.db.pragma("foreign_keys = ON");
    this.db.exec(schema);
    // Added with warm pools: the runtime id a pooled sandbox keeps after its claim.
    const columns = this.db.prepare("PRAGMA table_info(sandboxes)").all() as { name: string }[];
    if (!columns.some((c) => c.name === "runtime_id")) this.db.exec("ALTER TABLE sandboxes ADD COLUMN runtime_id TEXT");
    this.db.exec("CREATE INDEX IF NOT EXISTS sandboxes_runtime ON sandboxes (runtime_id)");
    this.insertStmt = this.db.prepare(
      "INSERT INTO sandboxes (sandbox_id, template_id, state, started_at, end_at, runtime_id, body) VALUES (@sandboxId, @templateId, @state, @startedAt, @endAt, @runtimeId, @body)",
    );
    this.updateStmt = this.db.prepare(
      "UPDATE sandboxes SET template_id = @templateId, state = @state, started_at = @startedAt, end_at = @endAt, runtime_id = @runtimeId, body = @body WHERE sandbox_id = @sandboxId",
    );
    this.getStmt = this.db.prepare("SELECT body FROM sandboxes WHERE sandbox_id = ?");
    this.eventStmt = this.db.prepare("INSERT INTO events (sandbox_id, at, kind, detail) VALUES (?, ?, ?, ?)");
    this.deletePoolStmt = this.db.prepare("DELETE FROM pool_entries WHERE runtime_id = ?");
  }

  async insertSandbox(record: SandboxRecord): Promise<void> {
    this.insertStmt.run(toRow(record));
  }

  async updateSandbox(sandboxId: string, patch: Partial<Omit<SandboxRecord, "sandboxId">>): Promise<void> {
    const update = this.db.transaction(() => {
      const current = this.readSandbox(sandboxId);
      if (!current) return;
      this.updateStmt.run(toRow({ ...current, ...patch, sandboxId }));
    });
    update();
  }

  async getSandbox(sandboxId: string): Promise<SandboxRecord | undefined> {
    return this.readSandbox(sandboxId);
  }

  async querySandboxes(query: SandboxQuery): Promise<SandboxRecord[]> {
    const where: string[] = [];
    const params: unknown[] = [];
    if (query.states?.length) {
      where.push(`state IN (${query.states.map(() => "?").join(",")})`);
      params.push(...query.states);
    }
    if (query.templateIds?.length) {
      where.push(`template_id IN (${query.templateIds.map(() => "?").join(",")})`);
      params.push(...query.templateIds);
    }
    if (query.startedAfter !== undefined) {
      where.push("started_at >= ?");
      params.push(query.startedAfter);
    }
    const order = query.order === "asc" ? "ASC" : "DESC";
    if (query.after) {
      const cmp = order === "ASC" ? ">" : "<";
      where.push(`(started_at ${cmp} ? OR (started_at = ? AND sandbox_id ${cmp} ?))`);
      params.push(query.after.startedAt, query.after.startedAt, query.after.sandboxId);
    }
    const sql = `SELECT body FROM sandboxes ${where.length ? "WHERE " + where.join(" AND ") : ""} ORDER BY started_at ${order}, sandbox_id ${order}`;
    const rows = this.db.prepare(sql).all(...params) as SandboxRow[];
    const records: SandboxRecord[] = [];
    for (const row of rows) {
      const record = sandboxFromBody(row.body);
      if (query.metadata && !matchesMetadata(record.metadata, query.metadata)) continue;
      records.push(record);
      if (query.limit !== undefined && records.length >= query.limit) break;
    }
    return records;
  }

  async recordEvent(event: EventRecord): Promise<void> {
    this.eventStmt.run(event.sandboxId, event.at, event.kind, event.detail ? JSON.stringify(event.detail) : null);
  }

  async listEvents(sandboxId: string): Promise<EventRecord[]> {
    const rows = this.db
      .prepare("SELECT sandbox_id, at, kind, detail FROM events WHERE sandbox_id = ? ORDER BY at, id")
      .all(sandboxId) as { sandbox_id: string; at: number; kind: string; detail: string | null }[];
    return rows.map((row) => ({
      sandboxId: row.sandbox_id,
      at: row.at,
      kind: row.kind,
      detail: row.detail ? (JSON.parse(row.detail) as Record<string, unknown>) : undefined,
    }));
  }

  async insertSnapshot(record: SnapshotRecord): Promise<void> {
    const insert = this.db.transaction(() => {
      for (const name of record.names) {
        const previous = this.db.prepare("SELECT snapshot_id FROM snapshot_names WHERE name = ?").get(name) as { snapshot_id: string } | undefined;
        if (previous) this.rewriteSnapshotNames(previous.snapshot_id, (names) => names.filter((n) => n !== name));
      }
      this.db
        .prepare("INSERT INTO snapshots (snapshot_id, source_sandbox_id, created_at, hidden, body) VALUES (?, ?, ?, ?, ?)")
        .run(record.snapshotId, record.sourceSandboxId, record.createdAt, record.hidden ? 1 : 0, JSON.stringify(record));
      for (const name of record.names) this.db.prepare("INSERT OR REPLACE INTO snapshot_names (name, snapshot_id) VALUES (?, ?)").run(name, record.snapshotId);
    });
    insert();
  }

  async getSnapshot(snapshotId: string): Promise<SnapshotRecord | undefined> {
    const row = this.db.prepare("SELECT body FROM snapshots WHERE snapshot_id = ?").get(snapshotId) as SandboxRow | undefined;
    return row ? snapshotFromBody(row.body) : undefined;
  }

  async findSnapshot(idOrName: string): Promise<SnapshotRecord | undefined> {
    const byId = await this.getSnapshot(idOrName);
    if (byId) return byId;
    const named = this.db.prepare("SELECT snapshot_id FROM snapshot_names WHERE name = ?").get(idOrName) as { snapshot_id: string } | undefined;
    return named ? this.getSnapshot(named.snapshot_id) : undefined;
  }

  async querySnapshots(query: SnapshotQuery): Promise<SnapshotRecord[]> {
    const where = ["hidden = 0"];
    const params: unknown[] = [];
    if (query.sourceSandboxId !== undefined) {
      where.push("source_sandbox_id = ?");
      params.push(query.sourceSandboxId);
    }
    if (query.name !== undefined) {
      where.push("(snapshot_id = ? OR snapshot_id IN (SELECT snapshot_id FROM snapshot_names WHERE name = ?))");
      params.push(query.name, query.name);
    }
    if (query.after) {
      where.push("(created_at < ? OR (created_at = ? AND snapshot_id < ?))");
      params.push(query.after.createdAt, query.after.createdAt, query.after.snapshotId);
    }
    const limit = query.limit === undefined ? "" : ` LIMIT ${Math.max(0, Math.floor(query.limit))}`;
    const rows = this.db
      .prepare(`SELECT body FROM snapshots WHERE ${where.join(" AND ")} ORDER BY created_at DESC, snapshot_id DESC${limit}`)
      .all(...params) as SandboxRow[];
    return rows.map((row) => snapshotFromBody(row.body));
  }

  async allSnapshots(): Promise<SnapshotRecord[]> {
    const rows = this.db.prepare("SELECT body FROM snapshots ORDER BY created_at").all() as SandboxRow[];
    return rows.map((row) => snapshotFromBody(row.body));
  }

  async deleteSnapshot(snapshotId: string): Promise<boolean> {
    return this.db.prepare("DELETE FROM snapshots WHERE snapshot_id = ?").run(snapshotId).changes > 0;
  }

  async insertPoolEntry(entry: PoolEntryRecord): Promise<void> {
    this.db.prepare("INSERT OR REPLACE INTO pool_entries (runtime_id, template_id, body) VALUES (?, ?, ?)").run(entry.runtimeId, entry.templateId, JSON.stringify(entry));
  }

  async deletePoolEntry(runtimeId: string): Promise<void> {
    this.deletePoolStmt.run(runtimeId);
  }

  async claimPoolEntry(record: SandboxRecord): Promise<void> {
    const claim = this.db.transaction(() => {
      this.insertStmt.run(toRow(record));
      this.deletePoolStmt.run(record.runtimeId ?? record.sandboxId);
    });
    claim();
  }

  async listPoolEntries(): Promise<PoolEntryRecord[]> {
    const rows = this.db.prepare("SELECT body FROM pool_entries ORDER BY runtime_id").all() as SandboxRow[];
    return rows.map((row) => JSON.parse(row.body) as PoolEntryRecord);
  }

  async insertSecret(record: SecretRecord): Promise<void> {
    try {
      this.db
        .prepare(
          "INSERT INTO secrets (secret_id, name, current_version, iv, ciphertext, auth_tag, metadata, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .run(record.secretId, record.name, record.currentVersion, record.iv, record.ciphertext, record.authTag, JSON.stringify(record.metadata), record.createdAt, record.updatedAt);
    } catch (err) {
      if ((err as { code?: unknown }).code === "SQLITE_CONSTRAINT_UNIQUE" && /secrets\.name/.test(String((err as Error).message))) {
        throw new CubicleError("already_exists", `a secret named "${record.name}" already exists: update it, or delete it first`, { cause: err });
      }
      throw err;
    }
  }

  async updateSecretValue(secretId: string, update: SecretValueUpdate): Promise<SecretRecord | undefined> {
    const row = this.db
      .prepare(
        "UPDATE secrets SET current_version = current_version + 1, iv = ?, ciphertext = ?, auth_tag = ?, metadata = COALESCE(?, metadata), updated_at = ? WHERE secret_id = ? RETURNING *",
      )
      .get(update.iv, update.ciphertext, update.authTag, update.metadata === undefined ? null : JSON.stringify(update.metadata), update.updatedAt, secretId) as SecretRow | undefined;
    return row && secretFromRow(row);
  }

  async querySecrets(query: SecretQuery): Promise<SecretRecord[]> {
    const where = query.after ? "WHERE created_at > ? OR (created_at = ? AND secret_id > ?)" : "";
    const params = query.after ? [query.after.createdAt, query.after.createdAt, query.after.secretId] : [];
    const limit = query.limit === undefined ? "" : ` LIMIT ${Math.max(0, Math.floor(query.limit))}`;
    const rows = this.db.prepare(`SELECT * FROM secrets ${where} ORDER BY created_at, secret_id${limit}`).all(...params) as SecretRow[];
    return rows.map(secretFromRow);
  }

  async deleteSecret(secretId: string): Promise<boolean> {
    return this.db.prepare("DELETE FROM secrets WHERE secret_id = ?").run(secretId).changes > 0;
  }

  async insertVolume(record: VolumeRecord): Promise<void> {
    this.insertNamed(NAMED_TABLES.volumes, record.volumeId, record);
  }

  async listVolumes(): Promise<VolumeRecord[]> {
    return this.listNamed(NAMED_TABLES.volumes);
  }

  async getVolume(volumeId: string): Promise<VolumeRecord | undefined> {
    const row = this.db.prepare("SELECT body FROM volumes WHERE volume_id = ?").get(volumeId) as SandboxRow | undefined;
    return row ? (JSON.parse(row.body) as VolumeRecord) : undefined;
  }

  async deleteVolume(volumeId: string): Promise<boolean> {
    return this.db.prepare("DELETE FROM volumes WHERE volume_id = ?").run(volumeId).changes > 0;
  }

  async insertCodebase(record: CodebaseRecord): Promise<void> {
    this.insertNamed(NAMED_TABLES.codebases, record.codebaseId, record);
  }

  async listCodebases(): Promise<CodebaseRecord[]> {
    return this.listNamed(NAMED_TABLES.codebases);
  }

  async deleteCodebase(codebaseId: string): Promise<boolean> {
    return this.db.prepare("DELETE FROM codebases WHERE codebase_id = ?").run(codebaseId).changes > 0;
  }

  /** A row of a table of named records (volumes, codebases); a taken name is already_exists. */
  private insertNamed(table: NamedTable, id: string, record: { name: string; createdAt: number }): void {
    try {
      this.db.prepare(`INSERT INTO ${table.name} (${table.idColumn}, name, created_at, body) VALUES (?, ?, ?, ?)`).run(id, record.name, record.createdAt, JSON.stringify(record));
    } catch (err) {
      if ((err as { code?: unknown }).code === "SQLITE_CONSTRAINT_UNIQUE" && String((err as Error).message).includes(`${table.name}.name`)) {
        throw new CubicleError("already_exists", `a ${table.noun} named "${record.name}" already exists`, { cause: err });
      }
      throw err;
    }
  }

  private listNamed<T>(table: NamedTable): T[] {
    const rows = this.db.prepare(`SELECT body FROM ${table.name} ORDER BY created_at, ${table.idColumn}`).all() as SandboxRow[];
    return rows.map((row) => JSON.parse(row.body) as T);
  }

  async putTemplate(record: TemplateRecord): Promise<void> {
    this.db.transaction(() => {
      this.db.prepare("INSERT OR REPLACE INTO templates (template_id, source, body) VALUES (?, ?, ?)").run(record.templateId, record.source, JSON.stringify(record));
      this.db.prepare("UPDATE template_changes SET version = version + 1 WHERE one = 1").run();
    })();
  }

  async getTemplate(templateId: string): Promise<TemplateRecord | undefined> {
    const row = this.db.prepare("SELECT body FROM templates WHERE template_id = ?").get(templateId) as SandboxRow | undefined;
    return row ? (JSON.parse(row.body) as TemplateRecord) : undefined;
  }

  async listTemplates(): Promise<TemplateRecord[]> {
    const rows = this.db.prepare("SELECT body FROM templates ORDER BY template_id").all() as SandboxRow[];
    return rows.map((row) => JSON.parse(row.body) as TemplateRecord);
  }

  async deleteTemplate(templateId: string): Promise<boolean> {
    return this.db.transaction(() => {
      const deleted = this.db.prepare("DELETE FROM templates WHERE template_id = ?").run(templateId).changes > 0;
      if (deleted) this.db.prepare("UPDATE template_changes SET version = version + 1 WHERE one = 1").run();
      return deleted;
    })();
  }

  async templatesVersion(): Promise<number> {
    return (this.db.prepare("SELECT version FROM template_changes WHERE one = 1").get() as { version: number }).version;
  }

  async putTemplateBuild(record: TemplateBuildRecord): Promise<void> {
    this.db
      .prepare("INSERT OR REPLACE INTO template_builds (build_id, template_id, status, created_at, body) VALUES (?, ?, ?, ?, ?)")
      .run(record.buildId, record.templateId, record.status, record.createdAt, JSON.stringify(record));
  }

  async getTemplateBuild(buildId: string): Promise<TemplateBuildRecord | undefined> {
    const row = this.db.prepare("SELECT body FROM template_builds WHERE build_id = ?").get(buildId) as SandboxRow | undefined;
    return row ? (JSON.parse(row.body) as TemplateBuildRecord) : undefined;
  }

  async listTemplateBuilds(templateId: string): Promise<TemplateBuildRecord[]> {
    const rows = this.db.prepare("SELECT body FROM template_builds WHERE template_id = ? ORDER BY created_at DESC, build_id DESC").all(templateId) as SandboxRow[];
    return rows.map((row) => JSON.parse(row.body) as TemplateBuildRecord);
  }

  async deleteTemplateBuilds(templateId: string): Promise<void> {
    this.db.prepare("DELETE FROM template_builds WHERE template_id = ?").run(templateId);
  }

  async unfinishedTemplateBuilds(): Promise<TemplateBuildRecord[]> {
    const rows = this.db.prepare("SELECT body FROM template_builds WHERE status IN ('waiting', 'building') ORDER BY created_at").all() as SandboxRow[];
    return rows.map((row) => JSON.parse(row.body) as TemplateBuildRecord);
  }

  writeEgressAudit(change: EgressAuditChange): void {
    const upsert = this.db.prepare("INSERT OR REPLACE INTO egress_audit (seq, sandbox_id, time, body) VALUES (?, ?, ?, ?)");
    const dropBefore = this.db.prepare("DELETE FROM egress_audit WHERE sandbox_id = ? AND seq < ?");
    this.db.transaction(() => {
      for (const row of change.upserts) upsert.run(row.seq, row.sandboxId, Math.floor(row.time), row.body);
      for (const drop of change.dropBefore) dropBefore.run(drop.sandboxId, drop.seq);
      this.db.prepare("DELETE FROM egress_audit WHERE time < ?").run(Math.floor(change.dropOlderThan));
      if (change.counters) {
        const counter = this.db.prepare("INSERT OR REPLACE INTO egress_counters (name, value) VALUES (?, ?)");
        for (const [name, value] of Object.entries(change.counters)) counter.run(name, Math.floor(value));
      }
    })();
  }

  loadEgressCounters(): Record<string, number> {
    const rows = this.db.prepare("SELECT name, value FROM egress_counters").all() as { name: string; value: number }[];
    return Object.fromEntries(rows.map((row) => [row.name, row.value]));
  }

  loadEgressAudit(since: number, limit: number): EgressAuditRow[] {
    const rows = this.db
      .prepare("SELECT seq, sandbox_id AS sandboxId, time, body FROM egress_audit WHERE time >= ? ORDER BY seq DESC LIMIT ?")
      .all(Math.floor(since), Math.max(0, Math.floor(limit))) as EgressAuditRow[];
    return rows.reverse();
  }

  async knowsRuntimeId(runtimeId: string): Promise<boolean> {
    const row = this.db
      .prepare(
        "SELECT 1 FROM sandboxes WHERE sandbox_id = ? OR runtime_id = ? UNION ALL SELECT 1 FROM pool_entries WHERE runtime_id = ? LIMIT 1",
      )
      .get(runtimeId, runtimeId, runtimeId);
    return row !== undefined;
  }

  private rewriteSnapshotNames(snapshotId: string, change: (names: string[]) => string[]): void {
    const row = this.db.prepare("SELECT body FROM snapshots WHERE snapshot_id = ?").get(snapshotId) as SandboxRow | undefined;
    if (!row) return;
    const record = snapshotFromBody(row.body);
    record.names = change(record.names);
    this.db.prepare("UPDATE snapshots SET body = ? WHERE snapshot_id = ?").run(JSON.stringify(record), snapshotId);
  }

  async close(): Promise<void> {
    this.db.close();
  }

  private readSandbox(sandboxId: string): SandboxRecord | undefined {
    const row = this.getStmt.get(sandboxId) as SandboxRow | undefined;
    return row ? sandboxFromBody(row.body) : undefined;
  }
}

function toRow(record: SandboxRecord) {
  return {
    sandboxId: record.sandboxId,
    templateId: record.templateId,
    state: record.state,
    startedAt: record.startedAt,
    endAt: record.endAt,
    runtimeId: record.runtimeId ?? record.sandboxId,
    body: JSON.stringify(record),
  };
}

function secretFromRow(row: SecretRow): SecretRecord {
  return {
    secretId: row.secret_id,
    name: row.name,
    currentVersion: row.current_version,
    iv: row.iv,
    ciphertext: row.ciphertext,
    authTag: row.auth_tag,
    metadata: JSON.parse(row.metadata) as Record<string, string>,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
  };
}

function matchesMetadata(actual: Record<string, string>, wanted: Record<string, string>): boolean {
  return Object.entries(wanted).every(([key, value]) => actual[key] === value);
}

/**
 * The database holds access tokens and the env vars given at create: readable by host root only.
 * A new file is created 0600 here, before SQLite opens it (SQLite gives its -wal and -shm files
 * the database file's mode); files of an older install are tightened.
 */
function ownerOnly(file: string): void {
  if (file === ":memory:") return;
  fs.closeSync(fs.openSync(file, fs.constants.O_CREAT | fs.constants.O_RDWR, 0o600));
  for (const name of [file, `${file}-wal`, `${file}-shm`]) {
    try {
      if ((fs.statSync(name).mode & 0o077) !== 0) fs.chmodSync(name, 0o600);
    } catch {
      // -wal and -shm exist only while the database is open
    }
  }
}
