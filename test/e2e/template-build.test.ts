/**
 * E2B's template builder through the official `e2b` SDK (`Template().…`, `Template.build`,
 * `Template.exists`, tags) against a real server: a template with every step type and a start
 * command whose process runs in a new sandbox; a rebuild that hits the layer cache; a change
 * to the last step that rebuilds only it; a failing RUN that names its step; delete while a
 * sandbox uses the template; bad requests answered with clear 4xx and nothing registered.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { BuildError, Sandbox, Template, waitForURL, type LogEntry } from "e2b";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;
let context: string;

before(async () => {
  server = await startTestServer();
  useServerForSdk(server);
  context = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-template-ctx-"));
  fs.mkdirSync(path.join(context, "app", "sub"), { recursive: true });
  fs.writeFileSync(path.join(context, "app", "main.py"), "print('from the template')\n");
  fs.writeFileSync(path.join(context, "app", "sub", "data.txt"), "nested\n");
  fs.writeFileSync(path.join(context, "app", ".hidden"), "dotfile\n");
  fs.writeFileSync(path.join(context, "notes.txt"), "secret notes\n");
  fs.symlinkSync("notes.txt", path.join(context, "notes-link"));
});

after(async () => {
  await server?.stop();
  if (context) fs.rmSync(context, { recursive: true, force: true });
});

/** The template with every step type; `last` is its last RUN (changed by the cache test). */
function everyStep(last = "echo last > /tmp/last") {
  return Template({ fileContextPath: context })
    .fromTemplate("base")
    .setEnvs({ GREETING: "hello from ENV" })
    .runCmd("echo \"$GREETING\" > /tmp/greeting && whoami > /tmp/whoami")
    .runCmd("mkdir -p /opt/tool && echo made-by-root > /opt/tool/marker", { user: "root" })
    .copy("app", "/home/user/app")
    .copy("notes.txt", "/opt/notes.txt", { user: "root", mode: 0o600 })
    .copy("notes-link", "/home/user/")
    .setWorkdir("/home/user/work")
    .setUser("user")
    .runCmd(last)
    .setStartCmd("python3 -m http.server 8080 --directory /home/user/app", waitForURL("http://127.0.0.1:8080/main.py"));
}

async function build(template: Parameters<typeof Template.build>[0], name: string): Promise<{ logs: string[]; ms: number }> {
  const logs: string[] = [];
  const started = performance.now();
  await Template.build(template, name, { onBuildLogs: (entry: LogEntry) => logs.push(entry.message) });
  return { logs, ms: performance.now() - started };
}

test("Template.build with every step type; a sandbox of it has the files, env, user, workdir and the start command running", async () => {
  const { logs } = await build(everyStep(), "e2e-every-step");
  assert.ok(logs.some((line) => line.includes("RUN echo")), `the log shows the steps: ${logs.join("\n")}`);
  assert.ok(await Template.exists("e2e-every-step"));

  const sandbox = await Sandbox.create("e2e-every-step");
  try {
    const run = async (cmd: string, user?: "root" | "user") => (await sandbox.commands.run(cmd, user ? { user } : {})).stdout.trim();
    assert.equal(await run("cat /tmp/greeting"), "hello from ENV");
    assert.equal(await run("cat /tmp/whoami"), "user", "RUN runs as the template's user by default");
    assert.equal(await run("cat /opt/tool/marker"), "made-by-root");
    assert.equal(await run("stat -c %U /opt/tool"), "root");
    assert.equal(await run("cat /home/user/app/main.py"), "print('from the template')");
    assert.equal(await run("cat /home/user/app/sub/data.txt"), "nested");
    assert.equal(await run("cat /home/user/app/.hidden"), "dotfile");
    assert.equal(await run("stat -c %U:%G /home/user/app/main.py /home/user/app/sub"), "user:user\nuser:user");
    assert.equal(await run("stat -c %U:%a /opt/notes.txt", "root"), "root:600");
    assert.equal(await run("readlink /home/user/notes-link"), "notes.txt", "a symlink is copied as a symlink");
    assert.equal(await run("cat /tmp/last"), "last");
    assert.equal(await run("echo $GREETING"), "hello from ENV", "ENV is the template's environment");
    assert.equal(await run("pwd"), "/home/user/work", "WORKDIR is the default workdir");
    assert.equal(await run("whoami"), "user");
    // The start command runs already: the sandbox came from the warm snapshot taken when it was ready.
    const served = await sandbox.commands.run("curl -s http://127.0.0.1:8080/main.py");
    assert.equal(served.stdout.trim(), "print('from the template')");
    const processes = await sandbox.commands.list();
    assert.ok(processes.some((p) => p.tag === "start-cmd"), `the start command is listed: ${JSON.stringify(processes)}`);
    // Files written in one sandbox stay in it.
    await sandbox.files.write("/home/user/app/main.py", "changed");
  } finally {
    await sandbox.kill();
  }
  const fresh = await Sandbox.create("e2e-every-step");
  try {
    assert.equal((await fresh.files.read("/home/user/app/main.py")).trim(), "print('from the template')", "each sandbox gets its own copy of the template's files");
  } finally {
    await fresh.kill();
  }
});

test("an unchanged rebuild is served by the layer cache; a change to the last step rebuilds only it", async () => {
  const cached = await build(everyStep(), "e2e-every-step");
  const cachedSteps = cached.logs.filter((line) => line.startsWith("CACHED"));
  assert.equal(cachedSteps.length, 7, `every RUN, COPY and WORKDIR step cached:\n${cached.logs.join("\n")}`);

  const changed = await build(everyStep("echo changed > /tmp/last"), "e2e-every-step");
  const changedCached = changed.logs.filter((line) => line.startsWith("CACHED"));
  assert.equal(changedCached.length, 6, `all but the last step cached:\n${changed.logs.join("\n")}`);
  assert.ok(changed.logs.some((line) => /^\[\d+\/\d+\] RUN echo changed/.test(line)), "the changed step ran");

  const forced: string[] = [];
  await Template.build(everyStep("echo changed > /tmp/last"), "e2e-every-step", { skipCache: true, onBuildLogs: (entry: LogEntry) => forced.push(entry.message) });
  assert.equal(forced.filter((line) => line.startsWith("CACHED")).length, 0, `skipCache runs every step:\n${forced.join("\n")}`);

  const sandbox = await Sandbox.create("e2e-every-step");
  try {
    assert.equal((await sandbox.commands.run("cat /tmp/last /tmp/greeting")).stdout, "changed\nhello from ENV\n");
  } finally {
    await sandbox.kill();
  }
});

test("a failing RUN fails the build with its step and log; a template that never built is not registered", async () => {
  const template = Template().fromTemplate("base").runCmd("echo before").runCmd("echo to-stderr >&2; exit 3");
  await assert.rejects(build(template, "e2e-failing"), (err: Error) => {
    assert.ok(err instanceof BuildError, String(err));
    assert.match(err.message, /step 2 .*exit code 3/);
    return true;
  });
  assert.equal(await Template.exists("e2e-failing"), false);
  await assert.rejects(Sandbox.create("e2e-failing"), /not found/);
});

test("tags: a build's tags, assignTags and removeTags; names resolve through aliases", async () => {
  const template = Template().fromTemplate("base").runCmd("echo tagged > /tmp/tagged");
  await Template.build(template, "e2e-tags:v1", {});
  const tags = await Template.getTags("e2e-tags");
  assert.deepEqual(tags.map((t) => t.tag).sort(), ["v1"]);
  const assigned = await Template.assignTags("e2e-tags:v1", ["prod", "stable"]);
  assert.deepEqual(assigned.tags.sort(), ["prod", "stable"]);
  assert.equal(assigned.buildId, tags[0]!.buildId);
  await Template.removeTags("e2e-tags", "stable");
  assert.deepEqual((await Template.getTags("e2e-tags")).map((t) => t.tag).sort(), ["prod", "v1"]);
  const alias = await server.api("GET", "/templates/aliases/e2e-tags");
  assert.equal(alias.status, 200);
  assert.equal(typeof alias.json.templateID, "string");
});

test("delete while a sandbox uses the template is refused; after its kill the template goes", async () => {
  await Template.build(Template().fromTemplate("base").runCmd("echo x > /tmp/x"), "e2e-delete");
  const sandbox = await Sandbox.create("e2e-delete");
  const refused = await server.api("DELETE", "/templates/e2e-delete");
  assert.equal(refused.status, 409, JSON.stringify(refused.json));
  assert.match(refused.json.message, /used by a sandbox/);
  assert.equal((await sandbox.commands.run("cat /tmp/x")).stdout, "x\n", "the sandbox is unharmed");
  await sandbox.kill();
  const layersDir = path.join(server.runDir, "pool", "images", "layers");
  const layers = () => fs.readdirSync(layersDir).filter((name) => !name.includes(".removed-")).length;
  const layersBefore = layers();
  assert.equal((await server.api("DELETE", "/templates/e2e-delete")).status, 204);
  assert.equal(layers(), layersBefore - 1, "its layer image goes with it");
  assert.equal(await Template.exists("e2e-delete"), false);
  assert.equal((await server.api("DELETE", "/templates/base")).status, 403, "built-in templates are not deleted");
});

test("bad build requests: clear 4xx, nothing started", async () => {
  const badName = await server.api("POST", "/v3/templates", { name: "Bad Name!" });
  assert.equal(badName.status, 400);
  assert.equal(typeof badName.json.message, "string");
  assert.equal((await server.api("POST", "/v3/templates", { name: "base" })).status, 409, "a built-in template's name is taken");
  const requested = await server.api("POST", "/v3/templates", { name: "e2e-bad-input" });
  assert.equal(requested.status, 202);
  const { templateID, buildID } = requested.json;
  const start = (body: unknown) => server.api("POST", `/v2/templates/${templateID}/builds/${buildID}`, body);
  assert.equal((await start({ fromTemplate: "base", fromImage: "x" })).status, 400, "both bases");
  assert.equal((await start({ fromTemplate: "base", steps: [{ type: "EXPLODE", args: [] }] })).status, 400);
  assert.equal((await start({ fromTemplate: "base", steps: [{ type: "RUN", args: [] }] })).status, 400);
  assert.equal((await start({ fromTemplate: "base", steps: "nope" })).status, 400);
  const missingFiles = await start({ fromTemplate: "base", steps: [{ type: "COPY", args: ["a", "/a"], filesHash: "ab".repeat(32) }] });
  assert.equal(missingFiles.status, 400);
  assert.match(missingFiles.json.message, /not uploaded/);
  const escape = await start({ fromTemplate: "base", steps: [{ type: "COPY", args: ["../etc", "/a"], filesHash: "ab".repeat(32) }] });
  assert.equal(escape.status, 400);
  // An upload link's token is checked; no API key opens it.
  const link = await server.api("GET", `/templates/${templateID}/files/${"cd".repeat(32)}`);
  assert.equal(link.status, 201);
  assert.equal(link.json.present, false);
  const forged = await fetch(link.json.url.replace(/token=[0-9a-f]+/, "token=" + "0".repeat(64)), { method: "PUT", body: "x" });
  assert.equal(forged.status, 403);
  const otherHash = await fetch(link.json.url.replace("cd".repeat(32), "ef".repeat(32)), { method: "PUT", body: "x" });
  assert.equal(otherHash.status, 403, "a link opens only its own hash");
  assert.equal((await server.api("GET", `/templates/${templateID}/builds/not-a-build/status`)).status, 404);
  // A base that does not exist is a build error, reported through the status.
  assert.equal((await start({ fromTemplate: "no-such-template" })).status, 202);
  let status: any;
  for (let i = 0; i < 100; i++) {
    status = (await server.api("GET", `/templates/${templateID}/builds/${buildID}/status`)).json;
    if (status.status !== "building") break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.equal(status.status, "error");
  assert.match(status.reason.message, /no-such-template/);
  assert.equal(status.reason.step, "base");
  assert.equal((await start({ fromTemplate: "base" })).status, 409, "a build starts once");
  assert.equal(await Template.exists("e2e-bad-input"), false);
});

async function waitForStatus(templateId: string, buildId: string, done: (status: any) => boolean, timeoutMs = 60_000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = (await server.api("GET", `/templates/${templateId}/builds/${buildId}/status`)).json;
    if (done(status)) return status;
    if (Date.now() > deadline) throw new Error(`status never matched: ${JSON.stringify(status)}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

test("a build can be cancelled; one cut off by a server crash is failed after the restart, never left building", async () => {
  const slow = () => Template().fromTemplate("base").runCmd("echo started; sleep 60");
  const cancelled = await Template.buildInBackground(slow(), "e2e-cancelled");
  await waitForStatus(cancelled.templateId, cancelled.buildId, (s) => s.logEntries.some((e: any) => e.message === "started"));
  assert.equal((await server.api("DELETE", `/templates/${cancelled.templateId}/builds/${cancelled.buildId}`)).status, 204);
  const afterCancel = await waitForStatus(cancelled.templateId, cancelled.buildId, (s) => s.status !== "building", 10_000);
  assert.equal(afterCancel.status, "error");
  assert.match(afterCancel.reason.message, /cancelled/);

  const cut = await Template.buildInBackground(slow(), "e2e-crashed");
  await waitForStatus(cut.templateId, cut.buildId, (s) => s.logEntries.some((e: any) => e.message === "started"));
  await server.crashAndRestart();
  const afterCrash = await waitForStatus(cut.templateId, cut.buildId, () => true);
  assert.equal(afterCrash.status, "error");
  assert.match(afterCrash.reason.message, /restarted/);
  assert.equal(await Template.exists("e2e-crashed"), false);
  // The build sandbox the crash left behind is gone too (recovered as an unclaimed sandbox).
  const pools = await server.api("GET", "/v2/sandboxes");
  assert.deepEqual(pools.json, []);
});

test("templates are records in the store: built-ins have a build history, built ones survive a restart, earlier versions' files are moved in", async () => {
  const builtIn = await server.api("GET", "/templates/base/builds");
  assert.equal(builtIn.status, 200, JSON.stringify(builtIn.json));
  assert.equal(builtIn.json[0].status, "ready", "the default template's tree was built or taken from the cache by a recorded build");

  await Template.build(Template().fromTemplate("base").runCmd("echo kept > /tmp/kept"), "e2e-stored");
  // What an earlier version left: a built template's record as a file in the state directory.
  const legacyId = "e2elegacy0000000000";
  const legacyDir = path.join(server.stateDir, "built-templates", legacyId);
  await server.crashAndRestart(() => {
    fs.mkdirSync(legacyDir, { recursive: true });
    fs.writeFileSync(
      path.join(legacyDir, "template.json"),
      JSON.stringify({
        templateId: legacyId,
        aliases: ["e2e-legacy"],
        defaultUser: "user",
        defaultWorkdir: "/home/user",
        env: { LEGACY: "yes" },
        cpuCount: 1,
        memoryMB: 512,
        diskSizeMB: 4096,
        runtime: "container",
        recipeHash: "legacy",
        builtAt: new Date(0).toISOString(),
        sizeBytes: 0,
        source: "build",
        baseRootfsDir: path.join(server.env.CUBICLE_TEMPLATE_DIR!, "base", "rootfs"),
        tags: {},
      }),
    );
  });
  assert.equal(await Template.exists("e2e-stored"), true);
  const stored = await Sandbox.create("e2e-stored");
  try {
    assert.equal((await stored.commands.run("cat /tmp/kept")).stdout, "kept\n");
  } finally {
    await stored.kill();
  }
  assert.equal(fs.existsSync(legacyDir), false, "the legacy file is gone once its record is in the store");
  const legacy = await Sandbox.create("e2e-legacy");
  try {
    assert.equal((await legacy.commands.run("echo $LEGACY")).stdout, "yes\n");
  } finally {
    await legacy.kill();
  }
  // The store is the list: the server's database holds every template, and no record file is left.
  const { default: Database } = await import("better-sqlite3");
  const db = new Database(path.join(server.stateDir, "cubicle.db"), { readonly: true, fileMustExist: true });
  try {
    const rows = db.prepare("SELECT template_id AS id, source FROM templates").all() as { id: string; source: string }[];
    const ids = rows.map((row) => row.id);
    assert.ok(ids.includes("base") && ids.includes(legacyId), JSON.stringify(rows));
    assert.equal(rows.find((row) => row.id === "base")?.source, "recipe");
  } finally {
    db.close();
  }
  assert.equal(fs.existsSync(path.join(server.stateDir, "built-templates")), false, "no directory of record files is left");
  assert.equal((await server.api("DELETE", "/templates/e2e-legacy")).status, 204);
  assert.equal(await Template.exists("e2e-legacy"), false);
});

test("./cubicle template build -f Dockerfile, ls, logs and rm against the running server", async () => {
  const { execFile } = await import("node:child_process");
  const repoRoot = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..", "..");
  const cli = (args: string[]) =>
    new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
      execFile(process.execPath, [path.join(repoRoot, "dist", "cli.js"), ...args], { env: { ...server.env, CI: "true" } }, (error, stdout, stderr) => {
        resolve({ code: error ? Number((error as { code?: number }).code ?? 1) : 0, stdout, stderr });
      });
    });
  fs.writeFileSync(path.join(context, "hello.txt"), "hello from a Dockerfile\n");
  fs.writeFileSync(
    path.join(context, "Dockerfile"),
    ["FROM e2bdev/base", "ENV APP_MODE=dockerfile", "COPY hello.txt /home/user/hello.txt", "RUN echo built > /tmp/built", "WORKDIR /home/user", ""].join("\n"),
  );
  const built = await cli(["template", "build", "-f", path.join(context, "Dockerfile"), "--name", "e2e-dockerfile"]);
  assert.equal(built.code, 0, built.stderr + built.stdout);
  assert.match(built.stdout, /RUN echo built/);
  assert.match(built.stdout, /is ready/);
  assert.doesNotMatch(built.stdout, /\x1b\[/, "no terminal control codes under CI");
  const listed = await cli(["template", "ls"]);
  assert.match(listed.stdout, /e2e-dockerfile/);
  const logs = await cli(["template", "logs", "e2e-dockerfile"]);
  assert.equal(logs.code, 0, logs.stderr);
  assert.match(logs.stdout, /COPY hello.txt/);
  assert.match(logs.stdout, /: ready/);

  const sandbox = await Sandbox.create("e2e-dockerfile");
  try {
    assert.equal((await sandbox.commands.run("cat hello.txt /tmp/built; echo $APP_MODE")).stdout, "hello from a Dockerfile\nbuilt\ndockerfile\n");
  } finally {
    await sandbox.kill();
  }
  const removed = await cli(["template", "rm", "e2e-dockerfile"]);
  assert.equal(removed.code, 0, removed.stderr);
  assert.equal(await Template.exists("e2e-dockerfile"), false);
  const bad = await cli(["template", "build", "-f", path.join(context, "missing.Dockerfile"), "--name", "x"]);
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /cannot read/);
});

test("a hostile COPY archive is unpacked inside the build sandbox only: nothing reaches the host", async () => {
  const { writeTar } = await import("../../src/template/oci/test-image.js");
  const mark = `cubicle-copy-escape-${process.pid}-${Date.now()}`;
  const hostTargets = [`/tmp/${mark}-dotdot`, `/tmp/${mark}-abs`, `/tmp/${mark}-link`];
  const archive = writeTar([
    { path: "app/ok.txt", data: "fine\n" },
    { path: `../../../../../../../..${hostTargets[0]}`, data: "escaped\n" },
    { path: hostTargets[1]!, data: "escaped\n" },
    { path: "app/root-link", type: "symlink", linkPath: "/" },
    { path: `app/root-link${hostTargets[2]}`, data: "escaped\n" },
  ]);
  const requested = (await server.api("POST", "/v3/templates", { name: "e2e-hostile-copy" })).json;
  const hash = "ee".repeat(32);
  const link = (await server.api("GET", `/templates/${requested.templateID}/files/${hash}`)).json;
  assert.equal((await fetch(link.url, { method: "PUT", body: new Uint8Array(archive) })).status, 200);
  const started = await server.api("POST", `/v2/templates/${requested.templateID}/builds/${requested.buildID}`, {
    fromTemplate: "base",
    steps: [{ type: "COPY", args: ["app", "/home/user/app", "", ""], filesHash: hash }],
  });
  assert.equal(started.status, 202);
  const status = await waitForStatus(requested.templateID, requested.buildID, (s) => s.status === "ready" || s.status === "error");
  for (const target of hostTargets) assert.equal(fs.existsSync(target), false, `${target} must not exist on the host (build ${status.status})`);
  if (status.status === "ready") {
    const sandbox = await Sandbox.create("e2e-hostile-copy");
    try {
      assert.equal((await sandbox.commands.run("cat /home/user/app/ok.txt")).stdout, "fine\n");
    } finally {
      await sandbox.kill();
    }
  }
  assert.equal((await server.api("GET", "/health")).status, 200, "the server is fine");
});
