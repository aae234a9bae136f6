/**
 * Network policy with real packets that never leave this machine: fake "internet" hosts live in
 * a namespace of the fake-internet harness (198.18.n.0/24, routed through its veth; every test
 * checks the route with assertRouted before it makes a sandbox send anything there). Sandboxes
 * are made through the official `e2b` SDK with `network` options and poked from inside with
 * curl, getent and python. Private, metadata, host and other addresses that appear here are
 * denied by Cubicle before any packet is sent (the proxy never connects; the kernel drops).
 */
import assert from "node:assert/strict";
import os from "node:os";
import { after, before, describe, test } from "node:test";
import { Sandbox, type SandboxOpts } from "e2b";
import { startEgressTestEnv, type EgressTestEnv } from "../support/egress-test-env.js";
import type { FakeInternet } from "../support/fake-internet.js";
import { runAsRoot } from "../support/sandbox-shell.js";
import { e2eRuntime, sandboxAddressOf, type TestServer } from "./harness.js";

let env: EgressTestEnv;
let server: TestServer;
let inet: FakeInternet;

before(async () => {
  // Creates claim a warm-pool entry when one is ready: its open policy must be replaced by the
  // create's before the first command (the allowlist tests wait for one, below).
  env = await startEgressTestEnv({ extraEnv: { CUBICLE_POOL_SIZE: "base=1" } });
  ({ server, inet } = env);
});

after(async () => {
  await env?.close();
});

const create = (opts: SandboxOpts = {}) => env.create(opts);
const sh = runAsRoot;

/** Waits until the base template's pool entry is ready, so the next create is a claim. */
async function poolReady(): Promise<void> {
  for (let i = 0; i < 600; i++) {
    if (JSON.stringify((await server.api("GET", "/pools")).json).includes('"ready":1')) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error("the warm pool did not fill");
}

/** curl's HTTP status for a URL from inside the sandbox ("000" when no connection). */
async function status(sandbox: Sandbox, url: string, extra = ""): Promise<string> {
  const result = await sh(sandbox, `curl -s -o /dev/null -w '%{http_code}' -m 5 --cacert /tmp/fake-ca.pem ${extra} '${url}'`);
  return result.stdout.trim() || "000";
}

async function trustFakeCa(sandbox: Sandbox): Promise<void> {
  await sandbox.files.write("/tmp/fake-ca.pem", inet.caCertificatePem);
}

/** A UDP datagram to the fake echo service; "echo" when it came back, "none" otherwise. */
async function udpEcho(sandbox: Sandbox, address: string): Promise<string> {
  const script = `import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
try:
    s.sendto(b'ping', ('${address}', 7)); print('echo' if s.recvfrom(100)[0] == b'ping' else 'other')
except Exception:
    print('none')`;
  await sandbox.files.write("/tmp/udp.py", script);
  return (await sh(sandbox, "/usr/bin/python3 /tmp/udp.py")).stdout.trim();
}

describe("without a policy", () => {
  test("public hosts are reached by name over HTTP, HTTPS and UDP; private, metadata and host addresses are not", async () => {
    for (const address of [inet.http.address, inet.https.address, inet.echo.address]) await inet.assertRouted(address);
    const sandbox = await create();
    await trustFakeCa(sandbox);
    assert.equal(await status(sandbox, inet.http.url), "200");
    assert.equal(await status(sandbox, inet.https.url), "200");
    assert.equal(await udpEcho(sandbox, inet.echo.address), "echo");
    const seen = (await inet.requests()).filter((r) => r.server === "http");
    assert.ok(seen.length > 0, "the fake server saw the request");
    // Denied by Cubicle before anything is sent: the proxy refuses without connecting, the
    // kernel drops UDP in the forward chain.
    const hostAddress = Object.values(os.networkInterfaces()).flat().find((a) => a?.family === "IPv4" && !a.internal)!.address;
    const apiPort = new URL(server.url).port;
    for (const url of ["http://10.1.2.3/", "http://169.254.169.254/latest/meta-data/", "http://192.168.1.1/", "http://100.64.0.1/", `http://${hostAddress}:${apiPort}/health`]) {
      // The kernel drops these: the connect would wait for its timeout.
      assert.equal(await status(sandbox, url, "--connect-timeout 1"), "000", url);
    }
    assert.equal(await udpEcho(sandbox, "10.1.2.3"), "none");
    // Another sandbox: its address answers the host (the router), never a sandbox.
    const other = await create();
    await other.commands.run(`/usr/bin/python3 -c "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 9000)); s.listen(); c, _ = s.accept(); c.sendall(b'hello')"`, { background: true, user: "root" });
    // A container sees its sandbox address; a microVM's guest has its own behind it (GUEST_NETWORK_NOTE).
    const seenInside = (await sh(other, `/usr/bin/python3 -c "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('${inet.http.address}', 9)); print(s.getsockname()[0])"`)).stdout.trim();
    const otherAddress = sandboxAddressOf(other.sandboxId);
    assert.match(otherAddress, /^10\./);
    assert.equal(seenInside, e2eRuntime === "microvm" ? "169.254.0.2" : otherAddress);
    const fromOther = await sh(other, `/usr/bin/python3 -c "import socket; print(socket.create_connection(('${otherAddress}', 9000), timeout=3).recv(10))"`);
    assert.match(fromOther.stdout, /hello/, "the listener works from its own sandbox");
    await other.commands.run(`/usr/bin/python3 -c "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 9000)); s.listen(); c, _ = s.accept(); c.sendall(b'hello')"`, { background: true, user: "root" });
    const crossed = await sh(sandbox, `/usr/bin/python3 -c "import socket; print(socket.create_connection(('${otherAddress}', 9000), timeout=3).recv(10))"`);
    assert.doesNotMatch(crossed.stdout, /hello/, "one sandbox reaches another");
  });
});

describe("allowInternetAccess: false", () => {
  test("nothing leaves: no TCP, no UDP, not even a DNS answer", async () => {
    await inet.assertRouted(inet.http.address);
    const sandbox = await create({ allowInternetAccess: false });
    assert.equal(await status(sandbox, `http://${inet.http.address}/`), "000");
    assert.equal(await udpEcho(sandbox, inet.echo.address), "none");
    await inet.clearRecords();
    assert.notEqual((await sh(sandbox, `getent hosts ${inet.http.name}`)).exitCode, 0);
    assert.equal((await inet.dnsQueries()).length, 0, "no query reached the upstream resolver");
  });
});

describe("an allowlist (denyOut 0.0.0.0/0 + allowOut)", () => {
  test("allowed names and addresses pass; every bypass is denied", async () => {
    for (const address of [inet.http.address, inet.https.address, inet.evil.address, inet.echo.address]) await inet.assertRouted(address);
    await poolReady();
    const sandbox = await create({ network: { denyOut: ["0.0.0.0/0"], allowOut: [inet.http.name, inet.https.name, `${inet.echo.address}/32`] } });
    await trustFakeCa(sandbox);
    assert.equal(await status(sandbox, inet.http.url), "200");
    assert.equal(await status(sandbox, inet.https.url), "200");
    assert.equal(await udpEcho(sandbox, inet.echo.address), "echo", "an allowed address");
    // A name outside the list does not even resolve (no DNS exfiltration through its queries).
    await inet.clearRecords();
    assert.notEqual((await sh(sandbox, `getent hosts ${inet.evil.name}`)).exitCode, 0);
    assert.equal((await inet.dnsQueries()).filter((q) => q.name === inet.evil.name).length, 0);
    // Hard-coded address of a host not in the list.
    assert.equal(await status(sandbox, `http://${inet.evil.address}/`), "000");
    // An allowed Host header or SNI sent to another address.
    assert.equal(await status(sandbox, `http://${inet.evil.address}/`, `-H 'Host: ${inet.http.name}'`), "000");
    assert.equal(await status(sandbox, inet.https.url, `--resolve ${inet.https.name}:443:${inet.evil.address}`), "000");
    assert.equal(await status(sandbox, inet.http.url, `--resolve ${inet.http.name}:80:${inet.evil.address}`), "000");
    // Another resolver: port 53 anywhere is Cubicle's forwarder, which refuses the name.
    const otherResolver = await sh(sandbox, `/usr/bin/python3 -c "
import socket, struct
q = struct.pack('>HHHHHH', 0x1234, 0x0100, 1, 0, 0, 0) + b''.join(bytes([len(p)]) + p.encode() for p in '${inet.evil.name}'.split('.')) + b'\\x00\\x00\\x01\\x00\\x01'
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); s.sendto(q, ('${inet.dns.address}', 53))
r = s.recv(512); print('rcode', r[3] & 15, 'answers', struct.unpack('>H', r[6:8])[0])"`);
    assert.match(otherResolver.stdout, /rcode 5 answers 0/, otherResolver.stderr);
    // DNS over TCP, to any address: the same forwarder, the same answer.
    const overTcp = await sh(sandbox, `/usr/bin/python3 -c "
import socket, struct
q = struct.pack('>HHHHHH', 0x4321, 0x0100, 1, 0, 0, 0) + b''.join(bytes([len(p)]) + p.encode() for p in '${inet.evil.name}'.split('.')) + b'\\x00\\x00\\x01\\x00\\x01'
s = socket.create_connection(('${inet.dns.address}', 53), timeout=3); s.sendall(struct.pack('>H', len(q)) + q)
r = s.recv(2 + 512)[2:]; print('rcode', r[3] & 15, 'answers', struct.unpack('>H', r[6:8])[0])"`);
    assert.match(overTcp.stdout, /rcode 5 answers 0/, overTcp.stderr);
    // UDP to an address not in the list.
    assert.equal(await udpEcho(sandbox, inet.evil.address), "none");
    if (e2eRuntime === "container") {
      // Raw sockets and ICMP: the sandbox's root has no CAP_NET_RAW in its namespace.
      const raw = await sh(sandbox, `/usr/bin/python3 -c "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)"`);
      assert.notEqual(raw.exitCode, 0);
      assert.match(raw.stderr, /PermissionError|Operation not permitted/);
    } else {
      // A guest's root owns its kernel and sends raw packets; the host's rules judge them as
      // any others: an echo request answered from an allowed address, none from another.
      const ping = (address: string) =>
        sh(sandbox, `/usr/bin/python3 -c "
import socket, struct, sys
def checksum(b):
    s = sum(struct.unpack('>%dH' % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); return ~(s + (s >> 16)) & 0xffff
body = struct.pack('>BBHHH', 8, 0, 0, 0x77, 1) + b'cubicle!'
packet = body[:2] + struct.pack('>H', checksum(body)) + body[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(3); s.sendto(packet, ('${address}', 0))
try:
    while True:
        data, peer = s.recvfrom(2048)
        if peer[0] == '${address}' and data[20] == 0: print('reply'); break
except socket.timeout:
    print('none')"`);
      assert.equal((await ping(inet.echo.address)).stdout.trim(), "reply", "raw ICMP to an allowed address");
      assert.equal((await ping(inet.evil.address)).stdout.trim(), "none", "raw ICMP to another address is dropped on the host");
    }
    // IPv6: none at all.
    const v6 = await sh(sandbox, `/usr/bin/python3 -c "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s.settimeout(2); s.connect(('2001:db8::1', 80))"`);
    assert.notEqual(v6.exitCode, 0);
  });

  test("DNS rebinding to a private or loopback address is denied at the connection", async () => {
    await inet.assertRouted(inet.rebind.publicAddress);
    const sandbox = await create({ network: { denyOut: ["0.0.0.0/0"], allowOut: [inet.rebind.name] } });
    const first = await status(sandbox, `http://${inet.rebind.name}/`);
    const second = await status(sandbox, `http://${inet.rebind.name}/`);
    // One of the two answers is 127.0.0.1: that connection must fail; the public one succeeds.
    assert.deepEqual([first, second].sort(), ["000", "200"]);
  });
});

describe("updateNetwork", () => {
  test("replaces the policy at once and cuts open connections it no longer allows", async () => {
    await inet.assertRouted(inet.echo.address);
    const sandbox = await create();
    // A TCP connection to the echo service that stays open and reports whether it still echoes.
    await sandbox.files.write(
      "/tmp/hold.py",
      `import socket, time, sys
s = socket.create_connection(('${inet.echo.address}', 7), timeout=3)
for i in range(40):
    try:
        s.sendall(b'x'); d = s.recv(10)
        print('ok' if d else 'closed', flush=True)
        if not d: break
    except Exception as e:
        print('cut', type(e).__name__, flush=True); break
    time.sleep(0.25)
`,
    );
    const lines: string[] = [];
    const held = await sandbox.commands.run("/usr/bin/python3 /tmp/hold.py", { background: true, onStdout: (d) => void lines.push(...d.trim().split("\n")) });
    const deadline = Date.now() + 10_000;
    while (!lines.includes("ok") && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    assert.ok(lines.includes("ok"), `the connection works first: ${lines.join(",")}`);
    const started = performance.now();
    await sandbox.updateNetwork({ denyOut: ["0.0.0.0/0"] });
    const updateMs = performance.now() - started;
    await held.wait().catch(() => undefined);
    assert.ok(lines.some((l) => l.startsWith("cut") || l === "closed"), `the open connection was cut: ${lines.join(",")}`);
    assert.equal(await status(sandbox, `http://${inet.http.address}/`), "000");
    assert.equal(await udpEcho(sandbox, inet.echo.address), "none");
    // And back: allow the echo address again.
    await sandbox.updateNetwork({ denyOut: ["0.0.0.0/0"], allowOut: [inet.echo.address] });
    assert.equal(await udpEcho(sandbox, inet.echo.address), "echo");
    const info = await sandbox.getInfo();
    assert.deepEqual((info as { network?: { allowOut?: string[] } }).network?.allowOut, [inet.echo.address]);
    console.log(`updateNetwork took ${updateMs.toFixed(1)} ms`);
  });

  test("refuses what it cannot enforce with a 400, and an unknown sandbox with a 404", async () => {
    const sandbox = await create();
    for (const body of [{ denyOut: ["example.com"] }, { allowOut: ["::1"] }, { allowOut: "1.2.3.4" }, { egressProxy: { address: "nohost" } }, { color: "red" }, { rules: { "*": [] } }]) {
      const res = await server.api("PUT", `/sandboxes/${sandbox.sandboxId}/network`, body);
      assert.equal(res.status, 400, JSON.stringify(body));
      assert.equal(res.json.code, 400);
      assert.equal(typeof res.json.message, "string");
    }
    assert.equal((await server.api("PUT", "/sandboxes/nosuchsandbox/network", {})).status, 404);
  });
});

describe("bandwidth limits", () => {
  test("network.bandwidth caps a sandbox's download and upload rates; without it they are not capped", async () => {
    await inet.assertRouted(inet.http.address);
    const bytes = 3 * 1024 * 1024;
    const rates = async (sandbox: Sandbox) => {
      const down = await sh(sandbox, `curl -s -o /dev/null -m 30 -w '%{speed_download}' http://${inet.http.address}/bytes/${bytes}`);
      const up = await sh(sandbox, `head -c ${bytes} /dev/zero | curl -s -o /dev/null -m 30 -w '%{speed_upload}' --data-binary @- http://${inet.http.address}/upload`);
      return { downMbps: (Number(down.stdout) * 8) / 1e6, upMbps: (Number(up.stdout) * 8) / 1e6 };
    };
    // A microVM under TCG moves ~25 Mbit/s on a busy CI host: lower limits there, so that the
    // uncapped sandbox is still well above them.
    const limits = e2eRuntime === "microvm" ? { ingressMbps: 4, egressMbps: 3 } : { ingressMbps: 16, egressMbps: 12 };
    // A Cubicle extension: the SDK sends only E2B's network fields, so this create is a REST call.
    const made = await server.api("POST", "/v2/sandboxes", { templateID: "base", timeout: 120, network: { bandwidth: limits } });
    assert.equal(made.status, 201, JSON.stringify(made.json));
    const limited = env.track(await Sandbox.connect(made.json.sandboxID));
    assert.deepEqual((await server.api("GET", `/sandboxes/${limited.sandboxId}`)).json.network?.bandwidth, limits);
    const free = await create();
    const capped = await rates(limited);
    const uncapped = await rates(free);
    // Shaping counts whole frames: TCP payload reaches ~96 % of the limit; bursts allow a little over.
    const down = limits.ingressMbps;
    const up = limits.egressMbps;
    assert.ok(capped.downMbps > down * 0.5 && capped.downMbps < down * 1.25, `download ${capped.downMbps.toFixed(1)} Mbit/s against ${down}`);
    assert.ok(capped.upMbps > up * 0.5 && capped.upMbps < up * 1.25, `upload ${capped.upMbps.toFixed(1)} Mbit/s against ${up}`);
    assert.ok(uncapped.downMbps > down * 3 && uncapped.upMbps > up * 3, `unlimited: ${JSON.stringify(uncapped)}`);
    const bad = await server.api("POST", "/v2/sandboxes", { templateID: "base", network: { bandwidth: { egressMbps: -1 } } });
    assert.equal(bad.status, 400);
  });
});

describe("recovery", () => {
  test("a server restart keeps every sandbox's policy enforced", async () => {
    await inet.assertRouted(inet.http.address);
    const open = await create();
    const fenced = await create({ network: { denyOut: ["0.0.0.0/0"], allowOut: [inet.http.name] } });
    const closed = await create({ allowInternetAccess: false });
    // Its egress audit too (AUDIT_PERSISTENCE_NOTE): written within a second, kept across a crash.
    assert.equal(await status(fenced, inet.http.url), "200");
    assert.equal(await status(fenced, `http://${inet.evil.address}/`), "000");
    await new Promise((resolve) => setTimeout(resolve, 1500));
    await server.crashAndRestart();
    const audit = await server.api("GET", `/sandboxes/${fenced.sandboxId}/network/egress?limit=100`);
    assert.equal(audit.status, 200, JSON.stringify(audit.json));
    const kept = audit.json as { protocol: string; address: string; verdict: string; bytesIn?: number }[];
    assert.ok(kept.some((r) => r.protocol === "tcp" && r.verdict === "allowed" && r.address === inet.http.address && (r.bytesIn ?? 0) > 0), JSON.stringify(kept));
    assert.ok(kept.some((r) => r.protocol === "tcp" && r.verdict === "denied" && r.address === inet.evil.address), JSON.stringify(kept));
    assert.equal(await status(open, `http://${inet.evil.address}/`), "200");
    assert.equal(await status(fenced, inet.http.url), "200");
    assert.equal(await status(fenced, `http://${inet.evil.address}/`), "000");
    assert.equal(await status(closed, `http://${inet.http.address}/`), "000");
    assert.equal(await udpEcho(closed, inet.echo.address), "none");
  });
});
