import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, readlinkSync, statSync } from "node:fs";
import { chmod, cp, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, describe, it } from "node:test";
import { Runc, type RuncContainer } from "./runc.js";
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

// Real runc containers (root, and a template tree to run them on, as the runtime's tests).
const rootfsDir = process.env.CUBICLE_TEST_ROOTFS;
const skipContainers = process.getuid?.() !== 0 ? "needs root" : !rootfsDir ? "set CUBICLE_TEST_ROOTFS to a template rootfs" : skip;

describe("runc containers through the resident helper", { skip: skipContainers }, () => {
  const tag = `t15b-${process.pid.toString(36)}`;
  const netns = `${tag}-net`;
  const ids = [`${tag}-a`, `${tag}-b`];
  let dir: string;
  let helper: SandboxHelper;

  after(async () => {
    for (const id of ids) spawnSync("runc", ["delete", "--force", id]);
    spawnSync("ip", ["netns", "del", netns]);
    helper?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("runs in the netns it is given, and a killed container is removed without runc; a running one falls back to runc delete --force", async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), "t15b-runc-"));
    helper = new SandboxHelper(helperBinary);
    assert.equal(spawnSync("ip", ["netns", "add", netns]).status, 0);
    const netnsPath = `/run/netns/${netns}`;
    // A runc that notes each call, so the test sees which ones were made.
    const calls = path.join(dir, "calls");
    const wrapper = path.join(dir, "runc");
    const realRunc = spawnSync("sh", ["-c", "command -v runc"], { encoding: "utf8" }).stdout.trim();
    await writeFile(wrapper, `#!/bin/sh\necho "$*" >> ${calls}\nexec ${realRunc} "$@"\n`);
    await chmod(wrapper, 0o755);
    const runc = new Runc(wrapper, helper);
    const bundle = path.join(dir, "bundle");
    spawnSync("mkdir", [bundle]);
    assert.equal(spawnSync(realRunc, ["spec"], { cwd: bundle }).status, 0);
    const config = JSON.parse(await readFile(path.join(bundle, "config.json"), "utf8"));
    config.root = { path: rootfsDir, readonly: true };
    config.process.terminal = false;
    config.process.args = ["/bin/sleep", "1000"];
    config.linux.namespaces = config.linux.namespaces.filter((namespace: { type: string }) => namespace.type !== "network");
    for (const id of ids) {
      config.linux.cgroupsPath = `/${id}`;
      await writeFile(path.join(bundle, `${id}.json`), JSON.stringify(config));
    }

    const started: RuncContainer[] = [];
    for (const id of ids) {
      await cp(path.join(bundle, `${id}.json`), path.join(bundle, "config.json"));
      await runc.runDetached(id, bundle, path.join(dir, `${id}.log`), netnsPath);
      const container = await runc.state(id);
      assert.equal(container?.status, "running");
      started.push(container!);
    }
    assert.equal(readlinkSync(`/proc/${started[0]!.pid}/ns/net`), `net:[${statSync(netnsPath).ino}]`, "runc ran in the netns, and the container shares it");
    const stateOf = async (id: string) => JSON.parse(await readFile(`/run/runc/${id}/state.json`, "utf8")) as { cgroup_paths: Record<string, string> };
    const cgroupsA = Object.values((await stateOf(ids[0]!)).cgroup_paths);
    const cgroupsB = Object.values((await stateOf(ids[1]!)).cgroup_paths);
    assert.ok(cgroupsA.length > 0 && cgroupsA.every((cgroup) => existsSync(cgroup)));

    await runc.kill(started[0]!);
    await runc.delete(ids[0]!, false);
    assert.equal(await runc.state(ids[0]!), undefined);
    assert.ok(!existsSync(`/run/runc/${ids[0]}`));
    assert.deepEqual(cgroupsA.filter((cgroup) => existsSync(cgroup)), [], "its cgroups are gone");

    await runc.delete(ids[1]!, true);
    assert.equal(await runc.state(ids[1]!), undefined);
    assert.deepEqual(cgroupsB.filter((cgroup) => existsSync(cgroup)), [], "runc removed the running one's cgroups");
    await runc.delete(ids[1]!, true); // no error for a container that does not exist

    const made = (await readFile(calls, "utf8")).trim().split("\n");
    assert.deepEqual(
      made.filter((call) => / delete /.test(` ${call} `)),
      [`delete --force ${ids[1]}`],
      `runc was asked to delete only the running container: ${made.join(" | ")}`,
    );
  });
});
