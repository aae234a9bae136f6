// Bundles the server/CLI and the in-sandbox agent with esbuild. Fast enough to run before every start.
import { build } from "esbuild";
import fs from "node:fs";
import path from "node:path";

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..");
const dist = path.join(root, "dist");
fs.mkdirSync(path.join(dist, "agent"), { recursive: true });

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
