/**
 * User metadata of files (`X-Metadata-*` on upload, `EntryInfo.metadata` on Stat/ListDir).
 *
 * Upstream envd keeps it in xattrs under `user.e2b.`. Node has no xattr call and the agent
 * must work in any template rootfs without native addons or helper binaries (getfattr/setfattr
 * are not in every image), so Cubicle keeps a sidecar instead: one small JSON file per
 * annotated file in a root-only directory outside user paths (default
 * `/var/lib/cubicle/file-metadata`, override with `CUBICLE_AGENT_METADATA_DIR`). It lives in
 * the sandbox's own filesystem, so snapshots, pause and fork carry it along.
 *
 * Entries are keyed by absolute path and stamped with (st_dev, st_ino) so they behave like
 * xattrs where it matters:
 * - Move and Remove through the API move / drop the entries (recursively for directories);
 * - a file deleted and recreated by a process at the same path gets a new inode on the same
 *   device, so the stale entry is ignored and dropped;
 * - after a restore into a new mount (new st_dev, inode numbers may differ) the entry is
 *   trusted by path and re-stamped.
 * Known gap: a rename done by a process inside the sandbox (`mv`) loses the metadata, where an
 * xattr would follow the inode.
 */
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { readRegularFileSync } from "./regular-file.js";

/** The xattr namespace upstream counts in the size limits. */
export const METADATA_KEY_PREFIX = "user.e2b.";
/** Linux limits an xattr name to 255 bytes, prefix included. */
export const MAX_METADATA_KEY_LENGTH = 255 - METADATA_KEY_PREFIX.length;
/** All keys (with prefix) and values of one file together. */
export const MAX_METADATA_TOTAL_LENGTH = 4096;

export type Metadata = Record<string, string>;

/** A sidecar holds a path and at most 4 KiB of metadata: anything much bigger is not one of ours. */
const maxEntryFileBytes = 64 * 1024;

interface StoredEntry {
  path: string;
  dev: string;
  ino: string;
  metadata: Metadata;
}

/** Upstream's `ValidateMetadata` rules; throws `invalid_argument` with upstream's wording. */
export function validateMetadata(metadata: Metadata): void {
  let total = 0;
  for (const [key, value] of Object.entries(metadata)) {
    if (key === "") throw new CubicleError("invalid_argument", "metadata key must not be empty");
    if (Buffer.byteLength(key) > MAX_METADATA_KEY_LENGTH) {
      throw new CubicleError("invalid_argument", `metadata key ${JSON.stringify(key)} exceeds ${MAX_METADATA_KEY_LENGTH} bytes`);
    }
    checkPrintableAscii("key", key);
    checkPrintableAscii(`value for key ${JSON.stringify(key)}`, value);
    total += METADATA_KEY_PREFIX.length + Buffer.byteLength(key) + Buffer.byteLength(value);
  }
  if (total > MAX_METADATA_TOTAL_LENGTH) {
    throw new CubicleError("invalid_argument", `total metadata size ${total} exceeds ${MAX_METADATA_TOTAL_LENGTH} bytes`);
  }
}

function checkPrintableAscii(label: string, text: string): void {
  const bytes = Buffer.from(text, "utf8");
  for (let offset = 0; offset < bytes.length; offset++) {
    const byte = bytes[offset]!;
    if (byte < 0x20 || byte > 0x7e) {
      throw new CubicleError(
        "invalid_argument",
        `metadata ${label} contains non-printable-ASCII byte 0x${byte.toString(16).padStart(2, "0")} at offset ${offset}`,
      );
    }
  }
}

export interface FileIdentity {
  dev: bigint | number;
  ino: bigint | number;
}

export class MetadataStore {
  private entries: Map<string, StoredEntry> | undefined;

  constructor(private readonly directory: string) {}

  /** The metadata of the file at `absolutePath` whose identity is `identity`, if any. */
  get(absolutePath: string, identity: FileIdentity): Metadata | undefined {
    const entry = this.load().get(absolutePath);
    if (!entry) return undefined;
    const dev = String(identity.dev);
    const ino = String(identity.ino);
    if (entry.dev === dev && entry.ino !== ino) {
      this.delete(absolutePath);
      return undefined;
    }
    if (entry.dev !== dev) this.write({ ...entry, dev, ino });
    return { ...entry.metadata };
  }

  /** Replaces the whole metadata set of a file; an empty set clears it. */
  replace(absolutePath: string, identity: FileIdentity, metadata: Metadata): void {
    validateMetadata(metadata);
    if (Object.keys(metadata).length === 0) {
      this.delete(absolutePath);
      return;
    }
    this.write({ path: absolutePath, dev: String(identity.dev), ino: String(identity.ino), metadata: { ...metadata } });
  }

  /** Follows a rename of `source` (a file or a whole directory tree) to `destination`. */
  move(source: string, destination: string): void {
    const entries = this.load();
    // The destination is replaced by the rename: its old entries are gone.
    for (const key of [...entries.keys()]) if (isSameOrInside(key, destination)) this.delete(key);
    for (const [key, entry] of [...entries]) {
      if (!isSameOrInside(key, source)) continue;
      this.delete(key);
      this.write({ ...entry, path: destination + key.slice(source.length) });
    }
  }

  /** Drops the entries of `absolutePath` and everything under it. */
  removeTree(absolutePath: string): void {
    for (const key of [...this.load().keys()]) if (isSameOrInside(key, absolutePath)) this.delete(key);
  }

  private load(): Map<string, StoredEntry> {
    if (this.entries) return this.entries;
    const entries = new Map<string, StoredEntry>();
    let names: string[] = [];
    try {
      names = fs.readdirSync(this.directory);
    } catch (reason) {
      if ((reason as NodeJS.ErrnoException).code !== "ENOENT") throw CubicleError.from(reason);
    }
    for (const name of names) {
      if (!name.endsWith(".json")) continue;
      try {
        // Bounded and never blocking: the sandbox's root can put anything in this directory.
        const entry = JSON.parse(readRegularFileSync(path.join(this.directory, name), maxEntryFileBytes)) as StoredEntry;
        if (typeof entry.path === "string" && entry.metadata) entries.set(entry.path, entry);
      } catch {
        // A torn or foreign file: ignore it.
      }
    }
    this.entries = entries;
    return entries;
  }

  private fileOf(absolutePath: string): string {
    return path.join(this.directory, crypto.createHash("sha256").update(absolutePath).digest("hex") + ".json");
  }

  private write(entry: StoredEntry): void {
    fs.mkdirSync(this.directory, { recursive: true, mode: 0o700 });
    const file = this.fileOf(entry.path);
    const temporary = `${file}.${process.pid}.tmp`;
    fs.writeFileSync(temporary, JSON.stringify(entry), { mode: 0o600 });
    fs.renameSync(temporary, file);
    this.load().set(entry.path, entry);
  }

  private delete(absolutePath: string): void {
    const entries = this.load();
    if (!entries.has(absolutePath)) return;
    entries.delete(absolutePath);
    try {
      fs.unlinkSync(this.fileOf(absolutePath));
    } catch {
      // Already gone.
    }
  }
}

function isSameOrInside(candidate: string, root: string): boolean {
  if (root === "/") return true;
  return candidate === root || candidate.startsWith(root + "/");
}

let defaultStore: MetadataStore | undefined;

/** The agent's metadata store (root only: call it outside `runAsUser`). */
export function metadataStore(): MetadataStore {
  defaultStore ??= new MetadataStore(process.env.CUBICLE_AGENT_METADATA_DIR ?? "/var/lib/cubicle/file-metadata");
  return defaultStore;
}
