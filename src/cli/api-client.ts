import { encodeEnvelope, EnvelopeParser, envelopeFlags, ENVD_PORT, type processMessages } from "../protocol/index.js";
import { CubicleError } from "../shared/cubicle-error.js";

/** A thin client of Cubicle's own REST API and router, for the CLI verbs. */
export class ApiClient {
  constructor(private readonly baseUrl: string, private readonly apiKey: string) {}

  async request(method: string, path: string, body?: unknown): Promise<{ status: number; json: unknown; headers: Headers }> {
    let res: Response;
    try {
      res = await fetch(this.baseUrl + path, {
        method,
        headers: { "x-api-key": this.apiKey, ...(body === undefined ? {} : { "content-type": "application/json" }) },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new CubicleError("unavailable", `cannot reach the Cubicle server at ${this.baseUrl}: is \`./cubicle up\` running?`, { cause: err });
    }
    const text = await res.text();
    let json: unknown = undefined;
    try {
      json = text ? JSON.parse(text) : undefined;
    } catch {
      json = text;
    }
    if (res.status >= 400) {
      const message = (json as { message?: string } | undefined)?.message ?? text;
      throw new CubicleError(res.status === 404 ? "not_found" : "internal", `${method} ${path}: ${res.status} ${message}`);
    }
    return { status: res.status, json, headers: res.headers };
  }

  /**
   * Runs a command in a sandbox through envd's `process.Process/Start` (Connect streaming, JSON),
   * writing its output as it arrives. Resolves to the exit code.
   */
  async exec(sandboxId: string, accessToken: string | undefined, argv: string[], user: string): Promise<number> {
    const request: processMessages.StartRequest = { process: { cmd: argv[0], args: argv.slice(1), envs: {} }, stdin: false };
    const envelope = encodeEnvelope(0, JSON.stringify(request));
    const res = await fetch(this.baseUrl + "/process.Process/Start", {
      method: "POST",
      headers: {
        "content-type": "application/connect+json",
        "connect-protocol-version": "1",
        "e2b-sandbox-id": sandboxId,
        "e2b-sandbox-port": String(ENVD_PORT),
        authorization: "Basic " + Buffer.from(`${user}:`).toString("base64"),
        ...(accessToken ? { "x-access-token": accessToken } : {}),
      },
      body: new Uint8Array(envelope),
    });
    if (res.status !== 200 || !res.body) throw new CubicleError("internal", `exec failed: HTTP ${res.status} ${await res.text()}`);
    const parser = new EnvelopeParser();
    let exitCode = 1;
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
      for (const { flags, data } of parser.push(chunk)) {
        if (flags & envelopeFlags.endStream) {
          const { error } = JSON.parse(data.toString("utf8")) as { error?: { code: string; message: string } };
          if (error) throw new CubicleError("internal", `exec failed: [${error.code}] ${error.message}`);
          continue;
        }
        const event = (JSON.parse(data.toString("utf8")) as processMessages.StartResponse).event ?? {};
        if (event.data?.stdout) process.stdout.write(Buffer.from(event.data.stdout, "base64"));
        if (event.data?.stderr) process.stderr.write(Buffer.from(event.data.stderr, "base64"));
        if (event.end) exitCode = event.end.exitCode ?? (event.end.exited ? 0 : 1);
      }
    }
    return exitCode;
  }
}
