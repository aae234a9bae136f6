import { createHash } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";

/** The checkout this code runs from (source under src/ or the bundle under dist/). */
function repositoryRoot(): string {
  let dir = path.dirname(new URL(import.meta.url).pathname);
  while (!fs.existsSync(path.join(dir, "package.json")) && path.dirname(dir) !== dir) dir = path.dirname(dir);
  return dir;
}

/** Where the built helpers live when the configuration does not say (CUBICLE_DIST_DIR). */
export function defaultDistDir(env: NodeJS.ProcessEnv = process.env): string {
  return path.resolve(env.CUBICLE_DIST_DIR ?? path.join(repositoryRoot(), "dist"));
}

/** Server configuration, read from the environment with defaults (README lists them). */
export interface CubicleConfig {
  host: string;
  port: number;
  stateDir: string;
  /** Where template rootfs trees are cached; shared between state dirs (tests) to avoid rebuilds. */
  templateDir: string;
  /**
   * Where earlier versions kept the records of templates made through the template-build API,
   * as files; they move into the store at start (TEMPLATE_RECORDS_NOTE).
   */
  builtTemplateDir: string;
  domain: string;
  /** Fixed API key, or undefined to generate one on first start and keep it in the state dir. */
  apiKey: string | undefined;
  /** IPv4 pool sandboxes take their /30 from, e.g. 10.88.0.0/16. */
  subnet: string;
  /** Directory holding the bundled agent and the kit injected into sandboxes. */
  distDir: string;
  /** runc binary. */
  runcPath: string;
  /** Default sandbox lifetime when a create sends none (v2 semantics). */
  defaultTimeoutSec: number;
  /** Templates prepared before the server reports ready. */
  defaultTemplates: string[];
  /** Name of the nftables table this server owns (one per server on a host). */
  nftTable: string;
  /** Warm pool size per template id or alias (CUBICLE_POOL_SIZE, e.g. `base=2,code-interpreter-v1=1`). */
  poolSizes: Record<string, number>;
  /** Seconds a paused sandbox stays frozen in RAM before it is checkpointed to disk. */
  durablePauseAfterSec: number;
  /**
   * Milliseconds after a pause at which the frozen sandbox's memory and files are also written to
   * disk, while it stays frozen in RAM (CUBICLE_PAUSE_IMAGE_AFTER_MS): a host reboot then finds a
   * durable pause instead of a lost sandbox. The delay keeps quick pause/resume cycles free of a
   * dump. Negative = never (a reboot within durablePauseAfterSec loses hot-paused sandboxes).
   */
  pauseImageAfterMs: number;
  /**
   * Seconds a running sandbox may go without traffic, an open stream, a running command or CPU
   * use before it is frozen in RAM (CUBICLE_IDLE_FREEZE_SECONDS, default 300; 0 = never). It
   * stays `running` for its user and wakes on the next request (getInfo shows `cubicleIdle`).
   */
  idleFreezeAfterSec: number;
  /**
   * Seconds frozen for idleness after which its memory goes to disk and is released
   * (CUBICLE_IDLE_DISK_SECONDS, counted from the freeze; default 1800; 0 = never).
   */
  idleDiskAfterSec: number;
  /**
   * Templates whose creates without a pool entry restore a warm snapshot (agent and kernel
   * started) instead of booting (CUBICLE_WARM_SNAPSHOT, comma-separated, e.g.
   * `code-interpreter-v1`, the default; empty or `none` = off). The agent reseeds Python's
   * `random` in a restored kernel and keeps IPython's history in memory, so restores share
   * neither.
   */
  warmSnapshotTemplates: string[];
  /**
   * What sandboxes must reach on the host (their bundles, the agent kit) lives here, outside the
   * state directory (which is 0700): `<runDir>/pool` is the storage pool's mount point
   * (STORAGE_POOL_NOTE), `<runDir>/kit` the kit. Default /run/cubicle/<hash of stateDir>.
   */
  runDir: string;
  /** Size of the storage pool's image file when it is first made; undefined = from free space. */
  storageBytes: number | undefined;
  /** The server-wide budget for snapshots and pause images; undefined = half the pool. */
  imageBudgetBytes: number | undefined;
  /** A new volume's quota when its create names none (CUBICLE_VOLUME_SIZE_MB; default 1024). */
  volumeSizeMB: number;
  /** At most this many volumes (CUBICLE_MAX_VOLUMES; default 256): each holds a loop device while it exists. */
  maxVolumes: number;
  /** Host directories under which codebases may be registered (CUBICLE_CODEBASE_ROOTS, comma-separated; default none). */
  codebaseRoots: string[];
  /** Most vCPUs one create may ask for (CUBICLE_MAX_CPU_COUNT; default: the host's cores). */
  maxCpuCount: number;
  /** Most memory in MiB one create may ask for (CUBICLE_MAX_MEMORY_MB; default: host memory − 1 GiB, at least 512). */
  maxMemoryMB: number;
  /** Largest disk in MiB one create may ask for (CUBICLE_MAX_DISK_MB; default 65536). */
  maxDiskMB: number;
  /**
   * Refuse creates of sandboxes without an envd access token (CUBICLE_REQUIRE_SECURE, default
   * true): anyone who knows an insecure sandbox's id can control it through the router.
   */
  requireSecure: boolean;
  /** Sandbox starts that run at once (CUBICLE_MAX_STARTING; default two per core, ADMISSION_NOTE). */
  maxStarting: number;
  /** Creates that may wait for a start slot before more are refused with 429 (CUBICLE_MAX_WAITING_CREATES). */
  maxWaitingCreates: number;
  /** Below this much available host memory (MiB) creates are refused with 503 (CUBICLE_MIN_AVAILABLE_MB). */
  minAvailableMB: number;
  /**
   * Port of the HTTPS listener that serves what the API port serves (CUBICLE_HTTPS_PORT; default
   * 443 when running as root, else off; `0` or `off` = off); undefined = no HTTPS listener.
   */
  httpsPort: number | undefined;
  /**
   * Kernel samepage merging for the sandboxes' agents (CUBICLE_KSM, default off;
   * AGENT_MEMORY_MERGE_NOTE in src/runtime/container/agent-kit.ts).
   */
  ksm: boolean;
  /** How container checkpoints reach CRIU (CUBICLE_CHECKPOINT_VIA): its RPC from the resident helper (default), or `runc checkpoint` (CRIU_RPC_NOTE). */
  checkpointVia: "rpc" | "runc";
  /**
   * The operator's own certificate and key for the HTTPS listener (CUBICLE_TLS_CERT and
   * CUBICLE_TLS_KEY, PEM files, both or neither); undefined = a wildcard for `*.<domain>` and
   * `<domain>` from Cubicle's CA (`<stateDir>/ca`).
   */
  tlsCertFile: string | undefined;
  tlsKeyFile: string | undefined;
  /**
   * Resolvers sandbox DNS is forwarded to (CUBICLE_DNS_UPSTREAM, comma-separated `address[:port]`);
   * undefined = the nameservers of the host's /etc/resolv.conf.
   */
  dnsUpstreams: { address: string; port: number }[] | undefined;
  /** Private ranges sandboxes may reach (CUBICLE_EGRESS_PRIVATE_ALLOW, comma-separated CIDRs); all others are denied. */
  egressPrivateAllow: string[];
  /**
   * PEM files of CAs the egress proxy trusts, besides Node's roots, for the upstream side of a
   * connection it injects headers into (CUBICLE_EGRESS_CA_FILE, comma-separated).
   */
  egressCaFiles: string[];
  /**
   * Where builds pull `fromImage` images (CUBICLE_REGISTRY_MIRROR: a mirror for Docker Hub
   * images; CUBICLE_INSECURE_REGISTRIES: hosts reached over plain http, loopback always is;
   * CUBICLE_REGISTRY_AUTH_FILE: a JSON file `{"host[:port]": {"username", "password"}}`, read
   * when a build needs it, its contents never logged; CUBICLE_ECR_ENDPOINT: the ECR API that
   * `fromAWSRegistry` builds get their registry token from, default the region's).
   */
  registry: { mirror?: string; insecure: string[]; authFile?: string; ecrEndpoint?: string };
  /** Whether build sandboxes reach the internet (CUBICLE_BUILD_INTERNET, default on: RUN steps install packages). */
  buildInternet: boolean;
  /**
   * The microVM runtime (CUBICLE_MICROVM): `off` (default), `tcg` (QEMU's emulator: works on any
   * host, slowly) or `kvm` (a host where a guest really boots on KVM). Creates ask for it with
   * `runtime: "microvm"`; containers stay the default.
   */
  microvm: "off" | "tcg" | "kvm";
  /**
   * QEMUs started ahead per snapshot or warm image, waiting for its state (CUBICLE_MICROVM_SPARES,
   * default 1; 0 = none): SPARE_QEMU_NOTE in src/runtime/microvm/spare-qemus.ts.
   */
  microvmSpares: number;
  /**
   * Default rate limits per template id or alias (CUBICLE_TEMPLATE_BANDWIDTH, e.g.
   * `base=20/50,code-interpreter-v1=/100`: egress/ingress Mbit/s, an empty side unlimited); a
   * create's `network.bandwidth` overrides them. Off unless set.
   */
  templateBandwidth: Record<string, { egressMbps?: number; ingressMbps?: number }>;
  /**
   * The runtime per template id or alias (CUBICLE_TEMPLATE_RUNTIME, e.g.
   * `code-interpreter-v1=microvm`): its sandboxes run there unless a create names a runtime.
   * Templates not named run in containers.
   */
  templateRuntime: Record<string, "container" | "microvm">;
}

/** CUBICLE_TEMPLATE_RUNTIME: `<template>=container|microvm` pairs, comma-separated. */
export function parseTemplateRuntime(raw: string | undefined): Record<string, "container" | "microvm"> {
  const runtimes: Record<string, "container" | "microvm"> = {};
  if (raw === undefined || raw.trim() === "") return runtimes;
  for (const part of raw.split(",")) {
    const match = /^([A-Za-z0-9][A-Za-z0-9_.:-]{0,127})=(container|microvm)$/.exec(part.trim());
    if (!match) throw new Error(`CUBICLE_TEMPLATE_RUNTIME: "${part.trim()}" is not <template>=container or <template>=microvm`);
    runtimes[match[1]!] = match[2] as "container" | "microvm";
  }
  return runtimes;
}

/** CUBICLE_TEMPLATE_BANDWIDTH: `<template>=<egress>/<ingress>` Mbit/s pairs, comma-separated. */
export function parseTemplateBandwidth(raw: string | undefined): Record<string, { egressMbps?: number; ingressMbps?: number }> {
  const limits: Record<string, { egressMbps?: number; ingressMbps?: number }> = {};
  if (raw === undefined || raw.trim() === "") return limits;
  for (const part of raw.split(",")) {
    const match = /^([A-Za-z0-9][A-Za-z0-9_.:-]{0,127})=(\d+(?:\.\d+)?)?\/(\d+(?:\.\d+)?)?$/.exec(part.trim());
    if (!match || (match[2] === undefined && match[3] === undefined)) throw new Error(`CUBICLE_TEMPLATE_BANDWIDTH: "${part.trim()}" is not <template>=<egress Mbit/s>/<ingress Mbit/s> (one side may be empty)`);
    const entry: { egressMbps?: number; ingressMbps?: number } = {};
    for (const [key, value] of [["egressMbps", match[2]], ["ingressMbps", match[3]]] as const) {
      if (value === undefined) continue;
      const mbps = Number(value);
      if (!(mbps >= 0.1 && mbps <= 100_000)) throw new Error(`CUBICLE_TEMPLATE_BANDWIDTH: ${key} ${value} of ${match[1]} must be 0.1–100000 Mbit/s`);
      entry[key] = mbps;
    }
    limits[match[1]!] = entry;
  }
  return limits;
}

/** CUBICLE_DNS_UPSTREAM: `address[:port]` IPv4 resolvers, comma-separated. */
export function parseDnsUpstreams(raw: string | undefined): { address: string; port: number }[] | undefined {
  if (raw === undefined || raw.trim() === "") return undefined;
  return raw.split(",").map((part) => {
    const match = /^(\d{1,3}(?:\.\d{1,3}){3})(?::(\d{1,5}))?$/.exec(part.trim());
    const port = match?.[2] === undefined ? 53 : Number(match[2]);
    if (!match || !net.isIPv4(match[1]!) || port < 1 || port > 65535) throw new Error(`CUBICLE_DNS_UPSTREAM: "${part.trim()}" is not an IPv4 address with an optional :port`);
    return { address: match[1]!, port };
  });
}

/** CUBICLE_EGRESS_CA_FILE: readable PEM files, comma-separated (a missing one stops the start, named). */
export function parseCaFiles(raw: string | undefined): string[] {
  const files = (raw ?? "").split(",").map((s) => s.trim()).filter(Boolean).map((file) => path.resolve(file));
  for (const file of files) {
    let text: string;
    try {
      text = fs.readFileSync(file, "utf8");
    } catch (err) {
      throw new Error(`CUBICLE_EGRESS_CA_FILE: cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
    }
    if (!text.includes("-----BEGIN CERTIFICATE-----")) throw new Error(`CUBICLE_EGRESS_CA_FILE: ${file} holds no PEM certificate`);
  }
  return files;
}

/** CUBICLE_EGRESS_PRIVATE_ALLOW: IPv4 CIDRs inside the private ranges that sandboxes may reach. */
export function parsePrivateAllow(raw: string | undefined): string[] {
  if (raw === undefined || raw.trim() === "") return [];
  return raw.split(",").map((part) => {
    const match = /^(\d{1,3}(?:\.\d{1,3}){3})\/(\d{1,2})$/.exec(part.trim());
    if (!match || !net.isIPv4(match[1]!) || Number(match[2]) > 32) throw new Error(`CUBICLE_EGRESS_PRIVATE_ALLOW: "${part.trim()}" is not an IPv4 CIDR like 192.168.10.0/24`);
    return part.trim();
  });
}

/** CUBICLE_HTTPS_PORT: a port, or `0`/`off` for none; unset = 443 for root (who may bind it), else none. */
export function parseHttpsPort(raw: string | undefined, isRoot: boolean): number | undefined {
  if (raw === undefined || raw.trim() === "") return isRoot ? 443 : undefined;
  const value = raw.trim().toLowerCase();
  if (value === "off" || value === "0") return undefined;
  if (!/^\d{1,5}$/.test(value) || Number(value) > 65535) throw new Error(`CUBICLE_HTTPS_PORT: "${raw}" is not a port (1-65535) or off`);
  return Number(value);
}

/** CUBICLE_TLS_CERT / CUBICLE_TLS_KEY: both or neither. */
function parseTlsFiles(cert: string | undefined, key: string | undefined): { tlsCertFile: string | undefined; tlsKeyFile: string | undefined } {
  const tlsCertFile = cert?.trim() ? path.resolve(cert.trim()) : undefined;
  const tlsKeyFile = key?.trim() ? path.resolve(key.trim()) : undefined;
  if ((tlsCertFile === undefined) !== (tlsKeyFile === undefined)) throw new Error("CUBICLE_TLS_CERT and CUBICLE_TLS_KEY go together: set both (your certificate and its key) or neither (Cubicle's CA issues one)");
  return { tlsCertFile, tlsKeyFile };
}

/** The default runDir of a state directory (one per server on a host). */
export function defaultRunDir(stateDir: string): string {
  return path.join("/run/cubicle", createHash("sha256").update(path.resolve(stateDir)).digest("hex").slice(0, 12));
}

/** A size in GiB from the environment (decimals allowed), as bytes; undefined when unset. */
function parseGibibytes(name: string, raw: string | undefined): number | undefined {
  if (raw === undefined || raw.trim() === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || value <= 0) throw new Error(`${name}: "${raw}" is not a positive number of GiB`);
  return Math.floor(value * 1024 ** 3);
}

/**
 * The least a create may ask for (below these a sandbox does not start its agent or hold a
 * template's files); a configured maximum below them is a configuration error.
 */
export const RESOURCE_FLOORS = { cpuCount: 1, memoryMB: 128, diskMB: 256 } as const;

/** A whole number from the environment, at least `min`; `fallback` when unset or empty. */
function parseWholeNumber(name: string, raw: string | undefined, fallback: number, min: number): number {
  if (raw === undefined || raw.trim() === "") return fallback;
  if (!/^\d+$/.test(raw.trim())) throw new Error(`${name}: "${raw}" is not a whole number`);
  const value = Number(raw.trim());
  if (!Number.isSafeInteger(value)) throw new Error(`${name}: ${raw.trim()} is too large`);
  if (value < min) throw new Error(`${name}: ${value} is below the least a sandbox can have (${min})`);
  return value;
}

/** true/false (also 1/0, yes/no, on/off) from the environment; `fallback` when unset or empty. */
/** Spare QEMUs per image: each holds a QEMU process and its memory while it waits. */
function parseSpares(raw: string | undefined): number {
  const value = parseWholeNumber("CUBICLE_MICROVM_SPARES", raw, 1, 0);
  if (value > 16) throw new Error(`CUBICLE_MICROVM_SPARES: ${value} is more than 16 QEMUs waiting per image`);
  return value;
}

function parseMicrovm(raw: string | undefined): "off" | "tcg" | "kvm" {
  const value = (raw ?? "").trim().toLowerCase();
  if (value === "" || value === "off") return "off";
  if (value === "tcg" || value === "kvm") return value;
  throw new Error(`CUBICLE_MICROVM: ${JSON.stringify(raw)} is not off, tcg or kvm`);
}

function parseCheckpointVia(raw: string | undefined): "rpc" | "runc" {
  const value = raw?.trim().toLowerCase() ?? "";
  if (value === "" || value === "rpc") return "rpc";
  if (value === "runc") return "runc";
  throw new Error(`CUBICLE_CHECKPOINT_VIA: "${raw}" is not rpc or runc`);
}

/** An http(s) URL with nothing but a scheme, a host and a port (an API's base). */
function parseHttpUrl(name: string, raw: string): string {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new Error(`${name}: "${raw}" is not a URL`);
  }
  if ((url.protocol !== "https:" && url.protocol !== "http:") || url.username || url.password || url.search || url.hash || (url.pathname !== "/" && url.pathname !== "")) {
    throw new Error(`${name}: "${raw}" must be http(s)://host[:port], nothing more`);
  }
  return url.origin;
}

function parseBoolean(name: string, raw: string | undefined, fallback: boolean): boolean {
  if (raw === undefined || raw.trim() === "") return fallback;
  const value = raw.trim().toLowerCase();
  if (["1", "true", "yes", "on"].includes(value)) return true;
  if (["0", "false", "no", "off"].includes(value)) return false;
  throw new Error(`${name}: "${raw}" is not true or false`);
}

/** The default memory ceiling: the host's memory less 1 GiB for the host itself, at least 512 MiB. */
export function defaultMaxMemoryMB(totalBytes = os.totalmem()): number {
  return Math.max(512, Math.floor(totalBytes / (1024 * 1024)) - 1024);
}

/** Parses `base=2,code-interpreter-v1=1`; an empty string means no pools. */
export function parsePoolSizes(raw: string): Record<string, number> {
  const sizes: Record<string, number> = {};
  for (const part of raw.split(",").map((s) => s.trim()).filter(Boolean)) {
    const match = /^([A-Za-z0-9][A-Za-z0-9._:-]*)=(\d{1,4})$/.exec(part);
    if (!match) throw new Error(`CUBICLE_POOL_SIZE: "${part}" is not <template>=<count>`);
    sizes[match[1]!] = Number(match[2]);
  }
  return sizes;
}

/** Whole seconds from the environment, 0 = off, at most 30 days; `fallback` when unset or empty. */
export function parseSeconds(name: string, raw: string | undefined, fallback: number): number {
  if (raw === undefined || raw.trim() === "") return fallback;
  if (!/^\d+$/.test(raw.trim())) throw new Error(`${name}: "${raw}" is not a whole number of seconds (0 = off)`);
  const value = Number(raw.trim());
  if (value > 30 * 24 * 3600) throw new Error(`${name}: ${value} s is more than 30 days; use 0 to turn it off`);
  return value;
}

/** An integer number of milliseconds from the environment (negative allowed: "never"). */
function parseMilliseconds(name: string, raw: string): number {
  if (!/^-?\d+$/.test(raw.trim())) throw new Error(`${name}: "${raw}" is not a whole number of milliseconds`);
  return Number(raw);
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): CubicleConfig {
  const stateDir = path.resolve(env.CUBICLE_STATE_DIR ?? "/var/lib/cubicle");
  return {
    host: env.CUBICLE_HOST ?? "127.0.0.1",
    port: Number(env.CUBICLE_PORT ?? 3000),
    stateDir,
    templateDir: path.resolve(env.CUBICLE_TEMPLATE_DIR ?? path.join(stateDir, "templates")),
    builtTemplateDir: path.join(stateDir, "built-templates"),
    domain: env.CUBICLE_DOMAIN ?? "cubicle.localhost",
    apiKey: env.CUBICLE_API_KEY || undefined,
    subnet: env.CUBICLE_SUBNET ?? "10.88.0.0/16",
    distDir: defaultDistDir(env),
    runcPath: env.CUBICLE_RUNC ?? "runc",
    defaultTimeoutSec: Number(env.CUBICLE_DEFAULT_TIMEOUT_SEC ?? 300),
    defaultTemplates: (env.CUBICLE_DEFAULT_TEMPLATES ?? "base,code-interpreter-v1").split(",").map((s) => s.trim()).filter(Boolean),
    nftTable: env.CUBICLE_NFT_TABLE ?? "cubicle",
    poolSizes: parsePoolSizes(env.CUBICLE_POOL_SIZE ?? "base=2"),
    durablePauseAfterSec: Number(env.CUBICLE_DURABLE_PAUSE_AFTER_SEC ?? 60),
    pauseImageAfterMs: parseMilliseconds("CUBICLE_PAUSE_IMAGE_AFTER_MS", env.CUBICLE_PAUSE_IMAGE_AFTER_MS ?? "1000"),
    idleFreezeAfterSec: parseSeconds("CUBICLE_IDLE_FREEZE_SECONDS", env.CUBICLE_IDLE_FREEZE_SECONDS, 300),
    idleDiskAfterSec: parseSeconds("CUBICLE_IDLE_DISK_SECONDS", env.CUBICLE_IDLE_DISK_SECONDS, 1800),
    warmSnapshotTemplates: (env.CUBICLE_WARM_SNAPSHOT ?? "code-interpreter-v1")
      .split(",")
      .map((s) => s.trim())
      .filter((s) => s && s !== "none"),
    runDir: path.resolve(env.CUBICLE_RUN_DIR ?? defaultRunDir(stateDir)),
    storageBytes: parseGibibytes("CUBICLE_STORAGE_GB", env.CUBICLE_STORAGE_GB),
    imageBudgetBytes: parseGibibytes("CUBICLE_IMAGE_BUDGET_GB", env.CUBICLE_IMAGE_BUDGET_GB),
    volumeSizeMB: parseWholeNumber("CUBICLE_VOLUME_SIZE_MB", env.CUBICLE_VOLUME_SIZE_MB, 1024, 1),
    maxVolumes: parseWholeNumber("CUBICLE_MAX_VOLUMES", env.CUBICLE_MAX_VOLUMES, 256, 1),
    codebaseRoots: (env.CUBICLE_CODEBASE_ROOTS ?? "")
      .split(",")
      .map((root) => root.trim())
      .filter(Boolean)
      .map((root) => path.resolve(root)),
    maxCpuCount: parseWholeNumber("CUBICLE_MAX_CPU_COUNT", env.CUBICLE_MAX_CPU_COUNT, os.availableParallelism(), RESOURCE_FLOORS.cpuCount),
    maxMemoryMB: parseWholeNumber("CUBICLE_MAX_MEMORY_MB", env.CUBICLE_MAX_MEMORY_MB, defaultMaxMemoryMB(), RESOURCE_FLOORS.memoryMB),
    maxDiskMB: parseWholeNumber("CUBICLE_MAX_DISK_MB", env.CUBICLE_MAX_DISK_MB, 65536, RESOURCE_FLOORS.diskMB),
    requireSecure: parseBoolean("CUBICLE_REQUIRE_SECURE", env.CUBICLE_REQUIRE_SECURE, true),
    maxStarting: parseWholeNumber("CUBICLE_MAX_STARTING", env.CUBICLE_MAX_STARTING, Math.max(2, os.availableParallelism() * 2), 1),
    maxWaitingCreates: parseWholeNumber("CUBICLE_MAX_WAITING_CREATES", env.CUBICLE_MAX_WAITING_CREATES, 500, 0),
    minAvailableMB: parseWholeNumber("CUBICLE_MIN_AVAILABLE_MB", env.CUBICLE_MIN_AVAILABLE_MB, 256, 0),
    httpsPort: parseHttpsPort(env.CUBICLE_HTTPS_PORT, process.getuid?.() === 0),
    ksm: parseBoolean("CUBICLE_KSM", env.CUBICLE_KSM, false),
    checkpointVia: parseCheckpointVia(env.CUBICLE_CHECKPOINT_VIA),
    ...parseTlsFiles(env.CUBICLE_TLS_CERT, env.CUBICLE_TLS_KEY),
    dnsUpstreams: parseDnsUpstreams(env.CUBICLE_DNS_UPSTREAM),
    egressPrivateAllow: parsePrivateAllow(env.CUBICLE_EGRESS_PRIVATE_ALLOW),
    templateBandwidth: parseTemplateBandwidth(env.CUBICLE_TEMPLATE_BANDWIDTH),
    templateRuntime: parseTemplateRuntime(env.CUBICLE_TEMPLATE_RUNTIME),
    egressCaFiles: parseCaFiles(env.CUBICLE_EGRESS_CA_FILE),
    registry: {
      ...(env.CUBICLE_REGISTRY_MIRROR?.trim() ? { mirror: env.CUBICLE_REGISTRY_MIRROR.trim() } : {}),
      insecure: (env.CUBICLE_INSECURE_REGISTRIES ?? "").split(",").map((host) => host.trim()).filter(Boolean),
      ...(env.CUBICLE_REGISTRY_AUTH_FILE?.trim() ? { authFile: path.resolve(env.CUBICLE_REGISTRY_AUTH_FILE.trim()) } : {}),
      ...(env.CUBICLE_ECR_ENDPOINT?.trim() ? { ecrEndpoint: parseHttpUrl("CUBICLE_ECR_ENDPOINT", env.CUBICLE_ECR_ENDPOINT.trim()) } : {}),
    },
    buildInternet: parseBoolean("CUBICLE_BUILD_INTERNET", env.CUBICLE_BUILD_INTERNET, true),
    microvm: parseMicrovm(env.CUBICLE_MICROVM),
    microvmSpares: parseSpares(env.CUBICLE_MICROVM_SPARES),
  };
}
