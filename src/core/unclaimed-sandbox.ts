import type { NetworkManager } from "../network/types.js";
import type { Runtime } from "../runtime/types.js";
import { createLogger } from "../shared/log.js";
import type { PoolEntryRecord, Store } from "../store/types.js";
import { agentReadyTimeoutMs, type AgentLink } from "../protocol/index.js";
import { newSandboxId } from "./ids.js";
import type { StartQueue } from "./start-queue.js";
import type { TemplateInfo } from "./types.js";

const log = createLogger("core");

/** What booting and removing a sandbox that belongs to no one needs. */
export interface UnclaimedSandboxDeps {
  store: Store;
  runtime: Runtime;
  network: NetworkManager;
  agent: AgentLink;
  pidsLimit: number;
  /** The start slots it waits for, behind user creates (ADMISSION_NOTE); none = start at once. */
  starts?: StartQueue;
  /** PEM of Cubicle's CA, handed to agents in /init so sandboxes trust the egress proxy's TLS interception. */
  caCertificates?: string;
}

/**
 * Boots a sandbox of `template` that belongs to no one yet (a warm-pool entry, the source of a
 * template's warm snapshot), under the id of the sandbox that may later take it, with the
 * template's own resources, runtime and internet access. It is recorded as a `pool_entries` row
 * before anything exists on the host, so recovery removes what a crash leaves; the namespace is made
 * while the runtime prepares the container. It is a background start (the lowest CPU weight,
 * BACKGROUND_START_NOTE in the container runtime) until a pool claim calls
 * `runtime.foreground`. Resolves once the agent answers; on failure, whatever was made is
 * removed again.
 */
export async function bootUnclaimed(deps: UnclaimedSandboxDeps, template: TemplateInfo, options: { allowInternetAccess?: boolean } = {}): Promise<PoolEntryRecord> {
  return deps.starts ? deps.starts.run("background", () => boot(deps, template, options)) : boot(deps, template, options);
}

async function boot(deps: UnclaimedSandboxDeps, template: TemplateInfo, options: { allowInternetAccess?: boolean }): Promise<PoolEntryRecord> {
  const { store, runtime, network } = deps;
  const entry: PoolEntryRecord = { runtimeId: newSandboxId(), templateId: template.templateId, network: undefined, createdAt: Date.now(), allowInternetAccess: options.allowInternetAccess ?? true };
  await store.insertPoolEntry(entry);
  let networkReady: Promise<unknown> | undefined;
  try {
    const { network: planned, ready } = network.begin(entry.runtimeId, { allowInternetAccess: entry.allowInternetAccess });
    networkReady = ready.catch(() => undefined);
    entry.network = planned;
    await store.insertPoolEntry(entry);
    await runtime.create({
      sandboxId: entry.runtimeId,
      ...(template.runtime ? { runtime: template.runtime } : {}),
      hostname: entry.runtimeId,
      template: template.image,
      resources: { cpuCount: template.cpuCount, memoryMiB: template.memoryMB, diskMiB: template.diskSizeMB, pidsLimit: deps.pidsLimit },
      network: entry.network,
      networkReady: ready,
      background: true,
    });
    await deps.agent.waitUntilUp(entry.network.sandboxAddress, agentReadyTimeoutMs(template.runtime));
    return entry;
  } catch (err) {
    await networkReady;
    await destroyUnclaimed(deps, entry.runtimeId);
    throw err;
  }
}

/** Removes an unclaimed sandbox's container, network and row; never throws. */
export async function destroyUnclaimed(deps: UnclaimedSandboxDeps, runtimeId: string): Promise<void> {
  await deps.runtime.destroy(runtimeId).catch((err) => log.error("unclaimed sandbox destroy failed", { runtimeId, error: String(err) }));
  await deps.network.release(runtimeId).catch((err) => log.error("unclaimed sandbox network release failed", { runtimeId, error: String(err) }));
  await deps.store.deletePoolEntry(runtimeId).catch(() => undefined);
}
