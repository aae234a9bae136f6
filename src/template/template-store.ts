import type { BigIntStats } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import type { TemplateImage } from "../runtime/types.js";
import type { Recipe } from "./recipe.js";

/** What `template.json` holds, next to the template's `rootfs/`: the recipe's sandbox defaults and build facts. */
export interface TemplateMetadata
  extends Pick<Recipe, "templateId" | "aliases" | "defaultUser" | "defaultWorkdir" | "env" | "cpuCount" | "memoryMB" | "diskSizeMB"> {
  runtime: "container";
  /** Hash of the recipe the tree was built from; a different hash means rebuild. */
  recipeHash: string;
  /** ISO 8601. */
  builtAt: string;
  /** Disk space the rootfs takes (allocated blocks). */
  sizeBytes: number;
  /**
   * How the template was made: a built-in recipe (its rootfs in its own directory; the
   * default) or a build through the template-build API (its files a layer image on the rootfs
   * of the template or image it was built from).
   */
  source?: "recipe" | "build";
  /** Build templates: the rootfs they stand on, another template's or a pulled image's. */
  baseRootfsDir?: string;
  /** Build templates: the image (kind `layer`) holding what the build's steps changed. */
  layerImageId?: string;
  /** Started in every sandbox of the template (in its warm snapshot, already running). */
  startCmd?: string;
  /** Run until it succeeds after startCmd; the template's sandboxes are ready then. */
  readyCmd?: string;
  /** The build that made the current files. */
  buildId?: string;
  /** Tag → build id (E2B's template tags; `default` is the latest build). */
  tags?: Record<string, string>;
  /** The team's own id of the template; builds never replace another team's template. */
  public?: boolean;
}

/** A built template on disk. */
export interface TemplateRecord extends TemplateMetadata {
  /** `<templateDir>/<templateId>`. */
  dir: string;
  /** `<dir>/rootfs`, owned by the sandbox uid range. */
  rootfsDir: string;
}

export const METADATA_FILE = "template.json";
export const ROOTFS_DIR = "rootfs";
/** Prefix of directories a build works in; never listed, removed by the next build. */
export const BUILD_DIR_PREFIX = ".build-";
/** Prefix of replaced templates waiting to be removed. */
export const RETIRED_DIR_PREFIX = ".old-";

export function templatePath(templateDir: string, templateId: string): string {
  return path.join(templateDir, templateId);
}

/** What is on disk for one template directory. */
export interface TemplateDirState {
  metadata: TemplateMetadata | undefined;
  rootfsPresent: boolean;
}

export async function inspectTemplateDir(dir: string): Promise<TemplateDirState> {
  const metadata = await readMetadata(dir);
  const rootfsPresent = await fs.stat(rootfsOf(dir, metadata)).then((s) => s.isDirectory(), () => false);
  return { metadata, rootfsPresent };
}

export type CacheDecision = "ready" | "missing" | "incomplete" | "stale";

/**
 * Whether a cached template can be used as it is. `incomplete` (metadata or rootfs missing)
 * cannot come from a build of ours, which renames a finished directory into place, but from a
 * hand-made or half-deleted one; it is rebuilt like `stale`.
 */
export function cacheDecision(state: TemplateDirState, expectedRecipeHash: string): CacheDecision {
  if (!state.metadata && !state.rootfsPresent) return "missing";
  if (!state.metadata || !state.rootfsPresent) return "incomplete";
  return state.metadata.recipeHash === expectedRecipeHash ? "ready" : "stale";
}

export async function readMetadata(dir: string): Promise<TemplateMetadata | undefined> {
  let text: string;
  try {
    text = await fs.readFile(path.join(dir, METADATA_FILE), "utf8");
  } catch {
    return undefined;
  }
  try {
    const parsed = JSON.parse(text) as Partial<TemplateMetadata>;
    return isMetadata(parsed) ? parsed : undefined;
  } catch {
    return undefined;
  }
}

function isMetadata(value: Partial<TemplateMetadata>): value is TemplateMetadata {
  return (
    typeof value === "object" &&
    value !== null &&
    typeof value.templateId === "string" &&
    Array.isArray(value.aliases) &&
    typeof value.recipeHash === "string" &&
    typeof value.defaultUser === "string" &&
    typeof value.defaultWorkdir === "string" &&
    typeof value.env === "object"
  );
}

export async function writeMetadata(dir: string, metadata: TemplateMetadata): Promise<void> {
  const file = path.join(dir, METADATA_FILE);
  await fs.writeFile(`${file}.tmp`, JSON.stringify(metadata, null, 2) + "\n", { mode: 0o644 });
  await fs.rename(`${file}.tmp`, file);
}

export function toRecord(dir: string, metadata: TemplateMetadata): TemplateRecord {
  return { ...metadata, dir, rootfsDir: rootfsOf(dir, metadata) };
}

/** A recipe template's own rootfs, or the base a build template stands on. */
function rootfsOf(dir: string, metadata: TemplateMetadata | undefined): string {
  return metadata?.source === "build" && metadata.baseRootfsDir ? metadata.baseRootfsDir : path.join(dir, ROOTFS_DIR);
}

/** Every complete template under `templateDir`, sorted by id. */
export async function listTemplates(templateDir: string): Promise<TemplateRecord[]> {
  let names: string[];
  try {
    names = await fs.readdir(templateDir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw err;
  }
  const records: TemplateRecord[] = [];
  for (const name of names.sort()) {
    if (name.startsWith(".")) continue;
    const dir = path.join(templateDir, name);
    const state = await inspectTemplateDir(dir);
    if (state.metadata && state.rootfsPresent) records.push(toRecord(dir, state.metadata));
  }
  return records;
}

/** The built template whose id or one of whose aliases is `idOrAlias`. */
export async function findTemplate(templateDir: string, idOrAlias: string): Promise<TemplateRecord | undefined> {
  return pickTemplate(await listTemplates(templateDir), idOrAlias);
}

/** The one of `records` whose id is `idOrAlias`, else the first with it as an alias. */
export function pickTemplate(records: readonly TemplateRecord[], idOrAlias: string): TemplateRecord | undefined {
  return records.find((t) => t.templateId === idOrAlias) ?? records.find((t) => t.aliases.includes(idOrAlias));
}

/**
 * How long after a change of the template directory its mtime is not trusted: a second change
 * in the same tick of the kernel's coarse clock (a jiffy; 1–2 s on some file systems) leaves
 * it as it is. Git's index treats such "racy" entries the same way.
 */
const RACY_CHANGE_MS = 2_000;

/**
 * A value that changes whenever a template is added, replaced or removed, from one `stat`: a
 * build renames its finished directory into `templateDir` (and the old one out), a removal
 * unlinks one, and both change the directory's mtime. Undefined while the last change is too
 * recent to tell from a next one (see RACY_CHANGE_MS): the caller must read again. Edits made
 * by hand inside a template's own directory do not change it.
 */
export async function templatesVersion(templateDir: string): Promise<string | undefined> {
  let stats: BigIntStats;
  try {
    stats = await fs.stat(templateDir, { bigint: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return "absent";
    throw err;
  }
  if (Date.now() - Number(stats.mtimeMs) < RACY_CHANGE_MS) return undefined;
  return `${stats.ino}:${stats.mtimeNs}`;
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
