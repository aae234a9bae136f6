import assert from "node:assert/strict";
import fs, { readFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { CubicleError } from "../../shared/cubicle-error.js";
import type { JsonObject } from "../rpc/proto-json.js";
import type { RpcContext, ServiceDefinition } from "../rpc/types.js";
import { createAgentState } from "../state.js";
import { lookupUser } from "../users.js";
import { endEventFromExit } from "./exit-status.js";
import { createProcessService, processEnvironment } from "./index.js";
import { useRunAsHelper } from "./launch.js";
import { spawnAddonAvailable, useSpawnAddon } from "./spawn-addon.js";

const state = createAgentState({});
state.envVars = { SANDBOX_WIDE: "yes", OVERRIDDEN: "sandbox" };
const service: ServiceDefinition = createProcessService({ state });

function context(options: { timeoutMs?: number; headers?: Record<string, string> } = {}): RpcContext & { abort: () => void } {
  const controller = new AbortController();
  return {
    user: lookupUser("root"),
    signal: controller.signal,
    headers: options.headers ?? {},
    timeoutMs: options.timeoutMs,
    abort: () => controller.abort(new CubicleError("canceled", "client left")),
  };
}

interface Events {
  messages: any[];
  /** Resolves when the stream handler returns. */
  done: Promise<void>;
}

function openStream(method: "Start" | "Connect", request: JsonObject, ctx = context()): Events {
  const messages: any[] = [];
  const done = service.streams[method]!(request, ctx, (m) => messages.push(m));
  return { messages, done };
}

function bash(script: string, extra: Record<string, unknown> = {}): JsonObject {
  return { process: { cmd: "/bin/bash", args: ["-c", script], ...extra }, stdin: false };
}

function output(messages: any[], kind: "stdout" | "stderr" | "pty"): string {
  return messages
    .filter((m) => m.event.data?.[kind] !== undefined)
    .map((m) => Buffer.from(m.event.data[kind], "base64").toString())
    .join("");
}

function endOf(messages: any[]): any {
  const ends = messages.filter((m) => m.event.end);
  assert.equal(ends.length, 1, "exactly one end event");
  assert.equal(messages.at(-1), ends[0], "end is the last event");
  return ends[0].event.end;
}

async function waitFor(predicate: () => boolean): Promise<void> {
  for (let i = 0; i < 200 && !predicate(); i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(predicate(), "condition not reached in time");
}

function pidOf(events: Events): number {
  return events.messages[0].event.start.pid;
}

// Every Start, List, Connect, signal and input test runs on both ways of starting a command.
const spawnAddonFile = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../../dist/agent/spawn.node");
for (const [way, addon] of [
  ["Node's spawn", null],
  ["the spawn addon", spawnAddonFile],
] as const) {
  describe(`commands started through ${way}`, () => {
    before(() => useSpawnAddon(addon));
    after(() => useSpawnAddon(undefined));

    it(`uses ${way}`, () => assert.equal(spawnAddonAvailable(), addon !== null, `${spawnAddonFile} is missing or unusable: run scripts/build.mjs with a C compiler installed`));

    describe("process.Process Start", () => {
      it("streams start first, stdout and stderr, then one end", async () => {
        const s = openStream("Start", bash("echo out; echo err >&2"));
        await s.done;
        assert.ok(s.messages[0].event.start.pid > 0);
        assert.equal(output(s.messages, "stdout"), "out\n");
        assert.equal(output(s.messages, "stderr"), "err\n");
        assert.deepEqual(endOf(s.messages), { exitCode: 0, exited: true, status: "exit status 0" });
      });

      it("reports a failing exit as upstream envd does", async () => {
        const s = openStream("Start", bash("exit 3"));
        await s.done;
        assert.deepEqual(endOf(s.messages), { exitCode: 3, exited: true, status: "exit status 3", error: "exit status 3" });
      });

      it("merges sandbox env vars under per-call envs, and runs in cwd", async () => {
        const s = openStream("Start", bash('echo "$SANDBOX_WIDE $OVERRIDDEN $HOME $E2B_SANDBOX"; pwd', { envs: { OVERRIDDEN: "call" }, cwd: "/tmp" }));
        await s.done;
        assert.equal(output(s.messages, "stdout"), "yes call /root true\n/tmp\n");
      });

      it("refuses a missing cwd with invalid_argument", async () => {
        await assert.rejects(openStream("Start", bash("pwd", { cwd: "/no/such/dir" })).done, (e: unknown) => {
          return e instanceof CubicleError && e.code === "invalid_argument" && e.message === "cwd '/no/such/dir' does not exist";
        });
      });

      it("refuses a NUL byte in the command or an argument with invalid_argument", async () => {
        for (const process of [{ cmd: "/bin/true", args: ["a\0b"] }, { cmd: "/bin/tr\0ue" }]) {
          const events = openStream("Start", { process: { ...process, cwd: "/tmp" }, stdin: false });
          await assert.rejects(events.done, (error: unknown) => error instanceof CubicleError && error.code === "invalid_argument");
        }
      });

      it("refuses a malformed request with invalid_argument", async () => {
        for (const request of [{}, { process: { cmd: 5 } }, { process: { cmd: "/bin/true", args: "x" } }]) {
          await assert.rejects(openStream("Start", request).done, (e: unknown) => e instanceof CubicleError && e.code === "invalid_argument");
        }
      });

      it("delivers output while the process runs, not at the end", async () => {
        const s = openStream("Start", bash("echo first; sleep 0.5; echo second"));
        await waitFor(() => output(s.messages, "stdout") === "first\n");
        assert.ok(!s.messages.some((m) => m.event.end));
        await s.done;
        assert.equal(output(s.messages, "stdout"), "first\nsecond\n");
      });

      it("kills the process when its Connect-Timeout-Ms lifetime passes", async () => {
        const started = Date.now();
        const s = openStream("Start", bash("sleep 20"), context({ timeoutMs: 300 }));
        await s.done;
        assert.ok(Date.now() - started < 3000);
        assert.deepEqual(endOf(s.messages), { exitCode: -1, exited: false, status: "signal: killed", error: "signal: killed" });
      });

      it("sends keepalives at Keepalive-Ping-Interval while idle", async () => {
        const s = openStream("Start", bash("sleep 2.2"), context({ headers: { "keepalive-ping-interval": "1" } }));
        await s.done;
        const keepalives = s.messages.filter((m) => m.event.keepalive);
        assert.equal(keepalives.length, 2);
      });
    });

    describe("process.Process List, Connect, SendSignal", () => {
      it("lists running processes with their config and tag, connects by tag and kills", async () => {
        const s = openStream("Start", { process: { cmd: "/bin/bash", args: ["-c", "sleep 30"], envs: { A: "b" } }, tag: "sleeper", stdin: false });
        await waitFor(() => s.messages.length > 0);
        const pid = pidOf(s);
        const { processes } = (await service.unary.List!({}, context())) as any;
        const info = processes.find((p: any) => p.pid === pid);
        assert.deepEqual(info, { config: { cmd: "/bin/bash", args: ["-c", "sleep 30"], envs: { A: "b" } }, pid, tag: "sleeper" });

        const c = openStream("Connect", { process: { tag: "sleeper" } });
        assert.deepEqual(c.messages[0], { event: { start: { pid } } });
        await service.unary.SendSignal!({ process: { pid }, signal: "SIGNAL_SIGKILL" }, context());
        await Promise.all([s.done, c.done]);
        assert.equal(endOf(s.messages).status, "signal: killed");
        assert.equal(endOf(c.messages).status, "signal: killed");
        const after = (await service.unary.List!({}, context())) as any;
        assert.ok(!after.processes.some((p: any) => p.pid === pid));
      });

      it("answers not_found for unknown pids and tags", async () => {
        for (const call of [
          () => service.unary.SendSignal!({ process: { pid: 999999 }, signal: "SIGNAL_SIGKILL" }, context()),
          () => service.unary.SendInput!({ process: { pid: 999999 }, input: { stdin: "eA==" } }, context()),
          () => openStream("Connect", { process: { tag: "nobody" } }).done,
        ]) {
          await assert.rejects(call(), (e: unknown) => e instanceof CubicleError && e.code === "not_found");
        }
      });

      it("gives a late Connect the start and the end of an exited process", async () => {
        const s = openStream("Start", bash("exit 7"));
        await s.done;
        const c = openStream("Connect", { process: { pid: pidOf(s) } });
        await c.done;
        assert.deepEqual(c.messages.map((m) => Object.keys(m.event)[0]), ["start", "end"]);
        assert.equal(endOf(c.messages).exitCode, 7);
        await assert.rejects(service.unary.SendSignal!({ process: { pid: pidOf(s) }, signal: 9 }, context()), (e: unknown) => (e as CubicleError).code === "not_found");
      });

      it("keeps the process running when the streaming client leaves", async () => {
        const ctx = context();
        const s = openStream("Start", bash("sleep 0.3; echo still-here"), ctx);
        await waitFor(() => s.messages.length > 0);
        ctx.abort();
        await assert.rejects(s.done, (e: unknown) => (e as CubicleError).code === "canceled");
        const c = openStream("Connect", { process: { pid: pidOf(s) } });
        await c.done;
        assert.equal(output(c.messages, "stdout"), "still-here\n");
      });
    });

    describe("process.Process input", () => {
      it("writes stdin and closes it", async () => {
        const s = openStream("Start", { process: { cmd: "/bin/cat" }, stdin: true });
        await waitFor(() => s.messages.length > 0);
        const pid = pidOf(s);
        await service.unary.SendInput!({ process: { pid }, input: { stdin: Buffer.from("hello\n").toString("base64") } }, context());
        await service.unary.CloseStdin!({ process: { pid } }, context());
        await s.done;
        assert.equal(output(s.messages, "stdout"), "hello\n");
        assert.equal(endOf(s.messages).exitCode, 0);
      });

      it("refuses stdin for a process started with stdin: false", async () => {
        const s = openStream("Start", bash("sleep 5"));
        await waitFor(() => s.messages.length > 0);
        await assert.rejects(service.unary.SendInput!({ process: { pid: pidOf(s) }, input: { stdin: "eA==" } }, context()), /stdin not enabled or closed/);
        await service.unary.SendSignal!({ process: { pid: pidOf(s) }, signal: "SIGNAL_SIGTERM" }, context());
        await s.done;
        assert.equal(endOf(s.messages).status, "signal: terminated");
      });

      it("runs a PTY: input, resize, output as pty data", async () => {
        const s = openStream("Start", { process: { cmd: "/bin/bash", args: ["--norc", "-i"], envs: { PS1: "$ " } }, pty: { size: { cols: 80, rows: 24 } } });
        await waitFor(() => s.messages.length > 0);
        const pid = pidOf(s);
        await service.unary.Update!({ process: { pid }, pty: { size: { cols: 101, rows: 33 } } }, context());
        await service.unary.SendInput!({ process: { pid }, input: { pty: Buffer.from("stty size; exit 5\n").toString("base64") } }, context());
        await s.done;
        assert.match(output(s.messages, "pty"), /33 101/);
        assert.equal(output(s.messages, "stdout"), "");
        assert.equal(endOf(s.messages).exitCode, 5);
        await assert.rejects(service.unary.CloseStdin!({ process: { pid: 1 } }, context()));
      });
    });
  });
}

describe("end events and environment", () => {
  it("maps exits and signals like Go's ProcessState", () => {
    assert.deepEqual(endEventFromExit(0, null), { exitCode: 0, exited: true, status: "exit status 0" });
    assert.deepEqual(endEventFromExit(1, null), { exitCode: 1, exited: true, status: "exit status 1", error: "exit status 1" });
    assert.deepEqual(endEventFromExit(null, "SIGKILL"), { exitCode: -1, exited: false, status: "signal: killed", error: "signal: killed" });
    assert.equal(endEventFromExit(null, "SIGSEGV").status, "signal: segmentation fault");
  });

  it("builds the environment with later sources winning", () => {
    const user = { name: "u", uid: 1, gid: 1, groups: [1], home: "/home/u", shell: "/bin/sh" };
    const env = processEnvironment(user, { A: "sandbox", HOME: "/elsewhere" }, { A: "call" });
    assert.equal(env.A, "call");
    assert.equal(env.HOME, "/elsewhere");
    assert.equal(env.USER, "u");
    assert.equal(env.SHELL, "/bin/sh");
    assert.throws(() => processEnvironment(user, {}, { "A=B": "x" }), (e: unknown) => (e as CubicleError).code === "invalid_argument");
  });
});

describe("OOM protection of the agent (OOM_NOTE)", () => {
  const runAs = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../../dist/agent/run-as");
  const isRoot = process.getuid?.() === 0;
  const nobody = { ...lookupUser("nobody") };

  async function scoreOf(request: JsonObject, user = lookupUser("root")): Promise<string> {
    const ctx = { ...context(), user };
    const events = openStream("Start", request, ctx);
    await events.done;
    assert.equal(endOf(events.messages).exitCode ?? 0, 0, output(events.messages, "stderr"));
    return (output(events.messages, "stdout") + output(events.messages, "pty")).trim();
  }

  it("starts every command, as root or as another user, with pipes or a PTY, marked as the OOM killer's first choice", { skip: !(isRoot && fs.existsSync(runAs)) && "needs root and dist/agent/run-as" }, async () => {
    useRunAsHelper(runAs);
    try {
      // A child of the command inherits the score too: nothing the command starts escapes it.
      const script = "cat /proc/self/oom_score_adj; (cat /proc/self/oom_score_adj)";
      assert.equal(await scoreOf(bash(script)), "1000\n1000");
      assert.equal(await scoreOf(bash(script, { cwd: "/tmp" }), nobody), "1000\n1000");
      assert.match(await scoreOf({ ...(bash(script) as object), pty: { size: { cols: 80, rows: 24 } } }), /^1000\r?\n1000$/);
      assert.equal(readFileSync("/proc/self/oom_score_adj", "utf8").trim(), "0", "the agent itself keeps its own score");
    } finally {
      useRunAsHelper(undefined);
    }
  });

  it("marks the process itself when there is no run-as helper", async () => {
    useRunAsHelper("/nonexistent/run-as-is-missing");
    try {
      // The helper is missing: the agent falls back to spawning directly and writes the score after the spawn.
      assert.equal(await scoreOf(bash("sleep 0.1; cat /proc/self/oom_score_adj")), "1000");
    } finally {
      useRunAsHelper(undefined);
    }
  });
});
