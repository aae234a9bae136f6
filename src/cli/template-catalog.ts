import type { TemplateCatalog, TemplateInfo } from "../core/index.js";
import type { CubicleConfig } from "../shared/config.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { ensureTemplate, getTemplate, listTemplates, templateImage, type TemplateRecord } from "../template/index.js";

export interface ServerTemplateCatalog extends TemplateCatalog {
  ensure(idOrAlias: string, options?: { force?: boolean }): Promise<TemplateInfo>;
  list(): Promise<{ templateID: string; aliases: string[]; cpuCount: number; memoryMB: number; diskSizeMB: number; buildStatus: string }[]>;
}

function toInfo(record: TemplateRecord): TemplateInfo {
  return {
    templateId: record.templateId,
    aliases: record.aliases,
    image: templateImage(record),
    cpuCount: record.cpuCount,
    memoryMB: record.memoryMB,
    diskSizeMB: record.diskSizeMB,
  };
}

/** The template component as the core sees it: built templates by id or alias. */
export function createTemplateCatalog(config: CubicleConfig): ServerTemplateCatalog {
  return {
    async resolve(idOrAlias) {
      try {
        return toInfo(await getTemplate(config, idOrAlias));
      } catch (err) {
        if (err instanceof CubicleError && err.code === "not_found") return undefined;
        throw err;
      }
    },
    async ensure(idOrAlias, options) {
      return toInfo(await ensureTemplate(config, idOrAlias, { force: options?.force }));
    },
    async list() {
      return (await listTemplates(config)).map((t) => ({
        templateID: t.templateId,
        aliases: t.aliases,
        cpuCount: t.cpuCount,
        memoryMB: t.memoryMB,
        diskSizeMB: t.diskSizeMB,
        buildStatus: "ready",
      }));
    },
  };
}
