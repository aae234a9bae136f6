import type { CodebaseLevel } from "../store/types.js";
import type { TemplateImage } from "../runtime/types.js";

/** What the core needs to know of a template to start sandboxes from it. */
export interface TemplateInfo {
  templateId: string;
  aliases: string[];
  image: TemplateImage;
  cpuCount: number;
  memoryMB: number;
  diskSizeMB: number;
  /** Started in every sandbox of the template (TEMPLATE_START_NOTE). */
  startCmd?: string;
  /** Run after startCmd until it succeeds. */
  readyCmd?: string;
  /** Default rate limits of its sandboxes (the operator's CUBICLE_TEMPLATE_BANDWIDTH); none when absent. */
  bandwidth?: { egressMbps?: number; ingressMbps?: number };
  /**
   * The runtime its sandboxes run in unless a create names one (the operator's
   * CUBICLE_TEMPLATE_RUNTIME); absent: the host's default (containers).
   */
  runtime?: "container" | "microvm";
}

/** Where the core finds templates (the template component implements it). */
export interface TemplateCatalog {
  /** By id or alias; undefined when there is none. */
  resolve(idOrAlias: string): Promise<TemplateInfo | undefined>;
}

export interface CreateSandboxRequest {
  templateId: string;
  /** Cubicle extension: the runtime asked for (absent = the template's); one this host lacks is refused. */
  runtime?: "container" | "microvm";
  timeoutSec: number;
  secure: boolean;
  allowInternetAccess: boolean;
  metadata: Record<string, string>;
  envVars: Record<string, string>;
  autoPause: boolean;
  autoResume: boolean;
  networkConfig: Record<string, unknown> | undefined;
  cpuCount?: number;
  memoryMB?: number;
  /** Cubicle extension of the create body: the sandbox's disk quota; the template's when absent. */
  diskSizeMB?: number;
  /** E2B `volumeMounts`: volumes (by name or id) and where they go; absent or empty = none. */
  volumeMounts?: { name: string; path: string }[];
  /** Cubicle extension: codebases (by name or id) with their permission tables (CODEBASES_NOTE). */
  codebaseMounts?: { codebase: string; path: string; rules: { pattern: string; level: CodebaseLevel }[]; defaultLevel: CodebaseLevel }[];
}
