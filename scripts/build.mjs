// Bundles the server/CLI and the in-sandbox agent with esbuild. Fast enough to run before every start.
import { build } from "esbuild";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..");
const dist = path.join(root, "dist");
fs.mkdirSync(path.join(dist, "agent"), { recursive: true });

/**
 * Static C helpers, built with the host's C compiler when the source is newer than the binary:
 * the agent's credential switch (src/agent/native/run-as.c, RUN_AS_NOTE), the runtime's CRIU
 * front and tar shim (src/runtime/container/native/, CRIU_FRONT_NOTE, TAR_SHIM_NOTE). Without a
 * compiler (setup installs gcc) Cubicle falls back to setpriv, to starting CRIU directly and to
 * the shell tar shim, so a failure here only warns.
 */
function buildNative(source, output, fallback, flags = ["-static"], headers = [], libs = []) {
  source = path.join(root, source);
  // Rebuilt when the source or a header it includes (`headers`, beside it) is newer than the binary.
  const newest = Math.max(...[source, ...headers.map((header) => path.join(path.dirname(source), header))].map((file) => fs.statSync(file).mtimeMs));
  if (fs.existsSync(output) && fs.statSync(output).mtimeMs >= newest) return;
  const result = spawnSync("cc", ["-O2", ...flags, "-Wall", "-Werror", "-o", `${output}.tmp`, source, ...libs], { encoding: "utf8" });
  if (result.status !== 0) {
    fs.rmSync(`${output}.tmp`, { force: true });
    console.warn(`build: ${path.basename(output)} not built (${result.error?.message ?? result.stderr.trim()}); ${fallback}`);
    return;
  }
  fs.renameSync(`${output}.tmp`, output);
}
buildNative("src/agent/native/run-as.c", path.join(dist, "agent", "run-as"), "sandboxes switch users through setpriv");
// Node-API addon, linked against the running Node's headers; without it file metadata cannot be
// stored (uploads with metadata are refused, XATTR_NOTE).
const nodeHeaders = path.resolve(path.dirname(process.execPath), "..", "include", "node");
buildNative("src/agent/native/xattr.c", path.join(dist, "agent", "xattr.node"), "file metadata (xattrs) is not available in sandboxes", ["-shared", "-fPIC", `-I${nodeHeaders}`]);
// A microVM guest's reseed of its kernel's random numbers after a restore (GUEST_MACHINE_NOTE);
// without it a restored guest's randomness is reseeded only by the kernel's own schedule.
buildNative("src/agent/native/guest.c", path.join(dist, "agent", "guest.node"), "restored microVM guests are not reseeded at once", ["-shared", "-fPIC", `-I${nodeHeaders}`]);
// The agent's process start without a fork of Node (SPAWN_NOTE); without it commands start through
// Node's spawn, ~5 ms slower each.
buildNative("src/agent/native/spawn.c", path.join(dist, "agent", "spawn.node"), "commands start through Node's spawn", ["-shared", "-fPIC", `-I${nodeHeaders}`]);
// The egress proxy's getsockopt(SO_ORIGINAL_DST) (ORIGINAL_DST_NOTE); without it the proxy cannot
// learn where a redirected connection was going and refuses every connection.
fs.mkdirSync(path.join(dist, "network"), { recursive: true });
buildNative("src/network/native/original-dst.c", path.join(dist, "network", "original-dst.node"), "the egress proxy refuses every connection", ["-shared", "-fPIC", `-I${nodeHeaders}`]);
buildNative("src/runtime/container/native/criu-front.c", path.join(dist, "criu-front"), "runc starts CRIU directly");
buildNative("src/runtime/container/native/tar-shim.c", path.join(dist, "tar-shim"), "CRIU's tar goes through the shell shim");
// Required (no fallback): the runtime refuses to start without them.
buildNative("src/runtime/container/native/sandbox-helper.c", path.join(dist, "sandbox-helper"), "the container runtime cannot start sandboxes", ["-static"], ["netlink.h", "nftables.h", "conntrack.h", "nflog.h", "criu-rpc.h"]);
// Codebases' permission-checking filesystem (CODEBASES_NOTE), on libfuse3 (setup-host.sh installs
// libfuse3-dev); without it codebases cannot be mounted.
const fuse3 = (what) => spawnSync("pkg-config", [what, "--static", "fuse3"], { encoding: "utf8" });
if (fuse3("--cflags").status === 0 && fs.existsSync(path.join(root, "src/codebases/native/codebase-fs.c"))) {
  buildNative("src/codebases/native/codebase-fs.c", path.join(dist, "codebase-fs"), "codebases cannot be mounted", [...fuse3("--cflags").stdout.trim().split(/\s+/).filter(Boolean), "-static"], [], fuse3("--libs").stdout.trim().split(/\s+/).filter(Boolean));
} else {
  console.warn("build: codebase-fs not built (no libfuse3-dev); codebases cannot be mounted");
}
buildNative("src/runtime/container/native/sandbox-boot.c", path.join(dist, "sandbox-boot"), "the container runtime cannot start sandboxes");
buildNative("src/runtime/container/native/criu-userns-shim.c", path.join(dist, "criu-userns-shim.so"), "checkpoints and restores fail", ["-shared", "-fPIC"]);

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
