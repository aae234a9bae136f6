import fs from "node:fs";
import path from "node:path";
import { CubicleError } from "../shared/cubicle-error.js";
import type { ApiClient } from "./api-client.js";

export interface BuildCommandOptions {
  dockerfile: string;
  name: string;
  /** Directory COPY sources are relative to; default the Dockerfile's. */
  context?: string;
  cpuCount?: number;
  memoryMB?: number;
  skipCache: boolean;
  apiUrl: string;
  apiKey: string;
  /** Live status line (a terminal, not CI) or plain lines. */
  live: boolean;
  out?: NodeJS.WriteStream;
}

/** Parses `template build -f FILE --name NAME [--context DIR] [--cpu N] [--memory MB] [--skip-cache]`. */
export function parseBuildArgs(args: string[]): Omit<BuildCommandOptions, "apiUrl" | "apiKey" | "live"> {
  const options: Partial<Omit<BuildCommandOptions, "apiUrl" | "apiKey" | "live">> = { skipCache: false };
  for (let i = 0; i < args.length; i++) {
    const flag = args[i]!;
    const value = () => {
      const next = args[++i];
      if (next === undefined) throw new CubicleError("invalid_argument", `${flag} needs a value`);
      return next;
    };
    const positive = (what: string) => {
      const n = Number(value());
      if (!Number.isInteger(n) || n <= 0) throw new CubicleError("invalid_argument", `${what} must be a positive integer`);
      return n;
    };
    if (flag === "-f" || flag === "--file") options.dockerfile = value();
    else if (flag === "--name" || flag === "-n") options.name = value();
    else if (flag === "--context" || flag === "-c") options.context = value();
    else if (flag === "--cpu") options.cpuCount = positive("--cpu");
    else if (flag === "--memory") options.memoryMB = positive("--memory");
    else if (flag === "--skip-cache") options.skipCache = true;
    else throw new CubicleError("invalid_argument", `unknown option ${flag}`);
  }
  if (!options.dockerfile || !options.name) throw new CubicleError("invalid_argument", "usage: ./cubicle template build -f Dockerfile --name NAME [--context DIR] [--cpu N] [--memory MB] [--skip-cache]");
  return options as Omit<BuildCommandOptions, "apiUrl" | "apiKey" | "live">;
}

/**
 * The progress of a build on a terminal: log lines scroll, and one status line at the bottom
 * shows the current step and the time since the start, redrawn in place. Without a terminal
 * (CI, a pipe) only the log lines, each with its time.
 */
class BuildProgress {
  private readonly started = Date.now();
  private step = "starting";
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly out: NodeJS.WriteStream,
    private readonly live: boolean,
  ) {
    if (live) this.timer = setInterval(() => this.drawStatus(), 200);
  }

  log(message: string): void {
    const stepMatch = /^(CACHED )?\[(\d+)\/(\d+)\] (.*)$/.exec(message);
    if (stepMatch) this.step = `step ${stepMatch[2]}/${stepMatch[3]}${stepMatch[1] ? " (cached)" : ""}: ${stepMatch[4]!.slice(0, 60)}`;
    // A layer's download (the builder logs "layer <id>: <n> MiB / <total> MiB" about once a second).
    const download = /^layer (\w+): ([\d.]+) (MiB|KiB) \/ ([\d.]+) (MiB|KiB)$/.exec(message);
    if (download) {
      const bytes = (value: string, unit: string) => Number(value) * (unit === "MiB" ? 1024 * 1024 : 1024);
      const fraction = Math.min(1, bytes(download[2]!, download[3]!) / Math.max(1, bytes(download[4]!, download[5]!)));
      const width = 20;
      const filled = Math.round(fraction * width);
      this.step = `pulling layer ${download[1]} [${"#".repeat(filled)}${".".repeat(width - filled)}] ${download[2]} ${download[3]} / ${download[4]} ${download[5]}`;
      if (this.live) {
        this.drawStatus();
        return;
      }
    }
    const line = `${this.elapsed().padStart(7)}  ${message}\n`;
    if (this.live) this.out.write(`\r\x1b[K${line}`);
    else this.out.write(line);
    this.drawStatus();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    if (this.live) this.out.write("\r\x1b[K");
  }

  private elapsed(): string {
    return `${((Date.now() - this.started) / 1000).toFixed(1)}s`;
  }

  private drawStatus(): void {
    if (!this.live) return;
    const width = Math.max(20, (this.out.columns ?? 80) - 1);
    this.out.write(`\r\x1b[K\x1b[1m${`[${this.elapsed()}] ${this.step}`.slice(0, width)}\x1b[0m`);
  }
}

/**
 * `./cubicle template build -f Dockerfile --name NAME`: the official SDK parses the Dockerfile
 * (`Template().fromDockerfile`, so the CLI builds exactly what an SDK user's build would) and
 * drives the build through the server's template-build API, uploading the COPY sources.
 */
export async function buildFromDockerfile(options: BuildCommandOptions): Promise<number> {
  const out = options.out ?? process.stdout;
  const dockerfile = path.resolve(options.dockerfile);
  let content: string;
  try {
    content = fs.readFileSync(dockerfile, "utf8");
  } catch (err) {
    throw new CubicleError("invalid_argument", `cannot read ${options.dockerfile}: ${(err as Error).message}`);
  }
  const { Template } = await import("e2b");
  const template = Template({ fileContextPath: path.resolve(options.context ?? path.dirname(dockerfile)) }).fromDockerfile(content);
  const progress = new BuildProgress(out, options.live);
  try {
    const built = await Template.build(template, options.name, {
      apiKey: options.apiKey,
      apiUrl: options.apiUrl,
      cpuCount: options.cpuCount,
      memoryMB: options.memoryMB,
      skipCache: options.skipCache,
      onBuildLogs: (entry) => progress.log(entry.message),
    });
    progress.stop();
    out.write(`template ${built.name} (${built.templateId}) is ready: Sandbox.create("${built.name}")\n`);
    return 0;
  } catch (err) {
    progress.stop();
    process.stderr.write(`build failed: ${(err as Error).message}\n`);
    return 1;
  }
}

/** `./cubicle template logs NAME [BUILD_ID]`: a build's log (the latest build by default). */
export async function printBuildLogs(client: ApiClient, name: string, buildId: string | undefined, out: NodeJS.WriteStream = process.stdout): Promise<number> {
  const builds = (await client.request("GET", `/templates/${encodeURIComponent(name)}/builds`)).json as Array<{ buildID: string; status: string }>;
  const build = buildId ? builds.find((b) => b.buildID === buildId) : builds[0];
  if (!build) throw new CubicleError("not_found", `template ${name} has no build ${buildId}`);
  const alias = (await client.request("GET", `/templates/aliases/${encodeURIComponent(name)}`).catch(() => undefined))?.json as { templateID?: string } | undefined;
  const templateId = alias?.templateID ?? name;
  const status = (await client.request("GET", `/templates/${encodeURIComponent(templateId)}/builds/${encodeURIComponent(build.buildID)}/status`)).json as {
    status: string;
    logs: string[];
    reason?: { message: string };
  };
  for (const line of status.logs) out.write(`${line}\n`);
  out.write(`build ${build.buildID}: ${status.status}${status.reason ? ` (${status.reason.message})` : ""}\n`);
  return status.status === "error" ? 1 : 0;
}

/**
 * `./cubicle up` on a terminal: the first-start builds of the default templates as one status
 * line per template (what it does now, the time so far), redrawn in place; a finished template
 * leaves a line with its time. Lines the server logs meanwhile are written above it. Not used
 * under CI or without a terminal (the log lines say the same).
 */
export class TemplateBuildStatus {
  private current: { templateId: string; message: string; started: number } | undefined;
  private readonly timer: NodeJS.Timeout;
  private readonly originalStderrWrite: typeof process.stderr.write;

  constructor(private readonly out: NodeJS.WriteStream = process.stdout) {
    this.timer = setInterval(() => this.draw(), 200);
    this.originalStderrWrite = process.stderr.write;
    process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
      this.clear();
      const written = (this.originalStderrWrite as (this: NodeJS.WriteStream, chunk: string | Uint8Array, ...rest: unknown[]) => boolean).call(process.stderr, chunk, ...rest);
      this.draw();
      return written;
    }) as typeof process.stderr.write;
  }

  update(templateId: string, message: string): void {
    if (this.current && this.current.templateId !== templateId) this.finish();
    this.current = { templateId, message, started: this.current?.templateId === templateId ? this.current.started : Date.now() };
    this.draw();
  }

  stop(): void {
    clearInterval(this.timer);
    this.finish();
    process.stderr.write = this.originalStderrWrite;
  }

  private finish(): void {
    if (!this.current) return;
    this.clear();
    this.out.write(`template ${this.current.templateId} built in ${((Date.now() - this.current.started) / 1000).toFixed(1)} s\n`);
    this.current = undefined;
  }

  private clear(): void {
    if (this.current) this.out.write("\r\x1b[K");
  }

  private draw(): void {
    if (!this.current) return;
    const width = Math.max(20, (this.out.columns ?? 80) - 1);
    const elapsed = ((Date.now() - this.current.started) / 1000).toFixed(1);
    this.out.write(`\r\x1b[K\x1b[1m${`building template ${this.current.templateId} [${elapsed}s]: ${this.current.message}`.slice(0, width)}\x1b[0m`);
  }
}
