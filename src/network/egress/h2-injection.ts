import http from "node:http";
import http2 from "node:http2";
import type { Duplex } from "node:stream";
import { hostWithoutPort } from "./http-head.js";
import { HOP_BY_HOP, resolveRuleHeaders } from "./rule-headers.js";

/**
 * Header injection for HTTP/2 clients: a sandbox that speaks h2 (chosen through TLS's ALPN, or
 * cleartext with prior knowledge, RFC 9113 §3.3) gets an HTTP/2 session from the proxy, and each
 * of its streams is sent on with the header rule's headers set: as an HTTP/2 stream when the
 * destination speaks h2 (trailers included, so gRPC works), else as an HTTP/1.1 request.
 */

/** RFC 9113 §3.4: the client connection preface. */
export const H2_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");

/** How the destination is reached: HTTP/2 (h2c, or TLS whose ALPN chose h2), or HTTP/1.1 through an agent. */
export type H2Upstream = { kind: "h2"; session: http2.ClientHttp2Session } | { kind: "h1"; agent: http.Agent };

export interface H2InjectionOptions {
  tls: boolean;
  /**
   * The hosts this connection carries requests for, each with its rule's headers now (a policy
   * change may replace them between requests): every stream's :authority must name one (else
   * 421). One host but for cleartext h2 to an address several such names share (H2C_NOTE).
   */
  hostHeaders(): ReadonlyMap<string, Record<string, string>>;
  resolveSecret(name: string): string | undefined;
  /** Opens the destination; called once, at the first request. */
  upstream(): Promise<H2Upstream>;
  idleTimeoutMs: number;
  /** Called after every stream, to refresh byte counts. */
  onActivity(): void;
  /** Ends the whole connection. */
  close(): void;
}

// Bounds like the HTTP/1.1 parser's (16 KiB of headers); nghttp2 guards the rest (floods, resets).
const SERVER_SETTINGS: http2.Settings = { maxConcurrentStreams: 100, maxHeaderListSize: 16 * 1024, enablePush: false };
const { NGHTTP2_CANCEL, NGHTTP2_INTERNAL_ERROR, NGHTTP2_FLAG_END_STREAM } = http2.constants;

/** Serves the sandbox's HTTP/2 session on `socket` (its preface not yet read). */
export function serveH2(socket: Duplex, options: H2InjectionOptions): http2.ServerHttp2Session | undefined {
  let session: http2.ServerHttp2Session;
  try {
    session = http2.performServerHandshake(socket, { settings: SERVER_SETTINGS, maxSessionMemory: 16 });
  } catch {
    options.close();
    return undefined;
  }
  let upstream: Promise<H2Upstream> | undefined;
  const upstreamOnce = () => {
    upstream ??= options.upstream().then((opened) => {
      if (opened.kind === "h2") {
        opened.session.on("error", options.close);
        opened.session.on("close", options.close);
      }
      return opened;
    });
    return upstream;
  };
  // The destination's session goes with the sandbox's (else its socket stays open until the
  // destination drops it: a leak, and a handle that keeps the process from exiting).
  const end = () => {
    upstream?.then(
      (opened) => {
        if (opened.kind === "h2") opened.session.destroy();
      },
      () => undefined,
    );
    options.close();
  };
  session.on("error", end);
  session.on("close", end);
  session.setTimeout(options.idleTimeoutMs, end);
  session.on("stream", (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, flags: number, rawHeaders: string[]) => forwardStream(options, upstreamOnce, stream, headers, (flags & NGHTTP2_FLAG_END_STREAM) !== 0, rawHeaders));
  return session;
}

function forwardStream(options: H2InjectionOptions, upstream: () => Promise<H2Upstream>, stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, ended: boolean, rawHeaders: string[]): void {
  stream.on("error", () => {});
  stream.on("close", options.onActivity);
  const reply = (status: number, text: string) => {
    stream.resume();
    if (stream.destroyed || stream.closed) return;
    if (stream.headersSent) return void stream.close(NGHTTP2_INTERNAL_ERROR);
    try {
      stream.respond({ ":status": status, "content-type": "text/plain; charset=utf-8" });
      stream.end(`${text}\n`);
    } catch {
      // The session went away meanwhile.
      stream.destroy();
    }
  };

  const method = headers[":method"] ?? "GET";
  // Extended CONNECT (RFC 8441: WebSockets over h2) would carry bytes past the header rules.
  if (method === "CONNECT") return reply(501, "egress proxy: CONNECT is not supported for hosts with header rules");
  const authority = String(headers[":authority"] ?? headers.host ?? "");
  // RFC 9110 §15.5.20: a request for another origin on this connection is misdirected.
  const host = hostWithoutPort(authority);
  const hosts = options.hostHeaders();
  const ruleHeaders = host === undefined ? undefined : hosts.get(host);
  if (host === undefined || !ruleHeaders) return reply(421, `egress proxy: this connection is for ${[...hosts.keys()].join(", ")}`);
  const rule = resolveRuleHeaders(ruleHeaders, host, options.resolveSecret);
  if ("error" in rule) return reply(502, rule.error);

  const kept: [string, string][] = [];
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!.toLowerCase();
    const value = rawHeaders[i + 1]!;
    if (name.startsWith(":") || name === "host" || rule.names.has(name)) continue;
    // RFC 9113 §8.2.2: TE may only say "trailers" (gRPC needs it); the other hop-by-hop fields go.
    if (HOP_BY_HOP.has(name) && !(name === "te" && value.trim().toLowerCase() === "trailers")) continue;
    kept.push([name, value]);
  }
  const request: ForwardedRequest = { method, path: headers[":path"] ?? "/", authority, kept, rule: rule.headers, ruleNames: rule.names, ended };
  upstream().then(
    (opened) => (opened.kind === "h2" ? viaH2(options, opened.session, stream, request, reply) : viaH1(opened.agent, stream, request, reply)),
    (err: NodeJS.ErrnoException) => reply(502, `egress proxy: ${err.code ?? ""} ${err.message}`.trim()),
  );
}

interface ForwardedRequest {
  method: string;
  path: string;
  authority: string;
  /** The sandbox's own fields (lowercase), hop-by-hop ones and those the rule sets removed. */
  kept: [string, string][];
  rule: [string, string][];
  ruleNames: Set<string>;
  /** The sandbox's stream ended with its headers (no body). */
  ended: boolean;
}

function viaH2(options: H2InjectionOptions, session: http2.ClientHttp2Session, stream: http2.ServerHttp2Stream, request: ForwardedRequest, reply: (status: number, text: string) => void): void {
  const out: http2.OutgoingHttpHeaders = { ":method": request.method, ":path": request.path, ":scheme": options.tls ? "https" : "http", ":authority": request.authority };
  for (const [name, value] of [...request.kept, ...request.rule.map(([name, value]) => [name.toLowerCase(), value] as const)]) appendField(out, name, value);
  // Secrets stay out of HPACK's dynamic table (RFC 7541 §7.1.3).
  (out as Record<symbol, unknown>)[http2.sensitiveHeaders] = [...request.ruleNames];
  let forwarded: http2.ClientHttp2Stream;
  try {
    forwarded = session.request(out, { endStream: request.ended });
  } catch (err) {
    return reply(502, `egress proxy: ${(err as Error).message}`);
  }
  let trailers: http2.IncomingHttpHeaders | undefined;
  forwarded.on("error", (err: NodeJS.ErrnoException) => reply(502, `egress proxy: ${err.code ?? ""} ${err.message}`.trim()));
  forwarded.on("trailers", (received) => (trailers = received));
  forwarded.on("response", (received) => {
    const head: http2.OutgoingHttpHeaders = {};
    for (const [name, value] of Object.entries(received)) if (!HOP_BY_HOP.has(name) && value !== undefined) head[name] = value;
    try {
      stream.respond(head, { waitForTrailers: true });
    } catch {
      forwarded.close(NGHTTP2_CANCEL);
      return reply(502, "egress proxy: the destination sent an invalid response head");
    }
    forwarded.pipe(stream);
  });
  stream.on("wantTrailers", () => {
    const fields: http2.OutgoingHttpHeaders = {};
    for (const [name, value] of Object.entries(trailers ?? {})) if (!name.startsWith(":") && !HOP_BY_HOP.has(name) && value !== undefined) fields[name] = value;
    try {
      stream.sendTrailers(fields);
    } catch {
      stream.close();
    }
  });
  // The destination reset the stream before answering in full: so does the proxy, with its code.
  forwarded.on("close", () => {
    if (!stream.closed && forwarded.rstCode !== undefined && forwarded.rstCode !== 0) stream.close(forwarded.rstCode);
  });
  stream.on("close", () => {
    if (!forwarded.closed) forwarded.close(NGHTTP2_CANCEL);
  });
  if (!request.ended) stream.pipe(forwarded);
}

function viaH1(agent: http.Agent, stream: http2.ServerHttp2Stream, request: ForwardedRequest, reply: (status: number, text: string) => void): void {
  const headers: string[] = ["Host", request.authority];
  const cookies: string[] = [];
  for (const [name, value] of [...request.kept, ...request.rule]) {
    if (name === "te") continue;
    // RFC 9113 §8.2.3: h2 may split Cookie into fields; HTTP/1.1 wants them joined.
    if (name === "cookie") cookies.push(value);
    else headers.push(name, value);
  }
  if (cookies.length > 0) headers.push("cookie", cookies.join("; "));
  let forwarded: http.ClientRequest;
  try {
    forwarded = http.request({ agent, method: request.method, path: request.path, headers, setHost: false });
  } catch (err) {
    return reply(502, `egress proxy: ${(err as Error).message}`);
  }
  forwarded.on("error", (err: NodeJS.ErrnoException) => reply(502, `egress proxy: ${err.code ?? ""} ${err.message}`.trim()));
  let responded: http.IncomingMessage | undefined;
  forwarded.on("response", (response) => {
    responded = response;
    response.on("error", () => stream.close(NGHTTP2_INTERNAL_ERROR));
    const head: http2.OutgoingHttpHeaders = { ":status": response.statusCode ?? 502 };
    for (const [name, value] of Object.entries(response.headers)) if (!HOP_BY_HOP.has(name) && value !== undefined) head[name] = value;
    try {
      stream.respond(head);
    } catch {
      response.destroy();
      return reply(502, "egress proxy: the destination sent an invalid response head");
    }
    response.pipe(stream);
  });
  stream.on("close", () => {
    if (!responded?.complete) forwarded.destroy();
  });
  if (request.ended) forwarded.end();
  else stream.pipe(forwarded);
}

function appendField(out: http2.OutgoingHttpHeaders, name: string, value: string): void {
  const existing = out[name];
  if (existing === undefined) out[name] = value;
  else out[name] = [...(Array.isArray(existing) ? existing : [String(existing)]), value];
}
