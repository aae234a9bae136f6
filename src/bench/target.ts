import type { CubicleConfig } from "../shared/config.js";

/** The server a benchmark drives, and where its host-side state lives. */
export interface BenchTarget {
  apiUrl: string;
  apiKey: string;
  /** The server's state dir (its CRIU copy, for the baseline). */
  stateDir: string;
  /** The server's run dir: sandbox bundles are under `<runDir>/pool/sandboxes/`. */
  runDir: string;
  /** Template rootfs cache (the baseline runs the same rootfs). */
  templateDir: string;
  runcPath: string;
  domain: string;
}

export function targetFromConfig(config: Pick<CubicleConfig, "host" | "port" | "stateDir" | "runDir" | "templateDir" | "runcPath" | "domain">, apiKey: string): BenchTarget {
  const host = config.host === "0.0.0.0" ? "127.0.0.1" : config.host;
  return { apiUrl: `http://${host}:${config.port}`, apiKey, stateDir: config.stateDir, runDir: config.runDir, templateDir: config.templateDir, runcPath: config.runcPath, domain: config.domain };
}

/** Points the SDKs at the target through the variables a user would export. */
function exportSdkEnvironment(target: BenchTarget): void {
  process.env.E2B_API_URL = target.apiUrl;
  process.env.E2B_SANDBOX_URL = target.apiUrl;
  process.env.E2B_API_KEY = target.apiKey;
  process.env.E2B_DOMAIN = target.domain;
}

/** The `e2b` SDK's Sandbox class, configured for the target. */
export async function loadSandboxSdk(target: BenchTarget) {
  exportSdkEnvironment(target);
  const { Sandbox } = await import("e2b");
  return Sandbox;
}

/** The `e2b` SDK's template builder (`Template`, ready checks), configured for the target. */
export async function loadTemplateSdk(target: BenchTarget) {
  exportSdkEnvironment(target);
  const { Template, waitForPort } = await import("e2b");
  return { Template, waitForPort };
}

/** The `@e2b/code-interpreter` SDK's Sandbox class, configured for the target. */
export async function loadCodeInterpreterSdk(target: BenchTarget) {
  exportSdkEnvironment(target);
  const { Sandbox } = await import("@e2b/code-interpreter");
  return Sandbox;
}

/**
 * A REST call with the API key, for endpoints the SDK has no method for (rollback, pools);
 * the body comes back parsed when it is JSON. The e2e harness makes its calls through it too.
 */
export async function callApi(
  target: Pick<BenchTarget, "apiUrl" | "apiKey">,
  method: string,
  urlPath: string,
  body?: unknown,
  headers: Record<string, string> = {},
): Promise<{ status: number; json: any; headers: Headers }> {
  const res = await fetch(target.apiUrl + urlPath, {
    method,
    headers: { "x-api-key": target.apiKey, ...(body === undefined ? {} : { "content-type": "application/json" }), ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  let json: unknown = text;
  try {
    json = text ? JSON.parse(text) : undefined;
  } catch {
    // not JSON
  }
  return { status: res.status, json, headers: res.headers };
}
