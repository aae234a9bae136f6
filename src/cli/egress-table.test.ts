import assert from "node:assert/strict";
import { test } from "node:test";
import { formatEgressTable } from "./egress-table.js";

test("the egress table: one row per record, columns aligned, hostile domains cannot reach the terminal as escapes", () => {
  const text = formatEgressTable([
    { time: "2026-01-01T00:00:00.004Z", timeUnix: 4, sandboxId: "ia", protocol: "tcp", address: "93.184.216.34", port: 443, domain: "example.com", verdict: "allowed", reason: "in allowOut", bytesOut: 1200, bytesIn: 50000 },
    { time: "2026-01-01T00:00:00.003Z", timeUnix: 3, sandboxId: "ia", protocol: "dns", address: "10.0.0.1", port: 53, domain: "\u001b]0;pwned\u0007x.test", verdict: "denied", reason: "not in allowOut" },
    { time: "2026-01-01T00:00:00.002Z", timeUnix: 2, sandboxId: "ia", protocol: "icmp", address: "2001:db8::1", verdict: "denied", reason: "r".repeat(100) },
  ]);
  const lines = text.trimEnd().split("\n");
  assert.equal(lines.length, 4);
  assert.match(lines[0]!, /^TIME\s+PROTO\s+DESTINATION\s+DOMAIN\s+VERDICT\s+REASON\s+BYTES OUT\/IN$/);
  assert.match(lines[1]!, /93\.184\.216\.34:443\s+example\.com\s+allowed\s+in allowOut\s+1200\/50000$/);
  assert.ok(lines[2]!.includes("?]0;pwned?x.test"));
  assert.doesNotMatch(text, /[\u0000-\u0008\u000b-\u001f\u007f]/);
  assert.match(lines[3]!, /2001:db8::1\s+-\s+denied\s+r{59}…\s+-$/);
  assert.equal(lines[1]!.indexOf("allowed"), lines[2]!.indexOf("denied"), "columns line up");
});
