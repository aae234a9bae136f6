import { ALWAYS_DENIED, PRIVATE_DENIED } from "./egress-policy.js";

/** Names that the generated nftables table uses; the table is Cubicle's alone. */
export interface RulesetOptions {
  tableName: string;
  /** The sandbox pool, e.g. 10.88.0.0/16. */
  subnet: string;
  /** Host-side veth names start with this. */
  interfacePrefix: string;
  /** Where the DNS forwarder (UDP and TCP) and the egress proxy listen on the host. */
  dnsPort: number;
  proxyPort: number;
  /** The NFLOG group the egress log reads (KERNEL_LOG_NOTE); none: nothing is logged. */
  logGroup?: number | undefined;
  /** Private ranges the operator opened (CUBICLE_EGRESS_PRIVATE_ALLOW). */
  privateAllowed: readonly string[];
}

/** sandbox address → its verdict map element's chain. */
export const POLICY_MAP = "sandbox_policy";

/**
 * HEADER_HOSTS_NOTE: header rules (`network.rules`) are injected by the egress proxy into HTTP
 * over TCP. A client that speaks HTTP/3 would send its requests over QUIC past the proxy,
 * without them, and QUIC runs on whatever UDP port the server's `Alt-Svc` names, not only 443.
 * So the addresses a sandbox's DNS answers gave for names with header rules (each sandbox's `_h`
 * set, filled as the answers come, like its pinned set) are jumped to this chain first, which
 * refuses all UDP to them at once (an ICMP port unreachable, audited as denied, letter Q):
 * HTTP/3 clients then use TCP, where the headers are injected. (DNS never gets here: it is
 * redirected to the forwarder before routing.)
 */
export const HEADER_HOSTS_CHAIN = "header_hosts";

/** `10.88.0.2` → `p_10_88_0_2`: the sandbox's chain; its sets add `_a`, `_d`, `_n`. */
export function policyChainName(address: string): string {
  if (!/^\d{1,3}(\.\d{1,3}){3}$/.test(address)) throw new Error(`not an IPv4 address: ${address}`);
  return `p_${address.replaceAll(".", "_")}`;
}

/**
 * The whole Cubicle table as an `nft -f` script (NFT_RULESET_NOTE), without any sandbox's own
 * chain and sets (nft-netlink.ts adds those). Adding then deleting the table first makes it one
 * atomic transaction that works whether or not the table exists.
 *
 * NFT_RULESET_NOTE: what the kernel enforces.
 * - TCP to the floor (below) never reaches the proxy: the kernel drops its first packet, so the
 *   sandbox's connect times out as if nothing were there (and it is logged, as UDP is: KERNEL_LOG_NOTE).
 * - Every other TCP connection a sandbox of this server (its subnet: other servers on the host
 *   have tables and subnets of their own) opens is redirected to the egress proxy on the host (nat
 *   prerouting), which decides by address, SNI or Host and pinned DNS answers, audits, injects
 *   headers and tunnels through SOCKS5. No sandbox TCP is ever forwarded.
 * - Every DNS packet (UDP or TCP port 53, to any address) is redirected to Cubicle's DNS
 *   forwarder, so "asking another resolver" asks Cubicle's.
 * - UDP, ICMP and the rest are forwarded (and masqueraded) only past the floor — never to the
 *   host, other sandboxes, loopback, link-local/metadata, multicast/reserved, or private space
 *   unless opened — and then through the sandbox's own chain (`goto p_<address>` from the
 *   verdict map): its allowOut addresses, the addresses its DNS answers pinned for allowed
 *   names (a timeout set the forwarder fills), its denyOut, then accept. Every packet is
 *   checked, not only a flow's first, so a policy update cuts open flows at once.
 * - Sandboxes reach the host only as redirected DNS and proxy traffic (`ct status dnat`), and
 *   are reached only by the host (the router) on connections it opened. IPv6 from a sandbox is
 *   dropped (its eth0 has IPv6 disabled, and its root cannot change that).
 * Sandbox traffic is recognised by source address: the sandbox's root has no CAP_NET_ADMIN or
 * CAP_NET_RAW over its netns (owned by the host user namespace), so it can neither change its
 * address nor forge another one.
 */
export function buildRuleset(options: RulesetOptions): string {
  const { tableName: t, subnet: s, interfacePrefix: p } = options;
  const opened = options.privateAllowed.length > 0 ? `\n    elements = { ${options.privateAllowed.join(", ")} }` : "";
  return `table inet ${t}
delete table inet ${t}
table inet ${t} {
  set always_denied {
    type ipv4_addr; flags interval
    elements = { ${[...ALWAYS_DENIED, s].join(", ")} }
  }
  set private_denied {
    type ipv4_addr; flags interval
    elements = { ${PRIVATE_DENIED.join(", ")} }
  }
  set private_opened {
    type ipv4_addr; flags interval${opened}
  }
  map ${POLICY_MAP} {
    type ipv4_addr : verdict
  }
${auditChains(options.logGroup)}
  chain ${HEADER_HOSTS_CHAIN} {
    meta l4proto udp goto egress_quic
  }
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    iifname "${p}*" ip saddr ${s} meta l4proto { tcp, udp } th dport 53 redirect to :${options.dnsPort}
    iifname "${p}*" ip saddr ${s} ip daddr @always_denied return
    iifname "${p}*" ip saddr ${s} ip daddr @private_denied ip daddr != @private_opened return
    iifname "${p}*" ip saddr ${s} fib daddr type local return
    iifname "${p}*" ip saddr ${s} meta l4proto tcp redirect to :${options.proxyPort}
  }
  chain input {
    type filter hook input priority filter - 5; policy accept;
    ip saddr ${s} ct state established,related accept
    iifname "${p}*" ip saddr ${s} meta l4proto { tcp, udp } th dport ${options.dnsPort} ct status dnat accept
    iifname "${p}*" ip saddr ${s} meta l4proto tcp th dport ${options.proxyPort} ct status dnat accept
    ip saddr ${s} goto egress_floor
    iifname "${p}*" meta nfproto ipv6 drop
    meta l4proto { tcp, udp } th dport { ${options.dnsPort}, ${options.proxyPort} } ip saddr != ${s} drop comment "the forwarder and proxy serve sandboxes only"
  }
  chain forward {
    type filter hook forward priority filter - 5; policy accept;
    ip daddr ${s} ct state established,related accept
    ip daddr ${s} counter drop comment "only the router reaches sandboxes"
    iifname "${p}*" meta nfproto ipv6 drop
    ip saddr ${s} ip daddr @always_denied goto egress_floor
    ip saddr ${s} ip daddr @private_denied ip daddr != @private_opened goto egress_private
    ip saddr ${s} meta l4proto tcp counter drop comment "sandbox TCP goes through the egress proxy"
    ip saddr ${s} ip saddr vmap @${POLICY_MAP}
    ip saddr ${s} counter drop comment "no policy"
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr ${s} ip daddr != ${s} masquerade
  }
}
`;
}

/**
 * The verdict chains every forwarded sandbox packet ends in (KERNEL_LOG_NOTE).
 *
 * KERNEL_LOG_NOTE: the first packet of each UDP/ICMP flow a sandbox starts (its conntrack entry
 * not yet confirmed: a UDP flow stays "new" until its first answer, and its later packets are
 * not logged again), and each packet a denial drops (a dropped packet's entry is never
 * confirmed, so each is an attempt of its own), goes to the server's NFLOG group with its
 * verdict letter as the prefix (A allowed, D denied by policy, F denied by the floor, P private,
 * Q UDP (QUIC) to a host with header rules: HEADER_HOSTS_NOTE).
 * The helper's `flows` reads it (nflog.h) and KernelEgressLog turns it into an audit record;
 * nothing goes to the kernel's own log. Logging is limited per sandbox address and verdict
 * (LOG_RATE packets a second, bursts of twice that) so a flood costs the host a bounded amount
 * of work, and the helper folds a second's denied packets to one target into one record (its
 * `attempts`). Past the limit, one packet a second per sandbox and verdict is still logged,
 * with the verdict's letter in lowercase: its record says that the flows after it in that
 * second were not recorded (how many is not known), so a flood is never silent in the audit.
 * The verdict itself applies to every packet, logged or not.
 */
export const LOG_RATE = 2000;

/** The verdict chains and their rate-limit sets; `rate` other than LOG_RATE only in tests. */
export function auditChains(group: number | undefined, rate = LOG_RATE): string {
  const chain = (name: string, letter: string, verdict: string) => {
    const firstPacket = "ct state new ct status & confirmed == 0";
    return `  set rl_${letter} {
    type ipv4_addr; flags dynamic,timeout; timeout 1m; size 65536
  }
  set ro_${letter} {
    type ipv4_addr; flags dynamic,timeout; timeout 1m; size 65536
  }
  chain ${name} {
${group === undefined ? "" : `    ${firstPacket} update @rl_${letter} { ip saddr limit rate ${rate}/second burst ${2 * rate} packets } log group ${group} prefix "${letter}" ${verdict}
    ${firstPacket} update @ro_${letter} { ip saddr limit rate 1/second burst 1 packets } log group ${group} prefix "${letter.toLowerCase()}" ${verdict}
`}    ${verdict}
  }`;
  };
  return [
    chain("egress_allowed", "A", "accept"),
    chain("egress_denied", "D", "counter drop"),
    chain("egress_floor", "F", "counter drop"),
    chain("egress_private", "P", "counter drop"),
    chain("egress_quic", "Q", "counter reject with icmpx type port-unreachable"),
  ].join("\n");
}
