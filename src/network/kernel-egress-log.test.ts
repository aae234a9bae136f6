import assert from "node:assert/strict";
import dgram from "node:dgram";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { defaultDistDir } from "../shared/config.js";
import { runCommand } from "../shared/exec.js";
import type { EgressRecord } from "./egress-types.js";
import { KernelEgressLog, kernelLogPrefix, parseKernelLogRecord } from "./kernel-egress-log.js";

const prefix = kernelLogPrefix("cubicle_t7");

test("a kernel log record of this table becomes the parts of an audit record", () => {
  const line = "7,5312,88123456,-;cbe:cubicle_t7:D IN=cb1a2b OUT=eth0 MAC=aa:bb SRC=10.88.0.6 DST=198.18.3.14 LEN=33 TOS=0x00 PREC=0x00 TTL=63 ID=4 DF PROTO=UDP SPT=40000 DPT=7 LEN=13 \n";
  assert.deepEqual(parseKernelLogRecord(line, prefix), {
    source: "10.88.0.6",
    destination: "198.18.3.14",
    protocol: "udp",
    port: 7,
    verdict: "denied",
    reason: "denied by policy",
    bytes: 33,
    flow: { key: "udp 10.88.0.6 40000 198.18.3.14 7", del: "del udp 10.88.0.6 40000 198.18.3.14 7" },
  });
  const icmp = "7,5313,88123457,-;cbe:cubicle_t7:A IN=cb1a2b OUT=eth0 SRC=10.88.0.6 DST=198.18.3.10 LEN=84 TTL=63 PROTO=ICMP TYPE=8 CODE=0 ID=1 SEQ=1";
  assert.equal(parseKernelLogRecord(icmp, prefix)?.protocol, "icmp");
  assert.equal(parseKernelLogRecord(icmp, prefix)?.verdict, "allowed");
  assert.equal(parseKernelLogRecord(icmp, prefix)?.port, undefined);
  // The ICMP echo id, not the IP header's ID= before PROTO=.
  const icmpWithIpId = icmp.replace("TTL=63", "TTL=63 ID=4242 DF");
  assert.deepEqual(parseKernelLogRecord(icmpWithIpId, prefix)?.flow, { key: "icmp 10.88.0.6 1 198.18.3.10 8", del: "del icmp 10.88.0.6 1 198.18.3.10 8 0" });
  // Fields that are not numbers name no flow.
  assert.equal(parseKernelLogRecord(line.replace("SPT=40000", "SPT=4x"), prefix)?.flow, undefined);
});

test("records of other tables, other prefixes and garbage are ignored", () => {
  assert.equal(parseKernelLogRecord("7,1,1,-;cbe:cubicle_t70:D SRC=1.1.1.1 DST=2.2.2.2 PROTO=UDP", prefix), undefined);
  assert.equal(parseKernelLogRecord("7,1,1,-;cbe:cubicle_t7:X SRC=1.1.1.1 DST=2.2.2.2 PROTO=UDP", prefix), undefined);
  assert.equal(parseKernelLogRecord("6,1,1,-;eth0: link up", prefix), undefined);
  assert.equal(parseKernelLogRecord("no semicolon", prefix), undefined);
  assert.equal(parseKernelLogRecord("7,1,1,-;cbe:cubicle_t7:F SRC=10.88.0.2 PROTO=UDP", prefix), undefined);
  assert.equal(parseKernelLogRecord("7,1,1,-;cbe:cubicle_t7:F SRC=10.88.0.2 DST=1.1.1.1 PROTO=GRE", prefix), undefined);
});

/**
 * FLOW_ACCOUNTING_NOTE with the real helper and the kernel's conntrack, on loopback only: a
 * table of this test's own turns connection tracking on for locally sent packets (`after`-style
 * cleanup in finally), a UDP exchange 127.0.0.1 → 127.0.0.9 is "logged" through a file standing
 * in for /dev/kmsg, and releasing the source address ends the flow with its counts.
 */
test("an allowed UDP flow's record gets the flow's bytes both ways when its address is released", { skip: process.getuid?.() !== 0 && "needs root" }, async () => {
  const table = `cubicle_flows_${process.pid.toString(36)}`;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-flows-"));
  const kmsg = path.join(dir, "kmsg");
  fs.writeFileSync(kmsg, "");
  const records: EgressRecord[] = [];
  const finished: EgressRecord[] = [];
  const log = new KernelEgressLog({
    tableName: "cubicle_t7",
    path: kmsg,
    sandboxFor: (address) => (address === "127.0.0.1" ? "isandbox" : undefined),
    audit: (record) => records.push(record),
    flows: { helperPath: path.join(defaultDistDir(), "sandbox-helper"), subnet: "127.0.0.0/8", finished: (record) => finished.push(record) },
  });
  const receiver = dgram.createSocket("udp4");
  const sender = dgram.createSocket("udp4");
  try {
    await runCommand(["nft", "-f", "-"], { input: `table inet ${table} {\n chain out {\n type filter hook output priority 0; policy accept;\n ip daddr 127.0.0.9 ct state new counter\n }\n}\n` });
    await log.start();
    await new Promise<void>((resolve) => receiver.bind(0, "127.0.0.9", resolve));
    await new Promise<void>((resolve) => sender.bind(0, "127.0.0.1", resolve));
    const [sport, dport] = [sender.address().port, receiver.address().port];
    receiver.on("message", (_message, from) => receiver.send(Buffer.alloc(50), from.port, from.address));
    let answers = 0;
    const answered = new Promise<void>((resolve) => sender.on("message", () => ++answers === 2 && resolve()));
    // The watcher subscribes as it starts: the flow begins once it is surely listening.
    await new Promise((resolve) => setTimeout(resolve, 300));
    sender.send(Buffer.alloc(100), dport, "127.0.0.9");
    sender.send(Buffer.alloc(100), dport, "127.0.0.9");
    await answered;
    fs.appendFileSync(kmsg, `7,1,1,-;${kernelLogPrefix("cubicle_t7")}A IN= OUT=lo SRC=127.0.0.1 DST=127.0.0.9 LEN=128 TTL=64 ID=1 DF PROTO=UDP SPT=${sport} DPT=${dport} LEN=108 \n`);
    for (let i = 0; i < 40 && records.length === 0; i++) await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(records.length, 1, "the logged packet became a record");
    assert.equal(records[0]!.bytesOut, 128, "the first packet's size until the flow ends");
    log.released("127.0.0.2");
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(finished.length, 0, "another address's release ends nothing");
    log.released("127.0.0.1");
    for (let i = 0; i < 40 && finished.length === 0; i++) await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(finished.length, 1, "the flow ended with its counts");
    // Two packets of 100 bytes out and two of 50 back, each with 28 bytes of IP and UDP headers.
    assert.equal(records[0]!.bytesOut, 256);
    assert.equal(records[0]!.bytesIn, 156);
  } finally {
    sender.close();
    receiver.close();
    await log.stop();
    await runCommand(["nft", "delete", "table", "inet", table], { allowFailure: true });
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
