import http, { type IncomingMessage, type ServerResponse } from "node:http";
import https from "node:https";
import net from "node:net";
import tls from "node:tls";
import type { Duplex } from "node:stream";
import { computeFileSignature, ENVD_PORT, fileOperationOf, fileSignaturePattern, INTERPRETER_PORT, type AgentLink } from "../protocol/index.js";
import { constantTimeEquals } from "../shared/compare.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { headerString } from "../shared/headers.js";
import { createLogger } from "../shared/log.js";
import { endAfterBody, sendJsonResponse, writeRawJsonResponse } from "./raw-response.js";
import { hostPattern, parseRoute, type RouteMatch } from "./route-parsing.js";

const log = createLogger("router");

/** Where a live sandbox's traffic goes, and what its ingress policy asks of that traffic. */
export interface SandboxRoute {
  sandboxId: string;
  address: string;
  /**
   * When set (E2B `network.allowPublicTraffic: false`), requests to any port but envd's must
   * carry it in `e2b-traffic-access-token`; envd keeps its own access token.
   */
  trafficAccessToken?: string;
  /** E2B `network.maskRequestHost`: the Host that non-envd ports receive, `${PORT}` replaced. */
  maskRequestHost?: string;
  /** E2B `network.httpsPorts`: ports served over TLS, reached without checking their certificate (HTTPS_PORTS_NOTE). */
  httpsPorts?: number[];
}

/**
 * HTTPS_PORTS_NOTE: a port a sandbox lists in `network.httpsPorts` is reached by the router over
 * TLS, as upstream does: the client still talks to the router (HTTP or Cubicle's HTTPS), and
 * the sandbox's certificate is not verified (it is the sandbox's own, often self-signed; the
 * hop is the host's veth to that one sandbox's address). envd's port is never one.
 */
function servesTls(target: SandboxRoute, port: number): boolean {
  return port !== ENVD_PORT && target.httpsPorts !== undefined && target.httpsPorts.includes(port);
}

/** What the router needs from the core: where a sandbox lives, and a signal when it ends. */
export interface RouteSource {
  routeTarget(sandboxId: string): SandboxRoute | undefined;
  /**
   * For a sandbox without a route: wait while a just-claimed sandbox's agent gets its identity,
   * or resume it if it is paused with auto-resume (unless `wake` is false), and return its
   * route then; undefined = answer "not found".
   */
  resumeForTraffic?(sandboxId: string, options?: { wake?: boolean }): Promise<SandboxRoute | undefined>;
  /**
   * Live sandboxes (paused ones too): their envd tokens route signed `/files` URLs that carry no
   * sandbox id, and a paused sandbox's traffic token is checked before traffic may wake it.
   */
  liveSandboxes(): { sandboxId: string; envdAccessToken: string | undefined; state: string; trafficAccessToken?: string | undefined }[];
  on(event: "ended", listener: (sandboxId: string) => void): unknown;
  /**
   * A request or stream to a sandbox is being forwarded; the result is called once it closes.
   * A sandbox with one open is never frozen for idleness.
   */
  holdAwake?(sandboxId: string): () => void;
}

export interface SandboxRouterOptions {
  /** The server's link to the agents: proxied traffic shares its keep-alive connections. */
  agentLink: AgentLink;
}

// RFC 7230 §6.1 hop-by-hop headers are not forwarded.
const hopByHop = new Set(["connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"]);

function forwardHeaders(headers: http.IncomingHttpHeaders): http.OutgoingHttpHeaders {
  const out: http.OutgoingHttpHeaders = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value === undefined || hopByHop.has(name)) continue;
    out[name] = value;
  }
  return out;
}

/** The body of the router's 502 for a sandbox that is not there (protocol doc §4). */
function notFoundBody(sandboxId: string) {
  return { message: "The sandbox was not found", sandboxId, code: 502 };
}

/** The body of the router's 502 for a running sandbox whose side failed (a closed port, bad HTTP). */
function badGatewayBody(match: RouteMatch, message: string) {
  return { message, sandboxId: match.sandboxId, port: match.port, code: 502 };
}

const portClosedMessage = (port: number) => `The sandbox is running but port ${port} is not open`;

/** The header that carries a sandbox's traffic access token (E2B's client proxy reads the same). */
export const TRAFFIC_ACCESS_TOKEN_HEADER = "e2b-traffic-access-token";

/** What E2B's `${PORT}` in maskRequestHost stands for. */
const maskPortPlaceholder = "${PORT}";

/** A Host value: visible ASCII only, so it can go into a raw request head (no CR/LF injection). */
const hostValuePattern = /^[\x21-\x7e]{1,255}$/;

/**
 * Why a request may not reach `match.port` of a sandbox whose ingress wants a traffic access
 * token, or undefined when it may. envd's port is governed by envd's own token, as upstream's
 * orchestrator proxy does; every other port (the interpreter's too) needs the traffic token,
 * compared in constant time. Messages follow upstream's.
 */
export function trafficTokenRefusal(headers: http.IncomingHttpHeaders, port: number, trafficAccessToken: string | undefined): string | undefined {
  if (!trafficAccessToken || port === ENVD_PORT) return undefined;
  const presented = headerString(headers, TRAFFIC_ACCESS_TOKEN_HEADER);
  if (presented === undefined || presented === "") return `Sandbox is secured with traffic access token. Token header '${TRAFFIC_ACCESS_TOKEN_HEADER}' is missing`;
  if (!constantTimeEquals(trafficAccessToken, presented)) return `Sandbox is secured with traffic access token. Provided token in header '${TRAFFIC_ACCESS_TOKEN_HEADER}' is invalid`;
  return undefined;
}

/**
 * The Host a sandbox's port receives under E2B's maskRequestHost (`${PORT}` replaced by the
 * port), or undefined to keep the client's; envd's port is never masked (as upstream). Throws an
 * invalid_argument CubicleError for a mask that is no Host value.
 */
export function maskedHost(port: number, maskRequestHost: string | undefined): string | undefined {
  if (!maskRequestHost || port === ENVD_PORT) return undefined;
  const host = maskRequestHost.split(maskPortPlaceholder).join(String(port));
  if (!hostValuePattern.test(host)) throw new CubicleError("invalid_argument", "the sandbox's network.maskRequestHost is not a valid Host header value");
  return host;
}

/** The body of the router's 403 for traffic without the sandbox's traffic access token. */
function trafficRefusedBody(sandboxId: string, message: string) {
  return { code: 403, message, sandboxId };
}

/**
 * Routes sandbox traffic arriving on the API port: by the `E2b-Sandbox-Id` / `E2b-Sandbox-Port`
 * headers or by a Host of `<port>-<sandboxId>.<domain>`. Ports 49983 and 49999 reach the agent,
 * any other port the same port inside the sandbox. When a sandbox ends, its open connections are
 * destroyed (not ended): the SDK recognises a killed sandbox by the abrupt reset (protocol doc §4).
 *
 * Whatever arrives — from clients without a key, or from processes in a sandbox answering through
 * it — is answered or dropped; nothing may throw out of a handler or leave an `error` event
 * without a listener, because either would end the server process.
 */
export class SandboxRouter {
  private readonly open = new Map<string, Set<{ destroy(): void }>>();
  private readonly hostPattern: RegExp;

  private readonly agentLink: AgentLink;
  /** Keep-alive connections to sandbox ports served over TLS (HTTPS_PORTS_NOTE). */
  private readonly tlsAgent = new https.Agent({ keepAlive: true, maxSockets: 256, maxFreeSockets: 64, keepAliveMsecs: 10_000, rejectUnauthorized: false });

  constructor(
    private readonly source: RouteSource,
    domain: string,
    options: SandboxRouterOptions,
  ) {
    this.hostPattern = hostPattern(domain);
    this.agentLink = options.agentLink;
    source.on("ended", (sandboxId) => this.resetConnections(sandboxId));
  }

  /**
   * Decides whether a request is sandbox traffic; undefined means it is for the API. Throws an
   * invalid_argument CubicleError for sandbox traffic with an unusable port (answer 400).
   */
  match(req: IncomingMessage): RouteMatch | undefined {
    const route = parseRoute({ id: headerString(req.headers, "e2b-sandbox-id"), port: headerString(req.headers, "e2b-sandbox-port"), host: headerString(req.headers, "host") }, this.hostPattern);
    return route ?? this.matchSignedFilesUrl(req);
  }

  /**
   * `/files` requests under E2B_SANDBOX_URL that carry no sandbox id: `downloadUrl()` /
   * `uploadUrl()` (a signature in the query, formula: protocol doc §6.3), and the reads and
   * writes of SDKs before 2.14, which send only `X-Access-Token` (E2B issue #1158). Either goes
   * to the live sandbox whose access token matches. Tokens and signatures are compared in
   * constant time with no early exit, so the time taken does not tell which sandbox matched;
   * a sandbox without a token is never found this way.
   */
  private matchSignedFilesUrl(req: IncomingMessage): RouteMatch | undefined {
    if (req.url !== "/files" && !req.url?.startsWith("/files?")) return undefined;
    const token = headerString(req.headers, "x-access-token");
    if (token) return this.matchByToken((accessToken) => constantTimeEquals(accessToken, token));
    let query: URLSearchParams;
    try {
      query = new URL(req.url, "http://router.invalid").searchParams;
    } catch {
      return undefined;
    }
    const signature = query.get("signature");
    if (!signature || !fileSignaturePattern.test(signature)) return undefined;
    const operation = fileOperationOf(req.method);
    const filePath = query.get("path") ?? "";
    const username = query.get("username") ?? "";
    // As sent: the agent checks the signature again with the expiration it parses.
    const expiration = query.get("signature_expiration") || undefined;
    return this.matchByToken((accessToken) => constantTimeEquals(computeFileSignature(filePath, operation, username, accessToken, expiration), signature));
  }

  /** envd of the one running secure sandbox whose token `matches`, checking every sandbox. */
  private matchByToken(matches: (accessToken: string) => boolean): RouteMatch | undefined {
    let found: string | undefined;
    for (const sandbox of this.source.liveSandboxes()) {
      if (!sandbox.envdAccessToken || sandbox.state !== "running") continue;
      if (matches(sandbox.envdAccessToken) && found === undefined) found = sandbox.sandboxId;
    }
    return found === undefined ? undefined : { sandboxId: found, port: ENVD_PORT };
  }

  private track(sandboxId: string, handle: { destroy(): void }): () => void {
    let set = this.open.get(sandboxId);
    if (!set) this.open.set(sandboxId, (set = new Set()));
    set.add(handle);
    const release = this.source.holdAwake?.(sandboxId);
    let untracked = false;
    return () => {
      if (!untracked) release?.();
      untracked = true;
      set!.delete(handle);
      if (set!.size === 0 && this.open.get(sandboxId) === set) this.open.delete(sandboxId);
    };
  }

  /** Destroys every open connection of a sandbox that has ended. */
  resetConnections(sandboxId: string): void {
    const set = this.open.get(sandboxId);
    if (!set) return;
    this.open.delete(sandboxId);
    for (const handle of set) handle.destroy();
  }

  private sendNotFound(res: ServerResponse, sandboxId: string): void {
    sendJsonResponse(res, 502, notFoundBody(sandboxId));
  }

  /** The answer when the sandbox runs but its side of the exchange failed (closed port, bad HTTP). */
  private sendBadGateway(res: ServerResponse, match: RouteMatch, message: string): void {
    sendJsonResponse(res, 502, badGatewayBody(match, message));
  }

  /**
   * The route of a sandbox; a paused one with auto-resume is resumed first (the request waits),
   * except for envd's `GET /health`: that is how the SDK asks whether a sandbox runs
   * (`isRunning()`, and its probe after a dropped stream), and a paused sandbox does not run.
   * Waking it would undo every pause that cuts a client's open stream: the SDK probes at once.
   * Traffic that lacks a sandbox's traffic access token is refused, and never wakes it.
   */
  private async resolveTarget(req: IncomingMessage, match: RouteMatch): Promise<SandboxRoute | { refused: string } | undefined> {
    const immediate = this.source.routeTarget(match.sandboxId);
    if (immediate) return this.admit(req, match, immediate);
    const sleeping = this.source.liveSandboxes().find((s) => s.sandboxId === match.sandboxId);
    const refusedBeforeWaking = sleeping && trafficTokenRefusal(req.headers, match.port, sleeping.trafficAccessToken ?? undefined);
    if (refusedBeforeWaking) return { refused: refusedBeforeWaking };
    const healthProbe = match.port === ENVD_PORT && req.method === "GET" && req.url?.split("?")[0] === "/health";
    const target = await this.source.resumeForTraffic?.(match.sandboxId, { wake: !healthProbe });
    return target && this.admit(req, match, target);
  }

  /** The route itself, or why the request may not take it. */
  private admit(req: IncomingMessage, match: RouteMatch, target: SandboxRoute): SandboxRoute | { refused: string } {
    const refused = trafficTokenRefusal(req.headers, match.port, target.trafficAccessToken);
    return refused ? { refused } : target;
  }

  handleRequest(req: IncomingMessage, res: ServerResponse, match: RouteMatch): void {
    res.on("error", (err) => log.debug("client response error", { sandboxId: match.sandboxId, error: err.message }));
    const immediate = this.source.routeTarget(match.sandboxId);
    if (immediate) return this.forwardOrRefuse(req, res, match, this.admit(req, match, immediate));
    // The body stays unread (not flowing) while the sandbox resumes.
    this.resolveTarget(req, match)
      .then(
        (target) => {
          if (target) return this.forwardOrRefuse(req, res, match, target);
          req.resume();
          this.sendNotFound(res, match.sandboxId);
        },
        () => {
          req.resume();
          this.sendNotFound(res, match.sandboxId);
        },
      )
      .catch((err) => {
        log.warn("routing a request failed", { sandboxId: match.sandboxId, error: String(err) });
        res.socket?.destroy();
      });
  }

  private forwardOrRefuse(req: IncomingMessage, res: ServerResponse, match: RouteMatch, target: SandboxRoute | { refused: string }): void {
    if ("refused" in target) {
      req.resume();
      sendJsonResponse(res, 403, trafficRefusedBody(match.sandboxId, target.refused));
      return;
    }
    this.forward(req, res, match, target);
  }

  private forward(req: IncomingMessage, res: ServerResponse, match: RouteMatch, target: SandboxRoute): void {
    if (res.destroyed || req.destroyed) return;
    let upstream: http.ClientRequest;
    try {
      const headers = forwardHeaders(req.headers);
      const host = maskedHost(match.port, target.maskRequestHost);
      if (host !== undefined) {
        // As upstream: the client's Host moves to X-Forwarded-Host (replacing one it sent).
        if (req.headers.host !== undefined) headers["x-forwarded-host"] = req.headers.host;
        else delete headers["x-forwarded-host"];
        headers.host = host;
      }
      const request = { host: target.address, port: match.port, method: req.method, path: req.url, headers };
      upstream = servesTls(target, match.port) ? https.request({ ...request, agent: this.tlsAgent, rejectUnauthorized: false }) : http.request({ ...request, agent: this.agentLink.httpAgent });
    } catch (err) {
      // http.request validates the path and headers; what Node's parser let in may still fail here.
      req.resume();
      sendJsonResponse(res, 400, { code: 400, message: `the request cannot be forwarded to the sandbox: ${(err as Error).message}` });
      return;
    }
    // res.socket is null once the response finished; a later failure must still reach the client.
    const clientSocket = req.socket;
    const untrack = this.track(match.sandboxId, {
      destroy: () => {
        upstream.destroy();
        clientSocket.destroy();
      },
    });
    // Set once the upstream has given its answer (or failed): a close before that is a 502.
    let settled = false;
    upstream.on("response", (upstreamRes) => {
      settled = true;
      upstreamRes.on("error", () => clientSocket.destroy());
      upstreamRes.on("aborted", () => clientSocket.destroy());
      const early = !req.complete;
      if (early) {
        // The sandbox answered before the request's body was in (a 401 or 413 on an upload): the
        // rest of the body is read and dropped, so the client gets the answer and can reuse its
        // connection, and the upstream socket, which never got the whole request, is not reused.
        req.unpipe(upstream);
        req.resume();
        upstreamRes.on("end", () => {
          upstream.destroy();
          endAfterBody(req, res);
        });
      }
      const status = upstreamRes.statusCode ?? 0;
      // A final answer is 200–999 (1xx are interim; Node's writeHead throws below 100 and above 999).
      if (!Number.isInteger(status) || status < 200 || status > 999) {
        upstreamRes.resume();
        upstream.destroy();
        this.sendBadGateway(res, match, `The sandbox's server on port ${match.port} answered with an invalid HTTP status (${status})`);
        return;
      }
      try {
        res.writeHead(status, forwardHeaders(upstreamRes.headers));
        res.flushHeaders();
      } catch (err) {
        upstreamRes.resume();
        upstream.destroy();
        this.sendBadGateway(res, match, `The sandbox's server on port ${match.port} answered with headers that cannot be forwarded`);
        log.debug("upstream response not forwardable", { sandboxId: match.sandboxId, error: String(err) });
        return;
      }
      upstreamRes.pipe(res, { end: !early });
    });
    // A 101 to a request that asked for no upgrade: Node's client emits 'upgrade', never 'response'.
    upstream.on("upgrade", (_upstreamRes, upstreamSocket) => {
      settled = true;
      upstreamSocket.destroy();
      this.sendBadGateway(res, match, `The sandbox's server on port ${match.port} switched protocols on a request that asked for no upgrade`);
    });
    upstream.on("close", () => {
      if (settled) return;
      settled = true;
      if (!res.writableEnded) this.sendBadGateway(res, match, `The sandbox's server on port ${match.port} closed the connection without an answer`);
    });
    upstream.on("error", (err) => {
      settled = true;
      log.debug("upstream error", { sandboxId: match.sandboxId, port: match.port, error: err.message });
      if (res.headersSent) {
        clientSocket.destroy();
        return;
      }
      // The sandbox is live but nothing listens on that port, its answer was not HTTP, or it just died.
      const stillLive = this.source.routeTarget(match.sandboxId) !== undefined;
      if (stillLive && match.port !== ENVD_PORT && match.port !== INTERPRETER_PORT) {
        const parseError = (err as NodeJS.ErrnoException).code?.startsWith("HPE_");
        this.sendBadGateway(res, match, parseError ? `The sandbox's server on port ${match.port} did not answer valid HTTP` : portClosedMessage(match.port));
      } else {
        this.sendNotFound(res, match.sandboxId);
      }
    });
    // A client that goes away must reach the agent as a disconnect (it interrupts kernels, stops streams).
    res.on("close", () => {
      untrack();
      if (!res.writableFinished) upstream.destroy();
    });
    req.pipe(upstream);
  }

  /** A WebSocket (or other) upgrade: a byte pipe to the sandbox's port once it accepts. */
  handleUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    // Node removed its own listeners before emitting 'upgrade': a reset now would be unhandled.
    socket.on("error", (err) => log.debug("upgrade client socket error", { error: err.message }));
    let match: RouteMatch | undefined;
    try {
      match = this.match(req);
    } catch (err) {
      const error = CubicleError.from(err);
      return writeRawJsonResponse(socket, error.httpStatus, error.toE2bBody());
    }
    if (!match) {
      return writeRawJsonResponse(socket, 400, {
        code: 400,
        message: "upgrades are only for sandbox traffic: name the sandbox with E2b-Sandbox-Id and E2b-Sandbox-Port, or a <port>-<sandboxId> Host",
      });
    }
    const route = match;
    this.resolveTarget(req, route)
      .then(
        (target) => this.upgradeTo(req, socket, head, route, target),
        () => this.upgradeTo(req, socket, head, route, undefined),
      )
      .catch((err) => {
        log.warn("routing an upgrade failed", { sandboxId: route.sandboxId, error: String(err) });
        socket.destroy();
      });
  }

  private upgradeTo(req: IncomingMessage, socket: Duplex, head: Buffer, match: RouteMatch, target: SandboxRoute | { refused: string } | undefined): void {
    if (socket.destroyed) return;
    if (!target) return writeRawJsonResponse(socket, 502, notFoundBody(match.sandboxId));
    if ("refused" in target) return writeRawJsonResponse(socket, 403, trafficRefusedBody(match.sandboxId, target.refused));
    let host: string | undefined;
    try {
      host = maskedHost(match.port, target.maskRequestHost);
    } catch (err) {
      const error = CubicleError.from(err);
      return writeRawJsonResponse(socket, error.httpStatus, error.toE2bBody());
    }
    const overTls = servesTls(target, match.port);
    const upstream = overTls ? tls.connect({ host: target.address, port: match.port, rejectUnauthorized: false }) : net.connect({ host: target.address, port: match.port });
    let connected = false;
    const untrack = this.track(match.sandboxId, {
      destroy: () => {
        upstream.destroy();
        socket.destroy();
      },
    });
    upstream.on(overTls ? "secureConnect" : "connect", () => {
      connected = true;
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      if (host !== undefined && req.headers.host === undefined) lines.push(`Host: ${host}`);
      for (let i = 0; i < req.rawHeaders.length; i += 2) {
        const name = req.rawHeaders[i]!;
        const lower = name.toLowerCase();
        if (host !== undefined && lower === "x-forwarded-host") continue;
        if (host !== undefined && lower === "host") {
          lines.push(`Host: ${host}`, `X-Forwarded-Host: ${req.rawHeaders[i + 1]}`);
          continue;
        }
        lines.push(`${name}: ${req.rawHeaders[i + 1]}`);
      }
      upstream.write(lines.join("\r\n") + "\r\n\r\n");
      if (head.length) upstream.write(head);
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    const close = () => {
      untrack();
      upstream.destroy();
      socket.destroy();
    };
    upstream.on("error", (err) => {
      if (connected) return close();
      untrack();
      // Nothing was sent to the client yet: tell it why, as the plain path does.
      const stillLive = this.source.routeTarget(match.sandboxId) !== undefined;
      log.debug("upgrade upstream error", { sandboxId: match.sandboxId, port: match.port, error: err.message });
      if (stillLive) writeRawJsonResponse(socket, 502, badGatewayBody(match, portClosedMessage(match.port)));
      else writeRawJsonResponse(socket, 502, notFoundBody(match.sandboxId));
    });
    upstream.on("close", () => {
      if (connected) close();
    });
    socket.on("close", close);
  }
}
