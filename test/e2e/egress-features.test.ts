/**
 * What the host-side egress proxy does beyond allow and deny, through the official `e2b` SDK and
 * real packets to the fake-internet harness's namespace (routes checked with assertRouted
 * first): headers with secrets injected on the host (the secret never exists inside the
 * sandbox), a user's SOCKS5 proxy that fails closed, the egress audit log (API, CLI, Prometheus),
 * and private ingress with the traffic access token.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { Sandbox, Secret, type SandboxOpts } from "e2b";
import { openCertificateAuthority } from "../../src/network/index.js";
import { startEgressTestEnv, type EgressTestEnv } from "../support/egress-test-env.js";
import type { FakeInternet } from "../support/fake-internet.js";
import { runAsRoot } from "../support/sandbox-shell.js";
import { e2eRuntime, TEST_API_KEY, type TestServer } from "./harness.js";

let env: EgressTestEnv;
let server: TestServer;
let inet: FakeInternet;
const repoRoot = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..", "..");

/**
 * A request through the router to a server a background command is starting in the sandbox:
 * repeated until it is answered with 200 or the wait is over (Python's start in a microVM under
 * TCG can take several seconds on a busy CI host). The last response either way.
 */
async function fetchUntilServed(url: string, headers: Record<string, string>): Promise<Response> {
  const deadline = Date.now() + (e2eRuntime === "microvm" ? 60_000 : 10_000);
  for (;;) {
    const res = await fetch(url, { headers });
    if (res.status === 200 || Date.now() > deadline) return res;
    await res.arrayBuffer();
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

before(async () => {
  env = await startEgressTestEnv({ fakeInternet: { socks: { username: "cubicle", password: "socks-pass" } } });
  ({ server, inet } = env);
});

after(async () => {
  await env?.close();
});

const create = (opts: SandboxOpts = {}) => env.create(opts);
const sh = runAsRoot;

/** curl's status; the body goes to /dev/null, so the sandbox never holds what the server echoes. */
async function status(sandbox: Sandbox, url: string, extra = ""): Promise<string> {
  return (await sh(sandbox, `curl -s -o /dev/null -w '%{http_code}' -m 8 ${extra} '${url}'`)).stdout.trim() || "000";
}

/**
 * status() of a request that must get an answer: "000" (none within curl's 8 s) is tried twice
 * more. A microVM guest's first TLS handshake runs curl's and OpenSSL's code for the first time
 * under TCG, which on a busy host took longer than that once in CI. Denials keep one try.
 */
async function answered(sandbox: Sandbox, url: string, extra = ""): Promise<string> {
  let code = await status(sandbox, url, extra);
  for (let retry = 0; retry < 2 && code === "000"; retry++) code = await status(sandbox, url, extra);
  return code;
}

describe("header rules with secrets", () => {
  test("the fake server sees the injected secret; the sandbox, its memory and its env never hold it", async () => {
    await inet.assertRouted(inet.https.address);
    await inet.assertRouted(inet.http.address);
    const secretValue = `sk-live-${Math.random().toString(36).slice(2)}${Date.now().toString(36)}`;
    await Secret.create("fake-api-token", secretValue);
    const sandbox = await create({
      network: {
        rules: {
          [inet.https.name]: [{ transform: { headers: { Authorization: `Bearer ${Secret.fill("fake-api-token")}`, "X-Cubicle-Test": "static" } } }],
          [inet.http.name]: [{ transform: { headers: { "X-Plain": Secret.fill("fake-api-token") } } }],
        },
      },
    });
    await inet.clearRecords();
    // HTTPS: the sandbox trusts Cubicle's CA (installed by the agent); its own Authorization is replaced.
    assert.equal(await answered(sandbox, inet.https.url, "-H 'Authorization: mine'"), "200");
    assert.equal(await answered(sandbox, inet.http.url), "200");
    const seen = await inet.requests();
    const https = seen.find((r) => r.server === "https");
    const http = seen.find((r) => r.server === "http");
    assert.equal(https?.headers.authorization, `Bearer ${secretValue}`);
    assert.equal(https?.headers["x-cubicle-test"], "static");
    assert.equal(http?.headers["x-plain"], secretValue);
    // Nowhere inside: every process's environment and readable memory, and the files it wrote.
    await sandbox.files.write(
      "/tmp/scan.py",
      `import os, re, sys
needle = sys.argv[1][::-1].encode()
hits = []
for pid in filter(str.isdigit, os.listdir('/proc')):
    if int(pid) == os.getpid():
        continue
    try:
        if needle in open(f'/proc/{pid}/environ', 'rb').read():
            hits.append(f'env {pid}')
        mem = open(f'/proc/{pid}/mem', 'rb', 0)
        for line in open(f'/proc/{pid}/maps'):
            m = re.match(r'([0-9a-f]+)-([0-9a-f]+) r', line)
            if not m:
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            if end - start > 1 << 30:
                continue
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    hits.append(f'mem {pid} {line.strip()}')
            except OSError:
                pass
    except OSError:
        pass
print('hits', len(hits), hits[:5])
`,
    );
    // The scan finds what is there: a process holding a control string in its memory.
    const control = `control-${Date.now().toString(36)}-marker`;
    await sandbox.commands.run(`/usr/bin/python3 -c "import time; x = ''.join(reversed('${[...control].reverse().join("")}')); time.sleep(60)"`, { background: true, user: "root" });
    await new Promise((resolve) => setTimeout(resolve, 500));
    const found = await sh(sandbox, `/usr/bin/python3 /tmp/scan.py '${[...control].reverse().join("")}'`);
    assert.match(found.stdout, /^hits [1-9]/, `the scan must see a planted string: ${found.stdout}${found.stderr}`);
    const scan = await sh(sandbox, `/usr/bin/python3 /tmp/scan.py '${[...secretValue].reverse().join("")}'`);
    assert.match(scan.stdout, /^hits 0 /, scan.stdout + scan.stderr);
    const files = await sh(sandbox, `grep -rl -- '${secretValue.slice(0, 8)}' /tmp /root /home /etc 2>/dev/null | grep -v scan.py; true`);
    assert.equal(files.stdout.trim(), "");

    // A rotated secret is used from the next request on; a deleted one is never sent (502).
    const rotated = `${secretValue}-v2`;
    await Secret.update("fake-api-token", rotated);
    await inet.clearRecords();
    assert.equal(await answered(sandbox, inet.https.url), "200");
    assert.equal((await inet.requests()).find((r) => r.server === "https")?.headers.authorization, `Bearer ${rotated}`);
    await Secret.destroy("fake-api-token");
    await inet.clearRecords();
    assert.equal(await answered(sandbox, inet.https.url), "502");
    assert.equal((await inet.requests()).length, 0, "nothing reached the server without its secret");
  });

  test("credentials go only to the address the sandbox's DNS gave for the name", async () => {
    await inet.assertRouted(inet.evil.address);
    await Secret.create("pinned-token", "pinned-secret-value");
    const sandbox = await create({ network: { rules: { [inet.http.name]: [{ transform: { headers: { "X-Token": Secret.fill("pinned-token") } } }] } } });
    await inet.clearRecords();
    // The Host names the rule's host, the address is the evil one: no header goes there.
    assert.equal(await status(sandbox, inet.http.url, `--resolve ${inet.http.name}:80:${inet.evil.address}`), "000");
    assert.equal((await inet.requests()).filter((r) => JSON.stringify(r.headers).includes("pinned-secret-value")).length, 0);
  });
});

describe("header rules over HTTP/2 (H2C_NOTE)", () => {
  test("h2 through TLS's ALPN and cleartext h2 with prior knowledge reach h2 servers with the headers set; an h2 client of an HTTP/1.1 server too", async () => {
    await inet.assertRouted(inet.https.address);
    await inet.assertRouted(inet.http.address);
    const sandbox = await create({
      network: {
        rules: {
          [inet.https.name]: [{ transform: { headers: { Authorization: "Bearer h2-rule" } } }],
          [inet.http.name]: [{ transform: { headers: { Authorization: "Bearer h2c-rule" } } }],
          "vhost.fake.test": [{ transform: { headers: { Authorization: "Bearer vhost-rule" } } }],
        },
      },
    });
    await inet.clearRecords();
    // Every request here must be answered: like answered(), "no answer within 8 s" is tried twice more.
    const curl = async (args: string) => {
      const once = async () => (await sh(sandbox, `curl -s -o /dev/null -w '%{http_version} %{http_code}' -m 8 -H 'Authorization: mine' ${args}`)).stdout.trim();
      let got = await once();
      for (let retry = 0; retry < 2 && got.endsWith("000"); retry++) got = await once();
      return got;
    };
    assert.equal(await curl(`--http2 'https://${inet.https.name}:8443/over/tls'`), "2 200");
    assert.equal(await curl(`--http2-prior-knowledge 'http://${inet.http.name}:8080/cleartext'`), "2 200");
    assert.equal(await curl(`--http2 '${inet.https.url}h1/server'`), "2 200", "the sandbox speaks h2 to the proxy, the proxy HTTP/1.1 to the server");
    // A second name with its own rule on the same address: its cleartext h2 requests carry its own headers.
    assert.equal(await curl(`--http2-prior-knowledge 'http://vhost.fake.test:8080/vhost'`), "2 200");
    const seen = await inet.requests();
    const byPath = (p: string) => seen.find((r) => r.path === p);
    assert.equal(byPath("/over/tls")?.server, "h2");
    assert.equal(byPath("/over/tls")?.tlsServername, inet.https.name);
    assert.equal(byPath("/over/tls")?.headers.authorization, "Bearer h2-rule");
    assert.equal(byPath("/cleartext")?.server, "h2c");
    assert.equal(byPath("/cleartext")?.headers.authorization, "Bearer h2c-rule");
    assert.equal(byPath("/vhost")?.headers.authorization, "Bearer vhost-rule");
    assert.equal(byPath("/h1/server")?.server, "https");
    assert.equal(byPath("/h1/server")?.headers.authorization, "Bearer h2-rule");
    // Without rules, cleartext h2 is relayed as it came: the sandbox's own header arrives.
    const plain = await create();
    await inet.clearRecords();
    assert.equal(await answered(plain, `http://${inet.http.name}:8080/plain`, "-H 'Authorization: mine' --http2-prior-knowledge"), "200");
    assert.equal((await inet.requests()).find((r) => r.path === "/plain")?.headers.authorization, "mine");
  });
});

describe("header rules and QUIC (HEADER_HOSTS_NOTE)", () => {
  test("UDP to a name with header rules is refused in the kernel on any port (so HTTP/3 clients use TCP); other sandboxes' UDP to it passes", async () => {
    await inet.assertRouted(inet.echo.address);
    // The echo port stands for QUIC on a port an Alt-Svc names; 443 for its usual one.
    const probe = `/usr/bin/python3 -c "
import socket
address = socket.gethostbyname('${inet.echo.name}')
for port in (${inet.echo.port}, 443):
    q = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); q.settimeout(2); q.connect((address, port)); q.send(b'quic')
    try: q.recv(100); print('answered')
    except ConnectionRefusedError: print('refused')
    except socket.timeout: print('timeout')"`;
    const ruled = await create({ network: { rules: { [inet.echo.name]: [{ transform: { headers: { "X-Test": "1" } } }] } } });
    const plain = await create();
    const [withRules, without] = await Promise.all([sh(ruled, probe), sh(plain, probe)]);
    assert.deepEqual(withRules.stdout.trim().split("\n"), ["refused", "refused"], withRules.stderr);
    assert.equal(without.stdout.trim().split("\n")[0], "answered", without.stderr);
    const udp = (records: AuditRecord[], port: number) => records.filter((r) => r.protocol === "udp" && r.port === port && r.address === inet.echo.address);
    const ruledRecords = await egressRecordsOnce(ruled.sandboxId, (all) => udp(all, 443).some((r) => r.verdict === "denied") && udp(all, inet.echo.port).some((r) => r.verdict === "denied"));
    for (const port of [443, inet.echo.port]) {
      assert.match(udp(ruledRecords, port).find((r) => r.verdict === "denied")?.reason ?? JSON.stringify(ruledRecords), /UDP to a host with header rules/);
      assert.ok(!udp(ruledRecords, port).some((r) => r.verdict === "allowed"), JSON.stringify(udp(ruledRecords, port)));
    }
    const plainRecords = await egressRecordsOnce(plain.sandboxId, (all) => udp(all, 443).length > 0 && udp(all, inet.echo.port).length > 0);
    assert.deepEqual(udp(plainRecords, 443).map((r) => r.verdict), ["allowed"], "without rules the datagram was let through");
    assert.deepEqual(udp(plainRecords, inet.echo.port).map((r) => r.verdict), ["allowed"]);
    // updateNetwork without the rules: the addresses leave the header hosts' set at once.
    await Sandbox.updateNetwork(ruled.sandboxId, {});
    const after = await sh(ruled, probe);
    assert.equal(after.stdout.trim().split("\n")[0], "answered", after.stderr);
    const later = await egressRecordsOnce(ruled.sandboxId, (all) => udp(all, 443).some((r) => r.verdict === "allowed"));
    assert.ok(udp(later, 443).some((r) => r.verdict === "allowed"), JSON.stringify(udp(later, 443)));
  });
});

describe("SOCKS5 egress proxy", () => {
  test("TCP leaves through the user's proxy from the host, and fails closed when it is down", async () => {
    const socks = inet.socks!;
    await inet.assertRouted(socks.address);
    await inet.assertRouted(inet.http.address);
    const sandbox = await create({ network: { egressProxy: { address: `${socks.address}:${socks.port}`, username: socks.username!, password: socks.password! } } });
    await inet.clearRecords();
    assert.equal(await answered(sandbox, inet.http.url), "200");
    const through = await inet.socksConnections();
    assert.ok(through.some((c) => c.address === inet.http.address && c.port === 80), JSON.stringify(through));
    const request = (await inet.requests()).find((r) => r.server === "http");
    // Direct connections arrive from the host's transit address; these came from inside the namespace (the proxy).
    assert.ok(request && request.remoteAddress !== inet.hostTransitAddress, `the server saw the proxy, not the host: ${request?.remoteAddress}`);
    // Nothing of the proxy is visible inside.
    const env = await sh(sandbox, "env; cat /etc/resolv.conf");
    assert.doesNotMatch(env.stdout, new RegExp(`${socks.password}|${socks.address.replaceAll(".", "\\.")}`));
    await inet.stopSocks();
    try {
      assert.equal(await status(sandbox, inet.http.url), "000", "no fallback to a direct connection");
    } finally {
      await inet.startSocks();
    }
    assert.equal(await answered(sandbox, inet.http.url), "200");
    const wrong = await create({ network: { egressProxy: { address: `${socks.address}:${socks.port}`, username: socks.username!, password: "wrong" } } });
    assert.equal(await status(wrong, inet.http.url), "000");
  });
});

interface AuditRecord {
  protocol: string;
  address: string;
  port: number;
  domain?: string;
  verdict: string;
  reason: string;
  bytesOut?: number;
  bytesIn?: number;
  attempts?: number;
}

/** The sandbox's newest 1000 egress records, once `ready` holds for them (or after 8 s, for the test's assertions to say what is missing). */
async function egressRecordsOnce(sandboxId: string, ready: (records: AuditRecord[]) => boolean): Promise<AuditRecord[]> {
  let records: AuditRecord[] = [];
  for (let i = 0; i < 80; i++) {
    const res = await server.api("GET", `/sandboxes/${sandboxId}/network/egress?limit=1000`);
    assert.equal(res.status, 200, JSON.stringify(res.json));
    records = res.json as AuditRecord[];
    if (ready(records)) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return records;
}

describe("egress audit", () => {
  test("allowed and denied TCP, UDP and DNS attempts are recorded, paged, shown by the CLI and counted for Prometheus", async () => {
    await inet.assertRouted(inet.http.address);
    await inet.assertRouted(inet.echo.address);
    await inet.assertRouted(inet.evil.address);
    const sandbox = await create({ network: { denyOut: ["0.0.0.0/0"], allowOut: [inet.http.name, inet.echo.address] } });
    assert.equal(await answered(sandbox, inet.http.url), "200");
    assert.equal(await status(sandbox, `http://${inet.evil.address}/`), "000");
    await sh(sandbox, `/usr/bin/python3 -c "
import socket
for a in ('${inet.echo.address}', '${inet.evil.address}'):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1); s.sendto(b'x', (a, 7))
    try: s.recv(10)
    except Exception: pass"`);
    // A denied packet's record comes when its second ends (KERNEL_LOG_NOTE).
    const records = await egressRecordsOnce(sandbox.sandboxId, (all) => all.some((r) => r.protocol === "udp" && r.verdict === "denied"));
    const find = (pred: (r: (typeof records)[number]) => boolean, what: string) => {
      const hit = records.find(pred);
      assert.ok(hit, `${what} in ${JSON.stringify(records, null, 1)}`);
      return hit!;
    };
    const allowed = find((r) => r.protocol === "tcp" && r.verdict === "allowed" && r.address === inet.http.address, "the allowed HTTP connection");
    assert.equal(allowed.domain, inet.http.name);
    assert.ok((allowed.bytesOut ?? 0) > 0 && (allowed.bytesIn ?? 0) > 0, JSON.stringify(allowed));
    find((r) => r.protocol === "tcp" && r.verdict === "denied" && r.address === inet.evil.address && r.port === 80, "the denied connection");
    find((r) => r.protocol === "dns" && r.verdict === "allowed" && r.domain === inet.http.name, "the allowed DNS query");
    find((r) => r.protocol === "udp" && r.verdict === "allowed" && r.address === inet.echo.address && r.port === 7, "the allowed UDP flow");
    find((r) => r.protocol === "udp" && r.verdict === "denied" && r.address === inet.evil.address, "the denied UDP flow");
    // Paging.
    const first = await server.api("GET", `/sandboxes/${sandbox.sandboxId}/network/egress?limit=1`);
    const next = first.headers.get("x-next-token");
    assert.ok(next);
    const second = await server.api("GET", `/sandboxes/${sandbox.sandboxId}/network/egress?limit=1&nextToken=${encodeURIComponent(next)}`);
    assert.notDeepEqual(second.json, first.json);
    assert.equal((await server.api("GET", `/sandboxes/${sandbox.sandboxId}/network/egress?limit=0`)).status, 400);
    assert.equal((await server.api("GET", "/sandboxes/nosuchsandbox/network/egress")).status, 404);
    // The CLI.
    const cli = execFileSync(process.execPath, [path.join(repoRoot, "dist", "cli.js"), "sandbox", "egress", sandbox.sandboxId], {
      env: { ...process.env, ...server.env, CUBICLE_API_KEY: TEST_API_KEY },
      encoding: "utf8",
    });
    assert.match(cli, new RegExp(inet.evil.address.replaceAll(".", "\\.")));
    assert.match(cli, /denied/);
    // Prometheus.
    const metrics = await fetch(`${server.url}/metrics`, { headers: { "x-api-key": TEST_API_KEY } });
    const text = await metrics.text();
    assert.match(text, /cubicle_egress_connections_total\{protocol="tcp",verdict="denied"\} [1-9]/);
    assert.match(text, /cubicle_egress_bytes_total\{direction="in"\} [1-9]/);
    assert.equal((await fetch(`${server.url}/metrics`)).status, 401);
  });
});

describe("egress audit of UDP flows", () => {
  test("a burst is recorded whole: 500 denied ports each, 2,000 datagrams to one port counted, 200 allowed flows each", async () => {
    await inet.assertRouted(inet.echo.address);
    await inet.assertRouted(inet.evil.address);
    const sandbox = await create({ network: { denyOut: ["0.0.0.0/0"], allowOut: [inet.echo.address] } });
    const sent = await sh(sandbox, `/usr/bin/python3 -c "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(20000, 20500): s.sendto(b'x', ('${inet.evil.address}', port))
for _ in range(2000): s.sendto(b'x', ('${inet.evil.address}', 9))
flows = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(200)]
for f in flows: f.sendto(b'y', ('${inet.echo.address}', 7))
print('sent')"`);
    assert.equal(sent.stdout.trim(), "sent", sent.stderr);
    const flood = (records: AuditRecord[]) => records.filter((r) => r.protocol === "udp" && r.verdict === "denied" && r.port === 9).reduce((sum, r) => sum + (r.attempts ?? 1), 0);
    const scanned = (records: AuditRecord[]) => new Set(records.filter((r) => r.protocol === "udp" && r.verdict === "denied" && r.port >= 20000 && r.port < 20500).map((r) => r.port)).size;
    const allowed = (records: AuditRecord[]) => records.filter((r) => r.protocol === "udp" && r.verdict === "allowed" && r.address === inet.echo.address).length;
    const records = await egressRecordsOnce(sandbox.sandboxId, (all) => scanned(all) === 500 && flood(all) === 2000 && allowed(all) === 200);
    assert.equal(scanned(records), 500, "each denied port has its record");
    assert.equal(flood(records), 2000, "every datagram to the one port is counted");
    assert.ok(records.filter((r) => r.port === 9).length <= 5, "folded into a record a second");
    assert.equal(allowed(records), 200, "each allowed flow has its record");
    const metrics = await (await fetch(`${server.url}/metrics`, { headers: { "x-api-key": TEST_API_KEY } })).text();
    const deniedUdp = Number(/cubicle_egress_connections_total\{protocol="udp",verdict="denied"\} (\d+)/.exec(metrics)?.[1]);
    assert.ok(deniedUdp >= 2500, `the counters count attempts: ${deniedUdp}`);
  });

  test("an allowed UDP flow's record gets the whole flow's bytes both ways once it ends (here: its sandbox is killed)", async () => {
    await inet.assertRouted(inet.echo.address);
    const sandbox = await create({ network: { denyOut: ["0.0.0.0/0"], allowOut: [inet.echo.address] } });
    // Three datagrams of 100 bytes from one socket (one flow), each echoed back.
    const sent = await sh(sandbox, `/usr/bin/python3 -c "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
got = 0
for _ in range(3):
    s.sendto(b'x' * 100, ('${inet.echo.address}', 7)); got += len(s.recv(1000))
print(got)"`);
    assert.equal(sent.stdout.trim(), "300", sent.stderr);
    await egressRecordsOnce(sandbox.sandboxId, (all) => all.some((r) => r.protocol === "udp" && r.verdict === "allowed"));
    const flowRecord = async () => {
      const res = await server.api("GET", `/sandboxes/${sandbox.sandboxId}/network/egress?limit=100`);
      assert.equal(res.status, 200, JSON.stringify(res.json));
      return (res.json as { protocol: string; address: string; verdict: string; bytesOut?: number; bytesIn?: number }[]).find((r) => r.protocol === "udp" && r.verdict === "allowed" && r.address === inet.echo.address);
    };
    const first = await flowRecord();
    assert.ok(first, "the flow is recorded from its first packet");
    assert.equal(first.bytesOut, 128, "until the flow ends: the first packet's size");
    await sandbox.kill();
    let ended = first;
    for (let i = 0; i < 50 && ended.bytesIn === undefined; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      ended = (await flowRecord()) ?? ended;
    }
    // Three 128-byte packets (100 bytes, 28 of IP and UDP headers) each way.
    assert.equal(ended.bytesOut, 384, JSON.stringify(ended));
    assert.equal(ended.bytesIn, 384, JSON.stringify(ended));
  });
});

describe("private ingress", () => {
  test("httpsPorts: the router reaches a listed port over TLS (a certificate nobody could verify); getInfo shows the ports", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbs-e2e-https-ports-"));
    try {
      const credentials = await (await openCertificateAuthority(path.join(dir, "ca"))).issue(["sandbox-own.invalid"]);
      const sandbox = await create({ network: { httpsPorts: [8443] } });
      await sandbox.files.write("/tmp/tls/key.pem", String(credentials.key));
      await sandbox.files.write("/tmp/tls/cert.pem", String(credentials.cert));
      await sandbox.files.write(
        "/tmp/tls-echo.py",
        `import ssl
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'over tls'
        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
server = HTTPServer(('0.0.0.0', 8443), H)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); context.load_cert_chain('/tmp/tls/cert.pem', '/tmp/tls/key.pem')
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
`,
      );
      await sandbox.commands.run("/usr/bin/python3 /tmp/tls-echo.py", { background: true });
      const res = await fetchUntilServed(`${server.url}/`, { "e2b-sandbox-id": sandbox.sandboxId, "e2b-sandbox-port": "8443" });
      assert.equal(res.status, 200);
      assert.equal(await res!.text(), "over tls");
      const info = await Sandbox.getInfo(sandbox.sandboxId);
      assert.deepEqual((info as { network?: { httpsPorts?: number[] } }).network?.httpsPorts, [8443]);
      await assert.rejects(create({ network: { httpsPorts: [49983] } }), /49983/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test("allowPublicTraffic: false needs the traffic access token; maskRequestHost rewrites the Host", async () => {
    const sandbox = await create({ network: { allowPublicTraffic: false, maskRequestHost: "localhost:${PORT}" } });
    assert.ok(sandbox.trafficAccessToken, "create returns the token");
    await sandbox.files.write(
      "/tmp/host-echo.py",
      `from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = (self.headers.get('Host') or '').encode()
        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
HTTPServer(('0.0.0.0', 8080), H).serve_forever()
`,
    );
    await sandbox.commands.run("/usr/bin/python3 /tmp/host-echo.py", { background: true });
    const url = `${server.url}/`;
    const headers = { "e2b-sandbox-id": sandbox.sandboxId, "e2b-sandbox-port": "8080" };
    const ok = await fetchUntilServed(url, { ...headers, "e2b-traffic-access-token": sandbox.trafficAccessToken! });
    assert.equal(ok.status, 200);
    assert.equal(await ok.text(), "localhost:8080");
    const missing = await fetch(url, { headers });
    assert.equal(missing.status, 403);
    assert.equal((await missing.json()).code, 403);
    assert.equal((await fetch(url, { headers: { ...headers, "e2b-traffic-access-token": "wrong" } })).status, 403);
    // envd keeps its own token: the SDK's calls go on working.
    assert.equal((await sandbox.commands.run("echo fine")).stdout.trim(), "fine");
    const info = await Sandbox.getInfo(sandbox.sandboxId);
    assert.equal((info as { trafficAccessToken?: string }).trafficAccessToken ?? sandbox.trafficAccessToken, sandbox.trafficAccessToken);
  });
});
