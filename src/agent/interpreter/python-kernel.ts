import { JupyterKernel, type JupyterKernelOptions, type JupyterKernelSpec } from "./jupyter-kernel.js";
import { SETUP_CODE } from "./python-setup.js";

export interface PythonKernelOptions extends JupyterKernelOptions {
  /** The interpreter with ipykernel installed. Default `/usr/bin/python3` (Debian's, inside sandboxes). */
  pythonPath: string;
}

/**
 * What `python3 -m ipykernel_launcher` does, with the kernel's startup imports of debugpy (the
 * Jupyter debugger) and jedi (IPython's completion engine) failing on purpose. Neither serves
 * the E2B protocol (no debug_request, no complete_request), and together they are a third of a
 * fresh kernel's memory (~17 of ~52 MB, 270 modules): every sandbox carries that, and every
 * restore from the template's warm snapshot reads it back. ipykernel and IPython check both
 * with try/except at import time and run without them. The block ends before the kernel starts,
 * so user code can still `import debugpy` or `import jedi`.
 */
export const KERNEL_LAUNCHER = String.raw`
import sys
_skipped = ("debugpy", "jedi")
for _name in _skipped:
    sys.modules.setdefault(_name, None)
try:
    import ipykernel.ipkernel
    from ipykernel import kernelapp
finally:
    for _name in _skipped:
        if _name in sys.modules and sys.modules[_name] is None:
            del sys.modules[_name]
if sys.path and sys.path[0] == "":
    del sys.path[0]
kernelapp.launch_new_instance()
`;

/** ipykernel started with KERNEL_LAUNCHER, with the Python setup code (python-setup.ts). */
export function pythonKernelSpec(pythonPath: string): JupyterKernelSpec {
  return {
    language: "python",
    kernelName: "python3",
    // History in memory: a file-backed history database would be held open across a memory
    // snapshot and refuse writes in every sandbox restored from it.
    command: (connectionFile) => ({ file: pythonPath, args: ["-c", KERNEL_LAUNCHER, "-f", connectionFile, "--HistoryManager.hist_file=:memory:"] }),
    setupCode: SETUP_CODE,
    // A JSON string is a valid Python string literal (same escapes); it keeps user data out of the code.
    setEnvCode: (envVars) => `__import__("_cubicle").set_env(${JSON.stringify(JSON.stringify(envVars))})`,
    restoreEnvCode: `__import__("_cubicle").restore_env()`,
  };
}

/** An IPython kernel (like `python3 -m ipykernel_launcher -f <connection file>`). */
export class PythonKernel extends JupyterKernel {
  constructor(options: PythonKernelOptions) {
    super(pythonKernelSpec(options.pythonPath), options);
  }
}
