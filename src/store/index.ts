export type { Store, SandboxRecord, SandboxState, SandboxQuery, EventRecord, PauseInfo, SnapshotRecord, SnapshotQuery, PoolEntryRecord, SecretRecord, SecretValueUpdate, SecretQuery, TemplateBuildRecord, TemplateBuildStore, BuildLogEntry } from "./types.js";
export { runtimeIdOf } from "./types.js";
export { SqliteStore } from "./sqlite-store.js";
