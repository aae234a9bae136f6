import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import { fuzzRuns } from "../../../test/security/fuzz.js";
import {
  DnsParseError,
  DnsRcode,
  DnsType,
  buildQuery,
  buildResponse,
  encodeDnsMessage,
  nameToLabels,
  parseDnsHeader,
  parseDnsMessage,
  type DnsMessage,
} from "./dns-message.js";

/** A query for www.example.com A, id 0x1234, RD, written out by hand (RFC 1035 §4.1). */
const handQuery = Buffer.from(
  "1234 0100 0001 0000 0000 0000 03777777 076578616d706c65 03636f6d 00 0001 0001".replace(/ /g, ""),
  "hex",
);

function header(bytes: string): string {
  // id 0xabcd, a response with RD and RA, counts given by the caller.
  return "abcd 8180 " + bytes;
}

function hex(text: string): Buffer {
  return Buffer.from(text.replace(/\s+/g, ""), "hex");
}

describe("DNS message parsing", () => {
  it("reads a query written by hand", () => {
    const message = parseDnsMessage(handQuery);
    assert.equal(message.header.id, 0x1234);
    assert.equal(message.header.rd, true);
    assert.equal(message.header.qr, false);
    assert.deepEqual(message.questions, [{ name: "www.example.com", type: DnsType.A, class: 1 }]);
  });

  it("follows compression pointers in answers: a CNAME chain and A records", () => {
    // Question www.example.com at offset 12 (17 name bytes + type + class: ends at 33). Answer 1
    // at 33: a pointer to 12, CNAME, TTL 300, 17 bytes of rdata from 45: cdn.example.net. Answer 2:
    // a pointer to that target (45), A, TTL 3600, 192.0.2.7.
    const withA = hex(
      header("0001 0002 0000 0000") +
        "03777777 076578616d706c65 03636f6d 00 0001 0001" +
        "c00c 0005 0001 0000012c 0011 0363646e 076578616d706c65 036e6574 00" +
        "c02d 0001 0001 00000e10 0004 c0000207",
    );
    const message = parseDnsMessage(withA);
    assert.deepEqual(message.answers, [
      { name: "www.example.com", type: DnsType.CNAME, class: 1, ttl: 300, data: { kind: "cname", target: "cdn.example.net" } },
      { name: "cdn.example.net", type: DnsType.A, class: 1, ttl: 3600, data: { kind: "a", address: "192.0.2.7" } },
    ]);
  });

  it("escapes label bytes that would make a name ambiguous", () => {
    const bytes = hex(header("0001 0000 0000 0000") + "03612e62 02 5c00 03636f6d 00 0001 0001");
    assert.equal(parseDnsMessage(bytes).questions[0]!.name, "a\\.b.\\\\\\000.com");
    assert.deepEqual(
      nameToLabels("a\\.b.\\\\\\000.com").map((label) => [...label]),
      [[0x61, 0x2e, 0x62], [0x5c, 0x00], [0x63, 0x6f, 0x6d]],
    );
  });

  const refusals: Array<[string, Buffer, RegExp]> = [
    ["a message shorter than a header", hex("1234 0100 0001"), /shorter than a header/],
    ["a truncated question", handQuery.subarray(0, handQuery.length - 1), /truncated/],
    ["a label running past the end", hex(header("0001 0000 0000 0000") + "3f 616263"), /need at least|truncated/],
    ["a pointer to itself", hex(header("0001 0000 0000 0000") + "c00c 0001 0001"), /does not point backwards/],
    ["a forward pointer", hex(header("0001 0000 0000 0000") + "c00e 0001 0001 00"), /does not point backwards/],
    ["a pointer into the header", hex(header("0001 0000 0000 0000") + "c002 0001 0001"), /label type|truncated|backwards|bytes after/],
    ["a label type 01", hex(header("0001 0000 0000 0000") + "41 0001 0001"), /label type 0x40/],
    ["65535 answers in a small message", hex("abcd 8180 0001 ffff 0000 0000" + "00 0001 0001"), /counts/],
    ["65535 questions", hex("abcd 0100 ffff 0000 0000 0000" + "00 0001 0001"), /counts/],
    ["an A record with 5 bytes", hex(header("0000 0001 0000 0000") + "00 0001 0001 00000001 0005 0102030405"), /not 4/],
    ["a CNAME whose name runs past its data", hex(header("0000 0001 0000 0000") + "00 0005 0001 00000001 0002 0361 62 00"), /truncated|bytes after/],
    ["trailing bytes", Buffer.concat([handQuery, hex("00")]), /after the last record/],
    ["a label of 64 bytes", hex(header("0001 0000 0000 0000") + "40" + "61".repeat(64) + "00 0001 0001"), /label type 0x40/],
  ];
  for (const [what, bytes, pattern] of refusals) {
    it(`refuses ${what} with a DnsParseError`, () => {
      assert.throws(
        () => parseDnsMessage(bytes),
        (error: unknown) => error instanceof DnsParseError && pattern.test(error.message),
      );
    });
  }

  it("refuses a name longer than 255 bytes, also when built from pointers", () => {
    // Five 63-byte labels in place: 5*64+1 = 321 bytes.
    const long = hex(header("0001 0000 0000 0000") + ("3f" + "61".repeat(63)).repeat(5) + "00 0001 0001");
    assert.throws(() => parseDnsMessage(long), /longer than 255/);
    // Question 1: four 63-byte labels (257 > 255 with the root? 4*64+1 = 257): refused too.
    // Instead build 3 labels (193 bytes) then a second question that prepends two more via a pointer.
    const three = ("3f" + "61".repeat(63)).repeat(3) + "00";
    const chained = hex(header("0002 0000 0000 0000") + three + "0001 0001" + "3f" + "62".repeat(63) + "c00c 0001 0001");
    assert.throws(() => parseDnsMessage(chained), /longer than 255/);
  });

  it("bounds pointer hops on a long chain of backward pointers", () => {
    // 40 questions, each a pointer to the previous question's name: hops grow with each one.
    let body = "01 61 00 0001 0001";
    let previous = 12;
    for (let i = 1; i < 40; i++) {
      const at = 12 + body.replace(/ /g, "").length / 2;
      body += ` 01 61 c0${previous.toString(16).padStart(2, "0")} 0001 0001`;
      previous = at;
    }
    const bytes = hex(`abcd 0100 ${(40).toString(16).padStart(4, "0")} 0000 0000 0000 ` + body);
    assert.throws(() => parseDnsMessage(bytes), (error: unknown) => error instanceof DnsParseError);
  });

  it("never throws anything but a DnsParseError on random bytes or on mutated valid messages", () => {
    const valid = buildResponse(parseDnsMessage(handQuery), {
      rcode: 0,
      answers: [
        { name: "www.example.com", type: DnsType.CNAME, class: 1, ttl: 60, data: { kind: "cname", target: "edge.example.com" } },
        { name: "edge.example.com", type: DnsType.A, class: 1, ttl: 60, data: { kind: "a", address: "192.0.2.1" } },
      ],
    });
    const check = (bytes: Uint8Array) => {
      try {
        parseDnsMessage(bytes);
      } catch (error) {
        if (!(error instanceof DnsParseError)) throw error;
      }
    };
    fc.assert(fc.property(fc.uint8Array({ maxLength: 600 }), check), { numRuns: fuzzRuns(10) });
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 6 }), fc.nat(), (edits, cut) => {
        const bytes = Buffer.from(valid);
        for (const [at, value] of edits) bytes[at % bytes.length] = value;
        check(bytes);
        check(bytes.subarray(0, cut % (bytes.length + 1)));
      }),
      { numRuns: fuzzRuns(10) },
    );
  });
});

describe("DNS message encoding", () => {
  it("round-trips a response and compresses repeated names", () => {
    const message: DnsMessage = {
      header: { id: 7, qr: true, opcode: 0, aa: true, tc: false, rd: true, ra: true, ad: false, cd: false, rcode: 0 },
      questions: [{ name: "WWW.Example.com", type: DnsType.A, class: 1 }],
      answers: [
        { name: "www.example.com", type: DnsType.CNAME, class: 1, ttl: 30, data: { kind: "cname", target: "cdn.example.com" } },
        { name: "cdn.example.com", type: DnsType.A, class: 1, ttl: 30, data: { kind: "a", address: "198.51.100.4" } },
        { name: "cdn.example.com", type: DnsType.AAAA, class: 1, ttl: 30, data: { kind: "aaaa", address: "2001:db8:0:0:0:0:0:1" } },
        { name: "cdn.example.com", type: DnsType.TXT, class: 1, ttl: 30, data: { kind: "opaque", bytes: Buffer.from("\x02hi") } },
      ],
      authorities: [],
      additionals: [],
    };
    const bytes = encodeDnsMessage(message);
    const parsed = parseDnsMessage(bytes);
    assert.deepEqual(parsed.questions, message.questions);
    assert.deepEqual(parsed.answers[0], message.answers[0]);
    assert.deepEqual(parsed.answers[1], message.answers[1]);
    assert.deepEqual(parsed.answers[2]!.data, { kind: "aaaa", address: "2001:db8:0:0:0:0:0:1" });
    assert.deepEqual(parsed.answers[3]!.data, { kind: "opaque", bytes: Buffer.from("\x02hi") });
    // "example.com" appears 6 times, spelled out once: far shorter than uncompressed.
    assert.ok(bytes.length < 130, `${bytes.length} bytes: names were not compressed`);
  });

  it("builds REFUSED, NXDOMAIN and NODATA answers that echo the question and keep the id", () => {
    const request = parseDnsMessage(handQuery);
    for (const rcode of [DnsRcode.REFUSED, DnsRcode.NXDOMAIN, DnsRcode.NOERROR]) {
      const response = parseDnsMessage(buildResponse(request, { rcode }));
      assert.equal(response.header.id, 0x1234);
      assert.equal(response.header.qr, true);
      assert.equal(response.header.rcode, rcode);
      assert.equal(response.header.rd, true);
      assert.deepEqual(response.questions, request.questions);
      assert.deepEqual(response.answers, []);
    }
    assert.deepEqual(parseDnsHeader(buildResponse({ header: request.header, questions: [] }, { rcode: DnsRcode.FORMERR })).rcode, DnsRcode.FORMERR);
  });

  it("builds a query with an EDNS OPT record", () => {
    const query = parseDnsMessage(buildQuery({ id: 99, question: { name: "a.example", type: DnsType.A, class: 1 }, ednsUdpSize: 1232 }));
    assert.equal(query.header.id, 99);
    assert.equal(query.additionals[0]!.type, DnsType.OPT);
    assert.equal(query.additionals[0]!.class, 1232);
  });

  it("refuses names it cannot encode", () => {
    assert.throws(() => nameToLabels("a..b"), /empty label/);
    assert.throws(() => nameToLabels("x".repeat(64) + ".com"), /longer than 63/);
    assert.throws(() => nameToLabels(("a".repeat(63) + ".").repeat(4) + "com"), /longer than 255/);
    assert.throws(() => nameToLabels("bücher.example"), /punycode/);
    assert.deepEqual(nameToLabels("example.com.").map(String), ["example", "com"]);
    assert.deepEqual(nameToLabels(""), []);
  });
});
