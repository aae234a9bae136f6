import assert from "node:assert/strict";
import { test } from "node:test";
import { kernelLogPrefix, parseKernelLogRecord } from "./kernel-egress-log.js";

const prefix = kernelLogPrefix("cubicle_t7");

test("a kernel log record of this table becomes the parts of an audit record", () => {
  const line = "7,5312,88123456,-;cbe:cubicle_t7:D IN=cb1a2b OUT=eth0 MAC=aa:bb SRC=10.88.0.6 DST=198.18.3.14 LEN=33 TOS=0x00 PREC=0x00 TTL=63 ID=4 DF PROTO=UDP SPT=40000 DPT=7 LEN=13 \n";
  assert.deepEqual(parseKernelLogRecord(line, prefix), { source: "10.88.0.6", destination: "198.18.3.14", protocol: "udp", port: 7, verdict: "denied", reason: "denied by policy", bytes: 33 });
  const icmp = "7,5313,88123457,-;cbe:cubicle_t7:A IN=cb1a2b OUT=eth0 SRC=10.88.0.6 DST=198.18.3.10 LEN=84 TTL=63 PROTO=ICMP TYPE=8 CODE=0 ID=1 SEQ=1";
  assert.equal(parseKernelLogRecord(icmp, prefix)?.protocol, "icmp");
  assert.equal(parseKernelLogRecord(icmp, prefix)?.verdict, "allowed");
  assert.equal(parseKernelLogRecord(icmp, prefix)?.port, undefined);
});

test("records of other tables, other prefixes and garbage are ignored", () => {
  assert.equal(parseKernelLogRecord("7,1,1,-;cbe:cubicle_t70:D SRC=1.1.1.1 DST=2.2.2.2 PROTO=UDP", prefix), undefined);
  assert.equal(parseKernelLogRecord("7,1,1,-;cbe:cubicle_t7:X SRC=1.1.1.1 DST=2.2.2.2 PROTO=UDP", prefix), undefined);
  assert.equal(parseKernelLogRecord("6,1,1,-;eth0: link up", prefix), undefined);
  assert.equal(parseKernelLogRecord("no semicolon", prefix), undefined);
  assert.equal(parseKernelLogRecord("7,1,1,-;cbe:cubicle_t7:F SRC=10.88.0.2 PROTO=UDP", prefix), undefined);
  assert.equal(parseKernelLogRecord("7,1,1,-;cbe:cubicle_t7:F SRC=10.88.0.2 DST=1.1.1.1 PROTO=GRE", prefix), undefined);
});
