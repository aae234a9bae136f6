import type { SandboxNetwork } from "../network/types.js";

/** The lifecycle states a sandbox record can be in. `killed` and `dead` are terminal. */
export type SandboxState = "starting" | "running" | "paused" | "killed" | "dead";

/** A sandbox as the store keeps it: everything needed to serve the API and to recover after a restart. */
export interface SandboxRecord {
  sandboxId: string;
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
  /** Why it ended (killed, timeout, vanished …), for terminal states. */
  endReason: string | undefined;
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
export interface Store {
  insertSandbox(record: SandboxRecord): Promise<void>;
  updateSandbox(sandboxId: string, patch: Partial<Omit<SandboxRecord, "sandboxId">>): Promise<void>;
  getSandbox(sandboxId: string): Promise<SandboxRecord | undefined>;
  querySandboxes(query: SandboxQuery): Promise<SandboxRecord[]>;
  recordEvent(event: EventRecord): Promise<void>;
  listEvents(sandboxId: string): Promise<EventRecord[]>;
  close(): Promise<void>;
}
