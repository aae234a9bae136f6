/**
 * The SDK version matrix: a compact smoke (create, commands, files, pty, runCode, snapshot,
 * pause, kill) run by several released `e2b` and `@e2b/code-interpreter` versions, installed side by side as
 * npm aliases (package.json), against one real server. Every cell is a test of its own; the run
 * writes what it saw to test-results/sdk-matrix.json (or $CUBICLE_SDK_MATRIX_JSON), from which
 * `npm run sdk-matrix` renders the README table.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

const repoRoot = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..", "..");
const semver = createRequire(import.meta.url)("semver") as { satisfies(version: string, range: string): boolean };
const SDK_MATRIX_JSON = process.env.CUBICLE_SDK_MATRIX_JSON ?? path.join(repoRoot, "test-results", "sdk-matrix.json");

/** One installed SDK: the name it is imported by (an npm alias or the pinned package). */
interface SdkRow {
  importName: string;
  kind: "e2b" | "code-interpreter";
  /** Why this version is in the matrix. */
  role: string;
}

const ROWS: SdkRow[] = [
  { importName: "e2b-2-0", kind: "e2b", role: "oldest 2.x" },
  { importName: "e2b-2-13", kind: "e2b", role: "last with no routing headers on /files" },
  { importName: "e2b-2-14", kind: "e2b", role: "first with routing headers on /files" },
  { importName: "e2b-2-20", kind: "e2b", role: "mid 2.x" },
  { importName: "e2b-2-30", kind: "e2b", role: "mid 2.x" },
  { importName: "e2b-v1", kind: "e2b", role: "v1 create path (POST /sandboxes)" },
  { importName: "e2b", kind: "e2b", role: "pinned in package.json" },
  { importName: "code-interpreter-2-0", kind: "code-interpreter", role: "oldest 2.x" },
  { importName: "code-interpreter-2-6", kind: "code-interpreter", role: "last with the 49999 host hard-coded" },
  { importName: "code-interpreter-2-7", kind: "code-interpreter", role: "first with E2B_SANDBOX_URL on 49999" },
  { importName: "@e2b/code-interpreter", kind: "code-interpreter", role: "pinned in package.json" },
];

/**
 * Failures that come from the SDK version, not from the server: the SDK ignores the variables a
 * self-hosted server is reached by (E2B_API_URL, E2B_SANDBOX_URL, the routing headers) and builds
 * an address of its own (wire protocol doc §2.5). Such a cell passes only when it fails exactly
 * this way, so a change either way (it starts working, or fails differently) fails the test.
 */
const CLIENT_LIMITS: { importName: string; behaviour: Behaviour; error: RegExp; why: string }[] = [
  { importName: "e2b-2-0", behaviour: "create", error: /ENOTFOUND api\.cubicle\.test/, why: "ignores E2B_API_URL: calls https://api.<E2B_DOMAIN>" },
  { importName: "code-interpreter-2-0", behaviour: "create", error: /ENOTFOUND api\.cubicle\.test/, why: "its e2b 2.0.1 ignores E2B_API_URL: calls https://api.<E2B_DOMAIN>" },
  {
    importName: "code-interpreter-2-6",
    behaviour: "runCode",
    error: /ENOTFOUND 49999-[a-z0-9]+\.cubicle\.test/,
    why: "ignores E2B_SANDBOX_URL for port 49999: calls https://49999-<id>.<E2B_DOMAIN>",
  },
];

const BEHAVIOURS = ["create", "commands", "files", "pty", "runCode", "snapshot", "pause", "kill"] as const;
type Behaviour = (typeof BEHAVIOURS)[number];

/** What one cell of the table says. */
interface Cell {
  status: "pass" | "fail" | "n/a" | "not run";
  ms?: number;
  /** How the behaviour was exercised when a version offers it differently (e.g. pause → connect). */
  via?: string;
  /** Failure or the reason for n/a / not run. */
  detail?: string;
  /** A failure that is this SDK version's own (CLIENT_LIMITS): why it cannot work. */
  clientLimit?: string;
}

interface RowResult {
  importName: string;
  package: string;
  version: string;
  kind: SdkRow["kind"];
  role: string;
  /** The `e2b` version a code-interpreter row runs on (what npm resolved for it). */
  e2bVersion?: string;
  /** The installed package's engines.node, and whether this Node satisfies it. */
  engines?: string;
  enginesMet: boolean;
  /** Packages of its installed dependency tree (optional ones included) whose engines.node this Node does not satisfy. */
  dependenciesNeedingOtherNode: string[];
  cells: Partial<Record<Behaviour, Cell>>;
}

interface PackageJson {
  name: string;
  version: string;
  engines?: { node?: string };
}

function readPackageJson(dir: string): PackageJson {
  return JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8"));
}

function installedPackage(importName: string): PackageJson & { dir: string } {
  const dir = path.join(repoRoot, "node_modules", importName);
  return { dir, ...readPackageJson(dir) };
}

/** The `e2b` a code-interpreter install resolves: its own nested copy, else the hoisted one. */
function e2bUnder(packageDir: string): string {
  const nested = path.join(packageDir, "node_modules", "e2b");
  return readPackageJson(fs.existsSync(nested) ? nested : path.join(repoRoot, "node_modules", "e2b")).version;
}

interface LockEntry {
  name?: string;
  version: string;
  engines?: { node?: string };
  dependencies?: Record<string, string>;
  optionalDependencies?: Record<string, string>;
}

/**
 * The dependency tree of an installed package, read from package-lock.json (which also holds the
 * optional packages npm left out for this platform), as `name@version (engines)` for each one
 * whose engines.node this Node does not satisfy.
 */
function dependenciesNeedingOtherNode(importName: string): string[] {
  const lock = JSON.parse(fs.readFileSync(path.join(repoRoot, "package-lock.json"), "utf8")) as { packages: Record<string, LockEntry> };
  /** Where Node would find `name` from the package at `key`: the nearest node_modules up the tree. */
  const resolve = (key: string, name: string): string | undefined => {
    for (let base = key; ; base = base.slice(0, Math.max(0, base.lastIndexOf("/node_modules/")))) {
      const candidate = `${base ? `${base}/` : ""}node_modules/${name}`;
      if (lock.packages[candidate]) return candidate;
      if (!base) return undefined;
    }
  };
  const seen = new Set<string>();
  const found = new Set<string>();
  const visit = (key: string) => {
    const entry = lock.packages[key]!;
    const optional = new Set(Object.keys(entry.optionalDependencies ?? {}));
    for (const name of new Set([...Object.keys(entry.dependencies ?? {}), ...optional])) {
      const depKey = resolve(key, name);
      if (!depKey || seen.has(depKey)) continue;
      seen.add(depKey);
      const dep = lock.packages[depKey]!;
      const range = dep.engines?.node;
      if (range && !semver.satisfies(process.version, range)) {
        const installed = fs.existsSync(path.join(repoRoot, depKey, "package.json"));
        const notes = [optional.has(name) ? "optional" : "", installed ? "" : "not installed", `node ${range}`].filter(Boolean).join(", ");
        found.add(`${name}${dep.name && dep.name !== name ? ` (${dep.name})` : ""}@${dep.version} (${notes})`);
      }
      visit(depKey);
    }
  };
  visit(`node_modules/${importName}`);
  return [...found].sort();
}

function serverRevision(): string {
  try {
    const commit = execFileSync("git", ["rev-parse", "--short=12", "HEAD"], { cwd: repoRoot, encoding: "utf8" }).trim();
    const dirty = execFileSync("git", ["status", "--porcelain", "--untracked-files=no", "--", "src"], { cwd: repoRoot, encoding: "utf8" }).trim();
    return dirty ? `${commit}+dirty` : commit;
  } catch {
    return "unknown";
  }
}

function describeError(err: unknown): string {
  const parts: string[] = [];
  let current: unknown = err;
  for (let depth = 0; current && depth < 4; depth++) {
    const e = current as { name?: string; message?: string; code?: string; cause?: unknown };
    parts.push(`${e.name ?? "Error"}${e.code ? ` [${e.code}]` : ""}: ${e.message ?? String(current)}`);
    current = e.cause;
  }
  return parts.join(" ← ").replace(/\s+/g, " ").slice(0, 400);
}

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms))),
  ]);
}

// The surface of the SDK's Sandbox class the smoke uses, as loosely as the oldest version allows.
type SdkSandboxClass = any;
type SdkSandbox = any;

let server: TestServer;
const results: RowResult[] = [];
const startedAt = new Date();

before(async () => {
  server = await startTestServer({ defaultTemplates: ["base", "code-interpreter-v1"] });
  useServerForSdk(server);
});

after(async () => {
  const report = {
    generatedAt: startedAt.toISOString(),
    finishedAt: new Date().toISOString(),
    serverRevision: serverRevision(),
    node: process.version,
    platform: `${process.platform} ${process.arch}`,
    templates: { e2b: "base", "code-interpreter": "code-interpreter-v1" },
    behaviours: BEHAVIOURS,
    rows: results,
  };
  fs.mkdirSync(path.dirname(SDK_MATRIX_JSON), { recursive: true });
  fs.writeFileSync(SDK_MATRIX_JSON, JSON.stringify(report, null, 2) + "\n");
  console.log(`sdk matrix written to ${path.relative(process.cwd(), SDK_MATRIX_JSON)}`);
  await server?.stop();
});

for (const row of ROWS) {
  const installed = installedPackage(row.importName);
  const result: RowResult = {
    importName: row.importName,
    package: installed.name,
    version: installed.version,
    kind: row.kind,
    role: row.role,
    engines: installed.engines?.node,
    enginesMet: !installed.engines?.node || semver.satisfies(process.version, installed.engines.node),
    dependenciesNeedingOtherNode: dependenciesNeedingOtherNode(row.importName),
    ...(row.kind === "code-interpreter" ? { e2bVersion: e2bUnder(installed.dir) } : {}),
    cells: {},
  };
  results.push(result);
  const template = row.kind === "e2b" ? "base" : "code-interpreter-v1";
  const label = `${installed.name}@${installed.version}${result.e2bVersion ? ` (e2b ${result.e2bVersion})` : ""}`;

  describe(`sdk matrix: ${label}`, () => {
    let Sandbox: SdkSandboxClass;
    let sandbox: SdkSandbox | undefined;
    /** Everything this row made, removed through the API in after() whatever happened. */
    const sandboxIds = new Set<string>();
    const snapshotIds = new Set<string>();

    before(async () => {
      Sandbox = (await import(row.importName)).Sandbox;
    });

    after(async () => {
      for (const id of sandboxIds) await server.api("DELETE", `/sandboxes/${id}`).catch(() => undefined);
      for (const id of snapshotIds) await server.api("DELETE", `/templates/${encodeURIComponent(id)}`).catch(() => undefined);
    });

    /**
     * Runs one cell: records pass / fail / n/a with its time. `missing` names what this version
     * lacks (n/a, skipped). A behaviour that needs the sandbox is "not run" (and skipped) when
     * create failed; the create test carries the failure.
     */
    const cell = (behaviour: Behaviour, needsSandbox: boolean, body: () => Promise<string | void>, missing?: () => string | undefined) =>
      test(behaviour, async (t) => {
        const absent = missing?.();
        if (absent) {
          result.cells[behaviour] = { status: "n/a", detail: absent };
          t.skip(`n/a: ${absent}`);
          return;
        }
        if (needsSandbox && !sandbox) {
          result.cells[behaviour] = { status: "not run", detail: "create failed" };
          t.skip("create failed");
          return;
        }
        const limit = CLIENT_LIMITS.find((l) => l.importName === row.importName && l.behaviour === behaviour);
        const started = performance.now();
        let via: string | void;
        try {
          via = await withTimeout(body(), 60_000, behaviour);
        } catch (err) {
          const detail = describeError(err);
          result.cells[behaviour] = { status: "fail", ms: Math.round(performance.now() - started), detail, ...(limit && limit.error.test(detail) ? { clientLimit: limit.why } : {}) };
          if (limit && limit.error.test(detail)) {
            t.diagnostic(`fails as this SDK version must: ${limit.why}`);
            return;
          }
          throw err;
        }
        result.cells[behaviour] = { status: "pass", ms: Math.round(performance.now() - started), ...(via ? { via } : {}) };
        if (limit) assert.fail(`expected this SDK version to fail (${limit.why}), but it passed: update CLIENT_LIMITS`);
      });

    const create = async (templateOrSnapshot: string): Promise<SdkSandbox> => {
      const made = await Sandbox.create(templateOrSnapshot, { timeoutMs: 180_000, metadata: { suite: "sdk-matrix", sdk: label } });
      sandboxIds.add(made.sandboxId);
      return made;
    };

    cell("create", false, async () => {
      sandbox = await create(template);
      const info = await server.api("GET", `/sandboxes/${sandbox.sandboxId}`);
      assert.equal(info.status, 200, JSON.stringify(info.json));
      assert.equal(info.json.state, "running");
      assert.equal(info.json.templateID, template);
      assert.equal(info.json.metadata?.sdk, label);
    });

    cell("commands", true, async () => {
      const run = await sandbox.commands.run("echo $((6*7)) $(whoami) $PWD");
      assert.equal(run.exitCode, 0);
      assert.equal(run.stdout, "42 user /home/user\n");
      await assert.rejects(sandbox.commands.run("echo oops >&2; exit 3"), (err: any) => err.exitCode === 3 && err.stderr === "oops\n");
    });

    cell("files", true, async () => {
      const content = `matrix ${label} ✓\n`;
      await sandbox.files.write("/home/user/matrix/note.txt", content);
      assert.equal(await sandbox.files.read("/home/user/matrix/note.txt"), content);
      const entries = await sandbox.files.list("/home/user/matrix");
      assert.deepEqual(entries.map((e: { name: string }) => e.name), ["note.txt"]);
      await assert.rejects(sandbox.files.read("/home/user/matrix/missing.txt"), /does not exist|not found/i);
    });

    cell("pty", true, async () => {
      const decoder = new TextDecoder();
      let output = "";
      const terminal = await sandbox.pty.create({ cols: 80, rows: 24, onData: (data: Uint8Array) => void (output += decoder.decode(data, { stream: true })) });
      try {
        await sandbox.pty.sendInput(terminal.pid, new TextEncoder().encode("echo pty-$((40+2))\n"));
        const deadline = Date.now() + 15_000;
        while (!/pty-42\r?\n/.test(output) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
        assert.match(output, /pty-42\r?\n/, `pty output: ${JSON.stringify(output.slice(-300))}`);
      } finally {
        assert.equal(await sandbox.pty.kill(terminal.pid), true);
      }
    });

    const hasMethod = (name: string) => typeof Sandbox?.prototype?.[name] === "function";
    const notInSdk = () => "not in this SDK";

    cell(
      "runCode",
      true,
      async () => {
        const execution = await sandbox.runCode("x = 6 * 7\nprint('out', x)\nx");
        assert.equal(execution.error, undefined, JSON.stringify(execution.error));
        assert.equal(execution.text, "42");
        assert.deepEqual(execution.logs.stdout, ["out 42\n"]);
        const failed = await sandbox.runCode("1/0");
        assert.equal(failed.error?.name, "ZeroDivisionError");
      },
      () => (hasMethod("runCode") ? undefined : notInSdk()),
    );

    cell(
      "snapshot",
      true,
      async () => {
        // The state to carry is written by commands (not files), so this cell stands on its own.
        const state = (target: SdkSandbox) => target.commands.run("cat /home/user/state.txt").then((r: { stdout: string }) => r.stdout);
        await sandbox.commands.run("echo before > /home/user/state.txt");
        const snapshot = await sandbox.createSnapshot();
        snapshotIds.add(snapshot.snapshotId);
        await sandbox.commands.run("echo after > /home/user/state.txt");
        const restored = await create(snapshot.snapshotId);
        try {
          assert.equal(await state(restored), "before\n");
          // The kernel's memory comes along with the files.
          if (result.cells.runCode?.status === "pass") assert.equal((await restored.runCode("x")).text, "42");
        } finally {
          await restored.kill();
        }
        assert.equal(await Sandbox.deleteSnapshot(snapshot.snapshotId), true);
        snapshotIds.delete(snapshot.snapshotId);
      },
      () => (hasMethod("createSnapshot") ? undefined : notInSdk()),
    );

    // 2.0 and 2.13 have only betaPause, 2.14 on pause; both resume through connect.
    const pauseMethod = () => (hasMethod("pause") ? "pause" : hasMethod("betaPause") ? "betaPause" : undefined);
    cell(
      "pause",
      true,
      async () => {
        const pause = pauseMethod()!;
        await sandbox.commands.run("echo paused > /home/user/state.txt");
        assert.equal(await sandbox[pause](), true);
        assert.equal((await server.api("GET", `/sandboxes/${sandbox.sandboxId}`)).json.state, "paused");
        const resumed = await Sandbox.connect(sandbox.sandboxId);
        assert.equal((await server.api("GET", `/sandboxes/${sandbox.sandboxId}`)).json.state, "running");
        assert.equal((await resumed.commands.run("cat /home/user/state.txt")).stdout, "paused\n");
        if (result.cells.runCode?.status === "pass") assert.equal((await resumed.runCode("x")).text, "42");
        return pause === "pause" ? undefined : `${pause} → connect`;
      },
      () => (pauseMethod() ? undefined : notInSdk()),
    );

    cell("kill", true, async () => {
      // The instance's kill() returns nothing in older versions (2.28 among them): the server is the judge.
      await sandbox.kill();
      assert.equal((await server.api("GET", `/sandboxes/${sandbox.sandboxId}`)).status, 404);
      assert.equal(await Sandbox.kill(sandbox.sandboxId), false, "a second kill reports the sandbox gone");
      sandboxIds.delete(sandbox.sandboxId);
    });
  });
}
