// Bundles the server/CLI and the in-sandbox agent with esbuild. Fast enough to run before every start.
import { build } from "esbuild";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..");
const dist = path.join(root, "dist");
fs.mkdirSync(path.join(dist, "agent"), { recursive: true });

/**
 * The agent's static credential helper (src/agent/native/run-as.c, see RUN_AS_NOTE), built with
 * the host's C compiler when the source is newer than the binary. Without a compiler (setup
 * installs gcc) the agent falls back to setpriv, so a failure here only warns.
 */
function buildRunAs() {
  const source = path.join(root, "src/agent/native/run-as.c");
  const output = path.join(dist, "agent", "run-as");
  if (fs.existsSync(output) && fs.statSync(output).mtimeMs >= fs.statSync(source).mtimeMs) return;
  const result = spawnSync("cc", ["-O2", "-static", "-Wall", "-Werror", "-o", `${output}.tmp`, source], { encoding: "utf8" });
  if (result.status !== 0) {
    fs.rmSync(`${output}.tmp`, { force: true });
    console.warn(`build: run-as not built (${result.error?.message ?? result.stderr.trim()}); sandboxes switch users through setpriv`);
    return;
  }
  fs.renameSync(`${output}.tmp`, output);
}
buildRunAs();

const common = { bundle: true, platform: "node", target: "node20", sourcemap: "linked", logLevel: "warning", legalComments: "none" };

await Promise.all([
  // The server runs from the repository, next to node_modules: keep packages external.
  build({ ...common, entryPoints: [path.join(root, "src/cli/main.ts")], outfile: path.join(dist, "cli.js"), format: "esm", packages: "external" }),
  // The agent runs inside sandboxes with only /.cubicle: bundle everything but native addons,
  // which the runtime's agent kit ships under /.cubicle/node_modules.
  fs.existsSync(path.join(root, "src/agent/main.ts"))
    ? build({
        ...common,
        entryPoints: [path.join(root, "src/agent/main.ts")],
        outfile: path.join(dist, "agent", "agent.js"),
        format: "cjs",
        minify: true,
        external: ["node-pty", "zeromq"],
      })
    : Promise.resolve(),
]);
