/**
 * A writer of cpio archives in the "newc" format (the one the Linux kernel unpacks as an
 * initramfs, Documentation/driver-api/early-userspace/buffer-format.rst): a 110-byte ASCII header
 * per entry (magic 070701 and 13 fields of 8 hex digits), the name with its NUL, padded to 4
 * bytes, the data padded to 4 bytes, and a final entry named TRAILER!!!.
 */
export type CpioEntry =
  | { kind: "directory"; name: string; mode?: number }
  | { kind: "file"; name: string; data: Buffer; mode?: number }
  | { kind: "symlink"; name: string; target: string }
  | { kind: "char-device"; name: string; major: number; minor: number; mode?: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;
const TRAILER = "TRAILER!!!";

/** The archive of `entries`, in order (a directory must come before what it holds), owned by root. */
export function writeCpioNewc(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let offset = 0;
  const push = (buffer: Buffer) => {
    parts.push(buffer);
    offset += buffer.length;
  };
  const pad = () => {
    const extra = (4 - (offset % 4)) % 4;
    if (extra) push(Buffer.alloc(extra));
  };
  let inode = 1;
  const add = (name: string, mode: number, data: Buffer, rdev: [number, number] = [0, 0]) => {
    if (name.length === 0 || name.startsWith("/") || name.includes("\0") || name.split("/").includes("..")) {
      throw new Error(`cpio: bad entry name ${JSON.stringify(name)}`);
    }
    const nameBytes = Buffer.from(name + "\0", "utf8");
    const fields = [inode++, mode, 0, 0, 1, 0, data.length, 0, 0, rdev[0], rdev[1], nameBytes.length, 0];
    push(Buffer.from("070701" + fields.map((value) => value.toString(16).padStart(8, "0")).join(""), "ascii"));
    push(nameBytes);
    pad();
    if (data.length) push(data);
    pad();
  };
  for (const entry of entries) {
    const name = entry.name.replace(/^\/+|\/+$/g, "");
    switch (entry.kind) {
      case "directory":
        add(name, S_IFDIR | (entry.mode ?? 0o755), Buffer.alloc(0));
        break;
      case "file":
        add(name, S_IFREG | (entry.mode ?? 0o644), entry.data);
        break;
      case "symlink":
        add(name, S_IFLNK | 0o777, Buffer.from(entry.target, "utf8"));
        break;
      case "char-device":
        add(name, S_IFCHR | (entry.mode ?? 0o600), Buffer.alloc(0), [entry.major, entry.minor]);
        break;
    }
  }
  inode = 0;
  add(TRAILER, 0, Buffer.alloc(0));
  return Buffer.concat(parts);
}
