/**
 * Connect streaming envelopes (e2b-wire-protocol.md §5.2): one flag byte, a 4-byte big-endian
 * payload length, then the payload. Used for both the request body of streaming calls and
 * every message of a streaming response: by the agent's RPC layer and by the server's agent link.
 */
import { CubicleError } from "../shared/cubicle-error.js";

/** Flag bits of an envelope. */
export const envelopeFlags = {
  /** The payload is compressed with the negotiated Connect-Content-Encoding. */
  compressed: 0x01,
  /** The last envelope of a response: the payload is the end-stream JSON. */
  endStream: 0x02,
} as const;

export interface Envelope {
  flags: number;
  data: Buffer;
}

/** Every flag bit the Connect protocol defines. */
export const knownEnvelopeFlags = envelopeFlags.compressed | envelopeFlags.endStream;

const headerBytes = 5;

/** The default limit of one message (16 MiB). */
export const defaultMaxMessageBytes = 16 * 1024 * 1024;

export interface EnvelopeParserOptions {
  /**
   * Flag bits an envelope may carry; one with another bit set is refused (invalid_argument).
   * Unset = any flags pass through to the caller, which decides.
   */
  knownFlags?: number;
}

/** One envelope: `flags`, big-endian uint32 length, the payload (a string goes in as UTF-8). */
export function encodeEnvelope(flags: number, data: Uint8Array | string): Buffer {
  const payload = typeof data === "string" ? Buffer.from(data, "utf8") : data;
  const out = Buffer.allocUnsafe(headerBytes + payload.length);
  out[0] = flags;
  out.writeUInt32BE(payload.length, 1);
  out.set(payload, headerBytes);
  return out;
}

/**
 * Splits a byte stream into envelopes, whatever the chunking: a header or a payload may be
 * spread over any number of `push` calls.
 */
export class EnvelopeParser {
  private chunks: Buffer[] = [];
  private buffered = 0;

  private readonly knownFlags: number | undefined;

  /** `maxMessageBytes`: a longer payload is refused (resource_exhausted) as soon as its header is in. */
  constructor(
    private readonly maxMessageBytes = defaultMaxMessageBytes,
    options: EnvelopeParserOptions = {},
  ) {
    this.knownFlags = options.knownFlags;
  }

  /** Bytes received that do not form a complete envelope yet. */
  get pendingBytes(): number {
    return this.buffered;
  }

  /** Feeds bytes and returns every envelope completed by them, in order. */
  push(chunk: Uint8Array): Envelope[] {
    if (chunk.length > 0) {
      this.chunks.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length));
      this.buffered += chunk.length;
    }
    const envelopes: Envelope[] = [];
    for (;;) {
      if (this.buffered === 0) break;
      // Refused from its first byte: nothing more of a bad envelope is waited for.
      const flags = this.chunks[0]![0]!;
      if (this.knownFlags !== undefined && (flags & ~this.knownFlags) !== 0) {
        throw new CubicleError("invalid_argument", `envelope with unknown flags 0x${flags.toString(16).padStart(2, "0")}`);
      }
      if (this.buffered < headerBytes) break;
      const header = this.peek(headerBytes);
      const length = header.readUInt32BE(1);
      if (length > this.maxMessageBytes) {
        throw new CubicleError("resource_exhausted", `message size ${length} is larger than the limit of ${this.maxMessageBytes} bytes`);
      }
      if (this.buffered < headerBytes + length) break;
      const whole = this.take(headerBytes + length);
      envelopes.push({ flags: whole[0]!, data: whole.subarray(headerBytes) });
    }
    return envelopes;
  }

  private peek(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length >= n) return first.subarray(0, n);
    this.chunks = [Buffer.concat(this.chunks)];
    return this.chunks[0]!.subarray(0, n);
  }

  private take(n: number): Buffer {
    const joined = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    const taken = Buffer.from(joined.subarray(0, n));
    const rest = joined.subarray(n);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.buffered = rest.length;
    return taken;
  }
}
