import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import type { Readable } from "node:stream";
import zlib from "node:zlib";
import { pipeline } from "node:stream/promises";
import { CubicleError, errnoName } from "../../shared/cubicle-error.js";
import { createLogger, roundMs, type Logger } from "../../shared/log.js";
import { SANDBOX_UID_BASE } from "../../runtime/types.js";
import { parseImageConfig, type ImageConfig } from "./image-config.js";
import { prepareRootfs, type SandboxAccount } from "./prepare-rootfs.js";
import { isSha256Digest, parseImageReference } from "./reference.js";
import { MEDIA_TYPES, parseImageManifest, pickPlatform, RegistryClient, type BlobProgress, type Descriptor, type RegistryCredentials } from "./registry-client.js";
import { readTar } from "./tar-reader.js";
import { RootfsWriter, type LayerSource, type UnpackStats } from "./unpack.js";

export interface RegistryHosts {
  /** Registries (host[:port]) that may be reached over plain http; loopback always may. */
  insecure?: string[];
  /** A registry mirror (host[:port] or URL) tried first for Docker Hub images. */
  mirror?: string;
  /** Credentials per registry host. */
  auth?: Record<string, RegistryCredentials>;
}

export interface PullProgress extends BlobProgress {
  /** The blob was already in the cache: nothing was downloaded. */
  cached?: boolean;
}

interface CommonOptions {
  /** Where the root filesystem goes. Must not exist; its parent must. */
  destDir: string;
  /** Largest total size of the files written. Default 64 GiB. */
  maxBytes?: number;
  signal?: AbortSignal;
  log?: Logger;
  /** See UnpackOptions.xattrAddon. */
  xattrAddon?: string;
}

export interface PullOptions extends CommonOptions {
  /** An image reference: `python:3.12`, `localhost:5000/a/b:t`, `host/x@sha256:…`. */
  reference: string;
  /** Credentials for the image's registry (override `registryHosts.auth`). */
  credentials?: RegistryCredentials;
  registryHosts?: RegistryHosts;
  /** Layer blobs by digest (`<dir>/sha256/<hex>`), kept between pulls. Default: a temp dir, removed after. */
  blobCacheDir?: string;
  /** Download progress per layer, about every 100 ms and at the end of each layer. */
  onProgress?: (progress: PullProgress) => void;
  connectTimeoutMs?: number;
  idleTimeoutMs?: number;
}

export interface ImportOptions extends CommonOptions {
  /** A `docker save` tarball (optionally gzip-compressed) or an OCI image layout directory. */
  source: string;
  /** Which image when the source holds several: a RepoTag or `org.opencontainers.image.ref.name`. */
  image?: string;
}

export interface ImageResult {
  /**
   * What identifies the image: for a pull, the digest of what the reference named (the index for
   * a multi-platform image, as `docker pull` prints); for an OCI layout, the chosen index.json
   * entry's digest; for a classic `docker save` tarball, the config digest (docker's image id).
   */
  digest: string;
  /** The linux/amd64 image manifest's digest (undefined for a classic `docker save` tarball). */
  manifestDigest?: string;
  config: ImageConfig;
  /** The account sandboxes run as (`user`). */
  user: SandboxAccount;
  stats: UnpackStats;
}

const MAX_METADATA_BYTES = 4 * 1024 * 1024;
const DOWNLOAD_CONCURRENCY = 3;

/** Refuses an existing destination or a missing parent before any work. */
function checkDestination(destDir: string): void {
  if (!path.isAbsolute(destDir)) throw new CubicleError("invalid_argument", `destDir must be an absolute path, got '${destDir}'`);
  if (fs.lstatSync(destDir, { throwIfNoEntry: false })) throw new CubicleError("already_exists", `${destDir} already exists`);
  if (!fs.statSync(path.dirname(destDir), { throwIfNoEntry: false })?.isDirectory()) {
    throw new CubicleError("not_found", `the parent of ${destDir} is not a directory`);
  }
}

/** A sibling of `destDir` to build in: same filesystem, so the final rename is atomic. */
function workDirFor(destDir: string): string {
  return path.join(path.dirname(destDir), `.${path.basename(destDir)}.partial-${randomBytes(6).toString("hex")}`);
}

interface PendingLayer {
  source: LayerSource;
  /** Settles when the layer's bytes are where `source.open()` reads them. */
  ready: Promise<void>;
  /** Called when unpacking found the stored blob corrupt (e.g. drop it from a cache). */
  onCorrupt?: () => void;
}

/**
 * Unpacks layers (each awaited as its download finishes) into a work dir, prepares it for
 * Cubicle, and renames it to `destDir`. On failure nothing is left at `destDir`.
 */
async function assemble(layers: PendingLayer[], options: CommonOptions): Promise<{ user: SandboxAccount; stats: UnpackStats }> {
  const work = workDirFor(options.destDir);
  try {
    fs.mkdirSync(work, { mode: 0o755 });
    fs.lchownSync(work, SANDBOX_UID_BASE, SANDBOX_UID_BASE);
    const writer = new RootfsWriter(work, { maxBytes: options.maxBytes, signal: options.signal, log: options.log, xattrAddon: options.xattrAddon });
    for (const layer of layers) {
      await layer.ready;
      try {
        await writer.applyLayer(layer.source);
      } catch (err) {
        if (err instanceof CubicleError && err.code === "failed_precondition") layer.onCorrupt?.();
        throw err;
      }
    }
    const user = prepareRootfs(work);
    try {
      fs.renameSync(work, options.destDir);
    } catch (err) {
      const errno = errnoName(err);
      if (errno === "EEXIST" || errno === "ENOTEMPTY") throw new CubicleError("already_exists", `${options.destDir} appeared while the image was unpacked`);
      throw err;
    }
    const { stats } = writer;
    if (stats.devicesSkipped || stats.xattrsDropped || stats.idsOutOfRange || stats.namesClamped) {
      (options.log ?? createLogger("oci")).info("image unpacked with adjustments", { ...stats });
    }
    return { user, stats };
  } catch (err) {
    fs.rmSync(work, { recursive: true, force: true });
    // Let the layers still downloading settle before the caller removes their files.
    await Promise.allSettled(layers.map((layer) => layer.ready));
    throw err;
  }
}

function checkDiffIds(config: ImageConfig, layerCount: number, image: string): void {
  if (config.diffIds.length !== layerCount) {
    throw new CubicleError("failed_precondition", `image ${image}: the config lists ${config.diffIds.length} layers (rootfs.diff_ids), the manifest ${layerCount}`);
  }
}

/**
 * Pulls an image from a registry into `destDir` as a flattened rootfs, ids shifted for Cubicle's
 * user namespaces, ready to be a template's base. Layers already in `blobCacheDir` are not
 * downloaded again.
 */
export async function pullImage(options: PullOptions): Promise<ImageResult> {
  const log = options.log ?? createLogger("oci");
  const started = performance.now();
  const ref = parseImageReference(options.reference);
  checkDestination(options.destDir);
  const client = new RegistryClient({
    insecure: options.registryHosts?.insecure,
    mirror: options.registryHosts?.mirror,
    auth: options.registryHosts?.auth,
    connectTimeoutMs: options.connectTimeoutMs,
    idleTimeoutMs: options.idleTimeoutMs,
    log,
  });
  const resolved = await client.resolveImage(ref, { credentials: options.credentials, signal: options.signal });
  const config = parseImageConfig(resolved.config);
  checkDiffIds(config, resolved.manifest.layers.length, ref.canonical);

  const tempCache = options.blobCacheDir ? undefined : workDirFor(options.destDir) + "-blobs";
  const cacheDir = path.join(options.blobCacheDir ?? tempCache!, "sha256");
  fs.mkdirSync(cacheDir, { recursive: true, mode: 0o700 });

  // Downloads run a few at a time and are unpacked in order as each one lands.
  const failFast = new AbortController();
  const signal = options.signal ? AbortSignal.any([options.signal, failFast.signal]) : failFast.signal;
  const layers = resolved.manifest.layers;
  const starts = layers.map(() => {
    let resolve!: () => void;
    let reject!: (err: unknown) => void;
    const promise = new Promise<void>((res, rej) => ((resolve = res), (reject = rej)));
    return { promise, resolve, reject };
  });
  let downloaded = 0;
  const fetchLayer = async (layer: Descriptor, file: string): Promise<void> => {
    const have = fs.statSync(file, { throwIfNoEntry: false });
    if (have?.isFile() && have.size === layer.size) {
      options.onProgress?.({ layer: layer.digest, bytes: layer.size, total: layer.size, cached: true });
      return;
    }
    await client.downloadBlob(resolved.endpoints, layer, file, { signal, onProgress: options.onProgress });
    downloaded += layer.size;
  };
  let next = 0;
  const worker = async () => {
    while (next < layers.length) {
      const i = next++;
      const layer = layers[i]!;
      await fetchLayer(layer, path.join(cacheDir, layer.digest.slice("sha256:".length))).then(starts[i]!.resolve, (err: unknown) => {
        failFast.abort();
        starts[i]!.reject(err);
      });
    }
  };
  const workers = Array.from({ length: Math.min(DOWNLOAD_CONCURRENCY, layers.length) }, worker);
  starts.forEach((start) => start.promise.catch(() => {}));

  try {
    const pending: PendingLayer[] = layers.map((layer, i) => {
      const file = path.join(cacheDir, layer.digest.slice("sha256:".length));
      return {
        source: { name: layer.digest, digest: layer.digest, diffId: config.diffIds[i], open: () => fs.createReadStream(file) },
        ready: starts[i]!.promise,
        onCorrupt: () => fs.rmSync(file, { force: true }),
      };
    });
    const { user, stats } = await assemble(pending, { ...options, signal });
    log.info("image pulled", { image: ref.canonical, digest: resolved.digest, layers: layers.length, downloadedBytes: downloaded, unpackedBytes: stats.bytes, ms: roundMs(performance.now() - started) });
    return { digest: resolved.digest, manifestDigest: resolved.manifestDigest, config, user, stats };
  } finally {
    failFast.abort();
    await Promise.allSettled(workers);
    if (tempCache) fs.rmSync(tempCache, { recursive: true, force: true });
  }
}

/** Files of an image source by relative name: an OCI layout directory or a tarball's members. */
interface SourceFiles {
  has(name: string): boolean;
  read(name: string, limit: number): Buffer;
  /** A layer's bytes; `expectedSize` is checked before reading when given. */
  open(name: string, expectedSize?: number): Readable;
}

function directoryFiles(root: string): SourceFiles {
  const locate = (name: string, expectedSize?: number): { file: string; size: number } => {
    // Names come from validated digests and fixed file names, never from the source's JSON paths.
    const file = path.join(root, name);
    const stats = fs.lstatSync(file, { throwIfNoEntry: false });
    if (!stats?.isFile()) throw new CubicleError("failed_precondition", `${name} is missing from ${root} or is not a regular file`);
    if (expectedSize !== undefined && stats.size !== expectedSize) throw new CubicleError("failed_precondition", `${name} in ${root} has ${stats.size} bytes, the manifest says ${expectedSize}`);
    return { file, size: stats.size };
  };
  return {
    has: (name) => fs.lstatSync(path.join(root, name), { throwIfNoEntry: false })?.isFile() ?? false,
    read: (name, limit) => {
      const { file, size } = locate(name);
      if (size > limit) throw new CubicleError("failed_precondition", `${name} in ${root} is larger than ${limit} bytes`);
      return fs.readFileSync(file);
    },
    open: (name, expectedSize) => fs.createReadStream(locate(name, expectedSize).file),
  };
}

/** Indexes a tarball's regular files (offset, size) so members are read by byte range. */
async function tarballFiles(file: string): Promise<SourceFiles> {
  const members = new Map<string, { offset: number; size: number }>();
  for await (const { entry } of readTar(fs.createReadStream(file))) {
    if (entry.type !== "file") continue;
    const name = path.posix.normalize(entry.path).replace(/^(\.\/|\/)+/, "");
    members.set(name, { offset: entry.dataOffset, size: entry.size });
    if (members.size > 100_000) throw new CubicleError("failed_precondition", `${file} has more than 100000 files; it is not an image tarball`);
  }
  const locate = (name: string, expectedSize?: number) => {
    const member = members.get(name);
    if (!member) throw new CubicleError("failed_precondition", `${name} is missing from ${path.basename(file)}`);
    if (expectedSize !== undefined && member.size !== expectedSize) throw new CubicleError("failed_precondition", `${name} in ${path.basename(file)} has ${member.size} bytes, the manifest says ${expectedSize}`);
    return member;
  };
  const readRange = (member: { offset: number; size: number }): Buffer => {
    const fd = fs.openSync(file, "r");
    try {
      const out = Buffer.alloc(member.size);
      let got = 0;
      while (got < member.size) {
        const n = fs.readSync(fd, out, got, member.size - got, member.offset + got);
        if (n === 0) break;
        got += n;
      }
      return out.subarray(0, got);
    } finally {
      fs.closeSync(fd);
    }
  };
  return {
    has: (name) => members.has(name),
    read: (name, limit) => {
      const member = locate(name);
      if (member.size > limit) throw new CubicleError("failed_precondition", `${name} in ${path.basename(file)} is larger than ${limit} bytes`);
      return readRange(member);
    },
    open: (name, expectedSize) => {
      const member = locate(name, expectedSize);
      return member.size === 0 ? fs.createReadStream(file, { start: 0, end: -1 }) : fs.createReadStream(file, { start: member.offset, end: member.offset + member.size - 1 });
    },
  };
}

function sha256(data: Buffer): string {
  return `sha256:${createHash("sha256").update(data).digest("hex")}`;
}

function parseJson(data: Buffer, what: string): unknown {
  try {
    return JSON.parse(data.toString("utf8"));
  } catch {
    throw new CubicleError("failed_precondition", `${what} is not valid JSON`);
  }
}

function blobName(digest: string): string {
  if (!isSha256Digest(digest)) throw new CubicleError("failed_precondition", `'${String(digest).slice(0, 80)}' is not a sha256 digest`);
  return `blobs/sha256/${digest.slice("sha256:".length)}`;
}

/** A blob of an OCI layout, read whole and verified against its descriptor. */
function readVerified(files: SourceFiles, descriptor: Descriptor): Buffer {
  const data = files.read(blobName(descriptor.digest), MAX_METADATA_BYTES);
  if (sha256(data) !== descriptor.digest || data.length !== descriptor.size) {
    throw new CubicleError("failed_precondition", `blob ${descriptor.digest} does not match its digest or size (corrupt or tampered with)`);
  }
  return data;
}

/** The image of an OCI layout (index.json → optional index → linux/amd64 manifest). */
function ociLayoutImage(files: SourceFiles, wanted: string | undefined, sourceName: string): { digest: string; manifestDigest: string; config: Buffer; layers: Descriptor[] } {
  const layout = parseJson(files.read("oci-layout", 64 * 1024), "oci-layout") as { imageLayoutVersion?: unknown };
  if (layout?.imageLayoutVersion !== "1.0.0") throw new CubicleError("failed_precondition", `${sourceName}: unsupported OCI layout version ${String(layout?.imageLayoutVersion)}`);
  const index = parseJson(files.read("index.json", MAX_METADATA_BYTES), "index.json") as { manifests?: Array<Descriptor & { annotations?: Record<string, string> }> };
  const manifests = Array.isArray(index?.manifests) ? index.manifests : [];
  const names = (m: { annotations?: Record<string, string> }) => [m.annotations?.["org.opencontainers.image.ref.name"], m.annotations?.["io.containerd.image.name"]].filter((n): n is string => typeof n === "string");
  let chosen: (typeof manifests)[number] | undefined = manifests[0];
  if (wanted !== undefined) {
    chosen = manifests.find((m) => names(m).includes(wanted));
    if (!chosen) throw new CubicleError("not_found", `${sourceName} has no image named '${wanted}' (it has: ${manifests.flatMap(names).join(", ") || "no names"})`);
  } else if (manifests.length > 1) {
    throw new CubicleError("invalid_argument", `${sourceName} holds ${manifests.length} images; name one (${manifests.flatMap(names).join(", ") || "they have no names"})`);
  }
  if (!chosen) throw new CubicleError("failed_precondition", `${sourceName}: index.json lists no images`);
  const top: Descriptor = { mediaType: String(chosen.mediaType), digest: chosen.digest, size: chosen.size };
  let current = top;
  let json = parseJson(readVerified(files, current), `manifest ${current.digest}`) as Record<string, unknown>;
  for (let depth = 0; ; depth++) {
    const mediaType = typeof json.mediaType === "string" ? json.mediaType : current.mediaType;
    if (mediaType !== MEDIA_TYPES.ociIndex && mediaType !== MEDIA_TYPES.dockerList) break;
    if (depth >= 2) throw new CubicleError("failed_precondition", `${sourceName}: image indexes nested too deep`);
    current = pickPlatform(json, sourceName);
    json = parseJson(readVerified(files, current), `manifest ${current.digest}`) as Record<string, unknown>;
  }
  const manifest = parseImageManifest(json, typeof json.mediaType === "string" ? json.mediaType : current.mediaType, sourceName);
  return { digest: top.digest, manifestDigest: current.digest, config: readVerified(files, manifest.config), layers: manifest.layers };
}

/**
 * Imports an image from a `docker save` tarball (classic layout with manifest.json, or the OCI
 * layout newer docker writes) or an OCI image layout directory, with the same result and checks
 * as a pull: digests verified (blobs against their digests; classic docker-save layers against
 * the config's diff_ids), linux/amd64 only, nothing left at `destDir` on failure.
 */
export async function importImage(options: ImportOptions): Promise<ImageResult> {
  const log = options.log ?? createLogger("oci");
  const started = performance.now();
  checkDestination(options.destDir);
  const sourceStats = fs.statSync(options.source, { throwIfNoEntry: false });
  if (!sourceStats) throw new CubicleError("not_found", `${options.source} does not exist`);
  const sourceName = path.basename(options.source);

  let decompressed: string | undefined;
  try {
    let files: SourceFiles;
    if (sourceStats.isDirectory()) {
      files = directoryFiles(options.source);
    } else {
      let tarball = options.source;
      const head = Buffer.alloc(4);
      const fd = fs.openSync(tarball, "r");
      fs.readSync(fd, head, 0, 4, 0);
      fs.closeSync(fd);
      if (head[0] === 0x1f && head[1] === 0x8b) {
        // `docker save | gzip`: members are read by range, so unpack the outer gzip once.
        decompressed = workDirFor(options.destDir) + ".tar";
        await pipeline(fs.createReadStream(tarball), zlib.createGunzip(), fs.createWriteStream(decompressed, { flags: "wx", mode: 0o600 }), { signal: options.signal });
        tarball = decompressed;
      }
      files = await tarballFiles(tarball);
    }

    let digest: string;
    let manifestDigest: string | undefined;
    let configBytes: Buffer;
    let layers: LayerSource[];
    if (files.has("manifest.json") && !sourceStats.isDirectory()) {
      const entries = parseJson(files.read("manifest.json", MAX_METADATA_BYTES), "manifest.json") as Array<{ Config?: unknown; RepoTags?: unknown; Layers?: unknown }>;
      if (!Array.isArray(entries) || entries.length === 0) throw new CubicleError("failed_precondition", `${sourceName}: manifest.json lists no images`);
      const tags = (e: { RepoTags?: unknown }) => (Array.isArray(e.RepoTags) ? e.RepoTags.filter((t): t is string => typeof t === "string") : []);
      let entry = entries[0]!;
      if (options.image !== undefined) {
        const found = entries.find((e) => tags(e).includes(options.image!));
        if (!found) throw new CubicleError("not_found", `${sourceName} has no image tagged '${options.image}' (it has: ${entries.flatMap(tags).join(", ") || "no tags"})`);
        entry = found;
      } else if (entries.length > 1) {
        throw new CubicleError("invalid_argument", `${sourceName} holds ${entries.length} images; name one (${entries.flatMap(tags).join(", ")})`);
      }
      if (typeof entry.Config !== "string" || !Array.isArray(entry.Layers) || !entry.Layers.every((l) => typeof l === "string")) {
        throw new CubicleError("failed_precondition", `${sourceName}: manifest.json entry without Config and Layers`);
      }
      const configName = path.posix.normalize(entry.Config).replace(/^(\.\/|\/)+/, "");
      configBytes = files.read(configName, MAX_METADATA_BYTES);
      digest = sha256(configBytes);
      // The config's name carries its digest (`<hex>.json`, or `blobs/sha256/<hex>`).
      const named = /([0-9a-f]{64})(?:\.json)?$/.exec(configName)?.[1];
      if (named && `sha256:${named}` !== digest) throw new CubicleError("failed_precondition", `${sourceName}: config ${configName} does not match its digest (corrupt or tampered with)`);
      const config = parseImageConfig(configBytes);
      checkDiffIds(config, entry.Layers.length, sourceName);
      layers = (entry.Layers as string[]).map((layerPath, i) => {
        const name = path.posix.normalize(layerPath).replace(/^(\.\/|\/)+/, "");
        const blobDigest = /^blobs\/sha256\/([0-9a-f]{64})$/.exec(name)?.[1];
        return { name, digest: blobDigest ? `sha256:${blobDigest}` : undefined, diffId: config.diffIds[i], open: () => files.open(name) };
      });
    } else if (files.has("oci-layout") && files.has("index.json")) {
      const image = ociLayoutImage(files, options.image, sourceName);
      digest = image.digest;
      manifestDigest = image.manifestDigest;
      configBytes = image.config;
      const config = parseImageConfig(configBytes);
      checkDiffIds(config, image.layers.length, sourceName);
      layers = image.layers.map((layer, i) => ({ name: layer.digest, digest: layer.digest, diffId: config.diffIds[i], open: () => files.open(blobName(layer.digest), layer.size) }));
    } else {
      throw new CubicleError("invalid_argument", `${options.source} is neither a docker save tarball (manifest.json) nor an OCI image layout (oci-layout, index.json)`);
    }

    const config = parseImageConfig(configBytes);
    const { user, stats } = await assemble(
      layers.map((source) => ({ source, ready: Promise.resolve() })),
      options,
    );
    log.info("image imported", { source: options.source, digest, layers: layers.length, unpackedBytes: stats.bytes, ms: roundMs(performance.now() - started) });
    return { digest, manifestDigest, config, user, stats };
  } finally {
    if (decompressed) fs.rmSync(decompressed, { force: true });
  }
}
