import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { startSocks5Server, type Socks5Server } from "../../../test/support/socks5-server.js";
import { runCommand } from "../../shared/exec.js";
import type { EgressPolicy, EgressRecord } from "../egress-types.js";
import { createEgressProxy, type EgressProxy, type EgressSandbox, type EgressTarget, type EgressVerdict } from "./egress-proxy.js";
import { loadOriginalDestination } from "./original-destination.js";

// The real path of a sandbox's connection: a "sandbox" namespace whose TCP is redirected by an
// nftables nat rule to the proxy on the host, which reads SO_ORIGINAL_DST with the addon and
// reaches a "destination" namespace on 198.18.<r>.2 (RFC 2544 benchmark range, routed only to our
// veth). Needs root and `node scripts/build.mjs` (the addon). Everything carries this run's tag.
const isRoot = process.getuid?.() === 0;
const here = path.dirname(new URL(import.meta.url).pathname);
const addonPath = path.resolve(here, "../../../dist/network/original-dst.node");
const tag = randomBytes(3).toString("hex");
const r = 1 + (randomBytes(1)[0]! % 250);
const srcNetns = `cbp-src-${tag}`;
const dstNetns = `cbp-dst-${tag}`;
const srcVeth = `cbps${tag}`;
const dstVeth = `cbpd${tag}`;
const table = `cbp_${tag}`;
const hostSide = `10.251.${r}.1`;
const sandboxAddress = `10.251.${r}.2`;
const destination = `198.18.${r}.2`;
const SECRET = "tok-123";

let tempDir: string;
let upstreamCaPem: string;
let mitmCaPem: string;
let proxy: EgressProxy;
let servers: ChildProcess | undefined;
const children = new Set<ChildProcess>();
const records: EgressRecord[] = [];
const finishedRecords: EgressRecord[] = [];
let policy: EgressPolicy;
let decide: (sandbox: EgressSandbox, target: EgressTarget) => EgressVerdict;
let issued = 0;

const basePolicy = (): EgressPolicy => ({ allowInternet: true, allowCidrs: [], denyCidrs: [], allowDomains: [], headerRules: [], egressProxy: undefined });
const allowAll = (): EgressVerdict => ({ allowed: true, reason: "test allows" });

async function openssl(args: string[]): Promise<void> {
  await runCommand(["openssl", ...args], { cwd: tempDir, timeoutMs: 20_000 });
}

/** A CA (key + self-signed cert) in the temp dir. */
async function makeCa(name: string): Promise<string> {
  await openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.pem`, "-days", "2", "-subj", `/CN=${name}`, "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]);
  return readFile(path.join(tempDir, `${name}.pem`), "utf8");
}

/** A leaf for `names`, signed by CA `ca`. */
async function makeLeaf(ca: string, file: string, names: string[]): Promise<{ key: string; cert: string }> {
  await openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", `${file}.key`, "-out", `${file}.pem`, "-days", "2", "-subj", `/CN=${names[0]}`, "-CA", `${ca}.pem`, "-CAkey", `${ca}.key`, "-addext", `subjectAltName=${names.map((n) => `DNS:${n}`).join(",")}`]);
  return { key: await readFile(path.join(tempDir, `${file}.key`), "utf8"), cert: await readFile(path.join(tempDir, `${file}.pem`), "utf8") };
}

before(async () => {
  if (!isRoot) return;
  assert.ok(existsSync(addonPath), `${addonPath} is missing: run node scripts/build.mjs`);
  tempDir = await mkdtemp(path.join(tmpdir(), "cbp-egress-"));
  upstreamCaPem = await makeCa("upstream-ca");
  mitmCaPem = await makeCa("mitm-ca");
  await makeLeaf("upstream-ca", "server", ["api.test.example", "other.test.example"]);

  const ip = (...args: string[]) => runCommand(["ip", ...args]);
  await ip("netns", "add", srcNetns);
  await ip("netns", "add", dstNetns);
  await ip("link", "add", srcVeth, "type", "veth", "peer", "name", "eth0", "netns", srcNetns);
  await ip("link", "add", dstVeth, "type", "veth", "peer", "name", "eth0", "netns", dstNetns);
  await ip("addr", "add", `${hostSide}/30`, "dev", srcVeth);
  await ip("addr", "add", `198.18.${r}.1/30`, "dev", dstVeth);
  await ip("link", "set", srcVeth, "up");
  await ip("link", "set", dstVeth, "up");
  for (const [netns, address, gateway] of [[srcNetns, `${sandboxAddress}/30`, hostSide], [dstNetns, `${destination}/30`, `198.18.${r}.1`]] as const) {
    await ip("-n", netns, "addr", "add", address, "dev", "eth0");
    await ip("-n", netns, "link", "set", "eth0", "up");
    await ip("-n", netns, "link", "set", "lo", "up");
    await ip("-n", netns, "route", "add", "default", "via", gateway);
  }
  // Traffic to the destination must leave through our veth and nowhere else.
  const route = (await ip("-j", "route", "get", destination)).stdout;
  assert.equal(JSON.parse(route)[0].dev, dstVeth, `route to ${destination}: ${route}`);

  proxy = createEgressProxy({
    listenHost: hostSide,
    port: 0,
    originalDestination: loadOriginalDestination(addonPath),
    sandboxFor: (remote) => (remote === sandboxAddress ? { sandboxId: "sbx-1", policy } : undefined),
    decide: (sandbox, target) => decide(sandbox, target),
    audit: (record) => records.push(record),
    finished: (record) => finishedRecords.push(record),
    issueCertificate: async (hostname) => makeLeaf("mitm-ca", `mitm-${hostname}-${++issued}`, [hostname]),
    upstreamCa: [upstreamCaPem],
    resolveSecret: (name) => (name === "TOKEN" ? SECRET : undefined),
    limits: { connectTimeoutMs: 2000, maxConnectionsPerSandbox: 8 },
  });
  const port = await proxy.listen();
  await runCommand(["nft", "-f", "-"], {
    input: `table inet ${table} {\n chain prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n  iifname "${srcVeth}" meta l4proto tcp redirect to :${port}\n }\n}\n`,
  });

  servers = spawn("ip", ["netns", "exec", dstNetns, process.execPath, path.join(here, "test-fixtures/destination-servers.cjs"), destination, path.join(tempDir, "server.key"), path.join(tempDir, "server.pem")], { stdio: ["pipe", "pipe", "inherit"] });
  children.add(servers);
  await new Promise<void>((resolve, reject) => {
    servers!.stdout!.once("data", () => resolve());
    servers!.once("exit", (code) => reject(new Error(`destination servers exited with ${code}`)));
  });
});

after(async () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  if (!isRoot) return;
  await proxy?.close();
  await runCommand(["nft", "delete", "table", "inet", table], { allowFailure: true });
  for (const link of [srcVeth, dstVeth]) await runCommand(["ip", "link", "del", link], { allowFailure: true });
  for (const netns of [srcNetns, dstNetns]) await runCommand(["ip", "netns", "del", netns], { allowFailure: true });
  if (tempDir) await rm(tempDir, { recursive: true, force: true });
});

/** This process's open TCP sockets to the destination (the proxy's upstream side). */
function socketsToDestination(): number {
  const handles = (process as unknown as { _getActiveHandles(): { remoteAddress?: string; destroyed?: boolean }[] })._getActiveHandles();
  return handles.filter((handle) => handle.remoteAddress === destination && !handle.destroyed).length;
}

function reset(): void {
  policy = basePolicy();
  decide = allowAll;
  records.length = 0;
  finishedRecords.length = 0;
}

/** Runs the sandbox client once in the source namespace; resolves with its JSON answer. */
async function sandbox(request: Record<string, unknown>): Promise<Record<string, any>> {
  const result = await runCommand(["ip", "netns", "exec", srcNetns, process.execPath, path.join(here, "test-fixtures/sandbox-client.cjs"), JSON.stringify(request)], { timeoutMs: 15_000 });
  return JSON.parse(result.stdout.trim().split("\n").at(-1)!);
}

const https = (extra: Record<string, unknown>) => sandbox({ mode: "https", host: destination, port: 443, servername: "api.test.example", hostHeader: "api.test.example", ca: [upstreamCaPem, mitmCaPem], ...extra });

async function until(condition: () => boolean, what: string, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

const needsRoot = { skip: !isRoot && "needs root" };

test("an allowed connection is relayed to its original destination, and audited with its bytes", needsRoot, async () => {
  reset();
  const seen: EgressTarget[] = [];
  decide = (_sandbox, target) => (seen.push(target), allowAll());
  assert.deepEqual(await sandbox({ mode: "tcp", host: destination, port: 7000, text: "hello echo" }), { echo: "hello echo" });
  assert.deepEqual(seen, [{ address: destination, port: 7000, domain: undefined, domainSource: undefined }]);
  await until(() => finishedRecords.length === 1, "the record to finish");
  const record = finishedRecords[0]!;
  assert.equal(records[0], record);
  assert.equal(record.verdict, "allowed");
  assert.equal(record.sandboxId, "sbx-1");
  assert.equal(record.address, destination);
  assert.equal(record.port, 7000);
  assert.equal(record.bytesOut, 10);
  assert.equal(record.bytesIn, 10);
  assert.ok(record.durationMs !== undefined && record.durationMs >= 0);
  assert.equal(proxy.openConnections("sbx-1"), 0);
});

test("HTTPS without header rules is spliced: the sandbox sees the real server's certificate and the SNI is decided on", needsRoot, async () => {
  reset();
  const seen: EgressTarget[] = [];
  decide = (_sandbox, target) => (seen.push(target), allowAll());
  // Only the upstream CA: a MITM certificate would fail verification.
  const answer = await https({ ca: [upstreamCaPem], headers: { authorization: "sandbox's own" } });
  assert.equal(answer.status, 200);
  assert.equal(JSON.parse(answer.body).headers.authorization, "sandbox's own");
  assert.deepEqual(seen, [{ address: destination, port: 443, domain: "api.test.example", domainSource: "sni" }]);
  await until(() => finishedRecords.length === 1, "the record to finish");
  assert.equal(records[0]!.domain, "api.test.example");
  assert.ok(records[0]!.bytesIn! > 500, "the server's certificate came back");
});

test("a denied connection is reset and audited as denied", needsRoot, async () => {
  reset();
  decide = () => ({ allowed: false, reason: "not in allowOut" });
  const answer = await sandbox({ mode: "http", host: destination, port: 80, hostHeader: "blocked.example" });
  assert.equal(answer.error, "ECONNRESET");
  assert.equal(records.length, 1);
  assert.deepEqual({ ...records[0], time: 0 }, { time: 0, sandboxId: "sbx-1", protocol: "tcp", address: destination, port: 80, domain: "blocked.example", verdict: "denied", reason: "not in allowOut", bytesOut: undefined, bytesIn: undefined, durationMs: undefined });
});

test("header rules over HTTPS: the proxy sets the headers, with the secret resolved on the host", needsRoot, async () => {
  reset();
  decide = (_sandbox, target) => ({ allowed: true, reason: "allowed domain", headers: target.domain === "api.test.example" ? { Authorization: "Bearer ${e2b.secrets.TOKEN}", "X-Injected": "yes" } : undefined });
  const answer = await https({ headers: { authorization: "sandbox's fake", "x-kept": "1" }, method: "POST", body: "payload", path: "/v1/thing?x=1" });
  assert.equal(answer.status, 200, JSON.stringify(answer));
  const echoed = JSON.parse(answer.body);
  assert.equal(echoed.tls, true);
  assert.equal(echoed.headers.authorization, `Bearer ${SECRET}`);
  assert.equal(echoed.headers["x-injected"], "yes");
  assert.equal(echoed.headers["x-kept"], "1");
  assert.equal(echoed.headers.host, "api.test.example");
  assert.equal(echoed.body, "payload");
  assert.equal(echoed.url, "/v1/thing?x=1");
  // Without the MITM CA the sandbox refuses the proxy's certificate: interception is visible.
  const untrusting = await https({ ca: [upstreamCaPem] });
  assert.match(untrusting.error, /UNABLE_TO_VERIFY|SELF_SIGNED|unable to verify/i);
  await until(() => finishedRecords.length === 2, "both records to finish");
  assert.ok(finishedRecords[0]!.bytesOut! > 0 && finishedRecords[0]!.bytesIn! > 0);
});

test("header rules over plain HTTP", needsRoot, async () => {
  reset();
  decide = () => ({ allowed: true, reason: "allowed domain", headers: { "X-Api-Key": "k-${e2b.secrets.TOKEN}" } });
  const answer = await sandbox({ mode: "http", host: destination, port: 80, hostHeader: "api.test.example:80", headers: { "x-api-key": "fake" } });
  assert.equal(answer.status, 200);
  const echoed = JSON.parse(answer.body);
  assert.equal(echoed.tls, false);
  assert.equal(echoed.headers["x-api-key"], `k-${SECRET}`);
  // An upgrade would carry bytes past the header rules.
  const upgrade = await sandbox({ mode: "http", host: destination, port: 80, hostHeader: "api.test.example", headers: { connection: "Upgrade", upgrade: "websocket" } });
  assert.equal(upgrade.status, 501);
});

test("an unknown secret answers 502 and nothing is forwarded; another Host on the connection is 421", needsRoot, async () => {
  reset();
  decide = () => ({ allowed: true, reason: "allowed domain", headers: { Authorization: "Bearer ${e2b.secrets.MISSING}" } });
  const missing = await https({});
  assert.equal(missing.status, 502);
  assert.match(missing.body, /secret "MISSING"/);
  assert.doesNotMatch(missing.body, /tok-123/);
  decide = () => ({ allowed: true, reason: "allowed domain", headers: { Authorization: "Bearer ${e2b.secrets.TOKEN}" } });
  const misdirected = await https({ hostHeader: "other.test.example" });
  assert.equal(misdirected.status, 421);
  const plainMisdirected = await sandbox({ mode: "http", host: destination, port: 80, hostHeader: "api.test.example", path: "/", headers: {} });
  assert.equal(plainMisdirected.status, 200);
});

test("through the sandbox's SOCKS5 proxy, with authentication; a proxy that is down fails closed", needsRoot, async () => {
  reset();
  const socks: Socks5Server = await startSocks5Server({ host: "127.0.0.1", port: 0, username: "u", password: "p" });
  try {
    policy = { ...basePolicy(), egressProxy: { host: "localhost", port: socks.port, username: "u", password: "p" } };
    assert.deepEqual(await sandbox({ mode: "tcp", host: destination, port: 7000, text: "via socks" }), { echo: "via socks" });
    assert.deepEqual(socks.connections, [{ address: destination, port: 7000 }]);
    // Header injection goes through the same proxy.
    decide = () => ({ allowed: true, reason: "allowed domain", headers: { "X-Injected": "socks" } });
    const answer = await https({});
    assert.equal(JSON.parse(answer.body).headers["x-injected"], "socks");
    assert.equal(socks.connections.length, 2);
    decide = allowAll;
    policy = { ...basePolicy(), egressProxy: { host: "127.0.0.1", port: socks.port, username: "u", password: "wrong" } };
    records.length = 0;
    assert.equal((await sandbox({ mode: "tcp", host: destination, port: 7000, text: "x" })).error, "ECONNRESET");
    assert.equal(records[0]!.verdict, "denied");
    assert.equal(records[0]!.reason, "egress proxy authentication failed");
  } finally {
    await socks.close();
  }
  policy = { ...basePolicy(), egressProxy: { host: "127.0.0.1", port: socks.port } };
  records.length = 0;
  assert.equal((await sandbox({ mode: "tcp", host: destination, port: 7000, text: "x" })).error, "ECONNRESET");
  assert.equal(records[0]!.verdict, "denied");
  assert.equal(records[0]!.reason, "egress proxy unreachable");
});

test("policyChanged cuts an open connection that is now denied, and keeps one still allowed", needsRoot, async () => {
  reset();
  const hold = () => {
    const child = spawn("ip", ["netns", "exec", srcNetns, process.execPath, path.join(here, "test-fixtures/sandbox-client.cjs"), JSON.stringify({ mode: "hold", host: destination, port: 7000, timeoutMs: 10_000 })], { stdio: ["ignore", "pipe", "inherit"] });
    children.add(child);
    const lines: Record<string, any>[] = [];
    child.stdout!.on("data", (chunk: Buffer) => lines.push(...chunk.toString().trim().split("\n").map((line) => JSON.parse(line))));
    return { child, lines };
  };
  const client = hold();
  await until(() => client.lines.length > 0 && proxy.openConnections("sbx-1") === 1, "the connection to open", 5000);
  proxy.policyChanged("sbx-1");
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.equal(client.lines.length, 1, "still open after a change that allows it");
  decide = () => ({ allowed: false, reason: "not in allowOut" });
  proxy.policyChanged("sbx-1");
  await until(() => client.lines.length === 2, "the client to see the cut");
  assert.equal(client.lines[1]!.closed, true);
  assert.ok(client.lines[1]!.echoes > 0);
  await until(() => proxy.openConnections("sbx-1") === 0, "the proxy to forget it");
  assert.equal(finishedRecords.length, 1);

  // Still allowed, but now to go through a SOCKS5 proxy: the direct connection is cut.
  decide = allowAll;
  const direct = hold();
  await until(() => direct.lines.length > 0 && proxy.openConnections("sbx-1") === 1, "the connection to open", 5000);
  policy = { ...basePolicy(), egressProxy: { host: "127.0.0.1", port: 1 } };
  proxy.policyChanged("sbx-1");
  await until(() => direct.lines.length === 2, "the client to see the cut");
});

test("what is not a sandbox, and a sandbox's connection to the proxy's own port, are refused", needsRoot, async () => {
  reset();
  const { default: net } = await import("node:net");
  const port = (await runCommand(["nft", "-j", "list", "table", "inet", table])).stdout.match(/"port":\s*(\d+)/)?.[1] ?? "0";
  // From the host: the source is not a sandbox.
  const error = await new Promise<string>((resolve) => {
    const socket = net.connect(Number(port), hostSide);
    socket.on("error", (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
    socket.on("close", () => resolve("closed"));
  });
  assert.equal(error, "ECONNRESET");
  assert.equal(records.length, 0);
  const loop = await sandbox({ mode: "tcp", host: hostSide, port: Number(port), text: "loop" });
  assert.equal(loop.error, "ECONNRESET");
  assert.equal(records[0]!.reason, "connection to the egress proxy itself");
});

test("connections past the per-sandbox cap are denied; bad bytes and silence are survived", needsRoot, async () => {
  reset();
  decide = allowAll;
  // The server speaks first on nothing here: the 400 ms peek ends in silence, then the echo works.
  const garbage = await sandbox({ mode: "tcp", host: destination, port: 7000, text: "\u0016\u0003\u0001\u00ff\u00ff garbage" });
  assert.ok(garbage.echo);
  // A client that says nothing for a while (a server-speaks-first protocol): decided after the peek times out.
  const started = Date.now();
  assert.deepEqual(await sandbox({ mode: "tcp", host: destination, port: 7000, text: "late", delayMs: 800 }), { echo: "late" });
  assert.ok(Date.now() - started >= 800);
  assert.equal(records.at(-1)!.domain, undefined);
  const clients = Array.from({ length: 9 }, () => {
    const child = spawn("ip", ["netns", "exec", srcNetns, process.execPath, path.join(here, "test-fixtures/sandbox-client.cjs"), JSON.stringify({ mode: "hold", host: destination, port: 7000, timeoutMs: 10_000 })], { stdio: ["ignore", "pipe", "inherit"] });
    children.add(child);
    return child;
  });
  await until(() => records.filter((record) => record.reason === "too many connections from this sandbox").length === 1 && proxy.openConnections("sbx-1") === 8, "the ninth to be refused", 8000);
  for (const child of clients) child.kill("SIGKILL");
  await until(() => proxy.openConnections() === 0, "all to close", 5000);
});

const TOKEN_RULE = { Authorization: "Bearer ${e2b.secrets.TOKEN}", "X-Injected": "yes" };
const h2 = (extra: Record<string, unknown>) => sandbox({ mode: "h2", host: destination, authority: "api.test.example", ...extra });

test("HTTP/2 over TLS (ALPN h2): to an h2 destination as h2 with trailers, to an HTTP/1.1-only one as HTTP/1.1; headers set either way", needsRoot, async () => {
  reset();
  decide = (_sandbox, target) => ({ allowed: true, reason: "allowed domain", headers: target.domain === "api.test.example" ? TOKEN_RULE : undefined });
  const viaH2 = await h2({ tls: true, port: 8443, servername: "api.test.example", ca: [upstreamCaPem, mitmCaPem], headers: { authorization: "sandbox's fake", "x-kept": "1", te: "trailers" }, method: "POST", body: "payload", path: "/grpc.Service/Call" });
  assert.equal(viaH2.alpn, "h2", JSON.stringify(viaH2));
  assert.equal(viaH2.status, 200, JSON.stringify(viaH2));
  const echoed = JSON.parse(viaH2.body);
  assert.equal(echoed.http2, true, "the destination was reached over h2");
  assert.equal(echoed.tls, true);
  assert.equal(echoed.headers.authorization, `Bearer ${SECRET}`);
  assert.equal(echoed.headers["x-injected"], "yes");
  assert.equal(echoed.headers["x-kept"], "1");
  assert.equal(echoed.headers.te, "trailers", "TE: trailers is passed on (gRPC needs it)");
  assert.equal(echoed.headers[":authority"], "api.test.example");
  assert.equal(echoed.body, "payload");
  assert.equal(echoed.url, "/grpc.Service/Call");
  assert.deepEqual(viaH2.trailers, { "x-trailer": "done" }, "trailers come back");
  // Port 443 speaks only HTTP/1.1: the proxy's h2 stream becomes an HTTP/1.1 request.
  const viaH1 = await h2({ tls: true, port: 443, servername: "api.test.example", ca: [upstreamCaPem, mitmCaPem], headers: { cookie: ["a=1", "b=2"] }, path: "/v1?x=1" });
  assert.equal(viaH1.alpn, "h2");
  assert.equal(viaH1.status, 200, JSON.stringify(viaH1));
  const echoedH1 = JSON.parse(viaH1.body);
  assert.equal(echoedH1.http2, undefined);
  assert.equal(echoedH1.headers.authorization, `Bearer ${SECRET}`);
  assert.equal(echoedH1.headers.host, "api.test.example");
  assert.equal(echoedH1.headers.cookie, "a=1; b=2", "h2's split cookies are joined for HTTP/1.1");
  assert.equal(echoedH1.url, "/v1?x=1");
  // Without header rules the TLS is spliced: the sandbox talks h2 to the real server.
  decide = allowAll;
  const spliced = await h2({ tls: true, port: 8443, servername: "api.test.example", ca: [upstreamCaPem] });
  assert.equal(JSON.parse(spliced.body).headers.authorization, undefined);
  await until(() => finishedRecords.length === 3, "the records to finish");
  assert.ok(finishedRecords[0]!.bytesOut! > 0 && finishedRecords[0]!.bytesIn! > 0);
  // The destination's side of every session went with the sandbox's.
  await until(() => socketsToDestination() === 0, `no socket to the destination left open (${socketsToDestination()})`);
});

test("HTTP/2 bodies of megabytes stream both ways, to h2 and to HTTP/1.1 destinations; a policy change that drops the rules cuts the session", needsRoot, async () => {
  reset();
  decide = (_sandbox, target) => ({ allowed: true, reason: "allowed domain", headers: target.domain === "api.test.example" ? TOKEN_RULE : undefined });
  const bodyRepeat = { text: "0123456789abcdef", times: 256 * 1024 }; // 4 MiB, past HTTP/2's 64 KiB initial windows
  const body = bodyRepeat.text.repeat(bodyRepeat.times);
  for (const port of [8443, 443]) {
    const answer = await h2({ tls: true, port, servername: "api.test.example", ca: [upstreamCaPem, mitmCaPem], method: "POST", bodyRepeat, timeoutMs: 14_000 });
    assert.equal(answer.status, 200, JSON.stringify(answer).slice(0, 300));
    const echoed = JSON.parse(answer.body);
    assert.equal(echoed.body.length, body.length, `port ${port}: the whole body came through`);
    assert.equal(echoed.body, body);
    assert.equal(echoed.headers.authorization, `Bearer ${SECRET}`);
  }
  // An open h2c session held to its host: the rules go, the session goes (its requests would leave without them).
  decide = (_sandbox, target) => ({ allowed: true, reason: "pinned", headers: target.h2c ? TOKEN_RULE : undefined, domain: target.h2c ? "api.test.example" : undefined });
  const held = sandbox({ mode: "h2", host: destination, port: 8080, authority: "api.test.example", path: "/slow", method: "POST", body: "x", delayEndMs: 1500 });
  await until(() => records.some((r) => r.port === 8080 && r.domain === "api.test.example"), "the h2c session to be intercepted");
  decide = () => ({ allowed: true, reason: "pinned" });
  proxy.policyChanged("sbx-1");
  const cut = await held;
  assert.ok(cut.error !== undefined || cut.status === undefined, `the session was cut: ${JSON.stringify(cut)}`);
  await until(() => proxy.openConnections("sbx-1") === 0, "the session to close");
});

test("HTTP/2 requests for another authority get 421, an undefined secret 502, extended CONNECT 501; nothing reaches the destination", needsRoot, async () => {
  reset();
  decide = () => ({ allowed: true, reason: "allowed domain", headers: TOKEN_RULE });
  const tlsH2 = { tls: true, port: 8443, servername: "api.test.example", ca: [upstreamCaPem, mitmCaPem] };
  assert.equal((await h2({ ...tlsH2, authority: "other.test.example" })).status, 421);
  decide = () => ({ allowed: true, reason: "allowed domain", headers: { Authorization: "Bearer ${e2b.secrets.MISSING}" } });
  const missing = await h2(tlsH2);
  assert.equal(missing.status, 502);
  assert.match(missing.body, /secret "MISSING"/);
  decide = () => ({ allowed: true, reason: "allowed domain", headers: TOKEN_RULE });
  const connect = await h2({ ...tlsH2, method: "CONNECT", headers: { ":protocol": "websocket", ":scheme": "https", ":path": "/chat" } });
  assert.ok(connect.status === 501 || connect.error, JSON.stringify(connect));
});

test("cleartext HTTP/2 with prior knowledge: intercepted for the name the verdict gives (H2C_NOTE), headers set, trailers back", needsRoot, async () => {
  reset();
  // The proxy learns no name from h2c's first bytes: the verdict names the host (as the egress service does from DNS pins).
  let seen: EgressTarget | undefined;
  decide = (_sandbox, target) => {
    seen = target;
    return { allowed: true, reason: "pinned", headers: target.h2c ? TOKEN_RULE : undefined, domain: target.h2c ? "api.test.example" : undefined };
  };
  const answer = await h2({ port: 8080, headers: { authorization: "sandbox's fake" } });
  assert.equal(answer.status, 200, JSON.stringify(answer));
  assert.equal(seen?.h2c, true);
  assert.equal(seen?.domain, undefined);
  assert.equal(records.at(-1)?.domain, "api.test.example", "the audit names the host the connection was held to");
  const echoed = JSON.parse(answer.body);
  assert.equal(echoed.http2, true);
  assert.equal(echoed.tls, false);
  assert.equal(echoed.headers.authorization, `Bearer ${SECRET}`);
  assert.deepEqual(answer.trailers, { "x-trailer": "done" });
  assert.equal((await h2({ port: 8080, authority: "other.test.example" })).status, 421);
  // Two names with header rules on one address (virtual hosts): each stream gets its own name's headers; a third name is 421.
  decide = (_sandbox, target) =>
    target.h2c
      ? { allowed: true, reason: "pinned", headers: TOKEN_RULE, domain: "api.test.example", otherHosts: { "other.test.example": { "X-Injected": "other" } } }
      : { allowed: true, reason: "pinned" };
  const forApi = await h2({ port: 8080, headers: { authorization: "sandbox's fake" } });
  assert.equal(JSON.parse(forApi.body).headers.authorization, `Bearer ${SECRET}`);
  const forOther = await h2({ port: 8080, authority: "other.test.example", headers: { authorization: "sandbox's own" } });
  assert.equal(forOther.status, 200, JSON.stringify(forOther));
  const otherEcho = JSON.parse(forOther.body);
  assert.equal(otherEcho.headers["x-injected"], "other");
  assert.equal(otherEcho.headers.authorization, "sandbox's own", "another name's rule does not leak to this one");
  assert.equal((await h2({ port: 8080, authority: "third.test.example" })).status, 421);
  decide = (_sandbox, target) => ({ allowed: true, reason: "pinned", headers: target.h2c ? TOKEN_RULE : undefined, domain: target.h2c ? "api.test.example" : undefined });
  // The preface, then bytes that are no HTTP/2 frames: the session ends, the proxy lives on.
  const junk = await sandbox({ mode: "tcp", host: destination, port: 8080, text: `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n${"\u00ff".repeat(64)}` });
  assert.ok(junk.error === "closed" || junk.echo !== undefined, JSON.stringify(junk));
  await until(() => proxy.openConnections("sbx-1") === 0, "the junk connection to close");
  assert.equal((await h2({ port: 8080 })).status, 200);
  // A verdict without a domain: spliced, the sandbox's own header goes through untouched.
  decide = () => ({ allowed: true, reason: "pinned" });
  const spliced = await h2({ port: 8080, headers: { authorization: "sandbox's own" } });
  assert.equal(JSON.parse(spliced.body).headers.authorization, "sandbox's own");
  await until(() => socketsToDestination() === 0, `no socket to the destination left open (${socketsToDestination()})`);
});
