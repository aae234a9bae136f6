import path from "node:path";
import type { CubicleConfig } from "../shared/config.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import { acquireDirLock } from "./build-lock.js";
import { buildTemplate, DEFAULT_DEBIAN_MIRROR } from "./build.js";
import { findRecipe, recipeHash, recipes, type Recipe } from "./recipe.js";
import {
  cacheDecision,
  findTemplate,
  inspectTemplateDir,
  listTemplates as listTemplatesIn,
  templatePath,
  templatesVersion as templatesVersionIn,
  toRecord,
  type TemplateRecord,
} from "./template-store.js";

export { pickTemplate, templateImage } from "./template-store.js";
export type { TemplateMetadata, TemplateRecord } from "./template-store.js";
export { baseRecipe, codeInterpreterRecipe, findRecipe, recipeHash, recipes } from "./recipe.js";
export type { Recipe, RecipeUser, RecipeFile, RecipeDirectory } from "./recipe.js";

const log = createLogger("template");

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
 * The template `idOrAlias` (a built-in recipe: `base`, `code-interpreter-v1`), built first if
 * it is missing, incomplete or made from another version of its recipe. A build takes about a
 * minute; other processes starting at the same time wait for it instead of building again.
 */
export function ensureTemplate(
  config: Pick<CubicleConfig, "templateDir">,
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
    pending = ensureRecipe(config.templateDir, recipe, options).finally(() => buildsInFlight.delete(key));
    buildsInFlight.set(key, pending);
  }
  return pending;
}

async function ensureRecipe(templateDir: string, recipe: Recipe, options: EnsureTemplateOptions): Promise<TemplateRecord> {
  const dir = templatePath(templateDir, recipe.templateId);
  const expectedHash = recipeHash(recipe);
  const cached = options.force ? undefined : await readyRecord(dir, expectedHash);
  if (cached) return cached;

  const release = await acquireDirLock(path.join(templateDir, `.lock-${recipe.templateId}`), {
    waitMs: options.lockWaitMs,
    onWait: (pid) => log.info("waiting for another process building the template", { templateId: recipe.templateId, pid }),
  });
  try {
    // The process we waited for may have built it.
    const builtMeanwhile = options.force ? undefined : await readyRecord(dir, expectedHash);
    if (builtMeanwhile) return builtMeanwhile;
    const decision = options.force ? "forced" : cacheDecision(await inspectTemplateDir(dir), expectedHash);
    log.info("building template", { templateId: recipe.templateId, reason: decision, dir });
    return await buildTemplate(recipe, templateDir, {
      mirror: options.mirror ?? process.env.CUBICLE_DEBIAN_MIRROR ?? DEFAULT_DEBIAN_MIRROR,
      log,
      onProgress: options.onProgress,
    });
  } finally {
    await release();
  }
}

async function readyRecord(dir: string, expectedHash: string): Promise<TemplateRecord | undefined> {
  const state = await inspectTemplateDir(dir);
  if (cacheDecision(state, expectedHash) !== "ready" || !state.metadata) return undefined;
  return toRecord(dir, state.metadata);
}

/** Every built template in `config.templateDir`, whatever its recipe version. */
export function listTemplates(config: Pick<CubicleConfig, "templateDir">): Promise<TemplateRecord[]> {
  return listTemplatesIn(config.templateDir);
}

/**
 * Changes whenever a template in `config.templateDir` is added, replaced or removed, by this
 * process or another; one `stat`. Undefined right after a change: read the templates again.
 */
export function templatesVersion(config: Pick<CubicleConfig, "templateDir">): Promise<string | undefined> {
  return templatesVersionIn(config.templateDir);
}

/**
 * The built template with this id or alias. Does not build: use {@link ensureTemplate} for
 * that. Throws `not_found` when there is none.
 */
export async function getTemplate(config: Pick<CubicleConfig, "templateDir">, idOrAlias: string): Promise<TemplateRecord> {
  const record = await findTemplate(config.templateDir, idOrAlias);
  if (!record) throw templateNotFound(idOrAlias);
  return record;
}

/** The error for a template id or alias that no built template has. */
export function templateNotFound(idOrAlias: string): CubicleError {
  return new CubicleError("not_found", `template '${idOrAlias}' not found; create it first or use one of ${[...recipes.keys()].join(", ")}`);
}
