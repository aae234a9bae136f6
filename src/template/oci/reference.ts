import { CubicleError } from "../../shared/cubicle-error.js";

/** Where Docker Hub's Distribution API lives; `docker.io` names are resolved to it. */
export const DOCKER_HUB_REGISTRY = "registry-1.docker.io";

/** An image reference split the way docker splits it (distribution/reference, "normalized"). */
export interface ImageReference {
  /** Registry host[:port] the API is spoken to: `registry-1.docker.io` for Docker Hub names. */
  registry: string;
  /** Repository path inside the registry: `library/python`, `user/img`, `a/b`. */
  repository: string;
  /** Tag, `latest` when neither a tag nor a digest was given; undefined for a digest-only reference. */
  tag?: string;
  /** `sha256:<64 hex>` when the reference pins a digest. */
  digest?: string;
  /** What a manifest request names: the digest when there is one, else the tag. */
  reference: string;
  /** The normalized full name: `docker.io/library/python:3.12`, `localhost:5000/a/b:t@sha256:…`. */
  canonical: string;
}

// Grammar from github.com/distribution/reference (regexp.go).
const PATH_COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const DOMAIN_COMPONENT = /^(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])$/;
const IPV6_HOST = /^\[[a-fA-F0-9:]+\]$/;
const TAG = /^[\w][\w.-]{0,127}$/;
const DIGEST = /^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$/;
const SHA256_DIGEST = /^sha256:[0-9a-f]{64}$/;
const NAME_TOTAL_LENGTH_MAX = 255;

function invalid(input: string, why: string): CubicleError {
  // The input is echoed with its length bounded: a reference comes from a client.
  const shown = input.length > 300 ? `${input.slice(0, 300)}…` : input;
  return new CubicleError("invalid_argument", `invalid image reference '${shown}': ${why}`);
}

function isDomain(candidate: string): boolean {
  const colon = candidate.lastIndexOf(":");
  const host = IPV6_HOST.test(candidate) || colon < 0 || candidate.endsWith("]") ? candidate : candidate.slice(0, colon);
  const port = host === candidate ? undefined : candidate.slice(colon + 1);
  if (port !== undefined && !/^[0-9]{1,5}$/.test(port)) return false;
  if (port !== undefined && Number(port) > 65535) return false;
  if (IPV6_HOST.test(host)) return true;
  return host.split(".").every((label) => DOMAIN_COMPONENT.test(label));
}

/**
 * Parses an image reference as `docker pull` does: `python:3.12` is
 * `registry-1.docker.io/library/python:3.12`, `user/img` is `user/img:latest`, a first component
 * with a `.` or a `:` or `localhost` is a registry host (`localhost:5000/a/b:t`,
 * `127.0.0.1:5000/x@sha256:…`), and `name:tag@digest` keeps both (the digest wins when pulling).
 * Only sha256 digests are accepted, since that is what a pull can verify.
 */
export function parseImageReference(input: string): ImageReference {
  if (typeof input !== "string" || input.length === 0) throw invalid(String(input), "it is empty");
  if (input.length > 1024) throw invalid(input, "it is longer than 1024 characters");
  if (/\s/.test(input)) throw invalid(input, "it contains white space");

  let rest = input;
  let digest: string | undefined;
  const at = rest.indexOf("@");
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST.test(digest)) throw invalid(input, "the digest after '@' is malformed (expected sha256:<64 hex digits>)");
    if (!SHA256_DIGEST.test(digest)) throw invalid(input, "only sha256 digests (lower-case, 64 hex digits) are supported");
  }

  let tag: string | undefined;
  const lastSlash = rest.lastIndexOf("/");
  const lastColon = rest.lastIndexOf(":");
  if (lastColon > lastSlash) {
    tag = rest.slice(lastColon + 1);
    rest = rest.slice(0, lastColon);
    if (!TAG.test(tag)) throw invalid(input, `the tag '${tag}' is not valid (letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')`);
  }
  if (rest.length === 0) throw invalid(input, "the repository name is missing");

  let registry: string | undefined;
  let path = rest;
  const firstSlash = rest.indexOf("/");
  if (firstSlash >= 0) {
    const first = rest.slice(0, firstSlash);
    if (first.includes(".") || first.includes(":") || first === "localhost" || first.startsWith("[")) {
      if (!isDomain(first)) throw invalid(input, `'${first}' is not a valid registry host[:port]`);
      registry = first;
      path = rest.slice(firstSlash + 1);
    }
  }
  if (path.length === 0) throw invalid(input, "the repository name is missing");
  for (const component of path.split("/")) {
    if (!PATH_COMPONENT.test(component)) {
      if (/[A-Z]/.test(component)) throw invalid(input, "repository names must be lower case");
      throw invalid(input, `'${component}' is not a valid repository path component`);
    }
  }

  if (registry === undefined || registry === "docker.io" || registry === "index.docker.io" || registry === DOCKER_HUB_REGISTRY) {
    registry = DOCKER_HUB_REGISTRY;
    if (!path.includes("/")) path = `library/${path}`;
  }
  const displayRegistry = registry === DOCKER_HUB_REGISTRY ? "docker.io" : registry;
  if (displayRegistry.length + 1 + path.length > NAME_TOTAL_LENGTH_MAX) {
    throw invalid(input, `the name is longer than ${NAME_TOTAL_LENGTH_MAX} characters`);
  }

  if (tag === undefined && digest === undefined) tag = "latest";
  const canonical = `${displayRegistry}/${path}${tag !== undefined ? `:${tag}` : ""}${digest !== undefined ? `@${digest}` : ""}`;
  return { registry, repository: path, tag, digest, reference: digest ?? tag!, canonical };
}

/** Normalizes a registry name given in a configuration (`docker.io`, `index.docker.io`) to the host the API is spoken to. */
export function normalizeRegistryHost(host: string): string {
  const lower = host.toLowerCase().replace(/^https?:\/\//, "").replace(/\/+$/, "");
  if (lower === "docker.io" || lower === "index.docker.io") return DOCKER_HUB_REGISTRY;
  return lower;
}

/** Whether `digest` is a `sha256:<64 lower-case hex>` digest (the only algorithm pulls verify). */
export function isSha256Digest(digest: unknown): digest is string {
  return typeof digest === "string" && SHA256_DIGEST.test(digest);
}
