import { spawn } from "node:child_process";
import { createHash, type Hash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { Duplex, PassThrough, Transform, type Readable, type TransformCallback } from "node:stream";
import { setTimeout as sleep } from "node:timers/promises";
import { pipeline } from "node:stream/promises";
import zlib from "node:zlib";
import { CubicleError, errnoName } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { createLogger, type Logger } from "../../shared/log.js";
import { SANDBOX_UID_BASE, SANDBOX_UID_COUNT } from "../../runtime/types.js";
import { applyLayerXattrs } from "./layer-xattrs.js";
import { readTar, type TarEntry } from "./tar-reader.js";

/**
 * Applies image layers, in order, to a directory: the OCI image-spec "applying changesets"
 * (layer.md) with whiteouts (`.wh.<name>`) and opaque directories (`.wh..wh..opq`).
 *
 * Layers are hostile input. Every name is resolved inside the root the way the sandbox's
 * kernel would resolve it with the root as `/`: `..` stops at the root, absolute names start at
 * the root, and symlinks already in the tree (from this layer or earlier ones) are followed
 * inside the root (`evil -> /etc` then `evil/passwd` lands in `<root>/etc/passwd`). The last
 * component of a name is never followed: an entry replaces what is there. Nothing else writes to
 * the tree while a layer is applied (it is a private temp dir), so a userspace walk is sound.
 *
 * Ownership: every uid/gid is shifted by `idShift` (SANDBOX_UID_BASE: root inside = 100000 on
 * disk); ids outside the sandbox's range become nobody (65534). setuid/setgid bits are kept.
 * Device nodes are skipped (a sandbox gets its own /dev) and counted. Extended attributes:
 * `user.*` and file capabilities (rewritten for the sandbox's root) are kept, the rest dropped
 * and counted (LAYER_XATTRS_NOTE in layer-xattrs.ts).
 */

export interface LayerSource {
  /** What errors and logs call the layer: its digest or its path in a tarball. */
  name: string;
  /** Opens the layer's bytes as stored (compressed or not: sniffed from the magic bytes). */
  open(): Readable;
  /** sha256 of the bytes as stored; verified after the last byte. */
  digest?: string;
  /** sha256 of the uncompressed tar (the config's `rootfs.diff_ids`); verified as well. */
  diffId?: string;
}

export interface UnpackOptions {
  /** Added to every uid/gid. Default SANDBOX_UID_BASE. */
  idShift?: number;
  /** Largest total of regular-file bytes written, over all layers. Default 64 GiB. */
  maxBytes?: number;
  /** Largest number of entries, over all layers. Default 4 million. */
  maxEntries?: number;
  signal?: AbortSignal;
  log?: Logger;
  /** The xattr addon (`<distDir>/agent/xattr.node`) that keeps LAYER_XATTRS_NOTE's attributes; without it all are dropped. */
  xattrAddon?: string;
}

export interface UnpackStats {
  entries: number;
  /** Bytes of regular-file data written (before whiteouts removed any). */
  bytes: number;
  /** Device nodes skipped. */
  devicesSkipped: number;
  /** Entries with an extended attribute that was dropped (LAYER_XATTRS_NOTE). */
  xattrsDropped: number;
  /** Entries whose uid or gid was outside the sandbox range (mapped to nobody). */
  idsOutOfRange: number;
  /** Entry names that tried to leave the root (`..` above it, absolute paths): clamped inside. */
  namesClamped: number;
}

const NOBODY = 65534;
const MAX_SYMLINK_HOPS = 40;
const WHITEOUT_PREFIX = ".wh.";
const OPAQUE_MARKER = ".wh..wh..opq";

/** An error from a layer's content: the image is broken or hostile. */
function badLayer(layer: string, message: string, cause?: unknown): CubicleError {
  return new CubicleError("failed_precondition", `layer ${layer}: ${message}`, cause === undefined ? undefined : { cause });
}

/** Hashes what flows through, passing it on untouched. */
class DigestTap extends Transform {
  readonly hash: Hash = createHash("sha256");
  bytes = 0;
  _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    callback(null, chunk);
  }
  digest(): string {
    return `sha256:${this.hash.digest("hex")}`;
  }
}

type Compression = "gzip" | "zstd" | "none";

function sniff(head: Buffer): Compression {
  if (head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b) return "gzip";
  if (head.length >= 4 && head.readUInt32LE(0) === 0xfd2fb528) return "zstd";
  return "none";
}

/** The first `bytes` bytes of a stream (fewer if it is shorter); the stream is destroyed. */
async function readHead(stream: Readable, bytes: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  let total = 0;
  try {
    for await (const chunk of stream) {
      parts.push(Buffer.from(chunk as Buffer));
      total += (chunk as Buffer).length;
      if (total >= bytes) break;
    }
  } finally {
    stream.destroy();
  }
  return Buffer.concat(parts).subarray(0, bytes);
}

/** Decompresses zstd with Debian's `zstd` binary (Node 20's zlib has no zstd). */
function zstdDecompressor(layer: string): { stream: Duplex; exit: Promise<CubicleError | undefined>; kill(): void } {
  const child = spawn("zstd", ["-d", "-c", "-q"], { stdio: ["pipe", "pipe", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (chunk: Buffer) => {
    if (stderr.length < 4096) stderr += chunk.toString("utf8");
  });
  const exit = new Promise<CubicleError | undefined>((resolve) => {
    child.on("error", (err) => resolve(new CubicleError("failed_precondition", `layer ${layer}: cannot run zstd (install Debian's zstd package): ${err.message}`, { cause: err })));
    child.on("close", (code, signal) => {
      resolve(code === 0 ? undefined : badLayer(layer, `zstd could not decompress it (${signal ?? `exit ${code}`}): ${stderr.trim().slice(-500)}`));
    });
  });
  return {
    stream: Duplex.from({ writable: child.stdin, readable: child.stdout }),
    exit,
    kill: () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    },
  };
}

/** Splits an archive name into components with `.` and empty parts dropped and `..` clamped at the root. */
function normalizeName(name: string): { parts: string[]; clamped: boolean } {
  const parts: string[] = [];
  let clamped = name.startsWith("/");
  for (const part of name.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") {
      if (parts.length === 0) clamped = true;
      else parts.pop();
      continue;
    }
    parts.push(part);
  }
  return { parts, clamped };
}

/**
 * Writes layers into one root directory. Use `unpackLayers` unless several calls must share the
 * tree (it creates the directory and removes it on failure).
 */
export class RootfsWriter {
  readonly stats: UnpackStats = { entries: 0, bytes: 0, devicesSkipped: 0, xattrsDropped: 0, idsOutOfRange: 0, namesClamped: 0 };
  private readonly idShift: number;
  private readonly maxBytes: number;
  private readonly maxEntries: number;
  private readonly log: Logger;
  private readonly signal?: AbortSignal;
  private readonly xattrAddon?: string;

  constructor(
    readonly root: string,
    options: UnpackOptions = {},
  ) {
    this.idShift = options.idShift ?? SANDBOX_UID_BASE;
    this.maxBytes = options.maxBytes ?? 64 * 1024 ** 3;
    this.maxEntries = options.maxEntries ?? 4_000_000;
    this.log = options.log ?? createLogger("oci");
    this.signal = options.signal;
    this.xattrAddon = options.xattrAddon;
  }

  private shiftId(id: number): number {
    if (id < 0 || id >= SANDBOX_UID_COUNT) {
      this.stats.idsOutOfRange += 1;
      return NOBODY + this.idShift;
    }
    return id + this.idShift;
  }

  /**
   * The host path of `parts` inside the root. Symlinks met on the way are followed inside the
   * root; the last component is followed only when `followLast`. Missing directories on the way
   * are created (owned by the sandbox's root) when `create`, else the result is undefined.
   */
  resolve(parts: readonly string[], options: { create: boolean; followLast: boolean }): string | undefined {
    const resolved: string[] = [];
    // Components still to walk, last one first (pop from the end).
    const todo = [...parts].reverse();
    let hops = 0;
    while (todo.length > 0) {
      const part = todo.pop()!;
      if (part === "" || part === ".") continue;
      if (part === "..") {
        resolved.pop();
        continue;
      }
      const isLast = todo.length === 0;
      const candidate = path.join(this.root, ...resolved, part);
      let stats: fs.Stats | undefined;
      try {
        stats = fs.lstatSync(candidate);
      } catch (err) {
        if (errnoName(err) !== "ENOENT") throw err;
      }
      if (stats?.isSymbolicLink() && (!isLast || options.followLast)) {
        if (++hops > MAX_SYMLINK_HOPS) throw new CubicleError("failed_precondition", `too many levels of symbolic links resolving /${parts.join("/")}`);
        const target = fs.readlinkSync(candidate);
        if (target.startsWith("/")) resolved.length = 0;
        for (const next of target.split("/").reverse()) todo.push(next);
        continue;
      }
      if (!stats) {
        if (!options.create) {
          if (!isLast) return undefined;
          resolved.push(part);
          break;
        }
        fs.mkdirSync(candidate, { mode: 0o755 });
        fs.lchownSync(candidate, this.idShift, this.idShift);
      } else if (!stats.isDirectory() && (!isLast || options.create)) {
        if (!options.create) return undefined;
        throw new CubicleError("failed_precondition", `/${parts.join("/")}: /${[...resolved, part].join("/")} is not a directory`);
      }
      resolved.push(part);
    }
    return path.join(this.root, ...resolved);
  }

  /** Applies one layer on top of what the root holds. */
  async applyLayer(source: LayerSource): Promise<void> {
    let raw: Readable | undefined;
    let zstd: ReturnType<typeof zstdDecompressor> | undefined;
    try {
      // Layers are sniffed, not trusted to their media type: `docker save` and some registries
      // label them loosely. Opening twice is cheap for the files and ranges layers come from.
      const compression = sniff(await readHead(source.open(), 4));
      raw = source.open();
      const storedTap = new DigestTap();
      const tarTap = new DigestTap();
      const decompressor = compression === "gzip" ? zlib.createGunzip() : compression === "zstd" ? (zstd = zstdDecompressor(source.name)).stream : new PassThrough();
      await pipeline(raw, storedTap, decompressor, tarTap, async (tar: AsyncIterable<Buffer>) => this.applyTar(source.name, tar), { signal: this.signal });
      const zstdError = await zstd?.exit;
      if (zstdError) throw zstdError;
      const storedDigest = storedTap.digest();
      const tarDigest = tarTap.digest();
      if (source.digest && storedDigest !== source.digest) {
        throw new CubicleError("failed_precondition", `layer ${source.name}: digest mismatch: expected ${source.digest}, got ${storedDigest} (the blob is corrupt or was tampered with)`);
      }
      if (source.diffId && tarDigest !== source.diffId) {
        throw new CubicleError("failed_precondition", `layer ${source.name}: uncompressed digest mismatch: the image config's diff_id is ${source.diffId}, the layer is ${tarDigest}`);
      }
      this.log.debug("layer applied", { layer: source.name, compression, storedBytes: storedTap.bytes, tarBytes: tarTap.bytes });
    } catch (err) {
      // A truncated stream or a broken pipe is what zstd's own failure looks like from here:
      // its message says more, if it exits with one soon.
      const zstdError = zstd && (await Promise.race([zstd.exit, sleep(200).then(() => undefined)]));
      throw this.explain(source.name, zstdError && !zstdError.message.includes("SIGKILL") ? zstdError : err);
    } finally {
      zstd?.kill();
      raw?.destroy();
    }
  }

  private explain(layer: string, err: unknown): CubicleError {
    if (this.signal?.aborted) return new CubicleError("canceled", `unpacking layer ${layer} was canceled`, { cause: err });
    if (err instanceof CubicleError) return err;
    const errno = errnoName(err);
    if (errno === "ENOSPC" || errno === "EDQUOT") {
      return new CubicleError("insufficient_storage", `no space left for the image's files under ${path.dirname(this.root)} (layer ${layer}); free disk space or pull a smaller image`, { cause: err });
    }
    if (errno?.startsWith("Z_") || errno === "ERR_PADDING_1" || errno === "ERR_PADDING_2") {
      return badLayer(layer, `not a valid gzip stream (${(err as Error).message})`, err);
    }
    return CubicleError.from(err);
  }

  private async applyTar(layer: string, tar: AsyncIterable<Buffer>): Promise<void> {
    // Paths (host) created or replaced by this layer: an opaque marker hides only lower layers.
    const touched = new Set<string>();
    const dirTimes: Array<[string, number]> = [];
    for await (const { entry, body } of readTar(tar)) {
      if (this.signal?.aborted) throw new CubicleError("canceled", "unpack canceled");
      if (++this.stats.entries > this.maxEntries) {
        throw new CubicleError("resource_exhausted", `the image has more than ${this.maxEntries} files`);
      }
      await this.applyEntry(layer, entry, body, touched, dirTimes);
    }
    // Directory times last: writing their children changed them.
    for (const [dir, mtime] of dirTimes.reverse()) {
      try {
        fs.lutimesSync(dir, mtime, mtime);
      } catch (err) {
        if (errnoName(err) !== "ENOENT") throw err;
      }
    }
  }

  private async applyEntry(layer: string, entry: TarEntry, body: AsyncGenerator<Buffer>, touched: Set<string>, dirTimes: Array<[string, number]>): Promise<void> {
    const { parts, clamped } = normalizeName(entry.path);
    if (clamped) this.stats.namesClamped += 1;
    // Attributes of the kinds of entry that keep none (links, fifos, devices, the root, whiteouts).
    const keepsXattrs = parts.length > 0 && (entry.type === "file" || entry.type === "directory");
    if (entry.xattrs.size > 0 && !keepsXattrs) this.stats.xattrsDropped += 1;

    if (parts.length === 0) {
      // The root itself ("./"): only its metadata.
      if (entry.type === "directory") {
        fs.lchownSync(this.root, this.shiftId(entry.uid), this.shiftId(entry.gid));
        fs.chmodSync(this.root, entry.mode);
        dirTimes.push([this.root, entry.mtime]);
      }
      return;
    }
    const base = parts[parts.length - 1]!;
    const parent = this.resolve(parts.slice(0, -1), { create: true, followLast: true })!;

    if (base === OPAQUE_MARKER) {
      for (const child of fs.readdirSync(parent)) {
        const childPath = path.join(parent, child);
        if (!touched.has(childPath)) fs.rmSync(childPath, { recursive: true, force: true });
      }
      return;
    }
    if (base.startsWith(WHITEOUT_PREFIX)) {
      const hidden = base.slice(WHITEOUT_PREFIX.length);
      if (hidden === "" || hidden === "." || hidden === "..") throw badLayer(layer, `invalid whiteout ${entry.path}`);
      const target = path.join(parent, hidden);
      if (!touched.has(target)) fs.rmSync(target, { recursive: true, force: true });
      return;
    }

    const target = path.join(parent, base);
    let existing: fs.Stats | undefined;
    try {
      existing = fs.lstatSync(target);
    } catch (err) {
      if (errnoName(err) !== "ENOENT") throw err;
    }
    touched.add(target);
    const uid = this.shiftId(entry.uid);
    const gid = this.shiftId(entry.gid);

    if (entry.type === "directory") {
      if (existing && !existing.isDirectory()) {
        fs.rmSync(target, { force: true });
        existing = undefined;
      }
      if (!existing) fs.mkdirSync(target, { mode: 0o700 });
      fs.lchownSync(target, uid, gid);
      fs.chmodSync(target, entry.mode); // after chown, which would clear setgid
      if (entry.xattrs.size > 0 && applyLayerXattrs(target, "directory", entry.xattrs, this.idShift, this.xattrAddon) > 0) this.stats.xattrsDropped += 1;
      dirTimes.push([target, entry.mtime]);
      return;
    }

    if (entry.type === "hardlink") {
      // Resolve the link target before removing anything: it may be the same name.
      const { parts: linkParts } = normalizeName(entry.linkPath);
      const linkTarget = linkParts.length === 0 ? undefined : this.resolve(linkParts, { create: false, followLast: false });
      let linkStats: fs.Stats | undefined;
      if (linkTarget) linkStats = fs.lstatSync(linkTarget, { throwIfNoEntry: false });
      if (!linkTarget || !linkStats) throw badLayer(layer, `hard link ${entry.path} points to ${entry.linkPath}, which is not in the image`);
      if (linkStats.isDirectory()) throw badLayer(layer, `hard link ${entry.path} points to a directory`);
      if (linkTarget === target) return;
      if (existing) fs.rmSync(target, { recursive: true, force: true });
      fs.linkSync(linkTarget, target);
      return;
    }

    if (entry.type === "chardev" || entry.type === "blockdev") {
      this.stats.devicesSkipped += 1;
      return;
    }

    if (existing) fs.rmSync(target, { recursive: true, force: true });

    if (entry.type === "symlink") {
      fs.symlinkSync(entry.linkPath, target);
      fs.lchownSync(target, uid, gid);
      fs.lutimesSync(target, entry.mtime, entry.mtime);
      return;
    }

    if (entry.type === "fifo") {
      // Node has no mkfifo(3); image layers rarely carry one.
      await runCommand(["mkfifo", "-m", "600", "--", target], { timeoutMs: 10_000 });
      fs.lchownSync(target, uid, gid);
      fs.chmodSync(target, entry.mode);
      fs.lutimesSync(target, entry.mtime, entry.mtime);
      return;
    }

    // A regular file.
    if (this.stats.bytes + entry.size > this.maxBytes) {
      throw new CubicleError("resource_exhausted", `the image is larger than the limit of ${this.maxBytes} bytes (at ${entry.path} in layer ${layer})`);
    }
    const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;
    const fd = fs.openSync(target, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
    try {
      for await (const chunk of body) {
        let offset = 0;
        while (offset < chunk.length) offset += fs.writeSync(fd, chunk, offset, chunk.length - offset);
        this.stats.bytes += chunk.length;
      }
      fs.fchownSync(fd, uid, gid);
      fs.fchmodSync(fd, entry.mode); // after chown, which clears setuid/setgid
      // After the content and the chown, each of which clears file capabilities.
      if (entry.xattrs.size > 0 && applyLayerXattrs(fd, "file", entry.xattrs, this.idShift, this.xattrAddon) > 0) this.stats.xattrsDropped += 1;
      fs.futimesSync(fd, entry.mtime, entry.mtime);
    } finally {
      fs.closeSync(fd);
    }
  }
}

/**
 * Creates `destDir` (it must not exist; its parent must) and applies `layers` in order. On any
 * failure nothing is left at `destDir`.
 */
export async function unpackLayers(layers: readonly LayerSource[], destDir: string, options: UnpackOptions = {}): Promise<UnpackStats> {
  const idShift = options.idShift ?? SANDBOX_UID_BASE;
  try {
    fs.mkdirSync(destDir, { mode: 0o755 });
  } catch (err) {
    if (errnoName(err) === "EEXIST") throw new CubicleError("already_exists", `${destDir} already exists`);
    throw CubicleError.from(err);
  }
  try {
    fs.lchownSync(destDir, idShift, idShift);
    const writer = new RootfsWriter(destDir, options);
    for (const layer of layers) await writer.applyLayer(layer);
    const { stats } = writer;
    if (stats.devicesSkipped || stats.xattrsDropped || stats.idsOutOfRange || stats.namesClamped) {
      (options.log ?? createLogger("oci")).info("unpacked with adjustments", {
        devicesSkipped: stats.devicesSkipped,
        xattrsDropped: stats.xattrsDropped,
        idsOutOfRange: stats.idsOutOfRange,
        namesClamped: stats.namesClamped,
      });
    }
    return stats;
  } catch (err) {
    fs.rmSync(destDir, { recursive: true, force: true });
    throw err;
  }
}
