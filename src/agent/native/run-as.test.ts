import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";

// Built by scripts/build.mjs (the test runner builds first); setup-host.sh installs the compiler.
const runAs = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../../dist/agent/run-as");

function run(args: string[], env: NodeJS.ProcessEnv = { PATH: "/usr/bin:/bin" }) {
  return spawnSync(runAs, args, { encoding: "utf8", env });
}

describe("run-as (the agent's credential helper)", () => {
  it("is built", () => assert.ok(existsSync(runAs), `${runAs} is missing: run scripts/build.mjs with a C compiler installed`));

  it("sets uid, gid and exactly the supplementary groups given, then runs the command from PATH", () => {
    const result = run(["65534", "65534", "27,100", "sh", "-c", 'echo "$(id -u) $(id -g) $(id -G)"']);
    assert.equal(result.status, 0, result.stderr);
    assert.equal(result.stdout, "65534 65534 65534 27 100\n");
  });

  it("clears the supplementary groups with -", () => {
    const result = run(["65534", "65534", "-", "/usr/bin/id", "-G"]);
    assert.equal(result.status, 0, result.stderr);
    assert.equal(result.stdout, "65534\n");
  });

  it("drops root for good: the command cannot take it back", () => {
    const result = run(["65534", "65534", "-", "/usr/bin/perl", "-e", "$< = 0; $> = 0; print qq($< $>\\n)"]);
    assert.equal(result.status, 0, result.stderr);
    assert.equal(result.stdout, "65534 65534\n");
  });

  it("marks the command as the OOM killer's first choice (oom_score_adj 1000), also for root", () => {
    for (const ids of [["65534", "65534", "-"], ["0", "0", "0"]]) {
      const result = run([...ids, "/bin/cat", "/proc/self/oom_score_adj"]);
      assert.equal(result.status, 0, result.stderr);
      assert.equal(result.stdout, "1000\n", `run-as ${ids.join(" ")}`);
    }
  });

  it("passes the environment to the command untouched", () => {
    const result = run(["65534", "65534", "-", "/usr/bin/env"], { PATH: "/usr/bin:/bin", ONLY: "this" });
    assert.equal(result.stdout, "PATH=/usr/bin:/bin\nONLY=this\n");
  });

  it("fails like setpriv: 127 for a missing command, 125 for bad arguments", () => {
    const missing = run(["65534", "65534", "-", "no-such-command-here"]);
    assert.equal(missing.status, 127);
    assert.match(missing.stderr, /run-as: failed to execute no-such-command-here: No such file or directory/);
    for (const args of [["65534", "65534", "-"], ["x", "65534", "-", "id"], ["65534", "65534", "1,,x", "id"], ["-1", "0", "-", "id"]]) {
      const bad = run(args);
      assert.equal(bad.status, 125, `run-as ${args.join(" ")}`);
      assert.match(bad.stderr, /usage: run-as/);
    }
  });
});
