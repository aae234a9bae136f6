import { loadNativeAddon } from "../../shared/native-addon.js";

/**
 * LAYER_XATTRS_NOTE: which extended attributes of an image layer reach the template's tree.
 *
 * - `user.*`: kept as they are (data an application stored; no meaning to the kernel).
 * - `security.capability` (file capabilities, e.g. `cap_net_bind_service+ep` on a server
 *   binary) on regular files: kept, always rewritten to the namespaced form (VFS_CAP_REVISION_3)
 *   whose root id is the tree's root on disk (`idShift`: 100000). The kernel honours such
 *   capabilities only in a user namespace whose root is that uid: through the idmapped mount of
 *   the template a sandbox's root is (its own range), and the capabilities stay inside its
 *   bounding set. A host process that runs the file gets nothing (its root is uid 0), which is
 *   why a revision-2 value, which would apply on the host, is never written as it came.
 * - Everything else (`security.selinux`, `security.ima`, `trusted.*`, `system.*` ACLs, …) is
 *   dropped and counted: this host does not enforce the image's labels, and trusted and system
 *   attributes are the host's own business.
 *
 * Set through the agent's xattr addon (`<distDir>/agent/xattr.node`, XATTR_NOTE): Node has no
 * setxattr. Without the addon (none given, or it does not load) every attribute is dropped and
 * counted.
 */

/** The addon's calls used here (src/agent/native/xattr.c). */
interface XattrAddon {
  set(target: string | number, name: string, value: Buffer): void;
}

/** Loaded addons by path (null: it would not load). */
const addons = new Map<string, XattrAddon | null>();

function loadAddon(file: string): XattrAddon | null {
  let addon = addons.get(file);
  if (addon !== undefined) return addon;
  try {
    addon = loadNativeAddon<XattrAddon>(file);
  } catch {
    addon = null;
  }
  addons.set(file, addon);
  return addon;
}

const VFS_CAP_REVISION_MASK = 0xff000000;
const VFS_CAP_FLAGS_EFFECTIVE = 0x000001;
const VFS_CAP_REVISION_1 = 0x01000000;
const VFS_CAP_REVISION_2 = 0x02000000;
const VFS_CAP_REVISION_3 = 0x03000000;

/**
 * A file-capability value as the namespaced revision 3 with `rootId`; undefined when `value` is
 * not a well-formed revision 1, 2 or 3 value. Revisions 1 and 2 name no root (they mean the
 * host's); a revision 3 value's own root id is the image's business and is replaced as well.
 */
export function namespacedCapability(value: Buffer, rootId: number): Buffer | undefined {
  if (value.length < 4) return undefined;
  const magic = value.readUInt32LE(0);
  const revision = (magic & VFS_CAP_REVISION_MASK) >>> 0;
  const flags = magic & ~VFS_CAP_REVISION_MASK;
  if ((flags & ~VFS_CAP_FLAGS_EFFECTIVE) !== 0) return undefined;
  // permitted and inheritable, low 32 bits then (revisions 2, 3) high 32 bits.
  let words: number[];
  if (revision === VFS_CAP_REVISION_1 && value.length === 12) words = [value.readUInt32LE(4), value.readUInt32LE(8), 0, 0];
  else if ((revision === VFS_CAP_REVISION_2 && value.length === 20) || (revision === VFS_CAP_REVISION_3 && value.length === 24)) {
    words = [value.readUInt32LE(4), value.readUInt32LE(8), value.readUInt32LE(12), value.readUInt32LE(16)];
  } else return undefined;
  const out = Buffer.alloc(24);
  out.writeUInt32LE((VFS_CAP_REVISION_3 | flags) >>> 0, 0);
  words.forEach((word, index) => out.writeUInt32LE(word >>> 0, 4 + 4 * index));
  out.writeUInt32LE(rootId >>> 0, 20);
  return out;
}

/**
 * Sets the attributes of one entry that LAYER_XATTRS_NOTE keeps, on an open regular file's
 * descriptor or a directory's path, after its owner and mode are final (a chown clears file
 * capabilities); returns how many it dropped.
 */
export function applyLayerXattrs(target: number | string, kind: "file" | "directory", xattrs: ReadonlyMap<string, Buffer>, rootId: number, addonFile: string | undefined): number {
  const setter = xattrs.size > 0 && addonFile ? loadAddon(addonFile) : null;
  let dropped = 0;
  for (const [name, value] of xattrs) {
    let stored: Buffer | undefined;
    if (name.startsWith("user.") && name.length > "user.".length) stored = value;
    else if (name === "security.capability" && kind === "file") stored = namespacedCapability(value, rootId);
    if (!stored || !setter) {
      dropped += 1;
      continue;
    }
    try {
      setter.set(target, name, stored);
    } catch {
      // Too large, or a filesystem without user xattrs: the entry stays without it.
      dropped += 1;
    }
  }
  return dropped;
}
