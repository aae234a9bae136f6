import http from "node:http";
import http2 from "node:http2";
import type net from "node:net";
import { Duplex } from "node:stream";
import tls from "node:tls";
import { createLogger } from "../../shared/log.js";
import { H2_PREFACE, serveH2, type H2Upstream } from "./h2-injection.js";
import { hostWithoutPort } from "./http-head.js";
import { HOP_BY_HOP, resolveRuleHeaders } from "./rule-headers.js";

const log = createLogger("egress-proxy");

/**
 * Header injection: the egress proxy ends the sandbox's TLS with a certificate from Cubicle's CA
 * (or reads plaintext HTTP), and sends each request on to the original destination with the
 * header rule's headers set, so a secret (`${e2b.secrets.NAME}`) never enters the sandbox.
 * HTTP/1.1 here; HTTP/2 (ALPN h2, or cleartext prior knowledge) in h2-injection.ts.
 */
export interface InjectionOptions {
  client: net.Socket;
  /** Bytes already read from the client (the ClientHello or the first request head). */
  head: Buffer;
  tls: boolean;
  /**
   * The connection's domain: the SNI or Host it was decided on (cleartext h2: the first name the
   * verdict gave); every HTTP/1.1 request must name it.
   */
  domain: string;
  /**
   * Each host this connection may carry requests for and its rule's headers now (a policy change
   * may replace them between requests): `domain` alone, but for cleartext h2 (H2C_NOTE).
   */
  hostHeaders(): ReadonlyMap<string, Record<string, string>>;
  issueCertificate(hostname: string): Promise<{ key: string | Buffer; cert: string | Buffer }>;
  /** CAs trusted for the upstream TLS in addition to Node's roots. */
  upstreamCa: (string | Buffer)[] | undefined;
  resolveSecret(name: string): string | undefined;
  /** A TCP connection to the original destination (direct or through SOCKS5). */
  dial(): Promise<net.Socket>;
  idleTimeoutMs: number;
  /** Called after every request and at the end, to refresh byte counts. */
  onActivity(): void;
  onClose(): void;
}

export interface Injection {
  close(): void;
}

const MAX_SOCKETS_PER_CONNECTION = 4;

interface ConnectionState {
  options: InjectionOptions;
  agent: http.Agent;
}

const states = new WeakMap<object, ConnectionState>();

/** One HTTP server for every intercepted connection: it only parses; nothing listens. */
let parser: http.Server | undefined;

function requestParser(): http.Server {
  if (parser) return parser;
  parser = http.createServer({ maxHeaderSize: 16 * 1024, requestTimeout: 0 }, (req, res) => {
    const state = states.get(req.socket);
    if (!state) return void res.destroy();
    forward(state, req, res);
  });
  // Upgrades (WebSocket, h2c) and CONNECT would carry bytes past the header rules.
  const refusal = "egress proxy: upgrades and CONNECT are not supported for hosts with header rules\n";
  const refuse = (_req: http.IncomingMessage, socket: Duplex) => {
    socket.on("error", () => {});
    socket.end(`HTTP/1.1 501 Not Implemented\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: ${Buffer.byteLength(refusal)}\r\n\r\n${refusal}`);
  };
  parser.on("upgrade", refuse);
  parser.on("connect", refuse);
  parser.on("clientError", (_err, socket: Duplex) => {
    socket.on("error", () => {});
    if (socket.writable) socket.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    else socket.destroy();
  });
  parser.keepAliveTimeout = 0;
  parser.headersTimeout = 60_000;
  return parser;
}

export function startInjection(options: InjectionOptions): Injection {
  const { client } = options;
  let closed = false;
  let stream: Duplex | undefined;
  /** The sandbox's HTTP/2 session, when it speaks h2: destroyed before its socket (H2_TEARDOWN_NOTE). */
  let h2Session: http2.ServerHttp2Session | undefined;
  const agent = new http.Agent({ keepAlive: true, maxSockets: MAX_SOCKETS_PER_CONNECTION, maxFreeSockets: MAX_SOCKETS_PER_CONNECTION });
  // An h2 client's first upstream TLS connection that chose HTTP/1.1 is the agent's first socket.
  let spareSocket: Duplex | undefined;
  (agent as unknown as { createConnection: unknown }).createConnection = (_opts: unknown, callback: (err: Error | null, socket?: Duplex) => void) => {
    const spare = spareSocket;
    spareSocket = undefined;
    if (spare && !spare.destroyed) return void callback(null, spare);
    upstreamConnection(options).then(
      (socket) => callback(null, socket),
      (err: Error) => callback(err),
    );
    return undefined;
  };
  const close = () => {
    if (closed) return;
    closed = true;
    // H2_TEARDOWN_NOTE: a session goes first, then its socket. A socket destroyed under a live
    // Http2Session left a handle that Node's exit could not close: a test process that had
    // finished spun at 100 % CPU in its cleanup (seen on Node 20.20 after the h2c test).
    h2Session?.destroy();
    stream?.destroy();
    client.destroy();
    spareSocket?.destroy();
    agent.destroy();
    options.onActivity();
    options.onClose();
  };
  client.on("close", close);
  client.setTimeout(options.idleTimeoutMs, close);

  const attach = (socket: Duplex) => {
    stream = socket;
    socket.on("error", close);
    socket.on("close", close);
    states.set(socket, { options, agent });
    requestParser().emit("connection", socket);
  };

  // HTTP/2: the session keeps its own idle timer (its socket's is not refreshed by h2's reads).
  const attachH2 = (socket: Duplex) => {
    stream = socket;
    socket.on("error", close);
    socket.on("close", close);
    // HTTP/2 has no use for a half-closed connection (RFC 9113 §5.1 closes streams, not the
    // connection); a client that stops sending is gone, and the session would wait for it.
    socket.once("end", close);
    client.setTimeout(0);
    h2Session = serveH2(socket, {
      tls: options.tls,
      hostHeaders: options.hostHeaders,
      resolveSecret: options.resolveSecret,
      upstream: () =>
        h2Upstream(options, (spare) => {
          spareSocket = spare;
          return agent;
        }),
      idleTimeoutMs: options.idleTimeoutMs,
      onActivity: options.onActivity,
      close,
    });
    // Closed while the session was being made (its handshake failed): it goes too.
    if (closed) h2Session?.destroy();
  };

  if (options.tls) {
    // The ClientHello was read during the peek; TLSSocket reads a wrapped socket's buffered bytes first.
    client.unshift(options.head);
    options.issueCertificate(options.domain).then(
      (issued) => {
        if (closed) return;
        const secure = new tls.TLSSocket(client, { isServer: true, secureContext: leafContext(issued), ALPNProtocols: ["h2", "http/1.1"] });
        // The TLS socket now owns the descriptor: the raw socket no longer sees traffic.
        client.setTimeout(0);
        secure.setTimeout(options.idleTimeoutMs, close);
        secure.on("error", close);
        secure.on("close", close);
        // Which parser reads the requests waits for ALPN's choice; until then the handshake is
        // read here, and a client that leaves during it ends the connection (a TLS socket still
        // in its handshake does not close on the peer's FIN). No application data comes before
        // "secure", which is emitted as the handshake ends, and the parser attaches then.
        secure.resume();
        secure.once("end", close);
        secure.once("secure", () => {
          secure.off("end", close);
          if (closed) return;
          if (secure.alpnProtocol === "h2") {
            // Node clears this flag only for a tls.Server's sockets; an HTTP/2 session on a TLS
            // socket still "connecting" waits for a secureConnect that a server side never emits.
            (secure as tls.TLSSocket & { secureConnecting: boolean }).secureConnecting = false;
            secure.setTimeout(0);
            attachH2(secure);
          } else {
            attach(secure);
          }
        });
      },
      (err: Error) => {
        log.warn("no certificate for header injection", { domain: options.domain, error: err.message });
        close();
      },
    );
  } else {
    if (options.head.subarray(0, H2_PREFACE.length).equals(H2_PREFACE)) {
      // An HTTP/2 session reads what a socket already holds before it takes its handle over, so
      // the peeked bytes go back into the socket itself. (On a JavaScript stream instead, a
      // session whose stream is destroyed with writes pending never releases them: a leak, and a
      // process that spins at exit.)
      client.unshift(options.head);
      attachH2(client);
    } else {
      // http.Server consumes a net.Socket's handle directly and would skip bytes already read, so
      // plaintext HTTP/1.1 goes through a stream of its own that replays them first.
      attach(replayingStream(client, options.head));
    }
  }
  return { close };
}

function forward(state: ConnectionState, req: http.IncomingMessage, res: http.ServerResponse): void {
  const { options } = state;
  const reply = (status: number, text: string) => {
    if (res.headersSent) return void res.destroy();
    res.writeHead(status, { "content-type": "text/plain; charset=utf-8", "content-length": Buffer.byteLength(text) + 1, connection: "close" });
    res.end(`${text}\n`);
  };
  req.on("error", () => res.destroy());
  res.on("error", () => {});
  res.on("finish", options.onActivity);

  // RFC 9110 §15.5.20: a request for another origin on this connection is misdirected.
  if (hostWithoutPort(req.headers.host ?? "") !== options.domain) {
    req.resume();
    return reply(421, `egress proxy: this connection is for ${options.domain}`);
  }

  const rule = resolveRuleHeaders(options.hostHeaders().get(options.domain) ?? {}, options.domain, options.resolveSecret);
  if ("error" in rule) {
    req.resume();
    return reply(502, rule.error);
  }
  const connectionTokens = new Set((req.headers.connection ?? "").split(",").map((token) => token.trim().toLowerCase()));
  const headers: string[] = [];
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) {
    const name = req.rawHeaders[i]!;
    const lower = name.toLowerCase();
    if (HOP_BY_HOP.has(lower) || connectionTokens.has(lower) || rule.names.has(lower)) continue;
    headers.push(name, req.rawHeaders[i + 1]!);
  }
  for (const [name, value] of rule.headers) headers.push(name, value);
  if (req.headers["transfer-encoding"] !== undefined) headers.push("Transfer-Encoding", "chunked");

  let upstream: http.ClientRequest;
  try {
    upstream = http.request({ agent: state.agent, method: req.method, path: req.url, headers, setHost: false });
  } catch (err) {
    req.resume();
    return reply(502, `egress proxy: ${(err as Error).message}`);
  }
  upstream.setTimeout(options.idleTimeoutMs, () => upstream.destroy(new Error("the destination did not answer in time")));
  upstream.on("error", (err: NodeJS.ErrnoException) => reply(502, `egress proxy: ${err.code ?? ""} ${err.message}`.trim()));
  upstream.on("response", (response) => {
    response.on("error", () => res.destroy());
    const responseHeaders: string[] = [];
    for (let i = 0; i + 1 < response.rawHeaders.length; i += 2) {
      const name = response.rawHeaders[i]!;
      if (!HOP_BY_HOP.has(name.toLowerCase())) responseHeaders.push(name, response.rawHeaders[i + 1]!);
    }
    try {
      res.writeHead(response.statusCode ?? 502, response.statusMessage, responseHeaders);
    } catch {
      response.destroy();
      return reply(502, "egress proxy: the destination sent an invalid response head");
    }
    response.pipe(res);
  });
  req.pipe(upstream);
}

/** A TCP connection to the destination, wrapped in TLS (verified against the domain) when the sandbox spoke TLS. */
/** The interception's TLS context per issued leaf (the CA hands out the same object while it is cached). */
const leafContexts = new WeakMap<object, tls.SecureContext>();
function leafContext(issued: { key: string | Buffer; cert: string | Buffer }): tls.SecureContext {
  let context = leafContexts.get(issued);
  if (!context) leafContexts.set(issued, (context = tls.createSecureContext({ key: issued.key, cert: issued.cert })));
  return context;
}

/**
 * The upstream TLS context, made once per set of extra CAs: a `ca` list given to tls.connect
 * would parse Node's ~140 roots again for every connection (tens of ms here).
 */
const upstreamContexts = new WeakMap<readonly (string | Buffer)[], tls.SecureContext>();
let defaultUpstreamContext: tls.SecureContext | undefined;
function upstreamContext(extra: readonly (string | Buffer)[] | undefined): tls.SecureContext {
  if (!extra?.length) return (defaultUpstreamContext ??= tls.createSecureContext());
  let context = upstreamContexts.get(extra);
  if (!context) upstreamContexts.set(extra, (context = tls.createSecureContext({ ca: [...tls.rootCertificates, ...extra] })));
  return context;
}

async function upstreamConnection(options: InjectionOptions): Promise<Duplex> {
  const raw = await options.dial();
  if (!options.tls) {
    raw.resume();
    return raw;
  }
  return upstreamTls(options, raw, ["http/1.1"]);
}

/**
 * The destination for an h2 client: h2 again where it can (cleartext: the client's prior
 * knowledge holds for it; TLS: if its ALPN chooses h2), else HTTP/1.1 through the connection's
 * agent, which `useForHttp1` hands the TLS socket already made.
 */
async function h2Upstream(options: InjectionOptions, useForHttp1: (socket: Duplex) => http.Agent): Promise<H2Upstream> {
  const raw = await options.dial();
  if (!options.tls) {
    // dial() leaves the socket paused, and a paused socket's handle is not read by the session either.
    raw.resume();
    return { kind: "h2", session: quiet(http2.connect(`http://${options.domain}`, { createConnection: () => raw })) };
  }
  const secure = await upstreamTls(options, raw, ["h2", "http/1.1"]);
  if (secure.alpnProtocol === "h2") return { kind: "h2", session: quiet(http2.connect(`https://${options.domain}`, { createConnection: () => secure })) };
  return { kind: "h1", agent: useForHttp1(secure) };
}

/** A session that cannot crash the process with an early 'error' (serveH2 listens for real once it has it). */
function quiet(session: http2.ClientHttp2Session): http2.ClientHttp2Session {
  session.on("error", () => undefined);
  return session;
}

function upstreamTls(options: InjectionOptions, raw: net.Socket, ALPNProtocols: string[]): Promise<tls.TLSSocket> {
  const secureContext = upstreamContext(options.upstreamCa);
  return new Promise((resolve, reject) => {
    const secure = tls.connect({ socket: raw, servername: options.domain, secureContext, ALPNProtocols });
    secure.once("secureConnect", () => {
      secure.off("error", reject);
      resolve(secure);
    });
    secure.once("error", (err) => {
      raw.destroy();
      reject(err);
    });
  });
}

/** A duplex over `socket` whose readable side starts with `head`. */
function replayingStream(socket: net.Socket, head: Buffer): Duplex {
  const stream = new Duplex({
    read() {
      socket.resume();
    },
    write(chunk: Buffer, _encoding, callback) {
      socket.write(chunk, callback);
    },
    final(callback) {
      socket.end(callback);
    },
    destroy(err, callback) {
      socket.destroy();
      callback(err);
    },
  });
  if (head.length > 0) stream.push(head);
  socket.on("data", (chunk: Buffer) => {
    if (!stream.push(chunk)) socket.pause();
  });
  socket.on("end", () => stream.push(null));
  socket.on("error", (err) => stream.destroy(err));
  return stream;
}
