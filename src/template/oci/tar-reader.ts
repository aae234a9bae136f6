import { CubicleError } from "../../shared/cubicle-error.js";

/**
 * A streaming tar reader for image layers: POSIX ustar, GNU long names (`L`, `K`) and PAX
 * extended headers (`x` per entry, `g` global) for path, linkpath, size, uid, gid, mtime and
 * xattrs. Layers come from registries and tarballs nobody vetted, so every header is checked
 * (checksum, numeric fields, bounded extension records) and a malformed archive is an error,
 * never a guess.
 */

export type TarEntryType = "file" | "hardlink" | "symlink" | "chardev" | "blockdev" | "directory" | "fifo";

export interface TarEntry {
  type: TarEntryType;
  /** The path as the archive names it (not normalized: `./a`, `/abs`, `../x` are all possible). */
  path: string;
  /** Target of a symlink or hard link, as written in the archive. */
  linkPath: string;
  /** Permission bits with setuid/setgid/sticky (mode & 0o7777). */
  mode: number;
  uid: number;
  gid: number;
  /** Bytes of data that follow (0 for everything but regular files). */
  size: number;
  /** Modification time, seconds since the epoch (fractional when PAX gave one). */
  mtime: number;
  /** Extended attributes the archive carried (PAX SCHILY.xattr.* / LIBARCHIVE.xattr.*), by name. */
  xattrs: Map<string, Buffer>;
  /** Offset of the entry's data in the (uncompressed) archive: lets a tarball be read by ranges. */
  dataOffset: number;
}

export interface TarReadLimits {
  /** Largest PAX header or GNU long name accepted, bytes. Default 1 MiB. */
  maxExtensionBytes?: number;
}

const BLOCK = 512;
const DEFAULT_MAX_EXTENSION = 1 << 20;

function corrupt(message: string): CubicleError {
  return new CubicleError("failed_precondition", `corrupt tar archive: ${message}`);
}

/** Pulls exact byte counts from an async stream of chunks. */
class ByteReader {
  private readonly iterator: AsyncIterator<Buffer | Uint8Array | string>;
  private current: Buffer = Buffer.alloc(0);
  private pos = 0;
  private ended = false;
  /** Bytes handed out so far. */
  offset = 0;

  constructor(source: AsyncIterable<Buffer | Uint8Array | string>) {
    this.iterator = source[Symbol.asyncIterator]();
  }

  private async nextChunk(): Promise<boolean> {
    if (this.ended) return false;
    for (;;) {
      const next = await this.iterator.next();
      if (next.done) {
        this.ended = true;
        return false;
      }
      const value = next.value;
      const chunk = typeof value === "string" ? Buffer.from(value) : Buffer.isBuffer(value) ? value : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
      if (chunk.length === 0) continue;
      this.current = chunk;
      this.pos = 0;
      return true;
    }
  }

  /** Exactly `n` bytes, or fewer only when the stream ended first. */
  async read(n: number): Promise<Buffer> {
    const available = this.current.length - this.pos;
    if (available >= n) {
      const out = this.current.subarray(this.pos, this.pos + n);
      this.pos += n;
      this.offset += n;
      return out;
    }
    const parts: Buffer[] = [];
    let need = n;
    while (need > 0) {
      if (this.current.length - this.pos === 0 && !(await this.nextChunk())) break;
      const take = Math.min(need, this.current.length - this.pos);
      parts.push(this.current.subarray(this.pos, this.pos + take));
      this.pos += take;
      need -= take;
    }
    const out = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
    this.offset += out.length;
    return out;
  }

  /** Yields the next `n` bytes as they arrive, without copying; fails if the stream ends early. */
  async *chunks(n: number): AsyncGenerator<Buffer> {
    let need = n;
    while (need > 0) {
      if (this.current.length - this.pos === 0 && !(await this.nextChunk())) {
        throw corrupt(`unexpected end of archive (${need} bytes of data missing)`);
      }
      const take = Math.min(need, this.current.length - this.pos);
      const out = this.current.subarray(this.pos, this.pos + take);
      this.pos += take;
      this.offset += take;
      need -= take;
      yield out;
    }
  }

  async skip(n: number): Promise<void> {
    for await (const _ of this.chunks(n)) void _;
  }

  /** Reads and drops everything left (a compressed layer's digest covers its trailing bytes too). */
  async drain(): Promise<void> {
    this.pos = this.current.length;
    while (await this.nextChunk()) {
      this.offset += this.current.length;
      this.pos = this.current.length;
    }
  }
}

function cString(block: Buffer, start: number, length: number): string {
  const field = block.subarray(start, start + length);
  const nul = field.indexOf(0);
  return (nul < 0 ? field : field.subarray(0, nul)).toString("utf8");
}

/** A numeric header field: octal text, or GNU base-256 when the high bit of the first byte is set. */
function numeric(block: Buffer, start: number, length: number, what: string): number {
  const field = block.subarray(start, start + length);
  if ((field[0]! & 0x80) !== 0) {
    if ((field[0]! & 0x40) !== 0) throw corrupt(`negative ${what}`);
    let value = field[0]! & 0x3f;
    for (let i = 1; i < field.length; i++) {
      value = value * 256 + field[i]!;
      if (value > Number.MAX_SAFE_INTEGER) throw corrupt(`${what} too large`);
    }
    return value;
  }
  const text = field.toString("latin1").replace(/\0.*$/s, "").trim();
  if (text === "") return 0;
  if (!/^[0-7]+$/.test(text)) throw corrupt(`${what} field is not octal`);
  const value = parseInt(text, 8);
  if (!Number.isSafeInteger(value)) throw corrupt(`${what} too large`);
  return value;
}

function checksumOk(block: Buffer): boolean {
  const stored = numeric(block, 148, 8, "checksum");
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const byte = i >= 148 && i < 156 ? 0x20 : block[i]!;
    unsigned += byte;
    signed += byte > 127 ? byte - 256 : byte;
  }
  // Some old writers summed signed chars; tar accepts both.
  return stored === unsigned || stored === signed;
}

function isZeroBlock(block: Buffer): boolean {
  for (let i = 0; i < block.length; i++) if (block[i] !== 0) return false;
  return true;
}

/** Parses PAX records (`"<len> <key>=<value>\n"`, POSIX.1-2001 pax format) into `into`. */
function parsePax(data: Buffer, into: Map<string, Buffer>): void {
  let pos = 0;
  while (pos < data.length) {
    if (data[pos] === 0) break; // padding some writers leave
    const space = data.indexOf(0x20, pos);
    if (space < 0 || space - pos > 20) throw corrupt("malformed PAX record length");
    const lengthText = data.subarray(pos, space).toString("latin1");
    if (!/^[0-9]+$/.test(lengthText)) throw corrupt("malformed PAX record length");
    const length = Number(lengthText);
    const end = pos + length;
    if (length <= space - pos + 1 || end > data.length || data[end - 1] !== 0x0a) throw corrupt("malformed PAX record");
    const record = data.subarray(space + 1, end - 1);
    const eq = record.indexOf(0x3d);
    if (eq <= 0) throw corrupt("PAX record without a key");
    into.set(record.subarray(0, eq).toString("utf8"), Buffer.from(record.subarray(eq + 1)));
    pos = end;
  }
}

function paxNumber(value: Buffer, key: string): number {
  const text = value.toString("latin1");
  if (!/^[0-9]+$/.test(text)) throw corrupt(`PAX ${key} is not a number`);
  const n = Number(text);
  if (!Number.isSafeInteger(n)) throw corrupt(`PAX ${key} too large`);
  return n;
}

function checkedPath(value: string, what: string): string {
  if (value.includes("\0")) throw corrupt(`${what} contains a NUL byte`);
  if (value.length > 8192) throw corrupt(`${what} longer than 8192 bytes`);
  return value;
}

const typeByFlag: Record<string, TarEntryType | undefined> = {
  "0": "file",
  "\0": "file",
  "7": "file",
  "1": "hardlink",
  "2": "symlink",
  "3": "chardev",
  "4": "blockdev",
  "5": "directory",
  "6": "fifo",
};

/**
 * Reads a tar stream entry by entry. The body generator of an entry yields its data in the
 * chunks the source delivered; whatever the consumer leaves unread is skipped. After the
 * end-of-archive blocks the rest of the source is drained, so digests computed on the way
 * cover the whole stream.
 */
export async function* readTar(
  source: AsyncIterable<Buffer | Uint8Array | string>,
  limits: TarReadLimits = {},
): AsyncGenerator<{ entry: TarEntry; body: AsyncGenerator<Buffer> }> {
  const maxExtension = limits.maxExtensionBytes ?? DEFAULT_MAX_EXTENSION;
  const reader = new ByteReader(source);
  const globalPax = new Map<string, Buffer>();
  let localPax = new Map<string, Buffer>();
  let longName: string | undefined;
  let longLink: string | undefined;

  const readExtension = async (size: number, what: string): Promise<Buffer> => {
    if (size > maxExtension) throw corrupt(`${what} of ${size} bytes is larger than ${maxExtension}`);
    const data = await reader.read(size);
    if (data.length < size) throw corrupt(`unexpected end of archive in ${what}`);
    await reader.skip((BLOCK - (size % BLOCK)) % BLOCK);
    return Buffer.from(data);
  };

  for (;;) {
    const block = await reader.read(BLOCK);
    if (block.length === 0) break; // no end-of-archive blocks: accepted, as GNU tar does
    if (block.length < BLOCK) throw corrupt("unexpected end of archive in a header");
    if (isZeroBlock(block)) {
      await reader.drain();
      break;
    }
    if (!checksumOk(block)) throw corrupt(`header checksum mismatch at offset ${reader.offset - BLOCK}`);

    const flag = String.fromCharCode(block[156]!);
    const headerSize = numeric(block, 124, 12, "size");

    if (flag === "x" || flag === "g") {
      const data = await readExtension(headerSize, "PAX header");
      parsePax(data, flag === "g" ? globalPax : localPax);
      continue;
    }
    if (flag === "L" || flag === "K") {
      const data = await readExtension(headerSize, "GNU long name");
      const nul = data.indexOf(0);
      const value = checkedPath((nul < 0 ? data : data.subarray(0, nul)).toString("utf8"), "GNU long name");
      if (flag === "L") longName = value;
      else longLink = value;
      continue;
    }

    const type = typeByFlag[flag];
    if (!type) {
      const shown = /^[\x20-\x7e]$/.test(flag) ? `'${flag}'` : `0x${block[156]!.toString(16)}`;
      throw new CubicleError("failed_precondition", `unsupported tar entry type ${shown} (sparse, multi-volume and vendor entries are not supported)`);
    }

    const pax = new Map([...globalPax, ...localPax]);
    localPax = new Map();
    for (const key of pax.keys()) {
      if (key.startsWith("GNU.sparse.")) throw new CubicleError("failed_precondition", "unsupported tar entry: GNU sparse file");
    }

    const magic = block.subarray(257, 263).toString("latin1");
    const isPosixUstar = magic === "ustar\0";
    let path = cString(block, 0, 100);
    if (isPosixUstar) {
      const prefix = cString(block, 345, 155);
      if (prefix) path = `${prefix}/${path}`;
    }
    let linkPath = cString(block, 157, 100);
    if (longName !== undefined) path = longName;
    if (longLink !== undefined) linkPath = longLink;
    longName = longLink = undefined;

    let size = headerSize;
    let uid = numeric(block, 108, 8, "uid");
    let gid = numeric(block, 116, 8, "gid");
    let mtime = numeric(block, 136, 12, "mtime");
    const xattrs = new Map<string, Buffer>();
    for (const [key, value] of pax) {
      if (value.length === 0) continue; // an empty local value cancels a global one
      if (key === "path") path = value.toString("utf8");
      else if (key === "linkpath") linkPath = value.toString("utf8");
      else if (key === "size") size = paxNumber(value, key);
      else if (key === "uid") uid = paxNumber(value, key);
      else if (key === "gid") gid = paxNumber(value, key);
      else if (key === "mtime") {
        const t = Number(value.toString("latin1"));
        if (Number.isFinite(t)) mtime = t;
      } else if (key.startsWith("SCHILY.xattr.")) xattrs.set(key.slice("SCHILY.xattr.".length), value);
      else if (key.startsWith("LIBARCHIVE.xattr.")) xattrs.set(key.slice("LIBARCHIVE.xattr.".length), value);
    }
    checkedPath(path, "path");
    checkedPath(linkPath, "link path");
    if (path === "") throw corrupt("entry with an empty path");

    // As Go's archive/tar: only regular files carry data; for other types a size is ignored.
    const dataSize = type === "file" ? size : 0;
    const entry: TarEntry = {
      type,
      path,
      linkPath,
      mode: numeric(block, 100, 8, "mode") & 0o7777,
      uid,
      gid,
      size: dataSize,
      mtime,
      xattrs,
      dataOffset: reader.offset,
    };
    let consumed = 0;
    const body = (async function* body() {
      for await (const chunk of reader.chunks(dataSize)) {
        consumed += chunk.length;
        yield chunk;
      }
    })();
    yield { entry, body };
    await reader.skip(dataSize - consumed);
    await reader.skip((BLOCK - (dataSize % BLOCK)) % BLOCK);
  }
}
