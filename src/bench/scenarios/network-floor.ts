/**
 * The network benchmark's floor: a plain network namespace with a veth to the host and the
 * kernel's forwarding and masquerade, no Cubicle in the path. What a sandbox's traffic costs is
 * read as a ratio to what this namespace's traffic costs in the same run.
 *
 * Layout: namespace `cbb-floor-<hex>`, host veth `vcbb<hex>` ↔ its `eth0` (not `cb…`: Cubicle's
 * nftables rules treat every `cb*` interface as a sandbox's and redirect its TCP to the proxy), a /30 of its own in
 * 198.51.100.0/24 (RFC 5737 TEST-NET-2; claimed by adding its route, which fails when another
 * instance holds it), default route via the host end, and an nftables table `ip cbb_floor_<hex>`
 * that masquerades its traffic out of the one interface the fake hosts are routed through.
 * Every instance is written to /run/cbb-floor/ so a run that dies is swept by the next one.
 */
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { createLogger } from "../../shared/log.js";
import { processIsAlive } from "../../shared/process.js";

const log = createLogger("bench-floor");
const STATE_DIR = "/run/cbb-floor";
const COMMAND_TIMEOUT_MS = 15_000;
const BLOCK_BASE = "198.51.100";

interface FloorState {
  ownerPid: number;
  namespace: string;
  hostInterface: string;
  table: string;
}

export interface FloorNamespace {
  namespace: string;
  /** The namespace's own address (its traffic leaves the host masqueraded). */
  address: string;
  /** Runs argv inside the namespace (`ip netns exec`). */
  exec(argv: string[], timeoutMs: number): Promise<string>;
  close(): Promise<void>;
}

const live = new Map<string, FloorState>();

/**
 * Makes the floor namespace. `targets` are the only addresses it will be used for: each must
 * be routed by the host out of `outInterface`, and by the namespace through its own veth.
 */
export async function createFloorNamespace(outInterface: string, targets: string[]): Promise<FloorNamespace> {
  sweepStaleFloors();
  installExitCleanup();
  if (!/^[A-Za-z0-9_.-]{1,15}$/.test(outInterface)) throw new CubicleError("invalid_argument", `${JSON.stringify(outInterface)} is not an interface name`);
  for (const address of targets) await assertHostRoute(address, outInterface);
  const hex = randomBytes(4).toString("hex");
  const state: FloorState = { ownerPid: process.pid, namespace: `cbb-floor-${hex}`, hostInterface: `vcbb${hex}`, table: `cbb_floor_${hex}` };
  writeState(state);
  live.set(state.namespace, state);
  const close = async () => {
    await removeFloor(state);
    live.delete(state.namespace);
  };
  try {
    await ip(["netns", "add", state.namespace]);
    await ip(["link", "add", state.hostInterface, "type", "veth", "peer", "name", "eth0", "netns", state.namespace]);
    await ip(["link", "set", state.hostInterface, "up"]);
    const block = await claimBlock(state.hostInterface);
    const hostAddress = `${BLOCK_BASE}.${block + 1}`;
    const address = `${BLOCK_BASE}.${block + 2}`;
    await ip(["addr", "add", `${hostAddress}/30`, "dev", state.hostInterface, "noprefixroute"]);
    for (const argv of [["link", "set", "lo", "up"], ["addr", "add", `${address}/30`, "dev", "eth0"], ["link", "set", "eth0", "up"], ["route", "add", "default", "via", hostAddress]]) {
      await ip(["-n", state.namespace, ...argv]);
    }
    const ruleset = `table ip ${state.table} {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr ${BLOCK_BASE}.${block}/30 oifname "${outInterface}" masquerade
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    ip saddr ${BLOCK_BASE}.${block}/30 oifname != "${outInterface}" drop
  }
}
`;
    await runCommand(["nft", "-f", "-"], { input: ruleset, timeoutMs: COMMAND_TIMEOUT_MS });
    for (const target of targets) await assertNamespaceRoute(state.namespace, target, hostAddress);
    return {
      namespace: state.namespace,
      address,
      async exec(argv, timeoutMs) {
        for (const target of targets) await assertHostRoute(target, outInterface);
        const result = await runCommand(["ip", "netns", "exec", state.namespace, ...argv], { timeoutMs });
        return result.stdout;
      },
      close,
    };
  } catch (err) {
    await close().catch((cleanupErr) => log.warn("floor cleanup after a failed start failed", { error: String(cleanupErr) }));
    throw CubicleError.from(err);
  }
}

async function ip(args: string[]): Promise<void> {
  await runCommand(["ip", ...args], { timeoutMs: COMMAND_TIMEOUT_MS });
}

/** A /30 in 198.51.100.0/24 no route on this host touches; claimed by adding its route. */
async function claimBlock(hostInterface: string): Promise<number> {
  for (let block = 4; block < 256; block += 4) {
    const cidr = `${BLOCK_BASE}.${block}/30`;
    const { stdout } = await runCommand(["ip", "-j", "route", "get", `${BLOCK_BASE}.${block + 2}`], { timeoutMs: COMMAND_TIMEOUT_MS, allowFailure: true });
    const route = (JSON.parse(stdout || "[]") as { dst?: string; dev?: string; gateway?: string; type?: string }[])[0];
    // Only a block the host would send to its default route is free (nothing more specific).
    const { stdout: defaults } = await runCommand(["ip", "-j", "route", "show", "default"], { timeoutMs: COMMAND_TIMEOUT_MS });
    const defaultRoute = (JSON.parse(defaults || "[]") as { dev?: string; gateway?: string }[])[0];
    if (route && defaultRoute && (route.dev !== defaultRoute.dev || route.gateway !== defaultRoute.gateway)) continue;
    const added = await runCommand(["ip", "route", "add", cidr, "dev", hostInterface], { timeoutMs: COMMAND_TIMEOUT_MS, allowFailure: true });
    if (added.exitCode === 0) return block;
    if (!/File exists/i.test(added.stderr)) throw new CubicleError("internal", `ip route add ${cidr}: ${added.stderr.trim()}`);
  }
  throw new CubicleError("resource_exhausted", `no free /30 left in ${BLOCK_BASE}.0/24 for the floor namespace`);
}

/** Throws unless the host routes `address` out of `outInterface` (and it is a plain IPv4 unicast). */
export async function assertHostRoute(address: string, outInterface: string): Promise<void> {
  if (!net.isIPv4(address)) throw new CubicleError("invalid_argument", `${JSON.stringify(address)} is not an IPv4 address`);
  const { stdout } = await runCommand(["ip", "-j", "route", "get", address], { timeoutMs: COMMAND_TIMEOUT_MS });
  const route = (JSON.parse(stdout) as { dev?: string; type?: string }[])[0];
  if (!route || route.dev !== outInterface || (route.type !== undefined && route.type !== "unicast")) {
    throw new CubicleError("failed_precondition", `${address} is routed ${route ? `out of ${route.dev ?? "(none)"}` : "nowhere"}, not out of ${outInterface}: refusing to send to it`);
  }
}

async function assertNamespaceRoute(namespace: string, address: string, gateway: string): Promise<void> {
  const { stdout } = await runCommand(["ip", "-n", namespace, "-j", "route", "get", address], { timeoutMs: COMMAND_TIMEOUT_MS });
  const route = (JSON.parse(stdout) as { dev?: string; gateway?: string }[])[0];
  if (!route || route.dev !== "eth0" || route.gateway !== gateway) {
    throw new CubicleError("failed_precondition", `${address} is not routed through the floor namespace's veth (${JSON.stringify(route)}): refusing to send to it`);
  }
}

// --- cleanup -----------------------------------------------------------------------------------

function writeState(state: FloorState): void {
  fs.mkdirSync(STATE_DIR, { recursive: true });
  fs.writeFileSync(path.join(STATE_DIR, `${state.namespace}.json`), JSON.stringify(state));
}

async function removeFloor(state: FloorState): Promise<void> {
  // Removing the host end of the veth removes its peer and the block's route.
  await runCommand(["ip", "link", "del", state.hostInterface], { allowFailure: true, timeoutMs: COMMAND_TIMEOUT_MS });
  await runCommand(["ip", "netns", "del", state.namespace], { allowFailure: true, timeoutMs: COMMAND_TIMEOUT_MS });
  await runCommand(["nft", "delete", "table", "ip", state.table], { allowFailure: true, timeoutMs: COMMAND_TIMEOUT_MS });
  fs.rmSync(path.join(STATE_DIR, `${state.namespace}.json`), { force: true });
}

function removeFloorSync(state: FloorState): void {
  for (const argv of [["ip", "link", "del", state.hostInterface], ["ip", "netns", "del", state.namespace], ["nft", "delete", "table", "ip", state.table]]) {
    try {
      execFileSync(argv[0]!, argv.slice(1), { stdio: "ignore", timeout: COMMAND_TIMEOUT_MS });
    } catch {
      // already gone
    }
  }
  fs.rmSync(path.join(STATE_DIR, `${state.namespace}.json`), { force: true });
}

/** Removes floors whose benchmark process died without closing them. */
function sweepStaleFloors(): void {
  let files: string[];
  try {
    files = fs.readdirSync(STATE_DIR).filter((file) => /^cbb-floor-[0-9a-f]{8}\.json$/.test(file));
  } catch {
    return;
  }
  for (const file of files) {
    try {
      const state = JSON.parse(fs.readFileSync(path.join(STATE_DIR, file), "utf8")) as FloorState;
      if (state.ownerPid === process.pid || processIsAlive(state.ownerPid)) continue;
      if (!/^cbb-floor-[0-9a-f]{8}$/.test(state.namespace) || !/^vcbb[0-9a-f]{8}$/.test(state.hostInterface) || !/^cbb_floor_[0-9a-f]{8}$/.test(state.table)) continue;
      log.warn("removing a floor namespace a dead benchmark left behind", { namespace: state.namespace, ownerPid: state.ownerPid });
      removeFloorSync(state);
    } catch (err) {
      log.warn("could not read a floor state file", { file, error: String(err) });
    }
  }
}

let exitCleanupInstalled = false;

function installExitCleanup(): void {
  if (exitCleanupInstalled) return;
  exitCleanupInstalled = true;
  process.on("exit", () => {
    for (const state of live.values()) removeFloorSync(state);
    live.clear();
  });
}
