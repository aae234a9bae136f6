import { isIPv4, isIPv6 } from "node:net";
import { CubicleError } from "../shared/cubicle-error.js";
import { formatIPv4, parseIPv4 } from "./address-pool.js";
import type { EgressPolicy, EgressProxyConfig, HeaderRule } from "./egress-types.js";

/**
 * E2B's `network` fields → the EgressPolicy that nftables, the DNS forwarder and the egress
 * proxy enforce, and the decisions they take with it (EGRESS_POLICY_NOTE).
 *
 * EGRESS_POLICY_NOTE: E2B's precedence. An address in allowOut (IP or CIDR) is allowed; a
 * connection to a name in allowOut (exact, or `*.` for its subdomains) is allowed when its
 * address is one the sandbox's own DNS answer for that name gave (pinned by the DNS forwarder),
 * so a process can name an allowed host but cannot reach another address with that name in its
 * SNI or Host. Otherwise an address in denyOut is denied, and anything else is allowed.
 * `allowInternetAccess: false` is denyOut 0.0.0.0/0 (allowOut still opens its holes), as
 * upstream says. Before all of this, whatever the user's rules say, Cubicle's own floor denies
 * the host, other sandboxes, loopback, link-local (cloud metadata), multicast and reserved
 * space, and private/shared space (RFC 1918, 100.64/10) unless the operator opened a range.
 */

/** Bounds of what one policy may hold (the JSON of `network` is also bounded by the API). */
export const EGRESS_BOUNDS = {
  listEntries: 1000,
  ruleHosts: 200,
  headersPerHost: 50,
  headerNameChars: 256,
  headerValueBytes: 8192,
  domainChars: 253,
} as const;

export const ALL_IPV4 = "0.0.0.0/0";

/** The `network` fields that make the egress policy: the ones an update replaces. */
export const EGRESS_FIELDS = ["allowOut", "denyOut", "rules", "egressProxy"] as const;

/** The fields of E2B's SandboxNetworkConfig / SandboxNetworkUpdateConfig this module reads. */
export interface NetworkFields {
  allowOut?: unknown;
  denyOut?: unknown;
  rules?: unknown;
  egressProxy?: unknown;
}

function fail(message: string): never {
  throw new CubicleError("invalid_argument", message);
}

function shown(value: string): string {
  return JSON.stringify(value.length > 80 ? value.slice(0, 80) + "…" : value);
}

/**
 * The policy a sandbox gets from its `allowInternetAccess` and `network` fields. Throws
 * invalid_argument (a 400) for anything it cannot enforce: IPv6 entries, domains in denyOut,
 * malformed CIDRs, headers no HTTP request can carry, a bad proxy address.
 */
export function buildEgressPolicy(allowInternetAccess: boolean, network: NetworkFields | undefined, where = "network"): EgressPolicy {
  const allowCidrs: string[] = [];
  const allowDomains: string[] = [];
  for (const entry of stringList(network?.allowOut, `${where}.allowOut`)) {
    const cidr = parseCidr(entry);
    if (cidr) allowCidrs.push(cidr);
    else if (isIPv6Entry(entry)) fail(`${where}.allowOut: ${shown(entry)} is IPv6; sandboxes have no IPv6 (it is blocked), so only IPv4 addresses, CIDRs and domain names can be allowed`);
    else allowDomains.push(parseDomainPattern(entry, `${where}.allowOut`));
  }
  const denyCidrs: string[] = [];
  for (const entry of stringList(network?.denyOut, `${where}.denyOut`)) {
    const cidr = parseCidr(entry);
    if (cidr) denyCidrs.push(cidr);
    else if (isIPv6Entry(entry)) fail(`${where}.denyOut: ${shown(entry)} is IPv6; sandboxes have no IPv6 at all, so there is nothing to deny`);
    else fail(`${where}.denyOut: ${shown(entry)} is not an IPv4 address or CIDR (domain names cannot be denied, as upstream: deny 0.0.0.0/0 and allow the names you want)`);
  }
  if (!allowInternetAccess && !denyCidrs.includes(ALL_IPV4)) denyCidrs.push(ALL_IPV4);
  return {
    allowInternet: !denyCidrs.includes(ALL_IPV4) || allowCidrs.length > 0 || allowDomains.length > 0,
    allowCidrs: unique(allowCidrs),
    denyCidrs: unique(denyCidrs),
    allowDomains: unique(allowDomains),
    headerRules: parseHeaderRules(network?.rules, `${where}.rules`),
    egressProxy: parseEgressProxy(network?.egressProxy, `${where}.egressProxy`),
  };
}

/** The EgressPolicy of a sandbox's NetworkPolicy (validated by the API before it gets here). */
export function egressPolicyOf(policy: { allowInternetAccess: boolean; network?: NetworkFields }): EgressPolicy {
  return buildEgressPolicy(policy.allowInternetAccess, policy.network);
}

/** The policy of a sandbox that asked for nothing: everything public is allowed. */
export function openEgressPolicy(): EgressPolicy {
  return { allowInternet: true, allowCidrs: [], denyCidrs: [], allowDomains: [], headerRules: [], egressProxy: undefined };
}

function unique(list: string[]): string[] {
  return [...new Set(list)];
}

function stringList(value: unknown, field: string): string[] {
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value) || value.some((item) => typeof item !== "string")) fail(`${field} must be a list of strings`);
  if (value.length > EGRESS_BOUNDS.listEntries) fail(`${field} has ${value.length} entries; at most ${EGRESS_BOUNDS.listEntries} are allowed`);
  return (value as string[]).map((item) => item.trim());
}

/** `1.2.3.4` → `1.2.3.4/32`, `10.1.2.3/8` → `10.0.0.0/8`; undefined when it is not IPv4. */
export function parseCidr(entry: string): string | undefined {
  const match = /^(\d{1,3}(?:\.\d{1,3}){3})(?:\/(\d{1,2}))?$/.exec(entry);
  if (!match || !isIPv4(match[1]!)) return undefined;
  const prefix = match[2] === undefined ? 32 : Number(match[2]);
  if (prefix > 32) fail(`${shown(entry)} has a prefix length above 32`);
  const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  return `${formatIPv4((parseIPv4(match[1]!) & mask) >>> 0)}/${prefix}`;
}

function isIPv6Entry(entry: string): boolean {
  const address = entry.split("/")[0]!;
  return isIPv6(address.replace(/^\[|\]$/g, ""));
}

const LABEL = /^(?!-)[a-z0-9_-]{1,63}(?<!-)$/;

/** `Example.COM.` → `example.com`; `*.example.com` kept as a wildcard; anything else refused. */
export function parseDomainPattern(entry: string, field: string): string {
  const lower = entry.toLowerCase().replace(/\.$/, "");
  const wildcard = lower.startsWith("*.");
  const name = wildcard ? lower.slice(2) : lower;
  const labels = name.split(".");
  if (name.length === 0 || name.length > EGRESS_BOUNDS.domainChars || labels.some((label) => !LABEL.test(label))) {
    fail(`${field}: ${shown(entry)} is not an IPv4 address, an IPv4 CIDR or a domain name (like example.com or *.example.com)`);
  }
  if (labels.length < 2 && wildcard) fail(`${field}: ${shown(entry)} is too broad: a wildcard needs a domain of at least two labels`);
  return wildcard ? `*.${name}` : name;
}

/** Whether a hostname matches a pattern: exact, or `*.d` for names under d (not d itself). */
export function domainMatches(pattern: string, hostname: string): boolean {
  if (!pattern.startsWith("*.")) return pattern === hostname;
  const suffix = pattern.slice(1);
  return hostname.length > suffix.length && hostname.endsWith(suffix);
}

/**
 * Normalises a hostname seen on the wire (SNI, Host, a proxy's name): lowercase, no trailing
 * dot, letters, digits, `-` and `_` in labels of at most 63; undefined when unusable, and for an
 * IP literal (RFC 6066 §3: not a server name).
 */
export function normaliseHostname(raw: string): string | undefined {
  const host = raw.toLowerCase().replace(/\.$/, "");
  if (host.length === 0 || host.length > EGRESS_BOUNDS.domainChars) return undefined;
  if (!/^[a-z0-9_-]+(\.[a-z0-9_-]+)*$/.test(host) || host.split(".").some((label) => label.length > 63)) return undefined;
  return /^[0-9.]+$/.test(host) ? undefined : host;
}

const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
const PLACEHOLDER = /\$\{([^}]*)\}/g;
const SECRET_PREFIX = "e2b.secrets.";

function parseHeaderRules(value: unknown, field: string): HeaderRule[] {
  if (value === undefined || value === null) return [];
  if (typeof value !== "object" || Array.isArray(value)) fail(`${field} must be an object of host → list of rules`);
  const entries = Object.entries(value as Record<string, unknown>);
  if (entries.length > EGRESS_BOUNDS.ruleHosts) fail(`${field} has ${entries.length} hosts; at most ${EGRESS_BOUNDS.ruleHosts} are allowed`);
  const rules = new Map<string, Record<string, string>>();
  for (const [host, list] of entries) {
    if (host.trim() === "*") fail(`${field}: a bare "*" is not a host pattern; use *.example.com`);
    const pattern = parseDomainPattern(host.trim(), field);
    if (!Array.isArray(list)) fail(`${field}[${shown(host)}] must be a list of rules`);
    // Upstream: the rules of one host apply in order; a later header of the same name wins.
    const headers: Record<string, string> = rules.get(pattern) ?? {};
    for (const rule of list as unknown[]) {
      if (typeof rule !== "object" || rule === null || Array.isArray(rule)) fail(`${field}[${shown(host)}] entries must be objects like {"transform": {"headers": {...}}}`);
      for (const key of Object.keys(rule)) if (key !== "transform") fail(`${field}[${shown(host)}]: ${shown(key)} is not a rule field (only "transform")`);
      const transform = (rule as { transform?: unknown }).transform;
      if (transform === undefined || transform === null) continue;
      if (typeof transform !== "object" || Array.isArray(transform)) fail(`${field}[${shown(host)}].transform must be an object`);
      for (const key of Object.keys(transform)) if (key !== "headers") fail(`${field}[${shown(host)}].transform: ${shown(key)} is not supported (only "headers")`);
      const given = (transform as { headers?: unknown }).headers;
      if (given === undefined || given === null) continue;
      if (typeof given !== "object" || Array.isArray(given)) fail(`${field}[${shown(host)}].transform.headers must be an object of name → value`);
      for (const [name, headerValue] of Object.entries(given as Record<string, unknown>)) {
        if (!HEADER_NAME.test(name) || name.length > EGRESS_BOUNDS.headerNameChars) fail(`${field}[${shown(host)}]: ${shown(name)} is not an HTTP header name`);
        if (["host", "content-length", "transfer-encoding", "connection", "upgrade"].includes(name.toLowerCase())) fail(`${field}[${shown(host)}]: the ${name} header cannot be injected`);
        if (typeof headerValue !== "string") fail(`${field}[${shown(host)}].${name} must be a string`);
        if (/[\r\n\0]/.test(headerValue) || Buffer.byteLength(headerValue) > EGRESS_BOUNDS.headerValueBytes) fail(`${field}[${shown(host)}].${name} must be one line of at most ${EGRESS_BOUNDS.headerValueBytes} bytes`);
        checkPlaceholders(headerValue, `${field}[${shown(host)}].${name}`);
        for (const existing of Object.keys(headers)) if (existing.toLowerCase() === name.toLowerCase()) delete headers[existing];
        headers[name] = headerValue;
      }
      if (Object.keys(headers).length > EGRESS_BOUNDS.headersPerHost) fail(`${field}[${shown(host)}] injects more than ${EGRESS_BOUNDS.headersPerHost} headers`);
    }
    rules.set(pattern, headers);
  }
  return [...rules].filter(([, headers]) => Object.keys(headers).length > 0).map(([pattern, headers]) => ({ pattern, headers }));
}

/** Only `${e2b.secrets.<name>}` placeholders can be resolved here; workload identity tokens cannot. */
function checkPlaceholders(value: string, field: string): void {
  for (const match of value.matchAll(PLACEHOLDER)) {
    const inner = match[1]!;
    if (inner.startsWith(SECRET_PREFIX) && inner.length > SECRET_PREFIX.length) continue;
    if (inner.startsWith("e2b.identity.")) fail(`${field}: ${shown(match[0])} names a workload identity token; Cubicle has no workload identity (iam) yet`);
    if (inner.startsWith("e2b.")) fail(`${field}: ${shown(match[0])} is not a placeholder Cubicle resolves (only \${e2b.secrets.<name>})`);
  }
}

/** The names of the secrets a policy's header rules reference. */
export function referencedSecrets(policy: EgressPolicy): string[] {
  const names = new Set<string>();
  for (const rule of policy.headerRules) {
    for (const value of Object.values(rule.headers)) {
      for (const match of value.matchAll(PLACEHOLDER)) if (match[1]!.startsWith(SECRET_PREFIX)) names.add(match[1]!.slice(SECRET_PREFIX.length).toLowerCase());
    }
  }
  return [...names];
}

/**
 * Replaces `${e2b.secrets.<name>}` with the secret's value (names are case-insensitive, as the
 * store lowercases them). Throws not_found naming the first secret that does not exist.
 */
export function resolvePlaceholders(value: string, resolve: (name: string) => string | undefined): string {
  return value.replace(PLACEHOLDER, (whole, inner: string) => {
    if (!inner.startsWith(SECRET_PREFIX)) return whole;
    const name = inner.slice(SECRET_PREFIX.length).toLowerCase();
    const secret = resolve(name);
    if (secret === undefined) throw new CubicleError("not_found", `secret ${shown(name)} referenced by a network rule does not exist`);
    return secret;
  });
}

/** The header rule for a hostname: an exact pattern first, then the longest matching wildcard. */
export function headerRuleFor(policy: EgressPolicy, hostname: string): HeaderRule | undefined {
  let best: HeaderRule | undefined;
  for (const rule of policy.headerRules) {
    if (rule.pattern === hostname) return rule;
    if (domainMatches(rule.pattern, hostname) && (!best || rule.pattern.length > best.pattern.length)) best = rule;
  }
  return best;
}

function parseEgressProxy(value: unknown, field: string): EgressProxyConfig | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "object" || Array.isArray(value)) fail(`${field} must be an object like {"address": "host:port", "username": ..., "password": ...}`);
  const given = value as Record<string, unknown>;
  for (const key of Object.keys(given)) if (!["address", "username", "password"].includes(key)) fail(`${field}: ${shown(key)} is not a field (address, username, password)`);
  if (typeof given.address !== "string") fail(`${field}.address must be a "host:port" string`);
  const match = /^(\[[^\]]+\]|[^:]+):(\d{1,5})$/.exec(given.address.trim());
  const port = match ? Number(match[2]) : NaN;
  if (!match || !(port >= 1 && port <= 65535)) fail(`${field}.address ${shown(given.address)} is not "host:port"`);
  const host = match[1]!.replace(/^\[|\]$/g, "");
  if (isIPv6(host)) fail(`${field}.address: IPv6 proxies are not supported`);
  if (!isIPv4(host) && normaliseHostname(host) === undefined) fail(`${field}.address: ${shown(host)} is not a host name or IPv4 address`);
  const proxy: EgressProxyConfig = { host: isIPv4(host) ? host : normaliseHostname(host)!, port };
  for (const key of ["username", "password"] as const) {
    const v = given[key];
    if (v === undefined || v === null) continue;
    if (typeof v !== "string" || Buffer.byteLength(v) > 255 || v.length === 0) fail(`${field}.${key} must be a string of 1–255 bytes (RFC 1929)`);
    proxy[key] = v;
  }
  if (proxy.password !== undefined && proxy.username === undefined) fail(`${field}.password needs a username`);
  return proxy;
}

/** A set of IPv4 CIDRs for lookups (linear; policies hold at most a thousand entries). */
export class CidrSet {
  private readonly ranges: { base: number; mask: number }[] = [];

  constructor(cidrs: Iterable<string> = []) {
    for (const cidr of cidrs) this.add(cidr);
  }

  add(cidr: string): void {
    const [address, prefixText] = cidr.split("/");
    const prefix = prefixText === undefined ? 32 : Number(prefixText);
    const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
    this.ranges.push({ base: (parseIPv4(address!) & mask) >>> 0, mask });
  }

  has(address: string): boolean {
    if (!isIPv4(address)) return false;
    const value = parseIPv4(address);
    return this.ranges.some((range) => ((value & range.mask) >>> 0) === range.base);
  }
}

/** Address space no sandbox reaches, whatever its policy says. */
export const ALWAYS_DENIED = [
  "0.0.0.0/8",
  "127.0.0.0/8",
  "169.254.0.0/16", // link-local, including cloud metadata (169.254.169.254)
  "192.0.0.0/24", // IETF protocol assignments
  "224.0.0.0/3", // multicast, reserved and broadcast
];
/** Private and shared space, denied unless the operator opens a range (CUBICLE_EGRESS_PRIVATE_ALLOW). */
export const PRIVATE_DENIED = ["10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16"];

export interface EgressVerdict {
  allowed: boolean;
  reason: string;
}

/**
 * The decisions every enforcement point shares. `hostAddresses` returns the host's own IPv4
 * addresses (refreshed by the caller); the sandbox subnet is always denied.
 */
export class EgressRules {
  private readonly alwaysDenied: CidrSet;
  private readonly privateDenied = new CidrSet(PRIVATE_DENIED);
  private readonly privateOpened: CidrSet;

  constructor(
    readonly options: { sandboxSubnet: string; privateAllowed: readonly string[]; hostAddresses: () => ReadonlySet<string> },
  ) {
    this.alwaysDenied = new CidrSet([...ALWAYS_DENIED, options.sandboxSubnet]);
    this.privateOpened = new CidrSet(options.privateAllowed);
  }

  /** The floor under every policy: host, sandboxes, loopback, link-local, private space. */
  floor(address: string): EgressVerdict | undefined {
    if (!isIPv4(address)) return { allowed: false, reason: "not IPv4" };
    if (this.options.hostAddresses().has(address)) return { allowed: false, reason: "the host itself" };
    if (this.alwaysDenied.has(address)) return { allowed: false, reason: "reserved, loopback, link-local or sandbox address" };
    if (this.privateDenied.has(address) && !this.privateOpened.has(address)) return { allowed: false, reason: "private address" };
    return undefined;
  }

  /**
   * A connection to `address`. `domain` is the name the connection carries (SNI, Host) or, for
   * one that carries none, any allowed name the sandbox resolved to this address; `pinned` says
   * whether the sandbox's DNS answers for `domain` included `address`.
   */
  decide(policy: EgressPolicy, address: string, domain?: { name: string; pinned: boolean }): EgressVerdict {
    const floor = this.floor(address);
    if (floor) return floor;
    if (policy.allowCidrs.length > 0 && new CidrSet(policy.allowCidrs).has(address)) return { allowed: true, reason: "allowOut address" };
    if (domain && policy.allowDomains.some((pattern) => domainMatches(pattern, domain.name))) {
      if (domain.pinned) return { allowed: true, reason: `allowOut domain ${domain.name}` };
      return { allowed: false, reason: `${domain.name} is allowed, but the sandbox's DNS did not resolve it to ${address}` };
    }
    if (new CidrSet(policy.denyCidrs).has(address)) return { allowed: false, reason: policy.denyCidrs.includes(ALL_IPV4) ? "not in allowOut" : "denyOut" };
    return { allowed: true, reason: "default allow" };
  }

  /** Whether the sandbox may resolve a name (a denied name is refused: no DNS exfiltration). */
  mayResolve(policy: EgressPolicy, name: string): EgressVerdict {
    if (!policy.allowInternet) return { allowed: false, reason: "no internet access" };
    if (policy.allowDomains.some((pattern) => domainMatches(pattern, name))) return { allowed: true, reason: "allowOut domain" };
    if (policy.denyCidrs.includes(ALL_IPV4)) return { allowed: false, reason: "name not in allowOut" };
    return { allowed: true, reason: "default allow" };
  }
}
