import { randomUUID } from "node:crypto";
import path from "node:path";
import type { TemplateBuildRecord, TemplateBuildStore, TemplateRecordStore } from "../store/types.js";
import type { CubicleConfig } from "../shared/config.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import { acquireDirLock } from "./build-lock.js";
import { buildTemplate, DEFAULT_DEBIAN_MIRROR } from "./build.js";
import { findRecipe, recipeHash, recipes, type Recipe } from "./recipe.js";
import { cacheDecision, inspectTree, isDirectory, pickTemplate, ROOTFS_DIR, templatePath, type TemplateRecord, type TreeStamp } from "./template-store.js";

export { adoptLegacyRecords, pickTemplate, templateImage } from "./template-store.js";
export type { TemplateRecord, TemplateRecordStore } from "./template-store.js";
export { baseRecipe, codeInterpreterRecipe, findRecipe, recipeHash, recipes } from "./recipe.js";
export type { Recipe, RecipeUser, RecipeFile, RecipeDirectory } from "./recipe.js";

const log = createLogger("template");

/** Where templates and their builds are recorded: the server's store. */
export type TemplateStores = TemplateRecordStore & TemplateBuildStore;

export interface EnsureTemplateOptions {
  /** Debian mirror for a build. Default `CUBICLE_DEBIAN_MIRROR` or deb.debian.org. */
  mirror?: string;
  /** How long to wait for another process that is building the same template. */
  lockWaitMs?: number;
  /** Rebuild even when the cached template is current (`./cubicle template build NAME`). */
  force?: boolean;
  /** What a build is doing now (only called when there is a build). */
  onProgress?: (message: string) => void;
}

/** Builds started by this process, so concurrent callers share one. */
const buildsInFlight = new Map<string, Promise<TemplateRecord>>();

/**
 * The built-in template `idOrAlias` (a recipe: `base`, `code-interpreter-v1`), recorded in
 * `stores` like any other template (TEMPLATE_RECORDS_NOTE), with a build in its history for
 * each time its tree was made or taken from the cache. Its tree is built first if the cache
 * has none for this version of the recipe: about a minute, which other processes starting at
 * the same time wait for instead of building again. A tree another server sharing the cache
 * built is recorded as it is.
 */
export function ensureTemplate(
  config: Pick<CubicleConfig, "templateDir">,
  stores: TemplateStores,
  idOrAlias: string,
  options: EnsureTemplateOptions = {},
): Promise<TemplateRecord> {
  const recipe = findRecipe(idOrAlias);
  if (!recipe) {
    return Promise.reject(
      new CubicleError(
        "not_found",
        `no recipe for template '${idOrAlias}'; built-in templates are ${[...recipes.keys()].join(", ")}`,
      ),
    );
  }
  const key = path.join(config.templateDir, recipe.templateId);
  let pending = buildsInFlight.get(key);
  if (!pending) {
    pending = ensureRecipe(config.templateDir, stores, recipe, options).finally(() => buildsInFlight.delete(key));
    buildsInFlight.set(key, pending);
  }
  return pending;
}

async function ensureRecipe(templateDir: string, stores: TemplateStores, recipe: Recipe, options: EnsureTemplateOptions): Promise<TemplateRecord> {
  const dir = templatePath(templateDir, recipe.templateId);
  const expectedHash = recipeHash(recipe);
  const rootfsDir = path.join(dir, ROOTFS_DIR);
  if (!options.force) {
    const recorded = await stores.getTemplate(recipe.templateId);
    if (recorded && recorded.recipeHash === expectedHash && recorded.rootfsDir === rootfsDir && (await isDirectory(rootfsDir))) return recorded;
    const cached = await cachedTree(dir, expectedHash);
    if (cached) return record(stores, recipe, rootfsDir, cached, `the template cache holds this recipe's tree (built ${cached.builtAt})`);
  }

  const release = await acquireDirLock(path.join(templateDir, `.lock-${recipe.templateId}`), {
    waitMs: options.lockWaitMs,
    onWait: (pid) => log.info("waiting for another process building the template", { templateId: recipe.templateId, pid }),
  });
  try {
    // The process we waited for may have built it.
    const builtMeanwhile = options.force ? undefined : await cachedTree(dir, expectedHash);
    if (builtMeanwhile) return record(stores, recipe, rootfsDir, builtMeanwhile, `another process built this recipe's tree (at ${builtMeanwhile.builtAt})`);
    const decision = options.force ? "forced" : cacheDecision(await inspectTree(dir), expectedHash);
    log.info("building template", { templateId: recipe.templateId, reason: decision, dir });
    const build = newBuild(recipe);
    const progress = (message: string) => {
      build.logs.push({ timestamp: new Date().toISOString(), level: "info", message });
      options.onProgress?.(message);
    };
    await stores.putTemplateBuild(build);
    try {
      const tree = await buildTemplate(recipe, templateDir, {
        mirror: options.mirror ?? process.env.CUBICLE_DEBIAN_MIRROR ?? DEFAULT_DEBIAN_MIRROR,
        log,
        onProgress: progress,
      });
      return await record(stores, recipe, tree.rootfsDir, tree.stamp, undefined, build);
    } catch (err) {
      const message = CubicleError.from(err).message;
      build.logs.push({ timestamp: new Date().toISOString(), level: "error", message });
      await stores.putTemplateBuild({ ...build, status: "error", reason: { message }, finishedAt: Date.now() }).catch(() => undefined);
      throw err;
    }
  } finally {
    await release();
  }
}

async function cachedTree(dir: string, expectedHash: string): Promise<TreeStamp | undefined> {
  const state = await inspectTree(dir);
  return cacheDecision(state, expectedHash) === "ready" ? state.stamp : undefined;
}

function newBuild(recipe: Recipe): TemplateBuildRecord {
  return {
    buildId: randomUUID(),
    templateId: recipe.templateId,
    status: "building",
    spec: { recipe: recipe.templateId, recipeHash: recipeHash(recipe) },
    cpuCount: recipe.cpuCount,
    memoryMB: recipe.memoryMB,
    names: [...recipe.aliases],
    tags: ["default"],
    logs: [],
    createdAt: Date.now(),
  };
}

/**
 * Records the recipe's template over its tree, with the build that made the tree (or, for a
 * tree found in the cache, a build saying so) as the template's current one.
 */
async function record(stores: TemplateStores, recipe: Recipe, rootfsDir: string, stamp: TreeStamp, foundNote: string | undefined, made?: TemplateBuildRecord): Promise<TemplateRecord> {
  const build = made ?? newBuild(recipe);
  if (foundNote) build.logs.push({ timestamp: new Date().toISOString(), level: "info", message: foundNote });
  const finished: TemplateBuildRecord = { ...build, status: "ready", finishedAt: Date.now() };
  await stores.putTemplateBuild(finished);
  const template: TemplateRecord = {
    templateId: recipe.templateId,
    aliases: [...recipe.aliases],
    defaultUser: recipe.defaultUser,
    defaultWorkdir: recipe.defaultWorkdir,
    env: { ...recipe.env },
    cpuCount: recipe.cpuCount,
    memoryMB: recipe.memoryMB,
    diskSizeMB: recipe.diskSizeMB,
    runtime: "container",
    recipeHash: stamp.recipeHash,
    builtAt: stamp.builtAt,
    sizeBytes: stamp.sizeBytes,
    source: "recipe",
    rootfsDir,
    buildId: finished.buildId,
    tags: { default: finished.buildId },
    public: true,
  };
  await stores.putTemplate(template);
  return template;
}

/**
 * Every template recorded in `records` whose tree is there (a recipe's tree removed from the
 * cache by hand leaves its record, which the next ensure rebuilds).
 */
export async function listTemplates(records: TemplateRecordStore): Promise<TemplateRecord[]> {
  const all = await records.listTemplates();
  const present = await Promise.all(all.map((t) => isDirectory(t.rootfsDir)));
  return all.filter((_, i) => present[i]);
}

/**
 * The template with this id or alias. Does not build: use {@link ensureTemplate} for that.
 * Throws `not_found` when there is none.
 */
export async function getTemplate(records: TemplateRecordStore, idOrAlias: string): Promise<TemplateRecord> {
  const record = pickTemplate(await listTemplates(records), idOrAlias);
  if (!record) throw templateNotFound(idOrAlias);
  return record;
}

/** The error for a template id or alias that no built template has. */
export function templateNotFound(idOrAlias: string): CubicleError {
  return new CubicleError("not_found", `template '${idOrAlias}' not found; create it first or use one of ${[...recipes.keys()].join(", ")}`);
}
