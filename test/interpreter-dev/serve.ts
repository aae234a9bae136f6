/**
 * Runs the code interpreter alone on localhost:49999 for development against the real SDK in
 * debug mode (E2B_DEBUG=true talks to http://localhost:49999). Run it in a private netns:
 *   ip netns exec agentdev-ci node --import tsx test/interpreter-dev/serve.ts
 * DEV_USER (default: root) and DEV_WORKDIR (default: /tmp/interpreter-dev-home) set the kernel user and cwd.
 */
import fs from "node:fs";
import { startInterpreterServer } from "../../src/agent/interpreter/index.js";

const workdir = process.env.DEV_WORKDIR ?? "/tmp/interpreter-dev-home";
fs.mkdirSync(workdir, { recursive: true, mode: 0o777 });

const server = await startInterpreterServer({
  host: process.env.DEV_HOST ?? "127.0.0.1",
  port: Number(process.env.DEV_PORT ?? 49999),
  getEnvVars: () => ({ SANDBOX_WIDE: "from-envd" }),
  getDefaultUser: () => process.env.DEV_USER ?? "root",
  getDefaultWorkdir: () => workdir,
});

for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.once(signal, () => {
    void server.close().then(() => process.exit(0));
  });
}
