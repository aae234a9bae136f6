import { Sandbox, type SandboxOpts } from "e2b";
import { startTestServer, useServerForSdk, type TestServer } from "../e2e/harness.js";
import { startFakeInternet, type FakeInternet, type FakeInternetOptions } from "./fake-internet.js";

/** A fake internet and a server whose sandboxes reach it: DNS through its resolver, its CA trusted upstream. */
export interface EgressTestEnv {
  inet: FakeInternet;
  server: TestServer;
  /** Sandbox.create through the SDK, killed by close(). */
  create(opts?: SandboxOpts): Promise<Sandbox>;
  /** Kills it in close() as well (a sandbox made another way). */
  track(sandbox: Sandbox): Sandbox;
  close(): Promise<void>;
}

export async function startEgressTestEnv(options: { fakeInternet?: FakeInternetOptions; extraEnv?: Record<string, string> } = {}): Promise<EgressTestEnv> {
  const inet = await startFakeInternet(options.fakeInternet);
  const sandboxes: Sandbox[] = [];
  let server: TestServer;
  try {
    server = await startTestServer({
      extraEnv: { CUBICLE_DNS_UPSTREAM: `${inet.dns.address}:${inet.dns.port}`, CUBICLE_EGRESS_CA_FILE: inet.caCertificateFile, ...options.extraEnv },
    });
  } catch (err) {
    await inet.close();
    throw err;
  }
  useServerForSdk(server);
  const track = (sandbox: Sandbox) => {
    sandboxes.push(sandbox);
    return sandbox;
  };
  return {
    inet,
    server,
    track,
    create: async (opts = {}) => track(await Sandbox.create({ ...opts, timeoutMs: 120_000 })),
    async close() {
      for (const sandbox of sandboxes) await sandbox.kill().catch(() => undefined);
      await server.stop();
      await inet.close();
    },
  };
}
