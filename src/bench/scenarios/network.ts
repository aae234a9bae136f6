/**
 * `./cubicle bench network`: what Cubicle's network enforcement costs (issue 14's "numbers to
 * record"), against fake hosts that exist only in a test namespace, in one run:
 *
 * 1. Connection setup (TCP connect, and connect → first byte of a small HTTP response) and bulk
 *    download throughput through each path — the kernel's forwarding from a plain namespace (the
 *    floor, network-floor.ts), a sandbox without a policy (the egress proxy splices), an
 *    allowlist by name (DNS pinning in the path), header injection (TLS interception; by name
 *    too, as the proxy injects only toward an address the sandbox's DNS pinned) and a
 *    SOCKS5 egress proxy — each as a ratio to the floor of the same scheme measured in the same
 *    rounds. The same Python client (network-client.ts) runs at both ends.
 * 2. `PUT /sandboxes/{id}/network` round trips.
 * 3. Creates with a policy vs without, paired and interleaved: claims from a full warm pool, and
 *    cold creates (a memory size no pool entry has), with a bootstrap interval of the ratio.
 *
 * The fake hosts come from the environment (bench/network.sh sets it from the fake-internet
 * harness; the server must use the fake DNS as its upstream and trust the fake CA):
 *   CUBICLE_BENCH_NET_HTTP=<name>=<address>    plain HTTP on 80, `GET /bytes/<n>`
 *   CUBICLE_BENCH_NET_HTTPS=<name>=<address>   HTTPS on 443, certificate from the fake CA
 *   CUBICLE_BENCH_NET_SOCKS=<address>:<port>   SOCKS5
 *   CUBICLE_BENCH_NET_INTERFACE=<ifname>       the host interface every fake address is routed out of
 *   CUBICLE_BENCH_NET_CA_FILE=<path>           the fake CA (PEM)
 * Nothing is sent to an address whose route the scenario has not checked first.
 */
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import type { BenchOptions } from "../options.js";
import type { ScenarioResult } from "../result.js";
import { errorMessage, round2 } from "../run-helpers.js";
import { pairedRatio, summarize, type LatencySummary } from "../stats.js";
import { callApi, loadSandboxSdk, type BenchTarget } from "../target.js";
import { firstSuccessfulCommand, waitForFullPool } from "./create.js";
import { NETWORK_CLIENT_PY, type NetworkClientReport, type NetworkClientRequest } from "./network-client.js";
import { assertHostRoute, createFloorNamespace, type FloorNamespace } from "./network-floor.js";

type SandboxClass = Awaited<ReturnType<typeof loadSandboxSdk>>;
type SandboxInstance = InstanceType<SandboxClass>;

/** Where the fake hosts are; see the file comment. */
export interface NetworkBenchHosts {
  http: { name: string; address: string };
  https: { name: string; address: string };
  socks: { address: string; port: number };
  outInterface: string;
  caFile: string;
}

const NAME = /^[a-z0-9]([a-z0-9-]{0,62}\.)+[a-z0-9-]{1,63}$/;
const IPV4 = /^(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}$/;

/** Reads and checks CUBICLE_BENCH_NET_*; throws naming the variable that is missing or wrong. */
export function networkHostsFromEnv(env: NodeJS.ProcessEnv = process.env): NetworkBenchHosts {
  const need = (key: string) => {
    const value = env[key];
    if (!value) throw new CubicleError("invalid_argument", `${key} is not set: the network benchmark needs fake hosts (run bench/network.sh, which starts them)`);
    return value;
  };
  const host = (key: string) => {
    const [name = "", address = "", ...rest] = need(key).split("=");
    if (rest.length || !NAME.test(name) || !IPV4.test(address)) throw new CubicleError("invalid_argument", `${key} must be <name>=<IPv4 address>, not ${JSON.stringify(env[key])}`);
    return { name, address };
  };
  const socksValue = need("CUBICLE_BENCH_NET_SOCKS");
  const socksMatch = /^([\d.]+):(\d{1,5})$/.exec(socksValue);
  if (!socksMatch || !IPV4.test(socksMatch[1]!) || Number(socksMatch[2]) < 1 || Number(socksMatch[2]) > 65_535) {
    throw new CubicleError("invalid_argument", `CUBICLE_BENCH_NET_SOCKS must be <IPv4 address>:<port>, not ${JSON.stringify(socksValue)}`);
  }
  const outInterface = need("CUBICLE_BENCH_NET_INTERFACE");
  if (!/^[A-Za-z0-9_.-]{1,15}$/.test(outInterface)) throw new CubicleError("invalid_argument", `CUBICLE_BENCH_NET_INTERFACE ${JSON.stringify(outInterface)} is not an interface name`);
  const caFile = need("CUBICLE_BENCH_NET_CA_FILE");
  if (!fs.existsSync(caFile)) throw new CubicleError("invalid_argument", `CUBICLE_BENCH_NET_CA_FILE ${caFile} does not exist`);
  return { http: host("CUBICLE_BENCH_NET_HTTP"), https: host("CUBICLE_BENCH_NET_HTTPS"), socks: { address: socksMatch[1]!, port: Number(socksMatch[2]) }, outInterface, caFile };
}

/** The paths measured; the floors first. */
export const NETWORK_PATHS = ["floor-http", "floor-https", "default-http", "default-https", "allowlist-http", "header-https", "socks-http"] as const;
export type NetworkPathId = (typeof NETWORK_PATHS)[number];

const PATH_LABELS: Record<NetworkPathId, string> = {
  "floor-http": "floor: direct NAT, HTTP",
  "floor-https": "floor: direct NAT, HTTPS",
  "default-http": "Cubicle default (splice), HTTP",
  "default-https": "Cubicle default (splice), HTTPS",
  "allowlist-http": "policed allowlist by name (DNS pinning), HTTP",
  "header-https": "header injection (TLS interception), HTTPS",
  "socks-http": "SOCKS5 egress proxy, HTTP",
};

/** The floor a path is compared with: the same scheme. */
export function floorOf(pathId: NetworkPathId): NetworkPathId {
  return pathId.endsWith("https") ? "floor-https" : "floor-http";
}

const SANDBOX_CLIENT = "/tmp/cbb-netclient.py";
const SANDBOX_FAKE_CA = "/tmp/cbb-fake-ca.pem";
const INJECTED_HEADER = "x-cbb-token";
const CLIENT_TIMEOUT_SEC = 20;

interface PathRun {
  round: number;
  report: NetworkClientReport;
}

/** Runs the client somewhere (the floor namespace or a sandbox) and parses its one JSON line. */
type ClientRunner = (request: NetworkClientRequest) => Promise<NetworkClientReport>;

function parseClientOutput(stdout: string): NetworkClientReport {
  const line = stdout.trim().split("\n").at(-1) ?? "";
  let parsed: NetworkClientReport;
  try {
    parsed = JSON.parse(line) as NetworkClientReport;
  } catch {
    throw new CubicleError("internal", `the network client printed no JSON: ${JSON.stringify(stdout.slice(-300))}`);
  }
  if (!Array.isArray(parsed.samples) || !Array.isArray(parsed.downloads) || !Array.isArray(parsed.errors)) throw new CubicleError("internal", "the network client's JSON lacks samples, downloads or errors");
  return parsed;
}

function shellQuote(text: string): string {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

function sandboxRunner(sandbox: SandboxInstance, timeoutMs: number): ClientRunner {
  return async function runInSandbox(request) {
    const result = await sandbox.commands.run(`/usr/bin/python3 ${SANDBOX_CLIENT} ${shellQuote(JSON.stringify(request))}`, { timeoutMs });
    return parseClientOutput(result.stdout);
  };
}

function floorRunner(floor: FloorNamespace, clientFile: string, timeoutMs: number): ClientRunner {
  return async function runInFloor(request) {
    return parseClientOutput(await floor.exec(["/usr/bin/python3", clientFile, JSON.stringify(request)], timeoutMs));
  };
}

/** Per-path figures: latencies in ms, throughput in MB/s (10^6 bytes per second). */
export interface NetworkPathSummary {
  label: string;
  connections: number;
  resolveMs?: LatencySummary;
  connectMs: LatencySummary;
  tlsMs?: LatencySummary;
  /** TCP connect start → first byte of the response (TLS handshake included). */
  ttfbMs: LatencySummary;
  downloads: number;
  downloadMBps: { median: number; min: number; max: number } | undefined;
  /** Who the fake server saw connect (the proxy's address, the SOCKS service's, the floor's NAT). */
  seenFrom: string | undefined;
  /** header-https: the fake server received the header with the secret's value. */
  headerInjected?: boolean;
  /** Ratios to the floor of the same scheme (path ÷ floor; throughput floor ÷ path, so > 1 = slower). */
  vsFloor?: { floor: NetworkPathId; connectP50: number; ttfbP50: number; throughputSlowdown: number | undefined };
  errors: number;
}

function ratio(a: number | undefined, b: number | undefined): number {
  return a !== undefined && b !== undefined && b > 0 ? Math.round((a / b) * 1000) / 1000 : NaN;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

function summarizePath(pathId: NetworkPathId, runs: PathRun[], byName: boolean, secretValue: string): Omit<NetworkPathSummary, "vsFloor"> {
  const samples = runs.flatMap((r) => r.report.samples);
  const downloads = runs.flatMap((r) => r.report.downloads);
  const rates = downloads.map((d) => d.bytes / 1e6 / d.seconds);
  const echo = runs.at(-1)?.report.lastEcho ?? undefined;
  const headers = (echo?.headers ?? {}) as Record<string, unknown>;
  return {
    label: PATH_LABELS[pathId],
    connections: samples.length,
    ...(byName ? { resolveMs: summarize(samples.map((s) => s[0])) } : {}),
    connectMs: summarize(samples.map((s) => s[1])),
    ...(pathId.endsWith("https") ? { tlsMs: summarize(samples.map((s) => s[2])) } : {}),
    ttfbMs: summarize(samples.map((s) => s[3])),
    downloads: downloads.length,
    downloadMBps: rates.length ? { median: round2(median(rates)), min: round2(Math.min(...rates)), max: round2(Math.max(...rates)) } : undefined,
    seenFrom: echo?.remoteAddress,
    ...(pathId === "header-https" ? { headerInjected: headers[INJECTED_HEADER] === secretValue } : {}),
    errors: runs.reduce((n, r) => n + r.report.errors.length, 0),
  };
}

/** Adds each path's ratios to the floor of its scheme. */
export function withFloorRatios(paths: Partial<Record<NetworkPathId, Omit<NetworkPathSummary, "vsFloor">>>): Partial<Record<NetworkPathId, NetworkPathSummary>> {
  const out: Partial<Record<NetworkPathId, NetworkPathSummary>> = {};
  for (const [id, summary] of Object.entries(paths) as [NetworkPathId, NetworkPathSummary][]) {
    const floor = paths[floorOf(id)];
    out[id] = {
      ...summary,
      vsFloor:
        id.startsWith("floor-") || !floor
          ? undefined
          : {
              floor: floorOf(id),
              connectP50: ratio(summary.connectMs.p50, floor.connectMs.p50),
              ttfbP50: ratio(summary.ttfbMs.p50, floor.ttfbMs.p50),
              throughputSlowdown: summary.downloadMBps && floor.downloadMBps ? ratio(floor.downloadMBps.median, summary.downloadMBps.median) : undefined,
            },
    };
  }
  return out;
}

interface CreateSample {
  pair: number;
  withPolicy: boolean;
  /** Position in its pair (0 or 1): the order alternates. */
  order: number;
  apiMs: number;
  firstCommandMs: number;
}

/** Cubicle's `GET /templates` entry for a template (memoryMB, to miss the pool on purpose). */
export async function templateMemoryMB(target: BenchTarget, template: string): Promise<number> {
  const { status, json } = await callApi(target, "GET", "/templates");
  if (status !== 200 || !Array.isArray(json)) throw new Error(`GET /templates answered ${status}`);
  const entry = (json as { templateID?: string; aliases?: string[]; memoryMB?: number }[]).find((t) => t.templateID === template || t.aliases?.includes(template));
  if (!entry || typeof entry.memoryMB !== "number") throw new Error(`GET /templates has no memoryMB for ${template}`);
  return entry.memoryMB;
}

export async function benchNetwork(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const hosts = networkHostsFromEnv();
  for (const address of [hosts.http.address, hosts.https.address, hosts.socks.address]) await assertHostRoute(address, hosts.outInterface);
  const Sandbox = await loadSandboxSdk(target);
  const errors: string[] = [];
  const live: SandboxInstance[] = [];
  const tempDir = fs.mkdtempSync(path.join(os.tmpdir(), "cbb-network-"));
  let floor: FloorNamespace | undefined;
  let secretId: string | undefined;
  const secretName = `cbb-bench-${process.pid}-${randomBytes(3).toString("hex")}`;
  const secretValue = `cbb-${randomBytes(18).toString("hex")}`;
  const allowlist = { denyOut: ["0.0.0.0/0"], allowOut: [hosts.http.name] };
  const create = async (opts: Parameters<SandboxClass["create"]>[1] = {}) => {
    const sandbox = await Sandbox.create(options.template, { ...opts, timeoutMs: 1_800_000 });
    live.push(sandbox);
    return sandbox;
  };
  const kill = async (sandbox: SandboxInstance) => {
    live.splice(live.indexOf(sandbox), 1);
    await sandbox.kill().catch(() => false);
  };
  try {
    // --- 1. connection setup and throughput per path ---
    const secret = await callApi(target, "POST", "/secrets", { name: secretName, value: secretValue });
    if (secret.status !== 201 && secret.status !== 200) throw new CubicleError("internal", `POST /secrets answered ${secret.status}: ${JSON.stringify(secret.json)}`);
    secretId = secret.json?.secretId ?? secret.json?.id ?? secretName;
    floor = await createFloorNamespace(hosts.outInterface, [hosts.http.address, hosts.https.address]);
    const clientFile = path.join(tempDir, "netclient.py");
    fs.writeFileSync(clientFile, NETWORK_CLIENT_PY);
    const caCopy = path.join(tempDir, "fake-ca.pem");
    fs.copyFileSync(hosts.caFile, caCopy);
    const caPem = fs.readFileSync(hosts.caFile, "utf8");

    const [open, fenced, injecting, tunneled] = await Promise.all([
      create(),
      create({ network: allowlist }),
      create({ network: { rules: { [hosts.https.name]: [{ transform: { headers: { [INJECTED_HEADER]: `\${e2b.secrets.${secretName}}` } } }] } } }),
      create({ network: { egressProxy: { address: `${hosts.socks.address}:${hosts.socks.port}` } } }),
    ]);
    for (const sandbox of [open, fenced, injecting, tunneled]) {
      await sandbox.files.write(SANDBOX_CLIENT, NETWORK_CLIENT_PY);
      await sandbox.files.write(SANDBOX_FAKE_CA, caPem);
    }
    const downloadBytes = options.downloadMiB * 1024 * 1024;
    const perRound = Math.max(1, Math.ceil(options.total / options.rounds));
    const timeoutMs = 60_000 + Math.ceil(downloadBytes / 1e6) * 1000 + perRound * 100;
    const base = { samples: perRound, warmup: options.warmup, downloads: 1, downloadBytes, timeoutSec: CLIENT_TIMEOUT_SEC };
    const httpDirect = { host: hosts.http.name, address: hosts.http.address, port: 80, tls: false };
    const httpsDirect = { host: hosts.https.name, address: hosts.https.address, port: 443, tls: true };
    const paths: Record<NetworkPathId, { run: ClientRunner; request: NetworkClientRequest }> = {
      "floor-http": { run: floorRunner(floor, clientFile, timeoutMs), request: { ...base, ...httpDirect } },
      "floor-https": { run: floorRunner(floor, clientFile, timeoutMs), request: { ...base, ...httpsDirect, caFile: caCopy } },
      "default-http": { run: sandboxRunner(open, timeoutMs), request: { ...base, ...httpDirect } },
      "default-https": { run: sandboxRunner(open, timeoutMs), request: { ...base, ...httpsDirect, caFile: SANDBOX_FAKE_CA } },
      "allowlist-http": { run: sandboxRunner(fenced, timeoutMs), request: { ...base, ...httpDirect, address: null } },
      // Trusts only the system bundle, where the agent put Cubicle's CA: the certificate is Cubicle's.
      // By name: the proxy injects a secret only toward an address the sandbox's DNS answer pinned.
      "header-https": { run: sandboxRunner(injecting, timeoutMs), request: { ...base, ...httpsDirect, address: null } },
      "socks-http": { run: sandboxRunner(tunneled, timeoutMs), request: { ...base, ...httpDirect } },
    };
    const runs = new Map<NetworkPathId, PathRun[]>(NETWORK_PATHS.map((id) => [id, []]));
    for (let round = 0; round < options.rounds; round++) {
      // The order rotates, so no path always runs first (cold) or last (after the most traffic).
      const order = NETWORK_PATHS.map((_, i) => NETWORK_PATHS[(i + round) % NETWORK_PATHS.length]!);
      for (const id of order) {
        await assertHostRoute(hosts.http.address, hosts.outInterface);
        await assertHostRoute(hosts.https.address, hosts.outInterface);
        const started = performance.now();
        const report = await paths[id].run(paths[id].request).catch((err: unknown) => {
          errors.push(`${id} round ${round}: ${errorMessage(err)}`);
          return undefined;
        });
        if (!report) continue;
        for (const message of report.errors) errors.push(`${id} round ${round}: ${message}`);
        runs.get(id)!.push({ round, report });
        if (options.progress) process.stderr.write(`network ${id} round ${round + 1}/${options.rounds}: ${report.samples.length} connections, ${report.downloads.length} downloads, ${Math.round(performance.now() - started)} ms\n`);
      }
    }
    const pathSummaries = withFloorRatios(Object.fromEntries(NETWORK_PATHS.map((id) => [id, summarizePath(id, runs.get(id)!, paths[id].request.address === null, secretValue)])));
    if (pathSummaries["header-https"]?.headerInjected === false) errors.push("header-https: the fake server did not receive the injected header with the secret's value");
    for (const id of NETWORK_PATHS) if (id !== "header-https" && JSON.stringify(runs.get(id)!.at(-1)?.report.lastEcho?.headers ?? {}).includes(secretValue)) errors.push(`${id}: the secret reached a host without a rule`);

    // --- 2. updateNetwork ---
    const updateBodies = [allowlist, { denyOut: ["0.0.0.0/0"], allowOut: [hosts.http.name, hosts.https.name] }];
    const updateMs: number[] = [];
    for (let i = 0; i < options.updates + 3; i++) {
      const t0 = performance.now();
      const res = await callApi(target, "PUT", `/sandboxes/${fenced.sandboxId}/network`, updateBodies[i % 2]);
      const ms = round2(performance.now() - t0);
      if (res.status >= 300) {
        errors.push(`PUT /sandboxes/{id}/network answered ${res.status}: ${JSON.stringify(res.json)}`);
        break;
      }
      if (i >= 3) updateMs.push(ms);
    }
    for (const sandbox of [open, fenced, injecting, tunneled]) await kill(sandbox);

    // --- 3. creates with a policy vs without ---
    const pools = (await callApi(target, "GET", "/pools")).json as Record<string, { target?: number }> | undefined;
    const pooled = Object.entries(pools ?? {}).some(([id, pool]) => (id === options.template || id.startsWith(options.template)) && Number(pool?.target ?? 0) > 0);
    const claimSamples: CreateSample[] = [];
    const createOnce = async (pair: number, order: number, withPolicy: boolean, cold: { memoryMB: number } | undefined): Promise<CreateSample> => {
      if (!cold) await waitForFullPool(target, options.template, 120_000);
      const network = withPolicy ? allowlist : undefined;
      const t0 = performance.now();
      let sandbox: SandboxInstance;
      if (cold) {
        // The SDK has no memoryMB: the REST create (a size no pool entry has), then connect.
        const res = await callApi(target, "POST", "/sandboxes", { templateID: options.template, timeout: 600, memoryMB: cold.memoryMB, ...(network ? { network } : {}) });
        if (res.status !== 201) throw new Error(`POST /sandboxes answered ${res.status}: ${JSON.stringify(res.json)}`);
        const apiMs = round2(performance.now() - t0);
        sandbox = await Sandbox.connect(res.json.sandboxID);
        live.push(sandbox);
        const first = await firstSuccessfulCommand(sandbox, t0);
        await kill(sandbox);
        return { pair, order, withPolicy, apiMs, firstCommandMs: first.ms };
      }
      sandbox = await create(network ? { network } : {});
      const apiMs = round2(performance.now() - t0);
      const first = await firstSuccessfulCommand(sandbox, t0);
      await kill(sandbox);
      return { pair, order, withPolicy, apiMs, firstCommandMs: first.ms };
    };
    const runPairs = async (count: number, cold: { memoryMB: number } | undefined, into: CreateSample[]) => {
      for (let pair = -1; pair < count; pair++) {
        // Pair -1 is a warm-up; the order alternates: without first, then with first.
        const firstWithPolicy = pair % 2 !== 0;
        try {
          const a = await createOnce(pair, 0, firstWithPolicy, cold);
          const b = await createOnce(pair, 1, !firstWithPolicy, cold);
          if (pair >= 0) into.push(a, b);
        } catch (err) {
          errors.push(`${cold ? "cold" : "claim"} create pair ${pair}: ${errorMessage(err)}`);
        }
      }
    };
    const createSummary = (samples: CreateSample[]) => {
      const pairs = [...new Set(samples.map((s) => s.pair))].filter((p) => samples.filter((s) => s.pair === p).length === 2);
      const of = (withPolicy: boolean, key: "apiMs" | "firstCommandMs") => pairs.map((p) => samples.find((s) => s.pair === p && s.withPolicy === withPolicy)![key]);
      return {
        pairs: pairs.length,
        withoutPolicy: { firstCommandMs: summarize(of(false, "firstCommandMs")), apiMs: summarize(of(false, "apiMs")) },
        withPolicy: { firstCommandMs: summarize(of(true, "firstCommandMs")), apiMs: summarize(of(true, "apiMs")) },
        firstCommandRatio: pairedRatio(of(false, "firstCommandMs"), of(true, "firstCommandMs")),
        apiRatio: pairedRatio(of(false, "apiMs"), of(true, "apiMs")),
      };
    };
    let claims: ReturnType<typeof createSummary> | { status: string; reason: string };
    if (!pooled) claims = { status: "not available", reason: `the server has no warm pool for ${options.template} (start it with CUBICLE_POOL_SIZE=${options.template}=1)` };
    else {
      await runPairs(options.createPairs, undefined, claimSamples);
      claims = createSummary(claimSamples);
    }
    const coldSamples: CreateSample[] = [];
    let cold: ReturnType<typeof createSummary> | { status: string; reason: string } | undefined;
    if (options.coldPairs > 0) {
      const memoryMB = (await templateMemoryMB(target, options.template)) + 128;
      await runPairs(options.coldPairs, { memoryMB }, coldSamples);
      cold = { ...createSummary(coldSamples), memoryMB } as ReturnType<typeof createSummary>;
    }

    return {
      status: "ok",
      samples: {
        paths: Object.fromEntries([...runs].map(([id, list]) => [id, list.map((r) => ({ round: r.round, connections: r.report.samples, downloads: r.report.downloads }))])),
        updateNetworkMs: updateMs,
        claimCreates: claimSamples,
        coldCreates: coldSamples,
      },
      errors,
      summary: {
        fakeHosts: { http: hosts.http, https: hosts.https, socks: hosts.socks, outInterface: hosts.outInterface },
        floorNamespace: { address: floor.address },
        downloadBytes,
        connectionsPerPath: perRound * options.rounds,
        rounds: options.rounds,
        paths: pathSummaries,
        updateNetworkMs: summarize(updateMs),
        createsWithPolicy: { policy: allowlist, claims, ...(cold ? { cold } : {}) },
      },
    };
  } finally {
    await Promise.all(live.splice(0).map((s) => s.kill().catch(() => false)));
    if (secretId) await callApi(target, "DELETE", `/secrets/${encodeURIComponent(secretId)}`).catch(() => undefined);
    await floor?.close();
    fs.rmSync(tempDir, { recursive: true, force: true });
  }
}
