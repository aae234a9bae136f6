import type { IncomingMessage, Server, ServerResponse } from "node:http";
import { registerTemplateRoutes, TEMPLATE_FILES_PREFIX } from "./template-routes.js";
import { registerVolumeRoutes, VOLUME_CONTENT_PREFIX } from "./volume-routes.js";
import type { VolumeService } from "../volumes/volume-service.js";
import type { CodebaseService } from "../codebases/codebase-service.js";
import { registerCodebaseRoutes } from "./codebase-routes.js";
import type { TemplateBuilder } from "../template/builder/template-builder.js";
import type { Duplex } from "node:stream";
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from "fastify";
import { decodeSnapshotCursor, DEFAULT_FORK_TIMEOUT_SEC, encodeSnapshotCursor } from "../core/index.js";
import type { SandboxManager } from "../core/sandbox-manager.js";
import { buildEgressPolicy, referencedSecrets } from "../network/egress-policy.js";
import type { MetricSample } from "../core/metrics.js";
import type { EgressAuditLog, EgressRecord } from "../network/index.js";
import type { apiSchema } from "../protocol/index.js";
import { constantTimeEquals } from "../shared/compare.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import { decodePageCursor, encodePageCursor } from "../shared/page-cursor.js";
import { PROMETHEUS_CONTENT_TYPE, renderPrometheus, type MetricFamily } from "../shared/prometheus.js";
import { parseNewSecret, parseSecretUpdate, SECRET_BOUNDS, type SecretInfo, type SecretVault } from "../secrets/index.js";
import type { SandboxRecord } from "../store/index.js";
import {
  decodeCursor,
  encodeCursor,
  parseCreateRequest,
  parseLimit,
  parseMetadataFilter,
  parseStartedAfter,
  parseStates,
  parseNetworkUpdate,
  parseTimeoutBody,
  parseTimeoutSec,
  parseForkRequest,
  parseMemoryFlag,
  parseBodyObject,
  singleQueryValue,
  type CreateLimits,
} from "./request-parsing.js";
import { publicErrorBody, redactHostPaths } from "./error-bodies.js";
import { listedSandboxView, sandboxDetailView, sandboxView, snapshotView } from "./sandbox-views.js";

const log = createLogger("api");

export interface ApiOptions {
  manager: SandboxManager;
  apiKey: string;
  domain: string;
  defaultTimeoutSec: number;
  /** The operator's ceilings for cpuCount, memoryMB and diskSizeMB in a create. */
  createLimits: CreateLimits;
  /** Refuse v1 creates with `secure: false` (CUBICLE_REQUIRE_SECURE). */
  requireSecure: boolean;
  /** Host directories (state, templates) whose paths are removed from every error message. */
  hostDirs?: string[];
  /** True once templates are ready and sandboxes can be created (GET /health answers 200). */
  isReady: () => boolean;
  /** Lists templates for `GET /templates`. */
  listTemplates: () => Promise<apiSchema.TemplateSummary[]>;
  /** Makes the HTTP server; requests it does not route elsewhere go to `apiHandler`. */
  serverFactory: (apiHandler: (req: IncomingMessage, res: ServerResponse) => void) => Server;
  /** The project's secrets (`/secrets`). */
  secrets: SecretVault;
  /** E2B's template-build API (absent: its routes answer 404). */
  templateBuilder?: TemplateBuilder;
  /** E2B volumes and their content API (VOLUMES_NOTE); absent: the routes answer 404. */
  volumes?: VolumeService;
  /** Cubicle's codebases (CODEBASES_NOTE); absent: the routes answer 404. */
  codebases?: CodebaseService;
  /** What sandboxes tried to reach (`GET /sandboxes/{id}/network/egress`) and its counters (`GET /metrics`). */
  egressAudit: EgressAuditLog;
  /**
   * Answers requests Node cannot parse (bad request line, header overflow, timeouts) on the raw
   * socket. Fastify's default answers with a body that is not `{code, message}`.
   */
  clientErrorHandler?: (error: Error, socket: Duplex) => void;
}

type Params = { sandboxID: string };

/**
 * Longest path parameter, in characters as sent: a secret name of SECRET_BOUNDS.nameBytes
 * bytes, each percent-encoded (`%XX`). Fastify's default (100) would refuse longer names.
 */
const MAX_PATH_PARAM_CHARS = SECRET_BOUNDS.nameBytes * 3;

/** The E2B control-plane REST API (and `GET /health`) as a fastify app. */
export function createApiApp(options: ApiOptions): FastifyInstance {
  const app = Fastify({
    logger: false,
    bodyLimit: 1024 * 1024,
    serverFactory: options.serverFactory,
    ...(options.clientErrorHandler ? { clientErrorHandler: options.clientErrorHandler } : {}),
    // Sandbox ids and paths are case-sensitive; trailing slashes are tolerated like upstream.
    routerOptions: { ignoreTrailingSlash: true, maxParamLength: MAX_PATH_PARAM_CHARS },
    // Errors of fastify's router (a bad percent-encoding, a path parameter over MAX_PATH_PARAM_CHARS)
    // bypass the error handler unless they come through here.
    frameworkErrors: (error, request, reply) => sendE2bError(error, request, reply),
  });
  const view = { domain: options.domain };
  const { manager } = options;

  // Some clients send `Content-Type: application/json` with an empty body (DELETE, connect {}).
  app.removeContentTypeParser("application/json");
  app.addContentTypeParser("application/json", { parseAs: "string" }, (_req, body, done) => {
    const text = (body as string).trim();
    if (text === "") return done(null, undefined);
    try {
      done(null, JSON.parse(text));
    } catch {
      done(new CubicleError("invalid_argument", "the request body is not valid JSON"), undefined);
    }
  });

  const hostDirs = options.hostDirs ?? [];
  /** Turns whatever a handler threw into a CubicleError: fastify's own 4xx keep their status class. */
  const toCubicleError = (error: unknown): CubicleError => {
    if (error instanceof CubicleError) return error;
    const statusCode = typeof error === "object" && error !== null ? (error as { statusCode?: unknown }).statusCode : undefined;
    if (statusCode === 413) return new CubicleError("invalid_argument", "the request body is too large (at most 1 MiB)", { cause: error });
    if (statusCode === 414) return new CubicleError("invalid_argument", `a path segment (an id or a name) is too long: at most ${MAX_PATH_PARAM_CHARS} characters`, { cause: error });
    if (typeof statusCode === "number" && statusCode >= 400 && statusCode < 500) {
      return new CubicleError("invalid_argument", (error as { message?: string }).message || "bad request", { cause: error });
    }
    return CubicleError.from(error);
  };

  function sendE2bError(error: unknown, request: FastifyRequest, reply: FastifyReply): void {
    // A body fastify's parser refuses (over the limit: before it is read) is answered with
    // "Connection: close", and the socket closed while the client still sends: the client then
    // sees a reset (EPIPE) instead of the answer. Without it, Node reads and drops the rest of
    // the body after the answer (bounded by the server's request timeout).
    const fastifyCode = typeof error === "object" && error !== null ? (error as { code?: unknown }).code : undefined;
    if (typeof fastifyCode === "string" && fastifyCode.startsWith("FST_ERR_CTP_") && !request.raw.complete) reply.removeHeader("connection");
    const cubicleError = toCubicleError(error);
    const { status, body, errorId } = publicErrorBody(cubicleError, hostDirs);
    if (errorId) {
      const cause = cubicleError.cause;
      log.error("request failed", {
        errorId,
        status,
        method: request.method,
        url: request.url.split("?")[0],
        error: cubicleError.message,
        cause: cause instanceof Error ? cause.stack ?? cause.message : cause === undefined ? undefined : String(cause),
        details: cubicleError.details,
      });
    }
    // Admission control (ADMISSION_NOTE): a refused create says when to come back.
    const retryAfterSec = cubicleError.details?.retryAfterSec;
    if ((status === 429 || status === 503) && typeof retryAfterSec === "number") void reply.header("Retry-After", String(Math.max(1, Math.ceil(retryAfterSec))));
    void reply.status(status).send(body);
  }
  app.setErrorHandler(sendE2bError);

  app.setNotFoundHandler(function sendNotFound(request, reply) {
    const message = `no such endpoint: ${request.method} ${request.url.split("?")[0]!.slice(0, 200)}`;
    void reply.status(404).send({ code: 404, message: redactHostPaths(message, hostDirs) });
  });

  app.addHook("onRequest", async (request: FastifyRequest) => {
    if (request.url === "/health" || request.url.startsWith("/health?")) return;
    // Signed upload links carry their own token (the SDK PUTs to them without the API key).
    if (options.templateBuilder && request.method === "PUT" && request.url.startsWith(TEMPLATE_FILES_PREFIX)) return;
    // The volume-content API takes each volume's own token (volume-routes.ts).
    if (options.volumes && request.url.startsWith(VOLUME_CONTENT_PREFIX)) return;
    const headerKey = request.headers["x-api-key"];
    const bearer = request.headers.authorization?.match(/^Bearer\s+(.+)$/i)?.[1];
    const given = (Array.isArray(headerKey) ? headerKey[0] : headerKey) ?? bearer;
    if (!given) throw new CubicleError("unauthenticated", "missing API key: send it in the X-API-Key header (see `./cubicle up` output)");
    if (!constantTimeEquals(options.apiKey, given)) throw new CubicleError("unauthenticated", "invalid API key");
  });

  app.get("/health", async (_request, reply) => {
    if (options.isReady()) return reply.status(200).send({ status: "ok" } satisfies apiSchema.Health);
    return reply.status(503).send({ code: 503, message: "the server is starting: templates are being prepared" });
  });

  const createHandler = (version: 1 | 2) => async function createSandbox(request: FastifyRequest, reply: FastifyReply) {
    if (!options.isReady()) throw new CubicleError("unavailable", "the server is still preparing its templates; retry in a moment");
    const create = parseCreateRequest(request.body, version, { defaultTimeoutSec: options.defaultTimeoutSec, limits: options.createLimits, requireSecure: options.requireSecure });
    checkReferencedSecrets(create.allowInternetAccess, create.networkConfig);
    const record = await manager.create(create);
    return reply.status(201).send(sandboxView(record, view));
  };
  app.post("/sandboxes", createHandler(1));
  app.post("/v2/sandboxes", createHandler(2));

  app.get("/sandboxes", async function listSandboxesV1(request: FastifyRequest<{ Querystring: Record<string, unknown> }>) {
    const metadata = parseMetadataFilter(singleQueryValue(request.query, "metadata"));
    const records = await manager.list({ states: ["running"], metadata, order: "desc" });
    return records.map(listedSandboxView);
  });

  app.get("/v2/sandboxes", async function listSandboxes(request: FastifyRequest<{ Querystring: Record<string, unknown> }>, reply) {
    const query = (name: string) => singleQueryValue(request.query, name);
    const limit = parseLimit(query("limit"));
    const orderParam = query("order");
    const order = orderParam === "asc" ? "asc" : orderParam === undefined || orderParam === "desc" ? "desc" : undefined;
    if (!order) throw new CubicleError("invalid_argument", "order must be asc or desc");
    const template = query("template");
    const templateIds = template ? [template] : undefined;
    const state = request.query.state;
    if (state !== undefined && typeof state !== "string" && !(Array.isArray(state) && state.every((s) => typeof s === "string"))) {
      throw new CubicleError("invalid_argument", "state must be running and/or paused");
    }
    const records = await manager.list({
      states: parseStates(state as string | string[] | undefined),
      metadata: parseMetadataFilter(query("metadata")),
      startedAfter: parseStartedAfter(query("startedAfter")),
      order,
      after: decodeCursor(query("nextToken")),
      limit: limit + 1,
      templateIds,
    });
    const page = records.slice(0, limit);
    if (records.length > limit) {
      const last = page[page.length - 1]!;
      void reply.header("X-Next-Token", encodeCursor(last.startedAt, last.sandboxId));
    }
    return page.map(listedSandboxView);
  });

  app.get("/sandboxes/:sandboxID", async (request: FastifyRequest<{ Params: Params }>) => {
    return sandboxDetailView(await manager.get(request.params.sandboxID), view);
  });

  app.delete("/sandboxes/:sandboxID", async (request: FastifyRequest<{ Params: Params }>, reply) => {
    const killed = await manager.kill(request.params.sandboxID);
    if (!killed) throw new CubicleError("not_found", `sandbox "${request.params.sandboxID}" not found`);
    return reply.status(204).send();
  });

  app.post("/sandboxes/:sandboxID/timeout", async (request: FastifyRequest<{ Params: Params }>, reply) => {
    await manager.setTimeout(request.params.sandboxID, parseTimeoutBody(request.body));
    return reply.status(204).send();
  });

  /** A header rule may name only secrets that exist (a later delete makes the proxy answer 502). */
  const checkReferencedSecrets = (allowInternetAccess: boolean, network: Record<string, unknown> | undefined) => {
    if (!network?.rules) return;
    for (const name of referencedSecrets(buildEgressPolicy(allowInternetAccess, network))) {
      if (options.secrets.resolveSecret(name) === undefined) throw new CubicleError("invalid_argument", `network.rules names the secret ${JSON.stringify(name)}, which does not exist; create it first (Secret.create)`);
    }
  };

  app.put("/sandboxes/:sandboxID/network", async (request: FastifyRequest<{ Params: Params }>, reply) => {
    const update = parseNetworkUpdate(request.body);
    checkReferencedSecrets(update.allowInternetAccess, update.egress);
    await manager.updateNetwork(request.params.sandboxID, update);
    return reply.status(204).send();
  });

  app.post("/sandboxes/:sandboxID/refreshes", async (request: FastifyRequest<{ Params: Params }>, reply) => {
    const body = (request.body ?? {}) as Record<string, unknown>;
    const durationSec = parseTimeoutSec(body.duration, "duration", options.defaultTimeoutSec);
    await manager.connect(request.params.sandboxID, durationSec);
    return reply.status(204).send();
  });

  const connectHandler = (version: 1 | 2) => async function connectSandbox(request: FastifyRequest<{ Params: Params }>, reply: FastifyReply) {
    const body = parseBodyObject(request.body);
    const timeoutSec = parseTimeoutSec(body.timeout, "timeout", version === 2 ? options.defaultTimeoutSec : 15);
    const { record, resumed } = await manager.connect(request.params.sandboxID, timeoutSec, parseMemoryFlag(body.memory));
    return reply.status(resumed ? 201 : 200).send(sandboxView(record, view));
  };
  app.post("/sandboxes/:sandboxID/connect", connectHandler(1));
  app.post("/v2/sandboxes/:sandboxID/connect", connectHandler(2));

  // JS 2.0.x connect: {timeout, autoPause}; 201 when resumed, 409 when it was not paused.
  app.post("/sandboxes/:sandboxID/resume", async function resumeSandbox(request: FastifyRequest<{ Params: Params }>, reply) {
    const body = parseBodyObject(request.body);
    const timeoutSec = parseTimeoutSec(body.timeout, "timeout", 15);
    const { record } = await manager.resume(request.params.sandboxID, { timeoutSec, memory: parseMemoryFlag(body.memory), requirePaused: true });
    return reply.status(201).send(sandboxView(record, view));
  });

  app.post("/sandboxes/:sandboxID/pause", async function pauseSandbox(request: FastifyRequest<{ Params: Params }>, reply) {
    const body = parseBodyObject(request.body);
    await manager.pause(request.params.sandboxID, { memory: parseMemoryFlag(body.memory) });
    return reply.status(204).send();
  });

  app.post("/sandboxes/:sandboxID/snapshots", async function createSnapshot(request: FastifyRequest<{ Params: Params }>, reply) {
    const body = parseBodyObject(request.body);
    const snapshot = await manager.createSnapshot(request.params.sandboxID, body.name);
    return reply.status(201).send(snapshotView(snapshot));
  });

  app.get("/snapshots", async function listSnapshots(request: FastifyRequest<{ Querystring: Record<string, unknown> }>, reply) {
    const query = (name: string) => singleQueryValue(request.query, name);
    const limit = parseLimit(query("limit"));
    const snapshots = await manager.listSnapshots({
      sourceSandboxId: query("sandboxID") || undefined,
      name: query("name") || undefined,
      after: decodeSnapshotCursor(query("nextToken")),
      limit: limit + 1,
    });
    const page = snapshots.slice(0, limit);
    if (snapshots.length > limit) {
      const last = page[page.length - 1]!;
      void reply.header("X-Next-Token", encodeSnapshotCursor(last.createdAt, last.snapshotId));
    }
    return page.map(snapshotView);
  });

  // Snapshots are templates upstream: the SDK deletes them through the template endpoint.
  app.delete("/templates/:templateID", async function deleteSnapshot(request: FastifyRequest<{ Params: { templateID: string } }>, reply) {
    const template = await options.templateBuilder?.deleteTemplate(request.params.templateID);
    if (template) return reply.status(204).send();
    const deleted = await manager.deleteSnapshot(request.params.templateID);
    if (!deleted) throw new CubicleError("not_found", `snapshot "${request.params.templateID}" not found (templates are managed with \`./cubicle template\`)`);
    return reply.status(204).send();
  });

  app.post("/sandboxes/:sandboxID/fork", async function forkSandbox(request: FastifyRequest<{ Params: Params }>, reply) {
    const { timeoutSec, count } = parseForkRequest(request.body, DEFAULT_FORK_TIMEOUT_SEC);
    const outcomes = await manager.fork(request.params.sandboxID, { timeoutSec, count });
    return reply.status(201).send(
      outcomes.map((outcome): apiSchema.ForkResult => ("record" in outcome ? { sandbox: sandboxView(outcome.record, view) } : { error: outcome.error.toE2bBody() })),
    );
  });

  // CubeSandbox extension: roll a sandbox back to one of its own snapshots, in place.
  app.post("/sandboxes/:sandboxID/rollback", async function rollbackSandbox(request: FastifyRequest<{ Params: Params }>, reply) {
    const body = parseBodyObject(request.body);
    const snapshotId = body.snapshotID ?? body.snapshotId;
    if (typeof snapshotId !== "string" || snapshotId === "") throw new CubicleError("invalid_argument", "snapshotID is required (an id or name from createSnapshot)");
    const record = await manager.rollback(request.params.sandboxID, snapshotId);
    return reply.status(200).send(sandboxView(record, view));
  });

  // Cubicle extension: warm pool levels per template.
  app.get("/pools", async (): Promise<Record<string, apiSchema.PoolCounts>> => manager.poolCounts());
  // Cubicle extension: warm snapshots per template (ready, building, creates served).
  app.get("/warm-snapshots", async () => manager.warmSnapshotCounts());

  app.get("/sandboxes/metrics", async (request: FastifyRequest<{ Querystring: Record<string, unknown> }>): Promise<apiSchema.SandboxesWithMetrics> => {
    const ids = sandboxIdList(request.query.sandbox_ids);
    const latest = await manager.latestMetrics(ids);
    return { sandboxes: Object.fromEntries([...latest].map(([sandboxId, sample]) => [sandboxId, metricView(sample)])) };
  });

  app.get("/sandboxes/:sandboxID/metrics", async (request: FastifyRequest<{ Params: Params; Querystring: Record<string, unknown> }>): Promise<apiSchema.SandboxMetric[]> => {
    const start = unixSecondsParam(request.query.start, "start");
    const end = unixSecondsParam(request.query.end, "end");
    if (start !== undefined && end !== undefined && start > end) throw new CubicleError("invalid_argument", `start (${start}) is after end (${end})`);
    const samples = await manager.metrics(request.params.sandboxID, { start, end });
    return samples.map(metricView);
  });

  app.get("/templates", async (): Promise<apiSchema.TemplateSummary[]> => options.listTemplates());
  if (options.templateBuilder) registerTemplateRoutes(app, options.templateBuilder);
  if (options.volumes) registerVolumeRoutes(app, options.volumes, hostDirs);
  if (options.codebases) registerCodebaseRoutes(app, options.codebases);

  // Secrets: the value goes in (create, update) and never comes out, nor into a log or an error.
  const { secrets } = options;
  app.get("/secrets", async function listSecrets(request: FastifyRequest<{ Querystring: Record<string, unknown> }>, reply): Promise<apiSchema.Secret[]> {
    const query = (name: string) => singleQueryValue(request.query, name);
    const limit = parseLimit(query("limit"));
    const cursor = decodePageCursor(query("nextToken"), (id) => /^sec_[0-9a-f]{1,64}$/.test(id));
    const found = await secrets.list({ after: cursor && { createdAt: cursor.at, secretId: cursor.id }, limit: limit + 1 });
    const page = found.slice(0, limit);
    if (found.length > limit) {
      const last = page[page.length - 1]!;
      void reply.header("X-Next-Token", encodePageCursor(last.createdAt, last.secretId));
    }
    return page.map(secretView);
  });

  app.post("/secrets", async function createSecret(request, reply) {
    const created = await secrets.create(parseNewSecret(request.body));
    return reply.status(201).send(secretView(created));
  });

  app.get("/secrets/:secretID", async function getSecret(request: FastifyRequest<{ Params: SecretParams }>): Promise<apiSchema.Secret> {
    return secretView(secrets.info(request.params.secretID));
  });

  app.post("/secrets/:secretID", async function updateSecret(request: FastifyRequest<{ Params: SecretParams }>): Promise<apiSchema.Secret> {
    return secretView(await secrets.update(request.params.secretID, parseSecretUpdate(request.body)));
  });

  app.delete("/secrets/:secretID", async function deleteSecret(request: FastifyRequest<{ Params: SecretParams }>, reply) {
    if (!(await secrets.delete(request.params.secretID))) throw new CubicleError("not_found", `secret ${JSON.stringify(request.params.secretID.slice(0, 200))} not found`);
    return reply.status(204).send();
  });

  // Cubicle extension: the egress audit log of a sandbox, newest first.
  const { egressAudit } = options;
  app.get("/sandboxes/:sandboxID/network/egress", async function listEgress(request: FastifyRequest<{ Params: Params; Querystring: Record<string, unknown> }>, reply) {
    const query = (name: string) => singleQueryValue(request.query, name);
    const limit = parseEgressLimit(query("limit"));
    const nextToken = query("nextToken");
    const sandboxId = request.params.sandboxID;
    // Known: in the log (also after it ended), or running or paused (an empty log). Else 404.
    if (!egressAudit.has(sandboxId)) await manager.get(sandboxId);
    const page = egressAudit.list(sandboxId, { limit, nextToken });
    if (page.nextToken) void reply.header("X-Next-Token", page.nextToken);
    return page.items.map(egressRecordView);
  });

  // Cubicle extension: Prometheus text exposition.
  app.get("/metrics", async function prometheusMetrics(_request, reply) {
    const families = [...egressAudit.metricFamilies(), sandboxStateGauge(manager.liveSandboxes())];
    return reply.type(PROMETHEUS_CONTENT_TYPE).send(renderPrometheus(families));
  });

  return app;
}

type SecretParams = { secretID: string };

function secretView(secret: SecretInfo): apiSchema.Secret {
  return {
    secretID: secret.secretId,
    name: secret.name,
    currentVersion: secret.currentVersion,
    metadata: secret.metadata,
    createdAt: new Date(secret.createdAt).toISOString(),
    updatedAt: new Date(secret.updatedAt).toISOString(),
  };
}

function egressRecordView(record: EgressRecord): apiSchema.EgressRecord {
  return {
    time: new Date(record.time).toISOString(),
    timeUnix: record.time,
    sandboxId: record.sandboxId,
    protocol: record.protocol,
    address: record.address,
    port: record.port,
    domain: record.domain,
    verdict: record.verdict,
    reason: record.reason,
    bytesOut: record.bytesOut,
    bytesIn: record.bytesIn,
    durationMs: record.durationMs,
    attempts: record.attempts,
  };
}

/** `limit` of the egress log: 1–1000, default 100. */
function parseEgressLimit(raw: string | undefined): number {
  if (raw === undefined || raw === "") return 100;
  if (!/^\d{1,4}$/.test(raw) || Number(raw) < 1 || Number(raw) > 1000) throw new CubicleError("invalid_argument", "limit must be a whole number from 1 to 1000");
  return Number(raw);
}

/** `cubicle_sandboxes{state}`: the live sandboxes of this server by state (the usual ones even at 0). */
function sandboxStateGauge(records: SandboxRecord[]): MetricFamily {
  const counts = new Map<string, number>([["starting", 0], ["running", 0], ["paused", 0]]);
  for (const record of records) counts.set(record.state, (counts.get(record.state) ?? 0) + 1);
  return { name: "cubicle_sandboxes", help: "Sandboxes of this server by state.", type: "gauge", samples: [...counts].map(([state, value]) => ({ labels: { state }, value })) };
}

function metricView(sample: MetricSample): apiSchema.SandboxMetric {
  return {
    timestamp: new Date(sample.timestampSec * 1000).toISOString(),
    timestampUnix: sample.timestampSec,
    cpuCount: sample.cpuCount,
    cpuUsedPct: sample.cpuUsedPct,
    memUsed: sample.memUsedBytes,
    memTotal: sample.memTotalBytes,
    memCache: sample.memCacheBytes,
    diskUsed: sample.diskUsedBytes,
    diskTotal: sample.diskTotalBytes,
  };
}

/** A `start`/`end` query parameter: whole unix seconds, or absent. */
function unixSecondsParam(value: unknown, name: string): number | undefined {
  if (value === undefined || value === "") return undefined;
  if (typeof value !== "string" || !/^\d{1,12}$/.test(value)) {
    throw new CubicleError("invalid_argument", `${name} must be a time in whole unix seconds, got ${JSON.stringify(String(value).slice(0, 40))}`);
  }
  return Number(value);
}

/** Upstream's `sandbox_ids`: comma-separated, possibly repeated; at most 100, each a plausible id. */
function sandboxIdList(value: unknown): string[] {
  const raw = value === undefined ? [] : Array.isArray(value) ? value : [value];
  const ids = [...new Set(raw.flatMap((item) => String(item).split(",")).map((id) => id.trim()).filter(Boolean))];
  if (ids.length === 0) throw new CubicleError("invalid_argument", "sandbox_ids is required: a comma-separated list of sandbox ids");
  if (ids.length > 100) throw new CubicleError("invalid_argument", `at most 100 sandbox ids per request, got ${ids.length}`);
  const bad = ids.find((id) => id.length > 100);
  if (bad) throw new CubicleError("invalid_argument", `a sandbox id is at most 100 characters, got ${bad.length}`);
  return ids;
}
