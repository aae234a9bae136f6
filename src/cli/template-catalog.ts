import type { TemplateCatalog, TemplateInfo } from "../core/index.js";
import type { CubicleConfig } from "../shared/config.js";
import {
  ensureTemplate,
  findRecipe,
  listTemplates,
  pickTemplate,
  templateImage,
  templateNotFound,
  type TemplateRecord,
  type TemplateStores,
} from "../template/index.js";

export interface ServerTemplateCatalog extends TemplateCatalog {
  ensure(idOrAlias: string, options?: { force?: boolean; onProgress?: (message: string) => void }): Promise<TemplateInfo>;
  list(): Promise<{ templateID: string; aliases: string[]; cpuCount: number; memoryMB: number; diskSizeMB: number; buildStatus: string }[]>;
  /** What decides whether an image made from `template` is still current: its recipe hash. */
  fingerprint(template: TemplateInfo): Promise<string>;
  /** Drops the templates read from the store (a build or a removal changed them). */
  invalidate(): void;
  /** A built-in template (a recipe) by id or alias. */
  isBuiltIn(idOrAlias: string): boolean;
}

/** The template component's functions the catalog calls; tests pass counting wrappers. */
export interface TemplateAccess {
  listTemplates: typeof listTemplates;
  ensureTemplate: typeof ensureTemplate;
}

export interface TemplateCatalogOptions {
  /**
   * How long the templates read from the store are used without looking again; then one read
   * of the store's template version tells whether another process changed them. Default 1 s.
   */
  revalidateAfterMs?: number;
  access?: TemplateAccess;
  now?: () => number;
}

/** The templates as read at one moment, and the store's template version they were read at. */
interface CachedTemplates {
  records: TemplateRecord[];
  version: number;
  checkedAt: number;
}

/** What the operator configured per template id or alias (the first name that has a setting wins). */
interface TemplateSettings {
  bandwidth: Record<string, { egressMbps?: number; ingressMbps?: number }>;
  runtime: Record<string, "container" | "microvm">;
}

function toInfo(record: TemplateRecord, settings: TemplateSettings = { bandwidth: {}, runtime: {} }): TemplateInfo {
  const names = [record.templateId, ...record.aliases];
  const bandwidth = names.map((name) => settings.bandwidth[name]).find((limits) => limits !== undefined);
  const runtime = names.map((name) => settings.runtime[name]).find((value) => value !== undefined);
  return {
    templateId: record.templateId,
    aliases: record.aliases,
    image: templateImage(record),
    cpuCount: record.cpuCount,
    memoryMB: record.memoryMB,
    diskSizeMB: record.diskSizeMB,
    ...(record.startCmd ? { startCmd: record.startCmd } : {}),
    ...(record.readyCmd ? { readyCmd: record.readyCmd } : {}),
    ...(bandwidth ? { bandwidth } : {}),
    ...(runtime ? { runtime } : {}),
  };
}

function builtInsFirst(records: TemplateRecord[]): TemplateRecord[] {
  return [...records.filter((t) => t.source === "recipe"), ...records.filter((t) => t.source !== "recipe")];
}

/**
 * The template component as the core sees it: templates by id or alias, as the store records
 * them (TEMPLATE_RECORDS_NOTE). The core resolves a template several times per create, so the
 * templates read are kept: for `revalidateAfterMs` they are used as they are, then one read of
 * the store's template version says whether another process (`./cubicle template import`,
 * `./cubicle template build NAME`) changed them. A build through `ensure` drops them at once.
 */
export function createTemplateCatalog(config: Pick<CubicleConfig, "templateDir"> & Partial<Pick<CubicleConfig, "templateBandwidth" | "templateRuntime">>, stores: TemplateStores, options: TemplateCatalogOptions = {}): ServerTemplateCatalog {
  const settings: TemplateSettings = { bandwidth: config.templateBandwidth ?? {}, runtime: config.templateRuntime ?? {} };
  const access = options.access ?? { listTemplates, ensureTemplate };
  const revalidateAfterMs = options.revalidateAfterMs ?? 1_000;
  const now = options.now ?? Date.now;
  let cached: CachedTemplates | undefined;
  let loading: Promise<TemplateRecord[]> | undefined;
  // Bumped by a build: a read that started before it must not be kept.
  let generation = 0;

  async function load(): Promise<TemplateRecord[]> {
    const startedGeneration = generation;
    const checkedAt = now();
    // The version is taken before the read, so a change during the read makes the next check read again.
    const version = await stores.templatesVersion();
    const previous = cached;
    // Built-in templates first: a built template never shadows one (the builder refuses their names).
    const records = previous && version === previous.version ? previous.records : builtInsFirst(await access.listTemplates(stores));
    if (generation === startedGeneration) cached = { records, version, checkedAt };
    return records;
  }

  function currentTemplates(): Promise<TemplateRecord[]> {
    if (cached && now() - cached.checkedAt < revalidateAfterMs) return Promise.resolve(cached.records);
    if (!loading) {
      const started = load().finally(() => {
        if (loading === started) loading = undefined;
      });
      loading = started;
    }
    return loading;
  }

  function forget(): void {
    generation++;
    cached = undefined;
    loading = undefined;
  }

  return {
    async resolve(idOrAlias) {
      const records = await currentTemplates();
      let record = pickTemplate(records, idOrAlias);
      // E2B's `name:tag`: a built template's tag, which names its current build (the only one kept).
      const colon = idOrAlias.indexOf(":");
      if (!record && colon > 0) {
        const named = pickTemplate(records, idOrAlias.slice(0, colon));
        const tag = idOrAlias.slice(colon + 1);
        if (named && (tag === "default" || (named.tags?.[tag] !== undefined && named.tags[tag] === named.buildId))) record = named;
      }
      return record && toInfo(record, settings);
    },
    async ensure(idOrAlias, ensureOptions) {
      try {
        return toInfo(await access.ensureTemplate(config, stores, idOrAlias, { force: ensureOptions?.force, onProgress: ensureOptions?.onProgress }), settings);
      } finally {
        forget();
      }
    },
    async list() {
      return (await currentTemplates()).map((t) => ({
        templateID: t.templateId,
        aliases: t.aliases,
        cpuCount: t.cpuCount,
        memoryMB: t.memoryMB,
        diskSizeMB: t.diskSizeMB,
        buildStatus: "ready",
      }));
    },
    invalidate: forget,
    isBuiltIn: (idOrAlias) => findRecipe(idOrAlias) !== undefined,
    async fingerprint(template) {
      const record = pickTemplate(await currentTemplates(), template.templateId);
      if (!record) throw templateNotFound(template.templateId);
      return record.recipeHash;
    },
  };
}
