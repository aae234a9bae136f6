import os from "node:os";
import path from "node:path";
import { createLogger } from "../shared/log.js";
import { createDnsForwarder, type DnsForwarder, type DnsUpstream } from "./dns/dns-forwarder.js";
import { MAX_PIN_SECONDS, MIN_PIN_SECONDS, normalizeDomain, PinnedAddresses } from "./dns/pinned-addresses.js";
import { createEgressProxy, loadOriginalDestination, type EgressProxy } from "./egress/index.js";
import { EgressRules, domainMatches, headerRuleFor } from "./egress-policy.js";
import type { EgressPolicy, EgressRecord } from "./egress-types.js";
import { KernelEgressLog, firstLogGroup } from "./kernel-egress-log.js";

const log = createLogger("egress");

/** How often the host's own addresses are read again (a sandbox never reaches them). */
const HOST_ADDRESSES_REFRESH_MS = 5_000;

export interface EgressServiceOptions {
  /** The sandbox pool (always denied as a destination). */
  subnet: string;
  /** nftables table of this server (the NFLOG group it asks for first). */
  tableName: string;
  /** Private ranges the operator opened (CUBICLE_EGRESS_PRIVATE_ALLOW). */
  privateAllowed: readonly string[];
  /** Resolvers DNS is forwarded to; default /etc/resolv.conf's. */
  dnsUpstreams: DnsUpstream[] | undefined;
  /** Extra CAs trusted for upstream TLS when headers are injected (CUBICLE_EGRESS_CA_FILE). */
  upstreamCa: string[];
  /** Where the SO_ORIGINAL_DST addon is (dist/network/original-dst.node). */
  distDir: string;
  /** The network manager's lookup: sandbox (runtime) id and policy by sandbox address. */
  sandboxAt(address: string): { sandboxId: string; policy: EgressPolicy } | undefined;
  /** Tells the kernel of a DNS answer's addresses (NetworkManager.pin). */
  pinInKernel(runtimeId: string, name: string, addresses: readonly string[], ttlSec: number): Promise<void>;
  /** The sandbox id of a runtime id (they differ after some restores); undefined keeps the runtime id. */
  sandboxIdOf(runtimeId: string): string | undefined;
  issueCertificate(hostname: string): Promise<{ key: string | Buffer; cert: string | Buffer }>;
  resolveSecret(name: string): string | undefined;
  audit: { record(record: EgressRecord): void; finished(record: EgressRecord): void };
}

export interface EgressService {
  /** Starts the forwarder, the proxy and the packet log reader; resolves with their ports and the NFLOG group (none: UDP/ICMP not audited). */
  start(): Promise<{ dns: number; proxy: number; logGroup: number | undefined }>;
  /** A sandbox's policy changed: cut the connections it no longer allows. */
  policyChanged(runtimeId: string): void;
  /** The sandbox's DNS answers still valid (a policy change re-pins them in the kernel). */
  livePins(runtimeId: string): { name: string; address: string; secondsLeft: number }[];
  /** A sandbox's network (at `address`) is gone: cut its connections and flows, forget its DNS pins. */
  released(runtimeId: string, address?: string): void;
  stop(): Promise<void>;
}

/** A pin the DNS forwarder records is also handed to the kernel (UDP, ICMP to that address). */
class KernelPinnedAddresses extends PinnedAddresses {
  constructor(private readonly toKernel: (sandboxId: string, name: string, addresses: readonly string[], ttlSec: number) => Promise<void>) {
    super();
  }

  /** Settles once the kernel's sets hold the addresses (the DNS answer waits for it: DNS_PIN_NOTE). */
  override pin(sandboxId: string, name: string, addresses: readonly string[], ttlSec: number): Promise<void> {
    super.pin(sandboxId, name, addresses, ttlSec);
    if (addresses.length === 0) return Promise.resolve();
    return this.toKernel(sandboxId, normalizeDomain(name), addresses, Math.min(MAX_PIN_SECONDS, Math.max(MIN_PIN_SECONDS, ttlSec)));
  }
}

/**
 * The host side of a sandbox's egress (EGRESS_POLICY_NOTE, NFT_RULESET_NOTE): Cubicle's DNS
 * forwarder, the egress proxy every sandbox TCP connection is redirected to, and the reader of
 * the packets the kernel logs for UDP/ICMP flows, sharing one set of rules (EgressRules) and one audit log.
 */
export function createEgressService(options: EgressServiceOptions): EgressService {
  let hostAddresses = new Set<string>();
  let hostAddressesRead = 0;
  const readHostAddresses = (): ReadonlySet<string> => {
    if (Date.now() - hostAddressesRead > HOST_ADDRESSES_REFRESH_MS) {
      hostAddresses = new Set(Object.values(os.networkInterfaces()).flatMap((list) => (list ?? []).filter((a) => a.family === "IPv4").map((a) => a.address)));
      hostAddressesRead = Date.now();
    }
    return hostAddresses;
  };
  const rules = new EgressRules({ sandboxSubnet: options.subnet, privateAllowed: options.privateAllowed, hostAddresses: readHostAddresses });
  // Records name the runtime id; the log keys them by sandbox id. The proxy updates its record in
  // place until the connection closes, so the same object is audited, not a copy.
  const audit = (record: EgressRecord) => {
    record.sandboxId = options.sandboxIdOf(record.sandboxId) ?? record.sandboxId;
    options.audit.record(record);
  };
  const pinned = new KernelPinnedAddresses((sandboxId, name, addresses, ttlSec) =>
    options.pinInKernel(sandboxId, name, addresses, ttlSec).catch((err) => log.warn("could not pin addresses in nftables", { sandboxId, error: String(err) })),
  );

  const dns: DnsForwarder = createDnsForwarder({
    listenHost: "0.0.0.0",
    port: 0,
    upstreams: options.dnsUpstreams,
    sandboxFor: (address) => options.sandboxAt(address),
    mayResolve: (sandbox, name) => rules.mayResolve(sandbox.policy, name),
    pinned,
    audit,
  });

  const proxy: EgressProxy = createEgressProxy({
    listenHost: "0.0.0.0",
    port: 0,
    originalDestination: loadOriginalDestination(path.join(options.distDir, "network", "original-dst.node")),
    sandboxFor: (address) => options.sandboxAt(address),
    decide(sandbox, target) {
      const { policy, sandboxId } = sandbox;
      let domain: { name: string; pinned: boolean } | undefined;
      if (target.domain) {
        domain = { name: target.domain, pinned: pinned.isPinned(sandboxId, target.domain, target.address) };
      } else {
        // No SNI or Host: an allowed name the sandbox's DNS resolved to this address, if any.
        const name = pinned.namesFor(sandboxId, target.address).find((candidate) => policy.allowDomains.some((pattern) => domainMatches(pattern, candidate)));
        if (name) domain = { name, pinned: true };
      }
      const verdict = rules.decide(policy, target.address, domain);
      if (!verdict.allowed) return verdict;
      if (!target.domain) {
        /*
         * H2C_NOTE: cleartext HTTP/2 with prior knowledge names its host only inside HPACK, after
         * the preface. If the sandbox's DNS resolved names with header rules to this address,
         * the connection is intercepted for those names (h2-injection.ts): each stream must carry
         * one of them as :authority (else 421) and leaves with that name's headers. Several such
         * names on one address (virtual hosts): the connection carries requests for each of them,
         * every stream with its own name's headers; the audit shows the first the sandbox resolved.
         */
        if (!target.h2c) return verdict;
        let first: { name: string; headers: Record<string, string> } | undefined;
        const otherHosts: Record<string, Record<string, string>> = {};
        for (const name of pinned.namesFor(sandboxId, target.address)) {
          const rule = headerRuleFor(policy, name);
          if (!rule) continue;
          if (!first) first = { name, headers: rule.headers };
          else if (name !== first.name) otherHosts[name] = rule.headers;
        }
        if (!first) return verdict;
        return { ...verdict, headers: first.headers, domain: first.name, ...(Object.keys(otherHosts).length > 0 ? { otherHosts } : {}) };
      }
      const rule = headerRuleFor(policy, target.domain);
      if (!rule) return verdict;
      // Credentials go only to an address the sandbox's own DNS gave for that name (and, for
      // TLS, to a peer whose certificate proves the name): never to an address a process picked.
      if (!domain?.pinned) return { allowed: false, reason: `${target.domain} has header rules, but the sandbox's DNS did not resolve it to ${target.address}` };
      return { ...verdict, headers: rule.headers };
    },
    audit,
    finished: (record) => options.audit.finished(record),
    issueCertificate: options.issueCertificate,
    upstreamCa: options.upstreamCa,
    resolveSecret: options.resolveSecret,
  });

  const kernelLog = new KernelEgressLog({
    firstGroup: firstLogGroup(options.tableName),
    helperPath: path.join(options.distDir, "sandbox-helper"),
    subnet: options.subnet,
    sandboxFor: (address) => options.sandboxAt(address)?.sandboxId,
    audit,
    finished: (record) => options.audit.finished(record),
  });

  return {
    async start() {
      const [dnsPort, proxyPort] = await Promise.all([dns.listen(), proxy.listen()]);
      const logGroup = await kernelLog.start();
      log.info("egress services listening", { dnsPort, proxyPort, logGroup });
      return { dns: dnsPort, proxy: proxyPort, logGroup };
    },
    policyChanged(runtimeId) {
      proxy.policyChanged(runtimeId);
    },
    livePins(runtimeId) {
      return pinned.live(runtimeId);
    },
    released(runtimeId, address) {
      proxy.policyChanged(runtimeId);
      pinned.drop(runtimeId);
      if (address) kernelLog.released(address);
    },
    async stop() {
      await Promise.allSettled([dns.close(), proxy.close(), kernelLog.stop()]);
    },
  };
}
