/**
 * Test-only: a real registry on loopback (Debian's `docker-registry`, distribution 2.8) started
 * for a test and killed by PID after it, optionally behind token auth served by a small token
 * server (JWT RS256, key and self-signed certificate made with the `openssl` CLI), and a push
 * helper speaking the Distribution API (monolithic blob upload POST + PUT, manifest PUT).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { randomBytes, sign } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import type { Blob, TestImage } from "./test-image.js";

export interface TestRegistryOptions {
  /** Require token auth: the token server grants tokens to these credentials only. */
  auth?: { username: string; password: string };
}

export interface TestRegistry {
  /** `http://127.0.0.1:<port>` */
  url: string;
  /** `127.0.0.1:<port>`: the registry part of image references. */
  host: string;
  /** The registry's storage root (distribution's filesystem driver layout). */
  storageDir: string;
  /** Uploads an image's blobs and its manifest under `repository:tag`; returns the manifest digest. */
  push(repository: string, tag: string, image: TestImage): Promise<string>;
  pushBlob(repository: string, blob: Blob): Promise<void>;
  /** Puts a manifest or index under a tag or its digest. */
  pushManifest(repository: string, reference: string, manifest: Blob): Promise<void>;
  /** Where the registry keeps a blob's bytes (to corrupt it in a test). */
  blobPath(digest: string): string;
  /** Token requests the token server answered (granted or not). */
  tokenRequests(): number;
  stop(): Promise<void>;
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

function base64url(data: Buffer | string): string {
  return Buffer.from(data).toString("base64url");
}

interface TokenServer {
  url: string;
  requests: number;
  issue(scopes: string[]): string;
  close(): Promise<void>;
}

async function startTokenServer(dir: string, credentials: { username: string; password: string }, service: string, issuer: string): Promise<TokenServer> {
  const keyFile = path.join(dir, "token.key");
  const certFile = path.join(dir, "token.crt");
  const made = spawnSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", keyFile, "-out", certFile, "-days", "2", "-subj", "/CN=cbo-test-token-issuer"], { encoding: "utf8" });
  if (made.status !== 0) throw new Error(`openssl failed: ${made.stderr}`);
  const privateKey = fs.readFileSync(keyFile, "utf8");
  const certDer = Buffer.from(
    fs
      .readFileSync(certFile, "utf8")
      .replace(/-----(BEGIN|END) CERTIFICATE-----/g, "")
      .replace(/\s+/g, ""),
    "base64",
  );

  const issue = (scopes: string[]): string => {
    // Docker token auth spec: access entries from "repository:<name>:<actions>".
    const access = scopes.map((scope) => {
      const [type, ...rest] = scope.split(":");
      const actions = rest.pop() ?? "";
      return { type, name: rest.join(":"), actions: actions.split(",").filter(Boolean) };
    });
    const now = Math.floor(Date.now() / 1000);
    const header = { typ: "JWT", alg: "RS256", x5c: [certDer.toString("base64")] };
    const claims = { iss: issuer, sub: credentials.username, aud: service, exp: now + 300, nbf: now - 10, iat: now, jti: randomBytes(8).toString("hex"), access };
    const input = `${base64url(JSON.stringify(header))}.${base64url(JSON.stringify(claims))}`;
    return `${input}.${base64url(sign("sha256", Buffer.from(input), privateKey))}`;
  };

  const expected = `Basic ${Buffer.from(`${credentials.username}:${credentials.password}`).toString("base64")}`;
  const state = { requests: 0 };
  const server = http.createServer((req, res) => {
    state.requests += 1;
    const url = new URL(req.url ?? "/", "http://x");
    if (url.pathname !== "/token") {
      res.writeHead(404).end();
      return;
    }
    if (req.headers.authorization !== expected) {
      res.writeHead(401, { "content-type": "application/json" }).end('{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}');
      return;
    }
    const token = issue(url.searchParams.getAll("scope"));
    res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ token, access_token: token, expires_in: 300 }));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/token`,
    get requests() {
      return state.requests;
    },
    issue,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  child.kill("SIGTERM");
  const timedOut = await Promise.race([exited.then(() => false), sleep(3000).then(() => true)]);
  if (timedOut) {
    child.kill("SIGKILL");
    await exited;
  }
}

/** Starts `docker-registry` on a free loopback port with storage in a fresh temp dir. */
export async function startTestRegistry(options: TestRegistryOptions = {}): Promise<TestRegistry> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbo-registry-"));
  const storageDir = path.join(dir, "data");
  let tokenServer: TokenServer | undefined;
  let child: ChildProcess | undefined;
  try {
    const port = await freePort();
    const service = "cbo-test-registry";
    const issuer = "cbo-test-issuer";
    if (options.auth) tokenServer = await startTokenServer(dir, options.auth, service, issuer);
    const config = [
      "version: 0.1",
      "log:",
      "  level: error",
      "  accesslog:",
      "    disabled: true",
      "storage:",
      "  filesystem:",
      `    rootdirectory: ${storageDir}`,
      "  delete:",
      "    enabled: true",
      "http:",
      `  addr: 127.0.0.1:${port}`,
      `  secret: ${randomBytes(16).toString("hex")}`,
      ...(tokenServer
        ? ["auth:", "  token:", `    realm: ${tokenServer.url}`, `    service: ${service}`, `    issuer: ${issuer}`, `    rootcertbundle: ${path.join(dir, "token.crt")}`]
        : []),
    ].join("\n");
    const configFile = path.join(dir, "config.yml");
    fs.writeFileSync(configFile, config + "\n");
    const logFile = fs.openSync(path.join(dir, "registry.log"), "w");
    child = spawn("/usr/bin/docker-registry", ["serve", configFile], { stdio: ["ignore", logFile, logFile] });
    fs.closeSync(logFile);
    const url = `http://127.0.0.1:${port}`;
    const started = Date.now();
    for (;;) {
      if (child.exitCode !== null) throw new Error(`docker-registry exited: ${fs.readFileSync(path.join(dir, "registry.log"), "utf8").slice(-2000)}`);
      const status = await fetch(`${url}/v2/`).then(
        (res) => res.status,
        () => 0,
      );
      if (status === 200 || status === 401) break;
      if (Date.now() - started > 15_000) throw new Error("docker-registry did not start within 15 s");
      await sleep(50);
    }

    const pushToken = tokenServer ? (repository: string) => tokenServer!.issue([`repository:${repository}:pull,push`]) : undefined;
    const authHeaders = (repository: string): Record<string, string> => (pushToken ? { authorization: `Bearer ${pushToken(repository)}` } : {});

    const pushBlob = async (repository: string, blob: Blob): Promise<void> => {
      const start = await fetch(`${url}/v2/${repository}/blobs/uploads/`, { method: "POST", headers: authHeaders(repository) });
      if (start.status !== 202) throw new Error(`blob upload start: ${start.status} ${await start.text()}`);
      const location = new URL(start.headers.get("location")!, url);
      location.searchParams.set("digest", blob.digest);
      const put = await fetch(location, { method: "PUT", headers: { ...authHeaders(repository), "content-type": "application/octet-stream" }, body: new Uint8Array(blob.data) });
      if (put.status !== 201) throw new Error(`blob upload: ${put.status} ${await put.text()}`);
    };
    const pushManifest = async (repository: string, reference: string, manifest: Blob): Promise<void> => {
      const put = await fetch(`${url}/v2/${repository}/manifests/${reference}`, { method: "PUT", headers: { ...authHeaders(repository), "content-type": manifest.mediaType }, body: new Uint8Array(manifest.data) });
      if (put.status !== 201) throw new Error(`manifest put: ${put.status} ${await put.text()}`);
    };
    const spawned = child;
    return {
      url,
      host: `127.0.0.1:${port}`,
      storageDir,
      pushBlob,
      pushManifest,
      async push(repository, tag, image) {
        for (const b of image.blobs) await pushBlob(repository, b);
        await pushManifest(repository, tag, image.manifest);
        return image.manifest.digest;
      },
      blobPath: (digest) => {
        const hex = digest.slice("sha256:".length);
        return path.join(storageDir, "docker/registry/v2/blobs/sha256", hex.slice(0, 2), hex, "data");
      },
      tokenRequests: () => tokenServer?.requests ?? 0,
      async stop() {
        await stopChild(spawned);
        await tokenServer?.close();
        fs.rmSync(dir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    if (child) await stopChild(child);
    await tokenServer?.close();
    fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

/** A TCP server on loopback that accepts connections and never says a word: a hung registry. */
export async function startSilentServer(): Promise<{ host: string; stop(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on("error", () => {});
    socket.on("close", () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  return {
    host: `127.0.0.1:${port}`,
    stop: () =>
      new Promise((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}
