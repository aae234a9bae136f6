import assert from "node:assert/strict";
import { X509Certificate } from "node:crypto";
import fs from "node:fs";
import type { AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import tls from "node:tls";
import { runCommand } from "../../shared/exec.js";
import { normalizeCertificateHostname, openCertificateAuthority, type CertificateAuthority } from "./certificate-authority.js";

let dir: string;
let ca: CertificateAuthority;
const spawned: string[][] = [];

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbs-ca-test-"));
  ca = await openCertificateAuthority(path.join(dir, "ca"), {
    maxCachedCertificates: 3,
    run: (argv, options) => {
      spawned.push([...argv]);
      return runCommand(argv, options);
    },
  });
});

after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Serves `issued` on loopback and connects with only the CA trusted; resolves what the client saw. */
async function handshake(issued: { key: string; cert: string }, servername: string, trusted = ca.certificatePem): Promise<{ authorized: boolean; error?: string; echoed?: string }> {
  const server = tls.createServer({ key: issued.key, cert: issued.cert }, (socket) => {
    socket.on("error", () => undefined);
    socket.end("hello over tls");
  });
  server.on("tlsClientError", () => undefined);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  try {
    return await new Promise((resolve) => {
      const socket = tls.connect({ host: "127.0.0.1", port, servername, ca: trusted });
      let echoed = "";
      const timer = setTimeout(() => socket.destroy(new Error("timed out")), 5000);
      socket.on("data", (d) => (echoed += d));
      socket.on("end", () => {
        clearTimeout(timer);
        resolve({ authorized: socket.authorized, echoed });
      });
      socket.on("error", (err) => {
        clearTimeout(timer);
        resolve({ authorized: false, error: (err as NodeJS.ErrnoException).code ?? err.message });
      });
    });
  } finally {
    server.close();
  }
}

test("the CA is an EC P-256 CA certificate kept in 0600/0700 files", () => {
  const caDir = path.join(dir, "ca");
  assert.equal(fs.statSync(caDir).mode & 0o777, 0o700);
  assert.equal(fs.statSync(path.join(caDir, "ca.key")).mode & 0o777, 0o600);
  assert.equal(fs.statSync(path.join(caDir, "leaf.key")).mode & 0o777, 0o600);
  assert.equal(ca.certPath, path.join(caDir, "ca.crt"));
  const cert = new X509Certificate(ca.certificatePem);
  assert.ok(cert.ca);
  assert.match(cert.subject, /^CN=Cubicle local CA [0-9a-f]{8}$/);
  assert.equal(cert.publicKey.asymmetricKeyDetails?.namedCurve, "prime256v1");
  const years = (Date.parse(cert.validTo) - Date.now()) / (365 * 24 * 3600 * 1000);
  assert.ok(years > 9 && years < 11, `valid for about 10 years, not ${years}`);
});

test("a leaf for a name verifies against the CA in a real TLS handshake, and not against another CA", async () => {
  const issued = await ca.issue(["api.example.com"]);
  const leaf = new X509Certificate(issued.cert);
  assert.equal(leaf.ca, false);
  assert.equal(leaf.subjectAltName, "DNS:api.example.com");
  assert.ok(leaf.checkIssued(new X509Certificate(ca.certificatePem)));
  assert.deepEqual(await handshake(issued, "api.example.com"), { authorized: true, echoed: "hello over tls" });
  const wrongName = await handshake(issued, "other.example.com");
  assert.equal(wrongName.authorized, false);
  assert.equal(wrongName.error, "ERR_TLS_CERT_ALTNAME_INVALID");
  const otherDir = fs.mkdtempSync(path.join(dir, "other-"));
  const other = await openCertificateAuthority(otherDir);
  assert.notEqual(other.certificatePem, ca.certificatePem);
  const untrusted = await handshake(issued, "api.example.com", other.certificatePem);
  assert.equal(untrusted.authorized, false);
  assert.match(untrusted.error ?? "", /UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED|UNABLE_TO_GET_ISSUER/);
});

test("a wildcard leaf serves every sandbox host of a domain and the domain itself", async () => {
  const issued = await ca.issue(["*.cubicle.localhost", "cubicle.localhost"]);
  for (const name of ["8080-iabc.cubicle.localhost", "49983-ixyz.cubicle.localhost", "cubicle.localhost"]) {
    assert.equal((await handshake(issued, name)).authorized, true, name);
  }
  // RFC 6125 §6.4.3: a wildcard covers one label only.
  assert.equal((await handshake(issued, "a.b.cubicle.localhost")).authorized, false);
});

test("a cached leaf spawns nothing; concurrent issues share one signing; the cache is bounded; leaves are backdated an hour (LEAF_BACKDATE_NOTE)", async () => {
  // A signing is two openssl runs: the request, then `openssl ca` with its start date.
  const perLeaf = 2;
  const before = spawned.length;
  const [a, b, c] = await Promise.all([ca.issue(["x.example.org", "y.example.org"]), ca.issue(["Y.example.org", "x.example.org"]), ca.issue(["x.example.org", "y.example.org."])]);
  assert.equal(spawned.length, before + perLeaf, "one signing for three concurrent issues of the same names");
  assert.equal(a, b);
  assert.equal(a, c);
  assert.equal(await ca.issue(["y.example.org", "x.example.org"]), a);
  assert.equal(spawned.length, before + perLeaf, "a cache hit spawns nothing");
  // Capacity 3: three more names push x/y out.
  for (const name of ["one.test.org", "two.test.org", "three.test.org"]) await ca.issue([name]);
  assert.equal(spawned.length, before + 4 * perLeaf);
  await ca.issue(["x.example.org", "y.example.org"]);
  assert.equal(spawned.length, before + 5 * perLeaf, "the least recently used entry was evicted");
  // Every leaf carries the same key.
  assert.equal((await ca.issue(["one.test.org"])).key, a.key);
  // Valid from an hour ago: a guest whose clock lags a little still accepts it.
  const leaf = new X509Certificate(a.cert);
  const from = Date.parse(leaf.validFrom);
  assert.ok(from <= Date.now() - 59 * 60 * 1000 && from >= Date.now() - 62 * 60 * 1000, leaf.validFrom);
  assert.ok(Date.parse(leaf.validTo) > Date.now() + 89 * 24 * 3600 * 1000, leaf.validTo);
  assert.equal(fs.readdirSync(path.dirname(ca.certPath)).filter((name) => name.startsWith("signing-")).length, 0, "no signing directory is left");
});

test("bad host names are refused before openssl runs", async () => {
  const before = spawned.length;
  const bad = [
    "",
    ".",
    "a..b",
    "-a.com",
    "a-.com",
    "a_b.com",
    "a b.com",
    "a.com/CN=evil",
    "a.com,DNS:evil.com",
    "a.com\nDNS:evil.com",
    "*",
    "*.com",
    "a.*.com",
    "*a.example.com",
    "**.example.com",
    "1.2.3.4",
    "é.example.com",
    "x".repeat(64) + ".com",
    (("a".repeat(63) + ".").repeat(4) + "com").slice(0),
    "-subj",
  ];
  for (const name of bad) {
    await assert.rejects(ca.issue([name]), (e: Error & { code?: string }) => e.code === "invalid_argument", JSON.stringify(name));
  }
  await assert.rejects(ca.issue([]), (e: Error & { code?: string }) => e.code === "invalid_argument");
  await assert.rejects(ca.issue([42 as unknown as string]), (e: Error & { code?: string }) => e.code === "invalid_argument");
  await assert.rejects(ca.issue(Array.from({ length: 101 }, (_, i) => `h${i}.example.com`)), (e: Error & { code?: string }) => e.code === "invalid_argument");
  assert.equal(spawned.length, before, "nothing was spawned for a bad name");
  assert.equal(normalizeCertificateHostname("API.Example.COM."), "api.example.com");
  assert.equal(normalizeCertificateHostname("*.Example.com"), "*.example.com");
});

test("reopening the directory keeps the CA and the leaf key, and makes nothing", async () => {
  const counted: string[][] = [];
  const again = await openCertificateAuthority(path.join(dir, "ca"), { run: (argv, o) => (counted.push([...argv]), runCommand(argv, o)) });
  assert.equal(again.certificatePem, ca.certificatePem);
  assert.deepEqual(counted, []);
  const issued = await again.issue(["api.example.com"]);
  assert.equal(issued.key, (await ca.issue(["api.example.com"])).key);
  assert.equal((await handshake(issued, "api.example.com")).authorized, true);
});

test("a CA whose key does not match its certificate is refused with what to do", async () => {
  const broken = fs.mkdtempSync(path.join(dir, "broken-"));
  const first = await openCertificateAuthority(path.join(broken, "a"));
  const second = await openCertificateAuthority(path.join(broken, "b"));
  assert.ok(first && second);
  fs.copyFileSync(path.join(broken, "b", "ca.key"), path.join(broken, "a", "ca.key"));
  await assert.rejects(openCertificateAuthority(path.join(broken, "a")), /remove ca\.key and ca\.crt/);
});
