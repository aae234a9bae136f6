import { createHash } from "node:crypto";
import { buildInitBody } from "../protocol/index.js";
import { imageId, parseImageId } from "../runtime/images.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import { startTemplateCommand } from "./template-start.js";
import type { TemplateInfo } from "./types.js";
import { bootUnclaimed, destroyUnclaimed, type UnclaimedSandboxDeps } from "./unclaimed-sandbox.js";

const log = createLogger("warm-snapshot");

/** Starting a Python kernel takes about a second; on a loaded host much more. */
const KERNEL_START_TIMEOUT_MS = 60_000;
/** After a failed build, the next create may try again this much later. */
const RETRY_AFTER_FAILURE_MS = 60_000;

export interface WarmSnapshotsOptions extends UnclaimedSandboxDeps {
  /** Template ids or aliases that get a warm snapshot. */
  templates: string[];
  /** What decides whether a template's rootfs changed (its recipe hash); default the rootfs path. */
  templateFingerprint?: (template: TemplateInfo) => Promise<string>;
}

/** The state of one template's warm snapshot (`GET /warm-snapshots`). */
export interface WarmSnapshotCounts {
  ready: boolean;
  building: boolean;
  /** Creates served by restoring it since the server started. */
  restores: number;
}

/**
 * Per configured template, a memory image of a sandbox whose agent (and, where the template has
 * one, the code interpreter's Python kernel) already started: a create without a pool entry
 * restores it instead of booting (ARCHITECTURE §6). Built in the background once the server's
 * templates are ready (others on their first create): one sandbox is booted, its kernel started (an `/execute` of
 * `pass`), checkpointed without leaving it running, and destroyed. An image is keyed by the
 * template's fingerprint and the runtime's memory-image fingerprint (the agent kit: restored
 * processes map the kit's Node binary), so a changed template or kit makes a new one.
 *
 * The build sandbox is recorded as a pool entry while it exists, so a crash leaves nothing
 * that recovery does not discard.
 */
export class WarmSnapshots {
  private readonly enabled: Set<string>;
  /** Ready image per template id. */
  private readonly ready = new Map<string, string>();
  private readonly building = new Map<string, Promise<void>>();
  private readonly failedAt = new Map<string, number>();
  private readonly lastError = new Map<string, CubicleError>();
  private readonly restores = new Map<string, number>();
  private stopped = false;

  constructor(private readonly options: WarmSnapshotsOptions) {
    this.enabled = new Set(options.templates);
  }

  /** Configured for it, or the template has a start command (TEMPLATE_START_NOTE: its sandboxes start from the image). */
  isEnabled(template: TemplateInfo): boolean {
    // An image of the template's runtime (a microVM template's is a microVM's memory image).
    const { runtime } = this.options;
    if (template.runtime !== undefined && !(runtime.runs ? runtime.runs(template.runtime) : runtime.name === template.runtime)) return false;
    return this.enabled.has(template.templateId) || template.aliases.some((alias) => this.enabled.has(alias)) || template.startCmd !== undefined;
  }

  /**
   * Makes the template's image now if it has none (a build's last step), and resolves once it
   * is ready; rejects with the reason when it cannot be made.
   */
  async ensure(template: TemplateInfo): Promise<void> {
    this.failedAt.delete(template.templateId);
    if (await this.imageFor(template)) return;
    await this.building.get(template.templateId);
    if (!(await this.imageFor(template))) {
      throw this.lastError.get(template.templateId) ?? new CubicleError("internal", `the warm snapshot of template ${template.templateId} was not made`);
    }
  }

  /**
   * The image to restore for a create of `template`, or undefined (not configured, not built
   * yet: a build starts in the background). Checks that the image's key is still current.
   */
  async imageFor(template: TemplateInfo): Promise<string | undefined> {
    if (this.stopped || !this.isEnabled(template)) return undefined;
    const wanted = await this.currentImageId(template);
    if (this.ready.get(template.templateId) === wanted) return wanted;
    if (await this.options.runtime.images.exists(wanted)) {
      this.ready.set(template.templateId, wanted);
      return wanted;
    }
    this.ready.delete(template.templateId);
    this.build(template);
    return undefined;
  }

  /** Starts building the images of those of `prepared` templates that are configured and have none. */
  async start(prepared: string[], resolve: (idOrAlias: string) => Promise<TemplateInfo | undefined>): Promise<void> {
    for (const idOrAlias of prepared) {
      const template = await resolve(idOrAlias);
      if (template && this.isEnabled(template)) await this.imageFor(template);
    }
  }

  /** Stops starting builds and waits for those in progress. */
  async close(): Promise<void> {
    this.stopped = true;
    await Promise.allSettled([...this.building.values()]);
  }

  countRestore(templateId: string): void {
    this.restores.set(templateId, (this.restores.get(templateId) ?? 0) + 1);
  }

  counts(): Record<string, WarmSnapshotCounts> {
    const out: Record<string, WarmSnapshotCounts> = {};
    for (const templateId of new Set([...this.ready.keys(), ...this.building.keys(), ...this.restores.keys()])) {
      out[templateId] = { ready: this.ready.has(templateId), building: this.building.has(templateId), restores: this.restores.get(templateId) ?? 0 };
    }
    return out;
  }

  /** The id of the image of `template` for the current template and kit fingerprints. */
  async currentImageId(template: TemplateInfo): Promise<string> {
    return imageId("warm", await this.currentImageName(template));
  }

  /** `<templateId>-<key>`: the key hashes the template's and the kit's fingerprints. */
  private async currentImageName(template: TemplateInfo): Promise<string> {
    const templateKey = this.options.templateFingerprint ? await this.options.templateFingerprint(template) : template.image.rootfsDir;
    const kitKey = this.options.runtime.memoryImageFingerprint?.(template.runtime) ?? "";
    const key = createHash("sha256").update(`${templateKey}\n${kitKey}`).digest("hex").slice(0, 16);
    return `${template.templateId}-${key}`;
  }

  private build(template: TemplateInfo): void {
    if (this.stopped || this.building.has(template.templateId)) return;
    const failedAt = this.failedAt.get(template.templateId);
    if (failedAt !== undefined && Date.now() - failedAt < RETRY_AFTER_FAILURE_MS) return;
    const building = this.buildNow(template)
      .then(
        (id) => {
          this.failedAt.delete(template.templateId);
          if (id) this.ready.set(template.templateId, id);
        },
        (err) => {
          this.failedAt.set(template.templateId, Date.now());
          this.lastError.set(template.templateId, CubicleError.from(err));
          log.warn("warm snapshot build failed; creates boot cold", { templateId: template.templateId, error: String(err) });
        },
      )
      .finally(() => this.building.delete(template.templateId));
    this.building.set(template.templateId, building);
  }

  private async buildNow(template: TemplateInfo): Promise<string | undefined> {
    const { runtime } = this.options;
    const name = await this.currentImageName(template);
    const id = imageId("warm", name);
    const { images } = runtime;
    if (await images.exists(id)) return id;
    const started = performance.now();
    // Images of older template or kit versions are of no use any more.
    for (const older of await images.list("warm")) {
      if (older !== id && parseImageId(older).name.startsWith(`${template.templateId}-`)) await images.remove(older);
    }
    const entry = await bootUnclaimed(this.options, template);
    try {
      const address = entry.network!.sandboxAddress;
      // The kernel starts as the template's default user in its workdir: tell the agent first.
      // No token and no env vars: the sandbox restored from the image gets its own in its /init.
      await this.options.agent.init(address, buildInitBody({ envVars: {}, defaultUser: template.image.defaultUser, defaultWorkdir: template.image.defaultWorkdir, caCertificates: this.options.caCertificates }));
      const kernel = await this.options.agent.startKernel(address, KERNEL_START_TIMEOUT_MS).then(
        () => true,
        (err) => {
          log.info("no interpreter kernel in the warm snapshot", { templateId: template.templateId, reason: String(err) });
          return false;
        },
      );
      await startTemplateCommand(address, template);
      if (this.stopped) return undefined;
      // No idle keep-alive connection of ours may be carried into the image (see AgentLink.dropIdleSockets).
      this.options.agent.dropIdleSockets(address);
      const { imageId: made } = await runtime.checkpoint(entry.runtimeId, { kind: "warm", name }, { memory: true, leaveRunning: false });
      log.info("warm snapshot ready", { templateId: template.templateId, imageId: made, kernel, buildMs: Math.round(performance.now() - started) });
      return made;
    } finally {
      await destroyUnclaimed(this.options, entry.runtimeId);
    }
  }
}

