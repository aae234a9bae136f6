export { SandboxRouter, TRAFFIC_ACCESS_TOKEN_HEADER } from "./sandbox-router.js";
export type { RouteSource, SandboxRoute, SandboxRouterOptions } from "./sandbox-router.js";
export type { RouteMatch } from "./route-parsing.js";
export { createRoutedHttpServer, createRoutedHttpsServer, type TlsCredentials } from "./http-server.js";
export { answerClientError } from "./raw-response.js";
