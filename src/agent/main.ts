/**
 * Entry point of the in-sandbox agent: serves envd on 0.0.0.0:ENVD_PORT and the interpreter on
 * INTERPRETER_PORT (CUBICLE_AGENT_HOST / CUBICLE_AGENT_PORT / CUBICLE_INTERPRETER_PORT override
 * them for tests) until SIGTERM.
 */
import { isMainThread } from "node:worker_threads";
import { ENVD_PORT, INTERPRETER_PORT } from "../protocol/index.js";
import { createLogger } from "../shared/log.js";
import { ensureGuestMachineId, startGuestClockSync } from "./guest-machine.js";
import { startInterpreterServer } from "./interpreter/index.js";
import { ensureResolverConfig } from "./resolver-config.js";
import { createAgentServer } from "./server.js";
import { sandboxEnvironment } from "./state.js";

const log = createLogger("agent");

/**
 * The injected Node runs through the kit's loader, so `process.execPath` may name the loader:
 * kernels that need Node are started the way the runtime started us (CUBICLE_AGENT_NODE_COMMAND).
 */
function nodeCommand(): string[] {
  const fromRuntime = process.env.CUBICLE_AGENT_NODE_COMMAND;
  return fromRuntime ? (JSON.parse(fromRuntime) as string[]) : [process.execPath];
}

function startAgent(): void {
  // A bug in one request must not take down every process of the sandbox with the agent.
  process.on("uncaughtException", (error) => log.error("uncaught exception", { error: error.stack ?? String(error) }));
  process.on("unhandledRejection", (reason) => log.error("unhandled rejection", { error: reason instanceof Error ? (reason.stack ?? reason.message) : String(reason) }));

  const host = process.env.CUBICLE_AGENT_HOST || "0.0.0.0";
  const port = Number(process.env.CUBICLE_AGENT_PORT || ENVD_PORT);

  ensureResolverConfig();
  ensureGuestMachineId();
  startGuestClockSync();
  const { server, state } = createAgentServer();
  server.listen(port, host, () => log.info("envd listening", { host, port, pid: process.pid }));

  const interpreterPort = Number(process.env.CUBICLE_INTERPRETER_PORT || INTERPRETER_PORT);
  startInterpreterServer({
    host,
    port: interpreterPort,
    getAccessToken: () => state.accessToken,
    getEnvVars: () => sandboxEnvironment(state),
    getDefaultUser: () => state.defaultUser,
    getDefaultWorkdir: () => state.defaultWorkdir ?? "/home/user",
    nodeCommand: nodeCommand(),
  }).then(
    () => log.info("code interpreter listening", { host, port: interpreterPort }),
    (error: Error) => log.error("code interpreter failed to start", { error: error.message }),
  );
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
}

// The bundle also runs in the interpreter's cell-preparer worker thread (cell-preparer.ts),
// which must start none of this.
if (isMainThread) startAgent();
