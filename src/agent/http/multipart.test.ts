import { test } from "node:test";
import assert from "node:assert/strict";
import { Readable } from "node:stream";
import { boundaryOf, MultipartError, maxPartHeaderBytes, parseParameters, readMultipart } from "./multipart.js";

/** The body cut into chunks of `size` bytes, so every delimiter lands across chunk edges somewhere. */
function chunked(body: Buffer, size: number): Readable {
  const chunks: Buffer[] = [];
  for (let offset = 0; offset < body.length; offset += size) chunks.push(body.subarray(offset, offset + size));
  return Readable.from(chunks);
}

interface ReadPart {
  name?: string;
  filename?: string;
  contentType?: string;
  data: Buffer;
}

async function readAll(body: Buffer, boundary: string, size: number, skipNames: string[] = []): Promise<ReadPart[]> {
  const parts: ReadPart[] = [];
  for await (const part of readMultipart(chunked(body, size), boundary)) {
    if (part.name !== undefined && skipNames.includes(part.name)) continue;
    const chunks: Buffer[] = [];
    for await (const chunk of part.body) chunks.push(chunk as Buffer);
    parts.push({ name: part.name, filename: part.filename, contentType: part.contentType, data: Buffer.concat(chunks) });
  }
  return parts;
}

const binary = Buffer.from(Array.from({ length: 3000 }, (_, index) => (index * 7) % 256));

test("every part shape streams: no filename, bare tokens, filename*, several parts, binary with CRLFs; unread parts are skipped", async () => {
  const body = Buffer.concat([
    Buffer.from("ignored preamble\r\n--b0undary\r\n"),
    Buffer.from('Content-Disposition: form-data; name="file"\r\n\r\n'),
    Buffer.from("a plain field\r\n--b0undary\r\n"),
    Buffer.from("Content-Disposition: form-data; name=file; filename=bare.txt\r\nContent-Type: application/octet-stream\r\n\r\n"),
    binary,
    Buffer.from("\r\n--b0undary \t\r\n"), // transport padding after the delimiter
    Buffer.from("Content-Disposition: form-data; name=other\r\n\r\nnot read\r\n--b0undary\r\n"),
    Buffer.from("Content-Disposition: form-data; name=\"file\"; filename=\"fallback\"; filename*=UTF-8''%E2%82%AC%20dir/x.txt\r\n\r\n"),
    Buffer.from("content with a false delimiter\r\n--b0undaryX and \r\n--b0und\r\n--b0undary--\r\nepilogue\r\n--b0undary\r\n"),
  ]);
  for (const size of [1, 2, 5, 13, 64, 100_000]) {
    const parts = await readAll(body, "b0undary", size, ["other"]);
    assert.equal(parts.length, 3, `chunk size ${size}`);
    assert.deepEqual({ ...parts[0], data: parts[0]!.data.toString() }, { name: "file", filename: undefined, contentType: undefined, data: "a plain field" });
    assert.equal(parts[1]!.filename, "bare.txt");
    assert.equal(parts[1]!.contentType, "application/octet-stream");
    assert.ok(parts[1]!.data.equals(binary), `binary part intact at chunk size ${size}`);
    assert.equal(parts[2]!.filename, "€ dir/x.txt", "filename* wins over filename");
    assert.equal(parts[2]!.data.toString(), "content with a false delimiter\r\n--b0undaryX and \r\n--b0und");
  }
});

test("a big part is handed out in pieces, never held whole", async () => {
  const size = 8 * 1024 * 1024;
  const chunks = (function* () {
    yield Buffer.from('--x\r\nContent-Disposition: form-data; name="file"\r\n\r\n');
    for (let sent = 0; sent < size; sent += 65536) yield Buffer.alloc(65536, 0x2d); // dashes, like a delimiter's start
    yield Buffer.from("\r\n--x--\r\n");
  })();
  let total = 0;
  let largest = 0;
  for await (const part of readMultipart(Readable.from(chunks), "x")) {
    for await (const chunk of part.body) {
      total += (chunk as Buffer).length;
      largest = Math.max(largest, (chunk as Buffer).length);
    }
  }
  assert.equal(total, size);
  assert.ok(largest <= 2 * 65536, `largest piece ${largest}`);
});

test("malformed bodies are MultipartErrors, never hangs", async () => {
  const cases: Array<[string, string | Buffer]> = [
    ["no boundary at all", "just text"],
    ["cut inside a part", '--x\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc'],
    ["cut inside the header", "--x\r\nContent-Disposition: form-da"],
    ["header line without a colon", "--x\r\nnot a header\r\n\r\nabc\r\n--x--"],
    ["header too large", `--x\r\nX-Big: ${"a".repeat(maxPartHeaderBytes + 10)}\r\n\r\nabc\r\n--x--`],
    ["garbage after the delimiter", `--x${"y".repeat(2000)}`],
  ];
  for (const [label, body] of cases) {
    await assert.rejects(readAll(Buffer.from(body), "x", 7), MultipartError, label);
  }
});

test("parameters: quoted with escapes, bare tokens, repeated keys, RFC 5987; boundaries", () => {
  const params = parseParameters(`form-data; name=file; filename="a \\"quoted\\" name.txt"; NAME=second; title*=iso-8859-1'en'caf%E9; bad*=nonsense`);
  assert.equal(params.get("name"), "file", "the first of repeated keys wins, keys are case-insensitive");
  assert.equal(params.get("filename"), 'a "quoted" name.txt');
  assert.equal(params.get("title*"), "café");
  assert.equal(params.has("bad*"), false);
  assert.equal(boundaryOf('multipart/form-data; boundary="with space"'), "with space");
  assert.equal(boundaryOf("multipart/form-data;boundary=----WebKitFormBoundaryabc"), "----WebKitFormBoundaryabc");
  assert.throws(() => boundaryOf("multipart/form-data"), MultipartError);
  assert.throws(() => boundaryOf(`multipart/form-data; boundary=${"b".repeat(201)}`), MultipartError);
});
