import { createHash } from "node:crypto";
import { gcpRegistryCredentials, parseAwsRegistry, type AwsRegistryCredentials } from "../oci/cloud-registries.js";
import { CubicleError } from "../../shared/cubicle-error.js";

/** A step of E2B's template build (`TemplateBuildStartV2.steps[]`), validated. */
export type BuildStep =
  | { type: "RUN"; command: string; user?: string; force: boolean }
  | { type: "COPY"; src: string; dest: string; user?: string; mode?: number; filesHash: string; force: boolean }
  | { type: "ENV"; vars: Array<[string, string]>; force: boolean }
  | { type: "WORKDIR"; path: string; force: boolean }
  | { type: "USER"; user: string; force: boolean };

/** What a build starts from: another template (by name or id) or an image reference. */
export type BuildBase =
  | { kind: "template"; name: string }
  /** `credentials` for the registry, or `aws` to get them from ECR (CLOUD_REGISTRIES_NOTE). */
  | { kind: "image"; reference: string; credentials?: { username: string; password: string }; aws?: AwsRegistryCredentials };

/** `TemplateBuildStartV2` as Cubicle takes it. */
export interface BuildSpec {
  base: BuildBase;
  steps: BuildStep[];
  startCmd?: string;
  readyCmd?: string;
  /** Rebuild every step, whatever the cache holds. */
  force: boolean;
}

const MAX_STEPS = 200;
const MAX_COMMAND_BYTES = 64 * 1024;
const MAX_PATH_BYTES = 4096;
const USER_PATTERN = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$/;
const ENV_NAME_PATTERN = /^[A-Za-z_][A-Za-z0-9_]*$/;
const FILES_HASH_PATTERN = /^[a-f0-9]{64}$/;
const NAME_PATTERN = /^[a-z0-9][a-z0-9_.-]{0,62}$/;
const TAG_PATTERN = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/;

function bad(message: string): CubicleError {
  return new CubicleError("invalid_argument", message);
}

function text(value: unknown, what: string, max: number, options: { empty?: boolean } = {}): string {
  if (typeof value !== "string") throw bad(`${what} must be a string`);
  if (!options.empty && value.length === 0) throw bad(`${what} must not be empty`);
  if (Buffer.byteLength(value) > max) throw bad(`${what} is longer than ${max} bytes`);
  if (value.includes("\0")) throw bad(`${what} must not contain a NUL byte`);
  return value;
}

function optionalUser(value: unknown, what: string): string | undefined {
  if (value === undefined || value === null || value === "") return undefined;
  const user = text(value, what, 32);
  if (!USER_PATTERN.test(user)) throw bad(`${what} ${JSON.stringify(user)} is not a user name`);
  return user;
}

function absolutePath(value: unknown, what: string): string {
  const p = text(value, what, MAX_PATH_BYTES);
  if (!p.startsWith("/")) throw bad(`${what} must be an absolute path, got ${JSON.stringify(p)}`);
  return p;
}

/** A COPY source: relative to the build context, inside it. */
function copySource(value: unknown): string {
  const src = text(value, "COPY source", MAX_PATH_BYTES);
  if (src.startsWith("/") || src.split("/").includes("..")) throw bad(`COPY source ${JSON.stringify(src)} must be a path inside the build context`);
  return src;
}

function parseStep(raw: unknown, index: number): BuildStep {
  const where = `steps[${index}]`;
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) throw bad(`${where} must be an object`);
  const step = raw as { type?: unknown; args?: unknown; filesHash?: unknown; force?: unknown };
  const args = step.args === undefined || step.args === null ? [] : step.args;
  if (!Array.isArray(args) || args.some((arg) => typeof arg !== "string")) throw bad(`${where}.args must be an array of strings`);
  const force = step.force === true;
  switch (step.type) {
    case "RUN": {
      if (args.length < 1 || args.length > 2) throw bad(`${where}: RUN takes [command] or [command, user]`);
      return { type: "RUN", command: text(args[0], `${where} command`, MAX_COMMAND_BYTES), user: optionalUser(args[1], `${where} user`), force };
    }
    case "COPY": {
      if (args.length < 2 || args.length > 4) throw bad(`${where}: COPY takes [src, dest, user?, mode?]`);
      if (typeof step.filesHash !== "string" || !FILES_HASH_PATTERN.test(step.filesHash)) throw bad(`${where}: COPY needs filesHash, the SDK's sha256 of the files (64 hex digits)`);
      const modeText = args[3] ?? "";
      if (modeText !== "" && !/^0?[0-7]{3,4}$/.test(modeText)) throw bad(`${where}: mode ${JSON.stringify(modeText)} is not an octal file mode`);
      return {
        type: "COPY",
        src: copySource(args[0]),
        dest: text(args[1], `${where} destination`, MAX_PATH_BYTES),
        user: optionalUser(args[2], `${where} user`),
        ...(modeText ? { mode: parseInt(modeText, 8) } : {}),
        filesHash: step.filesHash,
        force,
      };
    }
    case "ENV": {
      if (args.length === 0 || args.length % 2 !== 0) throw bad(`${where}: ENV takes name, value pairs`);
      const vars: Array<[string, string]> = [];
      for (let i = 0; i < args.length; i += 2) {
        const name = args[i]!;
        if (!ENV_NAME_PATTERN.test(name) || name.length > 256) throw bad(`${where}: ${JSON.stringify(name)} is not an environment variable name`);
        vars.push([name, text(args[i + 1], `${where} value of ${name}`, MAX_COMMAND_BYTES, { empty: true })]);
      }
      return { type: "ENV", vars, force };
    }
    case "WORKDIR": {
      if (args.length !== 1) throw bad(`${where}: WORKDIR takes [path]`);
      return { type: "WORKDIR", path: absolutePath(args[0], `${where} path`), force };
    }
    case "USER": {
      if (args.length !== 1) throw bad(`${where}: USER takes [user]`);
      const user = optionalUser(args[0], `${where} user`);
      if (!user) throw bad(`${where}: USER needs a user name`);
      return { type: "USER", user, force };
    }
    default:
      throw bad(`${where}: step type ${JSON.stringify(step.type)} is not one of RUN, COPY, ENV, WORKDIR, USER`);
  }
}

/** Validates `POST /v2/templates/{id}/builds/{buildId}`'s body (TemplateBuildStartV2). */
export function parseBuildSpec(body: unknown): BuildSpec {
  if (typeof body !== "object" || body === null || Array.isArray(body)) throw bad("the build request must be a JSON object");
  const raw = body as Record<string, unknown>;
  const hasImage = raw.fromImage !== undefined && raw.fromImage !== null && raw.fromImage !== "";
  const hasTemplate = raw.fromTemplate !== undefined && raw.fromTemplate !== null && raw.fromTemplate !== "";
  if (hasImage === hasTemplate) throw bad("give exactly one of fromImage and fromTemplate");
  let base: BuildBase;
  if (hasTemplate) {
    base = { kind: "template", name: text(raw.fromTemplate, "fromTemplate", 256) };
  } else {
    const reference = text(raw.fromImage, "fromImage", 1024);
    if (/\s/.test(reference)) throw bad(`fromImage ${JSON.stringify(reference)} is not an image reference`);
    base = { kind: "image", reference, ...registryCredentials(raw.fromImageRegistry) };
  }
  const steps = raw.steps === undefined || raw.steps === null ? [] : raw.steps;
  if (!Array.isArray(steps)) throw bad("steps must be an array");
  if (steps.length > MAX_STEPS) throw bad(`a build has at most ${MAX_STEPS} steps`);
  const spec: BuildSpec = { base, steps: steps.map(parseStep), force: raw.force === true };
  if (raw.startCmd !== undefined && raw.startCmd !== null && raw.startCmd !== "") spec.startCmd = text(raw.startCmd, "startCmd", MAX_COMMAND_BYTES);
  if (raw.readyCmd !== undefined && raw.readyCmd !== null && raw.readyCmd !== "") spec.readyCmd = text(raw.readyCmd, "readyCmd", MAX_COMMAND_BYTES);
  return spec;
}

/** `fromImageRegistry`: a registry's username and password, or a cloud's credentials (CLOUD_REGISTRIES_NOTE). */
function registryCredentials(raw: unknown): { credentials?: { username: string; password: string }; aws?: AwsRegistryCredentials } {
  if (raw === undefined || raw === null) return {};
  if (typeof raw !== "object" || Array.isArray(raw)) throw bad("fromImageRegistry must be an object");
  const registry = raw as Record<string, unknown>;
  if (registry.type === "aws") return { aws: parseAwsRegistry(registry) };
  if (registry.type === "gcp") return { credentials: gcpRegistryCredentials(registry) };
  if (registry.type !== "registry") throw bad(`fromImageRegistry type ${JSON.stringify(String(registry.type)).slice(0, 40)} is not one of "registry", "aws", "gcp"`);
  return { credentials: { username: text(registry.username, "registry username", 1024), password: text(registry.password, "registry password", 16 * 1024) } };
}

/** The spec as the build record keeps it: without any credentials (CLOUD_REGISTRIES_NOTE). */
export function specWithoutCredentials(spec: BuildSpec): BuildSpec {
  if (spec.base.kind !== "image" || (!spec.base.credentials && !spec.base.aws)) return spec;
  const { credentials: _credentials, aws: _aws, ...base } = spec.base;
  return { ...spec, base };
}

/** `name` or `name:tag` from `POST /v3/templates`; the tag defaults to `default`. */
export function parseTemplateName(value: unknown): { name: string; tag?: string } {
  const raw = text(value, "name", 200);
  const colon = raw.indexOf(":");
  const name = colon < 0 ? raw : raw.slice(0, colon);
  const tag = colon < 0 ? undefined : raw.slice(colon + 1);
  if (!NAME_PATTERN.test(name)) throw bad(`template name ${JSON.stringify(name)} must be 1–63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit`);
  if (tag !== undefined) parseTag(tag);
  return tag === undefined ? { name } : { name, tag };
}

export function parseTag(value: unknown): string {
  const tag = text(value, "tag", 64);
  if (!TAG_PATTERN.test(tag)) throw bad(`tag ${JSON.stringify(tag)} must be 1–64 letters, digits, '.', '_' or '-'`);
  return tag;
}

/**
 * BUILD_CACHE_NOTE: a step's cache key hashes the key before it (the base's fingerprint for the
 * first) and the step itself (type, arguments, for COPY the SDK's hash of the files), so a key
 * names everything the step's result depends on, and an unchanged prefix of steps is found
 * again whatever template it came from. The result of a step that changes files (RUN, COPY,
 * WORKDIR, which makes its directory) is a layer image named by its key; ENV and USER change
 * only what later steps see, and so only the keys after them.
 */
export function stepKey(previousKey: string, step: BuildStep): string {
  const { force: _force, ...identity } = step;
  return createHash("sha256").update(previousKey).update("\n").update(JSON.stringify(identity)).digest("hex");
}

export function baseKey(fingerprint: string): string {
  return createHash("sha256").update("base\n").update(fingerprint).digest("hex");
}
