/**
 * CLOUD_REGISTRIES_NOTE: the SDK's `fromAWSRegistry` and `fromGCPRegistry` send a cloud's own
 * credentials instead of a registry's username and password; each becomes Basic credentials for
 * the image's registry here, and the pull goes on as for any registry (registry-client.ts).
 * - GCP (Artifact Registry, Container Registry): the service account's JSON key is itself the
 *   password of the user `_json_key`, which Google's registries take as Basic credentials.
 * - AWS (ECR): the access key signs (Signature Version 4) one `GetAuthorizationToken` call to
 *   the region's ECR API (`CUBICLE_ECR_ENDPOINT` overrides it: a VPC endpoint, or a test's
 *   server), whose answer is a token `AWS:<password>` good for 12 hours.
 * The credentials live only in the build's memory: they are not written to the build record, and
 * no error or log line carries them.
 */
import { createHash, createHmac } from "node:crypto";
import { CubicleError } from "../../shared/cubicle-error.js";
import type { RegistryCredentials } from "./registry-client.js";

export interface AwsRegistryCredentials {
  accessKeyId: string;
  secretAccessKey: string;
  region: string;
}

const AWS_REGION = /^[a-z]{2}(-[a-z]+)+-\d{1,2}$/;
const AWS_ACCESS_KEY = /^[A-Z0-9]{16,128}$/;
const ECR_TARGET = "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken";
const ECR_TIMEOUT_MS = 30_000;
/** An answer larger than this is not ECR's. */
const ECR_MAX_ANSWER_BYTES = 64 * 1024;

const bad = (message: string) => new CubicleError("invalid_argument", message);

/** `fromImageRegistry` of type "aws", checked (the secret's content is never put in a message). */
export function parseAwsRegistry(raw: Record<string, unknown>): AwsRegistryCredentials {
  const { awsAccessKeyId, awsSecretAccessKey, awsRegion } = raw;
  if (typeof awsAccessKeyId !== "string" || !AWS_ACCESS_KEY.test(awsAccessKeyId)) throw bad("fromImageRegistry.awsAccessKeyId must be an AWS access key id (16-128 upper-case letters and digits)");
  if (typeof awsSecretAccessKey !== "string" || awsSecretAccessKey.length === 0 || awsSecretAccessKey.length > 256 || /[\s\0]/.test(awsSecretAccessKey)) {
    throw bad("fromImageRegistry.awsSecretAccessKey must be an AWS secret access key (1-256 characters, no spaces)");
  }
  if (typeof awsRegion !== "string" || !AWS_REGION.test(awsRegion)) throw bad("fromImageRegistry.awsRegion must be an AWS region such as us-east-1");
  return { accessKeyId: awsAccessKeyId, secretAccessKey: awsSecretAccessKey, region: awsRegion };
}

/** `fromImageRegistry` of type "gcp": a service account's JSON key as `_json_key`'s password. */
export function gcpRegistryCredentials(raw: Record<string, unknown>): RegistryCredentials {
  const json = raw.serviceAccountJson;
  if (typeof json !== "string" || json.length > 64 * 1024) throw bad("fromImageRegistry.serviceAccountJson must be a service account's JSON key (at most 64 KiB)");
  let key: unknown;
  try {
    key = JSON.parse(json);
  } catch {
    throw bad("fromImageRegistry.serviceAccountJson is not JSON");
  }
  const fields = key as Record<string, unknown> | null;
  if (typeof fields !== "object" || fields === null || fields.type !== "service_account" || typeof fields.client_email !== "string" || typeof fields.private_key !== "string") {
    throw bad('fromImageRegistry.serviceAccountJson must be a service account key (type "service_account" with client_email and private_key)');
  }
  return { username: "_json_key", password: json };
}

export interface SignableRequest {
  method: string;
  /** The path, already URI-encoded, and the canonical query string ("" for none). */
  path: string;
  query: string;
  /** Header names in lower case; each is signed. */
  headers: Record<string, string>;
  /** Hex SHA-256 of the body. */
  payloadHash: string;
}

const sha256 = (data: string) => createHash("sha256").update(data).digest("hex");
const hmac = (key: Buffer | string, data: string) => createHmac("sha256", key).update(data).digest();

/** The `Authorization` header of a Signature Version 4 request (`amzDate` is `YYYYMMDDTHHMMSSZ`, also in the headers). */
export function signAwsV4(request: SignableRequest, credentials: { accessKeyId: string; secretAccessKey: string }, scope: { region: string; service: string; amzDate: string }): string {
  const names = Object.keys(request.headers).sort();
  const canonicalHeaders = names.map((name) => `${name}:${request.headers[name]!.trim().replace(/\s+/g, " ")}\n`).join("");
  const signedHeaders = names.join(";");
  const canonicalRequest = [request.method, request.path, request.query, canonicalHeaders, signedHeaders, request.payloadHash].join("\n");
  const day = scope.amzDate.slice(0, 8);
  const credentialScope = `${day}/${scope.region}/${scope.service}/aws4_request`;
  const stringToSign = ["AWS4-HMAC-SHA256", scope.amzDate, credentialScope, sha256(canonicalRequest)].join("\n");
  const signingKey = hmac(hmac(hmac(hmac(`AWS4${credentials.secretAccessKey}`, day), scope.region), scope.service), "aws4_request");
  const signature = createHmac("sha256", signingKey).update(stringToSign).digest("hex");
  return `AWS4-HMAC-SHA256 Credential=${credentials.accessKeyId}/${credentialScope}, SignedHeaders=${signedHeaders}, Signature=${signature}`;
}

/** `20150830T123600Z` for a date. */
function amzDateOf(date: Date): string {
  return date.toISOString().replace(/[-:]/g, "").replace(/\.\d{3}/, "");
}

export interface EcrOptions {
  /** The ECR API's base URL; default `https://api.ecr.<region>.amazonaws.com` (CUBICLE_ECR_ENDPOINT). */
  endpoint?: string;
  signal?: AbortSignal;
  now?: () => Date;
}

/** Registry credentials from ECR's GetAuthorizationToken, signed with the user's access key. */
export async function ecrRegistryCredentials(aws: AwsRegistryCredentials, options: EcrOptions = {}): Promise<RegistryCredentials> {
  // China's regions have a domain of their own.
  const domain = aws.region.startsWith("cn-") ? "amazonaws.com.cn" : "amazonaws.com";
  const base = new URL(options.endpoint ?? `https://api.ecr.${aws.region}.${domain}`);
  const body = "{}";
  const amzDate = amzDateOf(options.now?.() ?? new Date());
  const headers: Record<string, string> = {
    "content-type": "application/x-amz-json-1.1",
    host: base.host,
    "x-amz-date": amzDate,
    "x-amz-target": ECR_TARGET,
  };
  const authorization = signAwsV4({ method: "POST", path: "/", query: "", headers, payloadHash: sha256(body) }, aws, { region: aws.region, service: "ecr", amzDate });
  const signal = options.signal ? AbortSignal.any([options.signal, AbortSignal.timeout(ECR_TIMEOUT_MS)]) : AbortSignal.timeout(ECR_TIMEOUT_MS);
  let res: Response;
  try {
    res = await fetch(new URL("/", base), { method: "POST", headers: { ...headers, authorization }, body, signal, redirect: "error" });
  } catch (err) {
    throw new CubicleError("unavailable", `ECR (${base.host}) could not be reached for a registry token: ${(err as Error).message}`);
  }
  const text = await readLimited(res);
  if (res.status === 400 || res.status === 401 || res.status === 403) {
    // ECR's own words ("The security token included in the request is invalid."), never ours.
    const message = safeMessage(text);
    throw new CubicleError("failed_precondition", `ECR refused the AWS credentials for a registry token (${res.status}${message ? `: ${message}` : ""})`);
  }
  if (res.status !== 200) throw new CubicleError("unavailable", `ECR answered ${res.status} to GetAuthorizationToken`);
  let token: unknown;
  try {
    token = (JSON.parse(text) as { authorizationData?: { authorizationToken?: unknown }[] }).authorizationData?.[0]?.authorizationToken;
  } catch {
    token = undefined;
  }
  const decoded = typeof token === "string" ? Buffer.from(token, "base64").toString("utf8") : "";
  const colon = decoded.indexOf(":");
  if (colon <= 0 || colon === decoded.length - 1) throw new CubicleError("unavailable", "ECR's GetAuthorizationToken answer holds no authorization token");
  return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
}

async function readLimited(res: Response): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of res.body ?? []) {
    size += (chunk as Uint8Array).length;
    if (size > ECR_MAX_ANSWER_BYTES) throw new CubicleError("unavailable", "ECR's answer to GetAuthorizationToken is too large");
    chunks.push(Buffer.from(chunk as Uint8Array));
  }
  return Buffer.concat(chunks).toString("utf8");
}

/** The `message` of an AWS JSON error, printable and short. */
function safeMessage(text: string): string {
  try {
    const body = JSON.parse(text) as { message?: unknown; Message?: unknown };
    const message = body.message ?? body.Message;
    return typeof message === "string" ? message.replace(/[^\x20-\x7e]/g, "?").slice(0, 200) : "";
  } catch {
    return "";
  }
}
