import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import { CubicleError, type ErrorCode } from "../../shared/cubicle-error.js";
import { createLogger, type Logger } from "../../shared/log.js";
import { DOCKER_HUB_REGISTRY, isSha256Digest, normalizeRegistryHost, type ImageReference } from "./reference.js";

/**
 * A client for the OCI Distribution API (distribution-spec "pull"): manifests and blobs, the
 * token flow of the Docker registry auth spec (WWW-Authenticate Bearer → token service) and
 * Basic auth, a pull-through mirror for Docker Hub names, digests verified on everything.
 *
 * Credentials never reach a log line or an error message: messages name the registry, the
 * repository and the status, nothing from a request header or a token service's answer.
 */

export interface RegistryCredentials {
  username: string;
  password: string;
}

export interface RegistryClientOptions {
  /** Registry hosts (host[:port]) that may be spoken to over plain http. Loopback always may. */
  insecure?: readonly string[];
  /** A registry (host[:port] or http(s)://host[:port]) tried first for Docker Hub images. */
  mirror?: string;
  /** Credentials per registry host (`docker.io` or `registry-1.docker.io`, `host:port`). */
  auth?: Readonly<Record<string, RegistryCredentials>>;
  /** Time allowed to open a connection (TCP and TLS). Default 15 s. */
  connectTimeoutMs?: number;
  /** Time a connection may stay silent (no response, no body bytes). Default 30 s. */
  idleTimeoutMs?: number;
  /** Largest manifest or image config accepted. Default 4 MiB. */
  maxManifestBytes?: number;
  log?: Logger;
}

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
}

export interface ImageManifest {
  mediaType: string;
  config: Descriptor;
  layers: Descriptor[];
}

/** Where a repository is read from: a registry (or a mirror standing in for it). */
export interface Endpoint {
  /** host[:port] requests go to. */
  host: string;
  repository: string;
  credentials?: RegistryCredentials;
  mirror: boolean;
}

export interface ResolvedImage {
  /** Digest of what the reference names (the index when it is one): what `name@digest` pins. */
  digest: string;
  /** Digest of the linux/amd64 image manifest. */
  manifestDigest: string;
  manifest: ImageManifest;
  /** The config blob, digest verified. */
  config: Buffer;
  /** Endpoints to fetch blobs from, the one that served the manifest first. */
  endpoints: Endpoint[];
}

export interface BlobProgress {
  layer: string;
  bytes: number;
  total: number;
}

export const MEDIA_TYPES = {
  ociIndex: "application/vnd.oci.image.index.v1+json",
  dockerList: "application/vnd.docker.distribution.manifest.list.v2+json",
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
} as const;

const MANIFEST_ACCEPT = [MEDIA_TYPES.ociIndex, MEDIA_TYPES.dockerList, MEDIA_TYPES.ociManifest, MEDIA_TYPES.dockerManifest].join(", ");
const LAYER_MEDIA_TYPE = /^application\/vnd\.(?:oci\.image\.layer(?:\.nondistributable)?\.v1\.tar(?:\+gzip|\+zstd)?|docker\.image\.rootfs\.diff\.tar(?:\.gzip)?)$/;
const MAX_ERROR_BODY = 64 * 1024;
const MAX_TOKEN_BODY = 1024 * 1024;
const MAX_REDIRECTS = 5;
const PROGRESS_INTERVAL_MS = 100;

export function isLoopbackHost(host: string): boolean {
  const name = hostname(host);
  if (name === "localhost" || name.endsWith(".localhost")) return true;
  if (net.isIPv4(name)) return name.startsWith("127.");
  return name === "::1";
}

/** The host part of host[:port] (brackets of an IPv6 literal removed). */
function hostname(host: string): string {
  if (host.startsWith("[")) return host.slice(1, host.indexOf("]"));
  const colon = host.lastIndexOf(":");
  return (colon >= 0 ? host.slice(0, colon) : host).toLowerCase();
}

interface Challenge {
  scheme: string;
  params: Record<string, string>;
}

/** Parses a WWW-Authenticate header (RFC 7235 §4.1): the first Bearer or Basic challenge. */
export function parseWwwAuthenticate(header: string): Challenge | undefined {
  const match = /^\s*([A-Za-z][A-Za-z0-9_-]*)\s*(.*)$/s.exec(header);
  if (!match) return undefined;
  const scheme = match[1]!.toLowerCase();
  const params: Record<string, string> = {};
  const paramPattern = /\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)/gy;
  const rest = match[2]!;
  let found: RegExpExecArray | null;
  while (paramPattern.lastIndex < rest.length && (found = paramPattern.exec(rest))) {
    params[found[1]!.toLowerCase()] = found[2] !== undefined ? found[2].replace(/\\(.)/g, "$1") : found[3]!;
  }
  return { scheme, params };
}

function digestOf(data: Buffer): string {
  return `sha256:${createHash("sha256").update(data).digest("hex")}`;
}

function basicAuth(credentials: RegistryCredentials): string {
  return `Basic ${Buffer.from(`${credentials.username}:${credentials.password}`).toString("base64")}`;
}

function checkDescriptor(value: unknown, what: string): Descriptor {
  const d = value as Partial<Descriptor> | null;
  if (!d || typeof d !== "object" || typeof d.mediaType !== "string" || !isSha256Digest(d.digest) || !Number.isSafeInteger(d.size) || d.size! < 0) {
    throw new CubicleError("failed_precondition", `invalid manifest: ${what} is not a descriptor with a mediaType, a sha256 digest and a size`);
  }
  return { mediaType: d.mediaType, digest: d.digest, size: d.size! };
}

/** Reads a response body up to `limit` bytes; more is an error. */
function readBody(res: http.IncomingMessage, limit: number, what: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const declared = Number(res.headers["content-length"]);
    if (Number.isFinite(declared) && declared > limit) {
      res.destroy();
      reject(new CubicleError("failed_precondition", `${what} is ${declared} bytes, more than the limit of ${limit}`));
      return;
    }
    const chunks: Buffer[] = [];
    let total = 0;
    res.on("data", (chunk: Buffer) => {
      total += chunk.length;
      if (total > limit) {
        res.destroy();
        reject(new CubicleError("failed_precondition", `${what} is more than the limit of ${limit} bytes`));
        return;
      }
      chunks.push(chunk);
    });
    res.on("end", () => resolve(Buffer.concat(chunks)));
    res.on("error", reject);
    res.on("close", () => {
      if (!res.complete) reject(new CubicleError("unavailable", `${what}: the connection closed before the end of the response`));
    });
  });
}

/** The registry's own error codes from an error body (`{"errors":[{"code","message"}]}`), bounded. */
async function registryErrorText(res: http.IncomingMessage): Promise<string> {
  try {
    const body = await readBody(res, MAX_ERROR_BODY, "error body");
    const errors = (JSON.parse(body.toString()) as { errors?: Array<{ code?: unknown; message?: unknown }> }).errors;
    if (!Array.isArray(errors)) return "";
    const text = errors
      .slice(0, 3)
      .map((e) => [e.code, e.message].filter((part) => typeof part === "string").join(": "))
      .join("; ");
    return text ? ` (${text.replace(/[^\x20-\x7e]/g, "?").slice(0, 300)})` : "";
  } catch {
    return "";
  }
}

export class RegistryClient {
  private readonly insecure: Set<string>;
  private readonly auth = new Map<string, RegistryCredentials>();
  private readonly mirror?: { host: string; scheme?: "http" | "https" };
  private readonly connectTimeoutMs: number;
  private readonly idleTimeoutMs: number;
  private readonly maxManifestBytes: number;
  private readonly log: Logger;
  /** Scheme that worked per host, once known. */
  private readonly schemes = new Map<string, "http" | "https">();
  /** Authorization values per `host|repository`, from a token service or Basic credentials. */
  private readonly authorizations = new Map<string, string>();

  constructor(options: RegistryClientOptions = {}) {
    this.insecure = new Set((options.insecure ?? []).map(normalizeRegistryHost));
    for (const [host, credentials] of Object.entries(options.auth ?? {})) this.auth.set(normalizeRegistryHost(host), credentials);
    if (options.mirror) {
      const scheme = /^https?:\/\//i.exec(options.mirror)?.[0].toLowerCase().startsWith("https") ? "https" : /^http:\/\//i.test(options.mirror) ? "http" : undefined;
      this.mirror = { host: normalizeRegistryHost(options.mirror), scheme };
    }
    this.connectTimeoutMs = options.connectTimeoutMs ?? 15_000;
    this.idleTimeoutMs = options.idleTimeoutMs ?? 30_000;
    this.maxManifestBytes = options.maxManifestBytes ?? 4 * 1024 * 1024;
    this.log = options.log ?? createLogger("oci");
  }

  private mayUseHttp(host: string): boolean {
    return isLoopbackHost(host) || this.insecure.has(normalizeRegistryHost(host));
  }

  /** Endpoints for an image: the mirror first for Docker Hub names, then the registry itself. */
  endpointsFor(ref: ImageReference, credentials?: RegistryCredentials): Endpoint[] {
    const upstream: Endpoint = { host: ref.registry, repository: ref.repository, credentials: credentials ?? this.auth.get(ref.registry), mirror: false };
    if (this.mirror && ref.registry === DOCKER_HUB_REGISTRY) {
      if (this.mirror.scheme) this.schemes.set(this.mirror.host, this.mirror.scheme);
      return [{ host: this.mirror.host, repository: ref.repository, credentials: this.auth.get(this.mirror.host), mirror: true }, upstream];
    }
    return [upstream];
  }

  /**
   * Resolves a reference to its linux/amd64 image manifest and config. Tries each endpoint in
   * turn (a mirror that fails falls back to the registry, as dockerd's registry-mirrors do).
   */
  async resolveImage(ref: ImageReference, options: { credentials?: RegistryCredentials; signal?: AbortSignal } = {}): Promise<ResolvedImage> {
    const endpoints = this.endpointsFor(ref, options.credentials);
    let lastError: unknown;
    for (const [i, endpoint] of endpoints.entries()) {
      try {
        const resolved = await this.resolveAt(endpoint, ref, options.signal);
        return { ...resolved, endpoints: [endpoint, ...endpoints.filter((_, j) => j !== i)] };
      } catch (err) {
        if (options.signal?.aborted || !endpoint.mirror) throw err;
        lastError = err;
        this.log.warn("mirror failed, trying the registry", { mirror: endpoint.host, image: ref.canonical, error: (err as Error).message });
      }
    }
    throw lastError;
  }

  private async resolveAt(endpoint: Endpoint, ref: ImageReference, signal?: AbortSignal): Promise<Omit<ResolvedImage, "endpoints">> {
    const top = await this.getManifest(endpoint, ref.reference, signal, ref.canonical);
    let current = top;
    for (let depth = 0; current.mediaType === MEDIA_TYPES.ociIndex || current.mediaType === MEDIA_TYPES.dockerList; depth++) {
      if (depth >= 2) throw new CubicleError("failed_precondition", `image ${ref.canonical}: image indexes nested too deep`);
      const chosen = pickPlatform(current.json, ref.canonical);
      current = await this.getManifest(endpoint, chosen.digest, signal, ref.canonical);
      if (current.body.length !== chosen.size) throw new CubicleError("failed_precondition", `image ${ref.canonical}: manifest ${chosen.digest} has ${current.body.length} bytes, the index says ${chosen.size}`);
    }
    if (current.mediaType !== MEDIA_TYPES.ociManifest && current.mediaType !== MEDIA_TYPES.dockerManifest) {
      throw new CubicleError("failed_precondition", `image ${ref.canonical}: unsupported manifest media type '${current.mediaType.slice(0, 100)}' (OCI and Docker schema 2 manifests and indexes are supported)`);
    }
    const manifest = parseImageManifest(current.json, current.mediaType, ref.canonical);
    if (manifest.config.size > this.maxManifestBytes) throw new CubicleError("failed_precondition", `image ${ref.canonical}: config of ${manifest.config.size} bytes is larger than ${this.maxManifestBytes}`);
    const config = await this.getBlobBytes(endpoint, manifest.config, signal);
    return { digest: top.digest, manifestDigest: current.digest, manifest, config };
  }

  private async getManifest(endpoint: Endpoint, reference: string, signal: AbortSignal | undefined, image: string): Promise<{ mediaType: string; digest: string; body: Buffer; json: Record<string, unknown> }> {
    const res = await this.get(endpoint, `/v2/${endpoint.repository}/manifests/${reference}`, { accept: MANIFEST_ACCEPT, signal, what: `manifest of ${image}` });
    const body = await readBody(res, this.maxManifestBytes, `manifest of ${image}`);
    const digest = digestOf(body);
    if (isSha256Digest(reference) && digest !== reference) {
      throw new CubicleError("failed_precondition", `image ${image}: manifest digest mismatch: asked for ${reference}, got ${digest} from ${endpoint.host}`);
    }
    let json: Record<string, unknown>;
    try {
      json = JSON.parse(body.toString()) as Record<string, unknown>;
      if (typeof json !== "object" || json === null || Array.isArray(json)) throw new Error("not an object");
    } catch {
      throw new CubicleError("failed_precondition", `image ${image}: the manifest is not a JSON object`);
    }
    const header = String(res.headers["content-type"] ?? "").split(";")[0]!.trim();
    const mediaType = typeof json.mediaType === "string" ? json.mediaType : header;
    return { mediaType, digest, body, json };
  }

  private async getBlobBytes(endpoint: Endpoint, descriptor: Descriptor, signal?: AbortSignal): Promise<Buffer> {
    const res = await this.get(endpoint, `/v2/${endpoint.repository}/blobs/${descriptor.digest}`, { signal, what: `blob ${descriptor.digest}` });
    const body = await readBody(res, Math.min(descriptor.size, this.maxManifestBytes), `blob ${descriptor.digest}`);
    const digest = digestOf(body);
    if (digest !== descriptor.digest) throw new CubicleError("failed_precondition", `blob ${descriptor.digest} from ${endpoint.host}: digest mismatch (got ${digest})`);
    return body;
  }

  /**
   * Streams a blob into `file` (written as `file.partial-…` and renamed when its size and
   * sha256 match the descriptor; removed otherwise). Tries each endpoint in turn.
   */
  async downloadBlob(endpoints: readonly Endpoint[], descriptor: Descriptor, file: string, options: { signal?: AbortSignal; onProgress?: (progress: BlobProgress) => void } = {}): Promise<void> {
    let lastError: unknown;
    for (const endpoint of endpoints) {
      try {
        return await this.downloadBlobFrom(endpoint, descriptor, file, options);
      } catch (err) {
        if (options.signal?.aborted || !endpoint.mirror) throw err;
        lastError = err;
        this.log.warn("mirror failed for a blob, trying the registry", { mirror: endpoint.host, blob: descriptor.digest, error: (err as Error).message });
      }
    }
    throw lastError;
  }

  private async downloadBlobFrom(endpoint: Endpoint, descriptor: Descriptor, file: string, options: { signal?: AbortSignal; onProgress?: (progress: BlobProgress) => void }): Promise<void> {
    const res = await this.get(endpoint, `/v2/${endpoint.repository}/blobs/${descriptor.digest}`, { signal: options.signal, what: `blob ${descriptor.digest}` });
    const partial = `${file}.partial-${randomBytes(6).toString("hex")}`;
    const hash = createHash("sha256");
    let bytes = 0;
    let lastReport = 0;
    const report = (force: boolean) => {
      const now = Date.now();
      if (!options.onProgress || (!force && now - lastReport < PROGRESS_INTERVAL_MS)) return;
      lastReport = now;
      options.onProgress({ layer: descriptor.digest, bytes, total: descriptor.size });
    };
    const out = fs.createWriteStream(partial, { flags: "wx", mode: 0o600 });
    try {
      await new Promise<void>((resolve, reject) => {
        const fail = (err: unknown) => {
          res.destroy();
          out.destroy();
          reject(err);
        };
        out.on("error", fail);
        res.on("error", fail);
        res.on("data", (chunk: Buffer) => {
          bytes += chunk.length;
          if (bytes > descriptor.size) {
            fail(new CubicleError("failed_precondition", `blob ${descriptor.digest} from ${endpoint.host} is longer than the ${descriptor.size} bytes its manifest says (corrupt or tampered with)`));
            return;
          }
          hash.update(chunk);
          if (!out.write(chunk)) {
            res.pause();
            out.once("drain", () => res.resume());
          }
          report(false);
        });
        res.on("end", () => out.end(() => resolve()));
        res.on("close", () => {
          if (!res.complete) fail(new CubicleError("unavailable", `blob ${descriptor.digest}: ${endpoint.host} closed the connection after ${bytes} of ${descriptor.size} bytes`));
        });
      });
      const digest = `sha256:${hash.digest("hex")}`;
      if (bytes !== descriptor.size || digest !== descriptor.digest) {
        throw new CubicleError(
          "failed_precondition",
          `blob ${descriptor.digest} from ${endpoint.host}: digest mismatch: got ${digest} (${bytes} bytes, expected ${descriptor.size}); the registry's copy is corrupt or was tampered with`,
        );
      }
      fs.renameSync(partial, file);
      report(true);
    } catch (err) {
      fs.rmSync(partial, { force: true });
      throw err;
    }
  }

  /** A GET with the registry's auth flow: on 401, answer the challenge and retry once. */
  private async get(endpoint: Endpoint, urlPath: string, options: { accept?: string; signal?: AbortSignal; what: string }): Promise<http.IncomingMessage> {
    const key = `${endpoint.host}|${endpoint.repository}`;
    const headers: Record<string, string> = { "user-agent": "cubicle" };
    if (options.accept) headers.accept = options.accept;
    const send = async () => {
      const authorization = this.authorizations.get(key);
      return this.requestFollowing(endpoint.host, urlPath, { ...headers, ...(authorization ? { authorization } : {}) }, options.signal);
    };
    let res = await send();
    if (res.statusCode === 401) {
      const challenge = parseWwwAuthenticate(String(res.headers["www-authenticate"] ?? ""));
      res.resume();
      if (challenge?.scheme === "bearer") {
        this.authorizations.set(key, `Bearer ${await this.fetchToken(endpoint, challenge, options.signal)}`);
        res = await send();
      } else if (challenge?.scheme === "basic" && endpoint.credentials) {
        this.authorizations.set(key, basicAuth(endpoint.credentials));
        res = await send();
      }
    }
    const status = res.statusCode ?? 0;
    if (status === 200) return res;
    const detail = await registryErrorText(res);
    const where = `${options.what} at ${endpoint.host}${endpoint.mirror ? " (mirror)" : ""}`;
    let code: ErrorCode = "unavailable";
    let message = `${where}: the registry answered ${status}${detail}`;
    if (status === 401) {
      code = "unauthenticated";
      message = endpoint.credentials
        ? `${where}: the registry refused the credentials configured for ${endpoint.host}${detail}`
        : `${where}: pull access denied: the repository does not exist or needs credentials (configure them for ${endpoint.host})${detail}`;
    } else if (status === 403) {
      code = "permission_denied";
      message = `${where}: access denied${detail}`;
    } else if (status === 404) {
      code = "not_found";
      message = `${where}: not found${detail}`;
    } else if (status === 429) {
      code = "unavailable";
      message = `${where}: the registry is rate limiting pulls (429); try again later or configure a mirror${detail}`;
    }
    throw new CubicleError(code, message, { details: { status } });
  }

  /** Asks the token service named by a Bearer challenge for a pull token (Docker token auth spec). */
  private async fetchToken(endpoint: Endpoint, challenge: Challenge, signal?: AbortSignal): Promise<string> {
    const realm = challenge.params.realm;
    let url: URL;
    try {
      url = new URL(realm ?? "");
    } catch {
      throw new CubicleError("unavailable", `${endpoint.host} asked for a token without a valid realm`);
    }
    if (url.protocol !== "https:" && !(url.protocol === "http:" && this.mayUseHttp(url.host))) {
      throw new CubicleError("failed_precondition", `${endpoint.host} named a token service at ${url.protocol}//${url.host}, which is not https; list that host as insecure to allow it`);
    }
    if (challenge.params.service) url.searchParams.set("service", challenge.params.service);
    url.searchParams.set("scope", challenge.params.scope ?? `repository:${endpoint.repository}:pull`);
    const headers: Record<string, string> = { "user-agent": "cubicle" };
    if (endpoint.credentials) headers.authorization = basicAuth(endpoint.credentials);
    const res = await this.request(url, headers, signal);
    const status = res.statusCode ?? 0;
    if (status !== 200) {
      res.resume();
      if (status === 401 || status === 403) {
        throw new CubicleError(
          "unauthenticated",
          endpoint.credentials ? `the token service of ${endpoint.host} refused the credentials configured for it (${status})` : `the token service of ${endpoint.host} needs credentials (${status}); configure them for ${endpoint.host}`,
        );
      }
      throw new CubicleError("unavailable", `the token service of ${endpoint.host} answered ${status}`);
    }
    const body = await readBody(res, MAX_TOKEN_BODY, `token from ${url.host}`);
    let token: unknown;
    try {
      const json = JSON.parse(body.toString()) as { token?: unknown; access_token?: unknown };
      token = json.token ?? json.access_token;
    } catch {
      token = undefined;
    }
    if (typeof token !== "string" || token === "" || /[\r\n]/.test(token)) {
      throw new CubicleError("unavailable", `the token service of ${endpoint.host} answered without a token`);
    }
    return token;
  }

  /** A request to a registry host, with the scheme that works for it and redirects followed. */
  private async requestFollowing(host: string, urlPath: string, headers: Record<string, string>, signal?: AbortSignal): Promise<http.IncomingMessage> {
    let url = new URL(`${await this.schemeFor(host, signal)}://${host}${urlPath}`);
    let currentHeaders = headers;
    for (let hop = 0; ; hop++) {
      const res = await this.request(url, currentHeaders, signal);
      const status = res.statusCode ?? 0;
      if (![301, 302, 303, 307, 308].includes(status) || !res.headers.location) return res;
      res.resume();
      if (hop >= MAX_REDIRECTS) throw new CubicleError("unavailable", `${host}: too many redirects`);
      const next = new URL(res.headers.location, url);
      if (next.protocol !== "https:" && !(next.protocol === "http:" && this.mayUseHttp(next.host))) {
        throw new CubicleError("failed_precondition", `${host} redirected to ${next.protocol}//${next.host}, which is not https`);
      }
      // Blob storage behind a redirect gets a signed URL: the registry's credentials stay home.
      if (next.host !== url.host) {
        const { authorization: _dropped, ...rest } = currentHeaders;
        currentHeaders = rest;
      }
      url = next;
    }
  }

  /**
   * https, except for hosts allowed plain http (loopback, `insecure`): there https is tried
   * first and http used when the TLS handshake fails, as dockerd does.
   */
  private async schemeFor(host: string, signal?: AbortSignal): Promise<"http" | "https"> {
    const known = this.schemes.get(host);
    if (known) return known;
    if (!this.mayUseHttp(host)) return "https";
    try {
      const res = await this.request(new URL(`https://${host}/v2/`), { "user-agent": "cubicle" }, signal);
      res.resume();
      this.schemes.set(host, "https");
      return "https";
    } catch (err) {
      if (err instanceof CubicleError && (err.code === "deadline_exceeded" || err.code === "canceled")) throw err;
      const code = (err as { cause?: NodeJS.ErrnoException }).cause?.code ?? "";
      if (code === "ECONNREFUSED" || code === "EHOSTUNREACH" || code === "ENOTFOUND") throw err;
      this.schemes.set(host, "http");
      return "http";
    }
  }

  /** One HTTP(S) GET with the connect and idle timeouts and the abort signal. */
  private request(url: URL, headers: Record<string, string>, signal?: AbortSignal): Promise<http.IncomingMessage> {
    if (signal?.aborted) return Promise.reject(new CubicleError("canceled", "the pull was canceled"));
    const where = `${url.protocol}//${url.host}`;
    return new Promise((resolve, reject) => {
      const get = url.protocol === "https:" ? https.get : http.get;
      const req = get(url, { headers, agent: false, timeout: this.idleTimeoutMs });
      let settled = false;
      let failure: CubicleError | undefined;
      const fail = (err: CubicleError) => {
        failure ??= err;
        req.destroy(failure);
      };
      const connectTimer = setTimeout(
        () => fail(new CubicleError("deadline_exceeded", `could not connect to the registry at ${where} within ${this.connectTimeoutMs} ms`)),
        this.connectTimeoutMs,
      );
      const onAbort = () => fail(new CubicleError("canceled", "the pull was canceled"));
      signal?.addEventListener("abort", onAbort, { once: true });
      req.on("socket", (socket) => {
        socket.once(url.protocol === "https:" ? "secureConnect" : "connect", () => clearTimeout(connectTimer));
      });
      // The socket's idle timeout covers the wait for a response and every pause in a body.
      req.on("timeout", () => fail(new CubicleError("deadline_exceeded", `the registry at ${where} did not answer within ${this.idleTimeoutMs} ms`)));
      req.on("response", (res) => {
        settled = true;
        clearTimeout(connectTimer);
        res.on("close", () => signal?.removeEventListener("abort", onAbort));
        res.on("error", () => {});
        // Errors after the response started (timeouts, aborts) reach the body's reader.
        req.on("error", (err) => res.destroy(failure ?? err));
        resolve(res);
      });
      req.on("error", (err) => {
        clearTimeout(connectTimer);
        signal?.removeEventListener("abort", onAbort);
        if (settled) return;
        settled = true;
        reject(failure ?? new CubicleError("unavailable", `cannot reach the registry at ${where}: ${(err as NodeJS.ErrnoException).code ?? err.message}`, { cause: err }));
      });
    });
  }
}

/** Picks linux/amd64 from an image index (skipping attestations and other platforms). */
export function pickPlatform(index: Record<string, unknown>, image: string): Descriptor {
  const manifests = index.manifests;
  if (!Array.isArray(manifests)) throw new CubicleError("failed_precondition", `image ${image}: the index has no manifests list`);
  const candidates: Array<Descriptor & { variant?: string }> = [];
  const seen: string[] = [];
  for (const [i, entry] of manifests.entries()) {
    const platform = (entry as { platform?: { os?: unknown; architecture?: unknown; variant?: unknown } }).platform;
    if (!platform) continue;
    seen.push(`${String(platform.os)}/${String(platform.architecture)}${platform.variant ? `/${String(platform.variant)}` : ""}`);
    if (platform.os === "linux" && platform.architecture === "amd64") {
      candidates.push({ ...checkDescriptor(entry, `manifests[${i}]`), variant: typeof platform.variant === "string" ? platform.variant : undefined });
    }
  }
  // A plain amd64 entry before a micro-architecture level (v2, v3) one: every host runs it.
  const chosen = candidates.find((c) => !c.variant || c.variant === "v1") ?? candidates[0];
  if (!chosen) {
    const list = [...new Set(seen.filter((p) => p !== "unknown/unknown"))].slice(0, 10).join(", ") || "none";
    throw new CubicleError("failed_precondition", `image ${image} has no linux/amd64 variant (it has: ${list}); Cubicle runs linux/amd64 images only`);
  }
  return { mediaType: chosen.mediaType, digest: chosen.digest, size: chosen.size };
}

/** Validates an image manifest's shape and the media types of its layers. */
export function parseImageManifest(json: Record<string, unknown>, mediaType: string, image: string): ImageManifest {
  if (json.schemaVersion !== 2) throw new CubicleError("failed_precondition", `image ${image}: manifest schemaVersion ${String(json.schemaVersion)} is not supported (2 is)`);
  const config = checkDescriptor(json.config, "config");
  if (!Array.isArray(json.layers)) throw new CubicleError("failed_precondition", `image ${image}: the manifest has no layers list`);
  if (json.layers.length > 1000) throw new CubicleError("failed_precondition", `image ${image}: more than 1000 layers`);
  const layers = json.layers.map((layer, i) => checkDescriptor(layer, `layers[${i}]`));
  for (const layer of layers) {
    if (!LAYER_MEDIA_TYPE.test(layer.mediaType)) {
      throw new CubicleError("failed_precondition", `image ${image}: layer ${layer.digest} has the unsupported media type '${layer.mediaType.slice(0, 100)}' (tar, tar+gzip and tar+zstd layers are supported)`);
    }
  }
  return { mediaType, config, layers };
}
