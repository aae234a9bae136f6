import fs from "node:fs/promises";
import path from "node:path";
import { randomBytes } from "node:crypto";
import { CubicleError } from "../shared/cubicle-error.js";
import { runCommand } from "../shared/exec.js";
import type { Logger } from "../shared/log.js";
import { SANDBOX_UID_BASE } from "../runtime/types.js";
import { recipeHash, type Recipe } from "./recipe.js";
import { shiftOwnership } from "./shift-ownership.js";
import { BUILD_DIR_PREFIX, RETIRED_DIR_PREFIX, ROOTFS_DIR, templatePath, writeStamp, type TreeStamp } from "./template-store.js";

export const DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian";

export interface BuildOptions {
  /** Debian mirror mmdebstrap downloads from. */
  mirror: string;
  log: Logger;
  /** Limit for the whole `mmdebstrap` run. Default 20 min. */
  bootstrapTimeoutMs?: number;
  /** What the build is doing now, in a few words (mmdebstrap's own steps while it runs). */
  onProgress?: (message: string) => void;
}

/** PATH and locale for commands run inside the tree, independent of the server's own env. */
const CHROOT_ENV = {
  PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
  LANG: "C.UTF-8",
  HOME: "/root",
};

/** A recipe's tree as a build left it in the template cache. */
export interface BuiltTree {
  stamp: TreeStamp;
  rootfsDir: string;
}

/**
 * Builds `recipe`'s tree into `<templateDir>/<templateId>`, replacing what is there. The caller
 * holds the template's build lock and records the template in the store. Everything happens
 * in a `.build-*` directory that is renamed into place only when complete, so a crash leaves
 * no tree that looks ready.
 */
export async function buildTemplate(recipe: Recipe, templateDir: string, options: BuildOptions): Promise<BuiltTree> {
  const { log } = options;
  const startedAt = Date.now();
  await fs.mkdir(templateDir, { recursive: true });
  await removeLeftovers(templateDir, recipe.templateId);

  const stagingDir = path.join(templateDir, `${BUILD_DIR_PREFIX}${recipe.templateId}-${randomBytes(4).toString("hex")}`);
  // Not mkdtemp: that makes the directory 0700, and the sandbox's mapped root must traverse it.
  await fs.mkdir(stagingDir, { mode: 0o755 });
  await fs.chmod(stagingDir, 0o755);
  const rootfsDir = path.join(stagingDir, ROOTFS_DIR);
  try {
    log.info("bootstrapping Debian", { templateId: recipe.templateId, suite: recipe.suite, packages: recipe.packages.length });
    options.onProgress?.(`bootstrapping Debian ${recipe.suite} (${recipe.packages.length} packages)`);
    await runCommand(mmdebstrapArgv(recipe, rootfsDir, options.mirror), {
      timeoutMs: options.bootstrapTimeoutMs ?? 20 * 60_000,
      // mmdebstrap's "I: <step>..." lines.
      onStderrLine: (line) => {
        const step = /^I: (.{1,80})/.exec(line)?.[1];
        if (step) options.onProgress?.(step.replace(/\.\.\.$/, ""));
      },
    });
    const bootstrappedAt = Date.now();

    options.onProgress?.("adding users, files and the recipe's steps");
    await applyRecipe(recipe, rootfsDir);
    options.onProgress?.("shifting ownership to the sandbox id range");
    const shifted = shiftOwnership(rootfsDir, SANDBOX_UID_BASE);
    log.info("rootfs ready", {
      templateId: recipe.templateId,
      bootstrapMs: bootstrappedAt - startedAt,
      setupMs: Date.now() - bootstrappedAt,
      files: shifted.entries,
      sizeMB: Math.round(shifted.sizeBytes / 2 ** 20),
    });

    const stamp: TreeStamp = { recipeHash: recipeHash(recipe), builtAt: new Date().toISOString(), sizeBytes: shifted.sizeBytes };
    await writeStamp(stagingDir, stamp);

    const finalDir = templatePath(templateDir, recipe.templateId);
    await replaceDirectory(stagingDir, finalDir);
    log.info("template built", { templateId: recipe.templateId, ms: Date.now() - startedAt });
    return { stamp, rootfsDir: path.join(finalDir, ROOTFS_DIR) };
  } catch (err) {
    await fs.rm(stagingDir, { recursive: true, force: true }).catch(() => undefined);
    const cause = CubicleError.from(err);
    throw new CubicleError(cause.code, `building template '${recipe.templateId}' failed: ${cause.message}`, {
      cause: err,
      details: cause.details,
    });
  }
}

/** The mmdebstrap command line for a recipe. */
export function mmdebstrapArgv(recipe: Recipe, rootfsDir: string, mirror: string): string[] {
  return [
    "mmdebstrap",
    "--mode=root",
    "--format=directory",
    `--variant=${recipe.variant}`,
    ...(recipe.packages.length > 0 ? [`--include=${recipe.packages.join(",")}`] : []),
    '--aptopt=APT::Install-Recommends "false"',
    '--aptopt=Acquire::Retries "3"',
    ...recipe.dpkgPathFilters.map((filter) => `--dpkgopt=${filter}`),
    recipe.suite,
    rootfsDir,
    mirror,
  ];
}

/** Users, directories, files and extra steps, in that order, inside a bootstrapped tree. */
async function applyRecipe(recipe: Recipe, rootfsDir: string): Promise<void> {
  const inTree = (argv: string[]) => runCommand(["chroot", rootfsDir, ...argv], { env: CHROOT_ENV, timeoutMs: 5 * 60_000 });

  for (const group of recipe.groups) {
    await inTree(["groupadd", "--gid", String(group.gid), group.name]);
  }
  for (const user of recipe.users) {
    await inTree([
      "useradd",
      "--create-home",
      "--home-dir", user.home,
      "--uid", String(user.uid),
      "--gid", String(user.gid),
      "--shell", user.shell,
      ...(user.groups.length > 0 ? ["--groups", user.groups.join(",")] : []),
      user.name,
    ]);
    if (user.passwordlessSudo) {
      await writeTreeFile(rootfsDir, `/etc/sudoers.d/${user.name}`, `${user.name} ALL=(ALL:ALL) NOPASSWD: ALL\n`, 0o440);
    }
  }
  for (const dir of recipe.directories) {
    const hostPath = treePath(rootfsDir, dir.path);
    await fs.mkdir(hostPath, { recursive: true });
    await fs.chmod(hostPath, dir.mode);
  }
  for (const file of recipe.files) {
    await writeTreeFile(rootfsDir, file.path, file.content, file.mode);
  }
  for (const step of recipe.steps) {
    await inTree(step);
  }
  if (recipe.users.some((u) => u.passwordlessSudo)) {
    await inTree(["visudo", "--check", "--quiet"]);
  }
}

/**
 * Writes a file inside the tree. An existing entry is removed first: mmdebstrap leaves the
 * host's `/etc/resolv.conf` there, and writing through a symbolic link would land on the host.
 */
async function writeTreeFile(rootfsDir: string, treeFile: string, content: string, mode: number): Promise<void> {
  const hostPath = treePath(rootfsDir, treeFile);
  await fs.rm(hostPath, { force: true });
  await fs.writeFile(hostPath, content, { flag: "wx", mode });
  await fs.chmod(hostPath, mode);
}

function treePath(rootfsDir: string, treeFile: string): string {
  const resolved = path.resolve(rootfsDir, "." + path.posix.normalize("/" + treeFile));
  if (!resolved.startsWith(rootfsDir + path.sep)) {
    throw new CubicleError("invalid_argument", `recipe path ${treeFile} leaves the rootfs`);
  }
  return resolved;
}

/** Puts `stagingDir` at `finalDir`, moving an older build aside first and removing it. */
export async function replaceDirectory(stagingDir: string, finalDir: string): Promise<void> {
  const retiredDir = path.join(
    path.dirname(finalDir),
    `${RETIRED_DIR_PREFIX}${path.basename(finalDir)}-${randomBytes(4).toString("hex")}`,
  );
  let retired = false;
  try {
    await fs.rename(finalDir, retiredDir);
    retired = true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
  await fs.rename(stagingDir, finalDir);
  if (retired) await fs.rm(retiredDir, { recursive: true, force: true });
}

/** Removes half-built and retired directories of this template left by a crash. */
async function removeLeftovers(templateDir: string, templateId: string): Promise<void> {
  // Exact shape, so that cleaning `base` never touches the build of a template `base-x`.
  const ours = new RegExp(`^(${escapeRegExp(BUILD_DIR_PREFIX)}|${escapeRegExp(RETIRED_DIR_PREFIX)})${escapeRegExp(templateId)}-[0-9a-f]{8}$`);
  for (const name of await fs.readdir(templateDir)) {
    if (ours.test(name)) {
      await fs.rm(path.join(templateDir, name), { recursive: true, force: true });
    }
  }
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
