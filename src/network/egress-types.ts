/**
 * What the egress enforcement (nftables, the DNS forwarder, the egress proxy) needs to know of
 * a sandbox's network policy, normalised from the E2B `network` fields by egress-policy.ts.
 */

/** A SOCKS5 proxy that a sandbox's TCP egress is tunneled through (RFC 1928, 1929). */
export interface EgressProxyConfig {
  /** Host name or IP literal, as the user gave it. */
  host: string;
  port: number;
  username?: string;
  password?: string;
}

/** Headers a host-side proxy adds to (or replaces in) requests to hosts matching `pattern`. */
export interface HeaderRule {
  /** Lowercase `api.example.com` or `*.example.com` (subdomains at any depth, not the apex). */
  pattern: string;
  /**
   * Header name → value. A value may hold `${e2b.secrets.<name>}` placeholders, resolved on the
   * host for each request (EgressSecrets), so a secret never enters the sandbox.
   */
  headers: Record<string, string>;
}

export interface EgressPolicy {
  /** false: nothing leaves the sandbox, not even a DNS query. */
  allowInternet: boolean;
  /** IPv4 CIDRs (a bare IP is a /32), normalised (`1.2.3.0/24`). Allow beats deny. */
  allowCidrs: string[];
  denyCidrs: string[];
  /** Lowercase domain patterns: `example.com` (that name) or `*.example.com` (its subdomains). */
  allowDomains: string[];
  /** Header rules (E2B `network.rules`), exact patterns before the longest wildcard. */
  headerRules: HeaderRule[];
  egressProxy: EgressProxyConfig | undefined;
}

/** What one egress attempt was, for the audit log. */
export interface EgressRecord {
  /** Milliseconds since the epoch, when the attempt was seen. */
  time: number;
  sandboxId: string;
  protocol: "tcp" | "udp" | "icmp" | "dns";
  /** Destination address (for DNS: the resolver the sandbox asked). */
  address: string;
  port: number | undefined;
  /** TLS SNI, HTTP Host or the DNS question name, when known. */
  domain: string | undefined;
  verdict: "allowed" | "denied";
  /** Why, in a few words ("not in allowOut", "private address", "proxy down", ...). */
  reason: string;
  /** Bytes sandbox → destination and back; undefined when not measured (kernel-logged packets). */
  bytesOut: number | undefined;
  bytesIn: number | undefined;
  /** Milliseconds the connection lasted (TCP through the proxy), when known. */
  durationMs: number | undefined;
  /** Denied UDP/ICMP packets to one destination and port within a second that this record stands for, when more than one (bytesOut is their sum). */
  attempts?: number;
}

/** Resolves `${e2b.secrets.<name>}` to a secret's current value, on the host; undefined = no such secret. */
export type SecretResolver = (name: string) => string | undefined;
