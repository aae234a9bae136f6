/**
 * Templates from OCI images through the official `e2b` SDK: a real registry on loopback (Debian's
 * `docker-registry`, started here, anonymous and with token auth), an image pushed by the test
 * (a static busybox userland, built here), `Template().fromImage(...)` built and run as a
 * sandbox; a rebuild that pulls and unpacks nothing; credentials good and bad; a missing image
 * and a corrupt layer as clear build errors; `./cubicle template import` of a `docker save` tar.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { BuildError, Sandbox, Template, type LogEntry } from "e2b";
import { buildImage, writeDockerSave, type TarSpecEntry, type TestImage } from "../../src/template/oci/test-image.js";
import { startTestRegistry, type TestRegistry } from "../../src/template/oci/test-registry.js";
import { signAwsV4 } from "../../src/template/oci/cloud-registries.js";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

const repoRoot = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..", "..");
const CREDENTIALS = { username: "builder", password: "pw-" + "Zx9".repeat(8) };
/** What fromAWSRegistry sends, and the ECR token a fake ECR (below) gives for it: the registry's password. */
const AWS_KEYS = { accessKeyId: "AKIAIOSFODNN7EXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPx" + "Rfi".repeat(3), region: "us-east-1" };
const ECR_PASSWORD = "ecr-token-" + "Qw7".repeat(10);
/** What fromGCPRegistry sends: a service account key, itself the registry's password for `_json_key`. */
const GCP_KEY = { type: "service_account", project_id: "p", client_email: "builder@p.iam.gserviceaccount.com", private_key: "-----BEGIN PRIVATE KEY-----\nnot-a-real-key-" + "Gk2".repeat(8) + "\n-----END PRIVATE KEY-----\n" };
let server: TestServer;
let open: TestRegistry;
let secured: TestRegistry;
let ecrRegistry: TestRegistry;
let gcpRegistry: TestRegistry;
let ecr: http.Server;
let workDir: string;

/** security.capability revision 2 (magic 0x02000001: effective), permitted bit 10 (CAP_NET_BIND_SERVICE). */
const NET_BIND_SERVICE_V2 = Buffer.from([1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);

const APPLETS = ["sh", "ash", "tar", "cp", "mv", "mkdir", "chown", "chmod", "find", "rm", "mktemp", "basename", "dirname", "cat", "echo", "id", "sleep", "ls", "env", "test", "[", "grep", "pgrep", "ps", "stat", "readlink", "true", "false", "touch", "wc", "head", "sed", "xargs"];

/** A small image: static busybox, its applets, a `bash` that is busybox's sh, /etc/passwd with root. */
function busyboxImage(marker: string): TestImage {
  const entries: TarSpecEntry[] = [
    { path: "bin", type: "directory", mode: 0o755 },
    { path: "bin/busybox", data: fs.readFileSync("/bin/busybox"), mode: 0o755 },
    { path: "bin/bash", data: "#!/bin/busybox sh\nexec /bin/busybox sh \"$@\"\n", mode: 0o755 },
    // A copy with a file capability (CAP_NET_BIND_SERVICE, effective) as images carry it: a PAX xattr, the host's revision 2 (LAYER_XATTRS_NOTE).
    { path: "opt/cap/grep", data: fs.readFileSync("/bin/busybox"), mode: 0o755, pax: { "SCHILY.xattr.security.capability": NET_BIND_SERVICE_V2 } },
    ...APPLETS.map((applet): TarSpecEntry => ({ path: `bin/${applet}`, type: "symlink", linkPath: "busybox" })),
    { path: "usr", type: "directory", mode: 0o755 },
    { path: "usr/bin", type: "directory", mode: 0o755 },
    { path: "usr/bin/env", type: "symlink", linkPath: "/bin/busybox" },
    { path: "etc", type: "directory", mode: 0o755 },
    { path: "etc/passwd", data: "root:x:0:0:root:/root:/bin/sh\n", mode: 0o644 },
    { path: "etc/group", data: "root:x:0:\n", mode: 0o644 },
    { path: "etc/marker", data: `${marker}\n`, mode: 0o644 },
    { path: "root", type: "directory", mode: 0o700 },
    { path: "tmp", type: "directory", mode: 0o1777 },
  ];
  return buildImage({ layers: [{ entries }], config: { Env: ["PATH=/usr/local/bin:/usr/bin:/bin", "FROM_IMAGE=yes"], Cmd: ["sh"] } });
}

before(async () => {
  workDir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-template-oci-"));
  open = await startTestRegistry();
  secured = await startTestRegistry({ auth: CREDENTIALS });
  ecrRegistry = await startTestRegistry({ auth: { username: "AWS", password: ECR_PASSWORD } });
  gcpRegistry = await startTestRegistry({ auth: { username: "_json_key", password: JSON.stringify(GCP_KEY) } });
  await open.push("tools/busybox", "1", busyboxImage("open"));
  await secured.push("private/busybox", "1", busyboxImage("private"));
  await ecrRegistry.push("app/busybox", "1", busyboxImage("from ecr"));
  await gcpRegistry.push("app/busybox", "1", busyboxImage("from gcp"));
  // ECR's GetAuthorizationToken on loopback: a token only for a request signed with AWS_KEYS.
  ecr = http.createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      const headers: Record<string, string> = {};
      for (const name of ["content-type", "host", "x-amz-date", "x-amz-target"]) headers[name] = String(req.headers[name] ?? "");
      const expected = signAwsV4({ method: req.method!, path: req.url!, query: "", headers, payloadHash: createHash("sha256").update(body).digest("hex") }, AWS_KEYS, { region: AWS_KEYS.region, service: "ecr", amzDate: headers["x-amz-date"]! });
      const ok = req.headers.authorization === expected && headers["x-amz-target"] === "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken";
      res.writeHead(ok ? 200 : 400, { "content-type": "application/x-amz-json-1.1" });
      res.end(ok ? JSON.stringify({ authorizationData: [{ authorizationToken: Buffer.from(`AWS:${ECR_PASSWORD}`).toString("base64") }] }) : JSON.stringify({ __type: "InvalidSignatureException", message: "The request signature we calculated does not match the signature you provided." }));
    });
  });
  await new Promise<void>((resolve) => ecr.listen(0, "127.0.0.1", resolve));
  server = await startTestServer({ extraEnv: { CUBICLE_LOG_LEVEL: "info", CUBICLE_ECR_ENDPOINT: `http://127.0.0.1:${(ecr.address() as AddressInfo).port}` } });
  useServerForSdk(server);
});

after(async () => {
  await server?.stop();
  await open?.stop();
  await secured?.stop();
  await ecrRegistry?.stop();
  await gcpRegistry?.stop();
  ecr?.close();
  if (workDir) fs.rmSync(workDir, { recursive: true, force: true });
});

async function build(template: Parameters<typeof Template.build>[0], name: string): Promise<string[]> {
  const logs: string[] = [];
  await Template.build(template, name, { onBuildLogs: (entry: LogEntry) => logs.push(entry.message) });
  return logs;
}

test("fromImage pulls from a registry; the sandbox runs the image with a RUN step on top; a rebuild pulls and unpacks nothing", async () => {
  const reference = `${open.host}/tools/busybox:1`;
  const logs = await build(Template().fromImage(reference).runCmd("echo built > /tmp/built"), "e2e-oci");
  assert.ok(logs.some((line) => line.startsWith(`pulled ${reference}`)), logs.join("\n"));
  const sandbox = await Sandbox.create("e2e-oci");
  try {
    const run = async (cmd: string) => (await sandbox.commands.run(cmd)).stdout.trim();
    assert.equal(await run("cat /etc/marker /tmp/built"), "open\nbuilt");
    assert.equal(await run("echo $FROM_IMAGE"), "yes", "the image's Env");
    assert.equal(await run("id -un"), "user", "no User in the image: E2B's user account");
    assert.equal(await run("pwd"), "/home/user");
    assert.equal(await run("stat -c %u /bin/busybox"), "0", "the image's root owns its files inside");
    // The image's file capability works for the sandbox's unprivileged user (and only for that file).
    assert.match(await run("/opt/cap/grep CapEff /proc/self/status"), /^CapEff:\s+0000000000000400$/);
    assert.match(await run("grep CapEff /proc/self/status"), /^CapEff:\s+0{16}$/);
  } finally {
    await sandbox.kill();
  }
  const again = await build(Template().fromImage(reference).runCmd("echo built > /tmp/built"), "e2e-oci");
  assert.ok(again.some((line) => line.includes("unpacked already")), again.join("\n"));
  assert.ok(again.some((line) => line.startsWith("CACHED")), again.join("\n"));
});

test("a private registry: the SDK's credentials pull; wrong ones fail the build without showing the password", async () => {
  const reference = `${secured.host}/private/busybox:1`;
  await build(Template().fromImage(reference, CREDENTIALS), "e2e-oci-private");
  const sandbox = await Sandbox.create("e2e-oci-private");
  try {
    assert.equal((await sandbox.commands.run("cat /etc/marker")).stdout, "private\n");
  } finally {
    await sandbox.kill();
  }
  await assert.rejects(build(Template().fromImage(reference, { username: "builder", password: "wrong-password-123" }), "e2e-oci-denied"), (err: Error) => {
    assert.ok(err instanceof BuildError, String(err));
    assert.match(err.message, /credential|unauthori|denied|authenticat/i);
    assert.doesNotMatch(err.message, /wrong-password-123/);
    return true;
  });
  assert.doesNotMatch(server.log(), new RegExp(CREDENTIALS.password));
  assert.doesNotMatch(server.log(), /wrong-password-123/);
  assert.equal(await Template.exists("e2e-oci-denied"), false);
});

test("fromAWSRegistry gets a registry token from ECR with the signed access key; fromGCPRegistry logs in with the service account key; wrong keys fail clearly and no secret reaches the log (CLOUD_REGISTRIES_NOTE)", async () => {
  await build(Template().fromAWSRegistry(`${ecrRegistry.host}/app/busybox:1`, AWS_KEYS), "e2e-oci-ecr");
  await build(Template().fromGCPRegistry(`${gcpRegistry.host}/app/busybox:1`, { serviceAccountJSON: GCP_KEY }), "e2e-oci-gcr");
  for (const [name, marker] of [["e2e-oci-ecr", "from ecr"], ["e2e-oci-gcr", "from gcp"]]) {
    const sandbox = await Sandbox.create(name!);
    try {
      assert.equal((await sandbox.commands.run("cat /etc/marker")).stdout, `${marker}\n`);
    } finally {
      await sandbox.kill();
    }
  }
  const wrongSecret = "wrong-secret-" + "Zq4".repeat(6);
  await assert.rejects(build(Template().fromAWSRegistry(`${ecrRegistry.host}/app/busybox:1`, { ...AWS_KEYS, secretAccessKey: wrongSecret }), "e2e-oci-ecr-denied"), (err: Error) => {
    assert.ok(err instanceof BuildError, String(err));
    assert.match(err.message, /ECR refused the AWS credentials.*signature/);
    assert.doesNotMatch(err.message, new RegExp(wrongSecret));
    return true;
  });
  await assert.rejects(build(Template().fromGCPRegistry(`${gcpRegistry.host}/app/busybox:1`, { serviceAccountJSON: { ...GCP_KEY, private_key: "other" } }), "e2e-oci-gcr-denied"), BuildError);
  for (const secret of [AWS_KEYS.secretAccessKey, wrongSecret, ECR_PASSWORD, "not-a-real-key-"]) assert.doesNotMatch(server.log(), new RegExp(secret.replaceAll("/", "\\/")));
  assert.equal(await Template.exists("e2e-oci-ecr-denied"), false);
  // Nor the store: build records keep no credentials.
  const stored = fs.readdirSync(server.stateDir).filter((file) => file.includes(".db")).map((file) => fs.readFileSync(path.join(server.stateDir, file)).toString("latin1")).join("");
  assert.ok(stored.length > 0);
  for (const secret of [AWS_KEYS.secretAccessKey, "not-a-real-key-", CREDENTIALS.password]) assert.ok(!stored.includes(secret), `the database holds ${secret.slice(0, 8)}…`);
});

test("a missing image and a corrupt layer are clear build errors; nothing is registered", async () => {
  await assert.rejects(build(Template().fromImage(`${open.host}/tools/nothing-here:1`), "e2e-oci-missing"), (err: Error) => {
    assert.ok(err instanceof BuildError);
    assert.match(err.message, /not found|unknown|404/i);
    return true;
  });
  const corrupt = busyboxImage("corrupt");
  await open.push("tools/corrupt", "1", corrupt);
  const layer = corrupt.layers[0]!;
  const stored = open.blobPath(layer.digest);
  const bytes = fs.readFileSync(stored);
  bytes[bytes.length - 10] ^= 0xff;
  fs.writeFileSync(stored, bytes);
  await assert.rejects(build(Template().fromImage(`${open.host}/tools/corrupt:1`), "e2e-oci-corrupt"), (err: Error) => {
    assert.ok(err instanceof BuildError);
    assert.match(err.message, /digest|sha256|corrupt|mismatch/i);
    return true;
  });
  assert.equal(await Template.exists("e2e-oci-missing"), false);
  assert.equal(await Template.exists("e2e-oci-corrupt"), false);
});

test("./cubicle template import of a docker save tarball makes a template sandboxes start from", async () => {
  const tarball = path.join(workDir, "image.tar");
  writeDockerSave(tarball, busyboxImage("imported"), ["local/busybox:imported"]);
  const result = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
    execFile(process.execPath, [path.join(repoRoot, "dist", "cli.js"), "template", "import", tarball, "--name", "e2e-imported"], { env: server.env }, (error, stdout, stderr) =>
      resolve({ code: error ? 1 : 0, stdout, stderr }),
    );
  });
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /imported/);
  // The running server notices the new template directory at its next look (about a second).
  let sandbox: Sandbox | undefined;
  for (let attempt = 0; !sandbox; attempt++) {
    sandbox = await Sandbox.create("e2e-imported").catch((err: Error) => {
      if (attempt >= 30 || !/not found/.test(err.message)) throw err;
      return new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), 200));
    });
  }
  try {
    assert.equal((await sandbox.commands.run("cat /etc/marker; echo $FROM_IMAGE")).stdout, "imported\nyes\n");
  } finally {
    await sandbox.kill();
  }
  const bad = await new Promise<{ code: number; stderr: string }>((resolve) => {
    execFile(process.execPath, [path.join(repoRoot, "dist", "cli.js"), "template", "import", path.join(workDir, "missing.tar"), "--name", "e2e-nothing"], { env: server.env }, (error, _stdout, stderr) =>
      resolve({ code: error ? 1 : 0, stderr }),
    );
  });
  assert.equal(bad.code, 1);
  assert.ok(bad.stderr.length > 0);
});
