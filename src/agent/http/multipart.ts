/**
 * A streaming multipart/form-data reader (RFC 7578) for uploads: every part's body is a stream,
 * whether or not the part has a filename or a Content-Type. (busboy turns a part without a
 * filename into a string field, decoded by charset and held in memory; upstream envd, on Go's
 * mime/multipart, streams every part, and the SDKs and browsers send both shapes.)
 *
 * Parts come one at a time: the next is read only once the previous body was consumed or
 * skipped, so memory stays bounded by one chunk plus a delimiter, and a slow disk slows the
 * client down instead of filling memory.
 */
import type { Readable } from "node:stream";
import { Readable as ReadableStream } from "node:stream";

/** A part's header block larger than this is malformed (a browser's is ~200 bytes). */
export const maxPartHeaderBytes = 16 * 1024;

export class MultipartError extends Error {}

export interface MultipartPart {
  /** The form field name (`name=` of Content-Disposition), if any. */
  name?: string;
  /** `filename*` (RFC 5987) or `filename`, as sent: a whole path is kept. */
  filename?: string;
  contentType?: string;
  /** The body; read it to the end (or call `skip`) before asking for the next part. */
  body: Readable;
}

/** The boundary of a `multipart/form-data; boundary=...` Content-Type; throws MultipartError when there is none. */
export function boundaryOf(contentType: string): string {
  const params = parseParameters(contentType);
  const boundary = params.get("boundary");
  if (!boundary) throw new MultipartError("multipart/form-data without a boundary parameter");
  if (boundary.length > 200) throw new MultipartError("the multipart boundary is longer than 200 characters");
  return boundary;
}

/**
 * The parts of `source` in order. A body that ends before the closing delimiter, or a
 * malformed part header, throws MultipartError (from the iterator or from the part's body).
 */
export async function* readMultipart(source: Readable, boundary: string): AsyncGenerator<MultipartPart> {
  const reader = new ChunkReader(source);
  // Seen as if the body started with CRLF, the first delimiter is like every other one.
  const delimiter = Buffer.from(`\r\n--${boundary}`, "latin1");
  reader.unshift(Buffer.from("\r\n"));
  // Preamble: everything before the first delimiter is ignored.
  if (!(await reader.skipPast(delimiter))) throw new MultipartError("no multipart boundary found in the body");
  for (;;) {
    if (await reader.startsWith("--")) return; // the closing delimiter; an epilogue is ignored
    // Transport padding after a delimiter, then its CRLF.
    const lineEnd = await reader.indexOf(Buffer.from("\r\n"), 1024);
    if (lineEnd < 0) throw new MultipartError("malformed multipart delimiter line");
    reader.consume(lineEnd + 2);
    const headerEnd = await reader.indexOf(Buffer.from("\r\n\r\n"), maxPartHeaderBytes, true);
    if (headerEnd < 0) throw new MultipartError(`a multipart part header is missing or larger than ${maxPartHeaderBytes} bytes`);
    const headerText = reader.take(headerEnd).toString("utf8");
    reader.consume(4);
    const headers = parseHeaderBlock(headerText);

    let finished = false;
    const chunks = async function* () {
      for (;;) {
        const piece = await reader.readUntil(delimiter);
        if (piece.data.length > 0) yield piece.data;
        if (piece.found) {
          finished = true;
          return;
        }
      }
    };
    const body = ReadableStream.from(chunks(), { objectMode: false });
    const disposition = parseParameters(headers.get("content-disposition") ?? "");
    yield {
      name: disposition.get("name"),
      filename: disposition.get("filename*") ?? disposition.get("filename"),
      contentType: headers.get("content-type"),
      body,
    };
    // A part nobody read (or not to the end) is read through and dropped, by the same stream,
    // so there is never a second reader of the source.
    if (!finished) for await (const _chunk of body) void _chunk;
  }
}

/** Header lines `Name: value` of one part (names lower-cased; folded lines joined). */
function parseHeaderBlock(text: string): Map<string, string> {
  const headers = new Map<string, string>();
  let last: string | undefined;
  for (const line of text.split("\r\n")) {
    if ((line.startsWith(" ") || line.startsWith("\t")) && last) {
      headers.set(last, `${headers.get(last)} ${line.trim()}`);
      continue;
    }
    const colon = line.indexOf(":");
    if (colon <= 0) throw new MultipartError(`malformed multipart part header line ${JSON.stringify(line.slice(0, 80))}`);
    last = line.slice(0, colon).trim().toLowerCase();
    if (!headers.has(last)) headers.set(last, line.slice(colon + 1).trim());
  }
  return headers;
}

/**
 * `key=value` parameters after the first `;` of a header value (`form-data; name="file";
 * filename=a.txt`): quoted strings with backslash escapes or bare tokens; `key*` values are
 * RFC 5987 (`utf-8''%e2%82%ac`). Keys lower-cased; the first of repeated keys wins.
 */
export function parseParameters(value: string): Map<string, string> {
  const params = new Map<string, string>();
  let index = value.indexOf(";");
  if (index < 0) return params;
  while (index < value.length) {
    index++;
    while (value[index] === " " || value[index] === "\t") index++;
    const equals = value.indexOf("=", index);
    if (equals < 0) break;
    const key = value.slice(index, equals).trim().toLowerCase();
    let cursor = equals + 1;
    while (value[cursor] === " " || value[cursor] === "\t") cursor++;
    let parsed = "";
    if (value[cursor] === '"') {
      cursor++;
      while (cursor < value.length && value[cursor] !== '"') {
        if (value[cursor] === "\\" && cursor + 1 < value.length) cursor++;
        parsed += value[cursor++];
      }
      cursor++; // the closing quote
      const next = value.indexOf(";", cursor);
      index = next < 0 ? value.length : next;
    } else {
      const next = value.indexOf(";", cursor);
      index = next < 0 ? value.length : next;
      parsed = value.slice(cursor, index).trim();
    }
    if (key.endsWith("*")) {
      const decoded = decodeExtendedValue(parsed);
      if (decoded !== undefined && !params.has(key)) params.set(key, decoded);
    } else if (key && !params.has(key)) {
      params.set(key, parsed);
    }
  }
  return params;
}

/** RFC 5987 `charset'language'percent-encoded`; undefined when malformed or not UTF-8/Latin-1. */
function decodeExtendedValue(value: string): string | undefined {
  const match = /^([^']*)'[^']*'(.*)$/.exec(value);
  if (!match) return undefined;
  const charset = match[1]!.toLowerCase();
  const bytes: number[] = [];
  const encoded = match[2]!;
  for (let index = 0; index < encoded.length; index++) {
    if (encoded[index] === "%" && /^[0-9a-fA-F]{2}$/.test(encoded.slice(index + 1, index + 3))) {
      bytes.push(parseInt(encoded.slice(index + 1, index + 3), 16));
      index += 2;
    } else {
      bytes.push(...Buffer.from(encoded[index]!, "utf8"));
    }
  }
  if (charset === "utf-8" || charset === "utf8") return Buffer.from(bytes).toString("utf8");
  if (charset === "iso-8859-1" || charset === "latin1") return Buffer.from(bytes).toString("latin1");
  return undefined;
}

/** Pulls chunks from a stream on demand and keeps the bytes not consumed yet. */
class ChunkReader {
  private buffer: Buffer = Buffer.alloc(0);
  private readonly source: AsyncIterator<Buffer | string>;
  private ended = false;

  constructor(stream: Readable) {
    this.source = stream[Symbol.asyncIterator]();
  }

  unshift(bytes: Buffer): void {
    this.buffer = Buffer.concat([bytes, this.buffer]);
  }

  /** Reads one more chunk; false at the end of the stream. */
  private async more(): Promise<boolean> {
    if (this.ended) return false;
    const next = await this.source.next();
    if (next.done) {
      this.ended = true;
      return false;
    }
    const chunk = typeof next.value === "string" ? Buffer.from(next.value) : next.value;
    this.buffer = this.buffer.length === 0 ? chunk : Buffer.concat([this.buffer, chunk]);
    return true;
  }

  async startsWith(text: string): Promise<boolean> {
    while (this.buffer.length < text.length && (await this.more()));
    return this.buffer.subarray(0, text.length).toString("latin1") === text;
  }

  /**
   * Offset of `needle` within the first `limit` bytes, reading more as needed; -1 when the
   * stream ends or `limit` is passed first. `mustExist` makes the end of the stream an error.
   */
  async indexOf(needle: Buffer, limit: number, mustExist = false): Promise<number> {
    for (;;) {
      const found = this.buffer.indexOf(needle);
      if (found >= 0 && found <= limit) return found;
      if (this.buffer.length > limit + needle.length) return -1;
      if (!(await this.more())) {
        if (mustExist) throw new MultipartError("the multipart body ended inside a part header");
        return -1;
      }
    }
  }

  take(length: number): Buffer {
    const taken = this.buffer.subarray(0, length);
    this.buffer = this.buffer.subarray(length);
    return taken;
  }

  consume(length: number): void {
    this.buffer = this.buffer.subarray(length);
  }

  /**
   * Where the next real `delimiter` starts, reading more as needed: a match followed by `--`
   * or by optional spaces and CRLF (RFC 2046); a match followed by anything else is content
   * (`--boundaryX`). -1 when none is in the buffer and the stream ended.
   */
  private async nextDelimiter(delimiter: Buffer): Promise<{ offset: number; complete: boolean }> {
    let from = 0;
    for (;;) {
      const found = this.buffer.indexOf(delimiter, from);
      if (found < 0) return { offset: -1, complete: this.ended };
      const verdict = this.delimiterEnds(found + delimiter.length);
      if (verdict === true) return { offset: found, complete: true };
      if (verdict === false) {
        from = found + 1;
        continue;
      }
      if (!(await this.more())) return { offset: -1, complete: true };
    }
  }

  /** Whether the bytes at `offset` end a delimiter; undefined when more bytes are needed to say. */
  private delimiterEnds(offset: number): boolean | undefined {
    const buffer = this.buffer;
    if (offset + 2 > buffer.length) return undefined;
    if (buffer[offset] === 0x2d && buffer[offset + 1] === 0x2d) return true; // "--"
    let cursor = offset;
    while (cursor < buffer.length && (buffer[cursor] === 0x20 || buffer[cursor] === 0x09)) {
      if (cursor - offset > 1024) return false;
      cursor++;
    }
    if (cursor + 2 > buffer.length) return undefined;
    return buffer[cursor] === 0x0d && buffer[cursor + 1] === 0x0a;
  }

  /**
   * Bytes before the next `delimiter` (consuming the delimiter when found). Returns what is
   * safe to hand out now: all but a possible delimiter start at the end when none was found.
   */
  async readUntil(delimiter: Buffer): Promise<{ data: Buffer; found: boolean }> {
    for (;;) {
      const { offset, complete } = await this.nextDelimiter(delimiter);
      if (offset >= 0) {
        const data = this.take(offset);
        this.consume(delimiter.length);
        return { data, found: true };
      }
      if (complete) throw new MultipartError("the multipart body ended inside a part (no closing boundary)");
      // Everything but what could be the start of a delimiter cut by the chunk's end.
      const safe = this.buffer.length - (delimiter.length - 1);
      if (safe > 0) return { data: this.take(safe), found: false };
      if (!(await this.more())) throw new MultipartError("the multipart body ended inside a part (no closing boundary)");
    }
  }

  /** Discards everything up to and including the next `delimiter`; false when the stream ends first. */
  async skipPast(delimiter: Buffer): Promise<boolean> {
    for (;;) {
      const { offset } = await this.nextDelimiter(delimiter);
      if (offset >= 0) {
        this.consume(offset + delimiter.length);
        return true;
      }
      this.consume(Math.max(0, this.buffer.length - (delimiter.length - 1)));
      if (!(await this.more())) return false;
    }
  }
}
