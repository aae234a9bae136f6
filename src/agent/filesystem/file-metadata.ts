/**
 * User metadata of files (`X-Metadata-*` on upload, `EntryInfo.metadata` on Stat/ListDir and
 * watch events), stored as upstream envd stores it: extended attributes `user.e2b.<key>` on the
 * file itself (XATTR_NOTE). So metadata follows the inode through any rename, hard link, copy
 * with xattrs, snapshot, pause and fork, and what a process inside the sandbox sets with
 * `setfattr -n user.e2b.author` or `os.setxattr` is metadata too.
 *
 * XATTR_NOTE: Node has no xattr call, so the agent carries a small Node-API addon
 * (src/agent/native/xattr.c, `xattr.node` next to the agent). Reads use the l* calls (never
 * following a final symlink) and run with the requesting user's credentials, so the kernel's
 * rules apply (user.* attributes need read permission to read). Writes at upload go through the
 * open descriptor of the file written, as root. Without the addon (no C compiler when the
 * agent was built) entries carry no metadata and an upload with metadata is refused with 501.
 * A filesystem without user xattrs (tmpfs before 6.6) gives no metadata, and an upload with
 * metadata to it fails with 500 naming ENOTSUP.
 */
import path from "node:path";
import { CubicleError, errnoName } from "../../shared/cubicle-error.js";
import { loadNativeAddon } from "../../shared/native-addon.js";
/** The xattr namespace upstream counts in the size limits. */
export const METADATA_KEY_PREFIX = "user.e2b.";
/** Linux limits an xattr name to 255 bytes, prefix included. */
export const MAX_METADATA_KEY_LENGTH = 255 - METADATA_KEY_PREFIX.length;
/** All keys (with prefix) and values of one file together. */
export const MAX_METADATA_TOTAL_LENGTH = 4096;

export type Metadata = Record<string, string>;

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

interface XattrAddon {
  list(target: string | number, prefix: string): Array<[string, Buffer]>;
  set(target: string | number, name: string, value: Buffer): void;
  remove(target: string | number, name: string): void;
}

let addon: XattrAddon | null | undefined;

/** The addon next to the agent (or at `CUBICLE_AGENT_XATTR_ADDON`); null when it is not there. */
function xattrs(): XattrAddon | null {
  if (addon !== undefined) return addon;
  const file = process.env.CUBICLE_AGENT_XATTR_ADDON ?? path.join(path.dirname(process.argv[1] ?? "/"), "xattr.node");
  try {
    addon = loadNativeAddon<XattrAddon>(file);
  } catch {
    addon = null;
  }
  return addon;
}

/** Throws `unimplemented` when this agent cannot store file metadata (no addon). */
export function checkMetadataAvailable(): void {
  if (xattrs() === null) throw metadataUnavailable();
}

function metadataUnavailable(): CubicleError {
  return new CubicleError("unimplemented", "file metadata is not available in this sandbox: the agent was built without its xattr addon (install a C compiler and rebuild)");
}

/**
 * The metadata of `target` (a path, not following a final symlink, or an open descriptor), or
 * undefined when it has none. Values set from inside the sandbox may be any bytes: they are
 * read as UTF-8, like upstream's string conversion, with invalid bytes replaced. Call with the
 * credentials of the user asking (a file they cannot read shows no metadata).
 */
export function readMetadata(target: string | number): Metadata | undefined {
  const addon = xattrs();
  if (!addon) return undefined;
  let attributes: Array<[string, Buffer]>;
  try {
    attributes = addon.list(target, METADATA_KEY_PREFIX);
  } catch {
    // Gone, unreadable to this user, or a filesystem that refuses: no metadata, as upstream.
    return undefined;
  }
  let metadata: Metadata | undefined;
  for (const [name, value] of attributes) {
    const key = name.slice(METADATA_KEY_PREFIX.length);
    if (!key) continue;
    // Defined, not assigned: `__proto__` is a key like any other here.
    Object.defineProperty((metadata ??= {}), key, { value: value.toString("utf8"), enumerable: true, writable: true, configurable: true });
  }
  return metadata;
}

/**
 * Makes `metadata` the whole metadata set of the open file `fd` (validated first): attributes
 * under `user.e2b.` not in it are removed, an empty set clears them all.
 */
export function replaceMetadata(fd: number, metadata: Metadata): void {
  validateMetadata(metadata);
  const addon = xattrs();
  const wanted = Object.entries(metadata);
  if (!addon) {
    if (wanted.length === 0) return;
    throw metadataUnavailable();
  }
  try {
    for (const [name] of addon.list(fd, METADATA_KEY_PREFIX)) {
      if (!Object.hasOwn(metadata, name.slice(METADATA_KEY_PREFIX.length))) addon.remove(fd, name);
    }
    for (const [key, value] of wanted) addon.set(fd, METADATA_KEY_PREFIX + key, Buffer.from(value, "utf8"));
  } catch (reason) {
    const code = errnoName(reason);
    if (code === "ENOTSUP" && wanted.length === 0) return;
    // A full disk is the caller's to report (507 for an upload).
    if (code === "ENOSPC" || code === "EDQUOT") throw reason;
    throw new CubicleError("internal", `cannot store the file's metadata as extended attributes: ${(reason as Error).message}`, { cause: reason });
  }
}
