import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { normalizeCaCertificates, parseInitBody } from "../protocol/index.js";
import { CUBICLE_CA_FILE, installCaCertificates, SYSTEM_BUNDLE } from "./ca-trust.js";
import { processEnvironment } from "./process/index.js";
import { applyInit, createAgentState, sandboxEnvironment } from "./state.js";

let dir: string;
let caPem: string;
let otherPem: string;

/** A self-signed CA certificate made by openssl, as the server's would be. */
function makeCa(name: string): string {
  const out = path.join(dir, `${name}.crt`);
  execFileSync("openssl", ["req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", path.join(dir, `${name}.key`), "-out", out, "-days", "1", "-subj", `/CN=${name}`, "-config", "/dev/null"], { stdio: "ignore" });
  return normalizeCaCertificates(fs.readFileSync(out, "utf8"));
}

/** A sandbox root with a Debian-like bundle holding one other certificate. */
function sandboxRoot(bundle: string | null = otherPem): string {
  const root = fs.mkdtempSync(path.join(dir, "root-"));
  if (bundle !== null) {
    fs.mkdirSync(path.join(root, path.dirname(SYSTEM_BUNDLE)), { recursive: true });
    fs.writeFileSync(path.join(root, SYSTEM_BUNDLE), bundle);
  }
  return root;
}

const count = (text: string, pem: string) => text.split(pem.split("\n")[1]!).length - 1;

before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbs-ca-trust-"));
  caPem = makeCa("cubicle");
  otherPem = makeCa("other");
});
after(() => fs.rmSync(dir, { recursive: true, force: true }));

describe("installing Cubicle's CA in a sandbox", () => {
  it("appends it to the system bundle once, keeps its own copy, and names both in the env", () => {
    const root = sandboxRoot(otherPem.trimEnd()); // a bundle without a final newline
    const first = installCaCertificates(caPem, root);
    assert.deepEqual(first, {
      systemBundle: true,
      env: { NODE_EXTRA_CA_CERTS: CUBICLE_CA_FILE, SSL_CERT_FILE: SYSTEM_BUNDLE, REQUESTS_CA_BUNDLE: SYSTEM_BUNDLE, CURL_CA_BUNDLE: SYSTEM_BUNDLE },
    });
    const bundle = fs.readFileSync(path.join(root, SYSTEM_BUNDLE), "utf8");
    assert.equal(count(bundle, caPem), 1);
    assert.equal(count(bundle, otherPem), 1, "the existing certificate is kept");
    assert.match(bundle, /-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----/, "blocks stay separated");
    assert.equal(fs.readFileSync(path.join(root, CUBICLE_CA_FILE), "utf8"), caPem);
    installCaCertificates(caPem, root);
    installCaCertificates(caPem, root);
    assert.equal(fs.readFileSync(path.join(root, SYSTEM_BUNDLE), "utf8"), bundle, "idempotent");
    // openssl accepts the resulting bundle as a CA file for a certificate the CA issued.
    assert.match(execFileSync("openssl", ["verify", "-CAfile", path.join(root, SYSTEM_BUNDLE), path.join(dir, "cubicle.crt")]).toString(), /OK/);
  });

  it("without a system bundle, only Node's additive variable is set", () => {
    const root = sandboxRoot(null);
    assert.deepEqual(installCaCertificates(caPem, root), { systemBundle: false, env: { NODE_EXTRA_CA_CERTS: CUBICLE_CA_FILE } });
    assert.equal(fs.existsSync(path.join(root, SYSTEM_BUNDLE)), false, "no bundle is invented");
  });

  it("does not follow a symlink planted at the bundle or at its own file", () => {
    const root = sandboxRoot(null);
    const target = path.join(dir, "host-file");
    fs.writeFileSync(target, "precious\n");
    fs.mkdirSync(path.join(root, path.dirname(SYSTEM_BUNDLE)), { recursive: true });
    fs.symlinkSync(target, path.join(root, SYSTEM_BUNDLE));
    assert.throws(() => installCaCertificates(caPem, root), /symlink/);
    assert.equal(fs.readFileSync(target, "utf8"), "precious\n");

    const root2 = sandboxRoot();
    fs.mkdirSync(path.join(root2, path.dirname(CUBICLE_CA_FILE)), { recursive: true });
    fs.symlinkSync(target, path.join(root2, CUBICLE_CA_FILE));
    installCaCertificates(caPem, root2);
    assert.equal(fs.readFileSync(target, "utf8"), "precious\n", "the symlink was replaced, not written through");
    assert.equal(fs.lstatSync(path.join(root2, CUBICLE_CA_FILE)).isFile(), true);
    assert.equal(fs.readFileSync(path.join(root2, CUBICLE_CA_FILE), "utf8"), caPem);
  });

  it("refuses a bundle that is a directory, and a block that is no certificate", () => {
    const root = sandboxRoot(null);
    fs.mkdirSync(path.join(root, SYSTEM_BUNDLE), { recursive: true });
    assert.throws(() => installCaCertificates(caPem, root), /not a regular file/);
    assert.throws(() => installCaCertificates("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", sandboxRoot()), /does not parse/);
  });
});

describe("/init with caCertificates", () => {
  it("the parser keeps only PEM certificate blocks, normalised, and refuses anything else", () => {
    assert.equal(parseInitBody({ caCertificates: caPem.replace(/\n/g, "\r\n") }).caCertificates, caPem);
    assert.equal(parseInitBody({}).caCertificates, undefined, "old servers send none");
    assert.equal(parseInitBody({ caCertificates: "" }).caCertificates, undefined);
    for (const bad of [
      "hello",
      caPem + "echo pwned\n",
      "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
      "-----BEGIN CERTIFICATE-----\nA$A\n-----END CERTIFICATE-----\n",
      "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n",
      caPem.repeat(17),
      "x".repeat(200_000),
      42,
    ]) {
      assert.throws(() => parseInitBody({ caCertificates: bad }), (e: Error & { code?: string }) => e.code === "invalid_argument", String(bad).slice(0, 40));
    }
  });

  it("installs the CA and gives processes the variables, under the sandbox's and the call's own", () => {
    const root = sandboxRoot();
    const state = createAgentState({});
    applyInit(state, parseInitBody({ caCertificates: caPem, envVars: { REQUESTS_CA_BUNDLE: "/mine.pem" } }), {}, root);
    assert.equal(count(fs.readFileSync(path.join(root, SYSTEM_BUNDLE), "utf8"), caPem), 1);
    const user = { name: "user", uid: 1000, gid: 1000, groups: [1000], home: "/home/user", shell: "/bin/bash" };
    const env = processEnvironment(user as never, sandboxEnvironment(state), { CURL_CA_BUNDLE: "/call.pem" });
    assert.equal(env.SSL_CERT_FILE, SYSTEM_BUNDLE);
    assert.equal(env.NODE_EXTRA_CA_CERTS, CUBICLE_CA_FILE);
    assert.equal(env.REQUESTS_CA_BUNDLE, "/mine.pem", "the sandbox's env vars win");
    assert.equal(env.CURL_CA_BUNDLE, "/call.pem", "the call's env wins");
    // A re-init without the field (a warm pool's claim) keeps the trust: the bundle still holds it.
    applyInit(state, parseInitBody({}), {}, root);
    assert.equal(sandboxEnvironment(state).SSL_CERT_FILE, SYSTEM_BUNDLE);
  });

  it("without caCertificates nothing is installed and no variable is set", () => {
    const state = createAgentState({});
    applyInit(state, parseInitBody({ envVars: { A: "1" } }), {}, sandboxRoot());
    assert.deepEqual(sandboxEnvironment(state), { A: "1" });
  });

  it("a failed install leaves the init working, without the variables", () => {
    const root = sandboxRoot(null);
    fs.mkdirSync(path.join(root, SYSTEM_BUNDLE), { recursive: true });
    const state = createAgentState({});
    applyInit(state, parseInitBody({ caCertificates: caPem, defaultUser: "user" }), {}, root);
    assert.equal(state.defaultUser, "user");
    assert.deepEqual(state.trustEnv, {});
  });
});
