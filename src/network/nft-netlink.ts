import { ALL_IPV4, domainMatches, headerRuleFor } from "./egress-policy.js";
import type { EgressPolicy } from "./egress-types.js";
import { HEADER_HOSTS_CHAIN, POLICY_MAP, policyChainName } from "./nft-ruleset.js";

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
  return [`chain ${chain}`, `set ${chain}_a interval`, `set ${chain}_d interval`, `set ${chain}_n timeout`, `set ${chain}_h timeout`];
}

/**
 * Gives the sandbox at `address` its policy, or replaces it. The sandbox's chain is the same for
 * every policy — a jump to HEADER_HOSTS_CHAIN for the addresses of names with header rules, its
 * allowOut set, its pinned set, its denyOut set, then allowed — so a change refills sets and
 * touches no rule (`fresh` also makes the chain, the sets and the verdict map element). An open
 * policy has its address sets empty; no internet is denyOut 0.0.0.0/0 with nothing allowed and
 * nothing pinned. A change empties both pinned sets and refills them from `pins` (the DNS
 * answers still valid) by the new policy (pinsFor), in the same batch: no name the new policy
 * does not allow keeps its addresses open for UDP/ICMP.
 */
export function policyOps(address: string, policy: EgressPolicy, options: { fresh: boolean; pins?: readonly LivePin[] } = { fresh: true }): NftOps {
  const chain = policyChainName(address);
  const ops: string[] = [];
  if (options.fresh) {
    ops.push(
      ...declareOps(chain),
      `flush-chain ${chain}`,
      `rule-jump ${chain} ${chain}_h ${HEADER_HOSTS_CHAIN}`,
      `rule ${chain} ${chain}_a egress_allowed`,
      `rule ${chain} ${chain}_n egress_allowed`,
      `rule ${chain} ${chain}_d egress_denied`,
      `rule ${chain} - egress_allowed`,
      `map-add ${POLICY_MAP} ${address} ${chain}`,
    );
  }
  ops.push(`flush-set ${chain}_a`, `flush-set ${chain}_d`, `flush-set ${chain}_n`, `flush-set ${chain}_h`);
  const allow = intervalElements(policy.allowInternet ? policy.allowCidrs : []);
  const deny = intervalElements(policy.allowInternet ? policy.denyCidrs : [ALL_IPV4]);
  if (allow) ops.push(`add ${chain}_a ${allow}`);
  if (deny) ops.push(`add ${chain}_d ${deny}`);
  for (const pin of options.pins ?? []) {
    const pinned = pinOps(address, policy, pin.name, [pin.address], pin.secondsLeft);
    if (pinned) ops.push(pinned);
  }
  return ops.join("; ");
}

/** A DNS answer still valid: `name` resolved to `address`, for `secondsLeft` more seconds. */
export interface LivePin {
  name: string;
  address: string;
  secondsLeft: number;
}

/** Which pinned sets a name's addresses go into under `policy` (HEADER_HOSTS_NOTE). */
export function pinsFor(policy: EgressPolicy, name: string): { allowed: boolean; headerHost: boolean } {
  // The allowlist's own set matters only where the policy denies something.
  const allowed = policy.allowInternet && policy.denyCidrs.length > 0 && policy.allowDomains.some((pattern) => domainMatches(pattern, name));
  return { allowed, headerHost: policy.allowInternet && headerRuleFor(policy, name) !== undefined };
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
    `del-set ${chain}_h`,
  ].join("; ");
}

/** Pins addresses a sandbox's DNS answer gave for `name`, for `timeoutSec`; "" when its policy needs no pin for it (pinsFor). */
export function pinOps(address: string, policy: EgressPolicy, name: string, addresses: readonly string[], timeoutSec: number): NftOps {
  const { allowed, headerHost } = pinsFor(policy, name);
  if ((!allowed && !headerHost) || addresses.length === 0) return "";
  const timeoutMs = Math.min(86_400, Math.max(1, Math.round(timeoutSec))) * 1000;
  for (const a of addresses) rangeOf(a);
  const elements = addresses.map((a) => `${a}@${timeoutMs}`).join(",");
  const chain = policyChainName(address);
  return [allowed ? `add ${chain}_n ${elements}` : "", headerHost ? `add ${chain}_h ${elements}` : ""].filter(Boolean).join("; ");
}

/** The helper's argv (after the binary) for one batch on table `inet <tableName>`. */
export function nftBatchArgs(tableName: string, ops: NftOps): string[] {
  return ["nft-batch", "--family", "inet", "--table", tableName, "--ops", ops];
}
