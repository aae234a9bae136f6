/**
 * The fake internet harness (test/support/fake-internet.ts) checked from the host, without
 * sandboxes: every service answers through its route, records what it saw, and close() leaves
 * nothing behind. Also the DNS wire codec it is built on, with bad input.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import dgram from "node:dgram";
import { existsSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import fc from "fast-check";
import { runCommand } from "../../src/shared/exec.js";
import {
  aRecordAddress,
  decodeDnsMessage,
  DNS_RCODE,
  DNS_TYPE,
  DnsWireError,
  dnsMessage,
  encodeDnsMessage,
  encodeDnsQuery,
  frameDnsTcp,
  type DnsMessage,
} from "../support/dns-wire.js";
import { assertRouted, startFakeInternet, type FakeInternet } from "../support/fake-internet.js";

const harnessPath = fileURLToPath(new URL("../support/fake-internet.ts", import.meta.url));
const repoRoot = fileURLToPath(new URL("../..", import.meta.url));
const WAIT_MS = 5_000;

// --- small clients -----------------------------------------------------------------------------

interface HttpAnswer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

function request(
  module: typeof http | typeof https,
  options: https.RequestOptions,
  body?: string,
): Promise<HttpAnswer> {
  return new Promise((resolve, reject) => {
    const req = module.request({ agent: false, timeout: WAIT_MS, ...options }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (chunk: Buffer) => chunks.push(chunk));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on("error", reject);
    });
    req.on("timeout", () => req.destroy(new Error(`request to ${options.host} timed out`)));
    req.on("error", reject);
    req.end(body);
  });
}

function udpExchange(address: string, port: number, payload: Buffer, waitMs = WAIT_MS): Promise<Buffer | undefined> {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket("udp4");
    const timer = setTimeout(() => {
      socket.close();
      resolve(undefined);
    }, waitMs);
    socket.on("message", (message) => {
      clearTimeout(timer);
      socket.close();
      resolve(message);
    });
    socket.on("error", (err) => {
      clearTimeout(timer);
      socket.close();
      reject(err);
    });
    socket.send(payload, port, address);
  });
}

async function dnsOverUdp(inet: FakeInternet, name: string, type: number = DNS_TYPE.A): Promise<DnsMessage> {
  await inet.assertRouted(inet.dns.address);
  const id = Math.floor(Math.random() * 0xffff);
  const reply = await udpExchange(inet.dns.address, 53, encodeDnsQuery(id, name, type));
  assert.ok(reply, `no DNS answer for ${name}`);
  const message = decodeDnsMessage(reply);
  assert.equal(message.id, id);
  return message;
}

/** Connects, writes `payload` in `chunkBytes` pieces, and reads until `until` says enough or the peer closes. */
function tcpExchange(address: string, port: number, payload: Buffer, until: (received: Buffer) => boolean, chunkBytes = 1 << 16): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: address, port });
    const chunks: Buffer[] = [];
    const finish = () => {
      socket.destroy();
      resolve(Buffer.concat(chunks));
    };
    socket.setTimeout(WAIT_MS, () => {
      socket.destroy();
      reject(new Error(`TCP exchange with ${address}:${port} timed out after ${Buffer.concat(chunks).length} bytes`));
    });
    socket.on("error", reject);
    socket.on("connect", async () => {
      for (let offset = 0; offset < payload.length; offset += chunkBytes) {
        socket.write(payload.subarray(offset, offset + chunkBytes));
        if (chunkBytes < 16) await new Promise((r) => setImmediate(r));
      }
    });
    socket.on("data", (chunk: Buffer) => {
      chunks.push(chunk);
      if (until(Buffer.concat(chunks))) finish();
    });
    socket.on("end", finish);
  });
}

/** Reads length-prefixed DNS messages out of a TCP stream. */
function tcpDnsMessages(stream: Buffer): DnsMessage[] {
  const messages: DnsMessage[] = [];
  let offset = 0;
  while (offset + 2 <= stream.length) {
    const length = stream.readUInt16BE(offset);
    if (offset + 2 + length > stream.length) break;
    messages.push(decodeDnsMessage(stream.subarray(offset + 2, offset + 2 + length)));
    offset += 2 + length;
  }
  return messages;
}

/** A SOCKS5 CONNECT (RFC 1928, no authentication); resolves to the tunnel, rejects with the reply code. */
function socks5Connect(proxy: { address: string; port: number }, target: string, port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: proxy.address, port: proxy.port });
    let buffered = Buffer.alloc(0);
    let step: "method" | "reply" = "method";
    socket.setTimeout(WAIT_MS, () => socket.destroy(new Error("SOCKS5 handshake timed out")));
    socket.on("error", reject);
    socket.on("close", () => reject(new Error(`SOCKS5 server closed the connection during ${step}`)));
    socket.on("connect", () => socket.write(Buffer.from([5, 1, 0])));
    socket.on("data", function onData(chunk: Buffer) {
      buffered = Buffer.concat([buffered, chunk]);
      if (step === "method") {
        if (buffered.length < 2) return;
        if (buffered[1] !== 0) return socket.destroy(new Error(`SOCKS5 method refused: ${buffered[1]}`));
        buffered = buffered.subarray(2);
        step = "reply";
        const isIp = net.isIPv4(target);
        const address = isIp ? Buffer.from(target.split(".").map(Number)) : Buffer.concat([Buffer.from([target.length]), Buffer.from(target, "latin1")]);
        const portBytes = Buffer.alloc(2);
        portBytes.writeUInt16BE(port, 0);
        socket.write(Buffer.concat([Buffer.from([5, 1, 0, isIp ? 1 : 3]), address, portBytes]));
      }
      if (step === "reply") {
        if (buffered.length < 10) return;
        if (buffered[1] !== 0) return socket.destroy(Object.assign(new Error(`SOCKS5 CONNECT refused with reply ${buffered[1]}`), { reply: buffered[1] }));
        socket.off("data", onData);
        socket.setTimeout(0);
        socket.removeAllListeners("close");
        socket.removeAllListeners("error");
        resolve(socket);
      }
    });
  });
}

async function exists(kind: "netns" | "link" | "route" | "pid", name: string): Promise<boolean> {
  switch (kind) {
    case "netns":
      return (await runCommand(["ip", "netns", "list"])).stdout.split("\n").some((line) => line.split(" ")[0] === name);
    case "link":
      return existsSync(path.join("/sys/class/net", name));
    case "route":
      return (JSON.parse((await runCommand(["ip", "-j", "route", "show", name])).stdout) as unknown[]).length > 0;
    case "pid":
      try {
        process.kill(Number(name), 0);
        return true;
      } catch {
        return false;
      }
  }
}

async function assertGone(inet: FakeInternet): Promise<void> {
  assert.equal(await exists("netns", inet.namespace), false, "namespace left behind");
  assert.equal(await exists("link", inet.hostInterface), false, "veth left behind");
  assert.equal(await exists("route", inet.serviceCidr), false, "route left behind");
  // A server whose owner was killed is reparented and reaped a moment later.
  for (let i = 0; i < 40 && (await exists("pid", String(inet.childPid))); i++) await new Promise((r) => setTimeout(r, 50));
  assert.equal(await exists("pid", String(inet.childPid)), false, "server process left behind");
  assert.equal(existsSync(path.dirname(inet.caCertificateFile)), false, "temp dir left behind");
  assert.equal(existsSync(path.join("/etc/netns", inet.namespace)), false, "/etc/netns entry left behind");
}

// --- the codec -------------------------------------------------------------------------------

describe("DNS wire codec", () => {
  test("a query and an answer survive encoding and decoding", () => {
    const query = decodeDnsMessage(encodeDnsQuery(0x1234, "Api.Fake.Test.", DNS_TYPE.AAAA));
    assert.deepEqual(query.questions, [{ name: "Api.Fake.Test", type: DNS_TYPE.AAAA, class: 1 }]);
    assert.equal(query.rd, true);
    assert.equal(query.qr, false);
    const answer = dnsMessage({ id: 7, qr: true, aa: true, rcode: DNS_RCODE.NXDOMAIN, questions: query.questions });
    answer.answers.push({ name: "a.test", type: DNS_TYPE.A, class: 1, ttl: 300, data: Buffer.from([198, 18, 0, 1]) });
    const decoded = decodeDnsMessage(encodeDnsMessage(answer));
    assert.equal(decoded.aa, true);
    assert.equal(decoded.rcode, DNS_RCODE.NXDOMAIN);
    assert.equal(aRecordAddress(decoded.answers[0]!), "198.18.0.1");
    assert.equal(decoded.answers[0]!.ttl, 300);
  });

  test("a compressed answer name is followed back to the question", () => {
    const query = encodeDnsQuery(1, "http.fake.test");
    const answer = Buffer.concat([query, Buffer.from([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 0, 10])]);
    answer.writeUInt16BE(1, 6); // ANCOUNT
    const decoded = decodeDnsMessage(answer);
    assert.equal(decoded.answers[0]!.name, "http.fake.test");
    assert.equal(aRecordAddress(decoded.answers[0]!), "198.18.0.10");
  });

  test("malformed messages are refused with DnsWireError", () => {
    const header = (qdcount: number) => Buffer.from([0, 1, 0, 0, 0, qdcount, 0, 0, 0, 0, 0, 0]);
    const cases: [string, Buffer][] = [
      ["short header", Buffer.from([1, 2, 3])],
      ["question cut short", Buffer.concat([header(1), Buffer.from([4, 0x61])])],
      ["pointer to itself", Buffer.concat([header(1), Buffer.from([0xc0, 12, 0, 1, 0, 1])])],
      ["forward pointer", Buffer.concat([header(1), Buffer.from([0xc0, 14, 0, 0, 0, 1, 0, 1])])],
      ["pointer ping-pong", Buffer.concat([header(1), Buffer.from([1, 0x61, 0xc0, 12, 0, 1, 0, 1])])],
      ["dot inside a label", Buffer.concat([header(1), Buffer.from([3, 0x61, 0x2e, 0x62, 0, 0, 1, 0, 1])])],
      ["extended label type", Buffer.concat([header(1), Buffer.from([0x41, 0, 0, 1, 0, 1])])],
      ["trailing bytes", Buffer.concat([encodeDnsQuery(1, "a.test"), Buffer.from([0])])],
      ["a thousand claimed questions", Buffer.from([0, 1, 0, 0, 0x03, 0xe8, 0, 0, 0, 0, 0, 0])],
      ["name over 255 bytes", Buffer.concat([header(1), Buffer.from(Array.from({ length: 5 }, () => [63, ...Buffer.alloc(63, 0x61)]).flat()), Buffer.from([0, 0, 1, 0, 1])])],
    ];
    for (const [label, bytes] of cases) assert.throws(() => decodeDnsMessage(bytes), DnsWireError, label);
    assert.throws(() => encodeDnsQuery(1, `${"a".repeat(64)}.test`), DnsWireError);
    assert.throws(() => encodeDnsQuery(1, "a..test"), DnsWireError);
  });

  test("random bytes never make the decoder throw anything but DnsWireError", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 600 }), (bytes) => {
        try {
          decodeDnsMessage(Buffer.from(bytes));
        } catch (err) {
          if (!(err instanceof DnsWireError)) throw err;
        }
      }),
      { numRuns: 2_000 },
    );
    // Valid messages with random bytes flipped: deeper into the parser.
    const base = encodeDnsMessage({
      ...dnsMessage({ id: 9, qr: true, questions: [{ name: "x.fake.test", type: 1, class: 1 }] }),
      answers: [{ name: "x.fake.test", type: 1, class: 1, ttl: 1, data: Buffer.from([1, 2, 3, 4]) }],
    });
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.nat(base.length - 1), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }), (flips) => {
        const bytes = Buffer.from(base);
        for (const [at, value] of flips) bytes[at] = value;
        try {
          decodeDnsMessage(bytes);
        } catch (err) {
          if (!(err instanceof DnsWireError)) throw err;
        }
      }),
      { numRuns: 2_000 },
    );
  });
});

// --- the harness -----------------------------------------------------------------------------

describe("fake internet", () => {
  let inet: FakeInternet;

  before(async () => {
    inet = await startFakeInternet({ dnsTtlSeconds: 7, records: { "custom.fake.test": "198.18.255.254" } });
  });

  after(async () => {
    await inet?.close();
  });

  test("every service address is routed through the harness's veth", async () => {
    assert.match(inet.serviceCidr, /^198\.18\.\d+\.0\/24$/);
    assert.ok(inet.hostInterface.length <= 15);
    for (const address of [inet.http.address, inet.https.address, inet.evil.address, inet.dns.address, inet.echo.address, inet.namespaceTransitAddress]) {
      await inet.assertRouted(address);
      await assertRouted(address);
    }
  });

  test("assertRouted refuses an address the harness does not own, without sending to it", async () => {
    await assert.rejects(inet.assertRouted("203.0.113.1"), /refusing to send/);
    await assert.rejects(assertRouted("203.0.113.1"), /refusing to send/);
    // In the block but not a service: no server there, so nothing to test against.
    await assert.rejects(inet.assertRouted(inet.serviceCidr.replace(/0\/24$/, "200")), /refusing to send/);
    await assert.rejects(inet.assertRouted("127.0.0.1"), /refusing to send/);
    await assert.rejects(inet.assertRouted("-h"), /not an IPv4 address/);
    await assert.rejects(inet.ping("203.0.113.1"), /refusing to send/);
  });

  test("HTTP echoes the method, path, Host and headers, and records them", async () => {
    await inet.clearRecords();
    await inet.assertRouted(inet.http.address);
    const answer = await request(http, {
      host: inet.http.address,
      method: "POST",
      path: "/some/path?q=1",
      headers: { host: inet.http.name, "x-test": "one", "X-Repeated": ["a", "b"] },
    }, "hello");
    assert.equal(answer.status, 200);
    const echo = JSON.parse(answer.body.toString());
    assert.equal(echo.server, "http");
    assert.equal(echo.method, "POST");
    assert.equal(echo.path, "/some/path?q=1");
    assert.equal(echo.host, inet.http.name);
    assert.equal(echo.headers["x-test"], "one");
    assert.equal(echo.bodyBytes, 5);
    assert.deepEqual(echo.rawHeaders.filter(([name]: [string]) => name === "X-Repeated"), [["X-Repeated", "a"], ["X-Repeated", "b"]]);
    const [recorded, ...more] = await inet.requests();
    assert.equal(more.length, 0);
    assert.equal(recorded!.server, "http");
    assert.equal(recorded!.method, "POST");
    assert.equal(recorded!.host, inet.http.name);
    assert.equal(recorded!.headers["x-test"], "one");
    assert.equal(recorded!.bodyBytes, 5);
    assert.equal(recorded!.remoteAddress, inet.hostTransitAddress);
  });

  test("GET /bytes/<n> answers n bytes", async () => {
    await inet.assertRouted(inet.http.address);
    const answer = await request(http, { host: inet.http.address, path: "/bytes/1000000" });
    assert.equal(answer.status, 200);
    assert.equal(answer.body.length, 1_000_000);
  });

  test("HTTPS answers with a certificate the test CA signed, for the fake names", async () => {
    await inet.clearRecords();
    await inet.assertRouted(inet.https.address);
    const answer = await request(https, {
      host: inet.https.address,
      servername: "api.fake.test",
      ca: inet.caCertificatePem,
      path: "/secure",
      headers: { host: "api.fake.test", authorization: "Bearer test" },
    });
    const echo = JSON.parse(answer.body.toString());
    assert.equal(echo.server, "https");
    assert.equal(echo.headers.authorization, "Bearer test");
    assert.equal(echo.tlsServername, "api.fake.test");
    const [recorded] = await inet.requests();
    assert.equal(recorded!.tlsServername, "api.fake.test");
    assert.equal(recorded!.path, "/secure");

    // The apex is on the certificate; the HTTPS address too; a name that is not is refused.
    for (const servername of ["fake.test", "https.fake.test"]) {
      const ok = await request(https, { host: inet.https.address, servername, ca: inet.caCertificatePem, headers: { host: servername } });
      assert.equal(ok.status, 200);
    }
    const byAddress = await request(https, { host: inet.https.address, ca: inet.caCertificatePem });
    assert.equal(byAddress.status, 200);
    await assert.rejects(request(https, { host: inet.https.address, servername: "example.com", ca: inet.caCertificatePem }), /ERR_TLS_CERT_ALTNAME_INVALID|altnames/);
    // Without the test CA the certificate is not trusted.
    await assert.rejects(request(https, { host: inet.https.address, servername: "api.fake.test" }), /certificate|UNABLE_TO_VERIFY/i);
  });

  test("the evil host answers HTTP and HTTPS on its own address", async () => {
    await inet.clearRecords();
    await inet.assertRouted(inet.evil.address);
    const plain = await request(http, { host: inet.evil.address, path: "/steal", headers: { host: inet.evil.name } });
    assert.equal(JSON.parse(plain.body.toString()).server, "evil-http");
    const secure = await request(https, { host: inet.evil.address, servername: "www.evil.test", ca: inet.caCertificatePem, headers: { host: "www.evil.test" } });
    assert.equal(JSON.parse(secure.body.toString()).server, "evil-https");
    assert.deepEqual((await inet.requests()).map((r) => [r.server, r.host]), [["evil-http", "evil.test"], ["evil-https", "www.evil.test"]]);
    // Plain HTTP is not served on the HTTPS address, nor HTTPS on the HTTP one.
    await inet.assertRouted(inet.https.address);
    await assert.rejects(request(http, { host: inet.https.address }), /ECONNREFUSED/);
  });

  test("DNS over UDP answers the configured names with their TTL, NXDOMAIN otherwise", async () => {
    await inet.clearRecords();
    const found = await dnsOverUdp(inet, "HTTP.fake.test");
    assert.equal(found.rcode, DNS_RCODE.NOERROR);
    assert.equal(found.aa, true);
    assert.deepEqual(found.answers.map(aRecordAddress), [inet.http.address]);
    assert.equal(found.answers[0]!.ttl, 7);
    assert.deepEqual((await dnsOverUdp(inet, "multi.fake.test")).answers.map(aRecordAddress), [inet.http.address, inet.https.address]);
    assert.deepEqual((await dnsOverUdp(inet, "custom.fake.test")).answers.map(aRecordAddress), ["198.18.255.254"]);
    assert.deepEqual((await dnsOverUdp(inet, "evil.test")).answers.map(aRecordAddress), [inet.evil.address]);

    const missing = await dnsOverUdp(inet, "nope.fake.test");
    assert.equal(missing.rcode, DNS_RCODE.NXDOMAIN);
    assert.equal(missing.answers.length, 0);
    assert.equal(missing.authorities[0]?.type, DNS_TYPE.SOA);
    assert.equal((await dnsOverUdp(inet, "example.com")).rcode, DNS_RCODE.NXDOMAIN);

    const noAaaa = await dnsOverUdp(inet, "http.fake.test", DNS_TYPE.AAAA);
    assert.equal(noAaaa.rcode, DNS_RCODE.NOERROR);
    assert.equal(noAaaa.answers.length, 0);

    const queries = await inet.dnsQueries();
    assert.deepEqual(
      queries.map((q) => [q.transport, q.name, q.type, q.rcode]),
      [
        ["udp", "http.fake.test", 1, 0],
        ["udp", "multi.fake.test", 1, 0],
        ["udp", "custom.fake.test", 1, 0],
        ["udp", "evil.test", 1, 0],
        ["udp", "nope.fake.test", 1, 3],
        ["udp", "example.com", 1, 3],
        ["udp", "http.fake.test", 28, 0],
      ],
    );
    assert.deepEqual(queries[0]!.answers, [inet.http.address]);
    assert.equal(queries[0]!.remoteAddress, inet.hostTransitAddress);
  });

  test("the rebinding name alternates between a public and a private address, TTL 0", async () => {
    const answers: (string | undefined)[] = [];
    for (let i = 0; i < 3; i++) {
      const reply = await dnsOverUdp(inet, inet.rebind.name);
      assert.equal(reply.answers[0]!.ttl, 0);
      answers.push(aRecordAddress(reply.answers[0]!));
    }
    const { publicAddress, privateAddress } = inet.rebind;
    assert.equal(privateAddress, "127.0.0.1");
    // Whatever came before, consecutive answers alternate.
    assert.ok(
      JSON.stringify(answers) === JSON.stringify([publicAddress, privateAddress, publicAddress]) ||
        JSON.stringify(answers) === JSON.stringify([privateAddress, publicAddress, privateAddress]),
      JSON.stringify(answers),
    );
  });

  test("DNS over TCP answers pipelined queries sent a byte at a time", async () => {
    await inet.clearRecords();
    await inet.assertRouted(inet.dns.address);
    const payload = Buffer.concat([frameDnsTcp(encodeDnsQuery(1, "https.fake.test")), frameDnsTcp(encodeDnsQuery(2, "rebind.fake.test")), frameDnsTcp(encodeDnsQuery(3, "rebind.fake.test")), frameDnsTcp(encodeDnsQuery(4, "gone.fake.test"))]);
    const stream = await tcpExchange(inet.dns.address, 53, payload, (received) => tcpDnsMessages(received).length === 4, 1);
    const replies = tcpDnsMessages(stream);
    assert.deepEqual(replies.map((r) => r.id), [1, 2, 3, 4]);
    assert.deepEqual(replies[0]!.answers.map(aRecordAddress), [inet.https.address]);
    assert.deepEqual(new Set([aRecordAddress(replies[1]!.answers[0]!), aRecordAddress(replies[2]!.answers[0]!)]), new Set([inet.rebind.publicAddress, inet.rebind.privateAddress]));
    assert.equal(replies[3]!.rcode, DNS_RCODE.NXDOMAIN);
    assert.deepEqual((await inet.dnsQueries()).map((q) => [q.transport, q.name]), [["tcp", "https.fake.test"], ["tcp", "rebind.fake.test"], ["tcp", "rebind.fake.test"], ["tcp", "gone.fake.test"]]);
  });

  test("bad DNS input gets FORMERR or silence, and the service keeps answering", async () => {
    await inet.assertRouted(inet.dns.address);
    assert.equal(await udpExchange(inet.dns.address, 53, Buffer.from([1, 2, 3]), 300), undefined);
    const loop = Buffer.from([0xab, 0xcd, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1]);
    const formerr = await udpExchange(inet.dns.address, 53, loop);
    assert.ok(formerr);
    const decoded = decodeDnsMessage(formerr);
    assert.equal(decoded.id, 0xabcd);
    assert.equal(decoded.rcode, DNS_RCODE.FORMERR);
    // A response sent to the server is not answered (no reflection loops).
    const response = encodeDnsMessage(dnsMessage({ id: 5, qr: true, questions: [{ name: "a.fake.test", type: 1, class: 1 }] }));
    assert.equal(await udpExchange(inet.dns.address, 53, response, 300), undefined);
    // Two questions in one query.
    const two = encodeDnsMessage(dnsMessage({ id: 6, questions: [{ name: "a.fake.test", type: 1, class: 1 }, { name: "b.fake.test", type: 1, class: 1 }] }));
    assert.equal(decodeDnsMessage((await udpExchange(inet.dns.address, 53, two))!).rcode, DNS_RCODE.FORMERR);
    // TCP: a frame of garbage, then a frame claiming more bytes than ever come, then closed.
    const garbage = Buffer.concat([Buffer.from([0, 3, 9, 9, 9]), Buffer.from([0xff, 0xff, 1, 2, 3])]);
    await tcpExchange(inet.dns.address, 53, garbage, () => false).catch(() => undefined);
    assert.deepEqual((await dnsOverUdp(inet, "http.fake.test")).answers.map(aRecordAddress), [inet.http.address]);
  });

  test("TCP and UDP echo send back what they get", async () => {
    await inet.assertRouted(inet.echo.address);
    const payload = Buffer.from(Array.from({ length: 200_000 }, (_, i) => i % 251));
    const echoed = await tcpExchange(inet.echo.address, 7, payload, (received) => received.length >= payload.length);
    assert.ok(echoed.equals(payload));
    const datagram = Buffer.from("ping over udp");
    assert.deepEqual(await udpExchange(inet.echo.address, 7, datagram), datagram);
  });

  test("every service address answers ping", async () => {
    for (const address of [inet.http.address, inet.https.address, inet.evil.address, inet.dns.address, inet.echo.address]) {
      const rttMs = await inet.ping(address);
      assert.equal(typeof rttMs, "number", `no echo reply from ${address}`);
    }
  });

  test("SOCKS5 carries a CONNECT, records it, and can be stopped and started", async (t) => {
    const socks = inet.socks;
    if (!socks) return t.skip("test/support/socks5-server.ts is not there: no SOCKS5 service");
    await inet.clearRecords();
    await inet.assertRouted(socks.address);
    const get = async (target: string) => {
      const tunnel = await socks5Connect(socks, target, 80);
      const reply = await new Promise<string>((resolve, reject) => {
        const chunks: Buffer[] = [];
        tunnel.on("data", (chunk: Buffer) => chunks.push(chunk));
        tunnel.on("end", () => resolve(Buffer.concat(chunks).toString()));
        tunnel.on("error", reject);
        tunnel.setTimeout(WAIT_MS, () => tunnel.destroy(new Error("tunnel timed out")));
        // No half-close: the SOCKS5 server closes both ways when the client ends.
        tunnel.write(`GET /via-socks HTTP/1.1\r\nHost: ${inet.http.name}\r\nConnection: close\r\n\r\n`);
      });
      assert.match(reply, /^HTTP\/1\.1 200/);
      return reply;
    };
    await get(inet.http.address);
    // A name is looked up through the fake DNS (the namespace's resolv.conf).
    await get(inet.http.name);
    assert.deepEqual(await inet.socksConnections(), [{ address: inet.http.address, port: 80 }, { address: inet.http.name, port: 80 }]);
    assert.deepEqual((await inet.requests()).map((r) => [r.path, r.remoteAddress]), [["/via-socks", inet.http.address], ["/via-socks", inet.http.address]]);
    assert.ok((await inet.dnsQueries()).some((q) => q.name === inet.http.name));

    await inet.stopSocks();
    await assert.rejects(socks5Connect(socks, inet.http.address, 80), /ECONNREFUSED/);
    await inet.startSocks();
    await get(inet.http.address);
    assert.equal((await inet.socksConnections()).length, 3, "records survive a stop and start");
  });

  test("the namespace opens no connection out of it (to the host's transit address, directly or through SOCKS5)", async () => {
    // A listener on the host's transit address: reachable from the namespace if it were not guarded.
    const seen: string[] = [];
    const listener = net.createServer((socket) => {
      seen.push(socket.remoteAddress ?? "");
      socket.destroy();
    });
    await new Promise<void>((resolve) => listener.listen(0, inet.hostTransitAddress, resolve));
    try {
      const port = (listener.address() as net.AddressInfo).port;
      // The listener works: a connection from the host's side arrives.
      await new Promise<void>((resolve, reject) => net.connect({ host: inet.hostTransitAddress, port }, resolve).on("error", reject));
      for (let i = 0; i < 40 && seen.length === 0; i++) await new Promise((r) => setTimeout(r, 25));
      assert.equal(seen.length, 1);
      const connectScript = "const s = require('net').connect({ host: process.argv[1], port: Number(process.argv[2]) }); s.on('connect', () => process.exit(0)); s.on('error', (e) => { console.log(e.code); process.exit(1); }); setTimeout(() => process.exit(2), 3000);";
      const fromInside = await runCommand(["ip", "netns", "exec", inet.namespace, process.execPath, "-e", connectScript, inet.hostTransitAddress, String(port)], { allowFailure: true, timeoutMs: 15_000 });
      assert.equal(fromInside.exitCode, 1, `a connection from inside the namespace was not refused: ${fromInside.stdout}${fromInside.stderr}`);
      assert.match(fromInside.stdout, /ECONNREFUSED|EHOSTUNREACH/);
      if (inet.socks) {
        await inet.assertRouted(inet.socks.address);
        await assert.rejects(socks5Connect(inet.socks, inet.hostTransitAddress, port), /reply [1-5]|closed/);
      }
      assert.equal(seen.length, 1, "something from inside the namespace reached the host");
    } finally {
      listener.close();
    }
  });

  test("clearRecords empties every record", async () => {
    await inet.assertRouted(inet.http.address);
    await request(http, { host: inet.http.address });
    await dnsOverUdp(inet, "http.fake.test");
    await inet.clearRecords();
    assert.deepEqual(await inet.requests(), []);
    assert.deepEqual(await inet.dnsQueries(), []);
    assert.deepEqual(await inet.socksConnections(), []);
  });
});

describe("fake internet lifecycle", () => {
  test("two instances at once get different blocks; close() removes everything and is idempotent", async () => {
    const [first, second] = await Promise.all([startFakeInternet({ socks: false }), startFakeInternet({ socks: false })]);
    try {
      assert.notEqual(first.serviceCidr, second.serviceCidr);
      assert.notEqual(first.transitCidr, second.transitCidr);
      assert.equal(first.socks, undefined);
      await first.assertRouted(first.http.address);
      await assert.rejects(first.assertRouted(second.http.address), /refusing to send/);
      await second.assertRouted(second.http.address);
      assert.equal((await request(http, { host: second.http.address })).status, 200);
      assert.equal(await exists("pid", String(first.childPid)), true);
    } finally {
      await Promise.all([first.close(), second.close()]);
    }
    await first.close();
    for (const inet of [first, second]) await assertGone(inet);
    await assert.rejects(first.assertRouted(first.http.address), /refusing to send/);
    await assert.rejects(assertRouted(first.http.address), /refusing to send/);
    await assert.rejects(first.requests(), /closed/);
  });

  test("bad options are refused and leave nothing behind", async () => {
    const ours = async () => (await runCommand(["ip", "netns", "list"])).stdout.split("\n").filter((line) => line.startsWith("cbi-")).sort();
    const before = await ours();
    await assert.rejects(startFakeInternet({ records: { "Bad Name": "198.18.0.1" } }), /lowercase/);
    await assert.rejects(startFakeInternet({ records: { "ok.fake.test": "not-an-address" } }), /IPv4/);
    await assert.rejects(startFakeInternet({ rebindPrivateAddress: "::1" }), /IPv4/);
    assert.deepEqual(await ours(), before);
  });

  test("a test process that exits, is terminated or is killed without close() leaks nothing", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "cbi-fake-internet-test-"));
    try {
      const script = path.join(dir, "leaky.mts");
      await writeFile(
        script,
        `import { startFakeInternet } from ${JSON.stringify(harnessPath)};\n` +
          `const inet = await startFakeInternet({ socks: false });\n` +
          `console.log(JSON.stringify({ namespace: inet.namespace, hostInterface: inet.hostInterface, serviceCidr: inet.serviceCidr, childPid: inet.childPid, caCertificateFile: inet.caCertificateFile }));\n` +
          `if (process.argv[2] === "exit") process.exit(3);\n` +
          `setInterval(() => {}, 1000);\n`,
      );
      const runLeaky = (mode: "exit" | "hang") =>
        new Promise<{ inet: FakeInternet; code: number | null; signal: string | null; kill(signal?: NodeJS.Signals): void; exited: Promise<void> }>((resolve, reject) => {
          const child = spawn(process.execPath, ["--import", "tsx", script, mode], { cwd: repoRoot, stdio: ["ignore", "pipe", "inherit"] });
          const timer = setTimeout(() => {
            child.kill("SIGKILL");
            reject(new Error("leaky script did not report"));
          }, 30_000);
          const exited = new Promise<void>((done) => child.once("exit", () => done()));
          let out = "";
          child.stdout.on("data", (chunk: Buffer) => {
            out += chunk.toString();
            if (!out.includes("\n")) return;
            clearTimeout(timer);
            const inet = JSON.parse(out.split("\n")[0]!) as FakeInternet;
            resolve({ inet, code: child.exitCode, signal: child.signalCode, kill: (signal = "SIGKILL") => child.kill(signal), exited });
          });
          child.on("error", reject);
        });

      const exiting = await runLeaky("exit");
      await exiting.exited;
      await assertGone(exiting.inet);

      const terminated = await runLeaky("hang");
      terminated.kill("SIGTERM");
      await terminated.exited;
      await assertGone(terminated.inet);

      const killed = await runLeaky("hang");
      killed.kill();
      await killed.exited;
      assert.equal(await exists("netns", killed.inet.namespace), true, "a SIGKILLed owner leaves its namespace until the next start");
      const next = await startFakeInternet({ socks: false });
      await next.close();
      // The server saw its stdin end and exited; the next start swept the rest.
      await assertGone(killed.inet);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
