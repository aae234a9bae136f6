import { copyFile, cp, link, mkdir, readFile, realpath, rename, rm, stat, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { createLogger } from "../../shared/log.js";

const log = createLogger("agent-kit");

/** Where the kit appears inside every sandbox (read-only bind mount). */
export const KIT_MOUNT_POINT = "/.cubicle";

export interface AgentKitSources {
  /** The Node binary to inject; the server's own by default. */
  nodeBinary: string;
  /** The bundled agent (`<distDir>/agent/agent.js`). */
  agentScript: string;
  /** Native packages the agent bundle leaves external, copied under `node_modules/`. */
  nativePackages: NativePackage[];
  /** The agent's static credential helper (`<distDir>/agent/run-as`, RUN_AS_NOTE), if built. */
  runAs?: string;
  /** The agent's xattr addon (`<distDir>/agent/xattr.node`, XATTR_NOTE), if built. */
  xattrAddon?: string;
  /** The agent's process start addon (`<distDir>/agent/spawn.node`, SPAWN_NOTE), if built. */
  spawnAddon?: string;
  /** The guest addon (`<distDir>/agent/guest.node`, GUEST_MACHINE_NOTE), if built: loaded only in microVM guests. */
  guestAddon?: string;
  /** The sandbox's first program (`<distDir>/sandbox-boot`, native/sandbox-boot.c, BOOT_IDENTITY_NOTE). */
  sandboxBoot: string;
  /** Start agents with their memory merged across sandboxes (AGENT_MEMORY_MERGE_NOTE). */
  mergeMemory?: boolean;
}

/**
 * An empty file of the kit: the mount point at which runc binds the sandbox's boot id file, for
 * sandbox-boot to bind it over /proc/sys/kernel/random/boot_id (BOOT_IDENTITY_NOTE).
 */
export const KIT_BOOT_ID_SOURCE = `${KIT_MOUNT_POINT}/boot-id`;

export interface AgentKit {
  dir: string;
  /** argv that starts the agent inside a sandbox, independent of the template's libc. */
  command: string[];
}

interface Manifest {
  version: 1;
  sources: Record<string, { size: number; mtimeMs: number }>;
  loaderName: string;
  hasInit: boolean;
}

/** A package the agent loads at run time (native addon), and the parts of it to copy. */
export interface NativePackage {
  name: string;
  dir: string;
  /** Paths inside the package to copy (files or directories). */
  include: string[];
  /** Native objects among them, whose libraries the kit must carry too. */
  addons: string[];
}

const nativePackageParts: Record<string, { include: string[]; addons: string[] }> = {
  "node-pty": { include: ["package.json", "lib", "build/Release/pty.node"], addons: ["build/Release/pty.node"] },
  // zeromq picks its addon by platform, libc and ABI at load time through cmake-ts.
  zeromq: { include: ["package.json", "lib", "build/manifest.json", `build/linux/${process.arch}`], addons: [] },
  "cmake-ts": { include: ["package.json", "build/loader.js"], addons: [] },
};

/** The agent's native packages as installed next to the server; missing ones are left out. */
export function findNativePackages(): NativePackage[] {
  const found: NativePackage[] = [];
  const require = createRequire(import.meta.url);
  for (const [name, parts] of Object.entries(nativePackageParts)) {
    // Look the directory up rather than resolving `name/package.json`: `exports` may hide it.
    const dir = (require.resolve.paths(name) ?? []).map((base) => path.join(base, name)).find((candidate) => existsSync(path.join(candidate, "package.json")));
    if (dir) found.push({ name, dir, ...parts });
    else log.warn(`${name} is not installed: the agent feature that needs it will fail in sandboxes`);
  }
  return found;
}

/**
 * Assembles `<stateDir>/kit`: the host's Node binary, its dynamic loader and every library that
 * `ldd` lists for it and for node-pty's addon, the agent bundle and node-pty, sandbox-boot (the
 * first program of a sandbox, BOOT_IDENTITY_NOTE) and the mount point of the boot id it binds,
 * tini, the static run-as helper and the agent's addons (xattr.node, spawn.node) when the host
 * has them. Sandboxes run the agent through the kit's own loader, so any template rootfs works
 * (glibc, musl or none).
 *
 * Rebuilt only when a source changed (size or mtime); a new kit replaces the old one by rename,
 * so running sandboxes keep the files they mounted.
 */
/** The kit's sources as a build leaves them in `distDir` (the server's Node, the built agent and helpers). */
export function kitSourcesIn(distDir: string, overrides: Partial<AgentKitSources> = {}): AgentKitSources {
  return {
    nodeBinary: process.execPath,
    agentScript: path.join(distDir, "agent", "agent.js"),
    nativePackages: findNativePackages(),
    runAs: path.join(distDir, "agent", "run-as"),
    xattrAddon: path.join(distDir, "agent", "xattr.node"),
    spawnAddon: path.join(distDir, "agent", "spawn.node"),
    guestAddon: path.join(distDir, "agent", "guest.node"),
    sandboxBoot: path.join(distDir, "sandbox-boot"),
    ...overrides,
  };
}

export async function assembleAgentKit(kitDir: string, sources: AgentKitSources): Promise<AgentKit> {
  await stat(sources.agentScript).catch((err) => {
    throw new CubicleError("failed_precondition", `the agent bundle ${sources.agentScript} is missing; run \`npm run build\` first`, { cause: err });
  });
  const addons = sources.nativePackages.flatMap((pkg) => pkg.addons.map((addon) => path.join(pkg.dir, addon)));
  const runAs = sources.runAs && existsSync(sources.runAs) ? sources.runAs : undefined;
  const xattrAddon = sources.xattrAddon && existsSync(sources.xattrAddon) ? sources.xattrAddon : undefined;
  if (xattrAddon) addons.push(xattrAddon);
  const spawnAddon = sources.spawnAddon && existsSync(sources.spawnAddon) ? sources.spawnAddon : undefined;
  if (spawnAddon) addons.push(spawnAddon);
  const guestAddon = sources.guestAddon && existsSync(sources.guestAddon) ? sources.guestAddon : undefined;
  if (guestAddon) addons.push(guestAddon);
  const watched = [sources.nodeBinary, sources.agentScript, sources.sandboxBoot, ...(existsSync(TINI_STATIC) ? [TINI_STATIC] : []), ...(runAs ? [runAs] : []), ...sources.nativePackages.map((pkg) => path.join(pkg.dir, "package.json")), ...addons];
  const wanted: Manifest["sources"] = {};
  for (const file of watched) {
    const info = await stat(file);
    wanted[file] = { size: info.size, mtimeMs: info.mtimeMs };
  }

  const existing = await readFile(path.join(kitDir, "manifest.json"), "utf8").then((text) => JSON.parse(text) as Manifest, () => undefined);
  if (existing && JSON.stringify(existing.sources) === JSON.stringify(wanted)) {
    return { dir: kitDir, command: agentCommand(existing.loaderName, existing.hasInit, sources.mergeMemory ?? false) };
  }

  const started = performance.now();
  const staging = `${kitDir}.staging-${process.pid}`;
  await rm(staging, { recursive: true, force: true });
  await mkdir(path.join(staging, "lib"), { recursive: true, mode: 0o755 });

  const libraries = new Map<string, string>();
  let loaderPath: string | undefined;
  for (const binary of [sources.nodeBinary, ...addons]) {
    const listed = parseLdd((await runCommand(["ldd", binary], { timeoutMs: 10_000 })).stdout);
    for (const [name, file] of listed.libraries) libraries.set(name, file);
    loaderPath ??= listed.loader;
  }
  if (!loaderPath) throw new CubicleError("internal", `ldd ${sources.nodeBinary} names no dynamic loader; a statically linked Node cannot be injected this way`);
  const loaderName = path.basename(loaderPath);
  libraries.set(loaderName, loaderPath);
  for (const [name, file] of libraries) {
    await copyFile(await realpath(file), path.join(staging, "lib", name));
  }

  await linkOrCopy(sources.nodeBinary, path.join(staging, "node"));
  const hasInit = existsSync(TINI_STATIC);
  if (hasInit) await copyFile(TINI_STATIC, path.join(staging, "init"));
  else log.warn(`${TINI_STATIC} is missing (apt-get install tini): orphaned processes in sandboxes will not be reaped`);
  await copyFile(sources.sandboxBoot, path.join(staging, "boot"));
  await writeFile(path.join(staging, path.basename(KIT_BOOT_ID_SOURCE)), "", { mode: 0o444 });
  if (runAs) await copyFile(runAs, path.join(staging, "run-as"));
  else log.warn("the agent's run-as helper is not built (no C compiler?): commands of other users start through setpriv, ~1 ms slower");
  if (xattrAddon) await copyFile(xattrAddon, path.join(staging, "xattr.node"));
  else log.warn("the agent's xattr addon is not built (no C compiler?): file metadata is refused in sandboxes");
  if (spawnAddon) await copyFile(spawnAddon, path.join(staging, "spawn.node"));
  else log.warn("the agent's spawn addon is not built (no C compiler?): commands in sandboxes start through Node's spawn, ~5 ms slower");
  if (guestAddon) await copyFile(guestAddon, path.join(staging, "guest.node"));
  await copyFile(sources.agentScript, path.join(staging, "agent.js"));
  await copyFile(`${sources.agentScript}.map`, path.join(staging, "agent.js.map")).catch(() => {});
  for (const pkg of sources.nativePackages) {
    const target = path.join(staging, "node_modules", pkg.name);
    for (const part of pkg.include) {
      await mkdir(path.dirname(path.join(target, part)), { recursive: true });
      await cp(path.join(pkg.dir, part), path.join(target, part), { recursive: true });
    }
  }
  const manifest: Manifest = { version: 1, sources: wanted, loaderName, hasInit };
  await writeFile(path.join(staging, "manifest.json"), JSON.stringify(manifest, null, 2) + "\n");

  const retired = `${kitDir}.old-${process.pid}-${Date.now()}`;
  await rename(kitDir, retired).catch(() => {});
  await rename(staging, kitDir);
  await rm(retired, { recursive: true, force: true });
  log.info("agent kit assembled", { dir: kitDir, libraries: [...libraries.keys()], ms: Math.round(performance.now() - started) });
  return { dir: kitDir, command: agentCommand(loaderName, hasInit, sources.mergeMemory ?? false) };
}

/**
 * sandbox-boot runs first (it execs the rest, BOOT_IDENTITY_NOTE); tini then runs as PID 1 in
 * front of the agent: Node reaps only its own children, so orphans of user commands (`cmd &`)
 * would stay zombies with the agent as PID 1.
 */
function agentCommand(loaderName: string, hasInit: boolean, mergeMemory: boolean): string[] {
  const lib = `${KIT_MOUNT_POINT}/lib`;
  const node = [`${lib}/${loaderName}`, "--library-path", lib, `${KIT_MOUNT_POINT}/node`];
  const agent = [...node, ...(mergeMemory ? [AGENT_RANDOM_SEED_FLAG] : []), `${KIT_MOUNT_POINT}/agent.js`];
  return [`${KIT_MOUNT_POINT}/boot`, ...(mergeMemory ? ["--merge-memory"] : []), "--", ...(hasInit ? [`${KIT_MOUNT_POINT}/init`, "-g", "--"] : []), ...agent];
}

/**
 * AGENT_MEMORY_MERGE_NOTE: an idle agent is ~7.5 MiB of private memory (V8's heap, malloc), and
 * that memory is nearly the same in every sandbox, but not page for page: V8 places its heap at
 * random addresses, so every pointer differs. With merging on, sandbox-boot turns address
 * randomisation off and switches on kernel samepage merging (PR_SET_MEMORY_MERGE) for tini and
 * the agent, and the agent's V8 gets a fixed `--random-seed` (V8 draws its heap's addresses, and
 * its string hash seed, from it): every idle agent then lays its heap out at the same addresses,
 * and ksmd (CUBICLE_KSM, turned on by the runtime at start, ksm-host.ts) shares the identical
 * pages. Measured on 60 idle sandboxes after ~90 s: 7.9 → 3.2 MiB private per agent (PSS 8.5 → 4.1).
 * What it gives up: the agent's own address layout and hash seed are the same in every sandbox
 * (a sandbox's user is root in it and can read the agent's memory anyway; crafted colliding keys
 * slow only that sandbox's own agent), and identical pages are shared across sandboxes, which
 * is a deduplication side channel between them: hence off by default (CUBICLE_KSM). The
 * sandbox's commands never merge and get randomisation back: a command started by the spawn
 * addon shares the agent's memory until its exec and would inherit merging (the kernel keeps
 * it across exec since 6.7), so with merging on the agent starts every command through run-as
 * (spawn-addon.ts), which switches merging off and randomisation on before it execs.
 */
const AGENT_RANDOM_SEED_FLAG = "--random-seed=1";

/** The node argv of an agent command, for the agent's JS kernels: without agent-only flags. */
export function kernelNodeCommand(command: string[]): string[] {
  return command.slice(command.indexOf("--library-path") - 1, -1).filter((arg) => arg !== AGENT_RANDOM_SEED_FLAG);
}

/** Debian's statically linked tini (package `tini`), when the host has it. */
export const TINI_STATIC = "/usr/bin/tini-static";

/**
 * Reads `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` lines give libraries,
 * the line with an absolute path and no arrow is the loader; linux-vdso has no file.
 */
export function parseLdd(output: string): { libraries: Map<string, string>; loader: string | undefined } {
  const libraries = new Map<string, string>();
  let loader: string | undefined;
  for (const line of output.split("\n")) {
    const arrow = /^\s*(\S+)\s+=>\s+(\/\S+)\s+\(0x[0-9a-f]+\)/.exec(line);
    if (arrow) {
      libraries.set(arrow[1]!, arrow[2]!);
      continue;
    }
    const bare = /^\s*(\/\S+)\s+\(0x[0-9a-f]+\)/.exec(line);
    if (bare) loader = bare[1];
    else if (/=>\s+not found/.test(line)) throw new CubicleError("internal", `ldd: ${line.trim()}; install the missing library on the host`);
  }
  return { libraries, loader };
}

/** A hard link costs nothing and the kit is mounted read-only; copy across filesystems. */
async function linkOrCopy(source: string, target: string): Promise<void> {
  try {
    await link(source, target);
  } catch {
    await copyFile(source, target);
  }
}
