/**
 * Entry point of the in-sandbox agent: serves envd on 0.0.0.0:49983 (CUBICLE_AGENT_HOST /
 * CUBICLE_AGENT_PORT override it for tests) until SIGTERM.
 */
import { createLogger } from "../shared/log.js";
import { createAgentServer } from "./server.js";

const log = createLogger("agent");

// A bug in one request must not take down every process of the sandbox with the agent.
process.on("uncaughtException", (error) => log.error("uncaught exception", { error: error.stack ?? String(error) }));
process.on("unhandledRejection", (reason) => log.error("unhandled rejection", { error: reason instanceof Error ? (reason.stack ?? reason.message) : String(reason) }));

const host = process.env.CUBICLE_AGENT_HOST || "0.0.0.0";
const port = Number(process.env.CUBICLE_AGENT_PORT || 49983);

const { server } = createAgentServer();
server.listen(port, host, () => log.info("envd listening", { host, port, pid: process.pid }));
server.on("error", (error) => {
  log.error("cannot listen", { host, port, error: error.message });
  process.exit(1);
});

for (const signal of ["SIGTERM", "SIGINT"] as const) {
  process.once(signal, () => {
    log.info("shutting down", { signal });
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
