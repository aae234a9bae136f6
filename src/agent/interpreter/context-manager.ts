import { randomUUID } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { lookupUser, type AgentUser } from "../users.js";
import { createLogger } from "../../shared/log.js";
import { checkLanguage } from "./languages.js";
import { SerialQueue } from "./serial-queue.js";
import { errorOutput, type ExecuteRequest, type Kernel, type KernelLaunch, type OutputSink } from "./types.js";

const log = createLogger("interpreter");

/** A context as `/contexts` shows it. */
export interface CodeContextInfo {
  id: string;
  language: string;
  cwd: string;
}

export type KernelFactory = (language: string, launch: KernelLaunch) => Kernel;

export interface ContextManagerOptions {
  kernelFactory: KernelFactory;
  getEnvVars: () => Record<string, string>;
  getDefaultUser: () => string;
  getDefaultWorkdir: () => string;
  /** Extra variables every kernel of a language gets (e.g. MPLBACKEND for python). */
  kernelEnv?: (language: string) => Record<string, string>;
  /** Most contexts created through `/contexts` at once (the per-language defaults come on top). Default `maxCodeContexts`. */
  maxContexts?: number;
}

/**
 * Contexts one sandbox may have at once besides the per-language defaults. Anyone who knows the
 * sandbox id may create one (the SDK sends no token there, see server.ts), and each may later
 * hold a kernel process. The defaults (one per language, six at most) are not counted, so that
 * such a caller cannot keep `runCode` from the default contexts.
 */
export const maxCodeContexts = 64;

/** Longest cwd accepted (PATH_MAX). */
const maxCwdBytes = 4096;

const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/**
 * One code context: a language, a working directory, a queue that serialises its calls, and a
 * kernel started on the first call. A kernel that died is replaced on the next call.
 */
export class CodeContext {
  readonly queue = new SerialQueue();
  private kernel: Kernel | undefined;
  private kernelStarting: Promise<Kernel> | undefined;
  private disposed = false;

  constructor(
    readonly id: string,
    readonly language: string,
    readonly cwd: string,
    private readonly manager: ContextManager,
  ) {}

  get info(): CodeContextInfo {
    return { id: this.id, language: this.language, cwd: this.cwd };
  }

  get kernelRunning(): boolean {
    return this.kernel !== undefined && !this.kernel.exited;
  }

  /** Queues an execution; resolves when it has ended (its outputs all went to the sink). */
  execute(request: ExecuteRequest, sink: OutputSink, signal: AbortSignal): Promise<void> {
    return this.queue.run(async () => {
      if (this.disposed) {
        sink(errorOutput("ContextRestarting", `context ${this.id} was deleted`));
        return;
      }
      let kernel: Kernel;
      try {
        kernel = await this.ensureKernel();
      } catch (error) {
        sink(errorOutput("KernelStartError", `the ${this.language} kernel could not start: ${(error as Error).message}`));
        return;
      }
      await kernel.execute(request, sink, signal);
    }, signal);
  }

  private ensureKernel(): Promise<Kernel> {
    if (this.kernelStarting && this.kernel && !this.kernel.exited) return this.kernelStarting;
    const kernel = this.manager.createKernel(this);
    this.kernel = kernel;
    const starting = kernel.start().then(
      () => kernel,
      (error: unknown) => {
        if (this.kernel === kernel) {
          this.kernel = undefined;
          this.kernelStarting = undefined;
        }
        throw error;
      },
    );
    this.kernelStarting = starting;
    return starting;
  }

  private restarting: Promise<void> | undefined;

  /**
   * Replaces the kernel; a running call ends with the kernel's death error. Starts the new one
   * if one was running. Restarts asked for while one is under way join it: at most one kernel
   * start per context, however many restarts arrive.
   */
  restart(): Promise<void> {
    this.restarting ??= this.restartOnce().finally(() => (this.restarting = undefined));
    return this.restarting;
  }

  private async restartOnce(): Promise<void> {
    const old = this.kernel;
    this.kernel = undefined;
    this.kernelStarting = undefined;
    if (!old) return;
    await old.shutdown();
    await this.ensureKernel().catch((error: unknown) => {
      log.warn("kernel restart failed; the next execution retries", { context: this.id, reason: (error as Error).message });
    });
  }

  async dispose(): Promise<void> {
    this.disposed = true;
    const old = this.kernel;
    this.kernel = undefined;
    this.kernelStarting = undefined;
    await old?.shutdown();
  }
}

/** The contexts of one sandbox: python and javascript defaults exist from the start, kernels come later. */
export class ContextManager {
  private readonly contexts = new Map<string, CodeContext>();
  private readonly defaults = new Map<string, CodeContext>();

  constructor(private readonly options: ContextManagerOptions) {
    for (const language of ["python", "javascript"]) this.defaultContext(language);
  }

  /** Throws invalid_argument for an unknown language or a bad cwd, resource_exhausted over the cap. */
  create(request: { language?: string | null; cwd?: string | null }, isDefault = false): CodeContext {
    const language = checkLanguage(request.language);
    const cwd = this.checkCwd(request.cwd?.trim() || this.options.getDefaultWorkdir() || "/home/user");
    const max = this.options.maxContexts ?? maxCodeContexts;
    if (!isDefault && this.contexts.size - this.defaults.size >= max) {
      throw new CubicleError("resource_exhausted", `at most ${max} code contexts can exist in a sandbox: remove one (removeCodeContext) before creating another`);
    }
    const context = new CodeContext(randomUUID(), language, cwd, this);
    this.contexts.set(context.id, context);
    return context;
  }

  get(id: string): CodeContext | undefined {
    return this.contexts.get(id);
  }

  /** The context used when a call names a language (or nothing: python). */
  defaultContext(languageName?: string | null): CodeContext {
    const language = checkLanguage(languageName);
    let context = this.defaults.get(language);
    if (!context) {
      context = this.create({ language }, true);
      this.defaults.set(language, context);
    }
    return context;
  }

  /** An absolute cwd without NUL, or a relative one resolved against the default workdir. */
  private checkCwd(cwd: string): string {
    if (cwd.includes("\0")) throw new CubicleError("invalid_argument", "cwd must not contain a NUL byte");
    if (Buffer.byteLength(cwd) > maxCwdBytes) throw new CubicleError("invalid_argument", `cwd is longer than ${maxCwdBytes} bytes`);
    return path.resolve(this.options.getDefaultWorkdir() || "/home/user", cwd);
  }

  list(): CodeContextInfo[] {
    return [...this.contexts.values()].map((context) => context.info);
  }

  async delete(id: string): Promise<boolean> {
    const context = this.contexts.get(id);
    if (!context) return false;
    this.contexts.delete(id);
    if (this.defaults.get(context.language) === context) this.defaults.delete(context.language);
    await context.dispose();
    return true;
  }

  async close(): Promise<void> {
    const all = [...this.contexts.values()];
    this.contexts.clear();
    this.defaults.clear();
    await Promise.all(all.map((context) => context.dispose()));
  }

  /** Builds a kernel for a context: who it runs as, where, and with the sandbox's env vars. */
  createKernel(context: CodeContext): Kernel {
    const user = this.resolveUser();
    const launch: KernelLaunch = {
      cwd: firstDirectory([context.cwd, user?.home, "/"]),
      env: {
        PATH: DEFAULT_PATH,
        LANG: "C.UTF-8",
        ...(user ? { HOME: user.home, USER: user.name, LOGNAME: user.name, SHELL: user.shell } : {}),
        ...this.options.getEnvVars(),
        ...this.options.kernelEnv?.(context.language),
      },
    };
    // Drop privileges only when we have them and the user differs (dev runs as anyone).
    const ownUid = process.getuid?.();
    if (user && ownUid === 0 && user.uid !== 0) {
      launch.uid = user.uid;
      launch.gid = user.gid;
      launch.groups = user.groups;
    }
    return this.options.kernelFactory(context.language, launch);
  }

  private resolveUser(): AgentUser | undefined {
    try {
      return lookupUser(this.options.getDefaultUser());
    } catch (error) {
      log.warn("default user not found; kernels run as the agent's user", { reason: (error as Error).message });
      return undefined;
    }
  }
}

function firstDirectory(candidates: (string | undefined)[]): string {
  for (const candidate of candidates) {
    if (!candidate) continue;
    try {
      if (fs.statSync(candidate).isDirectory()) return candidate;
    } catch {
      // try the next one
    }
  }
  return "/";
}
