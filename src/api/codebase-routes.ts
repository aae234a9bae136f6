import type { FastifyInstance, FastifyRequest } from "fastify";
import type { CodebaseService } from "../codebases/codebase-service.js";
import { CubicleError } from "../shared/cubicle-error.js";
import type { CodebaseRecord } from "../store/index.js";

type CodebaseParams = { codebaseID: string };

/** What the API shows of a codebase: a host path is the operator's, so it is shown; a volume by id. */
function view(codebase: CodebaseRecord) {
  return {
    codebaseID: codebase.codebaseId,
    name: codebase.name,
    ...(codebase.source.kind === "host" ? { hostPath: codebase.source.path } : { volumeID: codebase.source.volumeId }),
    createdAt: new Date(codebase.createdAt).toISOString(),
  };
}

/** Cubicle's codebases (CODEBASES_NOTE), with the API key: register, list, get, unregister. */
export function registerCodebaseRoutes(app: FastifyInstance, codebases: CodebaseService): void {
  app.post("/codebases", async (request, reply) => reply.status(201).send(view(await codebases.register(request.body))));
  app.get("/codebases", async () => (await codebases.list()).map(view));
  app.get("/codebases/:codebaseID", async (request: FastifyRequest<{ Params: CodebaseParams }>) => view(await codebases.get(request.params.codebaseID)));
  app.delete("/codebases/:codebaseID", async (request: FastifyRequest<{ Params: CodebaseParams }>, reply) => {
    if (!(await codebases.delete(request.params.codebaseID))) throw new CubicleError("not_found", `codebase "${request.params.codebaseID.slice(0, 64)}" not found`);
    return reply.status(204).send();
  });
}
