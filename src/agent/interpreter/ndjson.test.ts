import assert from "node:assert/strict";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { describe, it } from "node:test";
import { NdjsonStream, ndjsonLine } from "./ndjson.js";

describe("ndjsonLine", () => {
  it("writes one line per object even when strings hold newlines", () => {
    const line = ndjsonLine({ type: "stdout", text: "a\nb\r\n" });
    assert.equal(line.split("\n").length, 2);
    assert.ok(line.endsWith("\n"));
    assert.deepEqual(JSON.parse(line), { type: "stdout", text: "a\nb\r\n" });
  });
});

describe("NdjsonStream", () => {
  it("streams lines, keepalives while quiet, end_of_execution last, never a blank line", async () => {
    const server = http.createServer((_req, res) => {
      const stream = new NdjsonStream(res, { keepaliveIntervalMs: 20 });
      stream.write({ type: "stdout", text: "x\n" });
      setTimeout(() => {
        stream.write({ type: "result", text: "2" });
        stream.end();
      }, 70);
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    try {
      const res = await fetch(`http://127.0.0.1:${(server.address() as AddressInfo).port}/`);
      const body = await res.text();
      assert.ok(body.endsWith("\n"));
      const lines = body.slice(0, -1).split("\n");
      assert.ok(lines.every((line) => line.length > 0));
      const types = lines.map((line) => JSON.parse(line).type);
      assert.equal(types[0], "stdout");
      assert.ok(types.includes("keepalive"));
      assert.deepEqual(types.slice(-2), ["result", "end_of_execution"]);
    } finally {
      server.close();
    }
  });
});
