import fs from "node:fs";
import { JupyterKernel, type JupyterKernelOptions, type JupyterKernelSpec } from "./jupyter-kernel.js";

export interface RKernelOptions extends JupyterKernelOptions {
  /** Default `R` (on the kernel's PATH: Debian's `/usr/bin/R`). */
  rPath?: string;
  /** Where IRkernel is installed; checked before starting. Default Debian's r-cran-irkernel path. */
  irkernelDir?: string;
}

export const DEBIAN_IRKERNEL_DIR = "/usr/lib/R/site-library/IRkernel";

/**
 * R code for an R string holding `text`: its UTF-8 bytes in base64, decoded by jsonlite (an
 * IRkernel dependency), so no user text is ever parsed as R.
 */
export function rStringExpression(text: string): string {
  return `rawToChar(jsonlite::base64_dec("${Buffer.from(text, "utf8").toString("base64")}"))`;
}

/**
 * Per-call env vars: the replaced values (NA for unset) are kept in an option, not in a
 * variable the user's `ls(all.names = TRUE)` would show, and put back with Sys.setenv or
 * Sys.unsetenv after the cell.
 */
export function rSetEnvCode(envVars: Record<string, string>): string {
  return [
    "local({",
    `  vars <- unlist(jsonlite::fromJSON(${rStringExpression(JSON.stringify(envVars))}, simplifyVector = FALSE))`,
    "  options(cubicle.saved_env = Sys.getenv(names(vars), unset = NA, names = TRUE))",
    "  do.call(Sys.setenv, as.list(vars))",
    "})",
  ].join("\n");
}

export const R_RESTORE_ENV_CODE = [
  "local({",
  "  saved <- getOption(\"cubicle.saved_env\")",
  "  options(cubicle.saved_env = NULL)",
  "  for (name in names(saved)) {",
  "    if (is.na(saved[[name]])) Sys.unsetenv(name) else do.call(Sys.setenv, stats::setNames(list(saved[[name]]), name))",
  "  }",
  "})",
].join("\n");

/** IRkernel, as its kernel.json starts it (`R --slave -e IRkernel::main() --args <file>`). */
export function rKernelSpec(rPath = "R"): JupyterKernelSpec {
  return {
    language: "r",
    kernelName: "ir",
    // No .RData is read from the cwd nor written at exit.
    command: (connectionFile) => ({ file: rPath, args: ["--no-echo", "--no-restore", "--no-save", "-e", "IRkernel::main()", "--args", connectionFile] }),
    setEnvCode: rSetEnvCode,
    restoreEnvCode: R_RESTORE_ENV_CODE,
  };
}

/** An R kernel (IRkernel, from Debian's r-cran-irkernel). */
export class RKernel extends JupyterKernel {
  private readonly irkernelDir: string;

  constructor(options: RKernelOptions) {
    super(rKernelSpec(options.rPath), options);
    this.irkernelDir = options.irkernelDir ?? DEBIAN_IRKERNEL_DIR;
  }

  override async start(): Promise<void> {
    if (!fs.existsSync(this.irkernelDir)) {
      await this.shutdown();
      throw new Error(`this sandbox's template has no R kernel (${this.irkernelDir}): use code-interpreter-v1 or a template built from it`);
    }
    await super.start();
  }
}
