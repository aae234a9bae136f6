import assert from "node:assert/strict";
import { test } from "node:test";
import { hostWithoutPort, looksLikeHttp, MAX_HTTP_HEAD_BYTES, parseHttpHead } from "./http-head.js";

const request = "GET /path?q=1 HTTP/1.1\r\nUser-Agent: t\r\nHost: API.example.com:8080\r\nAccept: */*\r\n\r\n";

test("reads the request line and the Host name", () => {
  assert.deepEqual(parseHttpHead(Buffer.from(request)), { state: "complete", method: "GET", target: "/path?q=1", host: "api.example.com" });
});

test("every prefix is incomplete, then complete; a body after the head does not matter", () => {
  for (let length = 0; length < request.length; length++) assert.equal(parseHttpHead(Buffer.from(request.slice(0, length))).state, "incomplete");
  assert.equal(parseHttpHead(Buffer.from(request + "body bytes")).state, "complete");
});

test("bare LF line ends, a request line alone, no Host, two Hosts", () => {
  assert.equal((parseHttpHead(Buffer.from("GET / HTTP/1.0\nHost: a.b.\n\n")) as { host?: string }).host, "a.b");
  assert.deepEqual(parseHttpHead(Buffer.from("GET / HTTP/1.0\r\n\r\n")), { state: "complete", method: "GET", target: "/", host: undefined });
  assert.equal((parseHttpHead(Buffer.from("GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n")) as { host?: string }).host, undefined);
});

test("garbage and oversize heads are invalid", () => {
  assert.deepEqual(parseHttpHead(Buffer.from("GET /\r\n\r\n")), { state: "invalid" });
  assert.deepEqual(parseHttpHead(Buffer.from("FOO / HTTP/1.1\r\n\r\n")), { state: "invalid" });
  assert.deepEqual(parseHttpHead(Buffer.from("GET / HTTP/2.0\r\n\r\n")), { state: "invalid" });
  const huge = Buffer.from("GET / HTTP/1.1\r\nX: " + "a".repeat(MAX_HTTP_HEAD_BYTES) + "\r\n\r\n");
  assert.deepEqual(parseHttpHead(huge), { state: "invalid" });
  for (let i = 0; i < 500; i++) {
    const bytes = Buffer.from(request);
    for (let j = 0; j < 5; j++) bytes[Math.floor(Math.random() * bytes.length)] = Math.floor(Math.random() * 256);
    const result = parseHttpHead(bytes);
    if (result.state === "complete" && result.host !== undefined) assert.match(result.host, /^[a-z0-9_.-]+$/);
  }
});

test("method sniffing and Host values", () => {
  assert.equal(looksLikeHttp(Buffer.from("GE")), true);
  assert.equal(looksLikeHttp(Buffer.from("POST ")), true);
  assert.equal(looksLikeHttp(Buffer.from("SSH-2.0")), false);
  assert.equal(looksLikeHttp(Buffer.from([0x16, 0x03])), false);
  assert.equal(hostWithoutPort("[::1]:80"), undefined);
  assert.equal(hostWithoutPort("10.0.0.1:80"), undefined);
  assert.equal(hostWithoutPort("a.com:99999999"), undefined);
  assert.equal(hostWithoutPort(" Example.org "), "example.org");
});
