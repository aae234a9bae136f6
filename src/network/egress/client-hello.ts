/**
 * The server name a TLS client asks for (SNI, RFC 6066 §3), read from its ClientHello before the
 * egress proxy decides where the connection may go. The ClientHello may span several TLS records
 * (RFC 8446 §5.1: handshake messages may be fragmented) and TCP segments; the caller feeds
 * everything received so far and asks again when more arrives.
 */
import { normaliseHostname } from "../egress-policy.js";

/** The most of a connection's first bytes read to find a ClientHello; beyond it there is no name. */
export const MAX_CLIENT_HELLO_BYTES = 16 * 1024;

export type ClientHelloResult =
  /** More bytes are needed. */
  | { state: "incomplete" }
  /** A whole ClientHello; `sni` is its host name, lowercase, when it has a valid one. */
  | { state: "complete"; sni: string | undefined }
  /** Not a ClientHello, malformed, or larger than MAX_CLIENT_HELLO_BYTES. */
  | { state: "invalid" };

const RECORD_HEADER = 5;
const CONTENT_HANDSHAKE = 0x16;
const HANDSHAKE_CLIENT_HELLO = 0x01;
const EXTENSION_SERVER_NAME = 0x0000;
const NAME_TYPE_HOST = 0x00;

/** True when `head` starts like a TLS handshake record (0x16 0x03 ..). */
export function looksLikeTls(head: Buffer): boolean {
  return head.length >= 1 && head[0] === CONTENT_HANDSHAKE && (head.length < 2 || head[1] === 0x03);
}

/** Parses the ClientHello at the start of `data` (the connection's first bytes). */
export function parseClientHello(data: Buffer): ClientHelloResult {
  // Reassemble the handshake layer from the records seen so far.
  const fragments: Buffer[] = [];
  let handshakeLength = 0;
  let offset = 0;
  let needed: number | undefined;
  while (offset < data.length) {
    if (data.length - offset < RECORD_HEADER) break;
    if (data[offset] !== CONTENT_HANDSHAKE || data[offset + 1] !== 0x03) return { state: "invalid" };
    const recordLength = data.readUInt16BE(offset + 3);
    // RFC 8446 §5.1: a plaintext record holds at most 2^14 bytes and handshake records are never empty.
    if (recordLength === 0 || recordLength > 16384) return { state: "invalid" };
    const available = Math.min(recordLength, data.length - offset - RECORD_HEADER);
    fragments.push(data.subarray(offset + RECORD_HEADER, offset + RECORD_HEADER + available));
    handshakeLength += available;
    offset += RECORD_HEADER + recordLength;
    if (handshakeLength >= 4 && needed === undefined) {
      const handshake = fragments.length === 1 ? fragments[0]! : Buffer.concat(fragments);
      if (handshake[0] !== HANDSHAKE_CLIENT_HELLO) return { state: "invalid" };
      needed = 4 + handshake.readUIntBE(1, 3);
      if (needed > MAX_CLIENT_HELLO_BYTES) return { state: "invalid" };
    }
    if (needed !== undefined && handshakeLength >= needed) {
      const handshake = Buffer.concat(fragments).subarray(0, needed);
      return { state: "complete", sni: readServerName(handshake.subarray(4)) };
    }
    if (available < recordLength) break;
  }
  if (data.length >= MAX_CLIENT_HELLO_BYTES) return { state: "invalid" };
  return { state: "incomplete" };
}

/** The host_name of the server_name extension of a ClientHello body, or undefined. */
function readServerName(body: Buffer): string | undefined {
  const reader = new Reader(body);
  reader.skip(2 + 32); // legacy_version, random
  reader.skip(reader.u8()); // legacy_session_id
  reader.skip(reader.u16()); // cipher_suites
  reader.skip(reader.u8()); // legacy_compression_methods
  if (!reader.ok || reader.remaining === 0) return undefined; // no extensions
  const extensions = new Reader(reader.bytes(reader.u16()));
  if (!reader.ok) return undefined;
  while (extensions.ok && extensions.remaining >= 4) {
    const type = extensions.u16();
    const data = extensions.bytes(extensions.u16());
    if (!extensions.ok) return undefined;
    if (type !== EXTENSION_SERVER_NAME) continue;
    const list = new Reader(data);
    const names = new Reader(list.bytes(list.u16()));
    while (list.ok && names.ok && names.remaining >= 3) {
      const nameType = names.u8();
      const name = names.bytes(names.u16());
      if (names.ok && nameType === NAME_TYPE_HOST) return normaliseHostname(name.toString("latin1"));
    }
    return undefined;
  }
  return undefined;
}

/** Bounds-checked big-endian reads; after an overrun `ok` is false and reads return zeroes. */
class Reader {
  private offset = 0;
  ok = true;
  constructor(private readonly buffer: Buffer) {}
  get remaining(): number {
    return this.buffer.length - this.offset;
  }
  private take(count: number): number {
    if (!this.ok || count > this.remaining) {
      this.ok = false;
      return -1;
    }
    const at = this.offset;
    this.offset += count;
    return at;
  }
  u8(): number {
    const at = this.take(1);
    return at < 0 ? 0 : this.buffer[at]!;
  }
  u16(): number {
    const at = this.take(2);
    return at < 0 ? 0 : this.buffer.readUInt16BE(at);
  }
  skip(count: number): void {
    this.take(count);
  }
  bytes(count: number): Buffer {
    const at = this.take(count);
    return at < 0 ? Buffer.alloc(0) : this.buffer.subarray(at, at + count);
  }
}
