import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { chmod, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, describe, it } from "node:test";
import { Runc } from "./runc.js";
import { SandboxHelper } from "./sandbox-helper.js";

// runc runs from the resident helper (`node scripts/build.mjs` builds it).
const helperBinary = path.join(import.meta.dirname, "..", "..", "..", "dist", "sandbox-helper");
const skip = existsSync(helperBinary) ? false : "build the helper first (node scripts/build.mjs)";

/**
 * A stand-in runc that answers `--help` like runc 1.1 (with `--criu`) or 1.2+ (without) and
 * records every other argv: what the CLI is asked to do, not what a real runc would do.
 */
async function fakeRunc(dir: string, takesCriuFlag: boolean): Promise<{ binary: string; calls: () => Promise<string[][]> }> {
  const binary = path.join(dir, takesCriuFlag ? "runc-1.1" : "runc-1.3");
  const log = `${binary}.calls`;
  const help = takesCriuFlag ? "   --criu value  path to the criu binary used for checkpoint and restore" : "   --root value  root directory for storage of container state";
  await writeFile(binary, `#!/bin/sh\nif [ "$1" = --help ]; then echo '${help}'; exit 0; fi\necho "$*" >> ${log}\n`);
  await chmod(binary, 0o755);
  return { binary, calls: async () => (await readFile(log, "utf8")).trim().split("\n").map((line) => line.split(" ")) };
}

describe("runc CLI", () => {
  const dirs: string[] = [];
  const helper = new SandboxHelper(helperBinary);
  after(async () => {
    helper.close();
    await Promise.all(dirs.map((dir) => rm(dir, { recursive: true, force: true })));
  });

  for (const takesCriuFlag of [true, false]) {
    it(`names CRIU with --criu only to a runc that has the flag (${takesCriuFlag ? "1.1" : "1.2+"})`, { skip }, async () => {
      const dir = await mkdtemp(path.join(os.tmpdir(), "cubicle-runc-"));
      dirs.push(dir);
      const fake = await fakeRunc(dir, takesCriuFlag);
      const runc = new Runc(fake.binary, helper);
      const options = { criuPath: "/opt/criu/bin/criu", netnsPath: "/proc/self/ns/net", imagePath: dir, workPath: dir, logFile: path.join(dir, "log"), timeoutMs: 10_000, env: {} };
      await runc.checkpoint("c1", { ...options, leaveRunning: true });
      await runc.restoreDetached("c2", dir, options);
      const calls = await fake.calls();
      assert.equal(calls.length, 2);
      for (const argv of calls) {
        assert.equal(argv.includes("--criu"), takesCriuFlag, argv.join(" "));
        if (takesCriuFlag) assert.equal(argv[argv.indexOf("--criu") + 1], "/opt/criu/bin/criu");
      }
      assert.deepEqual([calls[0]!.includes("checkpoint"), calls[1]!.includes("restore")], [true, true]);
    });
  }
});
