/**
 * A minimal, strictly bounded DNS wire codec (RFC 1035) for the sandbox DNS forwarder: the
 * header, questions, and resource records (A, AAAA and CNAME decoded, every other type kept as
 * opaque bytes). Parsing never throws anything but a `DnsParseError`, whatever the bytes.
 *
 * Names are in presentation form without the trailing dot (`www.example.com`, the root is `""`),
 * case kept as sent. A label byte that is not a printable ASCII character other than `.` and `\`
 * is written `\DDD` (decimal), and `.` and `\` inside a label are written `\.` and `\\`, so a
 * name string stands for exactly one sequence of labels (RFC 4343 §2.1).
 */
import { CubicleError } from "../../shared/cubicle-error.js";

export const DnsType = {
  A: 1,
  NS: 2,
  CNAME: 5,
  SOA: 6,
  PTR: 12,
  MX: 15,
  TXT: 16,
  AAAA: 28,
  SRV: 33,
  OPT: 41,
  IXFR: 251,
  AXFR: 252,
  MAILB: 253,
  MAILA: 254,
  ANY: 255,
} as const;

export const DnsClass = { IN: 1 } as const;

export const DnsOpcode = { QUERY: 0 } as const;

export const DnsRcode = {
  NOERROR: 0,
  FORMERR: 1,
  SERVFAIL: 2,
  NXDOMAIN: 3,
  NOTIMP: 4,
  REFUSED: 5,
} as const;

/** The largest DNS message: TCP frames it with a 16-bit length (RFC 1035 §4.2.2). */
export const MAX_MESSAGE_BYTES = 65535;
/** The largest name on the wire, length octets and the root included (RFC 1035 §2.3.4). */
export const MAX_NAME_WIRE_BYTES = 255;
export const MAX_LABEL_BYTES = 63;
/**
 * Compression pointers followed for one name. Pointers must also point strictly backwards, so a
 * loop is impossible anyway; this bounds the work a chain of backward pointers can cause.
 */
export const MAX_POINTER_HOPS = 32;

const HEADER_BYTES = 12;
/** A question is at least a root name (1 byte), type and class. */
const MIN_QUESTION_BYTES = 5;
/** A record is at least a root name, type, class, TTL and rdlength. */
const MIN_RECORD_BYTES = 11;

export interface DnsHeader {
  id: number;
  /** true in a response. */
  qr: boolean;
  opcode: number;
  aa: boolean;
  /** Truncated: the answer did not fit (over UDP), ask again over TCP. */
  tc: boolean;
  rd: boolean;
  ra: boolean;
  /** Authentic data and checking disabled (RFC 4035 §3.2). */
  ad: boolean;
  cd: boolean;
  rcode: number;
}

export interface DnsQuestion {
  name: string;
  type: number;
  class: number;
}

export type DnsRecordData =
  | { kind: "a"; address: string }
  | { kind: "aaaa"; address: string }
  | { kind: "cname"; target: string }
  /**
   * Any other type, bytes as they were. Rdata of some types (NS, MX, SOA, PTR…) may hold
   * compression pointers, meaningful only in the message it came from.
   */
  | { kind: "opaque"; bytes: Buffer };

export interface DnsRecord {
  name: string;
  type: number;
  /** For OPT (RFC 6891) this is the sender's UDP payload size. */
  class: number;
  ttl: number;
  data: DnsRecordData;
}

export interface DnsMessage {
  header: DnsHeader;
  questions: DnsQuestion[];
  answers: DnsRecord[];
  authorities: DnsRecord[];
  additionals: DnsRecord[];
}

/** Bytes that are not a DNS message this codec accepts. */
export class DnsParseError extends CubicleError {
  constructor(
    message: string,
    /** Where in the message parsing stopped. */
    readonly offset: number,
  ) {
    super("invalid_argument", `malformed DNS message at byte ${offset}: ${message}`);
    this.name = "DnsParseError";
  }
}

// ---- parsing ------------------------------------------------------------------------------

/** Reads only the 12-byte header (to answer a message whose body does not parse). */
export function parseDnsHeader(bytes: Uint8Array): DnsHeader {
  if (bytes.length < HEADER_BYTES) throw new DnsParseError(`${bytes.length} bytes is shorter than a header`, 0);
  if (bytes.length > MAX_MESSAGE_BYTES) throw new DnsParseError(`${bytes.length} bytes is longer than a DNS message can be`, 0);
  const flags = (bytes[2]! << 8) | bytes[3]!;
  return {
    id: (bytes[0]! << 8) | bytes[1]!,
    qr: (flags & 0x8000) !== 0,
    opcode: (flags >> 11) & 0xf,
    aa: (flags & 0x0400) !== 0,
    tc: (flags & 0x0200) !== 0,
    rd: (flags & 0x0100) !== 0,
    ra: (flags & 0x0080) !== 0,
    ad: (flags & 0x0020) !== 0,
    cd: (flags & 0x0010) !== 0,
    rcode: flags & 0xf,
  };
}

/** Parses a whole message; trailing bytes after the last record are an error. */
export function parseDnsMessage(bytes: Uint8Array): DnsMessage {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const header = parseDnsHeader(buf);
  const qdcount = buf.readUInt16BE(4);
  const ancount = buf.readUInt16BE(6);
  const nscount = buf.readUInt16BE(8);
  const arcount = buf.readUInt16BE(10);
  // Refuse impossible counts before allocating anything for them.
  const minimum = HEADER_BYTES + qdcount * MIN_QUESTION_BYTES + (ancount + nscount + arcount) * MIN_RECORD_BYTES;
  if (minimum > buf.length) {
    throw new DnsParseError(`counts ${qdcount}/${ancount}/${nscount}/${arcount} need at least ${minimum} bytes, the message has ${buf.length}`, 4);
  }
  const cursor = { offset: HEADER_BYTES };
  const questions: DnsQuestion[] = [];
  for (let i = 0; i < qdcount; i++) {
    const name = readName(buf, cursor);
    need(buf, cursor.offset, 4, "question type and class");
    questions.push({ name, type: buf.readUInt16BE(cursor.offset), class: buf.readUInt16BE(cursor.offset + 2) });
    cursor.offset += 4;
  }
  const answers = readRecords(buf, cursor, ancount);
  const authorities = readRecords(buf, cursor, nscount);
  const additionals = readRecords(buf, cursor, arcount);
  if (cursor.offset !== buf.length) throw new DnsParseError(`${buf.length - cursor.offset} bytes after the last record`, cursor.offset);
  return { header, questions, answers, authorities, additionals };
}

function need(buf: Buffer, offset: number, length: number, what: string): void {
  if (offset + length > buf.length) throw new DnsParseError(`truncated ${what}`, offset);
}

function readRecords(buf: Buffer, cursor: { offset: number }, count: number): DnsRecord[] {
  const records: DnsRecord[] = [];
  for (let i = 0; i < count; i++) {
    const name = readName(buf, cursor);
    need(buf, cursor.offset, 10, "record header");
    const type = buf.readUInt16BE(cursor.offset);
    const klass = buf.readUInt16BE(cursor.offset + 2);
    const ttl = buf.readUInt32BE(cursor.offset + 4);
    const rdlength = buf.readUInt16BE(cursor.offset + 8);
    const start = cursor.offset + 10;
    need(buf, start, rdlength, "record data");
    const end = start + rdlength;
    cursor.offset = end;
    records.push({ name, type, class: klass, ttl, data: readRecordData(buf, type, klass, start, end) });
  }
  return records;
}

function readRecordData(buf: Buffer, type: number, klass: number, start: number, end: number): DnsRecordData {
  const length = end - start;
  if (type === DnsType.A && klass === DnsClass.IN) {
    if (length !== 4) throw new DnsParseError(`an A record has ${length} bytes of data, not 4`, start);
    return { kind: "a", address: `${buf[start]}.${buf[start + 1]}.${buf[start + 2]}.${buf[start + 3]}` };
  }
  if (type === DnsType.AAAA && klass === DnsClass.IN) {
    if (length !== 16) throw new DnsParseError(`an AAAA record has ${length} bytes of data, not 16`, start);
    const groups: string[] = [];
    for (let i = 0; i < 16; i += 2) groups.push(buf.readUInt16BE(start + i).toString(16));
    return { kind: "aaaa", address: groups.join(":") };
  }
  if (type === DnsType.CNAME) {
    const cursor = { offset: start };
    const target = readName(buf, cursor, end);
    if (cursor.offset !== end) throw new DnsParseError("a CNAME's data is longer than its name", cursor.offset);
    return { kind: "cname", target };
  }
  return { kind: "opaque", bytes: Buffer.from(buf.subarray(start, end)) };
}

/**
 * Reads a possibly compressed name at `cursor.offset` and moves the cursor past it (past the
 * first pointer, if any). `limit` bounds the in-place part (the end of a record's data).
 */
function readName(buf: Buffer, cursor: { offset: number }, limit = buf.length): string {
  const labels: string[] = [];
  let wireLength = 1; // the root label
  let offset = cursor.offset;
  let hops = 0;
  let resumeAt: number | undefined;
  for (;;) {
    const bound = resumeAt === undefined ? limit : buf.length;
    if (offset >= bound) throw new DnsParseError("truncated name", offset);
    const length = buf[offset]!;
    const kind = length & 0xc0;
    if (kind === 0xc0) {
      if (offset + 2 > bound) throw new DnsParseError("truncated compression pointer", offset);
      const target = ((length & 0x3f) << 8) | buf[offset + 1]!;
      // RFC 1035 §4.1.4: a pointer refers to a prior occurrence; a forward or self pointer is
      // how a loop starts.
      if (target >= offset) throw new DnsParseError(`compression pointer to ${target} does not point backwards`, offset);
      if (++hops > MAX_POINTER_HOPS) throw new DnsParseError(`more than ${MAX_POINTER_HOPS} compression pointers in one name`, offset);
      if (resumeAt === undefined) resumeAt = offset + 2;
      offset = target;
      continue;
    }
    if (kind !== 0) throw new DnsParseError(`label type 0x${kind.toString(16)} is not supported`, offset);
    if (length === 0) {
      offset += 1;
      break;
    }
    if (offset + 1 + length > bound) throw new DnsParseError("truncated label", offset);
    wireLength += length + 1;
    if (wireLength > MAX_NAME_WIRE_BYTES) throw new DnsParseError(`name longer than ${MAX_NAME_WIRE_BYTES} bytes`, offset);
    labels.push(labelToText(buf, offset + 1, offset + 1 + length));
    offset += 1 + length;
  }
  cursor.offset = resumeAt ?? offset;
  return labels.join(".");
}

function labelToText(buf: Buffer, start: number, end: number): string {
  let text = "";
  for (let i = start; i < end; i++) {
    const byte = buf[i]!;
    if (byte === 0x2e || byte === 0x5c) text += "\\" + String.fromCharCode(byte);
    else if (byte > 0x20 && byte < 0x7f) text += String.fromCharCode(byte);
    else text += "\\" + String(byte).padStart(3, "0");
  }
  return text;
}

// ---- encoding -----------------------------------------------------------------------------

/** Splits a presentation-form name into label bytes (the inverse of how names are parsed). */
export function nameToLabels(name: string): Buffer[] {
  const trimmed = name.endsWith(".") && !name.endsWith("\\.") ? name.slice(0, -1) : name;
  if (trimmed === "") return [];
  const labels: Buffer[] = [];
  let current: number[] = [];
  let wireLength = 1;
  const finish = () => {
    if (current.length === 0) throw new CubicleError("invalid_argument", `DNS name ${JSON.stringify(name)} has an empty label`);
    if (current.length > MAX_LABEL_BYTES) throw new CubicleError("invalid_argument", `DNS name ${JSON.stringify(name)} has a label longer than ${MAX_LABEL_BYTES} bytes`);
    wireLength += current.length + 1;
    labels.push(Buffer.from(current));
    current = [];
  };
  for (let i = 0; i < trimmed.length; i++) {
    const char = trimmed.charCodeAt(i);
    if (char === 0x2e) {
      finish();
    } else if (char === 0x5c) {
      const digits = /^\d{3}/.exec(trimmed.slice(i + 1, i + 4));
      if (digits && Number(digits[0]) <= 255) {
        current.push(Number(digits[0]));
        i += 3;
      } else if (i + 1 < trimmed.length) {
        current.push(trimmed.charCodeAt(++i) & 0xff);
      } else {
        throw new CubicleError("invalid_argument", `DNS name ${JSON.stringify(name)} ends with a lone backslash`);
      }
    } else if (char < 0x21 || char > 0x7e) {
      throw new CubicleError("invalid_argument", `DNS name ${JSON.stringify(name)} has a character that is not printable ASCII; use its punycode form or \\DDD`);
    } else {
      current.push(char);
    }
  }
  finish();
  if (wireLength > MAX_NAME_WIRE_BYTES) throw new CubicleError("invalid_argument", `DNS name ${JSON.stringify(name)} is longer than ${MAX_NAME_WIRE_BYTES} bytes`);
  return labels;
}

class MessageWriter {
  private readonly chunks: Buffer[] = [];
  private length = 0;
  /**
   * Suffix (each label prefixed by its length, as on the wire) → offset, for compression. Case
   * counts: a name that points to another spelled differently would lose its own case, and
   * clients that randomise case (DNS 0x20) check it.
   */
  private readonly suffixes = new Map<string, number>();

  get offset(): number {
    return this.length;
  }

  push(bytes: Buffer): void {
    this.chunks.push(bytes);
    this.length += bytes.length;
  }

  u16(value: number): void {
    const bytes = Buffer.alloc(2);
    bytes.writeUInt16BE(value & 0xffff);
    this.push(bytes);
  }

  u32(value: number): void {
    const bytes = Buffer.alloc(4);
    bytes.writeUInt32BE(value >>> 0);
    this.push(bytes);
  }

  name(name: string): void {
    const labels = nameToLabels(name);
    for (let i = 0; i < labels.length; i++) {
      const key = labels.slice(i).map((label) => String.fromCharCode(label.length) + label.toString("latin1")).join("");
      const known = this.suffixes.get(key);
      if (known !== undefined) {
        this.u16(0xc000 | known);
        return;
      }
      if (this.offset < 0x4000) this.suffixes.set(key, this.offset);
      this.push(Buffer.from([labels[i]!.length]));
      this.push(labels[i]!);
    }
    this.push(Buffer.from([0]));
  }

  toBuffer(): Buffer {
    return Buffer.concat(this.chunks, this.length);
  }
}

/** DNS compares names ignoring ASCII case only (RFC 4343); `toLowerCase()` would fold Latin-1 too. */
export function asciiLowerCase(text: string): string {
  return text.replace(/[A-Z]+/g, (run) => run.toLowerCase());
}

function encodeFlags(header: DnsHeader): number {
  return (
    (header.qr ? 0x8000 : 0) |
    ((header.opcode & 0xf) << 11) |
    (header.aa ? 0x0400 : 0) |
    (header.tc ? 0x0200 : 0) |
    (header.rd ? 0x0100 : 0) |
    (header.ra ? 0x0080 : 0) |
    (header.ad ? 0x0020 : 0) |
    (header.cd ? 0x0010 : 0) |
    (header.rcode & 0xf)
  );
}

function encodeRecordData(writer: MessageWriter, record: DnsRecord): void {
  const lengthField = Buffer.alloc(2); // filled in once the data is written
  writer.push(lengthField);
  const start = writer.offset;
  const { data } = record;
  switch (data.kind) {
    case "a": {
      const parts = data.address.split(".").map(Number);
      if (parts.length !== 4 || parts.some((part) => !Number.isInteger(part) || part < 0 || part > 255)) {
        throw new CubicleError("invalid_argument", `${JSON.stringify(data.address)} is not an IPv4 address`);
      }
      writer.push(Buffer.from(parts));
      break;
    }
    case "aaaa": {
      const groups = expandIPv6(data.address);
      const bytes = Buffer.alloc(16);
      groups.forEach((group, i) => bytes.writeUInt16BE(group, i * 2));
      writer.push(bytes);
      break;
    }
    case "cname":
      writer.name(data.target);
      break;
    case "opaque":
      writer.push(Buffer.from(data.bytes));
      break;
  }
  const length = writer.offset - start;
  if (length > 0xffff) throw new CubicleError("invalid_argument", `record data of ${length} bytes does not fit a DNS record`);
  lengthField.writeUInt16BE(length);
}

function expandIPv6(address: string): number[] {
  const [head = "", tail, extra] = address.split("::");
  if (extra !== undefined) throw new CubicleError("invalid_argument", `${JSON.stringify(address)} is not an IPv6 address`);
  const parse = (part: string) => (part === "" ? [] : part.split(":").map((group) => (/^[0-9a-f]{1,4}$/i.test(group) ? parseInt(group, 16) : NaN)));
  const front = parse(head);
  const back = tail === undefined ? [] : parse(tail);
  const missing = 8 - front.length - back.length;
  const groups = tail === undefined ? front : [...front, ...new Array<number>(Math.max(missing, 0)).fill(0), ...back];
  if (groups.length !== 8 || groups.some(Number.isNaN) || (tail !== undefined && missing < 1)) {
    throw new CubicleError("invalid_argument", `${JSON.stringify(address)} is not an IPv6 address`);
  }
  return groups;
}

/** Encodes a message, compressing names. Throws CubicleError("invalid_argument") on a bad value. */
export function encodeDnsMessage(message: DnsMessage): Buffer {
  const writer = new MessageWriter();
  writer.u16(message.header.id);
  writer.u16(encodeFlags(message.header));
  const sections = [message.questions, message.answers, message.authorities, message.additionals];
  for (const section of sections) {
    if (section.length > 0xffff) throw new CubicleError("invalid_argument", "too many entries in a DNS section");
    writer.u16(section.length);
  }
  for (const question of message.questions) {
    writer.name(question.name);
    writer.u16(question.type);
    writer.u16(question.class);
  }
  for (const record of [...message.answers, ...message.authorities, ...message.additionals]) {
    writer.name(record.name);
    writer.u16(record.type);
    writer.u16(record.class);
    writer.u32(record.ttl);
    encodeRecordData(writer, record);
  }
  const bytes = writer.toBuffer();
  if (bytes.length > MAX_MESSAGE_BYTES) throw new CubicleError("invalid_argument", `a DNS message of ${bytes.length} bytes is too long`);
  return bytes;
}

// ---- building -----------------------------------------------------------------------------

export interface QueryOptions {
  id: number;
  question: DnsQuestion;
  recursionDesired?: boolean;
  checkingDisabled?: boolean;
  /** Adds an EDNS OPT record (RFC 6891) advertising this UDP payload size. */
  ednsUdpSize?: number;
}

export function buildQuery(options: QueryOptions): Buffer {
  const additionals: DnsRecord[] = [];
  if (options.ednsUdpSize !== undefined) {
    additionals.push({ name: "", type: DnsType.OPT, class: options.ednsUdpSize, ttl: 0, data: { kind: "opaque", bytes: Buffer.alloc(0) } });
  }
  return encodeDnsMessage({
    header: { id: options.id, qr: false, opcode: DnsOpcode.QUERY, aa: false, tc: false, rd: options.recursionDesired ?? true, ra: false, ad: false, cd: options.checkingDisabled ?? false, rcode: 0 },
    questions: [options.question],
    answers: [],
    authorities: [],
    additionals,
  });
}

export interface ResponseOptions {
  rcode: number;
  answers?: DnsRecord[];
  authoritative?: boolean;
  truncated?: boolean;
  recursionAvailable?: boolean;
}

/**
 * A response to `request`: its id, opcode, RD and CD bits kept and its questions echoed (pass
 * `questions: []` when they did not parse).
 */
export function buildResponse(request: { header: DnsHeader; questions: DnsQuestion[] }, options: ResponseOptions): Buffer {
  return encodeDnsMessage({
    header: {
      id: request.header.id,
      qr: true,
      opcode: request.header.opcode,
      aa: options.authoritative ?? false,
      tc: options.truncated ?? false,
      rd: request.header.rd,
      ra: options.recursionAvailable ?? true,
      ad: false,
      cd: request.header.cd,
      rcode: options.rcode,
    },
    questions: request.questions,
    answers: options.answers ?? [],
    authorities: [],
    additionals: [],
  });
}

/** The name of a type for logs and audit reasons (`A`, `TYPE65`). */
export function typeName(type: number): string {
  for (const [name, value] of Object.entries(DnsType)) if (value === type) return name;
  return `TYPE${type}`;
}
