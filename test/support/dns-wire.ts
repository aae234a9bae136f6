/**
 * A minimal DNS message codec (RFC 1035 §4) for the fake internet's DNS service and the tests
 * that query it. It reads any well-formed message (names with compression pointers, every
 * section) within fixed bounds and writes uncompressed ones. Bad bytes raise DnsWireError.
 */

export const DNS_TYPE = { A: 1, NS: 2, CNAME: 5, SOA: 6, TXT: 16, AAAA: 28, OPT: 41, ANY: 255 } as const;
export const DNS_CLASS_IN = 1;
export const DNS_RCODE = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5 } as const;

/** RFC 1035 §2.3.4 and §4.2.1. */
export const MAX_UDP_MESSAGE_BYTES = 512;
const MAX_MESSAGE_BYTES = 65_535;
const MAX_NAME_BYTES = 255;
const MAX_LABEL_BYTES = 63;
const HEADER_BYTES = 12;
/** More records than any test sends or answers; a message claiming more is refused. */
const MAX_RECORDS_PER_SECTION = 64;
const MAX_POINTER_HOPS = 32;

export class DnsWireError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DnsWireError";
  }
}

export interface DnsQuestion {
  /** Dotted, without the trailing dot ("" is the root); case as sent. */
  name: string;
  type: number;
  class: number;
}

export interface DnsRecord {
  name: string;
  type: number;
  class: number;
  ttl: number;
  /** RDATA as sent (names inside it are not decompressed). */
  data: Buffer;
}

export interface DnsMessage {
  id: number;
  /** true for a response. */
  qr: boolean;
  opcode: number;
  aa: boolean;
  tc: boolean;
  rd: boolean;
  ra: boolean;
  rcode: number;
  questions: DnsQuestion[];
  answers: DnsRecord[];
  authorities: DnsRecord[];
  additionals: DnsRecord[];
}

/** A DNS message with defaults for everything but the id. */
export function dnsMessage(fields: Partial<DnsMessage> & { id: number }): DnsMessage {
  return { qr: false, opcode: 0, aa: false, tc: false, rd: false, ra: false, rcode: 0, questions: [], answers: [], authorities: [], additionals: [], ...fields };
}

/** Reads a whole DNS message; throws DnsWireError on anything malformed or out of bounds. */
export function decodeDnsMessage(buffer: Buffer): DnsMessage {
  if (buffer.length < HEADER_BYTES) throw new DnsWireError(`message of ${buffer.length} bytes is shorter than a header`);
  if (buffer.length > MAX_MESSAGE_BYTES) throw new DnsWireError(`message of ${buffer.length} bytes is too long`);
  const flags = buffer.readUInt16BE(2);
  const counts = [4, 6, 8, 10].map((offset) => buffer.readUInt16BE(offset));
  for (const count of counts) {
    if (count > MAX_RECORDS_PER_SECTION) throw new DnsWireError(`section of ${count} entries is more than ${MAX_RECORDS_PER_SECTION}`);
  }
  const reader = { offset: HEADER_BYTES };
  const questions: DnsQuestion[] = [];
  for (let i = 0; i < counts[0]!; i++) {
    const name = readName(buffer, reader);
    need(buffer, reader.offset, 4);
    questions.push({ name, type: buffer.readUInt16BE(reader.offset), class: buffer.readUInt16BE(reader.offset + 2) });
    reader.offset += 4;
  }
  const sections: DnsRecord[][] = [];
  for (const count of counts.slice(1)) {
    const records: DnsRecord[] = [];
    for (let i = 0; i < count; i++) {
      const name = readName(buffer, reader);
      need(buffer, reader.offset, 10);
      const type = buffer.readUInt16BE(reader.offset);
      const klass = buffer.readUInt16BE(reader.offset + 2);
      const ttl = buffer.readUInt32BE(reader.offset + 4);
      const length = buffer.readUInt16BE(reader.offset + 8);
      reader.offset += 10;
      need(buffer, reader.offset, length);
      records.push({ name, type, class: klass, ttl, data: Buffer.from(buffer.subarray(reader.offset, reader.offset + length)) });
      reader.offset += length;
    }
    sections.push(records);
  }
  if (reader.offset !== buffer.length) throw new DnsWireError(`${buffer.length - reader.offset} bytes after the last record`);
  return {
    id: buffer.readUInt16BE(0),
    qr: (flags & 0x8000) !== 0,
    opcode: (flags >> 11) & 0x0f,
    aa: (flags & 0x0400) !== 0,
    tc: (flags & 0x0200) !== 0,
    rd: (flags & 0x0100) !== 0,
    ra: (flags & 0x0080) !== 0,
    rcode: flags & 0x000f,
    questions,
    answers: sections[0]!,
    authorities: sections[1]!,
    additionals: sections[2]!,
  };
}

/** Reads the 12-byte header's id, or undefined when there is not even that. */
export function peekDnsId(buffer: Buffer): number | undefined {
  return buffer.length >= 2 ? buffer.readUInt16BE(0) : undefined;
}

/** Writes a DNS message, names uncompressed. */
export function encodeDnsMessage(message: DnsMessage): Buffer {
  const sections = [message.answers, message.authorities, message.additionals];
  if (message.questions.length > MAX_RECORDS_PER_SECTION || sections.some((records) => records.length > MAX_RECORDS_PER_SECTION)) {
    throw new DnsWireError(`a section has more than ${MAX_RECORDS_PER_SECTION} entries`);
  }
  const header = Buffer.alloc(HEADER_BYTES);
  header.writeUInt16BE(message.id & 0xffff, 0);
  const flags =
    (message.qr ? 0x8000 : 0) |
    ((message.opcode & 0x0f) << 11) |
    (message.aa ? 0x0400 : 0) |
    (message.tc ? 0x0200 : 0) |
    (message.rd ? 0x0100 : 0) |
    (message.ra ? 0x0080 : 0) |
    (message.rcode & 0x0f);
  header.writeUInt16BE(flags, 2);
  header.writeUInt16BE(message.questions.length, 4);
  sections.forEach((records, i) => header.writeUInt16BE(records.length, 6 + 2 * i));
  const parts: Buffer[] = [header];
  for (const question of message.questions) {
    const fixed = Buffer.alloc(4);
    fixed.writeUInt16BE(question.type, 0);
    fixed.writeUInt16BE(question.class, 2);
    parts.push(encodeDnsName(question.name), fixed);
  }
  for (const record of sections.flat()) {
    if (record.data.length > 0xffff) throw new DnsWireError(`RDATA of ${record.data.length} bytes is too long`);
    const fixed = Buffer.alloc(10);
    fixed.writeUInt16BE(record.type, 0);
    fixed.writeUInt16BE(record.class, 2);
    fixed.writeUInt32BE(record.ttl >>> 0, 4);
    fixed.writeUInt16BE(record.data.length, 8);
    parts.push(encodeDnsName(record.name), fixed, record.data);
  }
  const encoded = Buffer.concat(parts);
  if (encoded.length > MAX_MESSAGE_BYTES) throw new DnsWireError(`message of ${encoded.length} bytes is too long`);
  return encoded;
}

/** A dotted name in wire form (a trailing dot is allowed); throws on empty or oversized labels. */
export function encodeDnsName(name: string): Buffer {
  const trimmed = name.endsWith(".") ? name.slice(0, -1) : name;
  const labels = trimmed === "" ? [] : trimmed.split(".");
  const parts: Buffer[] = [];
  for (const label of labels) {
    const bytes = Buffer.from(label, "latin1");
    if (bytes.length === 0 || bytes.length > MAX_LABEL_BYTES) throw new DnsWireError(`label ${JSON.stringify(label)} must be 1–${MAX_LABEL_BYTES} bytes`);
    parts.push(Buffer.from([bytes.length]), bytes);
  }
  parts.push(Buffer.from([0]));
  const encoded = Buffer.concat(parts);
  if (encoded.length > MAX_NAME_BYTES) throw new DnsWireError(`name ${JSON.stringify(name)} is longer than ${MAX_NAME_BYTES} bytes`);
  return encoded;
}

/** An A record's RDATA from a dotted quad. */
export function encodeARecordData(address: string): Buffer {
  const octets = address.split(".").map(Number);
  if (octets.length !== 4 || octets.some((o) => !Number.isInteger(o) || o < 0 || o > 255)) throw new DnsWireError(`${JSON.stringify(address)} is not an IPv4 address`);
  return Buffer.from(octets);
}

/** The address in an A record, or undefined for a record of another type or size. */
export function aRecordAddress(record: DnsRecord): string | undefined {
  if (record.type !== DNS_TYPE.A || record.data.length !== 4) return undefined;
  return [...record.data].join(".");
}

/** A query for one name (recursion desired). */
export function encodeDnsQuery(id: number, name: string, type: number = DNS_TYPE.A): Buffer {
  return encodeDnsMessage(dnsMessage({ id, rd: true, questions: [{ name, type, class: DNS_CLASS_IN }] }));
}

/** Prefixes a message with its 2-byte length, for DNS over TCP (RFC 1035 §4.2.2). */
export function frameDnsTcp(message: Buffer): Buffer {
  const length = Buffer.alloc(2);
  length.writeUInt16BE(message.length, 0);
  return Buffer.concat([length, message]);
}

function need(buffer: Buffer, offset: number, length: number): void {
  if (offset + length > buffer.length) throw new DnsWireError(`message ends inside a field at byte ${offset}`);
}

/**
 * Reads a name at reader.offset and moves past it. A compression pointer must point before the
 * label that holds it (so no loop can form), and at most MAX_POINTER_HOPS are followed.
 */
function readName(buffer: Buffer, reader: { offset: number }): string {
  const labels: string[] = [];
  let offset = reader.offset;
  let wireBytes = 1;
  let hops = 0;
  let resumeAt: number | undefined;
  for (;;) {
    need(buffer, offset, 1);
    const length = buffer[offset]!;
    if (length === 0) {
      offset += 1;
      break;
    }
    const kind = length & 0xc0;
    if (kind === 0xc0) {
      need(buffer, offset, 2);
      const target = buffer.readUInt16BE(offset) & 0x3fff;
      if (target >= offset) throw new DnsWireError(`compression pointer at byte ${offset} does not point backwards`);
      if (++hops > MAX_POINTER_HOPS) throw new DnsWireError("too many compression pointers");
      resumeAt ??= offset + 2;
      offset = target;
      continue;
    }
    if (kind !== 0) throw new DnsWireError(`label type 0x${kind.toString(16)} at byte ${offset} is not supported`);
    need(buffer, offset + 1, length);
    wireBytes += 1 + length;
    if (wireBytes > MAX_NAME_BYTES) throw new DnsWireError(`name is longer than ${MAX_NAME_BYTES} bytes`);
    const label = buffer.subarray(offset + 1, offset + 1 + length);
    // A dot or a control byte inside a label has no dotted spelling; no test name needs one.
    if (label.some((byte) => byte <= 0x20 || byte >= 0x7f || byte === 0x2e)) throw new DnsWireError(`label at byte ${offset} holds a byte this codec does not spell`);
    labels.push(label.toString("latin1"));
    offset += 1 + length;
  }
  reader.offset = resumeAt ?? offset;
  return labels.join(".");
}
