/**
 * Template warm state: with CUBICLE_WARM_SNAPSHOT naming code-interpreter-v1, the server builds
 * a memory image of a sandbox whose agent and Python kernel already started, and a create
 * without a pool entry restores it. A restored sandbox must look like a fresh one (own id,
 * hostname, token, files, a kernel with no state of anyone else) and answer its first runCode
 * at once; creates the image cannot serve (env vars) and other templates boot as before.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { Sandbox } from "@e2b/code-interpreter";
import { Sandbox as BaseSandbox } from "e2b";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;

before(async () => {
  server = await startTestServer({ defaultTemplates: ["base", "code-interpreter-v1"], extraEnv: { CUBICLE_WARM_SNAPSHOT: "code-interpreter-v1" } });
  useServerForSdk(server);
  const deadline = Date.now() + 120_000;
  while (!(await warmSnapshots())["code-interpreter-v1"]?.ready) {
    if (Date.now() > deadline) throw new Error(`no warm snapshot was built: ${JSON.stringify(await warmSnapshots())}\n${server.log().slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
});

after(async () => {
  await server?.stop();
});

async function warmSnapshots(): Promise<Record<string, { ready: boolean; building: boolean; restores: number }>> {
  return (await server.api("GET", "/warm-snapshots")).json ?? {};
}

async function restores(): Promise<number> {
  return (await warmSnapshots())["code-interpreter-v1"]?.restores ?? 0;
}

/** Creates a sandbox and says whether the warm snapshot served it (tests run one create at a time). */
async function createCounted<T>(create: () => Promise<T>): Promise<{ sandbox: T; restored: boolean }> {
  const before = await restores();
  const sandbox = await create();
  return { sandbox, restored: (await restores()) === before + 1 };
}

test("a code-interpreter create restores the warm snapshot: a fresh kernel that answers at once", async () => {
  const { sandbox: first, restored } = await createCounted(() => Sandbox.create());
  try {
    assert.ok(restored, "created from the warm snapshot");
    const started = performance.now();
    const execution = await first.runCode("1+1");
    const firstRunCodeMs = performance.now() - started;
    assert.equal(execution.text, "2");
    assert.equal(execution.executionCount, 1, "the kernel's history starts empty");
    console.log(`first runCode after a warm-snapshot create: ${firstRunCodeMs.toFixed(0)} ms`);
    // A cold kernel takes most of a second to start; a restored one is running already.
    assert.ok(firstRunCodeMs < 500, `the restored kernel answered in ${firstRunCodeMs.toFixed(0)} ms`);
    await first.runCode("leaked = 'from the first sandbox'");

    const { sandbox: second, restored: secondRestored } = await createCounted(() => Sandbox.create());
    try {
      assert.ok(secondRestored);
      assert.notEqual(second.sandboxId, first.sandboxId);
      const names = await second.runCode("sorted(k for k in globals() if not k.startswith('_'))");
      assert.equal(names.text, "['In', 'Out', 'exit', 'get_ipython', 'quit']", "a fresh kernel's names only, none of another sandbox");
      const hostname = await second.runCode("import socket\nprint(socket.gethostname())");
      assert.equal(hostname.logs.stdout.join("").trim(), second.sandboxId, "the kernel sees the sandbox's own hostname");
      assert.equal((await second.commands.run("hostname")).stdout.trim(), second.sandboxId);
      const numpy = await second.runCode("import numpy as np\nint(np.arange(4).sum())");
      assert.equal(numpy.text, "6", "the restored kernel imports and runs libraries");
    } finally {
      await second.kill();
    }
    assert.equal((await first.runCode("leaked")).text, "from the first sandbox", "the first sandbox kept its own state");
  } finally {
    await first.kill();
  }
});

test("a restored sandbox has its own token and files", async () => {
  const { sandbox, restored } = await createCounted(() => Sandbox.create({ secure: true }));
  try {
    assert.ok(restored);
    const token = (await server.api("GET", `/sandboxes/${sandbox.sandboxId}`)).json.envdAccessToken;
    assert.ok(token && token.length >= 16, "a secure sandbox has a token");
    const denied = await fetch(server.url + "/filesystem.Filesystem/Stat", {
      method: "POST",
      headers: { "e2b-sandbox-id": sandbox.sandboxId, "e2b-sandbox-port": "49983", "content-type": "application/json" },
      body: JSON.stringify({ path: "/" }),
    });
    assert.equal(denied.status, 401, "the restored agent demands the new sandbox's token");
    await sandbox.files.write("/home/user/note.txt", "hello from " + sandbox.sandboxId);
    assert.equal(await sandbox.files.read("/home/user/note.txt"), "hello from " + sandbox.sandboxId);
    const fromKernel = await sandbox.runCode("open('/home/user/note.txt').read()");
    assert.equal(fromKernel.text, `hello from ${sandbox.sandboxId}`);
    const other = await Sandbox.create();
    try {
      assert.equal(await other.files.exists("/home/user/note.txt"), false, "files stay in their sandbox");
    } finally {
      await other.kill();
    }
  } finally {
    await sandbox.kill();
  }
});

test("a create with env vars boots cold, and its kernel and commands see them", async () => {
  const { sandbox, restored } = await createCounted(() => Sandbox.create({ envs: { MARKER: "cold-with-env" } }));
  try {
    assert.equal(restored, false, "a restored kernel would keep the image's environment");
    assert.equal((await sandbox.runCode("import os\nos.environ.get('MARKER')")).text, "cold-with-env");
    assert.equal((await sandbox.commands.run("echo $MARKER")).stdout, "cold-with-env\n");
  } finally {
    await sandbox.kill();
  }
});

test("base creates boot as before and no base image is made", async () => {
  const { sandbox, restored } = await createCounted(() => BaseSandbox.create("base"));
  try {
    assert.equal(restored, false);
    assert.deepEqual(Object.keys(await warmSnapshots()), ["code-interpreter-v1"], "no warm snapshot for base");
    assert.equal((await sandbox.commands.run("hostname")).stdout.trim(), sandbox.sandboxId);
  } finally {
    await sandbox.kill();
  }
  const images = fs.readdirSync(path.join(server.runDir, "pool", "images", "warm"));
  assert.deepEqual(images.filter((name) => !name.startsWith("code-interpreter-v1-")), [], `only the code interpreter's image: ${images.join(", ")}`);
});

test("restored kernels do not share random state or a broken history database", async () => {
  const outputs: string[] = [];
  for (let i = 0; i < 2; i++) {
    const sandbox = await Sandbox.create();
    try {
      const execution = await sandbox.runCode("import random\nprint(random.random())");
      assert.deepEqual(execution.logs.stderr, []);
      outputs.push(execution.logs.stdout.join(""));
    } finally {
      await sandbox.kill();
    }
  }
  assert.equal(outputs.length, 2);
  assert.doesNotMatch(outputs[0]!, /history/i, "no history database error in the first output");
  assert.notEqual(outputs[0], outputs[1], "two restores draw different random numbers");
});
