/**
 * End-to-end harness: runs the real Cubicle server (dist/cli.js) as a child process with its
 * own state directory, port, subnet and nftables table, and points the E2B SDKs at it.
 * Template trees are shared with the default location so tests do not rebuild them.
 */
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { callApi, type BenchTarget } from "../../src/bench/target.js";
import { defaultRunDir } from "../../src/shared/config.js";

const repoRoot = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..", "..");
export const TEST_API_KEY = "e2b_" + "0123456789abcdef".repeat(2) + "01234567";

export interface TestServer {
  url: string;
  apiKey: string;
  stateDir: string;
  /** Where the server mounts its storage pool and kit (outside the 0700 state dir). */
  runDir: string;
  env: NodeJS.ProcessEnv;
  /** Process id of the server, for the recovery test's SIGKILL. */
  pid(): number;
  /**
   * SIGKILL the server (sandboxes keep running) and start it again on the same state;
   * `whileDown` runs in between (e.g. simulateHostReboot).
   */
  crashAndRestart(whileDown?: () => void | Promise<void>): Promise<void>;
  /** Kills every sandbox through the API, stops the server and removes its state dir. */
  stop(): Promise<void>;
  /** REST call with the API key. */
  api(method: string, urlPath: string, body?: unknown, headers?: Record<string, string>): Promise<{ status: number; json: any; headers: Headers }>;
  /** Server log so far (for failure messages). */
  log(): string;
}

/**
 * A free port below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768 and up by
 * default): a port the kernel handed out once could be handed out again — to the server's own
 * DNS forwarder or egress proxy, which listen on ports the kernel picks — before the server
 * binds its API to it (EADDRINUSE at start).
 */
export async function freePort(): Promise<number> {
  for (let attempt = 0; attempt < 100; attempt++) {
    const port = 20_000 + Math.floor(Math.random() * 12_000);
    const free = await new Promise<boolean>((resolve) => {
      const srv = net.createServer();
      srv.once("error", () => resolve(false));
      srv.listen(port, "127.0.0.1", () => srv.close(() => resolve(true)));
    });
    if (free) return port;
  }
  throw new Error("no free port between 20000 and 32000 on 127.0.0.1");
}

let serverCounter = 0;

/**
 * A slot (nftables table cubicle_t<slot> and a /18 of its own) no other test server on this host
 * uses now: suites of other checkouts may run at the same time.
 */
function freeSlot(start: number): number {
  let tables = "";
  try {
    tables = execFileSync("nft", ["list", "tables"], { encoding: "utf8" });
  } catch {
    // no nftables: nothing to collide with
  }
  for (let i = 0; i < 200; i++) {
    const slot = (start + i) % 200;
    if (!new RegExp(`\\bcubicle_t${slot}\\b`).test(tables)) return slot;
  }
  return start;
}

export interface TestServerOptions {
  defaultTemplates?: string[];
  extraEnv?: Record<string, string>;
  /** Runs on the fresh state dir before the server first starts (e.g. to mount a small tmpfs in it). */
  beforeStart?: (stateDir: string) => void | Promise<void>;
  /**
   * Runs in stop() once the server has exited, before the leak check and the state dir's
   * removal: undoes what beforeStart did (unmount). Also runs when the server never started.
   */
  afterStop?: (stateDir: string) => void | Promise<void>;
}

/**
 * The runtime the e2e suite's sandboxes run in (E2E_RUNTIME_NOTE): `container` (default) or
 * `microvm` (CUBICLE_E2E_RUNTIME=microvm): then every test server runs microVMs too (QEMU's TCG
 * unless CUBICLE_E2E_MICROVM=kvm) and both default templates run in them
 * (CUBICLE_TEMPLATE_RUNTIME), so the same tests drive guests instead of containers.
 */
export const e2eRuntime: "container" | "microvm" = process.env.CUBICLE_E2E_RUNTIME === "microvm" ? "microvm" : "container";

export async function startTestServer(options: TestServerOptions = {}): Promise<TestServer> {
  const port = await freePort();
  const stateDir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-e2e-"));
  // A subnet and nft table per test server, so a developer's own `./cubicle up` is untouched.
  const slot = freeSlot((process.pid + serverCounter++) % 200);
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    CUBICLE_PORT: String(port),
    CUBICLE_HOST: "127.0.0.1",
    CUBICLE_STATE_DIR: stateDir,
    CUBICLE_TEMPLATE_DIR: process.env.CUBICLE_TEMPLATE_DIR ?? "/var/lib/cubicle/templates",
    CUBICLE_API_KEY: TEST_API_KEY,
    CUBICLE_SUBNET: `10.${100 + Math.floor(slot / 4)}.${(slot % 4) * 64}.0/18`,
    CUBICLE_NFT_TABLE: `cubicle_t${slot}`,
    CUBICLE_DOMAIN: "cubicle.test",
    // Test servers run side by side as root: none may take the default HTTPS port 443.
    CUBICLE_HTTPS_PORT: "off",
    CUBICLE_DEFAULT_TEMPLATES: (options.defaultTemplates ?? ["base"]).join(","),
    // No warm pools unless a test asks (extraEnv): tests that name containers by sandbox id need
    // runtime id = sandbox id, and pools would make every test server boot sandboxes it never uses.
    CUBICLE_POOL_SIZE: "",
    ...(e2eRuntime === "microvm" ? { CUBICLE_MICROVM: process.env.CUBICLE_E2E_MICROVM ?? "tcg", CUBICLE_TEMPLATE_RUNTIME: "base=microvm,code-interpreter-v1=microvm" } : {}),
    ...options.extraEnv,
  };
  const url = `http://127.0.0.1:${port}`;
  const namespacesBefore = new Set(listNamespaces());
  let child: ChildProcess | undefined;
  let output = "";

  const launch = async () => {
    child = spawn(process.execPath, [path.join(repoRoot, "dist", "cli.js"), "serve"], { env, stdio: ["ignore", "pipe", "pipe"] });
    child.stdout!.on("data", (d: Buffer) => (output += d.toString()));
    child.stderr!.on("data", (d: Buffer) => (output += d.toString()));
    const deadline = Date.now() + 600_000;
    while (Date.now() < deadline) {
      if (child.exitCode !== null) throw new Error(`server exited with ${child.exitCode}:\n${output}`);
      try {
        const res = await fetch(url + "/health");
        if (res.status === 200) return;
      } catch {
        // not listening yet
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`server did not become ready:\n${output}`);
  };

  const api: TestServer["api"] = (method, urlPath, body, headers = {}) => callApi({ apiUrl: url, apiKey: TEST_API_KEY }, method, urlPath, body, headers);

  const exited = (proc: ChildProcess) =>
    new Promise<void>((resolve) => (proc.exitCode !== null || proc.signalCode !== null ? resolve() : proc.once("exit", () => resolve())));

  try {
    await options.beforeStart?.(stateDir);
    await launch();
  } catch (err) {
    if (options.afterStop) {
      // A server that never became ready may still hold what afterStop undoes.
      const proc = child as ChildProcess | undefined;
      if (proc && proc.exitCode === null && proc.signalCode === null) {
        proc.kill("SIGTERM");
        await exited(proc);
      }
      await options.afterStop(stateDir);
    }
    throw err;
  }
  return {
    url,
    apiKey: TEST_API_KEY,
    stateDir,
    runDir: defaultRunDir(stateDir),
    env,
    pid: () => child!.pid!,
    log: () => output,
    api,
    async crashAndRestart(whileDown) {
      const proc = child!;
      proc.kill("SIGKILL");
      await exited(proc);
      await whileDown?.();
      await launch();
    },
    async stop() {
      const killAll = async () => {
        const list = await api("GET", "/v2/sandboxes?state=running,paused");
        for (const sandbox of (list.json ?? []) as { sandboxID: string }[]) await api("DELETE", `/sandboxes/${sandbox.sandboxID}`);
      };
      const running = (proc: ChildProcess) => proc.exitCode === null && proc.signalCode === null;
      try {
        let cleaned = false;
        if (child && running(child)) {
          try {
            await killAll();
            cleaned = true;
          } catch (err) {
            // Unreachable: it may be dying (its exit not reaped yet). Give it a moment.
            await Promise.race([exited(child), new Promise((r) => setTimeout(r, 5000))]);
            if (running(child)) throw err;
          }
        }
        if (child && !cleaned) {
          // The server died under the test (a crash is what some tests look for): start it again
          // on its state so it adopts the sandboxes it left, and kill those.
          try {
            await launch();
            await killAll();
          } catch (err) {
            output += `\n[harness] could not restart the dead server to clean up: ${String(err)}\n`;
          }
        }
      } finally {
        if (child && child.exitCode === null) {
          child.kill("SIGTERM");
          await exited(child);
        }
        await options.afterStop?.(stateDir);
      }
      const leftovers = hostLeftovers(stateDir);
      // Other servers on the host (a developer's) make namespaces too: ours carry our subnet.
      const subnetPrefix = env.CUBICLE_SUBNET!.split(".").slice(0, 2).join(".") + ".";
      leftovers.namespaces = listNamespaces().filter((name) => name.startsWith("cubicle-") && !namespacesBefore.has(name) && namespaceAddresses(name).some((a) => a.startsWith(subnetPrefix)));
      // The server keeps its nftables table for sandboxes it would adopt; the test is over.
      try {
        execFileSync("nft", ["delete", "table", "inet", env.CUBICLE_NFT_TABLE!], { stdio: "ignore" });
      } catch {
        // already gone
      }
      fs.rmSync(path.join(stateDir, "cubicle.db"), { force: true });
      // The storage pool and the kit stay mounted for sandboxes a restart would adopt; the test is over.
      unmountRunDir(stateDir);
      if (leftovers.containers.length || leftovers.mounts.length || leftovers.namespaces.length) {
        throw new Error(`the server left things behind: ${JSON.stringify(leftovers)}`);
      }
      fs.rmSync(stateDir, { recursive: true, force: true });
    },
  };
}

/**
 * Does to these sandboxes of a stopped server what a host reboot does: their processes die and
 * runc forgets their containers (/run/runc is a tmpfs), their overlay root is unmounted, their
 * network namespace (and its veth pair) is gone (/run/netns), and so is the nftables table. What
 * is on disk (the state dir) stays. Assumes runtime id = sandbox id (no warm pool claims).
 */
export function simulateHostReboot(server: TestServer, sandboxIds: string[]): void {
  const run = (argv: string[]) => {
    try {
      execFileSync(argv[0]!, argv.slice(1), { stdio: "pipe" });
    } catch (err) {
      const stderr = String((err as { stderr?: Buffer }).stderr ?? "");
      // Whatever is already gone is what a reboot would have left.
      if (!/does not exist|not found|not mounted|No such file|cannot remove namespace file/i.test(stderr)) throw new Error(`${argv.join(" ")} failed: ${stderr}`);
    }
  };
  for (const sandboxId of sandboxIds) {
    run(["runc", "delete", "--force", `cubicle-${sandboxId}`]);
    // A microVM's QEMU (the server started it; a reboot ends it).
    for (const pid of guestQemuPids(server, sandboxId)) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // ended meanwhile
      }
    }
    for (let i = 0; i < 100 && guestQemuPids(server, sandboxId).length > 0; i++) execFileSync("sleep", ["0.05"]);
    run(["ip", "netns", "delete", `cubicle-${sandboxId}`]);
  }
  // Spare QEMUs a crashed server left (SPARE_QEMU_NOTE) die too.
  for (const pid of spareQemuPids(server)) {
    try {
      if (fs.readFileSync(`/proc/${pid}/comm`, "utf8").startsWith("qemu-system")) process.kill(pid, "SIGKILL");
    } catch {
      // ended meanwhile
    }
  }
  // Every mount of the server goes, the storage pool and the kit included (/run is emptied).
  unmountRunDir(server.stateDir);
  run(["nft", "delete", "table", "inet", server.env.CUBICLE_NFT_TABLE!]);
}

/** Sets the variables the E2B SDKs read, exactly as a user would export them. */
export function useServerForSdk(server: TestServer): void {
  process.env.E2B_API_URL = server.url;
  process.env.E2B_SANDBOX_URL = server.url;
  process.env.E2B_API_KEY = server.apiKey;
  process.env.E2B_DOMAIN = "cubicle.test";
}

function listNamespaces(): string[] {
  try {
    return execFileSync("ip", ["netns", "list"], { encoding: "utf8" })
      .split("\n")
      .map((line) => line.split(" ")[0]!)
      .filter(Boolean);
  } catch {
    return [];
  }
}

/**
 * A sandbox's address as the host sees it: eth0's in its netns (a microVM's guest has an address
 * of its own behind it, GUEST_NETWORK_NOTE).
 */
export function sandboxAddressOf(sandboxId: string): string {
  const text = execFileSync("ip", ["-n", `cubicle-${sandboxId}`, "-o", "-4", "addr", "show", "dev", "eth0"], { encoding: "utf8" });
  const address = /inet (\d+\.\d+\.\d+\.\d+)/.exec(text)?.[1];
  if (!address) throw new Error(`sandbox ${sandboxId} has no address on eth0 in its netns`);
  return address;
}

function namespaceAddresses(name: string): string[] {
  try {
    return [...execFileSync("ip", ["-n", name, "-o", "-4", "addr", "show"], { encoding: "utf8" }).matchAll(/inet (\d+\.\d+\.\d+\.\d+)/g)].map((m) => m[1]!);
  } catch {
    return [];
  }
}

/** Unmounts whatever is mounted under a state dir's run dir (deepest first) and removes it. */
function unmountRunDir(stateDir: string): void {
  const runDir = defaultRunDir(stateDir);
  const mounts = fs
    .readFileSync("/proc/mounts", "utf8")
    .split("\n")
    .map((line) => line.split(" ")[1] ?? "")
    .filter((mountPoint) => mountPoint === runDir || mountPoint.startsWith(runDir + "/"))
    .sort((a, b) => b.length - a.length);
  for (const mountPoint of mounts) {
    try {
      execFileSync("umount", [mountPoint], { stdio: "pipe" });
    } catch {
      execFileSync("umount", ["--lazy", mountPoint], { stdio: "pipe" });
    }
  }
  // Emptied as a reboot empties /run: only once nothing is mounted below it, so nothing is
  // removed through a mount.
  const left = fs.readFileSync("/proc/mounts", "utf8").split("\n").some((line) => (line.split(" ")[1] ?? "").startsWith(runDir + "/"));
  if (!left) fs.rmSync(runDir, { recursive: true, force: true });
}

/**
 * What a test server leaves on the host: containers and sandbox mounts (its storage pool, kit,
 * volume mounts and the microVMs' RAM tmpfs are not leaks; stop() removes them).
 */
export function hostLeftovers(stateDir: string): { containers: string[]; namespaces: string[]; mounts: string[] } {
  const runDir = defaultRunDir(stateDir);
  const runcList = (() => {
    try {
      return execFileSync("runc", ["list", "--format", "json"], { encoding: "utf8" });
    } catch {
      return "null";
    }
  })();
  const containers = ((JSON.parse(runcList) ?? []) as { id: string; bundle: string }[])
    .filter((c) => c.bundle.startsWith(stateDir) || c.bundle.startsWith(runDir + "/"))
    .map((c) => c.id);
  const mounts = fs
    .readFileSync("/proc/mounts", "utf8")
    .split("\n")
    .filter((line) => line.includes(stateDir) || (line.includes(runDir + "/") && !line.includes(` ${runDir}/pool `) && !line.includes(` ${runDir}/kit `) && !line.includes(` ${runDir}/microvm-ram `) && !new RegExp(` ${runDir}/volumes/vol_[0-9a-f]{24} `).test(line)));
  return { containers, namespaces: [], mounts };
}

/**
 * The pids of the QEMU of a test server's microVM sandbox: its argv names the guest's directory,
 * or (a QEMU started ahead as a spare, SPARE_QEMU_NOTE, whose argv names the spare's) the pid
 * file in the guest's directory names it.
 */
export function guestQemuPids(server: TestServer, sandboxId: string): number[] {
  const marker = `${server.runDir}/microvm/${sandboxId}/`;
  const recorded = Number(readOr(path.join(server.runDir, "microvm", sandboxId, "run", "qemu.pid")).trim());
  const pids: number[] = [];
  for (const pid of fs.readdirSync("/proc").filter((name) => /^\d+$/.test(name))) {
    try {
      if (!fs.readFileSync(`/proc/${pid}/comm`, "utf8").startsWith("qemu-system")) continue;
      if (Number(pid) === recorded || fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(marker)) pids.push(Number(pid));
    } catch {
      // ended meanwhile
    }
  }
  return pids;
}

/** The pids of a test server's spare QEMUs that still wait for a state (SPARE_QEMU_NOTE). */
export function spareQemuPids(server: TestServer): number[] {
  const root = path.join(server.runDir, "microvm-spares");
  const dirs = fs.existsSync(root) ? fs.readdirSync(root) : [];
  return dirs.map((slot) => Number(readOr(path.join(root, slot, "run", "qemu.pid")).trim())).filter((pid) => Number.isInteger(pid) && pid > 1);
}

function readOr(file: string): string {
  try {
    return fs.readFileSync(file, "utf8");
  } catch {
    return "";
  }
}

/**
 * Processes whose command line names a path under `dir` (a microVM's virtiofsd and codebase-fs
 * daemons name their sockets and mounts), waited for up to `waitMs` to end.
 */
export async function processesUnder(dir: string, waitMs = 5000): Promise<string[]> {
  const deadline = Date.now() + waitMs;
  for (;;) {
    const found: string[] = [];
    for (const pid of fs.readdirSync("/proc").filter((name) => /^\d+$/.test(name))) {
      let cmdline = "";
      try {
        cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").replace(/\0/g, " ");
      } catch {
        continue; // ended meanwhile
      }
      if (cmdline.includes(dir + "/")) found.push(`${pid}: ${cmdline.trim()}`);
    }
    if (found.length === 0 || Date.now() > deadline) return found;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** The bench harness's target for a test server (the bench smoke tests drive it). */
export function benchTargetOf(server: TestServer): BenchTarget {
  return {
    apiUrl: server.url,
    apiKey: server.apiKey,
    stateDir: server.stateDir,
    runDir: server.runDir,
    templateDir: server.env.CUBICLE_TEMPLATE_DIR!,
    runcPath: "runc",
    domain: "cubicle.test",
  };
}
