import path from "node:path";
import { loadConfig, type CubicleConfig } from "../shared/config.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { runBenchCommand } from "../bench/index.js";
import { createContainerRuntime } from "../runtime/index.js";
import type { apiSchema } from "../protocol/index.js";
import { ApiClient } from "./api-client.js";
import { formatEgressTable } from "./egress-table.js";
import { loadOrCreateApiKey, startServer } from "./server.js";
import { SqliteStore, storeFile } from "../store/index.js";
import { adoptLegacyRecords } from "../template/index.js";
import { createTemplateCatalog } from "./template-catalog.js";
import { buildFromDockerfile, parseBuildArgs, printBuildLogs, TemplateBuildStatus } from "./template-commands.js";
import { importTemplate } from "./image-bases-config.js";

const usage = `Usage: ./cubicle <command>

  up                         set up the host, build, prepare templates and serve (foreground)
  test                       set up, then run the whole test suite
  serve                      serve without the setup step
  sandbox ls                 list sandboxes
  sandbox kill ID            kill a sandbox
  sandbox exec ID -- CMD...  run a command in a sandbox (as root; --user NAME to change)
  sandbox egress ID [--limit N] [--json]
                             what a sandbox tried to reach, newest first (default 100 records)
  template ls                list templates (built-in and built)
  template ensure NAME       build a built-in template unless it is cached: base, code-interpreter-v1
  template build NAME        rebuild a built-in template
  template build -f Dockerfile --name NAME [--context DIR] [--cpu N] [--memory MB] [--skip-cache]
                             build a template from a Dockerfile on the running server, with
                             live progress (plain lines when not on a terminal or under CI)
  template import SOURCE --name NAME [--image REF]
                             a \`docker save\` tarball or an OCI layout directory as template NAME
  template logs NAME [BUILD] a build's log (the latest by default)
  template rm NAME           delete a built template (refused while a sandbox uses it)
  unmount                    after the server stopped and its sandboxes are gone: unmount its
                             storage pool and kit (the next start mounts them again)
  bench SCENARIO|report [options]
                             measure a running server: create, density, exec, files, runcode,
                             snapshot, restore, rollback, fork, pause-resume, baseline; see bench/README.md

Configuration comes from the environment: CUBICLE_HOST (127.0.0.1), CUBICLE_PORT (3000),
CUBICLE_HTTPS_PORT (443 as root; off), CUBICLE_TLS_CERT/CUBICLE_TLS_KEY,
CUBICLE_STATE_DIR (/var/lib/cubicle), CUBICLE_DOMAIN, CUBICLE_API_KEY, CUBICLE_SUBNET.`;

function clientFor(config: CubicleConfig): ApiClient {
  const host = config.host === "0.0.0.0" ? "127.0.0.1" : config.host;
  return new ApiClient(`http://${host}:${config.port}`, loadOrCreateApiKey(config));
}

async function serve(config: CubicleConfig): Promise<void> {
  // A terminal (not CI) sees the default templates' first build as a live status line.
  const status = process.stdout.isTTY === true && !process.env.CI ? new TemplateBuildStatus() : undefined;
  const server = await startServer(config, { onTemplateProgress: status && ((templateId, message) => status.update(templateId, message)) }).catch((err) => {
    status?.stop();
    throw err;
  });
  void server.ready.finally(() => status?.stop()).catch(() => undefined);
  const shutdown = async (signal: string) => {
    process.stderr.write(`\n${signal}: stopping; running sandboxes stay up and are adopted on the next start\n`);
    await server.close();
    process.exit(0);
  };
  process.once("SIGINT", () => void shutdown("SIGINT"));
  process.once("SIGTERM", () => void shutdown("SIGTERM"));
  await server.ready.catch(() => undefined);
  const publicUrl = server.url.replace("0.0.0.0", "127.0.0.1");
  const lines = [
    "",
    "Cubicle is ready. Point the E2B SDK at it:",
    "",
    `export E2B_API_URL=${publicUrl}`,
    `export E2B_SANDBOX_URL=${publicUrl}`,
    `export E2B_API_KEY=${server.apiKey}`,
    `export E2B_DOMAIN=${config.domain}`,
    // Volume's content API (the SDK does not derive it from E2B_API_URL).
    `export E2B_VOLUME_API_URL=${publicUrl}`,
    "",
    `Cubicle's CA: ${server.ca.certPath}`,
    "Trust it in clients of the HTTPS port (and of intercepted egress):",
    "",
    `export NODE_EXTRA_CA_CERTS=${server.ca.certPath} SSL_CERT_FILE=${server.ca.certPath}`,
    "",
  ];
  if (server.httpsUrl) {
    const httpsPort = Number(new URL(server.httpsUrl).port || 443);
    const portSuffix = httpsPort === 443 ? "" : `:${httpsPort}`;
    const address = new URL(server.httpsUrl).hostname.replace("0.0.0.0", "127.0.0.1");
    lines.push(
      `Sandbox ports over HTTPS: https://<port>-<sandboxId>.${config.domain}${portSuffix}/`,
      `(the name must resolve to this host; without DNS: curl --cacert ${server.ca.certPath} --connect-to ::${address}:${httpsPort} https://8080-<sandboxId>.${config.domain}${portSuffix}/)`,
      "",
    );
  }
  process.stdout.write(lines.join("\n") + "\n");
}

async function sandboxCommand(config: CubicleConfig, args: string[]): Promise<number> {
  const client = clientFor(config);
  const [verb, ...rest] = args;
  if (verb === "ls" || verb === "list") {
    const { json } = await client.request("GET", "/v2/sandboxes?state=running,paused");
    const rows = json as { sandboxID: string; templateID: string; state: string; startedAt: string; endAt: string }[];
    process.stdout.write(["SANDBOX ID".padEnd(24) + "TEMPLATE".padEnd(22) + "STATE".padEnd(9) + "STARTED".padEnd(26) + "ENDS"]
      .concat(rows.map((r) => r.sandboxID.padEnd(24) + r.templateID.padEnd(22) + r.state.padEnd(9) + r.startedAt.padEnd(26) + r.endAt))
      .join("\n") + "\n");
    return 0;
  }
  if (verb === "kill") {
    if (!rest[0]) throw new CubicleError("invalid_argument", "usage: ./cubicle sandbox kill ID");
    await client.request("DELETE", `/sandboxes/${encodeURIComponent(rest[0])}`);
    process.stdout.write(`killed ${rest[0]}\n`);
    return 0;
  }
  if (verb === "exec") {
    const id = rest[0];
    const dashes = rest.indexOf("--");
    let user = "root";
    const userFlag = rest.indexOf("--user");
    if (userFlag !== -1 && (dashes === -1 || userFlag < dashes)) user = rest[userFlag + 1] ?? "root";
    const argv = dashes === -1 ? rest.slice(1) : rest.slice(dashes + 1);
    if (!id || argv.length === 0) throw new CubicleError("invalid_argument", "usage: ./cubicle sandbox exec ID [--user NAME] -- CMD [ARGS...]");
    const { json } = await client.request("GET", `/sandboxes/${encodeURIComponent(id)}`);
    return client.exec(id, (json as { envdAccessToken?: string }).envdAccessToken, argv, user);
  }
  if (verb === "egress") return egressCommand(client, rest);
  throw new CubicleError("invalid_argument", `unknown sandbox command "${verb ?? ""}"\n\n${usage}`);
}

/** `sandbox egress ID [--limit N] [--json]`: the newest N records, fetched a page (≤ 1000) at a time. */
async function egressCommand(client: ApiClient, args: string[]): Promise<number> {
  const usageLine = "usage: ./cubicle sandbox egress ID [--limit N] [--json]";
  let id: string | undefined;
  let limit = 100;
  let json = false;
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === "--json") json = true;
    else if (arg === "--limit") {
      const raw = args[++i] ?? "";
      if (!/^\d{1,7}$/.test(raw) || Number(raw) < 1) throw new CubicleError("invalid_argument", `--limit takes a whole number of records, at least 1\n${usageLine}`);
      limit = Number(raw);
    } else if (!id && !arg.startsWith("-")) id = arg;
    else throw new CubicleError("invalid_argument", `unexpected argument "${arg}"\n${usageLine}`);
  }
  if (!id) throw new CubicleError("invalid_argument", usageLine);
  const records: apiSchema.EgressRecord[] = [];
  let nextToken: string | undefined;
  do {
    const pageSize = Math.min(1000, limit - records.length);
    const query = `limit=${pageSize}${nextToken ? `&nextToken=${encodeURIComponent(nextToken)}` : ""}`;
    const { json: page, headers } = await client.request("GET", `/sandboxes/${encodeURIComponent(id)}/network/egress?${query}`);
    records.push(...(page as apiSchema.EgressRecord[]));
    nextToken = headers.get("x-next-token") ?? undefined;
  } while (nextToken && records.length < limit);
  process.stdout.write(json ? JSON.stringify(records, null, 2) + "\n" : records.length ? formatEgressTable(records) : `no egress recorded for ${id}\n`);
  return 0;
}

/** The template commands that read or write template records open the store beside the server (WAL allows both). */
async function templateCommand(config: CubicleConfig, args: string[]): Promise<number> {
  const store = new SqliteStore(storeFile(config.stateDir));
  try {
    await adoptLegacyRecords(config.builtTemplateDir, store);
    return await templateVerb(config, store, args);
  } finally {
    await store.close();
  }
}

async function templateVerb(config: CubicleConfig, store: SqliteStore, args: string[]): Promise<number> {
  const catalog = createTemplateCatalog(config, store);
  const [verb, name] = args;
  if (verb === "ls" || verb === "list") {
    for (const t of await catalog.list()) process.stdout.write(`${t.templateID.padEnd(24)}${t.aliases.join(",").padEnd(24)}${t.buildStatus}\n`);
    return 0;
  }
  if (verb === "build" && args.slice(1).some((arg) => arg === "-f" || arg === "--file")) {
    const parsed = parseBuildArgs(args.slice(1));
    const host = config.host === "0.0.0.0" ? "127.0.0.1" : config.host;
    return buildFromDockerfile({ ...parsed, apiUrl: `http://${host}:${config.port}`, apiKey: loadOrCreateApiKey(config), live: process.stdout.isTTY === true && !process.env.CI });
  }
  if (verb === "logs" && name) return printBuildLogs(clientFor(config), name, args[2]);
  if (verb === "import" && name) {
    const flags = args.slice(2);
    const flag = (names: string[]) => {
      const at = flags.findIndex((arg) => names.includes(arg));
      return at >= 0 ? flags[at + 1] : undefined;
    };
    const templateName = flag(["--name", "-n"]);
    if (!templateName) throw new CubicleError("invalid_argument", "usage: ./cubicle template import SOURCE --name NAME [--image REF]");
    const templateId = await importTemplate(config, store, name, templateName, flag(["--image"]));
    process.stdout.write(`imported ${name} as template ${templateName} (${templateId}): Sandbox.create("${templateName}")\n`);
    return 0;
  }
  if ((verb === "rm" || verb === "delete") && name) {
    await clientFor(config).request("DELETE", `/templates/${encodeURIComponent(name)}`);
    process.stdout.write(`deleted ${name}\n`);
    return 0;
  }
  if ((verb === "build" || verb === "ensure") && name) {
    const template = await catalog.ensure(name, { force: verb === "build" });
    process.stdout.write(`${template.templateId} ready at ${template.image.rootfsDir}\n`);
    return 0;
  }
  throw new CubicleError("invalid_argument", `usage: ./cubicle template ls | ensure NAME | build NAME | build -f Dockerfile --name NAME | logs NAME | rm NAME`);
}

async function main(argv: string[]): Promise<number> {
  const config = loadConfig();
  const [command, ...args] = argv;
  switch (command) {
    case "up":
    case "serve":
      await serve(config);
      return -1; // keep running
    case "sandbox":
      return sandboxCommand(config, args);
    case "template":
      return templateCommand(config, args);
    case "bench":
      return runBenchCommand(args, config, loadOrCreateApiKey(config));
    case "state-dir":
      process.stdout.write(path.resolve(config.stateDir) + "\n");
      return 0;
    case "unmount":
      await createContainerRuntime(config).releaseHostMounts();
      process.stdout.write(`unmounted the storage pool and kit under ${config.runDir}\n`);
      return 0;
    case undefined:
    case "help":
    case "--help":
    case "-h":
      process.stdout.write(usage + "\n");
      return 0;
    default:
      process.stderr.write(`unknown command "${command}"\n\n${usage}\n`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code >= 0) process.exit(code);
  },
  (err) => {
    const error = CubicleError.from(err);
    process.stderr.write(`cubicle: ${error.message}\n`);
    if (process.env.CUBICLE_LOG_LEVEL === "debug" && error.cause) process.stderr.write(String((error.cause as Error).stack ?? error.cause) + "\n");
    process.exit(1);
  },
);

