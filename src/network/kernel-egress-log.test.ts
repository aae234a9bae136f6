import assert from "node:assert/strict";
import dgram from "node:dgram";
import path from "node:path";
import { test } from "node:test";
import { defaultDistDir } from "../shared/config.js";
import { runCommand } from "../shared/exec.js";
import type { EgressRecord } from "./egress-types.js";
import { KernelEgressLog, PAST_LOG_LIMIT, firstLogGroup, parseLogLine } from "./kernel-egress-log.js";
import { auditChains } from "./nft-ruleset.js";

test("the helper's log lines become the parts of an audit record", () => {
  assert.deepEqual(parseLogLine("log D udp 10.88.0.2 40000 198.18.3.10 7 29 1"), {
    source: "10.88.0.2",
    destination: "198.18.3.10",
    protocol: "udp",
    port: 7,
    verdict: "denied",
    reason: "denied by policy",
    bytes: 29,
    count: 1,
    flow: { key: "udp 10.88.0.2 40000 198.18.3.10 7", del: "del udp 10.88.0.2 40000 198.18.3.10 7" },
  });
  const icmp = parseLogLine("log A icmp 10.88.0.6 1 198.18.3.10 8 0 84 1");
  assert.equal(icmp?.protocol, "icmp");
  assert.equal(icmp?.verdict, "allowed");
  assert.equal(icmp?.port, undefined);
  assert.deepEqual(icmp?.flow, { key: "icmp 10.88.0.6 1 198.18.3.10 8", del: "del icmp 10.88.0.6 1 198.18.3.10 8 0" });
  const floor = parseLogLine("log F tcp 10.88.0.2 50000 10.0.0.1 22 60 3");
  assert.equal(floor?.reason, "host, sandbox, loopback, link-local or reserved address");
  assert.equal(floor?.count, 3);
  assert.equal(floor?.flow, undefined, "TCP flows are the proxy's to account");
  assert.equal(parseLogLine("log P udp 10.88.0.2 1 192.168.1.1 53 2900 100")?.bytes, 2900);
});

test("a log line that is not exactly the helper's is ignored", () => {
  for (const line of [
    "log X udp 10.88.0.2 1 1.1.1.1 7 29 1",
    "log D gre 10.88.0.2 1 1.1.1.1 7 29 1",
    "log D udp 10.88.0.2 1 1.1.1.1 7 29",
    "log D udp 10.88.0.2 1 1.1.1.1 7 29 0",
    "log D udp 10.88.0.2 1 1.1.1.1 7 29 1 extra",
    "log D udp 10.88.0.2 1x 1.1.1.1 7 29 1",
    "log D udp 10.88.0.256 1 1.1.1.1 7 29 1",
    "log D udp ::1 1 1.1.1.1 7 29 1",
    "log D icmp 10.88.0.2 1 1.1.1.1 8 29 1",
    "log D udp 10.88.0.2 1 1.1.1.1 7 99999999999999999999 1",
    "group 7",
    "",
  ])
    assert.equal(parseLogLine(line), undefined, line);
});

test("a table's first NFLOG group is fixed by its name and within 1-60000", () => {
  assert.equal(firstLogGroup("cubicle"), firstLogGroup("cubicle"));
  assert.notEqual(firstLogGroup("cubicle"), firstLogGroup("cubicle_t1"));
  for (const name of ["cubicle", "cubicle_t1", "x", "a".repeat(64)]) {
    const group = firstLogGroup(name);
    assert.ok(Number.isInteger(group) && group >= 1 && group <= 60_000, `${name}: ${group}`);
  }
});

/**
 * KERNEL_LOG_NOTE and FLOW_ACCOUNTING_NOTE with the real helper, the kernel's NFLOG and
 * conntrack, on loopback only: a table of this test's own logs locally sent packets from
 * 127.0.0.1 to 127.0.0.9 to the group the helper bound (the test's `finally` removes it).
 * Port P+1 is "allowed" (logged A, passed), the others "denied" (logged D, dropped).
 */
test("logged packets become records: allowed flows get their bytes on release, denied ones to one target fold by the second, distinct targets each get one", { skip: process.getuid?.() !== 0 && "needs root" }, async () => {
  const table = `cubicle_nflog_${process.pid.toString(36)}`;
  const records: EgressRecord[] = [];
  const finished: EgressRecord[] = [];
  const options = {
    firstGroup: firstLogGroup(table),
    helperPath: path.join(defaultDistDir(), "sandbox-helper"),
    subnet: "127.0.0.0/8",
    sandboxFor: (address: string) => (address === "127.0.0.1" ? "isandbox" : undefined),
  };
  const log = new KernelEgressLog({ ...options, audit: (record) => records.push(record), finished: (record) => finished.push(record) });
  // Another holder of the first group: the helper takes the next free one.
  const other = new KernelEgressLog({ ...options, audit: () => undefined, finished: () => undefined });
  const receiver = dgram.createSocket("udp4");
  const sender = dgram.createSocket("udp4");
  const waitFor = async (done: () => boolean, what: string) => {
    for (let i = 0; i < 60 && !done(); i++) await new Promise((resolve) => setTimeout(resolve, 50));
    assert.ok(done(), `${what}: ${JSON.stringify(records)}`);
  };
  try {
    const otherGroup = await other.start();
    assert.equal(otherGroup, firstLogGroup(table));
    const group = await log.start();
    assert.ok(group !== undefined && group !== otherGroup, `a group of its own: ${group}`);
    await new Promise<void>((resolve) => receiver.bind(0, "127.0.0.9", resolve));
    await new Promise<void>((resolve) => sender.bind(0, "127.0.0.1", resolve));
    const allowedPort = receiver.address().port;
    await runCommand(["nft", "-f", "-"], {
      input: `table inet ${table} {
 chain out {
  type filter hook output priority 0; policy accept;
  ip saddr 127.0.0.1 ip daddr 127.0.0.9 udp dport ${allowedPort} ct state new ct status & confirmed == 0 log group ${group} prefix "A"
  ip saddr 127.0.0.1 ip daddr 127.0.0.9 udp dport != ${allowedPort} ct state new log group ${group} prefix "D" drop
 }
}
`,
    });
    receiver.on("message", (_message, from) => receiver.send(Buffer.alloc(50), from.port, from.address));
    let answers = 0;
    const answered = new Promise<void>((resolve) => sender.on("message", () => ++answers === 2 && resolve()));
    sender.send(Buffer.alloc(100), allowedPort, "127.0.0.9");
    sender.send(Buffer.alloc(100), allowedPort, "127.0.0.9");
    await answered;
    await waitFor(() => records.some((r) => r.verdict === "allowed"), "the allowed flow's first packet became a record");
    const allowed = records.find((r) => r.verdict === "allowed")!;
    assert.deepEqual({ address: allowed.address, port: allowed.port, protocol: allowed.protocol, bytesOut: allowed.bytesOut, attempts: allowed.attempts }, { address: "127.0.0.9", port: allowedPort, protocol: "udp", bytesOut: 128, attempts: undefined });

    // 500 datagrams to one closed port (one target), then one to each of 300 other ports.
    const denyPort = allowedPort === 65535 ? 1000 : allowedPort + 1;
    const send = (port: number) => new Promise<void>((resolve) => sender.send(Buffer.alloc(10), port, "127.0.0.9", () => resolve()));
    for (let i = 0; i < 500; i++) await send(denyPort);
    const scanned: number[] = [];
    for (let port = 20_000; scanned.length < 300; port++) if (port !== allowedPort && port !== denyPort) scanned.push(port);
    for (const port of scanned) await send(port);
    const deniedTo = (port: number) => records.filter((r) => r.verdict === "denied" && r.port === port);
    await waitFor(() => scanned.every((port) => deniedTo(port).length === 1), "each scanned port has its record");
    await waitFor(() => deniedTo(denyPort).reduce((sum, r) => sum + (r.attempts ?? 1), 0) === 500, "every datagram to the one target is counted");
    assert.ok(deniedTo(denyPort).length <= 3, `folded by the second: ${deniedTo(denyPort).length} records`);
    assert.equal(deniedTo(denyPort).reduce((sum, r) => sum + r.bytesOut!, 0), 500 * 38, "their bytes summed");
    assert.ok(records.every((r) => r.sandboxId === "isandbox"));

    log.released("127.0.0.2");
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(finished.length, 0, "another address's release ends nothing");
    log.released("127.0.0.1");
    await waitFor(() => finished.length === 1, "the flow ended with its counts");
    // Two packets of 100 bytes out and two of 50 back, each with 28 bytes of IP and UDP headers.
    assert.equal(records.filter((r) => r.verdict === "allowed").length, 1, "one record for the flow's two packets");
    assert.equal(allowed.bytesOut, 256);
    assert.equal(allowed.bytesIn, 156);
  } finally {
    sender.close();
    receiver.close();
    await Promise.all([log.stop(), other.stop()]);
    await runCommand(["nft", "delete", "table", "inet", table], { allowFailure: true });
  }
});

test("past the log's rate limit, one packet a second per sandbox is still recorded, saying the rest were not (the ruleset's own chains)", { skip: process.getuid?.() !== 0 && "needs root" }, async () => {
  const table = `cubicle_nflim_${process.pid.toString(36)}`;
  const records: EgressRecord[] = [];
  const log = new KernelEgressLog({
    firstGroup: firstLogGroup(table),
    helperPath: path.join(defaultDistDir(), "sandbox-helper"),
    subnet: "127.0.0.0/8",
    sandboxFor: (address: string) => (address === "127.0.0.1" ? "isandbox" : undefined),
    audit: (record) => records.push(record),
    finished: () => undefined,
  });
  const sender = dgram.createSocket("udp4");
  sender.on("error", () => undefined);
  try {
    const group = await log.start();
    assert.ok(group !== undefined);
    await new Promise<void>((resolve) => sender.bind(0, "127.0.0.1", resolve));
    // The chains as the server writes them, at 5 flows a second (bursts of 10) so a test crosses it quickly.
    await runCommand(["nft", "-f", "-"], {
      input: `table inet ${table} {
${auditChains(group, 5)}
 chain out {
  type filter hook output priority 0; policy accept;
  ip saddr 127.0.0.1 ip daddr 127.0.0.9 udp dport 31000-31999 goto egress_denied
 }
}
`,
    });
    const burst = async (first: number) => {
      for (let port = first; port < first + 60; port++) await new Promise<void>((resolve) => sender.send(Buffer.alloc(10), port, "127.0.0.9", () => resolve()));
    };
    const past = () => records.filter((r) => r.reason.includes(PAST_LOG_LIMIT));
    await burst(31000);
    for (let i = 0; i < 60 && past().length === 0; i++) await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(past().length, 1, `one record for the flows past the limit: ${JSON.stringify(records.map((r) => [r.port, r.reason]))}`);
    assert.equal(past()[0]!.verdict, "denied");
    assert.match(past()[0]!.reason, /^denied by policy; /);
    const recorded = records.filter((r) => !r.reason.includes(PAST_LOG_LIMIT));
    assert.ok(recorded.length >= 10 && recorded.length < 30, `the burst's first flows each have a record, the rest none: ${recorded.length}`);
    // A second later the limit lets one more through.
    await new Promise((resolve) => setTimeout(resolve, 1100));
    await burst(31100);
    for (let i = 0; i < 60 && past().length < 2; i++) await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(past().length, 2);
  } finally {
    sender.close();
    await log.stop();
    await runCommand(["nft", "delete", "table", "inet", table], { allowFailure: true });
  }
});

test("the helper's flows refuses an NFLOG group outside 1-65535 and a malformed subnet, with exit 2", async () => {
  const { execFile } = await import("node:child_process");
  const helperPath = path.join(defaultDistDir(), "sandbox-helper");
  for (const args of [["--subnet", "10.88.0.0/16", "--log-group", "0"], ["--subnet", "10.88.0.0/16", "--log-group", "65536"], ["--subnet", "10.88.0.0/16", "--log-group", "x"], ["--subnet", "10.88.0.0"]]) {
    const code = await new Promise<number | null>((resolve) => execFile(helperPath, ["flows", ...args], (err) => resolve(err ? ((err as { code?: number }).code ?? null) : 0)).stdin?.end());
    assert.equal(code, 2, args.join(" "));
  }
});
