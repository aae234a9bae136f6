/**
 * Escape battery, agent part: attempts against the in-sandbox agent (envd on 49983, the code
 * interpreter on 49999) of a real server and real sandboxes, through the official SDKs and raw
 * HTTP via the server's router. Each attempt asserts the contained outcome and that the agent
 * still answers afterwards.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { Sandbox as CodeSandbox } from "@e2b/code-interpreter";
import { FileNotFoundError, InvalidArgumentError, NotEnoughSpaceError, Sandbox, type WatchHandle } from "e2b";
import { startTestServer, useServerForSdk, type TestServer } from "../e2e/harness.js";

let server: TestServer;
let sandbox: CodeSandbox;
let token: string;

before(async () => {
  server = await startTestServer({ defaultTemplates: ["base", "code-interpreter-v1"] });
  useServerForSdk(server);
  sandbox = await CodeSandbox.create({ timeoutMs: 600_000 });
  token = (await server.api("GET", `/sandboxes/${sandbox.sandboxId}`)).json.envdAccessToken as string;
  assert.ok(token, "a v2 create is secure and has an access token");
});

after(async () => {
  await sandbox?.kill().catch(() => undefined);
  await server?.stop();
});

/** The contained outcome is worth nothing if the agent died on the way: it must still answer. */
async function assertAgentAnswers(target: Sandbox = sandbox): Promise<void> {
  const started = Date.now();
  const result = await target.commands.run("echo ok", { timeoutMs: 20_000 });
  assert.equal(result.stdout, "ok\n");
  assert.ok(Date.now() - started < 10_000, `the agent took ${Date.now() - started} ms to answer`);
}

/** A request to a port of the sandbox through the server's router, as anyone who knows its id could send it. */
function routed(port: number, urlPath: string, init: { method?: string; headers?: Record<string, string>; body?: string } = {}, sandboxId = sandbox.sandboxId): Promise<Response> {
  return fetch(server.url + urlPath, {
    method: init.method ?? "GET",
    headers: { "e2b-sandbox-id": sandboxId, "e2b-sandbox-port": String(port), ...init.headers },
    body: init.body,
  });
}

/**
 * A request through the router on a connection of its own, closed once the answer is in: for
 * bodies the agent refuses before reading them whole (see the report on the router's handling
 * of early answers), so that no connection of the SDK's pool is left with unsent body bytes.
 */
function routedOnOwnConnection(port: number, urlPath: string, headers: Record<string, string>, body: Buffer): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const url = new URL(server.url);
    let answered = false;
    const req = http.request(
      { host: url.hostname, port: url.port, path: urlPath, method: "POST", agent: false, headers: { "e2b-sandbox-id": sandbox.sandboxId, "e2b-sandbox-port": String(port), "content-length": body.length, ...headers } },
      (res) => {
        answered = true;
        let text = "";
        res.on("data", (chunk: Buffer) => (text += chunk.toString()));
        res.on("end", () => {
          resolve({ status: res.statusCode ?? 0, text });
          req.destroy();
        });
      },
    );
    req.on("error", (error) => reject(error));
    // The body goes in chunks, each after the last drained, and stops once the answer is in: a
    // server that answers early and closes would otherwise meet our writes (EPIPE) before our
    // side has read its answer.
    let offset = 0;
    const pump = () => {
      while (!answered && offset < body.length) {
        const chunk = body.subarray(offset, offset + 256 * 1024);
        offset += chunk.length;
        if (!req.write(chunk)) return void req.once("drain", pump);
      }
      if (!answered) req.end();
    };
    pump();
  });
}

/** Shell that prints the agent's pid: the process the kit's loader runs agent.js in (tini, pid 1, starts it). */
const agentPid = `for p in /proc/[0-9]*; do case "$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)" in /.cubicle/lib/ld-linux*/.cubicle/agent.js*) echo \${p#/proc/};; esac; done`;

/** How long `commands.run("echo ok")` takes while `busy` runs: the agent's event loop must stay free. */
async function commandLatencyDuring(busy: Promise<unknown>): Promise<number> {
  await new Promise((resolve) => setTimeout(resolve, 100));
  const started = Date.now();
  await assertAgentAnswers();
  const latency = Date.now() - started;
  await busy.catch(() => undefined);
  return latency;
}

describe("code interpreter (49999) doors", () => {
  test("an /execute without the access token is refused with 401 on a secure sandbox, runs nothing, and runCode still works", async () => {
    const code = JSON.stringify({ code: "open('/tmp/executed-without-token', 'w').write('pwned')" });
    const without = await routed(49999, "/execute", { method: "POST", headers: { "content-type": "application/json" }, body: code });
    assert.equal(without.status, 401);
    const body = (await without.json()) as { code: number; message: string };
    assert.equal(body.code, 401);
    assert.match(body.message, /access token/);
    const wrong = await routed(49999, "/execute", { method: "POST", headers: { "content-type": "application/json", "x-access-token": "not-the-token" }, body: code });
    assert.equal(wrong.status, 401);
    assert.equal(await sandbox.files.exists("/tmp/executed-without-token"), false, "code ran without the token");

    const execution = await sandbox.runCode("1 + 1");
    assert.equal(execution.text, "2");
    await assertAgentAnswers();
  });

  test("code contexts work through the SDK without a token, but an unauthenticated caller cannot flood them or run code in them", async () => {
    const context = await sandbox.createCodeContext({ language: "python", cwd: "/tmp" });
    assert.equal((await sandbox.runCode("import os; os.getcwd()", { context })).text, "/tmp");
    assert.ok((await sandbox.listCodeContexts()).some((listed) => listed.id === context.id));

    const intoContext = await routed(49999, "/execute", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ code: "1", context_id: context.id }) });
    assert.equal(intoContext.status, 401);
    const badLanguage = await routed(49999, "/contexts", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ language: "x".repeat(5000) }) });
    assert.equal(badLanguage.status, 400);
    const wrongToken = await routed(49999, "/contexts", { headers: { "x-access-token": "not-the-token" } });
    assert.equal(wrongToken.status, 401);

    let refused: Response | undefined;
    for (let index = 0; index < 100 && !refused; index++) {
      const res = await routed(49999, "/contexts", { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
      if (res.status !== 200) refused = res;
      else await res.arrayBuffer();
    }
    assert.equal(refused?.status, 429, "an unauthenticated caller created contexts without bound");
    assert.match(await refused!.text(), /at most \d+ code contexts/);

    for (const listed of await sandbox.listCodeContexts()) if (listed.id !== context.id) await sandbox.removeCodeContext(listed.id);
    assert.equal((await sandbox.runCode("40 + 2", { context })).text, "42");
    await sandbox.removeCodeContext(context);
    await assertAgentAnswers();
  });

  test("a pathological TypeScript cell does not stall the agent", async () => {
    const cell = sandbox.runCode("const x: number = 1;\n" + "(".repeat(40_000), { language: "ts", timeoutMs: 60_000 });
    const latency = await commandLatencyDuring(cell);
    assert.ok(latency < 2000, `a command took ${latency} ms while the cell was prepared`);
    const execution = await cell;
    assert.ok(execution.error, "the cell is not valid code");
    assert.equal((await sandbox.runCode("const y: number = 41; y + 1", { language: "ts" })).text, "42");
  });
});

describe("file API against special files and bad paths", () => {
  test("reading or writing a FIFO answers 400 at once, and a command run at the same time still answers", async () => {
    await sandbox.commands.run("rm -f /tmp/battery-fifo && mkfifo -m 666 /tmp/battery-fifo");
    const started = Date.now();
    const [read, write, command] = await Promise.allSettled([
      sandbox.files.read("/tmp/battery-fifo"),
      sandbox.files.write("/tmp/battery-fifo", "x"),
      sandbox.commands.run("echo ok"),
    ]);
    assert.ok(read.status === "rejected" && read.reason instanceof InvalidArgumentError, `read: ${String((read as PromiseRejectedResult).reason ?? "fulfilled")}`);
    assert.match(String(read.reason), /named pipe/);
    assert.ok(write.status === "rejected" && write.reason instanceof InvalidArgumentError, `write: ${String((write as PromiseRejectedResult).reason ?? "fulfilled")}`);
    assert.ok(command.status === "fulfilled" && command.value.stdout === "ok\n");
    assert.ok(Date.now() - started < 5000, `took ${Date.now() - started} ms`);
    await assertAgentAnswers();
  });

  test("sockets and devices are refused by the file API for reads and writes", async () => {
    await sandbox.commands.run("rm -f /tmp/battery-sock && python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); s.bind('/tmp/battery-sock')\"");
    for (const target of ["/tmp/battery-sock", "/dev/zero", "/dev/urandom", "/dev/null", "/dev/full", "/dev/tty"]) {
      await assert.rejects(sandbox.files.read(target, { user: "root" }), (error: unknown) => error instanceof InvalidArgumentError, `read ${target}`);
      await assert.rejects(sandbox.files.write(target, "x".repeat(1000), { user: "root" }), (error: unknown) => error instanceof InvalidArgumentError, `write ${target}`);
    }
    assert.equal((await sandbox.commands.run("head -c 4 /dev/zero | wc -c")).stdout.trim(), "4", "the devices still work for processes");
    await assertAgentAnswers();
  });

  test("a NUL byte in a path is a 400 for reads, writes and filesystem RPCs", async () => {
    const bad = "/tmp/a\u0000b";
    await assert.rejects(sandbox.files.read(bad), InvalidArgumentError);
    await assert.rejects(sandbox.files.write(bad, "x"), InvalidArgumentError);
    await assert.rejects(sandbox.files.exists(bad), InvalidArgumentError);
    await assert.rejects(sandbox.files.makeDir(bad), InvalidArgumentError);
    await assert.rejects(sandbox.files.list(bad), InvalidArgumentError);
    await assert.rejects(sandbox.commands.run("true", { cwd: bad }), InvalidArgumentError);
    await assertAgentAnswers();
  });

  test("writes to read-only places (the agent's kit, /proc, /sys) are refused with a 4xx, never a 500, and the kit is unchanged", async () => {
    const before = (await sandbox.commands.run("sha256sum /.cubicle/agent.js", { user: "root" })).stdout;
    for (const target of ["/.cubicle/agent.js", "/.cubicle/new-file", "/proc/version", "/proc/sys/kernel/hostname", "/sys/kernel/notes", "/sys/cubicle-test"]) {
      const params = new URLSearchParams({ path: target, username: "root" });
      const res = await routed(49983, `/files?${params}`, { method: "POST", headers: { "content-type": "application/octet-stream", "x-access-token": token }, body: "x" });
      const text = await res.text();
      assert.ok(res.status >= 400 && res.status < 500, `write ${target}: ${res.status} ${text}`);
      const body = JSON.parse(text) as { code: number; message: string };
      assert.equal(body.code, res.status);
      assert.doesNotMatch(body.message, /\n\s+at /);
    }
    await assert.rejects(sandbox.files.makeDir("/sys/cubicle-test", { user: "root" }), (error: unknown) => !(error instanceof NotEnoughSpaceError));
    await assert.rejects(sandbox.files.remove("/.cubicle/agent.js", { user: "root" }));
    assert.equal((await sandbox.commands.run("sha256sum /.cubicle/agent.js", { user: "root" })).stdout, before);
    await assertAgentAnswers();
  });
});

describe("agent identity and containment", () => {
  test("a re-init of a secure agent without its token is refused and changes nothing", async () => {
    const takeover = JSON.stringify({ envVars: { PWNED: "yes" }, accessToken: "attacker-token", defaultUser: "root" });
    const without = await routed(49983, "/init", { method: "POST", headers: { "content-type": "application/json" }, body: takeover });
    assert.equal(without.status, 401);
    const wrong = await routed(49983, "/init", { method: "POST", headers: { "content-type": "application/json", "x-access-token": "attacker-token" }, body: takeover });
    assert.equal(wrong.status, 401);
    const result = await sandbox.commands.run('echo "${PWNED:-none} $(whoami)"');
    assert.equal(result.stdout, "none user\n");
    const withAttackerToken = await routed(49983, "/envs", { headers: { "x-access-token": "attacker-token" } });
    assert.equal(withAttackerToken.status, 401);
    await assertAgentAnswers();
  });

  test("path traversal and symlinks in the file API stay inside the sandbox", async () => {
    const hostDir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-battery-host-"));
    const hostSecret = path.join(hostDir, "secret");
    fs.writeFileSync(hostSecret, "host-secret");
    try {
      for (const attempt of [hostSecret, `/home/user/../../..${hostSecret}`, `../../../../..${hostSecret}`, `/proc/1/root${hostSecret}`, `/proc/self/root${hostSecret}`]) {
        await assert.rejects(sandbox.files.read(attempt, { user: "root" }), FileNotFoundError, `read ${attempt}`);
      }
      await sandbox.commands.run(`ln -sfn ${hostSecret} /tmp/battery-link && ln -sfn ${hostDir} /tmp/battery-dir-link`);
      await assert.rejects(sandbox.files.read("/tmp/battery-link"), FileNotFoundError);
      await assert.rejects(sandbox.files.list("/tmp/battery-dir-link"), (error: unknown) => error instanceof FileNotFoundError || error instanceof Error);
      // A write through the same paths lands in the sandbox (it is root there), never on the host.
      await sandbox.files.write(`/home/user/../../..${hostSecret}`, "sandbox-side", { user: "root" });
      assert.equal(fs.readFileSync(hostSecret, "utf8"), "host-secret");
      assert.equal(await sandbox.files.read(hostSecret, { user: "root" }), "sandbox-side");
      // What the file API reads as /etc/passwd is the sandbox's, as its processes see it.
      assert.equal(await sandbox.files.read("/home/user/../../etc/passwd"), (await sandbox.commands.run("cat /etc/passwd")).stdout);
    } finally {
      fs.rmSync(hostDir, { recursive: true, force: true });
    }
    await assertAgentAnswers();
  });

  test("a huge upload streams to disk without growing the agent's memory, and an oversized RPC message is answered, not cut", async () => {
    const agentRss = async () => Number((await sandbox.commands.run(`awk '/VmRSS/ {print $2}' /proc/$(${agentPid})/status`, { user: "root" })).stdout.trim());
    const before = await agentRss();
    assert.ok(before > 0, "found the agent's memory");
    const size = 96 * 1024 * 1024;
    try {
      const info = await sandbox.files.write("/tmp/battery-huge", new Blob([Buffer.alloc(size, 7)]));
      assert.equal(info.path, "/tmp/battery-huge");
      assert.equal((await sandbox.commands.run("stat -c %s /tmp/battery-huge")).stdout.trim(), String(size));
    } catch (error) {
      assert.ok(error instanceof NotEnoughSpaceError, `the upload failed with ${String(error)}`);
    }
    const afterUpload = await agentRss();
    assert.ok(afterUpload - before < 48 * 1024, `the agent grew from ${before} to ${afterUpload} kB`);
    await sandbox.commands.run("rm -f /tmp/battery-huge");

    const oversized = await routedOnOwnConnection(
      49983,
      "/filesystem.Filesystem/Stat",
      { "content-type": "application/json", "connect-protocol-version": "1", "x-access-token": token },
      Buffer.from(JSON.stringify({ path: "/tmp", pad: "x".repeat(40 * 1024 * 1024) })),
    );
    assert.equal(oversized.status, 429, oversized.text);
    assert.equal((JSON.parse(oversized.text) as { code: string }).code, "resource_exhausted");
    await assertAgentAnswers();
  });

  test("many watchers at once are served and bounded, and a recursive watch of / does not stall other requests", async () => {
    await sandbox.commands.run("mkdir -p /tmp/battery-watch");
    const seen = new Set<number>();
    const handles: WatchHandle[] = [];
    try {
      for (let index = 0; index < 60; index++) {
        handles.push(await sandbox.files.watchDir("/tmp/battery-watch", (event) => void (event.name === "poke" && seen.add(index))));
      }
      await sandbox.files.write("/tmp/battery-watch/poke", "x");
      for (let i = 0; i < 50 && seen.size < handles.length; i++) await new Promise((resolve) => setTimeout(resolve, 100));
      assert.equal(seen.size, handles.length, "every watcher saw the event");
    } finally {
      for (const handle of handles) await handle.stop();
    }
    const whole = sandbox.files.watchDir("/", () => {}, { recursive: true, user: "root", timeoutMs: 60_000 });
    const latency = await commandLatencyDuring(whole);
    assert.ok(latency < 2000, `a command took ${latency} ms while / was being watched`);
    await (await whole.catch(() => undefined))?.stop();

    const listing = sandbox.files.list("/", { depth: 30, user: "root" });
    const listLatency = await commandLatencyDuring(listing);
    assert.ok(listLatency < 2000, `a command took ${listLatency} ms during a deep listing of /`);
    await assertAgentAnswers();
  });

  test("every process the agent starts is marked for the OOM killer; the agent and tini are not", async () => {
    assert.equal((await sandbox.commands.run("cat /proc/self/oom_score_adj")).stdout, "1000\n");
    assert.equal((await sandbox.commands.run("cat /proc/self/oom_score_adj", { user: "root" })).stdout, "1000\n");
    assert.equal((await sandbox.runCode("open('/proc/self/oom_score_adj').read().strip()")).text, "1000");
    const scores = await sandbox.commands.run(`cat /proc/$(${agentPid})/oom_score_adj /proc/1/oom_score_adj`, { user: "root" });
    const [agent, tini] = scores.stdout.trim().split("\n").map(Number);
    assert.ok(agent !== undefined && agent < 1000, `the agent has oom_score_adj ${agent}`);
    assert.ok(tini !== undefined && tini < 1000, `tini has oom_score_adj ${tini}`);
  });
});

/**
 * OOM kills in a sandbox's memory cgroup, read on the host (the sandbox has no /sys/fs/cgroup).
 * The test server runs without a warm pool, so the runtime id is the sandbox id.
 */
function oomKills(sandboxId: string): number {
  for (const [file, pattern] of [
    [`/sys/fs/cgroup/memory/cubicle/${sandboxId}/memory.oom_control`, /^oom_kill (\d+)$/m],
    [`/sys/fs/cgroup/cubicle/${sandboxId}/memory.events`, /^oom_kill (\d+)$/m],
  ] as const) {
    try {
      return Number(pattern.exec(fs.readFileSync(file, "utf8"))?.[1] ?? 0);
    } catch {
      // not this cgroup layout
    }
  }
  throw new Error(`no memory cgroup found for ${sandboxId}`);
}

describe("memory pressure", () => {
  test("in a 128 MB sandbox, hundreds of small memory hogs are killed by the OOM killer, the agent survives and answers", async () => {
    const created = await server.api("POST", "/v2/sandboxes", { templateID: "base", timeout: 300, memoryMB: 128 });
    assert.equal(created.status, 201, JSON.stringify(created.json));
    const small = await Sandbox.connect(created.json.sandboxID as string);
    try {
      await assertAgentAnswers(small);
      // Each hog is a bash holding ~4 MB, far smaller than the agent: without the OOM scores the
      // kernel picks the biggest process, the agent, and the whole sandbox dies.
      const hog = "for i in $(seq 1 300); do bash -c 'x=$(head -c 4000000 /dev/zero | tr \"\\0\" a); sleep 30' & done; wait";
      const hogs = await small.commands.run(hog, { background: true, timeoutMs: 0 });
      const deadline = Date.now() + 60_000;
      let killed = 0;
      while (Date.now() < deadline && killed < 5) {
        await new Promise((resolve) => setTimeout(resolve, 1000));
        killed = oomKills(small.sandboxId);
      }
      assert.ok(killed > 0, "the hogs never made the OOM killer act: the test did not test anything");
      // The agent is the biggest process in the sandbox; it survived only if the kernel chose by OOM score.
      await hogs.kill(); // the whole process group: the loop and every hog left
      await assertAgentAnswers(small);
      assert.equal((await server.api("GET", `/sandboxes/${small.sandboxId}`)).json.state, "running");
    } finally {
      await small.kill().catch(() => undefined);
    }
  });
});
