import { createHash } from "node:crypto";
import http, { type IncomingMessage, type ServerResponse } from "node:http";
import net from "node:net";
import type { Duplex } from "node:stream";
import { agentHttpAgent, ENVD_PORT, INTERPRETER_PORT } from "../core/agent-client.js";
import { createLogger } from "../shared/log.js";

const log = createLogger("router");

/** What the router needs from the core: where a sandbox lives, and a signal when it ends. */
export interface RouteSource {
  routeTarget(sandboxId: string): { sandboxId: string; address: string } | undefined;
  /**
   * For a sandbox without a route: wait while a just-claimed sandbox's agent gets its identity,
   * or resume it if it is paused with auto-resume (unless `wake` is false), and return its
   * route then; undefined = answer "not found".
   */
  resumeForTraffic?(sandboxId: string, options?: { wake?: boolean }): Promise<{ sandboxId: string; address: string } | undefined>;
  /** Secure live sandboxes, to route signed `/files` URLs that carry no sandbox id. */
  liveSandboxes(): { sandboxId: string; envdAccessToken: string | undefined; state: string }[];
  on(event: "ended", listener: (sandboxId: string) => void): unknown;
}

export interface RouteMatch {
  sandboxId: string;
  port: number;
}

// RFC 7230 §6.1 hop-by-hop headers are not forwarded.
const hopByHop = new Set(["connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"]);

function header(req: IncomingMessage, name: string): string | undefined {
  const value = req.headers[name];
  return Array.isArray(value) ? value[0] : value;
}

function forwardHeaders(headers: http.IncomingHttpHeaders): http.OutgoingHttpHeaders {
  const out: http.OutgoingHttpHeaders = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value === undefined || hopByHop.has(name)) continue;
    out[name] = value;
  }
  return out;
}

/**
 * Routes sandbox traffic arriving on the API port: by the `E2b-Sandbox-Id` / `E2b-Sandbox-Port`
 * headers or by a Host of `<port>-<sandboxId>.<domain>`. Ports 49983 and 49999 reach the agent,
 * any other port the same port inside the sandbox. When a sandbox ends, its open connections are
 * destroyed (not ended): the SDK recognises a killed sandbox by the abrupt reset (protocol doc §4).
 */
export class SandboxRouter {
  private readonly open = new Map<string, Set<{ destroy(): void }>>();
  private readonly hostPattern: RegExp;

  constructor(private readonly source: RouteSource, domain: string) {
    const escaped = domain.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    this.hostPattern = new RegExp(`^(\\d{1,5})-([a-z0-9]+)\\.${escaped}(?::\\d+)?$`, "i");
    source.on("ended", (sandboxId) => this.resetConnections(sandboxId));
  }

  /** Decides whether a request is sandbox traffic; undefined means it is for the API. */
  match(req: IncomingMessage): RouteMatch | undefined {
    const id = header(req, "e2b-sandbox-id");
    const port = header(req, "e2b-sandbox-port");
    if (id !== undefined && port !== undefined) return { sandboxId: id.trim(), port: Number(port) };
    const host = header(req, "host");
    const hostMatch = host ? this.hostPattern.exec(host) : null;
    if (hostMatch) return { sandboxId: hostMatch[2]!.toLowerCase(), port: Number(hostMatch[1]) };
    return this.matchSignedFilesUrl(req);
  }

  /**
   * `downloadUrl()` / `uploadUrl()` under E2B_SANDBOX_URL carry no sandbox id: find the live
   * sandbox whose access token produced the signature (formula: protocol doc §6.3).
   */
  private matchSignedFilesUrl(req: IncomingMessage): RouteMatch | undefined {
    if (!req.url?.startsWith("/files?")) return undefined;
    const query = new URL(req.url, "http://x").searchParams;
    const signature = query.get("signature");
    if (!signature) return undefined;
    const operation = req.method === "POST" ? "write" : "read";
    const filePath = query.get("path") ?? "";
    const username = query.get("username") ?? "";
    const expiration = query.get("signature_expiration");
    for (const sandbox of this.source.liveSandboxes()) {
      if (!sandbox.envdAccessToken || sandbox.state !== "running") continue;
      const input = `${filePath}:${operation}:${username}:${sandbox.envdAccessToken}` + (expiration ? `:${expiration}` : "");
      const expected = "v1_" + createHash("sha256").update(input).digest("base64").replace(/=+$/, "");
      if (expected === signature) return { sandboxId: sandbox.sandboxId, port: ENVD_PORT };
    }
    return undefined;
  }

  private track(sandboxId: string, handle: { destroy(): void }): () => void {
    let set = this.open.get(sandboxId);
    if (!set) this.open.set(sandboxId, (set = new Set()));
    set.add(handle);
    return () => {
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
    const body = JSON.stringify({ message: "The sandbox was not found", sandboxId, code: 502 });
    res.writeHead(502, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
    res.end(body);
  }

  /**
   * The route of a sandbox; a paused one with auto-resume is resumed first (the request waits),
   * except for envd's `GET /health`: that is how the SDK asks whether a sandbox runs
   * (`isRunning()`, and its probe after a dropped stream), and a paused sandbox does not run.
   * Waking it would undo every pause that cuts a client's open stream: the SDK probes at once.
   */
  private async resolveTarget(sandboxId: string, req: IncomingMessage, port: number): Promise<{ sandboxId: string; address: string } | undefined> {
    const healthProbe = port === ENVD_PORT && req.method === "GET" && req.url?.split("?")[0] === "/health";
    return this.source.routeTarget(sandboxId) ?? (await this.source.resumeForTraffic?.(sandboxId, { wake: !healthProbe }));
  }

  handleRequest(req: IncomingMessage, res: ServerResponse, match: RouteMatch): void {
    if (!Number.isInteger(match.port) || match.port < 1 || match.port > 65535) {
      req.resume();
      this.sendNotFound(res, match.sandboxId);
      return;
    }
    const immediate = this.source.routeTarget(match.sandboxId);
    if (immediate) return this.forward(req, res, match, immediate);
    // The body stays unread (not flowing) while the sandbox resumes.
    this.resolveTarget(match.sandboxId, req, match.port).then(
      (target) => {
        if (target) return this.forward(req, res, match, target);
        req.resume();
        this.sendNotFound(res, match.sandboxId);
      },
      () => {
        req.resume();
        this.sendNotFound(res, match.sandboxId);
      },
    );
  }

  private forward(req: IncomingMessage, res: ServerResponse, match: RouteMatch, target: { address: string }): void {
    const upstream = http.request({
      host: target.address,
      port: match.port,
      method: req.method,
      path: req.url,
      headers: forwardHeaders(req.headers),
      agent: agentHttpAgent,
    });
    const untrack = this.track(match.sandboxId, {
      destroy: () => {
        upstream.destroy();
        res.socket?.destroy();
      },
    });
    upstream.on("response", (upstreamRes) => {
      res.writeHead(upstreamRes.statusCode ?? 502, forwardHeaders(upstreamRes.headers));
      res.flushHeaders();
      upstreamRes.pipe(res);
      upstreamRes.on("aborted", () => res.socket?.destroy());
      upstreamRes.on("error", () => res.socket?.destroy());
    });
    upstream.on("error", (err) => {
      log.debug("upstream error", { sandboxId: match.sandboxId, port: match.port, error: err.message });
      if (!res.headersSent) {
        // The sandbox is live but nothing listens on that port (or it just died).
        const stillLive = this.source.routeTarget(match.sandboxId) !== undefined;
        if (stillLive && match.port !== ENVD_PORT && match.port !== INTERPRETER_PORT) {
          const body = JSON.stringify({ message: `The sandbox is running but port ${match.port} is not open`, sandboxId: match.sandboxId, port: match.port, code: 502 });
          res.writeHead(502, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
          res.end(body);
        } else {
          this.sendNotFound(res, match.sandboxId);
        }
      } else {
        res.socket?.destroy();
      }
    });
    // A client that goes away must reach the agent as a disconnect (it interrupts kernels, stops streams).
    res.on("close", () => {
      untrack();
      if (!res.writableFinished) upstream.destroy();
    });
    req.pipe(upstream);
  }

  handleUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    const match = this.match(req);
    if (!match) return this.upgradeTo(req, socket, head, undefined, undefined);
    this.resolveTarget(match.sandboxId, req, match.port).then(
      (target) => this.upgradeTo(req, socket, head, match, target),
      () => this.upgradeTo(req, socket, head, match, undefined),
    );
  }

  private upgradeTo(req: IncomingMessage, socket: Duplex, head: Buffer, match: RouteMatch | undefined, target: { address: string } | undefined): void {
    if (!match || !target) {
      const body = JSON.stringify({ message: "The sandbox was not found", sandboxId: match?.sandboxId ?? "", code: 502 });
      socket.end(`HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`);
      return;
    }
    const upstream = net.connect({ host: target.address, port: match.port });
    const untrack = this.track(match.sandboxId, {
      destroy: () => {
        upstream.destroy();
        socket.destroy();
      },
    });
    upstream.on("connect", () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
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
    upstream.on("error", close);
    socket.on("error", close);
    upstream.on("close", close);
    socket.on("close", close);
  }
}
