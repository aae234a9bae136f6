/** Names that the generated nftables table uses; the table is Cubicle's alone. */
export interface RulesetOptions {
  tableName: string;
  /** The sandbox pool, e.g. 10.88.0.0/16. */
  subnet: string;
  /** Host-side veth names start with this (IPv6 from sandboxes is dropped by it). */
  interfacePrefix: string;
  /** Sandbox addresses already allowed to reach the internet (kept across a re-init). */
  internetAllowed: readonly string[];
}

/** The set holding the sandbox addresses whose policy allows internet egress. */
export const INTERNET_SET = "internet_allowed";

/**
 * The whole Cubicle table as an `nft -f` script. Adding then deleting the table first makes it
 * one atomic transaction that works whether or not the table exists.
 *
 * Sandbox traffic is recognised by source address: the sandbox's root has no CAP_NET_ADMIN or
 * CAP_NET_RAW over its netns (owned by the host user namespace), so it can neither change its
 * address nor forge another one.
 */
export function buildRuleset(options: RulesetOptions): string {
  const { tableName: t, subnet: s, interfacePrefix: p } = options;
  const elements = options.internetAllowed.length > 0 ? `\n    elements = { ${options.internetAllowed.join(", ")} }` : "";
  return `table inet ${t}
delete table inet ${t}
table inet ${t} {
  set ${INTERNET_SET} {
    type ipv4_addr${elements}
  }
  chain input {
    type filter hook input priority filter - 5; policy accept;
    ip saddr ${s} ct state established,related accept
    ip saddr ${s} counter drop comment "sandbox to host"
    iifname "${p}*" meta nfproto ipv6 drop
  }
  chain forward {
    type filter hook forward priority filter - 5; policy accept;
    ip daddr ${s} ct state established,related accept
    ip daddr ${s} counter drop comment "only the router reaches sandboxes"
    ip saddr ${s} ip daddr 169.254.0.0/16 counter drop comment "link-local and metadata"
    ip saddr ${s} ip saddr != @${INTERNET_SET} counter drop comment "internet not allowed"
    iifname "${p}*" meta nfproto ipv6 drop
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr @${INTERNET_SET} ip daddr != ${s} masquerade
  }
}
`;
}

/** One `nft -f` script that puts an address in or out of the internet set, idempotently. */
export function buildPolicyUpdate(tableName: string, address: string, allowInternet: boolean): string {
  // Deleting an absent element fails, so add it first: add+delete in one transaction = "ensure absent".
  const add = `add element inet ${tableName} ${INTERNET_SET} { ${address} }\n`;
  return allowInternet ? add : add + `delete element inet ${tableName} ${INTERNET_SET} { ${address} }\n`;
}
