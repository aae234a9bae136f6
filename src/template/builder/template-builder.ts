import { createHash, createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { createWriteStream } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import { pipeline } from "node:stream/promises";
import type { Readable } from "node:stream";
import type { TemplateInfo } from "../../core/types.js";
import { runInSandbox, uploadToSandbox } from "../../protocol/agent-exec.js";
import { imageId } from "../../runtime/images.js";
import { CubicleError } from "../../shared/cubicle-error.js";
import { createLogger } from "../../shared/log.js";
import type { BuildLogEntry, TemplateBuildRecord, TemplateBuildStore, TemplateRecord, TemplateRecordStore } from "../../store/types.js";
import { shellArgv } from "../../core/template-start.js";
import { ecrRegistryCredentials } from "../oci/cloud-registries.js";
import { baseKey, parseBuildSpec, parseTag, parseTemplateName, specWithoutCredentials, stepKey, type BuildSpec, type BuildStep } from "./build-spec.js";

/** Where builds and the templates they make are kept: the server's store. */
type TemplateStores = TemplateBuildStore & TemplateRecordStore;

const log = createLogger("template-build");

/** What the builder needs of the core (SandboxManager.builds). */
export interface BuildSandboxes {
  start(template: TemplateInfo, options: { allowInternetAccess: boolean }): Promise<{ runtimeId: string; address: string }>;
  commit(runtimeId: string, name: string): Promise<string>;
  destroy(runtimeId: string): Promise<void>;
  imageExists(id: string): Promise<boolean>;
  removeImage(id: string): Promise<void>;
  warm(template: TemplateInfo): Promise<void>;
  /** Removes the template's warm snapshots. */
  removeWarm(templateId: string): Promise<void>;
  inUse(templateId: string): Promise<boolean>;
}

/** What the builder needs of the template catalog. */
export interface BuildCatalog {
  resolve(idOrAlias: string): Promise<TemplateInfo | undefined>;
  /** What decides whether something made from the template is current (recipe hash, build key). */
  fingerprint(template: TemplateInfo): Promise<string>;
  /** Drops what the catalog read from disk: a build changed it. */
  invalidate(): void;
  /** Built-in templates (recipes) by id or alias: never replaced or deleted by the API. */
  isBuiltIn(idOrAlias: string): boolean;
}

/** A base image made into a rootfs (OCI pulls; see src/template/oci). */
export interface PulledBase {
  rootfsDir: string;
  /** The image's digest: what the base's cache key hashes. */
  digest: string;
  env: Record<string, string>;
  user?: string;
  workdir?: string;
  startCmd?: string;
}

export interface TemplateBuilderOptions {
  /** Where uploaded COPY archives are kept, by the SDK's files hash. */
  filesDir: string;
  /** Builds and the templates they make (TEMPLATE_RECORDS_NOTE). */
  store: TemplateStores;
  catalog: BuildCatalog;
  sandboxes: BuildSandboxes;
  /** Signs upload links (a random key of the server's). */
  uploadKey: Buffer;
  /** Turns an image reference into a rootfs; absent = only Cubicle's own base images resolve. */
  pullImage?: (reference: string, credentials: { username: string; password: string } | undefined, onLog: (message: string) => void, signal: AbortSignal) => Promise<PulledBase>;
  /** The ECR API endpoint for `fromAWSRegistry` builds (CUBICLE_ECR_ENDPOINT); default the region's. */
  ecrEndpoint?: string;
  /** Largest COPY archive accepted (bytes). Default 4 GiB. */
  maxUploadBytes?: number;
  /** Whether build sandboxes reach the internet. Default true. */
  buildInternet?: boolean;
  /** Longest a step may run. Default 30 min. */
  stepTimeoutMs?: number;
}

/** E2B's `TemplateBuildInfo`. */
export interface BuildStatusView {
  templateID: string;
  buildID: string;
  status: TemplateBuildRecord["status"];
  logEntries: BuildLogEntry[];
  logs: string[];
  reason?: { message: string; step?: string; logEntries: BuildLogEntry[] };
}

/**
 * E2B base images the SDK's `fromBaseImage()` and templates name, served by Cubicle's own
 * Debian-built templates when no registry serves them (so the SDK's examples work offline).
 */
const BUILT_IN_IMAGES: Array<[RegExp, string]> = [
  [/^(docker\.io\/)?e2bdev\/base(:[\w.-]+)?$/, "base"],
  [/^(docker\.io\/)?e2bdev\/code-interpreter(:[\w.-]+)?$/, "code-interpreter-v1"],
];

/**
 * Docker Hub's official images the SDK's `from…Image()` helpers name, and the built-in template
 * that stands in for each when no registry serves it (this host reaches none, or only a mirror
 * without it): Debian 12 with python3, git and curl is the nearest Cubicle has to debian, ubuntu
 * and python images. Tried only after the pull failed for want of a registry, and logged.
 */
const OFFLINE_EQUIVALENTS: Array<[RegExp, string]> = [[/^(docker\.io\/)?(library\/)?(debian|ubuntu|python)(:[\w.-]+)?$/, "base"]];

const LEVELS = ["debug", "info", "warn", "error"] as const;
const MAX_LOG_ENTRIES = 20_000;
const PERSIST_EVERY_MS = 1_000;
const STEP_TIMEOUT_MS = 30 * 60_000;
const COPY_ARCHIVE_PATH = "/tmp/.cubicle-copy.tar";

/**
 * COPY inside the build sandbox, as root: unpack the SDK's archive (paths relative to the build
 * context, gzip or not) into a temporary directory, then copy what `src` (a path or a glob)
 * matches: a directory's contents into `dest`, a file into `dest` (into it when `dest` ends with
 * `/` or is a directory), owned by the step's user (a `dest` directory it makes too), with the
 * step's mode when given.
 */
const COPY_SCRIPT = `set -eu
src=$1 dest=$2 owner=$3 mode=$4 archive=$5
work=$(mktemp -d)
trap 'rm -rf "$work" "$archive"' EXIT
tar -xf "$archive" -C "$work" --no-same-owner
cd "$work"
set +f
found=0
for match in $src; do
  [ -e "$match" ] || [ -L "$match" ] || continue
  found=1
  if [ -d "$match" ] && [ ! -L "$match" ]; then
    if [ ! -d "$dest" ]; then mkdir -p "$dest"; chown "$owner" "$dest"; fi
    for entry in "$match"/* "$match"/.[!.]* "$match"/..?*; do
      [ -e "$entry" ] || [ -L "$entry" ] || continue
      target="$dest/$(basename "$entry")"
      rm -rf "$target"
      cp -a "$entry" "$target"
      chown -hR "$owner" "$target"
      if [ -n "$mode" ]; then find "$target" -type f -exec chmod "$mode" {} +; fi
    done
  else
    case "$dest" in
      */) mkdir -p "$dest"; target="$dest$(basename "$match")" ;;
      *) if [ -d "$dest" ]; then target="$dest/$(basename "$match")"; else mkdir -p "$(dirname "$dest")"; target=$dest; fi ;;
    esac
    rm -rf "$target"
    cp -a "$match" "$target"
    chown -h "$owner" "$target"
    if [ -n "$mode" ] && [ ! -L "$target" ]; then chmod "$mode" "$target"; fi
  fi
done
[ "$found" = 1 ] || { echo "nothing in the uploaded files matches $src" >&2; exit 1; }
`;

/** WORKDIR: the directory is made (owned by the step's user) when it does not exist. */
const WORKDIR_SCRIPT = `set -eu
[ -d "$1" ] || { mkdir -p "$1"; chown "$2" "$1"; }
`;

class StepFailure extends Error {
  constructor(
    message: string,
    readonly step: string,
  ) {
    super(message);
  }
}

interface RunningBuild {
  controller: AbortController;
  done: Promise<void>;
  /** The record as the build updates it (the store's copy is written at most once a second). */
  record: TemplateBuildRecord;
}

/** The state a build carries from step to step. */
interface StepState {
  user: string;
  workdir: string;
  env: Record<string, string>;
}

/**
 * TEMPLATE_BUILD_NOTE: E2B's template-build API (`Template.build` in the SDKs; wire protocol
 * §3.11). `POST /v3/templates` names the template (a new id, or the existing template of that
 * name) and records a `waiting` build; COPY archives are uploaded to signed links; `POST
 * /v2/templates/{id}/builds/{buildId}` starts the build, which runs in the background, one at a
 * time on this host: its base resolved (another template, Cubicle's own image for E2B's base
 * images, or an OCI image), each step found in the layer cache (BUILD_CACHE_NOTE) or run in a
 * build sandbox (BUILD_AGENT_NOTE), whose files after each step that changes them become that
 * step's layer image. The finished template is a directory in the template directory holding
 * only template.json: its base's rootfs, its layer image, its user, workdir, env and start
 * command; sandboxes of it start from a copy-on-write snapshot of the layer. A template with a
 * start command gets its warm snapshot (TEMPLATE_START_NOTE) before the build is ready. Build
 * records and logs are in the store; a build that a restart cut off is failed, never left
 * "building".
 */
export class TemplateBuilder {
  private readonly running = new Map<string, RunningBuild>();
  /** Builds run one at a time: each build sandbox wants the host's CPUs. */
  private queue: Promise<void> = Promise.resolve();
  private closed = false;

  constructor(private readonly options: TemplateBuilderOptions) {}

  /** Fails builds that an earlier process left waiting or building. */
  async recover(): Promise<void> {
    for (const build of await this.options.store.unfinishedTemplateBuilds()) {
      if (build.status === "waiting") continue;
      build.status = "error";
      build.reason = { message: "the server restarted while the template was building; build it again" };
      build.finishedAt = Date.now();
      await this.options.store.putTemplateBuild(build);
      log.warn("failed a build cut off by a restart", { templateId: build.templateId, buildId: build.buildId });
    }
  }

  /** Cancels running builds and waits for them to end. */
  async close(): Promise<void> {
    this.closed = true;
    for (const build of this.running.values()) build.controller.abort();
    await Promise.allSettled([...this.running.values()].map((build) => build.done));
  }

  /** `POST /v3/templates` (and the older `POST /v2/templates`): a template id and a waiting build. */
  async requestBuild(body: unknown): Promise<{ templateID: string; buildID: string; public: boolean; names: string[]; tags: string[]; aliases: string[] }> {
    if (typeof body !== "object" || body === null || Array.isArray(body)) throw new CubicleError("invalid_argument", "the request must be a JSON object");
    const raw = body as Record<string, unknown>;
    const { name, tag } = parseTemplateName(raw.name ?? raw.alias);
    const extraTags = raw.tags === undefined || raw.tags === null ? [] : raw.tags;
    if (!Array.isArray(extraTags) || extraTags.length > 32) throw new CubicleError("invalid_argument", "tags must be an array of at most 32 tags");
    const tags = [...new Set([tag ?? "default", ...extraTags.map(parseTag)])];
    const cpuCount = optionalInt(raw.cpuCount, "cpuCount", 1, 64);
    const memoryMB = optionalInt(raw.memoryMB, "memoryMB", 128, 65_536);
    if (this.options.catalog.isBuiltIn(name)) throw new CubicleError("already_exists", `"${name}" is one of Cubicle's built-in templates; choose another name`);
    const existing = await this.findBuildTemplate(name);
    const templateId = existing?.templateId ?? (await this.pendingTemplateId(name)) ?? newTemplateId();
    const record: TemplateBuildRecord = {
      buildId: randomUuid(),
      templateId,
      status: "waiting",
      cpuCount: cpuCount ?? existing?.cpuCount ?? 2,
      memoryMB: memoryMB ?? existing?.memoryMB ?? 1024,
      logs: [],
      createdAt: Date.now(),
      names: [name],
      tags,
    };
    await this.options.store.putTemplateBuild(record);
    return { templateID: templateId, buildID: record.buildId, public: false, names: [name], tags, aliases: [name] };
  }

  /** `GET /templates/{id}/files/{hash}`: whether the archive is here already, else where to PUT it. */
  async fileLink(templateId: string, hash: string, baseUrl: string): Promise<{ present: boolean; url?: string }> {
    checkFilesHash(hash);
    await this.buildsOf(templateId);
    if (await fileExists(this.archivePath(hash))) return { present: true, url: this.uploadUrl(baseUrl, hash) };
    return { present: false, url: this.uploadUrl(baseUrl, hash) };
  }

  /** The PUT of a signed upload link: the archive, streamed to a file, at most maxUploadBytes. */
  async acceptUpload(hash: string, token: string, body: Readable, declaredLength: number | undefined): Promise<void> {
    // The token first: a caller without a valid link learns nothing, not even what a hash looks like.
    const expected = this.uploadToken(hash);
    const given = Buffer.from(String(token));
    if (given.length !== expected.length || !timingSafeEqual(given, expected)) throw new CubicleError("permission_denied", "the upload link is not valid");
    checkFilesHash(hash);
    const limit = this.options.maxUploadBytes ?? 4 * 1024 ** 3;
    if (declaredLength !== undefined && declaredLength > limit) throw new CubicleError("invalid_argument", `the archive is larger than the limit of ${limit} bytes`);
    await fs.mkdir(this.options.filesDir, { recursive: true, mode: 0o700 });
    const partial = path.join(this.options.filesDir, `.partial-${hash}-${randomBytes(4).toString("hex")}`);
    let received = 0;
    try {
      body.on("data", (chunk: Buffer) => {
        received += chunk.length;
        if (received > limit) body.destroy(new CubicleError("invalid_argument", `the archive is larger than the limit of ${limit} bytes`));
      });
      await pipeline(body, createWriteStream(partial, { mode: 0o600 }));
      await fs.rename(partial, this.archivePath(hash));
    } catch (err) {
      await fs.rm(partial, { force: true });
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOSPC" || code === "EDQUOT") throw new CubicleError("insufficient_storage", "no space left for the uploaded files");
      throw CubicleError.from(err);
    }
  }

  /** `POST /v2/templates/{id}/builds/{buildId}`: validates the steps and starts the build. */
  async startBuild(templateId: string, buildId: string, body: unknown): Promise<void> {
    if (this.closed) throw new CubicleError("unavailable", "the server is shutting down");
    const build = await this.buildOf(templateId, buildId);
    if (build.status !== "waiting") throw new CubicleError("conflict", `build ${buildId} was started already (${build.status})`);
    const spec = parseBuildSpec(body);
    for (const [index, step] of spec.steps.entries()) {
      if (step.type === "COPY" && !(await fileExists(this.archivePath(step.filesHash)))) {
        throw new CubicleError("failed_precondition", `the files of step ${index + 1} (COPY ${step.src}) were not uploaded; upload them to the link GET /templates/${templateId}/files/${step.filesHash} gives`);
      }
    }
    build.status = "building";
    build.spec = specWithoutCredentials(spec);
    await this.options.store.putTemplateBuild(build);
    const controller = new AbortController();
    const done = (this.queue = this.queue.then(() => this.runBuild(build, spec, controller.signal)).finally(() => this.running.delete(buildId)));
    this.running.set(buildId, { controller, done, record: build });
  }

  /** Cancels a waiting or running build. */
  async cancel(templateId: string, buildId: string): Promise<void> {
    const build = await this.buildOf(templateId, buildId);
    const running = this.running.get(buildId);
    if (running) {
      running.controller.abort();
      await running.done.catch(() => undefined);
      return;
    }
    if (build.status === "waiting") {
      build.status = "error";
      build.reason = { message: "the build was cancelled" };
      build.finishedAt = Date.now();
      await this.options.store.putTemplateBuild(build);
    }
  }

  /** `GET /templates/{id}/builds/{buildId}/status`. */
  async status(templateId: string, buildId: string, query: { logsOffset?: number; limit?: number; level?: string }): Promise<BuildStatusView> {
    const live = this.running.get(buildId)?.record;
    const build = live && live.templateId === templateId ? live : await this.buildOf(templateId, buildId);
    const minLevel = query.level === undefined ? 0 : LEVELS.indexOf(query.level as (typeof LEVELS)[number]);
    if (minLevel < 0) throw new CubicleError("invalid_argument", `level must be one of ${LEVELS.join(", ")}`);
    const entries = build.logs.filter((entry) => LEVELS.indexOf(entry.level) >= minLevel);
    const offset = query.logsOffset ?? 0;
    const page = entries.slice(offset, query.limit === undefined ? undefined : offset + query.limit);
    const view: BuildStatusView = { templateID: build.templateId, buildID: build.buildId, status: build.status, logEntries: page, logs: page.map(formatLogLine) };
    if (build.reason) view.reason = { ...build.reason, logEntries: build.logs.filter((entry) => entry.level === "error").slice(-20) };
    return view;
  }

  /** Cubicle extension `GET /templates/{id}/builds`: a template's builds, newest first. */
  async listBuilds(idOrName: string): Promise<Array<{ buildID: string; status: string; createdAt: string; finishedAt?: string; reason?: { message: string; step?: string } }>> {
    const templateId = (await this.findBuildTemplate(idOrName))?.templateId ?? (await this.pendingTemplateId(idOrName)) ?? idOrName;
    const builds = await this.options.store.listTemplateBuilds(templateId);
    if (builds.length === 0) throw new CubicleError("not_found", `template ${idOrName} has no builds`);
    return builds.map((build) => ({
      buildID: build.buildId,
      status: build.status,
      createdAt: new Date(build.createdAt).toISOString(),
      ...(build.finishedAt ? { finishedAt: new Date(build.finishedAt).toISOString() } : {}),
      ...(build.reason ? { reason: build.reason } : {}),
    }));
  }

  /** `GET /templates/aliases/{alias}`. */
  async alias(name: string): Promise<{ templateID: string; public: boolean } | undefined> {
    const template = await this.findBuildTemplate(name);
    if (template) return { templateID: template.templateId, public: false };
    const info = await this.options.catalog.resolve(name);
    return info ? { templateID: info.templateId, public: true } : undefined;
  }

  /** `GET /templates/{id}/tags`. */
  async listTags(idOrName: string): Promise<Array<{ tag: string; buildID: string; createdAt: string }>> {
    const template = await this.requireBuildTemplate(idOrName);
    const builds = await this.options.store.listTemplateBuilds(template.templateId);
    return Object.entries(template.tags ?? {}).map(([tag, buildId]) => ({
      tag,
      buildID: buildId,
      createdAt: new Date(builds.find((build) => build.buildId === buildId)?.finishedAt ?? Date.parse(template.builtAt)).toISOString(),
    }));
  }

  /**
   * `POST /templates/tags` `{target: "name:tag", tags}`: the tags point at the target's build.
   * Only the current build's files are kept, so a tag can name only a template's current build.
   */
  async assignTags(target: unknown, tags: unknown): Promise<{ tags: string[]; buildID: string }> {
    const { name, tag } = parseTemplateName(target);
    if (!Array.isArray(tags) || tags.length === 0 || tags.length > 32) throw new CubicleError("invalid_argument", "tags must be an array of 1–32 tags");
    const newTags = tags.map(parseTag);
    return this.rewriteTemplate(name, (metadata) => {
      const buildId = metadata.tags?.[tag ?? "default"];
      if (!buildId) throw new CubicleError("not_found", `template ${name} has no tag ${tag ?? "default"}`);
      if (buildId !== metadata.buildId) throw new CubicleError("failed_precondition", `tag ${tag} names an older build of ${name}, whose files are not kept`);
      for (const newTag of newTags) (metadata.tags ??= {})[newTag] = buildId;
      return { tags: newTags, buildID: buildId };
    });
  }

  /** `DELETE /templates/tags` `{name, tags}`. */
  async removeTags(nameValue: unknown, tags: unknown): Promise<void> {
    const { name } = parseTemplateName(nameValue);
    if (!Array.isArray(tags) || tags.length === 0) throw new CubicleError("invalid_argument", "tags must be an array of tags");
    const gone = tags.map(parseTag);
    await this.rewriteTemplate(name, (metadata) => {
      for (const tag of gone) {
        if (!metadata.tags?.[tag]) throw new CubicleError("not_found", `template ${name} has no tag ${tag}`);
        delete metadata.tags[tag];
      }
    });
  }

  /**
   * `DELETE /templates/{id}` of a built template: refused (409) while a sandbox made from it
   * exists (a paused one included) or a build of it runs. Undefined when `idOrName` is not a
   * built template (the caller tries snapshots).
   */
  async deleteTemplate(idOrName: string): Promise<boolean | undefined> {
    if (this.options.catalog.isBuiltIn(idOrName)) throw new CubicleError("permission_denied", `"${idOrName}" is one of Cubicle's built-in templates and cannot be deleted`);
    const template = await this.findBuildTemplate(idOrName);
    if (!template) return undefined;
    if ([...this.running.keys()].length > 0 && (await this.options.store.listTemplateBuilds(template.templateId)).some((build) => this.running.has(build.buildId))) {
      throw new CubicleError("conflict", `template ${idOrName} is building; cancel the build first`);
    }
    if (await this.options.sandboxes.inUse(template.templateId)) {
      throw new CubicleError("conflict", `template ${idOrName} is used by a sandbox; kill its sandboxes first`);
    }
    await this.options.store.deleteTemplate(template.templateId);
    this.options.catalog.invalidate();
    await this.removeImagesOf(template);
    await this.options.store.deleteTemplateBuilds(template.templateId);
    log.info("template deleted", { templateId: template.templateId });
    return true;
  }

  /**
   * The images of a deleted template: its warm snapshots, and the layer images its builds made
   * (cache entries of their steps) that no other template stands on. Sandboxes made from it
   * keep their own copies; layers other builds made and this one only used stay.
   */
  private async removeImagesOf(template: TemplateRecord): Promise<void> {
    const { sandboxes } = this.options;
    const inUse = new Set<string>();
    for (const other of await this.options.store.listTemplates()) if (other.layerImageId) inUse.add(other.layerImageId);
    const made = new Set((await this.options.store.listTemplateBuilds(template.templateId)).flatMap((build) => build.layers ?? []));
    if (template.layerImageId) made.add(template.layerImageId);
    for (const image of made) {
      if (inUse.has(image)) continue;
      await sandboxes.removeImage(image).catch((err) => log.warn("a deleted template's layer image could not be removed", { image, error: String(err) }));
    }
    await sandboxes.removeWarm(template.templateId).catch((err) => log.warn("a deleted template's warm snapshot could not be removed", { templateId: template.templateId, error: String(err) }));
  }

  /** Build templates by id or name (its aliases). */
  private async findBuildTemplate(idOrName: string): Promise<TemplateRecord | undefined> {
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/.test(idOrName)) return undefined;
    const direct = await this.options.store.getTemplate(idOrName);
    if (direct?.source === "build") return direct;
    const info = await this.options.catalog.resolve(idOrName);
    if (!info) return undefined;
    const record = await this.options.store.getTemplate(info.templateId);
    return record?.source === "build" ? record : undefined;
  }

  private async requireBuildTemplate(idOrName: string): Promise<TemplateRecord> {
    const template = await this.findBuildTemplate(idOrName);
    if (!template) throw new CubicleError("not_found", `template ${idOrName} not found (tags are kept for built templates)`);
    return template;
  }

  /** The id a waiting or running first build of `name` reserved. */
  private async pendingTemplateId(name: string): Promise<string | undefined> {
    for (const build of await this.options.store.unfinishedTemplateBuilds()) {
      if (build.names?.includes(name)) return build.templateId;
    }
    return undefined;
  }

  private async buildsOf(templateId: string): Promise<TemplateBuildRecord[]> {
    const builds = await this.options.store.listTemplateBuilds(templateId);
    if (builds.length === 0) throw new CubicleError("not_found", `template ${templateId} not found`);
    return builds;
  }

  private async buildOf(templateId: string, buildId: string): Promise<TemplateBuildRecord> {
    const build = await this.options.store.getTemplateBuild(buildId);
    if (!build || build.templateId !== templateId) throw new CubicleError("not_found", `build ${buildId} of template ${templateId} not found`);
    return build;
  }

  private async rewriteTemplate<T>(name: string, change: (record: TemplateRecord) => T): Promise<T> {
    const template = await this.requireBuildTemplate(name);
    const result = change(template);
    await this.options.store.putTemplate(template);
    this.options.catalog.invalidate();
    return result;
  }

  private archivePath(hash: string): string {
    return path.join(this.options.filesDir, `${hash}.tar`);
  }

  private uploadToken(hash: string): Buffer {
    return Buffer.from(createHmac("sha256", this.options.uploadKey).update(`files:${hash}`).digest("hex"));
  }

  private uploadUrl(baseUrl: string, hash: string): string {
    return `${baseUrl}/template-files/${hash}?token=${this.uploadToken(hash).toString()}`;
  }

  private async runBuild(build: TemplateBuildRecord, spec: BuildSpec, signal: AbortSignal): Promise<void> {
    const started = performance.now();
    let lastPersist = 0;
    const persist = async (force: boolean) => {
      if (!force && Date.now() - lastPersist < PERSIST_EVERY_MS) return;
      lastPersist = Date.now();
      await this.options.store.putTemplateBuild(build);
    };
    const addLog = (level: BuildLogEntry["level"], message: string, step?: string) => {
      if (build.logs.length >= MAX_LOG_ENTRIES) return;
      build.logs.push({ timestamp: new Date().toISOString(), level, message: message.length > 4096 ? `${message.slice(0, 4096)}…` : message, ...(step ? { step } : {}) });
      if (build.logs.length === MAX_LOG_ENTRIES) build.logs.push({ timestamp: new Date().toISOString(), level: "warn", message: `the log is longer than ${MAX_LOG_ENTRIES} lines; the rest is left out` });
      void persist(false).catch(() => undefined);
    };
    try {
      if (this.closed) throw new CubicleError("unavailable", "the server is shutting down");
      await this.build(build, spec, signal, addLog);
      build.status = "ready";
      addLog("info", `Template ${build.templateId} is ready (${((performance.now() - started) / 1000).toFixed(1)} s)`, "finalize");
      log.info("template built", { templateId: build.templateId, buildId: build.buildId, ms: Math.round(performance.now() - started) });
    } catch (err) {
      const step = err instanceof StepFailure ? err.step : undefined;
      const message = signal.aborted ? "the build was cancelled" : CubicleError.from(err).message;
      build.status = "error";
      build.reason = { message, ...(step ? { step } : {}) };
      addLog("error", message, step);
      log.warn("template build failed", { templateId: build.templateId, buildId: build.buildId, step, error: message });
    } finally {
      build.finishedAt = Date.now();
      await persist(true);
    }
  }

  private async build(build: TemplateBuildRecord, spec: BuildSpec, signal: AbortSignal, addLog: (level: BuildLogEntry["level"], message: string, step?: string) => void): Promise<void> {
    const { sandboxes } = this.options;
    const base = await this.resolveBase(spec, signal, (message) => addLog("info", message, "base")).catch((err) => {
      throw new StepFailure(CubicleError.from(err).message, "base");
    });
    addLog("info", `FROM ${describeBase(spec)} (${base.info.templateId})`, "base");
    const state: StepState = { user: base.info.image.defaultUser, workdir: base.info.image.defaultWorkdir, env: {} };
    let key = baseKey(base.fingerprint);
    let layer = base.info.image.layerImageId;
    let useCache = !spec.force;
    let sandbox: { runtimeId: string; address: string } | undefined;
    try {
      for (const [index, step] of spec.steps.entries()) {
        const stepName = String(index + 1);
        if (signal.aborted) throw new CubicleError("canceled", "the build was cancelled");
        key = stepKey(key, step);
        if (step.force) useCache = false;
        const label = `[${stepName}/${spec.steps.length}] ${describeStep(step)}`;
        if (step.type === "ENV") {
          for (const [name, value] of step.vars) state.env[name] = value;
          addLog("info", label, stepName);
          continue;
        }
        if (step.type === "USER") {
          state.user = step.user;
          addLog("info", label, stepName);
          continue;
        }
        const layerName = key.slice(0, 48);
        if (useCache && (await sandboxes.imageExists(imageId("layer", layerName)))) {
          layer = imageId("layer", layerName);
          if (step.type === "WORKDIR") state.workdir = step.path;
          addLog("info", `CACHED ${label}`, stepName);
          continue;
        }
        useCache = false;
        addLog("info", label, stepName);
        if (!sandbox) {
          sandbox = await sandboxes.start(this.buildSandboxTemplate(build, base.info, layer), { allowInternetAccess: this.options.buildInternet ?? true });
          addLog("debug", `build sandbox ${sandbox.runtimeId} started`, stepName);
        }
        await this.runStep(sandbox.address, step, state, stepName, signal, addLog);
        if (step.type === "WORKDIR") state.workdir = step.path;
        layer = await sandboxes.commit(sandbox.runtimeId, layerName);
        (build.layers ??= []).push(layer);
      }
    } finally {
      if (sandbox) await sandboxes.destroy(sandbox.runtimeId);
    }
    if (signal.aborted) throw new CubicleError("canceled", "the build was cancelled");
    const startCmd = spec.startCmd ?? base.startCmd;
    await this.register(build, base, { layer, state, startCmd, readyCmd: spec.readyCmd, key });
    if (startCmd) {
      addLog("info", `Starting the start command and waiting for the ready command: ${startCmd}`, "finalize");
      const info = await this.options.catalog.resolve(build.templateId);
      if (!info) throw new StepFailure("the template vanished while it was being finished", "finalize");
      await sandboxes.warm(info).catch((err) => {
        throw new StepFailure(`the start command did not become ready: ${CubicleError.from(err).message}`, "finalize");
      });
      addLog("info", "Warm snapshot taken with the start command running", "finalize");
    }
  }

  /** The template a build sandbox boots: the base's rootfs with the files of the steps so far. */
  private buildSandboxTemplate(build: TemplateBuildRecord, base: TemplateInfo, layer: string | undefined): TemplateInfo {
    return {
      templateId: build.templateId,
      aliases: [],
      image: { ...base.image, ...(layer ? { layerImageId: layer } : { layerImageId: undefined }) },
      cpuCount: build.cpuCount,
      memoryMB: build.memoryMB,
      diskSizeMB: base.diskSizeMB,
    };
  }

  private async runStep(address: string, step: BuildStep, state: StepState, stepName: string, signal: AbortSignal, addLog: (level: BuildLogEntry["level"], message: string, step?: string) => void): Promise<void> {
    const timeoutMs = this.options.stepTimeoutMs ?? STEP_TIMEOUT_MS;
    const lines = lineLogger((level, line) => addLog(level, line, stepName));
    let argv: string[];
    let user = "root";
    let envs: Record<string, string> = {};
    let cwd: string | undefined;
    switch (step.type) {
      case "RUN":
        argv = shellArgv(step.command);
        user = step.user ?? state.user;
        envs = state.env;
        cwd = state.workdir;
        break;
      case "COPY": {
        await uploadToSandbox(address, this.archivePath(step.filesHash), COPY_ARCHIVE_PATH, "root", timeoutMs);
        const mode = step.mode === undefined ? "" : step.mode.toString(8);
        argv = ["/bin/sh", "-c", COPY_SCRIPT, "copy", step.src, step.dest, `${step.user ?? state.user}:`, mode, COPY_ARCHIVE_PATH];
        cwd = "/";
        break;
      }
      case "WORKDIR":
        argv = ["/bin/sh", "-c", WORKDIR_SCRIPT, "workdir", step.path, `${state.user}:`];
        cwd = "/";
        break;
      default:
        return;
    }
    const result = await runInSandbox(address, { argv, user, envs, cwd, timeoutMs, signal, onOutput: (stream, text) => lines.push(stream, text) });
    lines.flush();
    if (result.exitCode !== 0) {
      throw new StepFailure(`step ${stepName} (${describeStep(step)}) failed: exit code ${result.exitCode}${result.error ? ` (${result.error})` : ""}`, stepName);
    }
  }

  /** Records the finished template in the store (TEMPLATE_RECORDS_NOTE), in place of its previous build. */
  private async register(
    build: TemplateBuildRecord,
    base: ResolvedBase,
    result: { layer: string | undefined; state: StepState; startCmd: string | undefined; readyCmd: string | undefined; key: string },
  ): Promise<void> {
    const previous = await this.options.store.getTemplate(build.templateId);
    const names = [...new Set([...(previous?.aliases ?? []), ...(build.names ?? [])])];
    const tags = { ...(previous?.tags ?? {}) };
    for (const tag of build.tags) tags[tag] = build.buildId;
    const fingerprint = createHash("sha256").update(`${result.key}\n${result.startCmd ?? ""}\n${result.readyCmd ?? ""}\n${JSON.stringify(result.state)}`).digest("hex");
    const record: TemplateRecord = {
      templateId: build.templateId,
      aliases: names,
      defaultUser: result.state.user,
      defaultWorkdir: result.state.workdir,
      env: { ...base.info.image.env, ...result.state.env },
      cpuCount: build.cpuCount,
      memoryMB: build.memoryMB,
      diskSizeMB: base.info.diskSizeMB,
      runtime: "container",
      recipeHash: fingerprint,
      builtAt: new Date().toISOString(),
      sizeBytes: 0,
      source: "build",
      rootfsDir: base.info.image.rootfsDir,
      ...(result.layer ? { layerImageId: result.layer } : {}),
      ...(result.startCmd ? { startCmd: result.startCmd } : {}),
      ...(result.readyCmd ? { readyCmd: result.readyCmd } : {}),
      buildId: build.buildId,
      tags,
      public: false,
    };
    await this.options.store.putTemplate(record);
    this.options.catalog.invalidate();
  }

  private async resolveBase(spec: BuildSpec, signal: AbortSignal, onLog: (message: string) => void): Promise<ResolvedBase> {
    const { catalog } = this.options;
    if (spec.base.kind === "template") {
      const name = spec.base.name.replace(/:default$/, "");
      const info = await catalog.resolve(name);
      if (!info) throw new CubicleError("not_found", `template "${spec.base.name}" not found`);
      return { info, fingerprint: `template:${info.templateId}:${await catalog.fingerprint(info)}`, startCmd: info.startCmd };
    }
    const reference = spec.base.reference;
    const builtIn = BUILT_IN_IMAGES.find(([pattern]) => pattern.test(reference))?.[1];
    if (builtIn) {
      const info = await catalog.resolve(builtIn);
      if (!info) throw new CubicleError("unavailable", `Cubicle's template ${builtIn}, which stands in for ${reference}, is not built yet`);
      onLog(`${reference} is served by Cubicle's own template ${builtIn}`);
      return { info, fingerprint: `template:${info.templateId}:${await catalog.fingerprint(info)}` };
    }
    if (!this.options.pullImage) {
      throw new CubicleError("failed_precondition", `image ${reference} cannot be pulled: this server has no registry access configured; build from a template or from e2bdev/base`);
    }
    const credentials = spec.base.aws ? await ecrRegistryCredentials(spec.base.aws, { endpoint: this.options.ecrEndpoint, signal }) : spec.base.credentials;
    if (spec.base.aws) onLog(`got a registry token from ECR (${spec.base.aws.region})`);
    const pulled = await this.options.pullImage(reference, credentials, onLog, signal).catch(async (err: unknown) => {
      const equivalent = OFFLINE_EQUIVALENTS.find(([pattern]) => pattern.test(reference))?.[1];
      const code = CubicleError.from(err).code;
      if (!equivalent || (code !== "unavailable" && code !== "deadline_exceeded")) throw err;
      const info = await catalog.resolve(equivalent);
      if (!info) throw err;
      onLog(`no registry serves ${reference} here (${CubicleError.from(err).message}); Cubicle's template ${equivalent} stands in for it`);
      return { info, fingerprint: `template:${info.templateId}:${await catalog.fingerprint(info)}` } satisfies ResolvedBase;
    });
    if ("info" in pulled) return pulled;
    const defaults = await catalog.resolve("base");
    const info: TemplateInfo = {
      templateId: `image-${pulled.digest.replace(/^sha256:/, "").slice(0, 16)}`,
      aliases: [],
      image: { templateId: "image", rootfsDir: pulled.rootfsDir, defaultUser: pulled.user || "root", defaultWorkdir: pulled.workdir || "/", env: pulled.env },
      cpuCount: defaults?.cpuCount ?? 2,
      memoryMB: defaults?.memoryMB ?? 1024,
      diskSizeMB: defaults?.diskSizeMB ?? 4096,
    };
    return { info, fingerprint: `image:${pulled.digest}`, startCmd: pulled.startCmd };
  }
}

interface ResolvedBase {
  info: TemplateInfo;
  fingerprint: string;
  /** The base's own start command (an image's Entrypoint/Cmd, a template's startCmd), kept unless the build sets one. */
  startCmd?: string;
}

function describeBase(spec: BuildSpec): string {
  return spec.base.kind === "template" ? `template ${spec.base.name}` : spec.base.reference;
}

function describeStep(step: BuildStep): string {
  switch (step.type) {
    case "RUN":
      return `RUN ${step.command}${step.user ? ` (as ${step.user})` : ""}`;
    case "COPY":
      return `COPY ${step.src} ${step.dest}`;
    case "ENV":
      return `ENV ${step.vars.map(([name, value]) => `${name}=${value}`).join(" ")}`;
    case "WORKDIR":
      return `WORKDIR ${step.path}`;
    case "USER":
      return `USER ${step.user}`;
  }
}

/** Splits streamed output into lines for the build log (stdout and stderr alike at level info). */
function lineLogger(emit: (level: BuildLogEntry["level"], line: string) => void): { push(stream: "stdout" | "stderr", text: string): void; flush(): void } {
  const pending: Record<"stdout" | "stderr", string> = { stdout: "", stderr: "" };
  return {
    push(stream, text) {
      const lines = (pending[stream] + text).split(/\r?\n/);
      pending[stream] = lines.pop() ?? "";
      if (pending[stream].length > 8192) {
        lines.push(pending[stream]);
        pending[stream] = "";
      }
      for (const line of lines) emit("info", line);
    },
    flush() {
      for (const stream of ["stdout", "stderr"] as const) {
        if (pending[stream]) emit("info", pending[stream]);
        pending[stream] = "";
      }
    },
  };
}

function formatLogLine(entry: BuildLogEntry): string {
  return `[${entry.timestamp}] ${entry.level.toUpperCase()} ${entry.message}`;
}

function optionalInt(value: unknown, what: string, min: number, max: number): number | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) throw new CubicleError("invalid_argument", `${what} must be an integer from ${min} to ${max}`);
  return value;
}

function checkFilesHash(hash: string): void {
  if (!/^[a-f0-9]{64}$/.test(hash)) throw new CubicleError("invalid_argument", "the files hash must be 64 hex digits (the SDK's sha256)");
}

async function fileExists(file: string): Promise<boolean> {
  return fs.stat(file).then((s) => s.isFile(), () => false);
}

/** E2B template ids: 20 lower-case letters and digits. */
export function newTemplateId(): string {
  const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
  return [...randomBytes(20)].map((byte) => alphabet[byte % alphabet.length]).join("");
}

function randomUuid(): string {
  return globalThis.crypto.randomUUID();
}
