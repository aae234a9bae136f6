/**
 * The `process.Process` service of envd (e2b-wire-protocol.md §7): Start and Connect streams,
 * List, SendInput, CloseStdin, SendSignal, Update. StreamInput (client streaming, unused by
 * the SDKs) answers `unimplemented`.
 */
import { statSync } from "node:fs";
import { processMessages } from "../../protocol/index.js";
import { CubicleError } from "../../shared/cubicle-error.js";
import { defineService, type RpcContext, type ServiceDefinition, type Untrusted } from "../rpc/types.js";
import {
  bytesToJson,
  optionalBool,
  optionalBytes,
  optionalEnum,
  optionalObject,
  optionalString,
  optionalUint32,
  stringArray,
  stringMap,
  type JsonObject,
} from "../rpc/proto-json.js";
import { sandboxEnvironment, type AgentState } from "../state.js";
import { resolveUserPath, type AgentUser } from "../users.js";
import type { EndEvent } from "./exit-status.js";
import { ManagedProcess, type OutputKind, type ProcessConfig } from "./managed-process.js";
import { sessionLaunch } from "./sessions.js";
import { ProcessRegistry, type ProcessSelector } from "./registry.js";

export { ProcessRegistry } from "./registry.js";
export type { EndEvent } from "./exit-status.js";

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/** upstream envd's keepalive interval when the client asks for none (seconds). */
const defaultKeepaliveSec = 90;

const { Signal } = processMessages;
type ProcessEventMessage = processMessages.StartResponse | processMessages.ConnectResponse;

export interface ProcessServiceOptions {
  state: AgentState;
  registry?: ProcessRegistry;
}

/** Builds the process service over the agent state (env vars, default workdir). */
export function createProcessService(options: ProcessServiceOptions): ServiceDefinition {
  const { state } = options;
  const registry = options.registry ?? new ProcessRegistry();

  return defineService<processMessages.ProcessMethods>(processMessages.ProcessService.typeName, {
    unary: {
      List: async function list() {
        return { processes: registry.list().map(processInfo) };
      },
      SendInput: async function sendInput(request) {
        const proc = registry.getRunning(parseSelector(request));
        const input = optionalObject(request, "input");
        const stdin = input && optionalBytes(input, "stdin");
        const pty = input && optionalBytes(input, "pty");
        if (pty !== undefined) proc.writePty(pty);
        else if (stdin !== undefined) await proc.writeStdin(stdin);
        else throw new CubicleError("unimplemented", "invalid input type: set input.stdin or input.pty");
        return {};
      },
      CloseStdin: async function closeStdin(request) {
        registry.getRunning(parseSelector(request)).closeStdin();
        return {};
      },
      SendSignal: async function sendSignal(request) {
        const proc = registry.getRunning(parseSelector(request));
        const signal = optionalEnum(request, "signal", Signal) ?? 0;
        if (signal === Signal.SIGNAL_SIGKILL) proc.signal("SIGKILL");
        else if (signal === Signal.SIGNAL_SIGTERM) proc.signal("SIGTERM");
        else throw new CubicleError("unimplemented", `invalid signal: ${signalName(signal)}`);
        return {};
      },
      Update: async function update(request) {
        const proc = registry.getRunning(parseSelector(request));
        const size = parsePtySize(request);
        if (size) proc.resize(size.cols, size.rows);
        return {};
      },
    },
    streams: {
      Start: async function start(request, ctx, send) {
        const proc = await startProcess(request, ctx, state);
        registry.add(proc);
        await streamEvents(proc, ctx, send);
      },
      Connect: async function connect(request, ctx, send) {
        const proc = registry.getRunningOrExited(parseSelector(request));
        await streamEvents(proc, ctx, send);
      },
      StreamInput: async function streamInput() {
        throw new CubicleError("unimplemented", "process.Process/StreamInput is not implemented: use SendInput");
      },
    },
  });
}

function signalName(value: number): string {
  return Object.entries(Signal).find(([, v]) => v === value)?.[0] ?? String(value);
}

function parseSelector(request: JsonObject): ProcessSelector {
  const process = optionalObject(request, "process");
  // The oneof may also arrive wrapped as {selector: {...}} by hand-written clients.
  const selector = (process && optionalObject(process, "selector")) ?? process;
  if (selector) {
    const pid = optionalUint32(selector, "pid");
    if (pid !== undefined) return { pid };
    const tag = optionalString(selector, "tag");
    if (tag !== undefined) return { tag };
  }
  throw new CubicleError("invalid_argument", "a process selector (process.pid or process.tag) is required");
}

function parsePtySize(message: JsonObject): { cols: number; rows: number } | undefined {
  const pty = optionalObject(message, "pty");
  if (!pty) return undefined;
  const size = optionalObject(pty, "size");
  return { cols: (size && optionalUint32(size, "cols")) ?? 0, rows: (size && optionalUint32(size, "rows")) ?? 0 };
}

function processInfo(proc: ManagedProcess): processMessages.ProcessInfo {
  const config: processMessages.ProcessConfig = { cmd: proc.config.cmd, args: proc.config.args, envs: proc.config.envs };
  if (proc.config.cwd !== undefined) config.cwd = proc.config.cwd;
  const info: processMessages.ProcessInfo = { config, pid: proc.pid };
  if (proc.tag !== undefined) info.tag = proc.tag;
  return info;
}

function checkEnvName(key: string, value: string): void {
  if (key === "" || key.includes("=") || key.includes("\0") || value.includes("\0")) {
    throw new CubicleError("invalid_argument", `invalid environment variable ${JSON.stringify(key)}`);
  }
}

let templateEnvCache: Record<string, string> | undefined;

/**
 * The template's environment (its ENV steps, its recipe's variables), which the runtime hands
 * the agent as JSON in CUBICLE_TEMPLATE_ENV; {} when absent or not an object of strings.
 */
export function templateEnvironment(raw = process.env.CUBICLE_TEMPLATE_ENV): Record<string, string> {
  if (raw === process.env.CUBICLE_TEMPLATE_ENV && templateEnvCache) return templateEnvCache;
  let parsed: Record<string, string> = {};
  try {
    const value = JSON.parse(raw ?? "{}") as unknown;
    if (typeof value === "object" && value !== null && !Array.isArray(value)) {
      parsed = Object.fromEntries(Object.entries(value).filter((entry): entry is [string, string] => typeof entry[1] === "string" && entry[0] !== "" && !entry[0].includes("=")));
    }
  } catch {
    parsed = {};
  }
  if (raw === process.env.CUBICLE_TEMPLATE_ENV) templateEnvCache = parsed;
  return parsed;
}

/**
 * The environment of a process, later entries winning (§7.5): PATH, HOME, USER, LOGNAME,
 * SHELL and E2B_SANDBOX; the template's environment; the sandbox-wide env vars from /init; the
 * call's own envs.
 */
export function processEnvironment(user: AgentUser, sandboxEnv: Record<string, string>, callEnv: Record<string, string>): Record<string, string> {
  const env: Record<string, string> = {
    PATH: process.env.PATH || defaultPath,
    HOME: user.home,
    USER: user.name,
    LOGNAME: user.name,
    SHELL: user.shell,
    E2B_SANDBOX: "true",
  };
  for (const [key, value] of Object.entries(templateEnvironment())) env[key] = value;
  for (const [key, value] of Object.entries(sandboxEnv)) env[key] = value;
  for (const [key, value] of Object.entries(callEnv)) {
    checkEnvName(key, value);
    env[key] = value;
  }
  return env;
}

/** Resolves the cwd like envd: empty → default workdir (else home), `~`, relative → home. Must exist. */
export async function resolveCwd(requested: string | undefined, user: AgentUser, defaultWorkdir: string | undefined): Promise<string> {
  const cwd = resolveUserPath(requested || defaultWorkdir || "", user);
  try {
    // Synchronous: a local stat takes microseconds, a trip through libuv's thread pool far more
    // (every command pays it, the first after a thaw most).
    statSync(cwd);
  } catch {
    throw new CubicleError("invalid_argument", `cwd '${cwd}' does not exist`);
  }
  return cwd;
}

async function startProcess(request: Untrusted<processMessages.StartRequest>, ctx: RpcContext, state: AgentState): Promise<ManagedProcess> {
  const processMessage = optionalObject(request, "process");
  if (!processMessage) throw new CubicleError("invalid_argument", "field \"process\" is required");
  const config: ProcessConfig = {
    cmd: optionalString(processMessage, "cmd") ?? "",
    args: stringArray(processMessage, "args"),
    envs: stringMap(processMessage, "envs"),
    cwd: optionalString(processMessage, "cwd"),
  };
  if (config.cmd === "") throw new CubicleError("invalid_argument", "field \"process.cmd\" is required");
  const tag = optionalString(request, "tag");
  // An absent stdin means true: old clients always had a stdin pipe.
  const stdin = optionalBool(request, "stdin") ?? true;
  const pty = parsePtySize(request);

  const user = ctx.user;
  const cwd = await resolveCwd(config.cwd, user, state.defaultWorkdir);
  const env = processEnvironment(user, sandboxEnvironment(state), config.envs);
  // A command of a persistent session runs through its wrapper (SESSIONS_NOTE).
  const session = pty ? undefined : sessionLaunch(config);
  const spec = { config: session ?? config, shown: session ? config : undefined, tag, cwd, env, user, stdin, pty };
  const proc = pty ? await ManagedProcess.spawnPty(spec) : await ManagedProcess.spawnCommand(spec);
  // Connect-Timeout-Ms of Start is the lifetime of the process (§5.5), even if the client leaves.
  if (ctx.timeoutMs !== undefined) proc.setLifetime(ctx.timeoutMs);
  return proc;
}

function keepaliveIntervalMs(ctx: RpcContext): number {
  const header = ctx.headers["keepalive-ping-interval"];
  const text = Array.isArray(header) ? header[0] : header;
  const seconds = text !== undefined && /^\d+$/.test(text.trim()) ? Number(text.trim()) : defaultKeepaliveSec;
  return seconds > 0 ? seconds * 1000 : defaultKeepaliveSec * 1000;
}

function endMessage(end: EndEvent): ProcessEventMessage {
  return { event: { end } };
}

/**
 * Streams `start`, then live `data` (and `keepalive` while idle), then the one `end` event.
 * Resolves after `end`; rejects with the call's abort reason if the client leaves or the
 * deadline passes (the process keeps running: only its own lifetime kills it).
 */
function streamEvents(proc: ManagedProcess, ctx: RpcContext, send: (message: ProcessEventMessage) => void): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    if (ctx.signal.aborted) return reject(ctx.signal.reason);
    send({ event: { start: { pid: proc.pid } } });
    if (proc.end) {
      send(endMessage(proc.end));
      return resolve();
    }
    const keepalive = setInterval(() => send({ event: { keepalive: {} } }), keepaliveIntervalMs(ctx));
    let releasePause: (() => void) | undefined;
    const cleanup = () => {
      clearInterval(keepalive);
      unsubscribe();
      releasePause?.();
      releasePause = undefined;
      ctx.signal.removeEventListener("abort", onAbort);
    };
    const onAbort = () => {
      cleanup();
      reject(ctx.signal.reason);
    };
    const unsubscribe = proc.subscribe({
      data(kind: OutputKind, chunk: Buffer) {
        send({ event: { data: { [kind]: bytesToJson(chunk) } } });
        keepalive.refresh();
        if (!releasePause && ctx.needsDrain?.() && ctx.waitForDrain) {
          const release = proc.pause();
          releasePause = release;
          void ctx.waitForDrain().then(() => {
            if (releasePause === release) releasePause = undefined;
            release();
          });
        }
      },
      end(event: EndEvent) {
        send(endMessage(event));
        cleanup();
        resolve();
      },
    });
    ctx.signal.addEventListener("abort", onAbort, { once: true });
  });
}
