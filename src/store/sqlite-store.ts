import Database from "better-sqlite3";
import type { EventRecord, SandboxQuery, SandboxRecord, Store } from "./types.js";

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
`;

interface SandboxRow {
  body: string;
}

/**
 * SQLite store: one file in the state directory, WAL mode. Columns that queries filter on
 * are real columns; the rest of the record is a JSON body.
 */
export class SqliteStore implements Store {
  private readonly db: Database.Database;
  private readonly insertStmt: Database.Statement;
  private readonly updateStmt: Database.Statement;
  private readonly getStmt: Database.Statement;
  private readonly eventStmt: Database.Statement;

  constructor(file: string) {
    this.db = new Database(file);
    this.db.pragma("journal_mode = WAL");
    this.db.pragma("synchronous = NORMAL");
    this.db.exec(schema);
    this.insertStmt = this.db.prepare(
      "INSERT INTO sandboxes (sandbox_id, template_id, state, started_at, end_at, body) VALUES (@sandboxId, @templateId, @state, @startedAt, @endAt, @body)",
    );
    this.updateStmt = this.db.prepare(
      "UPDATE sandboxes SET template_id = @templateId, state = @state, started_at = @startedAt, end_at = @endAt, body = @body WHERE sandbox_id = @sandboxId",
    );
    this.getStmt = this.db.prepare("SELECT body FROM sandboxes WHERE sandbox_id = ?");
    this.eventStmt = this.db.prepare("INSERT INTO events (sandbox_id, at, kind, detail) VALUES (?, ?, ?, ?)");
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
      const record = JSON.parse(row.body) as SandboxRecord;
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

  async close(): Promise<void> {
    this.db.close();
  }

  private readSandbox(sandboxId: string): SandboxRecord | undefined {
    const row = this.getStmt.get(sandboxId) as SandboxRow | undefined;
    return row ? (JSON.parse(row.body) as SandboxRecord) : undefined;
  }
}

function toRow(record: SandboxRecord) {
  return {
    sandboxId: record.sandboxId,
    templateId: record.templateId,
    state: record.state,
    startedAt: record.startedAt,
    endAt: record.endAt,
    body: JSON.stringify(record),
  };
}

function matchesMetadata(actual: Record<string, string>, wanted: Record<string, string>): boolean {
  return Object.entries(wanted).every(([key, value]) => actual[key] === value);
}
