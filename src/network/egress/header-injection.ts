import http from "node:http";
import type net from "node:net";
import { Duplex } from "node:stream";
import tls from "node:tls";
import { createLogger } from "../../shared/log.js";
import { hostWithoutPort } from "./http-head.js";

const log = createLogger("egress-proxy");

/**
 * Header injection: the egress proxy ends the sandbox's TLS with a certificate from Cubicle's CA
 * (or reads plaintext HTTP), and sends each HTTP/1.1 request on to the original destination with
 * the header rule's headers set, so a secret (`${e2b.secrets.NAME}`) never enters the sandbox.
 */
export interface InjectionOptions {
  client: net.Socket;
  /** Bytes already read from the client (the ClientHello or the first request head). */
  head: Buffer;
  tls: boolean;
  /** The connection's domain: the SNI or Host it was decided on; every request must name it. */
  domain: string;
  /** The rule's headers now (a policy change may replace them between requests). */
  headers(): Record<string, string>;
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

const HOP_BY_HOP = new Set(["connection", "keep-alive", "proxy-connection", "proxy-authorization", "transfer-encoding", "te", "trailer", "upgrade"]);
const PLACEHOLDER = /\$\{e2b\.secrets\.([^}]*)\}/g;
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
  const agent = new http.Agent({ keepAlive: true, maxSockets: MAX_SOCKETS_PER_CONNECTION, maxFreeSockets: MAX_SOCKETS_PER_CONNECTION });
  (agent as unknown as { createConnection: unknown }).createConnection = (_opts: unknown, callback: (err: Error | null, socket?: Duplex) => void) => {
    upstreamConnection(options).then(
      (socket) => callback(null, socket),
      (err: Error) => callback(err),
    );
    return undefined;
  };
  const close = () => {
    if (closed) return;
    closed = true;
    stream?.destroy();
    client.destroy();
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

  if (options.tls) {
    // The ClientHello was read during the peek; TLSSocket reads a wrapped socket's buffered bytes first.
    client.unshift(options.head);
    options.issueCertificate(options.domain).then(
      (issued) => {
        if (closed) return;
        const secure = new tls.TLSSocket(client, { isServer: true, secureContext: leafContext(issued), ALPNProtocols: ["http/1.1"] });
        attach(secure);
        // The TLS socket now owns the descriptor: the raw socket no longer sees traffic.
        client.setTimeout(0);
        secure.setTimeout(options.idleTimeoutMs, close);
      },
      (err: Error) => {
        log.warn("no certificate for header injection", { domain: options.domain, error: err.message });
        close();
      },
    );
  } else {
    // http.Server consumes a net.Socket's handle directly and would skip bytes already read, so
    // plaintext goes through a stream of its own that replays them first.
    attach(replayingStream(client, options.head));
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

  const rules = options.headers();
  const ruleNames = new Set(Object.keys(rules).map((name) => name.toLowerCase()));
  const connectionTokens = new Set((req.headers.connection ?? "").split(",").map((token) => token.trim().toLowerCase()));
  const headers: string[] = [];
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) {
    const name = req.rawHeaders[i]!;
    const lower = name.toLowerCase();
    if (HOP_BY_HOP.has(lower) || connectionTokens.has(lower) || ruleNames.has(lower)) continue;
    headers.push(name, req.rawHeaders[i + 1]!);
  }
  for (const [name, template] of Object.entries(rules)) {
    let missing: string | undefined;
    const value = template.replace(PLACEHOLDER, (_match, secret: string) => {
      const resolved = options.resolveSecret(secret);
      if (resolved === undefined) missing ??= secret;
      return resolved ?? "";
    });
    if (missing !== undefined) {
      req.resume();
      return reply(502, `egress proxy: the secret ${JSON.stringify(missing)} of the header rule for ${options.domain} is not defined`);
    }
    if (/[\r\n\0]/.test(value)) {
      req.resume();
      return reply(502, `egress proxy: the header ${name} for ${options.domain} resolves to an invalid value`);
    }
    headers.push(name, value);
  }
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
  const secureContext = upstreamContext(options.upstreamCa);
  return new Promise((resolve, reject) => {
    const secure = tls.connect({ socket: raw, servername: options.domain, secureContext, ALPNProtocols: ["http/1.1"] });
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
