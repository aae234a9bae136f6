/**
 * `keepAliveTimeout` of the agent's HTTP servers: 0, idle keep-alive connections are never
 * closed by the agent. The Cubicle server on the host owns them (its router and API reuse them
 * for every call) and drops them itself before a memory dump and when a sandbox ends. An agent
 * that closed them after a timeout would do so the instant it is thawed after a longer freeze
 * (a warm-pool entry, a hot pause): the close races the first request on that connection, which
 * then fails with a reset.
 */
export const KEEP_IDLE_CONNECTIONS = 0;
