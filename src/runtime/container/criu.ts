import { chmod, mkdir, readFile, rename, writeFile } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";

/** Where `scripts/setup-host.sh` records the CRIU it installed, in the default state dir. */
const DEFAULT_CRIU_PATH_FILE = "/var/lib/cubicle/criu/path";

/**
 * The CRIU binary runc must use (`runc --criu <path>`). Never the host's `criu` from PATH:
 * Debian 12's 3.17 fails on current kernels, so only what setup-host.sh verified is used
 * (explicit option, `CUBICLE_CRIU`, `<stateDir>/criu/path`, then the default state dir's file).
 */
export async function findCriu(stateDir: string, explicit: string | undefined): Promise<string> {
  if (explicit) return explicit;
  if (process.env.CUBICLE_CRIU) return process.env.CUBICLE_CRIU;
  for (const file of [path.join(stateDir, "criu", "path"), DEFAULT_CRIU_PATH_FILE]) {
    const recorded = (await readFile(file, "utf8").catch(() => "")).trim();
    if (recorded) return recorded;
  }
  throw new CubicleError("failed_precondition", "CRIU 4.2+ is not set up on this host; run scripts/setup-host.sh (it records the binary in <stateDir>/criu/path)");
}

/**
 * Options runc 1.1 cannot pass on its command line, given to CRIU through the config file that
 * runc names in its RPC request (the `org.criu.config` annotation of config.json; CRIU ≥ 3.11
 * lets the file override RPC options).
 *
 * - `tcp-close`: established TCP connections are neither dumped nor blocked, and come back
 *   closed. A restore usually lands in another netns with another address (clone, fork), where
 *   a repaired connection could never work; the peers (Cubicle's own keep-alive sockets, a
 *   user's client) see their connection end and reconnect. Listening sockets are dumped and
 *   serve again. It also spares the network lock (iptables inside the sandbox's netns).
 * - `skip-in-flight`: connections still in a listen queue (SYN received, not accepted) are
 *   dropped instead of failing the dump.
 * - `ghost-limit`: files deleted but still open are stored in the image; CRIU's default limit
 *   (1 MiB) would fail a dump of, say, a deleted log file a process still writes to.
 */
export const CRIU_CONFIG = ["tcp-close", "skip-in-flight", "ghost-limit 268435456", ""].join("\n");

/** Writes the CRIU config file named by every sandbox's `org.criu.config` annotation. */
export async function writeCriuConfig(file: string): Promise<void> {
  const current = await readFile(file, "utf8").catch(() => "");
  if (current === CRIU_CONFIG) return;
  await writeFile(`${file}.tmp-${process.pid}`, CRIU_CONFIG, { mode: 0o644 });
  await rename(`${file}.tmp-${process.pid}`, file);
}

/**
 * CRIU archives the sandbox's tmpfs mounts (/dev/shm, /dev) with `tar --gzip`, hard-coded
 * (mount.c): gzip manages ~35 MB/s, so 500 MB in /dev/shm kept the sandbox frozen for 25 s.
 * CRIU runs `tar` from PATH; runc gets this shim first in PATH for checkpoint and restore. It
 * drops `--gzip` when archiving and, when extracting, adds it back only for images that really
 * are gzip (magic 1f 8b; images made before the shim). GNU tar cannot detect compression on
 * stdin by itself. The image file keeps CRIU's `.tar.gz.img` name whatever its content.
 */
export function tarShim(realTar: string): string {
  return `#!/bin/sh
# Written by Cubicle (src/runtime/container/criu.ts): CRIU's tmpfs archives without gzip.
gzip=
case " $* " in
  *" --extract "*)
    # stdin is the image file: peek at its magic through a second open, not the shared offset.
    [ "$(od -An -tx1 -N2 /proc/self/fd/0 2>/dev/null | tr -d ' \n')" = "1f8b" ] && gzip=--gzip ;;
esac
for arg do
  shift
  [ "$arg" = "--gzip" ] || set -- "$@" "$arg"
done
exec ${realTar} $gzip "$@"
`;
}

/** Writes the tar shim as `<dir>/tar` (see tarShim); `realTar` is the host's GNU tar. */
export async function writeTarShim(dir: string, realTar: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o755 });
  await chmod(dir, 0o755);
  const content = tarShim(realTar);
  const file = path.join(dir, "tar");
  if ((await readFile(file, "utf8").catch(() => "")) === content) return;
  await writeFile(`${file}.tmp-${process.pid}`, content, { mode: 0o755 });
  await rename(`${file}.tmp-${process.pid}`, file);
}

/**
 * The interesting part of a CRIU log (runc has CRIU write `dump.log` / `restore.log` into the
 * work path): the error lines, then the last lines, which name the step that failed.
 */
export async function criuLogTail(logFile: string, lines = 12): Promise<string> {
  const text = await readFile(logFile, "utf8").catch(() => "");
  if (!text) return `(no CRIU log at ${logFile})`;
  const all = text.split("\n").filter(Boolean);
  const errors = all.filter((line) => /Error|error \(|fail/i.test(line)).slice(-6);
  const tail = all.slice(-lines);
  const picked = [...errors.filter((line) => !tail.includes(line)), ...tail];
  return picked.join("\n");
}
