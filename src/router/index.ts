export { SandboxRouter } from "./sandbox-router.js";
export type { RouteMatch, RouteSource } from "./sandbox-router.js";
export { createRoutedHttpServer } from "./http-server.js";
