import type { Sandbox } from "e2b";

/** A command's outcome as root, also when it exits non-zero (the SDK throws then). */
export async function runAsRoot(sandbox: Sandbox, cmd: string, timeoutMs = 30_000): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  try {
    const result = await sandbox.commands.run(cmd, { user: "root", timeoutMs });
    return { exitCode: result.exitCode, stdout: result.stdout, stderr: result.stderr };
  } catch (err) {
    const e = err as { exitCode?: number; stdout?: string; stderr?: string };
    if (typeof e.exitCode !== "number") throw err;
    return { exitCode: e.exitCode, stdout: e.stdout ?? "", stderr: e.stderr ?? "" };
  }
}
