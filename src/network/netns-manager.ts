import { createHash } from "node:crypto";
import { readdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { defaultDistDir, type CubicleConfig } from "../shared/config.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { runCommand } from "../shared/exec.js";
import { pathExists } from "../shared/fs.js";
import { createLogger } from "../shared/log.js";
import { AddressPool } from "./address-pool.js";
import { applyBandwidthLimits, parseBandwidthLimits, type BandwidthLimits } from "./bandwidth.js";
import { buildEgressPolicy, egressPolicyOf } from "./egress-policy.js";
import type { EgressPolicy } from "./egress-types.js";
import { nftBatchArgs, pinOps, policyOps, removePolicyOps, type LivePin, type NftOps } from "./nft-netlink.js";
import { buildRuleset } from "./nft-ruleset.js";
import type { NetworkManager, NetworkPolicy, SandboxNetwork } from "./types.js";

const log = createLogger("network");

const NETNS_DIR = "/var/run/netns";
const COMMAND_TIMEOUT_MS = 15_000;

/**
 * Runs one sandbox-helper subcommand (argv after the binary) and resolves with its stdout, or
 * rejects with a CubicleError carrying its stderr.
 */
export type NetworkHelperRunner = (args: string[]) => Promise<string>;

export interface NetnsManagerOptions {
  /** nftables table (family inet) that this manager owns. Default "cubicle". */
  tableName?: string;
  /** Namespace names are this plus the sandbox id. Default "cubicle-". */
  netnsPrefix?: string;
  /** Host veth names are this plus a hash (≤ 15 chars in all). Default "cb". */
  interfacePrefix?: string;
  /**
   * Host ports of the DNS forwarder and the egress proxy that sandbox DNS and TCP are redirected
   * to. Without them no sandbox TCP or DNS leaves at all (fail closed; runtime tests).
   */
  egressPorts?: { dns: number; proxy: number; logGroup?: number | undefined };
  /** Private ranges sandboxes may reach (CUBICLE_EGRESS_PRIVATE_ALLOW); all others are denied. */
  privateAllowed?: readonly string[];
  /** The DNS answers still valid for a sandbox (the egress service's pins): a policy change re-pins them by the new policy. */
  livePins?: (sandboxId: string) => readonly LivePin[];
  /** Told after a sandbox's policy changed (the proxy cuts connections it no longer allows). */
  onPolicyChange?: (sandboxId: string) => void;
  /** Told after a sandbox's network (at `address`, when known) is gone (its connections and flows are cut, its DNS pins dropped). */
  onRelease?: (sandboxId: string, address: string | undefined) => void;
  /**
   * Runs the helper's net-setup / net-release / net-address (NETNS_NETLINK_NOTE) and nft-batch
   * (NFT_NETLINK_NOTE). Default: one run of `<distDir>/sandbox-helper` per call.
   */
  helper?: NetworkHelperRunner;
}

interface NetworkRecord {
  sandboxId: string;
  network: SandboxNetwork;
  blockIndex: number;
  policy: EgressPolicy;
  /** The rate limits on its veth, as JSON ("" = none), to apply only what changed. */
  bandwidth: string;
}

function bandwidthOf(policy: NetworkPolicy): BandwidthLimits | undefined {
  return parseBandwidthLimits(policy.network?.bandwidth, "network.bandwidth");
}


/** The default helper runner: one process start of the static helper per call. */
export function oneShotNetworkHelper(binary: string): NetworkHelperRunner {
  return async function runNetworkHelper(args) {
    return (await runCommand([binary, ...args], { timeoutMs: COMMAND_TIMEOUT_MS })).stdout;
  };
}

/**
 * Network manager built on network namespaces, veth pairs and one nftables table. Every sandbox
 * gets a /30: the host end holds .1, the sandbox's eth0 holds .2 and routes through .1.
 *
 * NETNS_NETLINK_NOTE: the namespace, the veth pair, addresses, routes and the two sysctls are
 * made and removed by sandbox-helper's net-setup / net-release (src/runtime/container/native/
 * netlink.h) through rtnetlink, not by `ip -batch` runs (which cost a process start each, plus a
 * forked sysctl): one helper call per sandbox and direction, and none at all once the runner is
 * a resident helper. `distDir` locates the helper; without it, the repository's dist/.
 */
export function createNetnsManager(config: Pick<CubicleConfig, "subnet"> & Partial<Pick<CubicleConfig, "distDir">>, options: NetnsManagerOptions = {}): NetworkManager {
  const tableName = options.tableName ?? "cubicle";
  const netnsPrefix = options.netnsPrefix ?? "cubicle-";
  const interfacePrefix = options.interfacePrefix ?? "cb";
  if (!/^[a-z][a-z0-9_]{0,30}$/.test(tableName)) throw new CubicleError("invalid_argument", `nftables table name ${JSON.stringify(tableName)} must be lowercase letters, digits and _`);
  if (!/^[a-z][a-z0-9]{0,3}$/.test(interfacePrefix)) throw new CubicleError("invalid_argument", `interface prefix ${JSON.stringify(interfacePrefix)} must be 1–4 lowercase letters or digits`);
  const pool = new AddressPool(config.subnet);
  const records = new Map<string, NetworkRecord>();
  const byAddress = new Map<string, NetworkRecord>();
  const helper = options.helper ?? oneShotNetworkHelper(path.join(config.distDir ?? defaultDistDir(), "sandbox-helper"));
  // Without the forwarder and proxy, redirect to ports nothing listens on: nothing leaves.
  const egressPorts = options.egressPorts ?? { dns: 9, proxy: 9 };

  const netnsName = (sandboxId: string) => netnsPrefix + checkSandboxId(sandboxId);
  const hostInterfaceName = (sandboxId: string) =>
    interfacePrefix + createHash("sha256").update(sandboxId).digest("hex").slice(0, 15 - interfacePrefix.length);

  /** One atomic nftables change through the helper (NFT_NETLINK_NOTE). */
  async function nftBatch(ops: NftOps): Promise<void> {
    await helper(nftBatchArgs(tableName, ops));
  }

  /** `fresh`: the sandbox's chain may not exist yet (a new network, an adopted one). */
  async function setPolicy(record: NetworkRecord, policy: EgressPolicy, fresh: boolean): Promise<void> {
    await nftBatch(policyOps(record.network.sandboxAddress, policy, { fresh, pins: options.livePins?.(record.sandboxId) ?? [] }));
    record.policy = policy;
  }

  /** Rate limits are off by default: a sandbox without them costs no tc run. */
  async function setBandwidth(record: NetworkRecord, limits: BandwidthLimits | undefined): Promise<void> {
    const key = limits ? JSON.stringify(limits) : "";
    if (key === record.bandwidth) return;
    await applyBandwidthLimits(record.network.hostInterface, limits);
    record.bandwidth = key;
  }

  function remember(record: NetworkRecord): void {
    records.set(record.sandboxId, record);
    byAddress.set(record.network.sandboxAddress, record);
  }

  function forget(sandboxId: string): void {
    const record = records.get(sandboxId);
    if (!record) return;
    records.delete(sandboxId);
    if (byAddress.get(record.network.sandboxAddress) === record) byAddress.delete(record.network.sandboxAddress);
  }

  /** The host half of allocate(): namespace, veth pair, addresses, policy; released again on failure. */
  async function setUp(sandboxId: string, record: NetworkRecord, limits: BandwidthLimits | undefined): Promise<SandboxNetwork> {
    const network = record.network;
    const name = network.netnsName;
    try {
      // Namespace, veth, both ends' addresses, the default route and the sysctls (low ports for
      // everyone, no IPv6) in one helper call, undone by the helper if it fails (NETNS_NETLINK_NOTE).
      const hostSide = helper([
        "net-setup",
        "--name",
        name,
        "--host-if",
        network.hostInterface,
        "--host-addr",
        network.hostAddress,
        "--sandbox-addr",
        network.sandboxAddress,
        "--prefix",
        String(network.prefixLength),
      ]);
      // Both settle before a failure is cleaned up: a policy batch still in flight would land
      // after the clean-up removed the policy.
      const settled = await Promise.allSettled([hostSide, setPolicy(record, record.policy, true)]);
      for (const outcome of settled) if (outcome.status === "rejected") throw outcome.reason;
      await setBandwidth(record, limits);
      return { ...network };
    } catch (err) {
      await manager.release(sandboxId).catch((cleanupErr) => log.warn("cleanup after failed allocate failed", { sandboxId, error: String(cleanupErr) }));
      throw CubicleError.from(err);
    }
  }

  /** eth0's address in a namespace this process did not make (a leftover after a restart). */
  async function readSandboxAddress(netns: string): Promise<string | undefined> {
    try {
      const address = (await helper(["net-address", "--name", netns])).trim();
      return /^\d{1,3}(\.\d{1,3}){3}$/.test(address) ? address : undefined;
    } catch (err) {
      log.warn("could not read a leftover namespace's address", { netns, error: String(err) });
      return undefined;
    }
  }

  const manager: NetworkManager = {
    async init() {
      // Forwarding is host-wide; the forward chain below keeps sandboxes from using it freely.
      await writeFile("/proc/sys/net/ipv4/ip_forward", "1\n");
      await raiseNeighbourLimits(pool.blockCount);
      // The table once, by nft (the only nft run): per-sandbox changes are netlink batches.
      const ruleset = buildRuleset({ tableName, subnet: pool.normalizedCidr, interfacePrefix, dnsPort: egressPorts.dns, proxyPort: egressPorts.proxy, logGroup: egressPorts.logGroup, privateAllowed: options.privateAllowed ?? [] });
      await runCommand(["nft", "-f", "-"], { input: ruleset, timeoutMs: COMMAND_TIMEOUT_MS });
      // Sandboxes already known (a re-init) get their chains back; until then they have none: fail closed.
      for (const record of records.values()) await setPolicy(record, record.policy, true);
      log.info("nftables table ready", { table: `inet ${tableName}`, subnet: config.subnet });
    },

    async allocate(sandboxId, policy) {
      return this.begin(sandboxId, policy).ready;
    },

    begin(sandboxId, policy) {
      const name = netnsName(sandboxId);
      if (records.has(sandboxId)) throw new CubicleError("already_exists", `sandbox ${sandboxId} already has a network`);
      const link = pool.allocate();
      const network: SandboxNetwork = {
        netnsName: name,
        netnsPath: path.join(NETNS_DIR, name),
        hostInterface: hostInterfaceName(sandboxId),
        hostAddress: link.hostAddress,
        sandboxAddress: link.sandboxAddress,
        prefixLength: link.prefixLength,
      };
      const record: NetworkRecord = { sandboxId, network, blockIndex: link.blockIndex, policy: egressPolicyOf(policy), bandwidth: "" };
      remember(record);
      return { network: { ...network }, ready: setUp(sandboxId, record, bandwidthOf(policy)) };
    },

    async adopt(sandboxId, network, policy) {
      checkSandboxId(sandboxId);
      const existing = records.get(sandboxId);
      if (existing) pool.release(existing.blockIndex);
      forget(sandboxId);
      const blockIndex = pool.claim(network.sandboxAddress);
      // Until a policy is given (recovery passes the recorded one), nothing leaves: fail closed.
      const record: NetworkRecord = {
        sandboxId,
        network: { ...network },
        blockIndex,
        policy: policy ? egressPolicyOf(policy) : (existing?.policy ?? buildEgressPolicy(false, undefined)),
        // Unknown after a restart: applied again (tc replace is idempotent).
        bandwidth: "?",
      };
      remember(record);
      await setPolicy(record, record.policy, true);
      if (policy) await setBandwidth(record, bandwidthOf(policy));
    },

    async applyPolicy(sandboxId, policy) {
      const record = records.get(sandboxId);
      if (!record) throw new CubicleError("not_found", `sandbox ${sandboxId} has no network on this host`);
      await setPolicy(record, egressPolicyOf(policy), false);
      await setBandwidth(record, bandwidthOf(policy));
      options.onPolicyChange?.(sandboxId);
    },

    sandboxAt(address) {
      const record = byAddress.get(address);
      return record ? { sandboxId: record.sandboxId, policy: record.policy } : undefined;
    },

    async pin(sandboxId, name, addresses, ttlSec) {
      const record = records.get(sandboxId);
      if (!record) return;
      // Only an allowlist consults its pinned set, and only names with header rules have the other.
      const ops = pinOps(record.network.sandboxAddress, record.policy, name, addresses, ttlSec);
      if (ops) await nftBatch(ops);
    },

    async release(sandboxId) {
      const name = netnsName(sandboxId);
      const hostInterface = hostInterfaceName(sandboxId);
      const record = records.get(sandboxId);
      const netnsExists = await pathExists(path.join(NETNS_DIR, name));
      let address = record?.network.sandboxAddress;
      if (!address && netnsExists) address = await readSandboxAddress(name);
      // The helper deletes the veth explicitly (netns teardown is asynchronous, and a lingering
      // host end would keep the /30's route alive when the block is handed out again), then the
      // namespace; what it could not remove shows in the leftovers check below.
      if (netnsExists || (await pathExists(path.join("/sys/class/net", hostInterface)))) {
        await helper(["net-release", "--name", name, "--host-if", hostInterface]).catch((err) =>
          log.warn("could not remove the sandbox's namespace or veth", { sandboxId, error: String(err) }),
        );
      }
      // An egress rate limit's ifb outlives the veth: remove it (nothing to do, and no process, without one).
      await applyBandwidthLimits(hostInterface, undefined).catch((err) => log.warn("could not remove the sandbox's rate limit device", { sandboxId, error: String(err) }));
      if (address && pool.contains(address)) {
        await nftBatch(removePolicyOps(address)).catch((err) => log.warn("could not remove the sandbox's nftables policy", { sandboxId, error: String(err) }));
      }
      const leftovers = [
        (await pathExists(path.join("/sys/class/net", hostInterface))) ? hostInterface : undefined,
        (await pathExists(path.join(NETNS_DIR, name))) ? name : undefined,
      ].filter(Boolean);
      if (leftovers.length > 0) throw new CubicleError("internal", `could not remove ${leftovers.join(", ")} of sandbox ${sandboxId}; see the server log`);
      if (record) pool.release(record.blockIndex);
      forget(sandboxId);
      options.onRelease?.(sandboxId, address);
    },

    close() {},

    async listRuntimeIds() {
      const names = await readdir(NETNS_DIR).catch(() => [] as string[]);
      return names.filter((name) => name.startsWith(netnsPrefix) && isSandboxId(name.slice(netnsPrefix.length))).map((name) => name.slice(netnsPrefix.length));
    },
  };
  return manager;
}

/**
 * NEIGHBOUR_LIMIT_NOTE: the kernel's ARP table is one for the whole host, every network
 * namespace included, and each sandbox holds two entries (its address on the host's veth end,
 * the gateway in its own namespace). At the default hard limit (gc_thresh3 1024) a host with
 * ~500–700 live sandboxes logs "neighbor table overflow" and new sandboxes cannot be reached
 * (EHOSTUNREACH: their agents "never become ready"). The limits are raised (never lowered) to
 * what the subnet's sandboxes can need: two entries per /30 block (at most 65536 blocks), the
 * soft limit beside it, plus room for the host's own neighbours. A few hundred bytes per entry
 * that exists; nothing is allocated up front.
 */
async function raiseNeighbourLimits(blockCount: number): Promise<void> {
  const needed = 2 * Math.min(blockCount, 65_536);
  const limits: [string, number][] = [
    ["gc_thresh2", needed + 512],
    ["gc_thresh3", needed + 1024],
  ];
  for (const [name, wanted] of limits) {
    const file = `/proc/sys/net/ipv4/neigh/default/${name}`;
    const current = Number((await readFile(file, "utf8").catch(() => "")).trim());
    if (Number.isFinite(current) && current >= wanted) continue;
    await writeFile(file, `${wanted}\n`).catch((err) => log.warn("could not raise the host's neighbour table limit: hundreds of sandboxes may become unreachable", { name, wanted, error: String(err) }));
  }
}

/** Sandbox ids become file, netns and container names: keep them to a safe alphabet. */
export function checkSandboxId(sandboxId: string): string {
  if (!isSandboxId(sandboxId)) {
    throw new CubicleError("invalid_argument", `sandbox id ${JSON.stringify(sandboxId)} must be 1–63 letters, digits, _ or -`);
  }
  return sandboxId;
}

function isSandboxId(id: string): boolean {
  return /^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$/.test(id);
}
