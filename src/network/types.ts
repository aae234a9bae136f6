import type { NetworkFields } from "./egress-policy.js";
import type { EgressPolicy } from "./egress-types.js";

/** What a sandbox's network looks like once Cubicle has made it. */
export interface SandboxNetwork {
  /** Name under /var/run/netns (`ip netns` name). */
  netnsName: string;
  /** Path a runtime joins: /var/run/netns/<netnsName>. */
  netnsPath: string;
  /** Host end of the veth pair. */
  hostInterface: string;
  /** Address of the host end, e.g. 10.88.0.1. */
  hostAddress: string;
  /** Address of the sandbox end, e.g. 10.88.0.2: the server reaches the agent here. */
  sandboxAddress: string;
  /** Prefix length of the point-to-point link, e.g. 30. */
  prefixLength: number;
}

export interface NetworkPolicy {
  /** E2B's allowInternetAccess: false is denyOut 0.0.0.0/0 (allowOut still opens its holes). */
  allowInternetAccess: boolean;
  /**
   * E2B's `network` egress fields (allowOut, denyOut, rules, egressProxy) and Cubicle's
   * `bandwidth` ({egressMbps, ingressMbps}), validated by the API.
   */
  network?: NetworkFields & { bandwidth?: unknown };
}

/**
 * Makes and removes per-sandbox network namespaces, veth pairs, addresses and nftables rules.
 * Every method is idempotent so that recovery and cleanup can call it again safely.
 */
export interface NetworkManager {
  /** Creates the nftables table, enables forwarding. Safe to call on every start. */
  init(): Promise<void>;
  /** Makes the namespace, veth pair and addresses for a sandbox and applies the policy. */
  allocate(sandboxId: string, policy: NetworkPolicy): Promise<SandboxNetwork>;
  /**
   * allocate() in two steps: the network's names and addresses at once, and `ready`, which
   * settles when they exist on the host (a failure has released them). The caller can prepare
   * what only needs the names (a container bundle) while the namespace is being made.
   */
  begin(sandboxId: string, policy: NetworkPolicy): { network: SandboxNetwork; ready: Promise<SandboxNetwork> };
  /**
   * Re-registers an existing network after a server restart (marks its addresses used). Pass the
   * policy to restore it: `init()` recreates the nftables table, so until then the sandbox has no
   * internet (fail closed).
   */
  adopt(sandboxId: string, network: SandboxNetwork, policy?: NetworkPolicy): Promise<void>;
  /** Replaces the egress policy of a sandbox, atomically; open flows it no longer allows are cut. */
  applyPolicy(sandboxId: string, policy: NetworkPolicy): Promise<void>;
  /** The sandbox (by runtime id) holding a sandbox address, and its policy: the forwarder's and proxy's lookup. */
  sandboxAt(address: string): { sandboxId: string; policy: EgressPolicy } | undefined;
  /**
   * The addresses the sandbox's DNS answer gave for `name`: the kernel lets UDP/ICMP pass to them
   * while `name` is allowed (allowlist policies), and refuses QUIC to them while `name` has
   * header rules (HEADER_HOSTS_NOTE).
   */
  pin(sandboxId: string, name: string, addresses: readonly string[], ttlSec: number): Promise<void>;
  /** Releases what the manager holds open (nothing today; the rules stay). */
  close(): void;
  /** Removes namespace, veth, rules and frees the address. No error if already gone. */
  release(sandboxId: string): Promise<void>;
  /**
   * The ids (as given to allocate) of the sandboxes that have a network of this manager on the
   * host, whether this process made it or not (to find leftovers after a restart).
   */
  listRuntimeIds(): Promise<string[]>;
}
