/**
 * Property-based tests (fast-check) of the Connect envelope parser: whatever the chunking, it
 * returns exactly the envelopes sent; on arbitrary bytes it only ever returns envelopes or
 * refuses an oversized length, and accounts for every byte.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import { CubicleError } from "../shared/cubicle-error.js";
import { fuzzRuns } from "../../test/security/fuzz.js";
import { EnvelopeParser, encodeEnvelope } from "./envelope.js";

/** Splits `bytes` at the given cut points (any order, duplicates and out-of-range ones ignored). */
function chunk(bytes: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((cut) => cut % (bytes.length + 1)))].sort((a, b) => a - b);
  const pieces: Buffer[] = [];
  let start = 0;
  for (const point of [...points, bytes.length]) {
    pieces.push(bytes.subarray(start, point));
    start = point;
  }
  return pieces;
}

function timed(name: string, runs: number, run: () => void): void {
  const started = performance.now();
  run();
  console.log(`# fuzz ${name}: ${runs} runs in ${Math.round(performance.now() - started)} ms`);
}

describe("Connect envelope parser under fuzzed input", () => {
  it("returns exactly the envelopes sent, however the bytes are chunked (tiny pieces included)", () => {
    const runs = fuzzRuns(4);
    const envelopes = fc.array(fc.record({ flags: fc.integer({ min: 0, max: 255 }), data: fc.uint8Array({ maxLength: 300 }) }), { maxLength: 6 });
    timed("envelope-roundtrip", runs, () =>
      fc.assert(
        fc.property(envelopes, fc.array(fc.nat(), { maxLength: 40 }), fc.boolean(), (sent, cuts, byteByByte) => {
          const stream = Buffer.concat(sent.map(({ flags, data }) => encodeEnvelope(flags, data)));
          const parser = new EnvelopeParser(1024);
          const received: Array<{ flags: number; data: number[] }> = [];
          const pieces = byteByByte ? [...stream].map((byte) => Buffer.from([byte])) : chunk(stream, cuts);
          for (const piece of pieces) for (const envelope of parser.push(piece)) received.push({ flags: envelope.flags, data: [...envelope.data] });
          assert.deepEqual(received, sent.map(({ flags, data }) => ({ flags, data: [...data] })));
          assert.equal(parser.pendingBytes, 0);
        }),
        { numRuns: runs },
      ),
    );
  });

  it("on arbitrary bytes returns envelopes or refuses an oversized length, and keeps count of every byte", () => {
    const runs = fuzzRuns(4);
    timed("envelope-random-bytes", runs, () =>
      fc.assert(
        fc.property(fc.uint8Array({ maxLength: 600 }), fc.array(fc.nat(), { maxLength: 20 }), fc.integer({ min: 0, max: 512 }), (bytes, cuts, limit) => {
          const parser = new EnvelopeParser(limit);
          let parsedBytes = 0;
          let pushed = 0;
          try {
            for (const piece of chunk(Buffer.from(bytes), cuts)) {
              pushed += piece.length;
              for (const envelope of parser.push(piece)) {
                assert.ok(envelope.data.length <= limit);
                parsedBytes += 5 + envelope.data.length;
              }
              assert.equal(parsedBytes + parser.pendingBytes, pushed);
            }
          } catch (error) {
            assert.ok(error instanceof CubicleError && error.code === "resource_exhausted", `unexpected ${String(error)}`);
          }
        }),
        { numRuns: runs },
      ),
    );
  });
});
