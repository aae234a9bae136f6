import { CubicleError } from "../../shared/cubicle-error.js";
import { isSha256Digest } from "./reference.js";

/** What Cubicle takes from an image's config (OCI image-spec config.md, Docker's is the same). */
export interface ImageConfig {
  architecture: string;
  os: string;
  /** `Env` as `NAME=value` strings, in image order. */
  env: string[];
  /** `Env` as a map (a later duplicate wins, as in docker). */
  envMap: Record<string, string>;
  /** `WorkingDir`; "" when the image sets none. */
  workingDir: string;
  /** `User` (`name`, `uid`, `uid:gid`, `name:group`); "" when the image sets none (root). */
  user: string;
  entrypoint: string[];
  cmd: string[];
  /** `rootfs.diff_ids`: sha256 of each uncompressed layer, in order. */
  diffIds: string[];
  labels: Record<string, string>;
  exposedPorts: string[];
}

/** Largest config accepted: real ones are a few KiB. */
export const MAX_CONFIG_BYTES = 4 * 1024 * 1024;

function bad(message: string): CubicleError {
  return new CubicleError("failed_precondition", `invalid image config: ${message}`);
}

function stringList(value: unknown, field: string): string[] {
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value) || !value.every((item) => typeof item === "string")) throw bad(`${field} must be a list of strings`);
  return value as string[];
}

function optionalString(value: unknown, field: string): string {
  if (value === undefined || value === null) return "";
  if (typeof value !== "string") throw bad(`${field} must be a string`);
  return value;
}

/**
 * Parses an image config blob. Refuses anything but linux/amd64 with a message naming what the
 * image is built for (Cubicle runs amd64 Linux sandboxes only).
 */
export function parseImageConfig(bytes: Buffer | string): ImageConfig {
  if (bytes.length > MAX_CONFIG_BYTES) throw bad(`it is larger than ${MAX_CONFIG_BYTES} bytes`);
  let json: unknown;
  try {
    json = JSON.parse(bytes.toString());
  } catch {
    throw bad("it is not JSON");
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) throw bad("it is not a JSON object");
  const doc = json as Record<string, unknown>;
  const architecture = optionalString(doc.architecture, "architecture");
  const os = optionalString(doc.os, "os");
  if (os !== "linux" || architecture !== "amd64") {
    throw new CubicleError(
      "failed_precondition",
      `the image is built for ${os || "an unknown OS"}/${architecture || "an unknown architecture"}; Cubicle runs linux/amd64 images only (pick the linux/amd64 variant, e.g. docker build --platform linux/amd64)`,
    );
  }
  const config = doc.config ?? {};
  if (typeof config !== "object" || config === null || Array.isArray(config)) throw bad("config must be an object");
  const c = config as Record<string, unknown>;
  const env = stringList(c.Env, "Env");
  const envMap: Record<string, string> = {};
  for (const item of env) {
    const eq = item.indexOf("=");
    if (eq <= 0) continue; // docker keeps a bare NAME, which sets nothing
    envMap[item.slice(0, eq)] = item.slice(eq + 1);
  }
  const rootfs = doc.rootfs as Record<string, unknown> | undefined;
  const diffIds = rootfs === undefined ? [] : stringList(rootfs.diff_ids, "rootfs.diff_ids");
  for (const id of diffIds) if (!isSha256Digest(id)) throw bad(`diff_id '${String(id).slice(0, 80)}' is not a sha256 digest`);
  const labels: Record<string, string> = {};
  if (c.Labels !== undefined && c.Labels !== null) {
    if (typeof c.Labels !== "object" || Array.isArray(c.Labels)) throw bad("Labels must be an object");
    for (const [key, value] of Object.entries(c.Labels as Record<string, unknown>)) if (typeof value === "string") labels[key] = value;
  }
  const ports = c.ExposedPorts;
  const exposedPorts = ports && typeof ports === "object" && !Array.isArray(ports) ? Object.keys(ports) : [];
  return {
    architecture,
    os,
    env,
    envMap,
    workingDir: optionalString(c.WorkingDir, "WorkingDir"),
    user: optionalString(c.User, "User"),
    entrypoint: stringList(c.Entrypoint, "Entrypoint"),
    cmd: stringList(c.Cmd, "Cmd"),
    diffIds,
    labels,
    exposedPorts,
  };
}

/** The image's default start command as docker runs it: `Entrypoint` followed by `Cmd`. */
export function defaultCommand(config: Pick<ImageConfig, "entrypoint" | "cmd">): string[] {
  return [...config.entrypoint, ...config.cmd];
}
