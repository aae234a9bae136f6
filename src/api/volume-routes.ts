import { randomBytes } from "node:crypto";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import type { VolumeRecord } from "../store/index.js";
import { VolumeContent, type Ownership } from "../volumes/volume-content.js";
import type { VolumeService } from "../volumes/volume-service.js";
import { redactHostPaths } from "./error-bodies.js";
import { singleQueryValue } from "./request-parsing.js";

const log = createLogger("api");

/** The volume-content API's prefix: authenticated by each volume's token, not the API key. */
export const VOLUME_CONTENT_PREFIX = "/volumecontent/";

type VolumeParams = { volumeID: string };
type ContentRequest = FastifyRequest<{ Params: VolumeParams; Querystring: Record<string, unknown> }>;

const view = (volume: VolumeRecord) => ({ volumeID: volume.volumeId, name: volume.name });
const viewWithToken = (volume: VolumeRecord) => ({ ...view(volume), token: volume.token });

/** An optional unsigned integer query parameter (uid, gid, mode, depth). */
function queryInt(request: ContentRequest, name: string): number | undefined {
  const raw = singleQueryValue(request.query, name);
  if (raw === undefined || raw === "") return undefined;
  if (!/^\d{1,10}$/.test(raw)) throw new CubicleError("invalid_argument", `${name} must be a non-negative integer`);
  return Number(raw);
}

/** An optional boolean query parameter; undefined when absent. */
function queryBool(request: ContentRequest, name: string): boolean | undefined {
  const raw = singleQueryValue(request.query, name);
  if (raw === undefined || raw === "") return undefined;
  if (raw === "true" || raw === "false") return raw === "true";
  throw new CubicleError("invalid_argument", `${name} must be true or false`);
}

function ownership(request: ContentRequest): Ownership {
  return { uid: queryInt(request, "uid"), gid: queryInt(request, "gid"), mode: queryInt(request, "mode") };
}

/**
 * E2B volumes (VOLUMES_NOTE): `/volumes` with the API key, and the volume-content API
 * (`/volumecontent/{volumeID}/path|dir|file`, E2B's openapi-volumecontent.yml) with the
 * volume's own token, whose errors are `{code: <string>, message}` as that spec says.
 */
export function registerVolumeRoutes(app: FastifyInstance, volumes: VolumeService, hostDirs: readonly string[]): void {
  app.get("/volumes", async () => (await volumes.list()).map(view));

  app.post("/volumes", async (request, reply) => reply.status(201).send(viewWithToken(await volumes.create(request.body))));

  app.get("/volumes/:volumeID", async (request: FastifyRequest<{ Params: VolumeParams }>) => viewWithToken(await volumes.get(request.params.volumeID)));

  app.delete("/volumes/:volumeID", async (request: FastifyRequest<{ Params: VolumeParams }>, reply) => {
    if (!(await volumes.delete(request.params.volumeID))) throw new CubicleError("not_found", `volume "${request.params.volumeID.slice(0, 64)}" not found`);
    return reply.status(204).send();
  });

  app.register(async (content) => {
    // Uploads stream to the volume: no 1 MiB body limit, no buffering. PATCH bodies are JSON.
    content.removeAllContentTypeParsers();
    content.addContentTypeParser("application/json", { parseAs: "string", bodyLimit: 64 * 1024 }, (_request, body, done) => {
      try {
        done(null, (body as string).trim() === "" ? undefined : JSON.parse(body as string));
      } catch {
        done(new CubicleError("invalid_argument", "the request body is not valid JSON"), undefined);
      }
    });
    content.addContentTypeParser("*", (_request, payload, done) => done(null, payload));

    content.setErrorHandler((error, request, reply) => {
      const statusCode = (error as { statusCode?: unknown }).statusCode;
      // fastify's own 4xx (a JSON body over its limit, a bad content length) stay client errors.
      const cubicleError =
        error instanceof CubicleError ? error : typeof statusCode === "number" && statusCode < 500 ? new CubicleError("invalid_argument", (error as Error).message) : CubicleError.from(error);
      const status = cubicleError.httpStatus;
      let message = redactHostPaths(cubicleError.message, hostDirs);
      if (status >= 500 && cubicleError.code !== "insufficient_storage") {
        const errorId = randomBytes(4).toString("hex");
        log.error("volume content request failed", { errorId, method: request.method, url: request.url.split("?")[0], error: cubicleError.message });
        message = `server error (error id ${errorId}; the server log has the cause)`;
      }
      void reply.status(status).send({ code: cubicleError.code, message });
    });

    /** The volume the request's bearer token opens, and its content. */
    const open = async (request: ContentRequest): Promise<VolumeContent> => {
      const token = request.headers.authorization?.match(/^Bearer\s+(\S+)$/i)?.[1];
      const volume = await volumes.authorize(request.params.volumeID, token);
      return new VolumeContent(volumes.dirOf(volume.volumeId));
    };
    const pathOf = (request: ContentRequest) => singleQueryValue(request.query, "path");
    const prefix = `${VOLUME_CONTENT_PREFIX}:volumeID`;

    content.get(`${prefix}/path`, async (request: ContentRequest) => (await open(request)).stat(pathOf(request)));
    content.patch(`${prefix}/path`, async (request: ContentRequest) => (await open(request)).updateMetadata(pathOf(request), request.body));
    content.delete(`${prefix}/path`, async (request: ContentRequest, reply: FastifyReply) => {
      await (await open(request)).remove(pathOf(request));
      return reply.status(204).send();
    });
    content.get(`${prefix}/dir`, async (request: ContentRequest) => (await open(request)).list(pathOf(request), queryInt(request, "depth") ?? 1));
    content.post(`${prefix}/dir`, async (request: ContentRequest, reply: FastifyReply) => {
      const volume = await open(request);
      return reply.status(201).send(await volume.makeDir(pathOf(request), ownership(request), queryBool(request, "force") ?? false));
    });
    content.get(`${prefix}/file`, async (request: ContentRequest, reply: FastifyReply) => {
      const { stream, size } = await (await open(request)).readFile(pathOf(request));
      return reply.header("content-type", "application/octet-stream").header("content-length", String(size)).send(stream);
    });
    content.put(`${prefix}/file`, async (request: ContentRequest, reply: FastifyReply) => {
      const volume = await open(request);
      // A write replaces a file that is there (the SDK's writeFile says so); `force=false` refuses to.
      const owner = ownership(request);
      return reply.status(201).send(await volume.writeFile(pathOf(request), request.raw, owner, queryBool(request, "force") ?? true));
    });
  });
}
