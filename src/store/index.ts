export type { Store, SandboxRecord, SandboxState, SandboxQuery, EventRecord, PauseInfo, SnapshotRecord, SnapshotQuery, PoolEntryRecord } from "./types.js";
export { runtimeIdOf } from "./types.js";
export { SqliteStore } from "./sqlite-store.js";
