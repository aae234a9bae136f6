import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { CubicleError } from "../../shared/cubicle-error.js";
import { EnvelopeParser, encodeEnvelope, envelopeFlags } from "./envelope.js";

describe("envelopes", () => {
  it("encodes flag, big-endian length and payload", () => {
    const bytes = encodeEnvelope(envelopeFlags.endStream, "{}");
    assert.deepEqual([...bytes], [0x02, 0, 0, 0, 2, 0x7b, 0x7d]);
  });

  it("parses envelopes fed one byte at a time", () => {
    const stream = Buffer.concat([encodeEnvelope(0, '{"a":1}'), encodeEnvelope(0, ""), encodeEnvelope(2, "{}")]);
    const parser = new EnvelopeParser();
    const seen: Array<[number, string]> = [];
    for (const byte of stream) {
      for (const e of parser.push(Buffer.from([byte]))) seen.push([e.flags, e.data.toString()]);
    }
    assert.deepEqual(seen, [
      [0, '{"a":1}'],
      [0, ""],
      [2, "{}"],
    ]);
    assert.equal(parser.pendingBytes, 0);
  });

  it("parses several envelopes from one chunk and keeps a partial one", () => {
    const a = encodeEnvelope(0, "x".repeat(70_000));
    const b = encodeEnvelope(0, '{"b":2}');
    const parser = new EnvelopeParser();
    const first = parser.push(Buffer.concat([a, b.subarray(0, 3)]));
    assert.equal(first.length, 1);
    assert.equal(first[0]!.data.length, 70_000);
    assert.equal(parser.pendingBytes, 3);
    const second = parser.push(b.subarray(3));
    assert.equal(second[0]!.data.toString(), '{"b":2}');
  });

  it("rejects a length above the limit before buffering it", () => {
    const parser = new EnvelopeParser(10);
    assert.throws(() => parser.push(encodeEnvelope(0, "x".repeat(11)).subarray(0, 5)), (e: unknown) => e instanceof CubicleError && e.code === "resource_exhausted");
  });
});
