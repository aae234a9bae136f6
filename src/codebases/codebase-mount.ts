import { spawn } from "node:child_process";
import { mkdir, open, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../shared/cubicle-error.js";
import { pathExists } from "../shared/fs.js";
import { createLogger } from "../shared/log.js";

const log = createLogger("codebases");

/** How long a codebase-fs may take to mount before the start fails. */
const READY_TIMEOUT_MS = 15_000;
/** The sandbox's default user (uid and gid 1000 inside): what the codebase's files show as owned by. */
const SANDBOX_USER = 1000;

export interface CodebaseMountSpec {
  source: string;
  rules: readonly { pattern: string; level: string }[];
  defaultLevel: string;
}

/**
 * Serves each codebase of a sandbox through its own `codebase-fs` (CODEBASES_NOTE) at
 * `<bundle>/codebases/<n>`, which config.json binds into the sandbox. Each daemon is a process
 * of its own session (it outlives a server restart, as the sandbox does) and ends when its
 * mount is unmounted: the bundle's teardown unmounts everything below the bundle.
 */
export async function mountCodebases(binary: string, bundleDir: string, uidBase: number, codebases: readonly CodebaseMountSpec[]): Promise<string[]> {
  if (!(await pathExists(binary))) throw new CubicleError("failed_precondition", "codebase-fs is not built on this server (it needs libfuse3-dev): codebases cannot be mounted");
  const dir = path.join(bundleDir, "codebases");
  await mkdir(dir, { mode: 0o711 });
  const mountDirs: string[] = [];
  for (const [index, codebase] of codebases.entries()) {
    const mountDir = path.join(dir, String(index));
    const rulesFile = `${mountDir}.rules`;
    await mkdir(mountDir, { mode: 0o700 });
    await writeFile(rulesFile, [`default\t${codebase.defaultLevel}`, ...codebase.rules.map((rule) => `${rule.level}\t${rule.pattern}`)].join("\n") + "\n", { mode: 0o600 });
    let owner;
    try {
      owner = await stat(codebase.source);
    } catch {
      throw new CubicleError("failed_precondition", "a codebase's directory is gone from the host: unregister the codebase");
    }
    await startDaemon(binary, [
      "--source", codebase.source,
      "--mount", mountDir,
      "--rules", rulesFile,
      "--uid", String(uidBase + SANDBOX_USER),
      "--gid", String(uidBase + SANDBOX_USER),
      "--owner-uid", String(owner.uid),
      "--owner-gid", String(owner.gid),
    ], `${mountDir}.log`);
    mountDirs.push(mountDir);
  }
  return mountDirs;
}

/** Starts one daemon and waits for its `ready`; on failure it is ended (by its pid) and the error says why. */
async function startDaemon(binary: string, args: string[], logFile: string): Promise<void> {
  const logHandle = await open(logFile, "a", 0o600);
  try {
    const child = spawn(binary, args, { detached: true, stdio: ["ignore", "pipe", logHandle.fd] });
    await new Promise<void>((resolve, reject) => {
      let output = "";
      const timer = setTimeout(() => fail(new CubicleError("internal", "a codebase's filesystem did not mount in time")), READY_TIMEOUT_MS);
      const fail = (error: Error) => {
        clearTimeout(timer);
        if (child.exitCode === null && child.pid !== undefined) child.kill("SIGKILL");
        reject(error);
      };
      child.on("error", (err) => fail(new CubicleError("internal", `could not start codebase-fs: ${err.message}`)));
      child.on("exit", (code) => fail(new CubicleError("internal", `codebase-fs ended with ${code} before it mounted; see ${path.basename(logFile)} in the sandbox's bundle`)));
      child.stdout!.on("data", (chunk: Buffer) => {
        output += chunk.toString();
        if (!output.includes("ready\n")) return;
        clearTimeout(timer);
        child.removeAllListeners("exit");
        // From here it lives on its own: the server neither waits for it nor holds its pipe.
        child.stdout!.destroy();
        child.unref();
        resolve();
      });
    });
    log.debug("codebase mounted", { mount: args[3] });
  } finally {
    await logHandle.close();
  }
}
