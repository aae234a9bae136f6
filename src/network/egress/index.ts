export { createEgressProxy } from "./egress-proxy.js";
export type { EgressProxy, EgressProxyLimits, EgressProxyOptions, EgressSandbox, EgressTarget, EgressVerdict } from "./egress-proxy.js";
export { loadOriginalDestination } from "./original-destination.js";
