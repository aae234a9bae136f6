import { ALL_IPV4 } from "./egress-policy.js";
import type { EgressPolicy } from "./egress-types.js";
import { POLICY_MAP, policyChainName } from "./nft-ruleset.js";

/**
 * A sandbox's nftables policy as operations for sandbox-helper's `nft-batch`
 * (src/runtime/container/native/nftables.h), which sends them as one nf_tables netlink batch.
 *
 * NFT_NETLINK_NOTE: the table itself (nft-ruleset.ts) is written once at start by `nft`, but
 * every per-sandbox change — a new sandbox's chain and sets, a claim's or updateNetwork's
 * policy, a DNS answer's pins, a release — is a netlink batch from the resident helper: no
 * process start and no `nft` cache of the whole table (which grew with every sandbox: at 1000
 * sandboxes the resident `nft -i` used a quarter of a core). The batch is atomic, as an `nft`
 * transaction is. Interval sets are written as nft writes them on this kernel: each range's
 * first address, then the address after its last flagged as an interval end, and an interval
 * end at 0.0.0.0 when the first range does not start there; ranges are merged first, so
 * overlapping or adjacent allowOut/denyOut entries (`0.0.0.0/0` with `10.0.0.1`) are one range
 * instead of a conflict the kernel refuses.
 */

/** The operations of one batch, joined as `--ops` wants them. */
export type NftOps = string;

/** `1.2.3.0/24` → [first, last] as unsigned 32-bit numbers. */
function rangeOf(cidr: string): [number, number] {
  const [address, bits] = cidr.split("/");
  const octets = address!.split(".").map(Number);
  if (octets.length !== 4 || octets.some((o) => !Number.isInteger(o) || o < 0 || o > 255)) throw new Error(`not an IPv4 CIDR: ${cidr}`);
  const prefix = bits === undefined ? 32 : Number(bits);
  if (!Number.isInteger(prefix) || prefix < 0 || prefix > 32) throw new Error(`not an IPv4 CIDR: ${cidr}`);
  const value = ((octets[0]! << 24) | (octets[1]! << 16) | (octets[2]! << 8) | octets[3]!) >>> 0;
  const size = 2 ** (32 - prefix);
  const first = value - (value % size);
  return [first, first + size - 1];
}

function dotted(value: number): string {
  return [value >>> 24, (value >>> 16) & 255, (value >>> 8) & 255, value & 255].join(".");
}

/** The interval set's elements for these CIDRs (merged), in nft-batch's `ELEM,...` form; "" for none. */
export function intervalElements(cidrs: readonly string[]): string {
  const ranges = cidrs.map(rangeOf).sort((a, b) => a[0] - b[0]);
  const merged: [number, number][] = [];
  for (const [first, last] of ranges) {
    const previous = merged.at(-1);
    if (previous && first <= previous[1] + 1) previous[1] = Math.max(previous[1], last);
    else merged.push([first, last]);
  }
  const elements: string[] = [];
  if (merged.length > 0 && merged[0]![0] !== 0) elements.push("0.0.0.0!");
  for (const [first, last] of merged) {
    elements.push(dotted(first));
    if (last !== 0xffffffff) elements.push(`${dotted(last + 1)}!`);
  }
  return elements.join(",");
}

/** The sandbox's chain and sets (idempotent: adding what exists changes nothing). */
function declareOps(chain: string): string[] {
  return [`chain ${chain}`, `set ${chain}_a interval`, `set ${chain}_d interval`, `set ${chain}_n timeout`];
}

/**
 * Gives the sandbox at `address` its policy, or replaces it. The sandbox's chain is the same for
 * every policy — its allowOut set, its pinned set, its denyOut set, then allowed — so a change
 * refills two sets and touches no rule (`fresh` also makes the chain, the sets and the verdict
 * map element). An open policy has both sets empty; no internet is denyOut 0.0.0.0/0 with
 * nothing allowed and nothing pinned.
 */
export function policyOps(address: string, policy: EgressPolicy, options: { fresh: boolean } = { fresh: true }): NftOps {
  const chain = policyChainName(address);
  const ops: string[] = [];
  if (options.fresh) {
    ops.push(
      ...declareOps(chain),
      `flush-chain ${chain}`,
      `rule ${chain} ${chain}_a egress_allowed`,
      `rule ${chain} ${chain}_n egress_allowed`,
      `rule ${chain} ${chain}_d egress_denied`,
      `rule ${chain} - egress_allowed`,
      `map-add ${POLICY_MAP} ${address} ${chain}`,
    );
  }
  ops.push(`flush-set ${chain}_a`, `flush-set ${chain}_d`);
  const allow = intervalElements(policy.allowInternet ? policy.allowCidrs : []);
  const deny = intervalElements(policy.allowInternet ? policy.denyCidrs : [ALL_IPV4]);
  if (!policy.allowInternet) ops.push(`flush-set ${chain}_n`);
  if (allow) ops.push(`add ${chain}_a ${allow}`);
  if (deny) ops.push(`add ${chain}_d ${deny}`);
  return ops.join("; ");
}

/** Removes the sandbox's policy (map element, chain, sets); idempotent, as it first declares them. */
export function removePolicyOps(address: string): NftOps {
  const chain = policyChainName(address);
  return [
    ...declareOps(chain),
    `map-add ${POLICY_MAP} ${address} ${chain}`,
    `map-del ${POLICY_MAP} ${address}`,
    `flush-chain ${chain}`,
    `del-chain ${chain}`,
    `del-set ${chain}_a`,
    `del-set ${chain}_d`,
    `del-set ${chain}_n`,
  ].join("; ");
}

/** Pins addresses a sandbox's DNS answer gave for an allowed name, for `timeoutSec`. */
export function pinOps(address: string, pinned: readonly string[], timeoutSec: number): NftOps {
  const timeoutMs = Math.min(86_400, Math.max(1, Math.round(timeoutSec))) * 1000;
  for (const a of pinned) rangeOf(a);
  return `add ${policyChainName(address)}_n ${pinned.map((a) => `${a}@${timeoutMs}`).join(",")}`;
}

/** The helper's argv (after the binary) for one batch on table `inet <tableName>`. */
export function nftBatchArgs(tableName: string, ops: NftOps): string[] {
  return ["nft-batch", "--family", "inet", "--table", tableName, "--ops", ops];
}
