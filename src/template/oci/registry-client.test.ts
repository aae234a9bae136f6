import { after, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { parseImageReference } from "./reference.js";
import { isLoopbackHost, parseWwwAuthenticate, RegistryClient } from "./registry-client.js";
import { buildImage } from "./test-image.js";

const tempDirs: string[] = [];
after(() => tempDirs.forEach((dir) => fs.rmSync(dir, { recursive: true, force: true })));

/** A hand-written loopback "registry" for protocol edge cases docker-registry never produces. */
async function fakeRegistry(handler: http.RequestListener): Promise<{ host: string; requests: string[]; close(): Promise<void> }> {
  const requests: string[] = [];
  const server = http.createServer((req, res) => {
    requests.push(`${req.method} ${req.url} auth=${req.headers.authorization ? req.headers.authorization.split(" ")[0] : "none"}`);
    handler(req, res);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    host: `127.0.0.1:${(server.address() as AddressInfo).port}`,
    requests,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

function isCode(code: string, message: RegExp) {
  return (err: unknown) => {
    assert.ok(err instanceof CubicleError, String(err));
    assert.equal(err.code, code, err.message);
    assert.match(err.message, message);
    return true;
  };
}

test("parses WWW-Authenticate challenges", () => {
  assert.deepEqual(parseWwwAuthenticate('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull"'), {
    scheme: "bearer",
    params: { realm: "https://auth.docker.io/token", service: "registry.docker.io", scope: "repository:library/python:pull" },
  });
  assert.deepEqual(parseWwwAuthenticate('Basic realm="Registry \\"x\\""'), { scheme: "basic", params: { realm: 'Registry "x"' } });
  assert.deepEqual(parseWwwAuthenticate("Bearer realm=https://a/b, service=s"), { scheme: "bearer", params: { realm: "https://a/b", service: "s" } });
  assert.equal(parseWwwAuthenticate(""), undefined);
  assert.ok(isLoopbackHost("127.0.0.1:5000") && isLoopbackHost("localhost") && isLoopbackHost("[::1]:5000"));
  assert.ok(!isLoopbackHost("registry.example:5000") && !isLoopbackHost("10.0.0.1"));
});

test("Basic auth challenge: credentials sent on the retry; no credentials → unauthenticated", async () => {
  const expected = `Basic ${Buffer.from("u:p").toString("base64")}`;
  const registry = await fakeRegistry((req, res) => {
    if (req.headers.authorization !== expected) {
      res.writeHead(401, { "www-authenticate": 'Basic realm="test"' }).end();
      return;
    }
    res.writeHead(404, { "content-type": "application/json" }).end('{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}');
  });
  try {
    const ref = parseImageReference(`${registry.host}/a/b:1`);
    await assert.rejects(new RegistryClient().resolveImage(ref, { credentials: { username: "u", password: "p" } }), isCode("not_found", /MANIFEST_UNKNOWN: manifest unknown/));
    await assert.rejects(new RegistryClient().resolveImage(ref), isCode("unauthenticated", /needs credentials/));
    await assert.rejects(new RegistryClient({ auth: { [registry.host]: { username: "u", password: "bad" } } }).resolveImage(ref), isCode("unauthenticated", /refused the credentials/));
  } finally {
    await registry.close();
  }
});

test("a token realm over plain http to a non-loopback host is refused before any request", async () => {
  const registry = await fakeRegistry((_req, res) => {
    res.writeHead(401, { "www-authenticate": 'Bearer realm="http://auth.example/token",service="x"' }).end();
  });
  try {
    await assert.rejects(
      new RegistryClient().resolveImage(parseImageReference(`${registry.host}/a/b:1`), { credentials: { username: "u", password: "p" } }),
      isCode("failed_precondition", /not https/),
    );
  } finally {
    await registry.close();
  }
});

test("a blob that stalls mid-body is deadline_exceeded; a longer one is refused; a redirect elsewhere drops the credentials", async () => {
  const image = buildImage({ layers: [{ entries: [{ path: "a", data: randomBytes(100_000) }] }] });
  const layer = image.layers[0]!;
  let mode: "stall" | "long" | "redirect" = "stall";
  const storage = await fakeRegistry((_req, res) => {
    res.writeHead(200, { "content-length": String(layer.size) }).end(layer.data);
  });
  const registry = await fakeRegistry((req, res) => {
    if (mode === "redirect") {
      if (!req.headers.authorization) {
        res.writeHead(401, { "www-authenticate": 'Basic realm="x"' }).end();
        return;
      }
      res.writeHead(307, { location: `http://${storage.host}/signed/blob` }).end();
      return;
    }
    if (mode === "long") {
      res.writeHead(200).end(Buffer.concat([layer.data, Buffer.alloc(10)]));
      return;
    }
    res.writeHead(200, { "content-length": String(layer.size) });
    res.write(layer.data.subarray(0, 1000)); // and then nothing
  });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbo-client-"));
  tempDirs.push(dir);
  try {
    const endpoint = { host: registry.host, repository: "a/b", mirror: false };
    const client = new RegistryClient({ idleTimeoutMs: 300 });
    const file = path.join(dir, "blob");
    const started = Date.now();
    await assert.rejects(client.downloadBlob([endpoint], layer, file), isCode("deadline_exceeded", /did not answer within 300 ms/));
    assert.ok(Date.now() - started < 2000);
    mode = "long";
    await assert.rejects(client.downloadBlob([endpoint], layer, file), isCode("failed_precondition", /longer than/));
    assert.deepEqual(fs.readdirSync(dir), [], "partial files are removed");
    mode = "redirect";
    await client.downloadBlob([{ ...endpoint, credentials: { username: "u", password: "p" } }], layer, file);
    assert.deepEqual(fs.readFileSync(file), layer.data);
    assert.deepEqual(storage.requests, ["GET /signed/blob auth=none"]);
  } finally {
    await registry.close();
    await storage.close();
  }
});

test("an abort signal cancels a pull that waits on a silent registry", async () => {
  const registry = await fakeRegistry(() => {
    /* never answers */
  });
  try {
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 100);
    await assert.rejects(new RegistryClient({ idleTimeoutMs: 10_000 }).resolveImage(parseImageReference(`${registry.host}/a/b:1`), { signal: controller.signal }), isCode("canceled", /canceled/));
  } finally {
    await registry.close();
  }
});
