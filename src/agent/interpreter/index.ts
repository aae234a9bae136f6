import type { AddressInfo } from "node:net";
import { createLogger } from "../../shared/log.js";
import { ContextManager, type KernelFactory } from "./context-manager.js";
import { BashKernel } from "./bash-kernel.js";
import { JavaKernel } from "./java-kernel.js";
import { JsKernel } from "./js-kernel.js";
import { PythonKernel } from "./python-kernel.js";
import { RKernel } from "./r-kernel.js";
import { createInterpreterHttpServer } from "./server.js";
import { UnavailableKernel } from "./unavailable-kernel.js";

export type { CodeContextInfo } from "./context-manager.js";

const log = createLogger("interpreter");

export interface InterpreterServerOptions {
  host: string;
  port: number;
  /**
   * The sandbox's envd access token (set by `/init`), read on every request: when there is
   * one, `/execute` needs it in `X-Access-Token` exactly as envd does (server.ts).
   */
  getAccessToken: () => string | undefined;
  /** Sandbox-wide env vars (envd `/envs`); read when a kernel starts. */
  getEnvVars: () => Record<string, string>;
  /** The user kernels run as (envd's default user, e.g. `user`). */
  getDefaultUser: () => string;
  /** The cwd of the default contexts and of contexts created without one. */
  getDefaultWorkdir: () => string;
  /** Python with ipykernel. Default `$CUBICLE_PYTHON` or `/usr/bin/python3`. */
  pythonPath?: string;
  /**
   * How to run Node for the JavaScript/TypeScript kernel. Default `[process.execPath]`; inside a
   * sandbox the agent runs through the injected loader, so pass its full argv prefix, e.g.
   * `["/.cubicle/lib/ld-linux-x86-64.so.2", "--library-path", "/.cubicle/lib", "/.cubicle/node"]`.
   */
  nodeCommand?: string[];
  /** Directory for kernel connection files and ipc sockets. Default `<tmpdir>/cubicle-kernels`. */
  runtimeDir?: string;
  /** Default 5000 (upstream). */
  keepaliveIntervalMs?: number;
}

export interface InterpreterServer {
  /** The bound port (useful with port 0). */
  readonly port: number;
  close(): Promise<void>;
}

/**
 * Starts the code interpreter on `host:port` (49999 in a sandbox). No kernel starts here:
 * each context starts its kernel on its first execution, and keeps it.
 */
export async function startInterpreterServer(options: InterpreterServerOptions): Promise<InterpreterServer> {
  const pythonPath = options.pythonPath ?? process.env.CUBICLE_PYTHON ?? "/usr/bin/python3";
  const nodeCommand = options.nodeCommand ?? [process.execPath];
  const kernelFactory: KernelFactory = function createKernelForLanguage(language, launch) {
    switch (language) {
      case "python":
        return new PythonKernel({ pythonPath, launch, runtimeDir: options.runtimeDir });
      case "javascript":
      case "typescript":
        return new JsKernel({ language, nodeCommand, launch });
      case "bash":
        return new BashKernel({ launch, runtimeDir: options.runtimeDir });
      // R and the JVM come with the code-interpreter template; elsewhere the kernel fails to
      // start and the call says which program is missing.
      case "r":
        return new RKernel({ launch, runtimeDir: options.runtimeDir });
      case "java":
        return new JavaKernel({ launch });
      default:
        return new UnavailableKernel(language, `${language} has no kernel in this sandbox; available languages: python, javascript, typescript, bash, r, java`);
    }
  };
  const contexts = new ContextManager({
    kernelFactory,
    getEnvVars: options.getEnvVars,
    getDefaultUser: options.getDefaultUser,
    getDefaultWorkdir: options.getDefaultWorkdir,
    kernelEnv: (language) =>
      language === "python"
        ? { MPLBACKEND: "module://matplotlib_inline.backend_inline", PYTHONUNBUFFERED: "1", ...(process.pid !== 1 ? { JPY_PARENT_PID: String(process.pid) } : {}) }
        : {},
  });
  const server = createInterpreterHttpServer({ contexts, keepaliveIntervalMs: options.keepaliveIntervalMs, getAccessToken: options.getAccessToken });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port, options.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  log.info("code interpreter listening", { host: options.host, port });
  return {
    port,
    async close() {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeAllConnections();
      await contexts.close();
      await closed;
    },
  };
}
