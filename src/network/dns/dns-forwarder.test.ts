/**
 * The DNS forwarder on loopback: a real authoritative server (test/support/dns-server.ts) on
 * 127.0.0.1 as the upstream, the forwarder on 127.0.0.1, and clients bound to 127.0.0.2,
 * 127.0.0.3 … acting as sandboxes (the forwarder knows a sandbox by its source address).
 */
import assert from "node:assert/strict";
import dgram from "node:dgram";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import fc from "fast-check";
import { startDnsServer, type DnsServer } from "../../../test/support/dns-server.js";
import { fuzzRuns } from "../../../test/security/fuzz.js";
import type { EgressPolicy, EgressRecord } from "../egress-types.js";
import { createDnsForwarder, readResolvConfNameservers, type DnsForwarder, type DnsForwarderOptions, type DnsSandbox } from "./dns-forwarder.js";
import { DnsRcode, DnsType, buildQuery, buildResponse, encodeDnsMessage, parseDnsMessage, type DnsMessage } from "./dns-message.js";
import { PinnedAddresses } from "./pinned-addresses.js";

const SANDBOX_A = "127.0.0.2";
const SANDBOX_OFFLINE = "127.0.0.3";
const NOT_A_SANDBOX = "127.0.0.4";
const SANDBOX_C = "127.0.0.5";

function policy(allowInternet: boolean): EgressPolicy {
  return { allowInternet, allowCidrs: [], denyCidrs: [], allowDomains: [], headerRules: [], egressProxy: undefined };
}

const sandboxes: Record<string, DnsSandbox> = {
  [SANDBOX_A]: { sandboxId: "sb-a", policy: policy(true) },
  [SANDBOX_OFFLINE]: { sandboxId: "sb-offline", policy: policy(false) },
  [SANDBOX_C]: { sandboxId: "sb-c", policy: policy(true) },
};

/** The policy decision is the lead's; this stub allows `*.test` names except under denied.test. */
function mayResolve(_sandbox: DnsSandbox, name: string): { allowed: boolean; reason: string } {
  if (name === "denied.test" || name.endsWith(".denied.test")) return { allowed: false, reason: "not in allowOut" };
  if (name.endsWith(".test")) return { allowed: true, reason: "matches *.test" };
  return { allowed: false, reason: "not in allowOut" };
}

const manyAddresses = Array.from({ length: 100 }, (_, i) => `198.51.100.${i + 1}`);

interface Harness {
  upstream: DnsServer;
  forwarder: DnsForwarder;
  port: number;
  pinned: PinnedAddresses;
  audits: EgressRecord[];
  resolveCalls: string[];
  close(): Promise<void>;
}

async function startHarness(overrides: Partial<DnsForwarderOptions> = {}, upstreamPort?: number): Promise<Harness> {
  const upstream = await startDnsServer({
    host: "127.0.0.1",
    port: 0,
    ttl: 120,
    records: {
      "www.example.test": ["192.0.2.10", "192.0.2.11"],
      "origin.cdn.test": ["192.0.2.50"],
      "many.example.test": manyAddresses,
      "denied.test": ["192.0.2.66"],
    },
    cnames: { "www.chain.test": "edge.cdn.test", "edge.cdn.test": "origin.cdn.test" },
    silent: ["slow.example.test"],
  });
  const pinned = new PinnedAddresses();
  const audits: EgressRecord[] = [];
  const resolveCalls: string[] = [];
  const forwarder = createDnsForwarder({
    listenHost: "127.0.0.1",
    port: 0,
    upstreams: [{ address: "127.0.0.1", port: upstreamPort ?? upstream.port }],
    sandboxFor: (address) => sandboxes[address],
    mayResolve: (sandbox, name) => {
      resolveCalls.push(name);
      return mayResolve(sandbox, name);
    },
    pinned,
    audit: (record) => audits.push(record),
    limits: { timeoutMs: 800, tcpIdleTimeoutMs: 400, maxTcpConnectionsPerSandbox: 3, ...overrides.limits },
    ...overrides,
  });
  const port = await forwarder.listen();
  return {
    upstream,
    forwarder,
    port,
    pinned,
    audits,
    resolveCalls,
    async close() {
      await forwarder.close();
      await upstream.close();
    },
  };
}

let nextId = 1000;
function query(name: string, type: number = DnsType.A, ednsUdpSize?: number): { id: number; bytes: Buffer } {
  const id = nextId++ & 0xffff;
  return { id, bytes: buildQuery({ id, question: { name, type, class: 1 }, ednsUdpSize }) };
}

/** Sends one datagram from `from` and waits for one answer (undefined after `timeoutMs`). */
function udpExchange(from: string, port: number, bytes: Buffer, timeoutMs = 2000): Promise<Buffer | undefined> {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket("udp4");
    const timer = setTimeout(() => done(undefined), timeoutMs);
    const done = (answer: Buffer | undefined) => {
      clearTimeout(timer);
      socket.close();
      resolve(answer);
    };
    socket.on("error", (error) => {
      clearTimeout(timer);
      socket.close();
      reject(error);
    });
    socket.on("message", (answer) => done(answer));
    socket.bind(0, from, () => socket.send(bytes, port, "127.0.0.1"));
  });
}

async function udpAsk(from: string, port: number, bytes: Buffer): Promise<DnsMessage> {
  const answer = await udpExchange(from, port, bytes);
  assert.ok(answer, "no answer over UDP");
  return parseDnsMessage(answer);
}

/** Connects from `from`; sends `write`; collects everything until the forwarder closes or `timeoutMs`. */
function tcpSession(from: string, port: number, write: Buffer, timeoutMs = 3000): Promise<{ received: Buffer; closedByServer: boolean; afterMs: number }> {
  return new Promise((resolve) => {
    const started = Date.now();
    const socket = net.connect({ host: "127.0.0.1", port, localAddress: from });
    const chunks: Buffer[] = [];
    let closedByServer = false;
    const timer = setTimeout(() => socket.destroy(), timeoutMs);
    socket.on("connect", () => socket.write(write));
    socket.on("data", (chunk) => chunks.push(chunk));
    socket.on("end", () => (closedByServer = true));
    socket.on("error", () => (closedByServer = true));
    socket.on("close", () => {
      clearTimeout(timer);
      resolve({ received: Buffer.concat(chunks), closedByServer, afterMs: Date.now() - started });
    });
  });
}

function frame(bytes: Buffer): Buffer {
  const framed = Buffer.alloc(2 + bytes.length);
  framed.writeUInt16BE(bytes.length);
  bytes.copy(framed, 2);
  return framed;
}

/** One query over TCP, its answer parsed. */
async function tcpAsk(from: string, port: number, bytes: Buffer): Promise<DnsMessage> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: "127.0.0.1", port, localAddress: from });
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error("no answer over TCP"));
    }, 3000);
    socket.on("connect", () => socket.write(frame(bytes)));
    socket.on("data", (chunk) => {
      chunks.push(chunk);
      const all = Buffer.concat(chunks);
      if (all.length >= 2 && all.length >= 2 + all.readUInt16BE(0)) {
        clearTimeout(timer);
        socket.destroy();
        resolve(parseDnsMessage(all.subarray(2, 2 + all.readUInt16BE(0))));
      }
    });
    socket.on("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
  });
}

function addresses(message: DnsMessage): string[] {
  return message.answers.flatMap((record) => (record.data.kind === "a" ? [record.data.address] : []));
}

describe("DNS forwarder", () => {
  let harness: Harness;
  before(async () => {
    harness = await startHarness();
  });
  after(async () => {
    await harness?.close();
  });

  it("forwards an allowed name, returns the answer with the sandbox's id, pins and audits it", async () => {
    const { id, bytes } = query("WWW.Example.test");
    const answer = await udpAsk(SANDBOX_A, harness.port, bytes);
    assert.equal(answer.header.id, id);
    assert.equal(answer.header.rcode, DnsRcode.NOERROR);
    assert.equal(answer.questions[0]!.name, "WWW.Example.test", "the question comes back as asked");
    assert.deepEqual(addresses(answer), ["192.0.2.10", "192.0.2.11"]);
    assert.equal(harness.pinned.isPinned("sb-a", "www.example.test", "192.0.2.10"), true);
    assert.equal(harness.pinned.isPinned("sb-a", "www.example.test", "192.0.2.11"), true);
    assert.equal(harness.pinned.isPinned("sb-c", "www.example.test", "192.0.2.10"), false);
    const record = harness.audits.find((entry) => entry.domain === "www.example.test");
    assert.deepEqual(
      { ...record, time: 0 },
      { time: 0, sandboxId: "sb-a", protocol: "dns", address: "127.0.0.1", port: 53, domain: "www.example.test", verdict: "allowed", reason: "matches *.test", bytesOut: undefined, bytesIn: undefined, durationMs: undefined },
    );
    assert.equal(harness.upstream.log.filter((entry) => entry.name === "www.example.test").length, 1);
  });

  it("uses a fresh id and source port per upstream query", async () => {
    const before = harness.upstream.log.length;
    const fixedId = 4242;
    for (let i = 0; i < 6; i++) {
      const bytes = buildQuery({ id: fixedId, question: { name: "www.example.test", type: DnsType.A, class: 1 } });
      assert.equal((await udpAsk(SANDBOX_A, harness.port, bytes)).header.id, fixedId);
    }
    const ids = new Set(harness.upstream.log.slice(before).map((entry) => entry.id));
    assert.ok(ids.size >= 5, `upstream ids ${[...ids]} are not random`);
    const ports = new Set(harness.upstream.log.slice(before).map((entry) => entry.sourcePort));
    assert.ok(ports.size >= 5, `upstream source ports ${[...ports]} are reused`);
  });

  it("refuses a denied name without asking upstream, and audits why", async () => {
    const { id, bytes } = query("denied.test");
    const answer = await udpAsk(SANDBOX_A, harness.port, bytes);
    assert.equal(answer.header.id, id);
    assert.equal(answer.header.rcode, DnsRcode.REFUSED);
    assert.deepEqual(answer.questions, [{ name: "denied.test", type: DnsType.A, class: 1 }]);
    assert.equal(answer.answers.length, 0);
    assert.ok(!harness.upstream.queries.includes("denied.test"), "a denied name reached upstream");
    const record = harness.audits.find((entry) => entry.domain === "denied.test");
    assert.equal(record?.verdict, "denied");
    assert.equal(record?.reason, "not in allowOut");
    // The same over TCP, and for a denied name of any type (TXT is the classic exfiltration).
    const viaTcp = await tcpAsk(SANDBOX_A, harness.port, query("secret-data.denied.test", DnsType.TXT).bytes);
    assert.equal(viaTcp.header.rcode, DnsRcode.REFUSED);
    assert.ok(!harness.upstream.queries.includes("secret-data.denied.test"));
  });

  it("refuses everything for a sandbox without internet, without asking its policy", async () => {
    const calls = harness.resolveCalls.length;
    const answer = await udpAsk(SANDBOX_OFFLINE, harness.port, query("www.example.test").bytes);
    assert.equal(answer.header.rcode, DnsRcode.REFUSED);
    assert.equal(harness.resolveCalls.length, calls);
    const record = harness.audits.find((entry) => entry.sandboxId === "sb-offline");
    assert.equal(record?.verdict, "denied");
    assert.equal(record?.reason, "internet access is off");
  });

  it("refuses an address that is no sandbox, without forwarding or auditing", async () => {
    const upstreamQueries = harness.upstream.queries.length;
    const audits = harness.audits.length;
    const answer = await udpAsk(NOT_A_SANDBOX, harness.port, query("www.example.test").bytes);
    assert.equal(answer.header.rcode, DnsRcode.REFUSED);
    assert.equal(harness.upstream.queries.length, upstreamQueries);
    assert.equal(harness.audits.length, audits);
  });

  it("pins the addresses at the end of a CNAME chain for every name along it", async () => {
    const answer = await udpAsk(SANDBOX_A, harness.port, query("www.chain.test").bytes);
    assert.equal(answer.header.rcode, DnsRcode.NOERROR);
    assert.deepEqual(addresses(answer), ["192.0.2.50"]);
    for (const name of ["www.chain.test", "edge.cdn.test", "origin.cdn.test"]) {
      assert.equal(harness.pinned.isPinned("sb-a", name, "192.0.2.50"), true, name);
    }
    assert.deepEqual(harness.pinned.namesFor("sb-a", "192.0.2.50"), ["edge.cdn.test", "origin.cdn.test", "www.chain.test"]);
  });

  it("answers AAAA with NODATA without asking upstream", async () => {
    const { id, bytes } = query("www.example.test", DnsType.AAAA);
    const upstreamQueries = harness.upstream.queries.length;
    const answer = await udpAsk(SANDBOX_A, harness.port, bytes);
    assert.equal(answer.header.id, id);
    assert.equal(answer.header.rcode, DnsRcode.NOERROR);
    assert.equal(answer.answers.length, 0);
    assert.equal(answer.questions[0]!.type, DnsType.AAAA);
    assert.equal(harness.upstream.queries.length, upstreamQueries);
    // AAAA for a denied name is still refused.
    assert.equal((await udpAsk(SANDBOX_A, harness.port, query("denied.test", DnsType.AAAA).bytes)).header.rcode, DnsRcode.REFUSED);
  });

  it("falls back to TCP upstream when the UDP answer is truncated", async () => {
    const before = harness.upstream.log.length;
    // The sandbox offers 4096 bytes over EDNS; upstream gets 1232 and truncates 100 addresses.
    const answer = await udpAsk(SANDBOX_A, harness.port, query("many.example.test", DnsType.A, 4096).bytes);
    assert.equal(answer.header.tc, false);
    assert.deepEqual(addresses(answer).sort(), [...manyAddresses].sort());
    const transports = harness.upstream.log.slice(before).map((entry) => entry.transport);
    assert.deepEqual(transports, ["udp", "tcp"]);
    assert.equal(harness.pinned.isPinned("sb-a", "many.example.test", "198.51.100.100"), true);
  });

  it("sends TC to a UDP client whose size the answer exceeds, and the full answer over TCP", async () => {
    const truncated = await udpAsk(SANDBOX_A, harness.port, query("many.example.test").bytes);
    assert.equal(truncated.header.tc, true);
    assert.equal(truncated.answers.length, 0);
    const before = harness.upstream.log.length;
    const full = await tcpAsk(SANDBOX_A, harness.port, query("many.example.test").bytes);
    assert.equal(addresses(full).length, 100);
    assert.deepEqual(harness.upstream.log.slice(before).map((entry) => entry.transport), ["tcp"], "a TCP query goes upstream over TCP");
  });

  it("answers SERVFAIL when upstream does not answer, after one retry", async () => {
    const started = Date.now();
    const answer = await udpAsk(SANDBOX_A, harness.port, query("slow.example.test").bytes);
    const elapsed = Date.now() - started;
    assert.equal(answer.header.rcode, DnsRcode.SERVFAIL);
    assert.equal(harness.upstream.queries.filter((name) => name === "slow.example.test").length, 2);
    assert.ok(elapsed >= 700 && elapsed < 2000, `SERVFAIL after ${elapsed} ms, timeout is 800`);
  });

  it("refuses other opcodes, several questions, ANY, AXFR and other classes without forwarding", async () => {
    const upstreamQueries = harness.upstream.queries.length;
    const base = parseDnsMessage(query("www.example.test").bytes);
    const notify = encodeDnsMessage({ ...base, header: { ...base.header, opcode: 4 } });
    assert.equal((await udpAsk(SANDBOX_A, harness.port, notify)).header.rcode, DnsRcode.REFUSED);
    const two = encodeDnsMessage({ ...base, questions: [base.questions[0]!, { name: "origin.cdn.test", type: DnsType.A, class: 1 }] });
    assert.equal((await udpAsk(SANDBOX_A, harness.port, two)).header.rcode, DnsRcode.FORMERR);
    const none = encodeDnsMessage({ ...base, questions: [] });
    assert.equal((await udpAsk(SANDBOX_A, harness.port, none)).header.rcode, DnsRcode.FORMERR);
    assert.equal((await udpAsk(SANDBOX_A, harness.port, query("www.example.test", DnsType.ANY).bytes)).header.rcode, DnsRcode.REFUSED);
    assert.equal((await tcpAsk(SANDBOX_A, harness.port, query("example.test", DnsType.AXFR).bytes)).header.rcode, DnsRcode.REFUSED);
    const chaos = buildQuery({ id: 9, question: { name: "version.bind", type: DnsType.TXT, class: 3 } });
    assert.equal((await udpAsk(SANDBOX_A, harness.port, chaos)).header.rcode, DnsRcode.REFUSED);
    // A label with a dot inside would read as an allowed name to a careless check.
    const sneaky = buildQuery({ id: 10, question: { name: "x\\.www.example.test", type: DnsType.A, class: 1 } });
    assert.equal((await udpAsk(SANDBOX_A, harness.port, sneaky)).header.rcode, DnsRcode.REFUSED);
    assert.equal(harness.upstream.queries.length, upstreamQueries);
  });

  it("answers malformed queries with FORMERR or not at all, and keeps serving", async () => {
    const good = query("www.example.test").bytes;
    const pointerLoop = Buffer.from("abcd01000001000000000000c00c00010001", "hex");
    assert.equal((await udpAsk(SANDBOX_A, harness.port, pointerLoop)).header.rcode, DnsRcode.FORMERR);
    assert.equal((await udpAsk(SANDBOX_A, harness.port, good.subarray(0, good.length - 3))).header.rcode, DnsRcode.FORMERR);
    assert.equal(await udpExchange(SANDBOX_A, harness.port, Buffer.from("0102", "hex"), 300), undefined, "a runt gets no answer");
    const response = buildResponse(parseDnsMessage(good), { rcode: 0 });
    assert.equal(await udpExchange(SANDBOX_A, harness.port, response, 300), undefined, "an answer sent to the forwarder gets no answer");
    const oversizeCounts = Buffer.from("abcd0100ffffffffffffffff", "hex");
    assert.equal((await udpAsk(SANDBOX_A, harness.port, oversizeCounts)).header.rcode, DnsRcode.FORMERR);
    assert.equal((await udpAsk(SANDBOX_A, harness.port, good)).header.rcode, DnsRcode.NOERROR);
  });

  it("survives random datagrams from a sandbox and from elsewhere", async () => {
    const local = await startHarness({ limits: { queriesPerSecondPerSandbox: 100_000 } });
    try {
      const valid = query("www.chain.test", DnsType.A, 1232).bytes;
      const random = fc.sample(fc.uint8Array({ minLength: 0, maxLength: 700 }), fuzzRuns(1)).map((bytes) => Buffer.from(bytes));
      const mutated = fc.sample(fc.tuple(fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 4 }), fc.nat()), fuzzRuns(1)).map(([edits, cut]) => {
        const bytes = Buffer.from(valid);
        for (const [at, value] of edits) bytes[at % bytes.length] = value;
        return bytes.subarray(0, Math.max(12, cut % (bytes.length + 1)));
      });
      const packets = [...random, ...mutated];
      for (const from of [SANDBOX_A, NOT_A_SANDBOX]) {
        const socket = dgram.createSocket("udp4");
        const answers: Buffer[] = [];
        socket.on("message", (answer) => answers.push(answer));
        await new Promise<void>((resolve) => socket.bind(0, from, resolve));
        for (const packet of packets) await new Promise((resolve) => socket.send(packet, local.port, "127.0.0.1", resolve));
        await new Promise((resolve) => setTimeout(resolve, 300));
        socket.close();
        if (from === SANDBOX_A) assert.ok(answers.length > packets.length / 4, `only ${answers.length} answers to ${packets.length} packets`);
        // Addresses that are no sandbox share 50 answers a second.
        else assert.ok(answers.length >= 10 && answers.length <= 70, `${answers.length} answers to a stranger`);
        const sentIds = new Set(packets.filter((packet) => packet.length >= 2).map((packet) => packet.readUInt16BE(0)));
        for (const answer of answers) {
          const message = parseDnsMessage(answer); // every answer is a well-formed message…
          assert.ok(sentIds.has(message.header.id), "…to a query that was sent");
          assert.equal(message.header.qr, true);
        }
      }
      assert.equal((await udpAsk(SANDBOX_A, local.port, query("www.example.test").bytes)).header.rcode, DnsRcode.NOERROR);
    } finally {
      await local.close();
    }
  });
});

describe("DNS forwarder limits", () => {
  it("refuses a sandbox's queries over its rate, audits that once a second, and leaves other sandboxes alone", async () => {
    const harness = await startHarness({ limits: { queriesPerSecondPerSandbox: 5 } });
    try {
      const answers = await Promise.all(Array.from({ length: 30 }, () => udpAsk(SANDBOX_A, harness.port, query("www.example.test").bytes)));
      const refused = answers.filter((answer) => answer.header.rcode === DnsRcode.REFUSED).length;
      const answered = answers.filter((answer) => answer.header.rcode === DnsRcode.NOERROR).length;
      assert.ok(answered >= 5 && answered <= 7, `${answered} answered at 5 per second`);
      assert.equal(refused + answered, 30);
      const limited = harness.audits.filter((record) => record.reason.startsWith("rate limited"));
      assert.equal(limited.length, 1, "one audit record for the whole burst");
      assert.match(limited[0]!.reason, /more than 5 queries per second \(1 refused since the last record\)/);
      assert.equal((await udpAsk(SANDBOX_C, harness.port, query("www.example.test").bytes)).header.rcode, DnsRcode.NOERROR);
      await new Promise((resolve) => setTimeout(resolve, 1100));
      assert.equal((await udpAsk(SANDBOX_A, harness.port, query("www.example.test").bytes)).header.rcode, DnsRcode.NOERROR);
    } finally {
      await harness.close();
    }
  });

  it("refuses queries beyond the in-flight cap at once", async () => {
    const harness = await startHarness({ limits: { maxInFlightPerSandbox: 2, timeoutMs: 1500 } });
    try {
      const slow = [udpAsk(SANDBOX_A, harness.port, query("slow.example.test").bytes), udpAsk(SANDBOX_A, harness.port, query("slow.example.test").bytes)];
      await new Promise((resolve) => setTimeout(resolve, 100));
      const started = Date.now();
      const third = await udpAsk(SANDBOX_A, harness.port, query("www.example.test").bytes);
      assert.equal(third.header.rcode, DnsRcode.REFUSED);
      assert.ok(Date.now() - started < 500);
      assert.match(harness.audits.find((record) => record.reason.startsWith("rate limited"))!.reason, /more than 2 queries in flight/);
      for (const answer of await Promise.all(slow)) assert.equal(answer.header.rcode, DnsRcode.SERVFAIL);
      assert.equal((await udpAsk(SANDBOX_A, harness.port, query("www.example.test").bytes)).header.rcode, DnsRcode.NOERROR);
    } finally {
      await harness.close();
    }
  });

  it("closes a TCP connection that announces a huge message and stalls, or sends nothing", async () => {
    const harness = await startHarness();
    try {
      const huge = await tcpSession(SANDBOX_A, harness.port, Buffer.from([0xff, 0xff, 1, 2, 3]));
      assert.equal(huge.closedByServer, true);
      assert.ok(huge.afterMs >= 350 && huge.afterMs < 2000, `closed after ${huge.afterMs} ms, idle timeout 400`);
      const silent = await tcpSession(SANDBOX_A, harness.port, Buffer.alloc(0));
      assert.equal(silent.closedByServer, true);
      const runt = await tcpSession(SANDBOX_A, harness.port, Buffer.from([0, 3, 1, 2, 3]));
      assert.equal(runt.closedByServer, true);
      assert.ok(runt.afterMs < 300, "a frame too short for a DNS message closes the connection at once");
      // Pipelined queries, sent a byte at a time, are all answered.
      const two = Buffer.concat([frame(query("www.example.test").bytes), frame(query("denied.test").bytes)]);
      const pipelined = await new Promise<Buffer>((resolve, reject) => {
        const socket = net.connect({ host: "127.0.0.1", port: harness.port, localAddress: SANDBOX_A });
        const chunks: Buffer[] = [];
        socket.on("error", reject);
        socket.on("connect", async () => {
          for (const byte of two) {
            socket.write(Buffer.from([byte]));
            await new Promise((r) => setImmediate(r));
          }
        });
        socket.on("data", (chunk) => {
          chunks.push(chunk);
          const all = Buffer.concat(chunks);
          const first = 2 + all.readUInt16BE(0);
          if (all.length > first + 2 && all.length >= first + 2 + all.readUInt16BE(first)) {
            socket.destroy();
            resolve(all);
          }
        });
      });
      const first = parseDnsMessage(pipelined.subarray(2, 2 + pipelined.readUInt16BE(0)));
      const secondAt = 2 + pipelined.readUInt16BE(0);
      const second = parseDnsMessage(pipelined.subarray(secondAt + 2, secondAt + 2 + pipelined.readUInt16BE(secondAt)));
      assert.deepEqual([first.header.rcode, second.header.rcode].sort(), [DnsRcode.NOERROR, DnsRcode.REFUSED]);
      // Still serving.
      assert.equal((await tcpAsk(SANDBOX_A, harness.port, query("www.example.test").bytes)).header.rcode, DnsRcode.NOERROR);
    } finally {
      await harness.close();
    }
  });

  it("caps a sandbox's TCP connections", async () => {
    const harness = await startHarness();
    const sockets: net.Socket[] = [];
    try {
      const open = () =>
        new Promise<net.Socket>((resolve, reject) => {
          const socket = net.connect({ host: "127.0.0.1", port: harness.port, localAddress: SANDBOX_A }, () => resolve(socket));
          socket.on("error", reject);
          sockets.push(socket);
        });
      for (let i = 0; i < 3; i++) await open();
      const fourth = await open();
      const closed = await new Promise<boolean>((resolve) => {
        fourth.on("close", () => resolve(true));
        setTimeout(() => resolve(false), 300);
      });
      assert.equal(closed, true, "the fourth connection stayed open");
      assert.match(harness.audits.find((record) => record.reason.startsWith("rate limited"))!.reason, /more than 3 TCP connections/);
      // Another sandbox still gets in.
      assert.equal((await tcpAsk(SANDBOX_C, harness.port, query("www.example.test").bytes)).header.rcode, DnsRcode.NOERROR);
    } finally {
      for (const socket of sockets) socket.destroy();
      await harness.close();
    }
  });
});

describe("DNS forwarder answer checks", () => {
  /** A raw upstream that answers each query with the given list of (possibly forged) answers. */
  async function rawUpstream(answers: (query: DnsMessage) => Buffer[]): Promise<{ port: number; close(): Promise<void> }> {
    const socket = dgram.createSocket("udp4");
    socket.on("message", (bytes, remote) => {
      for (const answer of answers(parseDnsMessage(bytes))) socket.send(answer, remote.port, remote.address);
    });
    await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", resolve));
    return { port: socket.address().port, close: () => new Promise((resolve) => socket.close(() => resolve())) };
  }

  const aRecord = (name: string, address: string) => ({ name, type: DnsType.A, class: 1, ttl: 60, data: { kind: "a" as const, address } });

  it("ignores answers with the wrong id or question, and pins only the real one", async () => {
    const upstream = await rawUpstream((request) => {
      const question = request.questions[0]!;
      return [
        buildResponse({ ...request, header: { ...request.header, id: (request.header.id + 1) & 0xffff } }, { rcode: 0, answers: [aRecord(question.name, "203.0.113.1")] }),
        buildResponse({ ...request, questions: [{ ...question, name: "other.test" }] }, { rcode: 0, answers: [aRecord("other.test", "203.0.113.2")] }),
        buildResponse(request, { rcode: 0, answers: [aRecord(question.name, "192.0.2.99"), aRecord("unrelated.test", "203.0.113.3")] }),
      ];
    });
    const harness = await startHarness({}, upstream.port);
    try {
      const answer = await udpAsk(SANDBOX_A, harness.port, query("www.example.test").bytes);
      assert.deepEqual(addresses(answer), ["192.0.2.99", "203.0.113.3"]);
      assert.equal(harness.pinned.isPinned("sb-a", "www.example.test", "192.0.2.99"), true);
      for (const forged of ["203.0.113.1", "203.0.113.2", "203.0.113.3"]) {
        assert.deepEqual(harness.pinned.namesFor("sb-a", forged), [], `${forged} was pinned`);
      }
    } finally {
      await harness.close();
      await upstream.close();
    }
  });

  it("answers SERVFAIL when upstream only sends forged answers", async () => {
    const upstream = await rawUpstream((request) => [buildResponse({ ...request, header: { ...request.header, id: (request.header.id ^ 0x5a5a) & 0xffff } }, { rcode: 0 })]);
    const harness = await startHarness({}, upstream.port);
    try {
      assert.equal((await udpAsk(SANDBOX_A, harness.port, query("www.example.test").bytes)).header.rcode, DnsRcode.SERVFAIL);
    } finally {
      await harness.close();
      await upstream.close();
    }
  });
});

describe("readResolvConfNameservers", () => {
  it("reads IPv4 and IPv6 nameservers and skips everything else", async () => {
    const dir = await mkdtemp(join(tmpdir(), "cbd-resolv-"));
    try {
      const path = join(dir, "resolv.conf");
      await writeFile(path, "# generated\nsearch example.com\nnameserver 10.0.0.53\n  nameserver   fd00::53\nnameserver not-an-ip\n;nameserver 1.1.1.1\noptions edns0\n");
      assert.deepEqual(await readResolvConfNameservers(path), [
        { address: "10.0.0.53", port: 53 },
        { address: "fd00::53", port: 53 },
      ]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("the answer waits for the kernel's pins (DNS_PIN_NOTE)", () => {
  /** Pins that reach "the kernel" after `delayMs` (never, for Infinity). */
  class SlowPins extends PinnedAddresses {
    readonly settled: string[] = [];
    constructor(private readonly delayMs: number) {
      super();
    }
    override pin(sandboxId: string, name: string, addresses: readonly string[], ttlSec: number): Promise<void> {
      super.pin(sandboxId, name, addresses, ttlSec);
      if (!Number.isFinite(this.delayMs)) return new Promise(() => undefined);
      return new Promise((resolve) => setTimeout(() => resolve(void this.settled.push(name)), this.delayMs));
    }
  }

  it("goes back only once every name of the chain is pinned; a pin that never settles delays it at most a second", async () => {
    const slow = new SlowPins(150);
    const harness = await startHarness({ pinned: slow });
    try {
      const answer = await udpAsk(SANDBOX_A, harness.port, query("www.chain.test").bytes);
      assert.deepEqual(addresses(answer), ["192.0.2.50"]);
      assert.deepEqual(slow.settled.sort(), ["edge.cdn.test", "origin.cdn.test", "www.chain.test"], "all three pinned before the answer came");
    } finally {
      await harness.close();
    }
    const stuck = await startHarness({ pinned: new SlowPins(Infinity) });
    try {
      const started = Date.now();
      const answer = await udpExchange(SANDBOX_A, stuck.port, query("www.example.test").bytes, 3000);
      assert.ok(answer, "answered despite the stuck pin");
      assert.ok(Date.now() - started >= 900, `waited for the pin: ${Date.now() - started} ms`);
    } finally {
      await stuck.close();
    }
  });
});
