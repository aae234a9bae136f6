export { SandboxRouter } from "./sandbox-router.js";
export type { RouteSource, SandboxRouterOptions } from "./sandbox-router.js";
export type { RouteMatch } from "./route-parsing.js";
export { createRoutedHttpServer } from "./http-server.js";
export { answerClientError } from "./raw-response.js";
