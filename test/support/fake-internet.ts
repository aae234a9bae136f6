/**
 * A fake internet for the network-policy tests: hosts that exist only in a network namespace this
 * harness makes, reached from the host (and so from sandboxes) through a veth pair and a route.
 *
 *   const inet = await startFakeInternet();
 *   await inet.assertRouted(inet.http.address);   // before sending anything
 *   ... fetch(`http://${inet.http.address}/`) ...
 *   (await inet.requests()).at(-1)?.headers;
 *   await inet.close();
 *
 * Layout of one instance (n is free on this host when it starts; see claimBlock):
 * - namespace `cbi-<rand>`, host veth `cbi<rand>h` ↔ its `eth0`; transit 198.19.n.0/30 (host .1,
 *   namespace .2, the namespace's default route); services as /32s on the namespace's `lo` (this
 *   kernel has no dummy interfaces) in 198.18.n.0/24, a block from RFC 2544's 198.18.0.0/15,
 *   which is not RFC 1918 and so is "internet" to the sandbox policy; the host routes
 *   198.18.n.0/24 via 198.19.n.2.
 * - an nftables table in the namespace lets it answer but never open a connection out of it,
 *   so no service (SOCKS CONNECT, a DNS lookup) can reach a real address through the host.
 * - services (fake-internet-server.ts) in ONE child process, controlled over its stdin/stdout.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { CubicleError } from "../../src/shared/cubicle-error.js";
import { runCommand } from "../../src/shared/exec.js";
import { createLogger } from "../../src/shared/log.js";
import { processIsAlive } from "../../src/shared/process.js";
import {
  CONTROL_TAG,
  MAX_CONTROL_LINE_BYTES,
  type ControlMessage,
  type ControlOperation,
  type FakeInternetRecords,
  type FakeInternetServerConfig,
  type RecordedDnsQuery,
  type RecordedRequest,
  type RecordedSocksConnection,
} from "./fake-internet-types.js";

export type { RecordedDnsQuery, RecordedRequest, RecordedSocksConnection } from "./fake-internet-types.js";

const log = createLogger("fake-internet");

const supportDir = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(supportDir, "..", "..");
const SERVER_SCRIPT = path.join(supportDir, "fake-internet-server.ts");
/** Where startSocks5Server lives; CUBICLE_TEST_SOCKS5_MODULE points elsewhere (e.g. another checkout). */
const SOCKS5_MODULE = process.env.CUBICLE_TEST_SOCKS5_MODULE ?? path.join(supportDir, "socks5-server.ts");
/** One file per live instance: what to remove if its test process dies without closing it. */
const STATE_DIR = "/run/cbi-fake-internet";
const NAMESPACE_INTERFACE = "eth0";
const COMMAND_TIMEOUT_MS = 15_000;
const CONTROL_TIMEOUT_MS = 10_000;

/** Host byte offsets of the services in the instance's /24. */
const SERVICE_HOSTS = { http: 10, https: 11, evil: 20, dns: 53, echo: 7, socks: 108 } as const;

export interface FakeInternetOptions {
  /** DNS names (lowercase) → IPv4 addresses, added to (or replacing) the default names. */
  records?: Record<string, string | string[]>;
  /** TTL of DNS answers. Default 30 s. */
  dnsTtlSeconds?: number;
  /** TTL of the rebinding name's answers. Default 0. */
  rebindTtlSeconds?: number;
  /** The rebinding name's second answer. Default 127.0.0.1. */
  rebindPrivateAddress?: string;
  /**
   * The SOCKS5 service (port 1080 unless given). Default: on when test/support/socks5-server.ts
   * exists; false: off. Asking for it when the module is missing is an error.
   */
  socks?: false | { username?: string; password?: string; port?: number };
  /** How long the services may take to come up. Default 20 s. */
  startTimeoutMs?: number;
}

export interface FakeHost {
  address: string;
  name: string;
  port: number;
  /** `http://name/` or `https://name/` (the port is the scheme's default). */
  url: string;
}

export interface FakeInternet {
  namespace: string;
  /** The host end of the veth pair; every service address is routed through it. */
  hostInterface: string;
  /** The service block (198.18.n.0/24), routed via namespaceTransitAddress. */
  serviceCidr: string;
  transitCidr: string;
  hostTransitAddress: string;
  namespaceTransitAddress: string;
  /** Plain HTTP on port 80: a JSON echo of each request. */
  http: FakeHost;
  /** HTTPS on port 443 with a certificate from caCertificatePem. */
  https: FakeHost;
  /** A second host, HTTP on 80 and HTTPS on 443, outside the fake.test zone (evil.test). */
  evil: { address: string; name: string; httpPort: number; httpsPort: number };
  /** DNS on UDP and TCP port 53, authoritative for the names in `records`. */
  dns: { address: string; port: number };
  /** TCP and UDP echo, port 7. */
  echo: { address: string; name: string; port: number };
  /** SOCKS5 (RFC 1928; RFC 1929 when username is set); undefined when the module is missing or off. */
  socks: { address: string; name: string; port: number; username?: string; password?: string } | undefined;
  /** A name whose A answer alternates: publicAddress first, then privateAddress, and so on. */
  rebind: { name: string; publicAddress: string; privateAddress: string };
  /** Every name the DNS service answers, with its addresses. */
  records: Readonly<Record<string, readonly string[]>>;
  /** The test CA that signed the HTTPS certificate (for *.fake.test, fake.test, *.evil.test, evil.test, the other names and the HTTP(S) addresses). */
  caCertificatePem: string;
  /** The same CA in a file (for NODE_EXTRA_CA_CERTS, curl --cacert ...). */
  caCertificateFile: string;
  /** The services' process (inside the namespace). */
  childPid: number;
  /** Throws unless the host routes `address` out through hostInterface. Call it before sending. */
  assertRouted(address: string): Promise<void>;
  /** An ICMP echo from the host (after assertRouted); resolves to the round trip in ms, undefined on timeout. */
  ping(address: string, timeoutMs?: number): Promise<number | undefined>;
  requests(): Promise<RecordedRequest[]>;
  dnsQueries(): Promise<RecordedDnsQuery[]>;
  socksConnections(): Promise<RecordedSocksConnection[]>;
  /** Stops the SOCKS5 service (connections through it are cut); its records stay. */
  stopSocks(): Promise<void>;
  startSocks(): Promise<void>;
  clearRecords(): Promise<void>;
  /** Kills the services' process and removes the namespace, veth, route and temp dir. Idempotent. */
  close(): Promise<void>;
}

/** What an instance has created, for the synchronous cleanup at process exit and the stale sweep. */
interface InstanceState {
  ownerPid: number;
  namespace: string;
  hostInterface: string;
  tempDir: string;
  childPid?: number;
}

const liveInstances = new Map<string, { state: InstanceState; assertRouted(address: string): Promise<void> }>();

/** Starts a fake internet; see the file comment for what it builds. */
export async function startFakeInternet(options: FakeInternetOptions = {}): Promise<FakeInternet> {
  sweepStaleInstances();
  installExitCleanup();
  const socksWanted = options.socks !== false && (options.socks !== undefined || existsSync(SOCKS5_MODULE));
  if (socksWanted && !existsSync(SOCKS5_MODULE)) throw new CubicleError("failed_precondition", `SOCKS5 asked for but ${SOCKS5_MODULE} does not exist`);

  const suffix = randomBytes(4).toString("hex");
  const state: InstanceState = {
    ownerPid: process.pid,
    namespace: `cbi-${suffix}`,
    hostInterface: `cbi${suffix}h`,
    tempDir: await mkdtemp(path.join(os.tmpdir(), "cbi-fake-internet-")),
  };
  writeState(state);
  liveInstances.set(state.namespace, {
    state,
    assertRouted: async (address) => {
      throw new CubicleError("failed_precondition", `${address}: the fake internet ${state.namespace} is not up yet`);
    },
  });

  let child: ChildProcess | undefined;
  let control: ControlChannel | undefined;
  let closing: Promise<void> | undefined;
  const stderrTail = new TailBuffer(8 * 1024);

  const close = (): Promise<void> => {
    closing ??= (async () => {
      control?.fail(new CubicleError("canceled", "the fake internet was closed"));
      if (child && child.exitCode === null && child.signalCode === null) {
        const exited = new Promise<void>((resolve) => child!.once("exit", () => resolve()));
        child.kill("SIGKILL");
        await Promise.race([exited, delay(5_000)]);
      }
      await removeInstance(state);
      liveInstances.delete(state.namespace);
    })();
    return closing;
  };

  try {
    await runIp(["-batch", "-"], [
      `netns add ${state.namespace}`,
      `link add ${state.hostInterface} type veth peer name ${NAMESPACE_INTERFACE} netns ${state.namespace}`,
      `link set ${state.hostInterface} up`,
    ]);
    const block = await claimBlock(state.hostInterface);
    const serviceAddress = (host: number) => `198.18.${block}.${host}`;
    const addresses = {
      http: serviceAddress(SERVICE_HOSTS.http),
      https: serviceAddress(SERVICE_HOSTS.https),
      evil: serviceAddress(SERVICE_HOSTS.evil),
      dns: serviceAddress(SERVICE_HOSTS.dns),
      echo: serviceAddress(SERVICE_HOSTS.echo),
      socks: serviceAddress(SERVICE_HOSTS.socks),
    };
    const hostTransitAddress = `198.19.${block}.1`;
    const namespaceTransitAddress = `198.19.${block}.2`;

    const rebindPrivateAddress = options.rebindPrivateAddress ?? "127.0.0.1";
    if (!net.isIPv4(rebindPrivateAddress)) throw new CubicleError("invalid_argument", `rebindPrivateAddress ${JSON.stringify(rebindPrivateAddress)} is not an IPv4 address`);
    const rebind = { name: "rebind.fake.test", publicAddress: addresses.http, privateAddress: rebindPrivateAddress };
    const records = buildRecords(addresses, options.records);
    const socksPort = options.socks ? (options.socks.port ?? 1080) : 1080;
    if (!Number.isInteger(socksPort) || socksPort < 1 || socksPort > 65_535 || [53, 80, 443, 7].includes(socksPort)) {
      throw new CubicleError("invalid_argument", `SOCKS5 port ${socksPort} must be 1–65535 and not 7, 53, 80 or 443`);
    }

    const [caCertificatePem] = await Promise.all([
      makeCertificates(state.tempDir, Object.keys(records), [addresses.http, addresses.https, addresses.evil]),
      runIp(["-batch", "-"], [`addr add ${hostTransitAddress}/30 dev ${state.hostInterface}`]),
      runIp(["-n", state.namespace, "-batch", "-"], [
        "link set lo up",
        `addr add ${namespaceTransitAddress}/30 dev ${NAMESPACE_INTERFACE}`,
        `link set ${NAMESPACE_INTERFACE} up`,
        ...Object.values(addresses).map((address) => `addr add ${address}/32 dev lo`),
        `route add default via ${hostTransitAddress}`,
      ]),
      runCommand(["ip", "netns", "exec", state.namespace, "nft", "-f", "-"], { input: guardRuleset(), timeoutMs: COMMAND_TIMEOUT_MS }),
      writeNamespaceResolver(state.namespace, addresses.dns),
    ]);

    const serverConfig: FakeInternetServerConfig = {
      addresses,
      tls: { certFile: path.join(state.tempDir, "server.pem"), keyFile: path.join(state.tempDir, "server.key") },
      dns: {
        records,
        ttlSeconds: options.dnsTtlSeconds ?? 30,
        rebindName: rebind.name,
        rebindAddresses: [rebind.publicAddress, rebind.privateAddress],
        rebindTtlSeconds: options.rebindTtlSeconds ?? 0,
      },
      socks: socksWanted
        ? { port: socksPort, username: options.socks ? options.socks.username : undefined, password: options.socks ? options.socks.password : undefined, modulePath: SOCKS5_MODULE }
        : undefined,
    };
    // `ip netns exec` execs the command (no fork), so the child's PID is node's.
    child = spawn("ip", ["netns", "exec", state.namespace, process.execPath, "--import", "tsx", SERVER_SCRIPT, JSON.stringify(serverConfig)], {
      cwd: repoRoot,
      stdio: ["pipe", "pipe", "pipe"],
    });
    if (child.pid === undefined) throw new CubicleError("internal", "could not start the fake internet's server");
    state.childPid = child.pid;
    writeState(state);
    child.stderr!.on("data", (chunk: Buffer) => stderrTail.push(chunk));
    child.stdin!.on("error", () => {});
    control = new ControlChannel(child, stderrTail);
    await control.ready(options.startTimeoutMs ?? 20_000);

    const instanceRouted = async (address: string) => checkRoute(address, state.hostInterface, addresses, namespaceTransitAddress);
    liveInstances.set(state.namespace, { state, assertRouted: instanceRouted });
    for (const address of [...Object.values(addresses), namespaceTransitAddress]) await instanceRouted(address);
    await httpProbe(addresses.http);
    await control.call("clearRecords");

    const channel = control;
    const readRecords = async () => (await channel.call("records")) as FakeInternetRecords;
    const host = (address: string, name: string, scheme: "http" | "https"): FakeHost => ({
      address,
      name,
      port: scheme === "http" ? 80 : 443,
      url: `${scheme}://${name}/`,
    });
    log.debug("fake internet up", { namespace: state.namespace, serviceCidr: `198.18.${block}.0/24` });
    return {
      namespace: state.namespace,
      hostInterface: state.hostInterface,
      serviceCidr: `198.18.${block}.0/24`,
      transitCidr: `198.19.${block}.0/30`,
      hostTransitAddress,
      namespaceTransitAddress,
      http: host(addresses.http, "http.fake.test", "http"),
      https: host(addresses.https, "https.fake.test", "https"),
      evil: { address: addresses.evil, name: "evil.test", httpPort: 80, httpsPort: 443 },
      dns: { address: addresses.dns, port: 53 },
      echo: { address: addresses.echo, name: "echo.fake.test", port: 7 },
      socks: serverConfig.socks
        ? { address: addresses.socks, name: "socks.fake.test", port: socksPort, username: serverConfig.socks.username, password: serverConfig.socks.password }
        : undefined,
      rebind,
      records,
      caCertificatePem,
      caCertificateFile: path.join(state.tempDir, "ca.pem"),
      childPid: child.pid,
      assertRouted: instanceRouted,
      async ping(address, timeoutMs = 2_000) {
        await instanceRouted(address);
        return icmpEcho(address, timeoutMs);
      },
      requests: async () => (await readRecords()).requests,
      dnsQueries: async () => (await readRecords()).dnsQueries,
      socksConnections: async () => (await readRecords()).socksConnections,
      stopSocks: async () => void (await channel.call("stopSocks")),
      startSocks: async () => void (await channel.call("startSocks")),
      clearRecords: async () => void (await channel.call("clearRecords")),
      close,
    };
  } catch (err) {
    await close().catch((cleanupErr) => log.warn("cleanup after a failed start failed", { error: String(cleanupErr) }));
    throw CubicleError.from(err);
  }
}

/**
 * Throws unless some fake internet of this process routes `address`: the host's route for it
 * leaves through that instance's veth. Call it before sending a packet to a fake address.
 */
export async function assertRouted(address: string): Promise<void> {
  const errors: string[] = [];
  for (const instance of liveInstances.values()) {
    try {
      return await instance.assertRouted(address);
    } catch (err) {
      errors.push(err instanceof Error ? err.message : String(err));
    }
  }
  throw new CubicleError("failed_precondition", `${address} is not routed to a fake internet of this process: refusing to send to it${errors.length ? ` (${errors.join("; ")})` : ""}`);
}

// --- addresses and routes ----------------------------------------------------------------------

async function checkRoute(address: string, hostInterface: string, services: Record<string, string>, namespaceTransitAddress: string): Promise<void> {
  if (!net.isIPv4(address)) throw new CubicleError("invalid_argument", `${JSON.stringify(address)} is not an IPv4 address`);
  const { stdout } = await runCommand(["ip", "-j", "route", "get", address], { timeoutMs: COMMAND_TIMEOUT_MS });
  const routes = JSON.parse(stdout) as { dev?: string; gateway?: string; type?: string }[];
  const route = routes[0];
  const expectedGateway = address === namespaceTransitAddress ? undefined : namespaceTransitAddress;
  const isOurs = Object.values(services).includes(address) || address === namespaceTransitAddress;
  if (!route || route.dev !== hostInterface || route.gateway !== expectedGateway || (route.type !== undefined && route.type !== "unicast") || !isOurs) {
    throw new CubicleError(
      "failed_precondition",
      `${address} is routed ${route ? `via ${route.gateway ?? "(direct)"} dev ${route.dev ?? "(none)"}` : "nowhere"}, not to a service of the fake internet behind ${hostInterface}: refusing to send to it`,
    );
  }
}

function ipv4ToNumber(address: string): number {
  return address.split(".").reduce((value, octet) => value * 256 + Number(octet), 0);
}

function rangeOf(cidr: string): [number, number] | undefined {
  if (cidr === "default") return [0, 2 ** 32 - 1];
  const [address, bits = "32"] = cidr.split("/");
  if (!address || !net.isIPv4(address)) return undefined;
  const size = 2 ** (32 - Number(bits));
  const start = Math.floor(ipv4ToNumber(address) / size) * size;
  return [start, start + size - 1];
}

/**
 * Claims a block n (198.18.n.0/24 for services, 198.19.n.0/30 for transit) that no route on this
 * host touches, by adding the service route: `ip route add` fails when another instance (of this
 * or another test process) added the same route first, so two never share a block.
 */
async function claimBlock(hostInterface: string): Promise<number> {
  const { stdout } = await runCommand(["ip", "-j", "-4", "route", "show", "table", "all"], { timeoutMs: COMMAND_TIMEOUT_MS });
  const taken: [number, number][] = [];
  for (const route of JSON.parse(stdout) as { dst?: string }[]) {
    const range = route.dst ? rangeOf(route.dst) : undefined;
    // Wider routes (a default route, a /15 for the whole benchmarking range) lose to our /24.
    if (range && range[1] - range[0] < 2 ** 16) taken.push(range);
  }
  const overlaps = (cidr: string) => {
    const [start, end] = rangeOf(cidr)!;
    return taken.some(([otherStart, otherEnd]) => otherStart <= end && start <= otherEnd);
  };
  const first = randomBytes(1)[0]!;
  for (let i = 0; i < 256; i++) {
    const block = (first + i) % 256;
    if (overlaps(`198.18.${block}.0/24`) || overlaps(`198.19.${block}.0/30`)) continue;
    const claimed = await runCommand(["ip", "route", "add", `198.18.${block}.0/24`, "via", `198.19.${block}.2`, "dev", hostInterface, "onlink"], {
      timeoutMs: COMMAND_TIMEOUT_MS,
      allowFailure: true,
    });
    if (claimed.exitCode === 0) return block;
    if (!/exists/i.test(claimed.stderr)) throw new CubicleError("internal", `ip route add for the fake internet failed: ${claimed.stderr.trim()}`);
  }
  throw new CubicleError("resource_exhausted", "no free 198.18.n.0/24 block for a fake internet: close other instances");
}

/** Default names → addresses, then the caller's, checked. */
function buildRecords(addresses: FakeInternetServerConfig["addresses"], extra: FakeInternetOptions["records"] = {}): Record<string, string[]> {
  const records: Record<string, string[]> = {
    "fake.test": [addresses.https],
    "http.fake.test": [addresses.http],
    // A second name on the HTTP host's address (virtual hosts; H2C_NOTE's shared address).
    "vhost.fake.test": [addresses.http],
    "https.fake.test": [addresses.https],
    "api.fake.test": [addresses.https],
    "multi.fake.test": [addresses.http, addresses.https],
    "dns.fake.test": [addresses.dns],
    "echo.fake.test": [addresses.echo],
    "socks.fake.test": [addresses.socks],
    "evil.test": [addresses.evil],
    "www.evil.test": [addresses.evil],
  };
  for (const [name, value] of Object.entries(extra)) {
    const list = Array.isArray(value) ? value : [value];
    if (!/^(?=.{1,253}$)([a-z0-9_-]{1,63}\.)+[a-z0-9-]{1,63}$/.test(name)) throw new CubicleError("invalid_argument", `DNS name ${JSON.stringify(name)} must be lowercase dotted labels`);
    if (name === "rebind.fake.test") throw new CubicleError("invalid_argument", "rebind.fake.test is the rebinding name");
    if (list.length > 16 || list.some((address) => !net.isIPv4(address))) throw new CubicleError("invalid_argument", `addresses of ${name} must be 1–16 IPv4 addresses`);
    records[name] = [...list];
  }
  return records;
}

// --- namespace contents ------------------------------------------------------------------------

/**
 * The namespace answers what reaches it and opens nothing: its services' replies (and ICMP
 * errors about them) leave, any connection they would start (a SOCKS CONNECT elsewhere, a
 * lookup through the host's resolver) is refused before it reaches the host and its forwarding.
 */
function guardRuleset(): string {
  return [
    "table inet cbi_guard {",
    "  chain output {",
    "    type filter hook output priority 0; policy accept;",
    "    oif lo accept",
    "    ct state established,related accept",
    "    reject",
    "  }",
    "}",
    "",
  ].join("\n");
}

/** `ip netns exec` binds /etc/netns/<ns>/resolv.conf over /etc/resolv.conf: look names up here. */
async function writeNamespaceResolver(namespace: string, dnsAddress: string): Promise<void> {
  const dir = path.join("/etc/netns", namespace);
  mkdirSync(dir, { recursive: true });
  await writeFile(path.join(dir, "resolv.conf"), `nameserver ${dnsAddress}\noptions timeout:2 attempts:1\n`);
  await writeFile(path.join(dir, "hosts"), "127.0.0.1 localhost\n");
}

/** A test CA and a server certificate signed by it; returns the CA's PEM. */
async function makeCertificates(dir: string, names: string[], addresses: string[]): Promise<string> {
  const run = (args: string[]) => runCommand(["openssl", ...args], { cwd: dir, timeoutMs: COMMAND_TIMEOUT_MS });
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  await run([
    "req", "-x509", "-new", ...ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
    "-subj", `/CN=Cubicle fake internet test CA ${path.basename(dir)}`,
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
  ]);
  await run(["req", "-new", ...ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=fake.test"]);
  const wildcards = ["*.fake.test", "fake.test", "*.evil.test", "evil.test"];
  const covered = (name: string) => wildcards.includes(name) || /^[^.]+\.(fake|evil)\.test$/.test(name);
  const altNames = [...wildcards, ...names.filter((name) => !covered(name))].map((name) => `DNS:${name}`).concat(addresses.map((address) => `IP:${address}`));
  await writeFile(
    path.join(dir, "server.ext"),
    `subjectAltName=${altNames.join(",")}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n`,
  );
  await run([
    "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-out", "server.pem", "-days", "2",
    "-set_serial", `0x${randomBytes(8).toString("hex")}`, "-extfile", "server.ext",
  ]);
  return readFile(path.join(dir, "ca.pem"), "utf8");
}

async function runIp(args: string[], batch: string[]): Promise<void> {
  await runCommand(["ip", ...args], { input: batch.join("\n") + "\n", timeoutMs: COMMAND_TIMEOUT_MS });
}

/** One GET to the HTTP service, so a started instance is known to answer through its route. */
function httpProbe(address: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: address, port: 80, path: "/__fake-internet-probe", timeout: 5_000, agent: false }, (res) => {
      res.resume();
      res.on("end", () => (res.statusCode === 200 ? resolve() : reject(new CubicleError("unavailable", `fake internet probe answered ${res.statusCode}`))));
    });
    req.on("timeout", () => req.destroy(new CubicleError("deadline_exceeded", `fake internet probe to ${address} timed out`)));
    req.on("error", reject);
  });
}

// --- ICMP ------------------------------------------------------------------------------------

/** Node has no raw sockets and this machine may have no `ping`: one echo request from Python. */
const ICMP_ECHO_SCRIPT = `
import os, socket, struct, sys, time
address, timeout = sys.argv[1], float(sys.argv[2])
def checksum(data):
    if len(data) % 2:
        data += b"\\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xffff)
    total += total >> 16
    return ~total & 0xffff
ident = os.getpid() & 0xffff
payload = b"cubicle-fake-internet"
header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, 1) + payload
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
start = time.monotonic()
sock.sendto(packet, (address, 0))
while True:
    left = start + timeout - time.monotonic()
    if left <= 0:
        sys.exit(1)
    sock.settimeout(left)
    try:
        data, peer = sock.recvfrom(2048)
    except socket.timeout:
        sys.exit(1)
    ihl = (data[0] & 0x0F) * 4
    kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
    if peer[0] == address and kind == 0 and rid == ident:
        print("%.3f" % ((time.monotonic() - start) * 1000))
        sys.exit(0)
`;

async function icmpEcho(address: string, timeoutMs: number): Promise<number | undefined> {
  // pyenv's shim costs a second a run; Debian's python3 is there on every machine of this project.
  const python = existsSync("/usr/bin/python3") ? "/usr/bin/python3" : "python3";
  const result = await runCommand([python, "-c", ICMP_ECHO_SCRIPT, address, String(timeoutMs / 1000)], { timeoutMs: timeoutMs + 5_000, allowFailure: true });
  if (result.exitCode === 1 && result.stderr.trim() === "") return undefined;
  if (result.exitCode !== 0) throw new CubicleError("internal", `ICMP echo to ${address} failed: ${result.stderr.trim().slice(-500)}`);
  return Number(result.stdout.trim());
}

// --- control channel -------------------------------------------------------------------------

class TailBuffer {
  private text = "";
  constructor(private readonly maxChars: number) {}
  push(chunk: Buffer): void {
    this.text = (this.text + chunk.toString("utf8")).slice(-this.maxChars);
  }
  toString(): string {
    return this.text;
  }
}

/** JSON lines to the server's stdin, tagged JSON lines back from its stdout. */
class ControlChannel {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve(value: unknown): void; reject(err: Error): void }>();
  private readyWaiter: { resolve(): void; reject(err: Error): void } | undefined;
  private isReady = false;
  private failure: Error | undefined;

  constructor(
    private readonly child: ChildProcess,
    private readonly stderrTail: TailBuffer,
  ) {
    let buffered = "";
    child.stdout!.setEncoding("utf8");
    child.stdout!.on("data", (chunk: string) => {
      buffered += chunk;
      if (buffered.length > MAX_CONTROL_LINE_BYTES) {
        child.kill("SIGKILL");
        return this.fail(new CubicleError("internal", "the fake internet's server wrote an over-long line"));
      }
      let newline: number;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        this.onLine(line);
      }
    });
    child.on("exit", (code, signal) => {
      this.fail(new CubicleError("unavailable", `the fake internet's server exited (${signal ?? code}): ${this.stderrTail.toString().trim().slice(-2000)}`));
    });
    child.on("error", (err) => this.fail(CubicleError.from(err)));
  }

  ready(timeoutMs: number): Promise<void> {
    if (this.isReady) return Promise.resolve();
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new CubicleError("deadline_exceeded", `the fake internet's services did not start within ${timeoutMs} ms: ${this.stderrTail.toString().trim().slice(-2000)}`)), timeoutMs);
      this.readyWaiter = {
        resolve: () => (clearTimeout(timer), resolve()),
        reject: (err) => (clearTimeout(timer), reject(err)),
      };
    });
  }

  call(op: ControlOperation, timeoutMs = CONTROL_TIMEOUT_MS): Promise<unknown> {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new CubicleError("deadline_exceeded", `fake internet control ${op} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, {
        resolve: (value) => (clearTimeout(timer), resolve(value)),
        reject: (err) => (clearTimeout(timer), reject(err)),
      });
      this.child.stdin!.write(JSON.stringify({ id, op }) + "\n");
    });
  }

  fail(err: Error): void {
    this.failure ??= err;
    this.readyWaiter?.reject(err);
    this.readyWaiter = undefined;
    for (const waiter of this.pending.values()) waiter.reject(err);
    this.pending.clear();
  }

  private onLine(line: string): void {
    let message: ControlMessage;
    try {
      message = JSON.parse(line) as ControlMessage;
    } catch {
      return;
    }
    if (typeof message !== "object" || message === null || message.tag !== CONTROL_TAG) return;
    if ("event" in message) {
      this.isReady = true;
      this.readyWaiter?.resolve();
      this.readyWaiter = undefined;
      return;
    }
    const waiter = this.pending.get(message.id);
    if (!waiter) return;
    this.pending.delete(message.id);
    if (message.ok) waiter.resolve(message.result);
    else waiter.reject(new CubicleError("internal", `fake internet: ${message.error}`));
  }
}

// --- cleanup -----------------------------------------------------------------------------------

function writeState(state: InstanceState): void {
  mkdirSync(STATE_DIR, { recursive: true });
  writeFileSync(path.join(STATE_DIR, `${state.namespace}.json`), JSON.stringify(state));
}

async function removeInstance(state: InstanceState): Promise<void> {
  // Removing the host end of the veth removes its peer and the route through it.
  await runCommand(["ip", "link", "del", state.hostInterface], { allowFailure: true, timeoutMs: COMMAND_TIMEOUT_MS });
  await runCommand(["ip", "netns", "del", state.namespace], { allowFailure: true, timeoutMs: COMMAND_TIMEOUT_MS });
  await rm(path.join("/etc/netns", state.namespace), { recursive: true, force: true });
  await rm(state.tempDir, { recursive: true, force: true });
  await rm(path.join(STATE_DIR, `${state.namespace}.json`), { force: true });
}

/** The same, synchronously: for process exit, where nothing asynchronous runs any more. */
function removeInstanceSync(state: InstanceState): void {
  if (state.childPid !== undefined && isFakeInternetServer(state.childPid)) {
    try {
      process.kill(state.childPid, "SIGKILL");
    } catch {
      // already gone
    }
  }
  for (const args of [["link", "del", state.hostInterface], ["netns", "del", state.namespace]]) {
    try {
      execFileSync("ip", args, { stdio: "ignore", timeout: COMMAND_TIMEOUT_MS });
    } catch {
      // already gone
    }
  }
  for (const dir of [path.join("/etc/netns", state.namespace), state.tempDir, path.join(STATE_DIR, `${state.namespace}.json`)]) {
    rmSync(dir, { recursive: true, force: true });
  }
}

function isFakeInternetServer(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("fake-internet-server");
  } catch {
    return false;
  }
}

/** Removes what instances of test processes that died without closing them left behind. */
function sweepStaleInstances(): void {
  let files: string[];
  try {
    files = readdirSync(STATE_DIR).filter((file) => /^cbi-[0-9a-f]{8}\.json$/.test(file));
  } catch {
    return;
  }
  for (const file of files) {
    try {
      const state = JSON.parse(readFileSync(path.join(STATE_DIR, file), "utf8")) as InstanceState;
      if (state.ownerPid === process.pid || processIsAlive(state.ownerPid)) continue;
      if (!/^cbi-[0-9a-f]{8}$/.test(state.namespace) || !/^cbi[0-9a-f]{8}h$/.test(state.hostInterface) || !path.basename(state.tempDir).startsWith("cbi-fake-internet-")) continue;
      log.warn("removing a fake internet its test process left behind", { namespace: state.namespace, ownerPid: state.ownerPid });
      removeInstanceSync(state);
    } catch (err) {
      log.warn("could not read a fake internet state file", { file, error: String(err) });
    }
  }
}

let exitCleanupInstalled = false;

/** A test that crashes or is killed by a signal still removes its namespaces, veths and routes. */
function installExitCleanup(): void {
  if (exitCleanupInstalled) return;
  exitCleanupInstalled = true;
  const cleanUpAll = () => {
    for (const { state } of liveInstances.values()) removeInstanceSync(state);
    liveInstances.clear();
  };
  process.on("exit", cleanUpAll);
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    const onSignal = () => {
      cleanUpAll();
      process.off(signal, onSignal);
      // Nobody else handles it: die of it as if we had not been here.
      if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
    };
    process.on(signal, onSignal);
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}
