import type { NetworkManager, SandboxNetwork } from "../network/types.js";
import type { Runtime } from "../runtime/types.js";
import type { PoolEntryRecord, Store } from "../store/types.js";

/**
 * A runtime, network and store for unit tests of what boots unclaimed sandboxes (warm pool,
 * warm snapshots): they only count. Creates fail `failCreates` times first (Infinity: always).
 */
export function fakeHost(options: { failCreates?: number; fingerprint?: () => string } = {}) {
  const containers = new Map<string, "running" | "frozen">();
  const networks = new Set<string>();
  const rows = new Map<string, PoolEntryRecord>();
  let failures = options.failCreates ?? 0;
  const runtime = {
    name: "container",
    memoryImageFingerprint: options.fingerprint,
    async create(spec: { sandboxId: string }) {
      if (failures > 0) {
        failures--;
        throw new Error("boom: no sandboxes in unit tests");
      }
      containers.set(spec.sandboxId, "running");
    },
    async freeze(id: string) {
      containers.set(id, "frozen");
    },
    async destroy(id: string) {
      containers.delete(id);
    },
  } as unknown as Runtime;
  const network = {
    begin(id: string): { network: SandboxNetwork; ready: Promise<SandboxNetwork> } {
      networks.add(id);
      const network = { netnsName: `cubicle-${id}`, netnsPath: "", hostInterface: "", hostAddress: "127.0.0.1", sandboxAddress: "127.0.0.1", prefixLength: 30 };
      return { network, ready: Promise.resolve(network) };
    },
    async release(id: string) {
      networks.delete(id);
    },
  } as unknown as NetworkManager;
  const store = {
    async insertPoolEntry(entry: PoolEntryRecord) {
      rows.set(entry.runtimeId, { ...entry });
    },
    async deletePoolEntry(id: string) {
      rows.delete(id);
    },
    async listPoolEntries() {
      return [...rows.values()];
    },
  } as unknown as Store;
  return { containers, networks, rows, runtime, network, store };
}
