import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { SANDBOX_UID_BASE } from "../../runtime/types.js";
import { RootfsWriter } from "./unpack.js";

/** The account every Cubicle sandbox runs user commands as (E2B's default user). */
export interface SandboxAccount {
  name: string;
  uid: number;
  gid: number;
  home: string;
  shell: string;
}

const DEFAULT_UID = 1000;

/**
 * Makes an unpacked image usable as a Cubicle rootfs: the account `user` (uid/gid 1000, home
 * /home/user, bash if the image has it) in /etc/passwd and /etc/group (files made when missing),
 * its home directory owned by it, /tmp mode 1777, and /etc/hosts and /etc/resolv.conf as regular
 * files (the runtime mounts over them; an image's symlink there, e.g. to systemd-resolved's
 * stub, would dangle). Every path is resolved inside the root: the image is still hostile.
 * An image that already has `user` keeps its ids and home.
 */
export function prepareRootfs(root: string, options: { idShift?: number } = {}): SandboxAccount {
  const idShift = options.idShift ?? SANDBOX_UID_BASE;
  const tree = new RootfsWriter(root, { idShift });
  const etc = tree.resolve(["etc"], { create: true, followLast: true })!;

  /** The content of an /etc file, following a symlink there only inside the root. */
  const readEtc = (name: string): string | undefined => {
    const resolved = tree.resolve(["etc", name], { create: false, followLast: true });
    if (!resolved) return undefined;
    const stats = fs.lstatSync(resolved, { throwIfNoEntry: false });
    if (!stats) return undefined;
    if (!stats.isFile()) throw new CubicleError("failed_precondition", `the image's /etc/${name} is not a regular file`);
    if (stats.size > 16 * 1024 * 1024) throw new CubicleError("failed_precondition", `the image's /etc/${name} is larger than 16 MiB`);
    return fs.readFileSync(resolved, "utf8");
  };
  /** Replaces /etc/<name> (whatever it was) with a regular file, atomically. */
  const writeEtc = (name: string, content: string, mode: number): void => {
    const temp = path.join(etc, `.${name}.cubicle-${randomBytes(4).toString("hex")}`);
    fs.writeFileSync(temp, content, { mode, flag: "wx" });
    fs.lchownSync(temp, idShift, idShift);
    fs.chmodSync(temp, mode);
    const target = path.join(etc, name);
    const existing = fs.lstatSync(target, { throwIfNoEntry: false });
    if (existing?.isDirectory()) fs.rmSync(target, { recursive: true, force: true });
    fs.renameSync(temp, target);
  };
  const isRegularFileInRoot = (parts: string[]): boolean => {
    const resolved = tree.resolve(parts, { create: false, followLast: true });
    return resolved !== undefined && (fs.statSync(resolved, { throwIfNoEntry: false })?.isFile() ?? false);
  };

  const shell = isRegularFileInRoot(["bin", "bash"]) ? "/bin/bash" : "/bin/sh";
  const passwd = readEtc("passwd");
  const group = readEtc("group");
  const lines = (text: string | undefined) => (text ?? "").split("\n").filter((line) => line !== "");
  const passwdLines = lines(passwd);
  const groupLines = lines(group);

  let account: SandboxAccount = { name: "user", uid: DEFAULT_UID, gid: DEFAULT_UID, home: "/home/user", shell };
  const existing = passwdLines.map((line) => line.split(":")).find((fields) => fields[0] === "user" && fields.length >= 7);
  if (existing) {
    const uid = Number(existing[2]);
    const gid = Number(existing[3]);
    if (Number.isInteger(uid) && Number.isInteger(gid) && uid >= 0 && gid >= 0 && uid < 65536 && gid < 65536) {
      account = { name: "user", uid, gid, home: existing[5] || "/home/user", shell: existing[6] || shell };
    }
  }
  if (passwd === undefined || !existing) {
    const base = passwd === undefined ? ["root:x:0:0:root:/root:/bin/sh"] : passwdLines;
    writeEtc("passwd", [...base, `user:x:${account.uid}:${account.gid}::${account.home}:${account.shell}`].join("\n") + "\n", 0o644);
  } else if (fs.lstatSync(path.join(etc, "passwd")).isSymbolicLink()) {
    writeEtc("passwd", passwd, 0o644);
  }
  const hasGroup = groupLines.some((line) => line.split(":")[0] === "user");
  if (group === undefined || !hasGroup) {
    const base = group === undefined ? ["root:x:0:"] : groupLines;
    writeEtc("group", [...base, ...(hasGroup ? [] : [`user:x:${account.gid}:`])].join("\n") + "\n", 0o644);
  } else if (fs.lstatSync(path.join(etc, "group")).isSymbolicLink()) {
    writeEtc("group", group, 0o644);
  }
  const shadow = readEtc("shadow");
  if (shadow !== undefined && !lines(shadow).some((line) => line.split(":")[0] === "user")) {
    writeEtc("shadow", [...lines(shadow), "user:*:19000:0:99999:7:::"].join("\n") + "\n", 0o640);
  }

  const homeParts = account.home.split("/").filter((part) => part !== "" && part !== "." && part !== "..");
  if (homeParts.length > 0) {
    const home = tree.resolve(homeParts, { create: true, followLast: true })!;
    const created = fs.readdirSync(home).length === 0;
    fs.lchownSync(home, account.uid + idShift, account.gid + idShift);
    if (created) fs.chmodSync(home, 0o755);
  }

  const tmpPath = path.join(root, "tmp");
  const tmp = fs.lstatSync(tmpPath, { throwIfNoEntry: false });
  if (!tmp?.isDirectory()) {
    if (tmp) fs.rmSync(tmpPath, { force: true });
    fs.mkdirSync(tmpPath);
    fs.lchownSync(tmpPath, idShift, idShift);
  }
  fs.chmodSync(tmpPath, 0o1777);

  for (const name of ["hosts", "resolv.conf"]) {
    const target = fs.lstatSync(path.join(etc, name), { throwIfNoEntry: false });
    if (target?.isFile()) continue;
    let content = "";
    try {
      content = readEtc(name) ?? "";
    } catch {
      content = "";
    }
    writeEtc(name, content, 0o644);
  }
  return account;
}
