export type { Store, SandboxRecord, SandboxState, SandboxQuery, EventRecord, PauseInfo, SnapshotRecord, SnapshotQuery, PoolEntryRecord, SecretRecord, SecretValueUpdate, SecretQuery, TemplateBuildRecord, TemplateBuildStore, BuildLogEntry, EgressAuditStore, EgressAuditRow, EgressAuditChange, VolumeMount, VolumeRecord, VolumeStore, CodebaseLevel, CodebaseMount, CodebaseRecord, CodebaseStore } from "./types.js";
export { runtimeIdOf } from "./types.js";
export { SqliteStore } from "./sqlite-store.js";

/** The store's file in a state directory (the server's, and the CLI's beside it). */
export function storeFile(stateDir: string): string {
  return `${stateDir.replace(/\/+$/, "")}/cubicle.db`;
}
