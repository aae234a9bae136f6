import http, { type IncomingMessage, type ServerResponse } from "node:http";
import https from "node:https";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import { answerClientError, sendJsonResponse, writeRawJsonResponse } from "./raw-response.js";
import type { SandboxRouter } from "./sandbox-router.js";

const log = createLogger("router");

/** Answers with an E2B error body `{code, message}`; never throws. */
function refuse(res: ServerResponse, status: number, message: string): void {
  sendJsonResponse(res, status, { code: status, message });
}

const serverOptions = { keepAliveTimeout: 65_000, requestTimeout: 0, headersTimeout: 60_000 };

/**
 * The HTTP server of the API port: sandbox traffic (by header or Host) goes to the router, the
 * rest to the API's handler; WebSocket upgrades are sandbox traffic. No input on any of its
 * sockets may end the process: every handler here catches what its callee throws, and requests
 * Node cannot parse are answered by {@link answerClientError} (fastify installs it as its
 * `clientErrorHandler`, see the API's options).
 */
export function createRoutedHttpServer(router: SandboxRouter, apiHandler: (req: IncomingMessage, res: ServerResponse) => void): http.Server {
  return routeOn(http.createServer(serverOptions), router, apiHandler);
}

/** A certificate and its key, PEM. */
export interface TlsCredentials {
  key: string | Buffer;
  cert: string | Buffer;
}

/**
 * The HTTPS twin of {@link createRoutedHttpServer}: the same routing (sandbox traffic by Host
 * `<port>-<sandboxId>.<domain>` or E2b-Sandbox-* headers, upgrades included; the rest to the
 * API) behind TLS, HTTP/1.1 only. Requests Node cannot parse get the same answer as on the plain
 * port; failed handshakes are logged at debug level and cost nothing else.
 */
export function createRoutedHttpsServer(router: SandboxRouter, apiHandler: (req: IncomingMessage, res: ServerResponse) => void, credentials: TlsCredentials): https.Server {
  const server = https.createServer({ ...serverOptions, key: credentials.key, cert: credentials.cert, ALPNProtocols: ["http/1.1"], handshakeTimeout: 30_000 });
  server.on("clientError", answerClientError);
  server.on("tlsClientError", (err: Error) => log.debug("TLS handshake failed", { error: err.message }));
  return routeOn(server, router, apiHandler);
}

function routeOn<S extends http.Server>(server: S, router: SandboxRouter, apiHandler: (req: IncomingMessage, res: ServerResponse) => void): S {
  server.on("request", function routeRequest(req: IncomingMessage, res: ServerResponse) {
    let match;
    try {
      match = router.match(req);
    } catch (err) {
      req.resume();
      const error = CubicleError.from(err, "invalid_argument");
      return refuse(res, error.httpStatus, error.message);
    }
    try {
      if (match) router.handleRequest(req, res, match);
      else apiHandler(req, res);
    } catch (err) {
      log.error("a request handler threw", { error: String(err), stack: (err as Error)?.stack });
      req.resume();
      refuse(res, 500, "internal error");
    }
  });
  server.on("upgrade", function routeUpgrade(req: IncomingMessage, socket, head: Buffer) {
    try {
      router.handleUpgrade(req, socket, head);
    } catch (err) {
      log.error("an upgrade handler threw", { error: String(err), stack: (err as Error)?.stack });
      socket.on("error", () => undefined);
      writeRawJsonResponse(socket, 500, { code: 500, message: "internal error" });
    }
  });
  // `Expect:` values other than 100-continue: Node's own 417 has no body.
  server.on("checkExpectation", function refuseExpectation(req: IncomingMessage, res: ServerResponse) {
    req.resume();
    refuse(res, 417, "the Expect header is not supported; only 100-continue is");
  });
  // Accept failures (EMFILE …) are emitted on the server; unhandled, they would end the process.
  server.on("error", (err) => log.error("server socket error", { error: err.message }));
  return server;
}
