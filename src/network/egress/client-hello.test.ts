import assert from "node:assert/strict";
import net from "node:net";
import { before, test } from "node:test";
import tls from "node:tls";
import { normaliseHostname as normalizeHostName } from "../egress-policy.js";
import { MAX_CLIENT_HELLO_BYTES, parseClientHello } from "./client-hello.js";

/** The first bytes a real Node TLS client sends (its ClientHello), captured on a loopback listener. */
async function captureClientHello(servername: string | undefined, extra: tls.ConnectionOptions = {}): Promise<Buffer> {
  const server = net.createServer();
  const captured = new Promise<Buffer>((resolve) => {
    server.on("connection", (socket) => {
      const chunks: Buffer[] = [];
      socket.on("data", (chunk) => {
        chunks.push(chunk);
        const data = Buffer.concat(chunks);
        if (data.length >= 5 && data.length >= 5 + data.readUInt16BE(3)) {
          resolve(data);
          socket.destroy();
        }
      });
      socket.on("error", () => {});
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const client = tls.connect({ host: "127.0.0.1", port: (server.address() as net.AddressInfo).port, servername, ...extra });
  client.on("error", () => {});
  try {
    return await captured;
  } finally {
    client.destroy();
    server.close();
  }
}

/** The same handshake split into TLS records of at most `size` bytes of payload each. */
function refragment(hello: Buffer, size: number): Buffer {
  const payload = hello.subarray(5, 5 + hello.readUInt16BE(3));
  const records: Buffer[] = [];
  for (let offset = 0; offset < payload.length; offset += size) {
    const part = payload.subarray(offset, offset + size);
    const header = Buffer.from([0x16, 0x03, 0x01, 0, 0]);
    header.writeUInt16BE(part.length, 3);
    records.push(header, part);
  }
  return Buffer.concat(records);
}

let hello: Buffer;
before(async () => {
  hello = await captureClientHello("API.Example.com");
});

test("reads the SNI of a real ClientHello, lowercased", () => {
  assert.deepEqual(parseClientHello(hello), { state: "complete", sni: "api.example.com" });
});

test("a ClientHello without SNI is complete with no name", async () => {
  // Node sends no SNI when servername is an IP literal.
  const noSni = await captureClientHello(undefined);
  assert.deepEqual(parseClientHello(noSni), { state: "complete", sni: undefined });
});

test("every prefix of a ClientHello is incomplete, fed byte by byte", () => {
  for (let length = 0; length < hello.length; length++) {
    assert.deepEqual(parseClientHello(hello.subarray(0, length)), { state: "incomplete" }, `prefix ${length}`);
  }
});

test("a ClientHello fragmented over many TLS records, fed in tiny chunks", () => {
  for (const size of [1, 7, 50]) {
    const fragmented = refragment(hello, size);
    for (let length = 0; length < fragmented.length; length += 3) {
      const result = parseClientHello(fragmented.subarray(0, length));
      if (result.state !== "incomplete") assert.fail(`size ${size} prefix ${length}: ${JSON.stringify(result)}`);
    }
    assert.deepEqual(parseClientHello(fragmented), { state: "complete", sni: "api.example.com" });
  }
});

test("bytes after the ClientHello do not matter", () => {
  assert.deepEqual(parseClientHello(Buffer.concat([hello, Buffer.from("garbage")])), { state: "complete", sni: "api.example.com" });
});

test("garbage, other record types and other handshake messages are invalid", () => {
  assert.deepEqual(parseClientHello(Buffer.from("GET / HTTP/1.1\r\n\r\n")), { state: "invalid" });
  assert.deepEqual(parseClientHello(Buffer.from([0x17, 0x03, 0x03, 0x00, 0x10])), { state: "invalid" });
  assert.deepEqual(parseClientHello(Buffer.from([0x16, 0x03, 0x01, 0x00, 0x00])), { state: "invalid" });
  const serverHello = Buffer.from(hello);
  serverHello[5] = 0x02;
  assert.deepEqual(parseClientHello(serverHello), { state: "invalid" });
  // A record header followed by a change of content type in the middle of the handshake.
  const fragmented = refragment(hello, 40);
  const broken = Buffer.concat([fragmented.subarray(0, 45), Buffer.from([0x14, 0x03, 0x03, 0x00, 0x01, 0x01])]);
  assert.deepEqual(parseClientHello(broken), { state: "invalid" });
});

test("truncated or lying lengths inside a complete ClientHello give no name, never a throw", () => {
  const body = hello.subarray(5, 5 + hello.readUInt16BE(3));
  for (let cut = 4; cut < body.length; cut += 5) {
    // Claim the handshake ends at `cut`: the inner lengths now overrun.
    const handshake = Buffer.from(body.subarray(0, cut));
    handshake.writeUIntBE(cut - 4, 1, 3);
    const record = Buffer.concat([Buffer.from([0x16, 0x03, 0x01, cut >> 8, cut & 0xff]), handshake]);
    const result = parseClientHello(record);
    assert.equal(result.state, "complete");
  }
  for (let i = 0; i < 2000; i++) {
    const mutated = Buffer.from(hello);
    for (let j = 0; j < 4; j++) mutated[9 + Math.floor(Math.random() * (mutated.length - 9))] = Math.floor(Math.random() * 256);
    const result = parseClientHello(mutated);
    if (result.state === "complete" && result.sni !== undefined) assert.match(result.sni, /^[a-z0-9_.-]+$/);
  }
});

test("a ClientHello larger than 16 KiB is invalid, and so is a 16 KiB stream of small records", () => {
  const huge = Buffer.from([0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x01, 0x00, 0x00]);
  assert.deepEqual(parseClientHello(huge), { state: "invalid" });
  // Many 1-byte records of a big handshake: invalid once the bound is reached.
  const big = Buffer.alloc(4);
  big[0] = 1;
  big.writeUIntBE(MAX_CLIENT_HELLO_BYTES - 100, 1, 3);
  const records: Buffer[] = [];
  for (let i = 0; i < MAX_CLIENT_HELLO_BYTES / 6 + 10; i++) records.push(Buffer.from([0x16, 0x03, 0x01, 0x00, 0x01, i < 4 ? big[i]! : 0]));
  assert.deepEqual(parseClientHello(Buffer.concat(records)), { state: "invalid" });
});

test("host names are normalised and checked", () => {
  assert.equal(normalizeHostName("Example.COM."), "example.com");
  assert.equal(normalizeHostName("1.2.3.4"), undefined);
  assert.equal(normalizeHostName("a..b"), undefined);
  assert.equal(normalizeHostName("bad host"), undefined);
  assert.equal(normalizeHostName("x\u0000y"), undefined);
  assert.equal(normalizeHostName(`${"a".repeat(64)}.com`), undefined);
});
