/**
 * The network benchmark end to end (bench/network.sh runs it after a build): starts the fake
 * internet (test/support/fake-internet.ts) and a dedicated Cubicle server from dist/ with its
 * own state dir, port, subnet and nftables table (test/e2e/harness.ts; HTTPS listener off, a
 * warm pool of one base sandbox, the fake DNS as upstream, the fake CA trusted by the egress
 * proxy), runs `bench network` against them, writes the JSON under bench/results/network/ and
 * removes everything — server (by PID, through the harness), sandboxes, namespaces, veths,
 * tables, state dir — also when a step fails or the run is interrupted.
 *
 *   node --import tsx scripts/bench-network.ts [bench network options…]
 */
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseBenchArgs, runBench, type BenchResultFile } from "../src/bench/index.js";
import { startFakeInternet, type FakeInternet } from "../test/support/fake-internet.js";
import { startTestServer, type TestServer } from "../test/e2e/harness.js";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");

let inet: FakeInternet | undefined;
let server: TestServer | undefined;
let cleaning: Promise<void> | undefined;

function cleanUp(): Promise<void> {
  cleaning ??= (async () => {
    try {
      await server?.stop();
    } catch (err) {
      process.stderr.write(`bench-network: stopping the server: ${String(err)}\n`);
    }
    await inet?.close().catch((err: unknown) => process.stderr.write(`bench-network: closing the fake internet: ${String(err)}\n`));
  })();
  return cleaning;
}

// An interrupted run cleans up too (the fake internet and the floor also clean up at exit).
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.once(signal, () => {
    process.stderr.write(`bench-network: ${signal}, cleaning up\n`);
    void cleanUp().finally(() => process.exit(130));
  });
}

async function main(): Promise<number> {
  const options = parseBenchArgs(["network", "-o", path.join(repoRoot, "bench", "results", "network"), ...process.argv.slice(2)]);
  inet = await startFakeInternet();
  if (!inet.socks) throw new Error("the fake internet has no SOCKS5 service (test/support/socks5-server.ts is missing)");
  for (const address of [inet.http.address, inet.https.address, inet.socks.address, inet.dns.address]) await inet.assertRouted(address);
  server = await startTestServer({
    extraEnv: {
      CUBICLE_DNS_UPSTREAM: `${inet.dns.address}:${inet.dns.port}`,
      CUBICLE_EGRESS_CA_FILE: inet.caCertificateFile,
      CUBICLE_POOL_SIZE: `${options.template}=1`,
      CUBICLE_LOG_LEVEL: process.env.CUBICLE_LOG_LEVEL ?? "warn",
    },
  });
  Object.assign(process.env, {
    CUBICLE_BENCH_NET_HTTP: `${inet.http.name}=${inet.http.address}`,
    CUBICLE_BENCH_NET_HTTPS: `${inet.https.name}=${inet.https.address}`,
    CUBICLE_BENCH_NET_SOCKS: `${inet.socks.address}:${inet.socks.port}`,
    CUBICLE_BENCH_NET_INTERFACE: inet.hostInterface,
    CUBICLE_BENCH_NET_CA_FILE: inet.caCertificateFile,
  });
  const file = await runBench(options, {
    apiUrl: server.url,
    apiKey: server.apiKey,
    stateDir: server.stateDir,
    runDir: server.runDir,
    templateDir: server.env.CUBICLE_TEMPLATE_DIR!,
    runcPath: "runc",
    domain: "cubicle.test",
  });
  const result = JSON.parse(fs.readFileSync(file, "utf8")) as BenchResultFile;
  process.stdout.write(`${JSON.stringify(result.summary, null, 2)}\n`);
  if (result.errors.length) process.stdout.write(`${result.errors.length} errors, first: ${result.errors[0]}\n`);
  process.stdout.write(`network: ${result.status}${result.reason ? `: ${result.reason}` : ""}\nresult: ${file}\n`);
  return result.status === "ok" ? 0 : 1;
}

let code = 1;
try {
  code = await main();
} catch (err) {
  process.stderr.write(`bench-network: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  if (server) process.stderr.write(`server log (tail):\n${server.log().slice(-4000)}\n`);
} finally {
  await cleanUp();
}
process.exit(code);
