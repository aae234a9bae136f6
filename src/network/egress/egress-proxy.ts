import net from "node:net";
import { CubicleError } from "../../shared/cubicle-error.js";
import { createLogger } from "../../shared/log.js";
import type { EgressPolicy, EgressProxyConfig, EgressRecord } from "../egress-types.js";
import { startInjection, type Injection } from "./header-injection.js";
import { peekDomain } from "./peek.js";
import { socks5Connect, Socks5Error } from "./socks5-client.js";

const log = createLogger("egress-proxy");

/** What the policy says of one connection. */
export interface EgressVerdict {
  allowed: boolean;
  reason: string;
  /** The header rule's headers for this host (values may hold `${e2b.secrets.NAME}`): intercept and set them. */
  headers?: Record<string, string>;
  /**
   * The host the headers are for when the connection named none in its first bytes (cleartext
   * h2: H2C_NOTE); each request must then name it or one of `otherHosts`.
   */
  domain?: string;
  /** Cleartext h2: the other names with header rules the connection may carry, with their headers (H2C_NOTE). */
  otherHosts?: Record<string, Record<string, string>>;
}

export interface EgressSandbox {
  sandboxId: string;
  policy: EgressPolicy;
}

/** Where a sandbox's connection was going: the original destination and the name its first bytes gave. */
export interface EgressTarget {
  address: string;
  port: number;
  domain?: string;
  domainSource?: "sni" | "host";
  /** The first bytes were HTTP/2's preface (cleartext, prior knowledge): H2C_NOTE. */
  h2c?: boolean;
}

export interface EgressProxyLimits {
  /** Concurrent connections of one sandbox; default 256. */
  maxConnectionsPerSandbox?: number;
  /** Concurrent connections of all sandboxes; default 8192. */
  maxConnections?: number;
  /** How long to wait for the first bytes (SNI, Host); default 400 ms. */
  peekTimeoutMs?: number;
  /** Connect to the destination or the SOCKS5 proxy, negotiation included; default 10 s. */
  connectTimeoutMs?: number;
  /** A connection with no traffic this long is closed; default 15 min. */
  idleTimeoutMs?: number;
}

export interface EgressProxyOptions {
  listenHost: string;
  /** 0: any free port (listen() says which). */
  port: number;
  /** The destination before nftables' redirect; production: loadOriginalDestination(addon). */
  originalDestination(socket: net.Socket): { address: string; port: number };
  /** The sandbox behind a source address; undefined: not a sandbox, the connection is refused. */
  sandboxFor(remoteAddress: string): EgressSandbox | undefined;
  decide(sandbox: EgressSandbox, target: EgressTarget): EgressVerdict;
  /**
   * Called once per attempt, when it is decided (for an allowed one: when its upstream is
   * connected, or the failure to connect it). An allowed connection's record keeps being updated
   * in place (bytesOut, bytesIn, durationMs) until it closes, then `finished` is called with it.
   */
  audit(record: EgressRecord): void;
  finished?(record: EgressRecord): void;
  /** A leaf certificate for `hostname`, issued by Cubicle's CA, to intercept TLS for header rules. */
  issueCertificate(hostname: string): Promise<{ key: string | Buffer; cert: string | Buffer }>;
  /** CAs trusted for upstream TLS in addition to Node's roots. */
  upstreamCa?: (string | Buffer)[];
  resolveSecret(name: string): string | undefined;
  limits?: EgressProxyLimits;
}

export interface EgressProxy {
  /** Starts listening; resolves with the port. */
  listen(): Promise<number>;
  /** Stops listening and closes every connection. */
  close(): Promise<void>;
  /**
   * Decides again every open connection of the sandbox with its original target and closes those
   * now denied, or whose upstream (direct, which SOCKS5 proxy) or interception changed. An
   * intercepted connection that stays picks up the new headers for its next request.
   */
  policyChanged(sandboxId: string): void;
  /** Open connections (being peeked, or relayed), of one sandbox or all. */
  openConnections(sandboxId?: string): number;
}

interface OpenConnection {
  sandboxId: string;
  remoteAddress: string;
  /** Undefined until decided. */
  target: EgressTarget | undefined;
  upstreamKey: string | undefined;
  /** An intercepted connection's hosts and their rules' headers (one host but for cleartext h2). */
  hostHeaders: Map<string, Record<string, string>> | undefined;
  /** The host whose headers an intercepted connection carries (cleartext h2: the first). */
  interceptDomain: string | undefined;
  close(reason: string): void;
}

const DEFAULTS = { maxConnectionsPerSandbox: 256, maxConnections: 8192, peekTimeoutMs: 400, connectTimeoutMs: 10_000, idleTimeoutMs: 15 * 60_000 };

/** The host-side transparent proxy every TCP connection of a sandbox is redirected to. */
export function createEgressProxy(options: EgressProxyOptions): EgressProxy {
  const limits = { ...DEFAULTS, ...options.limits };
  const bySandbox = new Map<string, Set<OpenConnection>>();
  let total = 0;
  let listening: net.AddressInfo | undefined;

  // No Nagle on either side: a relay that holds small writes back adds a delayed-ACK wait (~40 ms).
  // Every accepted socket until it closes: close() ends them all, tracked by a sandbox or not yet.
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true, noDelay: true }, (client) => {
    sockets.add(client);
    client.once("close", () => sockets.delete(client));
    handleConnection(client).catch((err: unknown) => {
      log.error("egress connection failed", { error: String(err) });
      client.destroy();
    });
  });
  server.on("error", (err) => log.error("egress proxy server error", { error: err.message }));

  function track(connection: OpenConnection): () => void {
    let set = bySandbox.get(connection.sandboxId);
    if (!set) bySandbox.set(connection.sandboxId, (set = new Set()));
    set.add(connection);
    total++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      total--;
      set.delete(connection);
      if (set.size === 0 && bySandbox.get(connection.sandboxId) === set) bySandbox.delete(connection.sandboxId);
    };
  }

  async function handleConnection(client: net.Socket): Promise<void> {
    client.on("error", () => {});
    const remoteAddress = unmapped(client.remoteAddress ?? "");
    const sandbox = options.sandboxFor(remoteAddress);
    if (!sandbox) {
      log.debug("connection from an unknown source refused", { remoteAddress });
      return reset(client);
    }
    let original: { address: string; port: number };
    try {
      original = options.originalDestination(client);
    } catch (err) {
      log.warn("no original destination", { sandboxId: sandbox.sandboxId, error: (err as Error).message });
      return reset(client);
    }
    original = { address: unmapped(original.address), port: original.port };
    const started = Date.now();
    const record: EgressRecord = {
      time: started,
      sandboxId: sandbox.sandboxId,
      protocol: "tcp",
      address: original.address,
      port: original.port,
      domain: undefined,
      verdict: "denied",
      reason: "",
      bytesOut: undefined,
      bytesIn: undefined,
      durationMs: undefined,
    };
    const deny = (reason: string) => {
      record.verdict = "denied";
      record.reason = reason;
      safeAudit(record);
      reset(client);
    };
    // A connection made straight to the proxy's port (not redirected) would loop back into it.
    if (listening && original.port === listening.port && original.address === unmapped(client.localAddress ?? "")) {
      return deny("connection to the egress proxy itself");
    }
    if (total >= limits.maxConnections) return deny("too many connections on this host");
    if ((bySandbox.get(sandbox.sandboxId)?.size ?? 0) >= limits.maxConnectionsPerSandbox) return deny("too many connections from this sandbox");

    let upstream: net.Socket | undefined;
    let injection: Injection | undefined;
    let closed = false;
    const connection: OpenConnection = {
      sandboxId: sandbox.sandboxId,
      remoteAddress,
      target: undefined,
      upstreamKey: undefined,
      hostHeaders: undefined,
      interceptDomain: undefined,
      close(reason) {
        if (closed) return;
        log.info("egress connection closed", { sandboxId: record.sandboxId, address: record.address, port: record.port, domain: record.domain, reason });
        injection?.close();
        upstream?.destroy();
        reset(client);
      },
    };
    const release = track(connection);
    let finishedOnce = false;
    const finish = () => {
      if (finishedOnce) return;
      finishedOnce = true;
      closed = true;
      release();
      if (record.verdict === "allowed") {
        record.durationMs = Date.now() - started;
        try {
          options.finished?.(record);
        } catch (err) {
          log.error("egress finished callback failed", { error: String(err) });
        }
      }
    };
    client.on("close", () => {
      if (!upstream && !injection) finish();
    });

    const peek = await peekDomain(client, limits.peekTimeoutMs);
    const target: EgressTarget = { ...original, domain: peek.domain, domainSource: peek.domainSource, ...(peek.h2Preface ? { h2c: true } : {}) };
    record.domain = peek.domain;
    connection.target = target;
    // The policy may have changed while the first bytes came.
    const current = options.sandboxFor(remoteAddress);
    if (!current || current.sandboxId !== sandbox.sandboxId) {
      deny("sandbox gone");
      return finish();
    }
    let verdict: EgressVerdict;
    try {
      verdict = options.decide(current, target);
    } catch (err) {
      verdict = { allowed: false, reason: `policy error: ${(err as Error).message}` };
    }
    if (!verdict.allowed) {
      deny(verdict.reason);
      return finish();
    }
    const proxy = current.policy.egressProxy;
    const interceptDomain = peek.domain ?? verdict.domain;
    const intercept = verdict.headers !== undefined && Object.keys(verdict.headers).length > 0 && interceptDomain !== undefined;
    connection.upstreamKey = upstreamKeyOf(proxy);
    connection.hostHeaders = intercept ? hostHeadersOf(interceptDomain!, verdict) : undefined;
    connection.interceptDomain = intercept ? interceptDomain : undefined;
    // Cleartext h2 named no host; the audit shows the one its requests are held to (H2C_NOTE).
    if (intercept) record.domain = interceptDomain;
    record.verdict = "allowed";
    record.reason = verdict.reason;
    record.bytesOut = 0;
    record.bytesIn = 0;
    if (peek.clientGone || client.destroyed) {
      safeAudit(record);
      return finish();
    }
    const dial = () => dialUpstream(original, proxy, limits.connectTimeoutMs);

    if (intercept) {
      safeAudit(record);
      const injectionState = startInjection({
        client,
        head: peek.head,
        tls: peek.domainSource === "sni",
        domain: interceptDomain!,
        hostHeaders: () => connection.hostHeaders ?? new Map(),
        issueCertificate: options.issueCertificate,
        upstreamCa: options.upstreamCa,
        resolveSecret: options.resolveSecret,
        dial,
        idleTimeoutMs: limits.idleTimeoutMs,
        onActivity: () => {
          record.bytesOut = client.bytesRead;
          record.bytesIn = client.bytesWritten;
          record.durationMs = Date.now() - started;
        },
        onClose: finish,
      });
      injection = injectionState;
      if (closed) injection.close();
      return;
    }

    try {
      upstream = await dial();
    } catch (err) {
      const reason = err instanceof Socks5Error ? socksReason(err) : undefined;
      if (reason) {
        deny(reason);
      } else {
        record.reason = `${verdict.reason}; destination unreachable: ${(err as Error).message}`;
        safeAudit(record);
        reset(client);
      }
      return finish();
    }
    safeAudit(record);
    if (closed || client.destroyed) {
      upstream.destroy();
      return finish();
    }
    splice(client, upstream, peek.head, record, started, limits.idleTimeoutMs, finish);
  }

  function safeAudit(record: EgressRecord): void {
    try {
      options.audit(record);
    } catch (err) {
      log.error("egress audit callback failed", { error: String(err) });
    }
  }

  return {
    listen() {
      return new Promise((resolve, reject) => {
        server.once("error", reject);
        server.listen(options.port, options.listenHost, () => {
          server.off("error", reject);
          listening = server.address() as net.AddressInfo;
          resolve(listening.port);
        });
      });
    },
    close() {
      return new Promise((resolve) => {
        for (const set of bySandbox.values()) for (const connection of [...set]) connection.close("egress proxy closing");
        for (const socket of sockets) socket.destroy();
        if (!server.listening) return resolve();
        server.close(() => resolve());
      });
    },
    policyChanged(sandboxId) {
      const set = bySandbox.get(sandboxId);
      if (!set) return;
      for (const connection of [...set]) {
        if (!connection.target) continue; // still peeking: decided with the new policy
        const sandbox = options.sandboxFor(connection.remoteAddress);
        if (!sandbox || sandbox.sandboxId !== sandboxId) {
          connection.close("sandbox gone");
          continue;
        }
        let verdict: EgressVerdict;
        try {
          verdict = options.decide(sandbox, connection.target);
        } catch (err) {
          verdict = { allowed: false, reason: `policy error: ${(err as Error).message}` };
        }
        if (!verdict.allowed) {
          connection.close(`policy changed: ${verdict.reason}`);
          continue;
        }
        if (upstreamKeyOf(sandbox.policy.egressProxy) !== connection.upstreamKey) {
          connection.close("policy changed: egress proxy changed");
          continue;
        }
        const interceptDomain = connection.target.domain ?? verdict.domain;
        const intercept = verdict.headers !== undefined && Object.keys(verdict.headers).length > 0 && interceptDomain !== undefined;
        const hostHeaders = intercept ? hostHeadersOf(interceptDomain!, verdict) : undefined;
        if ((intercept ? interceptDomain : undefined) !== connection.interceptDomain || !sameHosts(hostHeaders, connection.hostHeaders)) {
          connection.close("policy changed: header rules changed");
          continue;
        }
        if (hostHeaders) connection.hostHeaders = hostHeaders;
      }
    },
    openConnections(sandboxId) {
      if (sandboxId === undefined) return total;
      return bySandbox.get(sandboxId)?.size ?? 0;
    },
  };
}

/** The hosts an intercepted connection carries: its domain, and for cleartext h2 the verdict's other names. */
function hostHeadersOf(domain: string, verdict: EgressVerdict): Map<string, Record<string, string>> {
  const hosts = new Map(Object.entries(verdict.otherHosts ?? {}));
  hosts.set(domain, verdict.headers ?? {});
  return hosts;
}

/** The same hosts intercepted (or neither connection intercepted at all). */
function sameHosts(a: ReadonlyMap<string, unknown> | undefined, b: ReadonlyMap<string, unknown> | undefined): boolean {
  if (!a || !b) return a === b;
  return a.size === b.size && [...a.keys()].every((host) => b.has(host));
}

/** Relays both ways, counting bytes into the record, half-closes passed on. */
function splice(client: net.Socket, upstream: net.Socket, head: Buffer, record: EgressRecord, started: number, idleTimeoutMs: number, finish: () => void): void {
  let clientClosed = false;
  let upstreamClosed = false;
  const update = () => (record.durationMs = Date.now() - started);
  upstream.on("error", () => reset(client));
  client.on("error", () => reset(upstream));
  client.on("close", () => {
    clientClosed = true;
    if (!upstream.destroyed) upstream.end();
    if (upstreamClosed) finish();
  });
  upstream.on("close", () => {
    upstreamClosed = true;
    if (!client.destroyed) client.end();
    if (clientClosed) finish();
  });
  // Writes to the client refresh its timer too: one timer covers both directions.
  client.setTimeout(idleTimeoutMs, () => {
    client.destroy();
    upstream.destroy();
  });
  record.bytesOut = head.length;
  if (head.length > 0) upstream.write(head);
  client.on("data", (chunk: Buffer) => {
    record.bytesOut! += chunk.length;
    update();
  });
  upstream.on("data", (chunk: Buffer) => {
    record.bytesIn! += chunk.length;
    update();
  });
  client.pipe(upstream);
  upstream.pipe(client);
}

async function dialUpstream(destination: { address: string; port: number }, proxy: EgressProxyConfig | undefined, timeoutMs: number): Promise<net.Socket> {
  if (proxy) return socks5Connect({ proxy, destination, timeoutMs });
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: destination.address, port: destination.port, allowHalfOpen: true, noDelay: true });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new CubicleError("deadline_exceeded", `no connection to ${destination.address}:${destination.port} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.removeAllListeners("error");
      socket.on("error", () => {});
      socket.pause();
      resolve(socket);
    });
    socket.once("error", (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      socket.destroy();
      reject(new CubicleError("bad_gateway", err.code ?? err.message, { cause: err }));
    });
  });
}

function socksReason(err: Socks5Error): string {
  switch (err.kind) {
    case "unreachable":
    case "timeout":
      return "egress proxy unreachable";
    case "auth":
      return "egress proxy authentication failed";
    case "refused":
      return "egress proxy refused the connection";
    default:
      return "egress proxy protocol error";
  }
}

function upstreamKeyOf(proxy: EgressProxyConfig | undefined): string {
  return proxy ? JSON.stringify([proxy.host, proxy.port, proxy.username ?? null, proxy.password ?? null]) : "direct";
}

/** `::ffff:10.0.0.2` → `10.0.0.2` (a dual-stack listener sees IPv4 peers mapped). */
function unmapped(address: string): string {
  return address.startsWith("::ffff:") && net.isIPv4(address.slice(7)) ? address.slice(7) : address;
}

/** Closes with a TCP RST when the socket can, so the sandbox sees "connection refused/reset" at once. */
function reset(socket: net.Socket): void {
  if (socket.destroyed) return;
  try {
    if ((socket as unknown as { _handle?: unknown })._handle) socket.resetAndDestroy();
    else socket.destroy();
  } catch {
    socket.destroy();
  }
}
