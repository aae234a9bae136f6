import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { EnvelopeParser, encodeEnvelope, envelopeFlags, knownEnvelopeFlags } from "./envelope.js";

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

describe("envelope flags", () => {
  it("passes any flags through by default (the caller decides)", () => {
    const [envelope] = new EnvelopeParser().push(encodeEnvelope(0x80, "x"));
    assert.equal(envelope!.flags, 0x80);
  });

  it("refuses unknown flags when told which are known", () => {
    const parser = new EnvelopeParser(1024, { knownFlags: knownEnvelopeFlags });
    assert.deepEqual(parser.push(Buffer.concat([encodeEnvelope(0, "a"), encodeEnvelope(envelopeFlags.endStream, "{}")])).map((e) => e.flags), [0, 2]);
    const strict = new EnvelopeParser(1024, { knownFlags: knownEnvelopeFlags });
    assert.throws(
      () => strict.push(encodeEnvelope(0x04, "x").subarray(0, 1)),
      (e: unknown) => e instanceof CubicleError && e.code === "invalid_argument" && /unknown flags 0x04/.test(e.message),
    );
  });

  it("round-trips binary payloads split at every byte boundary", () => {
    const payload = Buffer.from(Array.from({ length: 300 }, (_, i) => i % 256));
    const stream = Buffer.concat([encodeEnvelope(envelopeFlags.compressed, payload), encodeEnvelope(0, "")]);
    for (let cut = 0; cut <= stream.length; cut++) {
      const parser = new EnvelopeParser(1024);
      const got = [...parser.push(stream.subarray(0, cut)), ...parser.push(stream.subarray(cut))];
      assert.deepEqual(got.map((e) => [e.flags, e.data.length]), [[1, 300], [0, 0]]);
      assert.ok(got[0]!.data.equals(payload));
    }
  });

  it("refuses an oversized message whatever its flags, with the limit in the message", () => {
    const parser = new EnvelopeParser(4, { knownFlags: knownEnvelopeFlags });
    assert.throws(() => parser.push(encodeEnvelope(2, "12345")), /larger than the limit of 4 bytes/);
  });
});
