import { errorOutput, type ExecuteRequest, type Kernel, type OutputSink } from "./types.js";

/** Stands in for a language this sandbox has no kernel for: every execution is a clear error. */
export class UnavailableKernel implements Kernel {
  readonly exited = false;

  constructor(readonly language: string, private readonly reason: string) {}

  async start(): Promise<void> {}

  async execute(_request: ExecuteRequest, sink: OutputSink): Promise<void> {
    sink(errorOutput("LanguageNotSupported", this.reason));
  }

  async shutdown(): Promise<void> {}
}
