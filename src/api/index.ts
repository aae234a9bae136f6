export { createApiApp } from "./app.js";
export type { ApiOptions } from "./app.js";
export { ENVD_VERSION } from "./sandbox-views.js";
