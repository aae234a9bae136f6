import { runInSandbox } from "../protocol/agent-exec.js";
import { CubicleError } from "../shared/cubicle-error.js";
import type { TemplateInfo } from "./types.js";

/** How long a template's ready command may take to succeed after its start command started. */
const READY_TIMEOUT_MS = 120_000;
const READY_POLL_MS = 250;
/** One run of the ready command (E2B's helpers poll `ss`, `curl`, `pgrep`, `[ -f ]`, or `sleep N`). */
const READY_RUN_TIMEOUT_MS = 60_000;

/**
 * argv that runs a shell command line as E2B does (`bash -l -c`), or with `sh -c` in an image
 * without bash.
 */
export function shellArgv(commandLine: string): string[] {
  return ["/bin/sh", "-c", 'if command -v bash >/dev/null 2>&1; then exec bash -l -c "$0"; fi; exec sh -c "$0"', commandLine];
}

/**
 * TEMPLATE_START_NOTE: a template's start command (E2B's `setStartCmd`) runs in every sandbox of
 * the template, as its default user in its workdir, started through the sandbox's agent (tag
 * `start-cmd`, so `commands.connect` and `commands.list` see it) and left running; its ready
 * command is run until it exits 0. The template's warm snapshot is taken after that, so a
 * sandbox restored from it has the command running already; a sandbox that boots instead (env
 * vars or resources of its own) runs both before its create returns. A ready command that does
 * not succeed within READY_TIMEOUT_MS fails the sandbox (and, at build time, the build).
 */
export async function startTemplateCommand(address: string, template: TemplateInfo, accessToken?: string, signal?: AbortSignal): Promise<void> {
  if (!template.startCmd) return;
  const user = template.image.defaultUser;
  const cwd = template.image.defaultWorkdir;
  await runInSandbox(address, { argv: shellArgv(template.startCmd), user, cwd, timeoutMs: 30_000, untilStarted: true, tag: "start-cmd", accessToken, signal });
  if (!template.readyCmd) return;
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let last = "";
  for (;;) {
    const output: string[] = [];
    const result = await runInSandbox(address, {
      argv: shellArgv(template.readyCmd),
      user,
      cwd,
      accessToken,
      timeoutMs: Math.min(READY_RUN_TIMEOUT_MS, Math.max(1000, deadline - Date.now())),
      signal,
      onOutput: (_stream, text) => output.length < 20 && output.push(text),
    });
    if (result.exitCode === 0) return;
    last = `exit ${result.exitCode}${output.length ? `: ${output.join("").trim().slice(-300)}` : ""}`;
    if (Date.now() + READY_POLL_MS >= deadline) break;
    await new Promise((resolve) => setTimeout(resolve, READY_POLL_MS));
  }
  throw new CubicleError("deadline_exceeded", `the template's ready command did not succeed within ${READY_TIMEOUT_MS / 1000} s (last run: ${last})`);
}
