// Runs the whole suite with node's test runner: unit tests next to the code (src/**/*.test.ts),
// then end-to-end tests (test/e2e/*.test.ts) and the escape battery (test/security/*.test.ts)
// against real servers and sandboxes.
// Extra arguments narrow the run to files whose path contains one of them.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..");
const filters = process.argv.slice(2);

function collect(dir, suffix) {
  const out = [];
  if (!fs.existsSync(dir)) return out;
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...collect(full, suffix));
    else if (entry.name.endsWith(suffix)) out.push(path.relative(root, full));
  }
  return out.sort();
}

let files = [
  ...collect(path.join(root, "src"), ".test.ts"),
  ...collect(path.join(root, "test", "e2e"), ".test.ts"),
  ...collect(path.join(root, "test", "security"), ".test.ts"),
];
if (filters.length) files = files.filter((f) => filters.some((needle) => f.includes(needle)));
if (files.length === 0) {
  console.error("no test files matched");
  process.exit(1);
}

// The runtime's own tests run real containers on the base template's tree: make sure it exists
// (a fresh machine builds it here, once) and tell them where it is.
const env = { ...process.env, CUBICLE_LOG_LEVEL: process.env.CUBICLE_LOG_LEVEL ?? "warn" };
if (!env.CUBICLE_TEST_ROOTFS) {
  const ensured = spawnSync(process.execPath, [path.join(root, "dist", "cli.js"), "template", "ensure", "base"], { cwd: root, env, encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
  if (ensured.status !== 0) {
    console.error("could not prepare the base template for the runtime tests");
    process.exit(1);
  }
  env.CUBICLE_TEST_ROOTFS = ensured.stdout.trim().split(" ready at ")[1];
}

// --test-force-exit: a file's process ends once its tests and hooks are done, even when a handle
// it left cannot be closed (Node 20 can spin in its exit cleanup on such a handle: seen once
// after the egress proxy's h2c test, H2_TEARDOWN_NOTE); a hang there would stall the whole run.
const runNodeTests = (testFiles, extraEnv = {}) =>
  spawnSync(process.execPath, ["--import", "tsx", "--test", "--test-concurrency=1", "--test-force-exit", "--test-reporter=spec", ...testFiles], { cwd: root, stdio: "inherit", env: { ...env, ...extraEnv } }).status ?? 1;

const status = runNodeTests(files);

// E2E_RUNTIME_NOTE: the whole suite's e2e tests run against containers; a bounded part of them
// (MICROVM_E2E_FILES: commands and files through the SDK, the network policy with its bypass
// battery, sessions, snapshots with fork and rollback, pause, the lifecycle, boot identity, the
// code interpreter, the egress proxy's features, the idle tiers and crash recovery; ~25 min under
// TCG) runs again with every sandbox a microVM
// (test/e2e/harness.ts e2eRuntime), so both runtimes answer the same tests in CI. Any other e2e
// file runs against microVMs with `CUBICLE_E2E_RUNTIME=microvm ./cubicle test test/e2e/<file>`.
const MICROVM_E2E_FILES = [
  "test/e2e/commands.test.ts",
  "test/e2e/files.test.ts",
  "test/e2e/network-policy.test.ts",
  "test/e2e/sessions.test.ts",
  "test/e2e/snapshots.test.ts",
  "test/e2e/pause.test.ts",
  "test/e2e/lifecycle.test.ts",
  "test/e2e/boot-identity.test.ts",
  "test/e2e/code-interpreter.test.ts",
  "test/e2e/egress-features.test.ts",
  "test/e2e/idle.test.ts",
  "test/e2e/recovery.test.ts",
];
let microvmStatus = 0;
if (filters.length === 0 && process.env.CUBICLE_E2E_RUNTIME === undefined) {
  const qemu = spawnSync("sh", ["-c", "command -v qemu-system-x86_64"], { encoding: "utf8" });
  if (qemu.status === 0) {
    console.log("\n# the same e2e tests with every sandbox a microVM: " + MICROVM_E2E_FILES.join(", "));
    microvmStatus = runNodeTests(MICROVM_E2E_FILES, { CUBICLE_E2E_RUNTIME: "microvm" });
  } else {
    console.log("\n# microVM e2e pass skipped: qemu-system-x86_64 is not installed (./cubicle up installs it)");
  }
}
process.exit(status !== 0 ? status : microvmStatus);
