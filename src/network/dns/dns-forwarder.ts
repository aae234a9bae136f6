/**
 * The DNS forwarder every sandbox query ends up at: nftables redirects a sandbox's UDP and TCP
 * port 53 traffic, whatever its destination, to this server in the Cubicle process. It knows
 * the sandbox by the source address, refuses names the sandbox's policy does not allow (so no
 * data leaves through queries for denied names), forwards the others to the host's resolvers,
 * pins the addresses it answered for the egress proxy, and audits every decision.
 *
 * Choices worth knowing:
 * - AAAA queries for allowed names are answered NODATA without asking upstream: sandboxes have
 *   no IPv6, and an empty answer makes getaddrinfo() and happy-eyeballs clients use IPv4 at once
 *   instead of trying an address they cannot reach. They are not audited (nothing left the host).
 * - The audit record's address is where the query arrived: the local address of the TCP
 *   connection (after the redirect, the host end of the sandbox's link), for UDP the forwarder's
 *   listen address (Node does not report a datagram's destination); the port is 53, the port
 *   every redirected query was sent to. The original destination is lost in the redirect.
 * - A query to upstream is built afresh (random id, a new socket so a new random source port,
 *   only the question, RD and CD of the sandbox's query, EDNS only if the sandbox used it):
 *   nothing else a sandbox puts into a query reaches upstream.
 * - The answer is returned as upstream sent it, with the sandbox's id put back; when it is
 *   larger than the sandbox's UDP size, a truncated answer is sent instead so it asks over TCP.
 */
import { randomInt } from "node:crypto";
import dgram from "node:dgram";
import { readFile } from "node:fs/promises";
import net from "node:net";
import { CubicleError } from "../../shared/cubicle-error.js";
import { createLogger } from "../../shared/log.js";
import type { EgressPolicy, EgressRecord } from "../egress-types.js";
import {
  DnsClass,
  DnsOpcode,
  DnsRcode,
  DnsType,
  MAX_MESSAGE_BYTES,
  asciiLowerCase,
  buildQuery,
  buildResponse,
  parseDnsHeader,
  parseDnsMessage,
  typeName,
  type DnsHeader,
  type DnsMessage,
  type DnsQuestion,
} from "./dns-message.js";
import type { PinnedAddresses } from "./pinned-addresses.js";

const log = createLogger("dns-forwarder");

export interface DnsUpstream {
  address: string;
  port: number;
}

/** The sandbox a query came from. */
export interface DnsSandbox {
  sandboxId: string;
  policy: EgressPolicy;
}

export interface DnsForwarderLimits {
  /** Queries a sandbox may send per second (also the burst); more are refused. Default 100. */
  queriesPerSecondPerSandbox?: number;
  /** Queries of one sandbox being answered at once; more are refused. Default 64. */
  maxInFlightPerSandbox?: number;
  /** How long one query may take upstream, both tries and a TCP fallback included. Default 4000. */
  timeoutMs?: number;
  /** Open TCP connections per sandbox; more are closed at once. Default 16. */
  maxTcpConnectionsPerSandbox?: number;
  /**
   * A TCP connection is closed when no complete query arrived for this long (a client that
   * sends a length and stalls, or dribbles a byte at a time, is cut off too). Default 10000.
   */
  tcpIdleTimeoutMs?: number;
}

export interface DnsForwarderOptions {
  listenHost: string;
  /** 0 = a free port. UDP and TCP listen on the same port. */
  port: number;
  /** Default: the nameservers of /etc/resolv.conf, read when listening. */
  upstreams?: DnsUpstream[];
  /** The sandbox behind a source address; undefined → REFUSED, never forwarded. */
  sandboxFor(remoteAddress: string): DnsSandbox | undefined;
  /** Whether the sandbox may resolve `name` (lowercase, no trailing dot). */
  mayResolve(sandbox: DnsSandbox, name: string): { allowed: boolean; reason: string };
  pinned: PinnedAddresses;
  audit(record: EgressRecord): void;
  limits?: DnsForwarderLimits;
}

export interface DnsForwarder {
  /** Starts listening; resolves with the port. */
  listen(): Promise<number>;
  close(): Promise<void>;
}

const DEFAULTS = {
  queriesPerSecondPerSandbox: 100,
  maxInFlightPerSandbox: 64,
  timeoutMs: 4000,
  maxTcpConnectionsPerSandbox: 16,
  tcpIdleTimeoutMs: 10_000,
} satisfies Required<DnsForwarderLimits>;

/** Queries per second, and TCP connections, from addresses that are no sandbox (all together). */
const UNKNOWN_SOURCE_QPS = 50;
const UNKNOWN_SOURCE_TCP_CONNECTIONS = 8;
/** The UDP size a query without EDNS may get (RFC 1035 §4.2.1), and the most we pass on. */
const PLAIN_UDP_BYTES = 512;
const MAX_UDP_BYTES = 4096;
/** What the forwarder advertises upstream when the sandbox used EDNS (DNS flag day 2020). */
const UPSTREAM_EDNS_BYTES = 1232;
/** A TCP client that does not read its answers is cut off past this much unsent output. */
const MAX_TCP_PENDING_OUTPUT = 256 * 1024;
/** Rate-limit records per sandbox: at most one per this many milliseconds. */
const LIMIT_AUDIT_INTERVAL_MS = 1000;
const SWEEP_INTERVAL_MS = 30_000;
/** The longest a DNS answer waits for its addresses to be pinned in the kernel (DNS_PIN_NOTE). */
const PIN_WAIT_MS = 1000;
/** Types never forwarded: zone transfers and ANY (amplification, and a whole zone at once). */
const REFUSED_TYPES = new Set<number>([DnsType.ANY, DnsType.AXFR, DnsType.IXFR, DnsType.MAILA, DnsType.MAILB, DnsType.OPT]);
/** Host names, SRV and DKIM style `_labels`; anything else (spaces, dots inside labels, bytes) is refused. */
const QUERYABLE_NAME = /^(?:[a-z0-9_-]+(?:\.[a-z0-9_-]+)*)?$/;

/** The IPv4 and IPv6 nameservers of a resolv.conf, port 53, in order. */
export async function readResolvConfNameservers(path = "/etc/resolv.conf"): Promise<DnsUpstream[]> {
  const text = await readFile(path, "utf8");
  const upstreams: DnsUpstream[] = [];
  for (const line of text.split("\n")) {
    const match = /^\s*nameserver\s+(\S+)/.exec(line);
    if (match && net.isIP(match[1]!) !== 0) upstreams.push({ address: match[1]!, port: 53 });
  }
  return upstreams;
}

interface Client {
  address: string;
  /** Where the query arrived (for the audit record). */
  localAddress: string;
  transport: "udp" | "tcp";
}

interface TokenBucket {
  tokens: number;
  refilledAt: number;
}

interface SandboxState {
  bucket: TokenBucket;
  inFlight: number;
  tcpConnections: number;
  lastSeenAt: number;
  lastLimitAuditAt: number;
  refusedSinceAudit: number;
}

interface UpstreamReply {
  bytes: Buffer;
  message: DnsMessage;
}

function takeToken(bucket: TokenBucket, perSecond: number, now: number): boolean {
  bucket.tokens = Math.min(perSecond, bucket.tokens + ((now - bucket.refilledAt) * perSecond) / 1000);
  bucket.refilledAt = now;
  if (bucket.tokens < 1) return false;
  bucket.tokens -= 1;
  return true;
}

function unmapIPv4(address: string): string {
  return address.startsWith("::ffff:") && net.isIPv4(address.slice(7)) ? address.slice(7) : address;
}

function frame(message: Buffer): Buffer {
  const framed = Buffer.alloc(2 + message.length);
  framed.writeUInt16BE(message.length);
  message.copy(framed, 2);
  return framed;
}

export function createDnsForwarder(options: DnsForwarderOptions): DnsForwarder {
  const limits = { ...DEFAULTS, ...options.limits };
  let upstreams: DnsUpstream[] = options.upstreams ?? [];
  const sandboxes = new Map<string, SandboxState>();
  const unknownBucket: TokenBucket = { tokens: UNKNOWN_SOURCE_QPS, refilledAt: Date.now() };
  let unknownTcpConnections = 0;
  let lastUnknownLogAt = 0;
  /** Aborts every upstream exchange still running (on close). */
  const exchanges = new Set<() => void>();
  const tcpSockets = new Set<net.Socket>();
  let udpServer: dgram.Socket | undefined;
  let tcpServer: net.Server | undefined;
  let sweepTimer: NodeJS.Timeout | undefined;
  let closed = false;

  const stateFor = (sandboxId: string, now: number): SandboxState => {
    let state = sandboxes.get(sandboxId);
    if (!state) {
      state = { bucket: { tokens: limits.queriesPerSecondPerSandbox, refilledAt: now }, inFlight: 0, tcpConnections: 0, lastSeenAt: now, lastLimitAuditAt: 0, refusedSinceAudit: 0 };
      sandboxes.set(sandboxId, state);
    }
    state.lastSeenAt = now;
    return state;
  };

  const lookupSandbox = (address: string): DnsSandbox | undefined => {
    try {
      return options.sandboxFor(address);
    } catch (error) {
      log.warn("sandboxFor failed; refusing the query", { address, error: String(error) });
      return undefined;
    }
  };

  const audit = (sandbox: DnsSandbox, client: Client, domain: string | undefined, verdict: EgressRecord["verdict"], reason: string) => {
    try {
      options.audit({ time: Date.now(), sandboxId: sandbox.sandboxId, protocol: "dns", address: client.localAddress, port: 53, domain, verdict, reason, bytesOut: undefined, bytesIn: undefined, durationMs: undefined });
    } catch (error) {
      log.warn("audit failed", { error: String(error) });
    }
  };

  /** A refusal for going over a limit: audited at most once a second per sandbox, with a count. */
  const overLimit = (sandbox: DnsSandbox, state: SandboxState, client: Client, domain: string | undefined, what: string) => {
    state.refusedSinceAudit++;
    const now = Date.now();
    if (now - state.lastLimitAuditAt < LIMIT_AUDIT_INTERVAL_MS) return;
    audit(sandbox, client, domain, "denied", `rate limited: ${what} (${state.refusedSinceAudit} refused since the last record)`);
    state.lastLimitAuditAt = now;
    state.refusedSinceAudit = 0;
  };

  const reply = (request: { header: DnsHeader; questions: DnsQuestion[] }, rcode: number) => buildResponse(request, { rcode });

  /** Answers one query from a client (the bytes of one datagram or one TCP frame); undefined = no answer. */
  const handle = async (bytes: Buffer, client: Client): Promise<Buffer | undefined> => {
    let header: DnsHeader;
    try {
      header = parseDnsHeader(bytes);
    } catch {
      return undefined; // too short to carry an id: nothing to answer
    }
    if (header.qr) return undefined; // never answer an answer: two resolvers could loop forever
    let message: DnsMessage | undefined;
    try {
      message = parseDnsMessage(bytes);
    } catch {
      message = undefined;
    }
    const question = message?.questions.length === 1 ? message.questions[0] : undefined;
    const echo = { header, questions: question ? [question] : [] };
    const domain = question ? asciiLowerCase(question.name) : undefined;
    const now = Date.now();

    const sandbox = lookupSandbox(client.address);
    if (!sandbox) {
      if (!takeToken(unknownBucket, UNKNOWN_SOURCE_QPS, now)) return undefined;
      if (now - lastUnknownLogAt >= LIMIT_AUDIT_INTERVAL_MS) {
        lastUnknownLogAt = now;
        log.info("refused a DNS query from an address that is no sandbox", { address: client.address, transport: client.transport });
      }
      return reply(echo, DnsRcode.REFUSED);
    }
    const state = stateFor(sandbox.sandboxId, now);
    if (!takeToken(state.bucket, limits.queriesPerSecondPerSandbox, now)) {
      overLimit(sandbox, state, client, domain, `more than ${limits.queriesPerSecondPerSandbox} queries per second`);
      return reply(echo, DnsRcode.REFUSED);
    }
    if (state.inFlight >= limits.maxInFlightPerSandbox) {
      overLimit(sandbox, state, client, domain, `more than ${limits.maxInFlightPerSandbox} queries in flight`);
      return reply(echo, DnsRcode.REFUSED);
    }
    state.inFlight++;
    try {
      return await answer(sandbox, client, header, message, echo);
    } finally {
      state.inFlight--;
    }
  };

  const answer = async (sandbox: DnsSandbox, client: Client, header: DnsHeader, message: DnsMessage | undefined, echo: { header: DnsHeader; questions: DnsQuestion[] }): Promise<Buffer | undefined> => {
    const refuse = (domain: string | undefined, rcode: number, reason: string) => {
      audit(sandbox, client, domain, "denied", reason);
      return reply(echo, rcode);
    };
    if (!message) return refuse(undefined, DnsRcode.FORMERR, "malformed query");
    if (header.opcode !== DnsOpcode.QUERY) return refuse(undefined, DnsRcode.REFUSED, `opcode ${header.opcode} is not supported`);
    if (message.questions.length !== 1) return refuse(undefined, DnsRcode.FORMERR, `${message.questions.length} questions in one query`);
    const question = message.questions[0]!;
    const domain = asciiLowerCase(question.name);
    if (question.class !== DnsClass.IN) return refuse(domain, DnsRcode.REFUSED, `query class ${question.class} is not supported`);
    if (REFUSED_TYPES.has(question.type)) return refuse(domain, DnsRcode.REFUSED, `${typeName(question.type)} queries are not supported`);
    if (!QUERYABLE_NAME.test(domain)) return refuse(domain, DnsRcode.REFUSED, "name has characters other than letters, digits, '-' and '_'");
    if (!sandbox.policy.allowInternet) return refuse(domain, DnsRcode.REFUSED, "internet access is off");
    let verdict: { allowed: boolean; reason: string };
    try {
      verdict = options.mayResolve(sandbox, domain);
    } catch (error) {
      log.warn("mayResolve failed; refusing the query", { domain, error: String(error) });
      verdict = { allowed: false, reason: "policy check failed" };
    }
    if (!verdict.allowed) return refuse(domain, DnsRcode.REFUSED, verdict.reason);
    // Sandboxes have no IPv6: an empty answer sends clients to IPv4 at once (see the file comment).
    if (question.type === DnsType.AAAA) return buildResponse(echo, { rcode: DnsRcode.NOERROR });
    audit(sandbox, client, domain, "allowed", verdict.reason);

    const opt = message.additionals.find((record) => record.type === DnsType.OPT);
    const upstream = await resolve(question, header, opt !== undefined, client.transport);
    if (!upstream) return reply(echo, DnsRcode.SERVFAIL);
    if (upstream.message.header.rcode === DnsRcode.NOERROR) await pin(sandbox.sandboxId, question.name, upstream.message);
    const bytes = Buffer.from(upstream.bytes);
    bytes.writeUInt16BE(header.id, 0);
    const clientLimit = client.transport === "tcp" ? MAX_MESSAGE_BYTES : opt ? Math.min(MAX_UDP_BYTES, Math.max(PLAIN_UDP_BYTES, opt.class)) : PLAIN_UDP_BYTES;
    if (bytes.length > clientLimit) return buildResponse(echo, { rcode: upstream.message.header.rcode, truncated: true });
    return bytes;
  };

  /**
   * Pins the A records of the asked name and of every name along its CNAME chain, for each of
   * those names.
   *
   * DNS_PIN_NOTE: the answer goes back only once the pins are in place everywhere, the kernel's
   * sets included (an allowlist's UDP/ICMP, the header hosts' UDP refusal): a client that sends
   * its first datagram the moment it has the address must meet the rules that address brings.
   * A kernel pin that takes longer than PIN_WAIT_MS is not waited for further.
   */
  const pin = async (sandboxId: string, asked: string, message: DnsMessage): Promise<void> => {
    const chain = new Set([asciiLowerCase(asked)]);
    // A chain can list its CNAMEs in any order: repeat until nothing new (at most one pass per record).
    for (let pass = 0; pass <= message.answers.length; pass++) {
      let grew = false;
      for (const record of message.answers) {
        if (record.data.kind === "cname" && chain.has(asciiLowerCase(record.name)) && !chain.has(asciiLowerCase(record.data.target))) {
          chain.add(asciiLowerCase(record.data.target));
          grew = true;
        }
      }
      if (!grew) break;
    }
    const addresses: string[] = [];
    let ttl = Infinity;
    for (const record of message.answers) {
      if (record.data.kind === "a" && chain.has(asciiLowerCase(record.name))) {
        addresses.push(record.data.address);
        ttl = Math.min(ttl, record.ttl);
      }
    }
    if (addresses.length === 0) return;
    const pinned = Promise.all([...chain].map((name) => options.pinned.pin(sandboxId, name, addresses, ttl)));
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([pinned, new Promise((resolve) => (timer = setTimeout(resolve, PIN_WAIT_MS)))]);
    clearTimeout(timer);
  };

  /** Asks upstream: two tries (the second on the next upstream, if any), a TCP fallback on TC. */
  const resolve = async (question: DnsQuestion, header: DnsHeader, edns: boolean, transport: "udp" | "tcp"): Promise<UpstreamReply | undefined> => {
    if (upstreams.length === 0) return undefined;
    const deadline = Date.now() + limits.timeoutMs;
    const makeQuery = () => {
      const id = randomInt(0x10000);
      const bytes = buildQuery({ id, question, recursionDesired: header.rd, checkingDisabled: header.cd, ednsUdpSize: edns ? UPSTREAM_EDNS_BYTES : undefined });
      return { id, bytes };
    };
    for (let attempt = 0; attempt < 2 && !closed; attempt++) {
      const upstream = upstreams[attempt % upstreams.length]!;
      const budget = Math.min(deadline - Date.now(), attempt === 0 ? Math.ceil(limits.timeoutMs / 2) : Infinity);
      if (budget <= 0) break;
      const query = makeQuery();
      const exchange = transport === "tcp" ? exchangeTcp : exchangeUdp;
      const answered = await exchange(upstream, query.bytes, (bytes) => acceptAnswer(bytes, query.id, question), budget);
      if (!answered) continue;
      if (transport === "udp" && answered.message.header.tc) {
        const retry = makeQuery();
        return exchangeTcp(upstream, retry.bytes, (bytes) => acceptAnswer(bytes, retry.id, question), deadline - Date.now());
      }
      return answered;
    }
    return undefined;
  };

  /** Runs an exchange that `close()` can abort; `run` gets a `finish` that settles it once. */
  const track = (budgetMs: number, run: (finish: (reply: UpstreamReply | undefined) => void) => () => void): Promise<UpstreamReply | undefined> =>
    new Promise((resolvePromise) => {
      let cleanup: () => void = () => {};
      let settled = false;
      const finish = (result: UpstreamReply | undefined) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        exchanges.delete(abort);
        try {
          cleanup();
        } catch {
          // already closed
        }
        resolvePromise(result);
      };
      const abort = () => finish(undefined);
      const timer = setTimeout(abort, Math.max(1, budgetMs));
      exchanges.add(abort);
      try {
        cleanup = run(finish);
      } catch {
        finish(undefined);
      }
      if (settled) cleanup(); // finished before `run` returned its cleanup
    });

  const exchangeUdp = (upstream: DnsUpstream, query: Buffer, accept: (bytes: Buffer) => DnsMessage | undefined, budgetMs: number) =>
    track(budgetMs, (finish) => {
      // A new socket per query: the kernel picks a new random source port (RFC 5452 §9.2).
      const socket = dgram.createSocket(net.isIPv6(upstream.address) ? "udp6" : "udp4");
      socket.on("error", () => finish(undefined));
      socket.on("message", (bytes) => {
        const message = accept(bytes);
        if (message) finish({ bytes, message }); // anything else (a stale or forged answer) is ignored
      });
      socket.connect(upstream.port, upstream.address, () => {
        socket.send(query, (error) => {
          if (error) finish(undefined);
        });
      });
      return () => socket.close();
    });

  const exchangeTcp = (upstream: DnsUpstream, query: Buffer, accept: (bytes: Buffer) => DnsMessage | undefined, budgetMs: number) =>
    track(budgetMs, (finish) => {
      const socket = net.connect({ host: upstream.address, port: upstream.port });
      const chunks: Buffer[] = [];
      let received = 0;
      socket.on("connect", () => socket.write(frame(query)));
      socket.on("data", (chunk: Buffer) => {
        chunks.push(chunk);
        received += chunk.length;
        if (received < 2) return;
        const all = Buffer.concat(chunks, received);
        const length = all.readUInt16BE(0);
        if (received < 2 + length) return;
        const bytes = all.subarray(2, 2 + length);
        const message = accept(bytes);
        finish(message ? { bytes, message } : undefined);
      });
      socket.on("error", () => finish(undefined));
      socket.on("close", () => finish(undefined));
      return () => socket.destroy();
    });

  const acceptAnswer = (bytes: Buffer, id: number, question: DnsQuestion): DnsMessage | undefined => {
    let message: DnsMessage;
    try {
      message = parseDnsMessage(bytes);
    } catch {
      return undefined;
    }
    const echoed = message.questions[0];
    const matches =
      message.header.id === id &&
      message.header.qr &&
      message.header.opcode === DnsOpcode.QUERY &&
      message.questions.length === 1 &&
      echoed !== undefined &&
      echoed.type === question.type &&
      echoed.class === question.class &&
      asciiLowerCase(echoed.name) === asciiLowerCase(question.name);
    return matches ? message : undefined;
  };

  const serveTcp = (socket: net.Socket) => {
    socket.on("error", () => {});
    if (closed) return void socket.destroy();
    const client: Client = { address: unmapIPv4(socket.remoteAddress ?? ""), localAddress: unmapIPv4(socket.localAddress ?? options.listenHost), transport: "tcp" };
    const now = Date.now();
    const sandbox = lookupSandbox(client.address);
    const state = sandbox ? stateFor(sandbox.sandboxId, now) : undefined;
    if (sandbox && state) {
      if (state.tcpConnections >= limits.maxTcpConnectionsPerSandbox) {
        overLimit(sandbox, state, client, undefined, `more than ${limits.maxTcpConnectionsPerSandbox} TCP connections`);
        return void socket.destroy();
      }
      state.tcpConnections++;
    } else {
      if (unknownTcpConnections >= UNKNOWN_SOURCE_TCP_CONNECTIONS) return void socket.destroy();
      unknownTcpConnections++;
    }
    tcpSockets.add(socket);
    let idleTimer = setTimeout(() => socket.destroy(), limits.tcpIdleTimeoutMs);
    const stillActive = () => {
      clearTimeout(idleTimer);
      idleTimer = setTimeout(() => socket.destroy(), limits.tcpIdleTimeoutMs);
    };
    socket.on("close", () => {
      clearTimeout(idleTimer);
      tcpSockets.delete(socket);
      if (state) state.tcpConnections--;
      else unknownTcpConnections--;
    });

    let chunks: Buffer[] = [];
    let buffered = 0;
    socket.on("data", (chunk: Buffer) => {
      chunks.push(chunk);
      buffered += chunk.length;
      // RFC 7766 §8: a frame is a 16-bit length and a message; several may be pipelined.
      while (buffered >= 2) {
        const all = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, buffered);
        chunks = [all];
        const length = all.readUInt16BE(0);
        if (length < 12) return void socket.destroy(); // cannot be a DNS message
        if (buffered < 2 + length) return;
        const query = Buffer.from(all.subarray(2, 2 + length));
        chunks = [all.subarray(2 + length)];
        buffered -= 2 + length;
        stillActive();
        handle(query, client).then(
          (response) => {
            if (!response || socket.destroyed) return;
            if (socket.writableLength > MAX_TCP_PENDING_OUTPUT) return void socket.destroy(); // it does not read
            socket.write(frame(response));
            stillActive();
          },
          (error: unknown) => log.error("DNS query over TCP failed", { error: String(error) }),
        );
      }
    });
  };

  const serveUdp = (bytes: Buffer, remote: dgram.RemoteInfo) => {
    const server = udpServer;
    if (!server || closed) return;
    const client: Client = { address: unmapIPv4(remote.address), localAddress: options.listenHost, transport: "udp" };
    handle(bytes, client).then(
      (response) => {
        if (response && !closed) server.send(response, remote.port, remote.address, () => {});
      },
      (error: unknown) => log.error("DNS query over UDP failed", { error: String(error) }),
    );
  };

  const bindBoth = async (port: number): Promise<number> => {
    const udp = dgram.createSocket(net.isIPv6(options.listenHost) ? "udp6" : "udp4");
    udp.on("message", serveUdp);
    await new Promise<void>((resolvePromise, reject) => {
      udp.once("error", reject);
      udp.bind(port, options.listenHost, () => {
        udp.off("error", reject);
        resolvePromise();
      });
    });
    udp.on("error", (error) => log.warn("DNS forwarder UDP socket error", { error: String(error) }));
    const bound = udp.address().port;
    const tcp = net.createServer(serveTcp);
    try {
      await new Promise<void>((resolvePromise, reject) => {
        tcp.once("error", reject);
        tcp.listen(bound, options.listenHost, () => {
          tcp.off("error", reject);
          resolvePromise();
        });
      });
    } catch (error) {
      udp.close();
      throw error;
    }
    tcp.on("error", (error) => log.warn("DNS forwarder TCP server error", { error: String(error) }));
    udpServer = udp;
    tcpServer = tcp;
    return bound;
  };

  return {
    async listen() {
      if (upstreams.length === 0) upstreams = await readResolvConfNameservers();
      if (upstreams.length === 0) throw new CubicleError("failed_precondition", "no upstream DNS server: /etc/resolv.conf lists no nameserver; add one or pass upstreams");
      let bound: number | undefined;
      for (let attempt = 0; bound === undefined; attempt++) {
        try {
          bound = await bindBoth(options.port);
        } catch (error) {
          // With a free port, TCP may find its number taken: try another (a few times).
          if (options.port !== 0 || attempt >= 10) throw CubicleError.from(error, "unavailable");
        }
      }
      sweepTimer = setInterval(() => {
        const now = Date.now();
        for (const [sandboxId, state] of sandboxes) {
          if (state.inFlight === 0 && state.tcpConnections === 0 && now - state.lastSeenAt > SWEEP_INTERVAL_MS) sandboxes.delete(sandboxId);
        }
      }, SWEEP_INTERVAL_MS);
      sweepTimer.unref();
      log.info("DNS forwarder listening", { host: options.listenHost, port: bound, upstreams: upstreams.map((upstream) => `${upstream.address}:${upstream.port}`) });
      return bound;
    },

    async close() {
      closed = true;
      clearInterval(sweepTimer);
      for (const abort of [...exchanges]) abort();
      for (const socket of tcpSockets) socket.destroy();
      await Promise.all([
        new Promise<void>((resolvePromise) => (tcpServer ? tcpServer.close(() => resolvePromise()) : resolvePromise())),
        new Promise<void>((resolvePromise) => (udpServer ? udpServer.close(() => resolvePromise()) : resolvePromise())),
      ]);
    },
  };
}
