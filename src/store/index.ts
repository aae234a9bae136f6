export type { Store, SandboxRecord, SandboxState, SandboxQuery, EventRecord } from "./types.js";
export { SqliteStore } from "./sqlite-store.js";
