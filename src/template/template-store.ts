import fs from "node:fs/promises";
import path from "node:path";
import type { TemplateRecord, TemplateRecordStore } from "../store/types.js";
import type { TemplateImage } from "../runtime/types.js";
import { createLogger } from "../shared/log.js";

export type { TemplateRecord, TemplateRecordStore } from "../store/types.js";

const log = createLogger("template");

/**
 * What a recipe's tree in the template cache was built from (`<templateDir>/<id>/tree.json`,
 * next to `rootfs/`): the cache key of the tree, not the template's record, which is in the
 * store (TEMPLATE_RECORDS_NOTE). Several servers with their own stores may share one cache.
 */
export interface TreeStamp {
  recipeHash: string;
  /** ISO 8601. */
  builtAt: string;
  /** Disk space the rootfs takes (allocated blocks). */
  sizeBytes: number;
}

export const TREE_FILE = "tree.json";
/** What earlier versions kept beside the tree: the whole record, the stamp's fields among them. */
const LEGACY_RECORD_FILE = "template.json";
export const ROOTFS_DIR = "rootfs";
/** Prefix of directories a build works in; never listed, removed by the next build. */
export const BUILD_DIR_PREFIX = ".build-";
/** Prefix of replaced templates waiting to be removed. */
export const RETIRED_DIR_PREFIX = ".old-";

export function templatePath(templateDir: string, templateId: string): string {
  return path.join(templateDir, templateId);
}

/** What is on disk for one recipe's tree in the template cache. */
export interface TreeState {
  stamp: TreeStamp | undefined;
  rootfsPresent: boolean;
}

export async function inspectTree(dir: string): Promise<TreeState> {
  const stamp = (await readStamp(path.join(dir, TREE_FILE))) ?? (await readStamp(path.join(dir, LEGACY_RECORD_FILE)));
  const rootfsPresent = await isDirectory(path.join(dir, ROOTFS_DIR));
  return { stamp, rootfsPresent };
}

export type CacheDecision = "ready" | "missing" | "incomplete" | "stale";

/**
 * Whether a cached tree can be used as it is. `incomplete` (stamp or rootfs missing) cannot
 * come from a build of ours, which renames a finished directory into place, but from a
 * hand-made or half-deleted one; it is rebuilt like `stale`.
 */
export function cacheDecision(state: TreeState, expectedRecipeHash: string): CacheDecision {
  if (!state.stamp && !state.rootfsPresent) return "missing";
  if (!state.stamp || !state.rootfsPresent) return "incomplete";
  return state.stamp.recipeHash === expectedRecipeHash ? "ready" : "stale";
}

async function readStamp(file: string): Promise<TreeStamp | undefined> {
  let parsed: Partial<TreeStamp>;
  try {
    parsed = JSON.parse(await fs.readFile(file, "utf8")) as Partial<TreeStamp>;
  } catch {
    return undefined;
  }
  if (typeof parsed !== "object" || parsed === null || typeof parsed.recipeHash !== "string") return undefined;
  return { recipeHash: parsed.recipeHash, builtAt: typeof parsed.builtAt === "string" ? parsed.builtAt : "", sizeBytes: typeof parsed.sizeBytes === "number" ? parsed.sizeBytes : 0 };
}

export async function writeStamp(dir: string, stamp: TreeStamp): Promise<void> {
  const file = path.join(dir, TREE_FILE);
  await fs.writeFile(`${file}.tmp`, JSON.stringify(stamp, null, 2) + "\n", { mode: 0o644 });
  await fs.rename(`${file}.tmp`, file);
}

export async function isDirectory(dir: string): Promise<boolean> {
  return fs.stat(dir).then((s) => s.isDirectory(), () => false);
}

/** The one of `records` whose id is `idOrAlias`, else the first with it as an alias. */
export function pickTemplate(records: readonly TemplateRecord[], idOrAlias: string): TemplateRecord | undefined {
  return records.find((t) => t.templateId === idOrAlias) ?? records.find((t) => t.aliases.includes(idOrAlias));
}

/**
 * Earlier versions kept each built or imported template's record as `<dir>/<id>/template.json`
 * (`dir`: the state directory's `built-templates`). Each becomes a record in the store and its
 * directory goes; a record the store already has wins. Run once at start, before anything
 * reads the templates.
 */
export async function adoptLegacyRecords(dir: string, records: TemplateRecordStore): Promise<number> {
  let names: string[];
  try {
    names = await fs.readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return 0;
    throw err;
  }
  let adopted = 0;
  for (const name of names) {
    const entry = path.join(dir, name);
    if (!name.startsWith(".")) {
      const legacy = await readLegacyRecord(path.join(entry, LEGACY_RECORD_FILE));
      if (legacy && !(await records.getTemplate(legacy.templateId))) {
        await records.putTemplate(legacy);
        adopted++;
        log.info("template record moved into the store", { templateId: legacy.templateId });
      }
    }
    await fs.rm(entry, { recursive: true, force: true });
  }
  await fs.rmdir(dir).catch(() => undefined);
  return adopted;
}

async function readLegacyRecord(file: string): Promise<TemplateRecord | undefined> {
  let value: Partial<TemplateRecord> & { baseRootfsDir?: string };
  try {
    value = JSON.parse(await fs.readFile(file, "utf8")) as typeof value;
  } catch {
    return undefined;
  }
  if (typeof value !== "object" || value === null || value.source !== "build" || typeof value.templateId !== "string" || typeof value.baseRootfsDir !== "string") return undefined;
  if (!Array.isArray(value.aliases) || typeof value.recipeHash !== "string" || typeof value.defaultUser !== "string" || typeof value.defaultWorkdir !== "string" || typeof value.env !== "object") return undefined;
  const { baseRootfsDir, ...rest } = value;
  return { ...(rest as TemplateRecord), rootfsDir: baseRootfsDir };
}

/** The facts a runtime needs to start a sandbox from this template. */
export function templateImage(record: TemplateRecord): TemplateImage {
  return {
    templateId: record.templateId,
    rootfsDir: record.rootfsDir,
    ...(record.layerImageId ? { layerImageId: record.layerImageId } : {}),
    defaultUser: record.defaultUser,
    defaultWorkdir: record.defaultWorkdir,
    env: { ...record.env },
  };
}
