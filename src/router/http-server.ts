import http, { type IncomingMessage, type ServerResponse } from "node:http";
import type { SandboxRouter } from "./sandbox-router.js";

/**
 * The HTTP server of the API port: sandbox traffic (by header or Host) goes to the router, the
 * rest to the API's handler; WebSocket upgrades are sandbox traffic.
 */
export function createRoutedHttpServer(router: SandboxRouter, apiHandler: (req: IncomingMessage, res: ServerResponse) => void): http.Server {
  const server = http.createServer({ keepAliveTimeout: 65_000, requestTimeout: 0, headersTimeout: 60_000 }, (req, res) => {
    const match = router.match(req);
    if (match) router.handleRequest(req, res, match);
    else apiHandler(req, res);
  });
  server.on("upgrade", (req, socket, head) => router.handleUpgrade(req, socket, head));
  return server;
}
