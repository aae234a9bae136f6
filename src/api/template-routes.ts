import type { FastifyInstance, FastifyRequest } from "fastify";
import { CubicleError } from "../shared/cubicle-error.js";
import type { TemplateBuilder } from "../template/builder/template-builder.js";
import { parseBodyObject, singleQueryValue } from "./request-parsing.js";

type TemplateParams = { templateID: string };
type BuildParams = { templateID: string; buildID: string };

/** Path prefix of signed upload links: no API key, the link's token instead (the SDK PUTs with plain fetch). */
export const TEMPLATE_FILES_PREFIX = "/template-files/";

function nonNegativeInt(raw: string | undefined, name: string, max: number): number | undefined {
  if (raw === undefined || raw === "") return undefined;
  if (!/^\d{1,9}$/.test(raw) || Number(raw) > max) throw new CubicleError("invalid_argument", `${name} must be an integer from 0 to ${max}`);
  return Number(raw);
}

/** The base URL the client reached this server at: upload links point back at it. */
function baseUrlOf(request: FastifyRequest): string {
  const host = request.headers.host;
  if (!host || !/^[A-Za-z0-9.[\]:-]{1,300}$/.test(host)) throw new CubicleError("invalid_argument", "the request has no usable Host header for the upload link");
  return `${request.protocol}://${host}`;
}

/**
 * E2B's template-build API (TEMPLATE_BUILD_NOTE; wire protocol §3.11). Answers in E2B's shapes;
 * `DELETE /templates/{id}` (a built template, else a snapshot) is registered by the caller.
 */
export function registerTemplateRoutes(app: FastifyInstance, builder: TemplateBuilder): void {
  const requestBuild = async (request: FastifyRequest, reply: { status(code: number): { send(body: unknown): unknown } }) => reply.status(202).send(await builder.requestBuild(request.body));
  app.post("/v3/templates", requestBuild);
  app.post("/v2/templates", requestBuild);

  app.get("/templates/:templateID/files/:hash", async (request: FastifyRequest<{ Params: TemplateParams & { hash: string } }>, reply) => {
    return reply.status(201).send(await builder.fileLink(request.params.templateID, request.params.hash, baseUrlOf(request)));
  });

  app.register(async (uploads) => {
    // The archive streams to a file: no JSON parsing, no 1 MiB body limit (the builder has its own).
    uploads.removeAllContentTypeParsers();
    uploads.addContentTypeParser("*", (_request, payload, done) => done(null, payload));
    uploads.put(`${TEMPLATE_FILES_PREFIX}:hash`, async (request: FastifyRequest<{ Params: { hash: string }; Querystring: Record<string, unknown> }>, reply) => {
      const token = singleQueryValue(request.query, "token") ?? "";
      const length = request.headers["content-length"] === undefined ? undefined : Number(request.headers["content-length"]);
      await builder.acceptUpload(request.params.hash, token, request.raw, Number.isFinite(length) ? length : undefined);
      return reply.status(200).send();
    });
  });

  app.post("/v2/templates/:templateID/builds/:buildID", async (request: FastifyRequest<{ Params: BuildParams }>, reply) => {
    await builder.startBuild(request.params.templateID, request.params.buildID, request.body);
    return reply.status(202).send();
  });

  // Cubicle extension: a template's builds, newest first (`./cubicle template logs`).
  app.get("/templates/:templateID/builds", async (request: FastifyRequest<{ Params: TemplateParams }>) => builder.listBuilds(request.params.templateID));

  // Cubicle extension: cancel a waiting or running build.
  app.delete("/templates/:templateID/builds/:buildID", async (request: FastifyRequest<{ Params: BuildParams }>, reply) => {
    await builder.cancel(request.params.templateID, request.params.buildID);
    return reply.status(204).send();
  });

  app.get("/templates/:templateID/builds/:buildID/status", async (request: FastifyRequest<{ Params: BuildParams; Querystring: Record<string, unknown> }>) => {
    const query = (name: string) => singleQueryValue(request.query, name);
    return builder.status(request.params.templateID, request.params.buildID, {
      logsOffset: nonNegativeInt(query("logsOffset"), "logsOffset", 1_000_000_000),
      limit: nonNegativeInt(query("limit"), "limit", 100_000),
      level: query("level"),
    });
  });

  app.get("/templates/aliases/:alias", async (request: FastifyRequest<{ Params: { alias: string } }>) => {
    const found = await builder.alias(request.params.alias);
    if (!found) throw new CubicleError("not_found", `no template is named ${JSON.stringify(request.params.alias)}`);
    return found;
  });

  app.get("/templates/:templateID/tags", async (request: FastifyRequest<{ Params: TemplateParams }>) => builder.listTags(request.params.templateID));

  app.post("/templates/tags", async (request, reply) => {
    const body = parseBodyObject(request.body);
    return reply.status(201).send(await builder.assignTags(body.target, body.tags));
  });

  app.delete("/templates/tags", async (request, reply) => {
    const body = parseBodyObject(request.body);
    await builder.removeTags(body.name, body.tags);
    return reply.status(204).send();
  });
}
