/**
 * HTTPS host routing against a real server and a real sandbox: `https://<port>-<id>.<domain>`
 * on the server's TLS listener, with the wildcard certificate from Cubicle's CA (the file
 * `./cubicle up` prints), trusted the way a client does (the CA file), the default domain's
 * names resolved to loopback by glibc (libnss-myhostname, installed by setup; no DNS). Also the
 * API behind TLS and a client that does not trust the CA.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import type { LookupFunction } from "node:net";
import path from "node:path";
import { after, before, test } from "node:test";
import { Agent, fetch as undiciFetch } from "undici";
import { Sandbox } from "e2b";
import { freePort, startTestServer, TEST_API_KEY, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;
let httpsPort: number;

const loopback: LookupFunction = (_hostname, options, callback) => {
  if ((options as { all?: boolean }).all) (callback as unknown as (e: null, a: { address: string; family: number }[]) => void)(null, [{ address: "127.0.0.1", family: 4 }]);
  else callback(null, "127.0.0.1", 4);
};

before(async () => {
  httpsPort = await freePort();
  // The default domain: setup installs libnss-myhostname, so glibc resolves *.localhost itself.
  server = await startTestServer({ extraEnv: { CUBICLE_HTTPS_PORT: String(httpsPort), CUBICLE_DOMAIN: "cubicle.localhost" } });
  useServerForSdk(server);
});

after(async () => {
  await server?.stop();
});

test("https://<port>-<sandboxId>.<domain> reaches the sandbox's port through the TLS listener", async () => {
  const caFile = path.join(server.stateDir, "ca", "ca.crt");
  const ca = fs.readFileSync(caFile, "utf8");
  const sandbox = await Sandbox.create({ timeoutMs: 120_000 });
  try {
    await sandbox.files.write("/tmp/site/index.html", "hello over https\n");
    await sandbox.commands.run("cd /tmp/site && /usr/bin/python3 -m http.server 8080 --bind 0.0.0.0", { background: true });
    const host = sandbox.getHost(8080);
    assert.equal(host, `8080-${sandbox.sandboxId}.cubicle.localhost`);
    // No lookup of our own: the name resolves to loopback on this host (libnss-myhostname).
    const trusted = new Agent({ connect: { ca } });
    let res: Awaited<ReturnType<typeof undiciFetch>> | undefined;
    for (let i = 0; i < 50; i++) {
      res = await undiciFetch(`https://${host}:${httpsPort}/index.html`, { dispatcher: trusted });
      if (res.status === 200) break;
      await res.text();
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.equal(res?.status, 200);
    assert.equal(await res!.text(), "hello over https\n");
    // The API answers on the same listener.
    const api = await undiciFetch(`https://api.cubicle.localhost:${httpsPort}/sandboxes/${sandbox.sandboxId}`, { dispatcher: trusted, headers: { "x-api-key": TEST_API_KEY } });
    assert.equal(api.status, 200);
    assert.equal((await api.json() as { sandboxID: string }).sandboxID, sandbox.sandboxId);
    // A client that does not trust Cubicle's CA refuses the certificate.
    const untrusted = new Agent({ connect: { lookup: loopback } });
    await assert.rejects(undiciFetch(`https://${host}:${httpsPort}/`, { dispatcher: untrusted }), (err: Error) => /certificate|self.signed|verify/i.test(String((err as { cause?: unknown }).cause ?? err)));
  } finally {
    await sandbox.kill();
  }
});
