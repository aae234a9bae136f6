import type { apiSchema } from "../protocol/index.js";
import type { SandboxRecord, SnapshotRecord } from "../store/types.js";

/**
 * envd version Cubicle's agent claims. Clients switch features on it (protocol doc §3.4):
 * 0.6.4 = metadata, octet-stream/gzip uploads, watch includeEntry/allowNetworkMounts.
 */
export const ENVD_VERSION = "0.6.4";

export interface ViewContext {
  domain: string;
}

/** The identity fields every sandbox object starts with. */
function identityFields(record: SandboxRecord) {
  return {
    templateID: record.templateId,
    sandboxID: record.sandboxId,
    clientID: record.clientId,
    envdVersion: ENVD_VERSION,
    ...(record.alias ? { alias: record.alias } : {}),
  };
}

/** The `Sandbox` object of create, connect and fork results. */
export function sandboxView(record: SandboxRecord, ctx: ViewContext): apiSchema.Sandbox {
  return {
    ...identityFields(record),
    ...(record.envdAccessToken ? { envdAccessToken: record.envdAccessToken } : {}),
    trafficAccessToken: record.trafficAccessToken ?? null,
    domain: ctx.domain,
  };
}

/**
 * Cubicle's extension of getInfo and list: `runtime` (`"container"` or `"microvm"`) always;
 * `cubicleIdle` is `"frozen"` or `"disk"` while a running sandbox sleeps for idleness
 * (core/lifecycle/idle.ts), absent when it is awake. The E2B SDKs read the fields they know and
 * ignore these.
 */
export type CubicleSandboxFields = { cubicleIdle?: "frozen" | "disk"; runtime?: "container" | "microvm" };

/** `ListedSandbox`: the detail fields without tokens, domain, network and lifecycle. */
export function listedSandboxView(record: SandboxRecord): apiSchema.ListedSandbox & CubicleSandboxFields {
  return {
    ...identityFields(record),
    startedAt: new Date(record.startedAt).toISOString(),
    endAt: new Date(record.endAt).toISOString(),
    cpuCount: record.cpuCount,
    memoryMB: record.memoryMB,
    diskSizeMB: record.diskSizeMB,
    state: record.state === "paused" ? "paused" : "running",
    metadata: record.metadata,
    // Cubicle extension: the runtime the sandbox runs on.
    runtime: record.runtime ?? "container",
    ...(record.state === "running" && record.idle ? { cubicleIdle: record.idle.tier } : {}),
  };
}

/** `SandboxDetail` of `GET /sandboxes/{id}`. */
export function sandboxDetailView(record: SandboxRecord, ctx: ViewContext): apiSchema.SandboxDetail & CubicleSandboxFields {
  return {
    ...listedSandboxView(record),
    ...(record.envdAccessToken ? { envdAccessToken: record.envdAccessToken } : {}),
    domain: ctx.domain,
    allowInternetAccess: record.allowInternetAccess,
    ...(record.networkConfig ? { network: record.networkConfig } : {}),
    lifecycle: record.lifecycle,
  };
}

/** `SnapshotInfo`: the id and the names that `Sandbox.create` accepts as `templateID`. */
export function snapshotView(snapshot: SnapshotRecord): apiSchema.SnapshotInfo {
  return { snapshotID: snapshot.snapshotId, names: snapshot.names };
}
