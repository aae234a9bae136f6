import { CubicleError } from "../shared/cubicle-error.js";
import type { ImageInfo, ImageKind, ImageStore, PendingImage } from "./images.js";
import type { CheckpointInfo, CheckpointOptions, CheckpointTarget, Runtime, RuntimeState, SandboxSpec, SandboxStats } from "./types.js";

type RuntimeName = Runtime["name"];

/**
 * RUNTIME_SET_NOTE: several runtimes behind the one Runtime the core holds (ARCHITECTURE §3: the
 * driver is picked per template or per request). A create goes to the runtime its spec names
 * (`spec.runtime`, else the set's default, the first given); every later call about a sandbox
 * goes to the runtime that runs it: the one that created or restored it, or, after a restart,
 * the one that knows its id on the host. A restore goes to the runtime that made the image (its
 * ImageInfo.runtime): images never move between runtimes. The images of all runtimes are one
 * id space (ids name a kind and a name, not a runtime): a lookup asks each runtime's store.
 */
export class RuntimeSet implements Runtime {
  readonly name: RuntimeName;
  readonly images: ImageStore;
  private readonly byName: Map<RuntimeName, Runtime>;
  /** The runtime of each sandbox id seen (created, restored or found on the host). */
  private readonly owners = new Map<string, Runtime>();

  constructor(private readonly runtimes: readonly Runtime[]) {
    if (runtimes.length === 0) throw new CubicleError("internal", "a runtime set needs at least one runtime");
    this.byName = new Map(runtimes.map((runtime) => [runtime.name, runtime]));
    if (this.byName.size !== runtimes.length) throw new CubicleError("internal", "a runtime set holds each runtime once");
    this.name = runtimes[0]!.name;
    this.images = new SetImageStore(runtimes);
  }

  /** Whether sandboxes of `name` can run here. */
  runs(name: RuntimeName): boolean {
    return this.byName.has(name);
  }

  async init(): Promise<void> {
    for (const runtime of this.runtimes) await runtime.init();
  }

  async create(spec: SandboxSpec): Promise<void> {
    const runtime = this.pick(spec.runtime);
    this.owners.set(spec.sandboxId, runtime);
    try {
      await runtime.create(spec);
    } catch (err) {
      this.owners.delete(spec.sandboxId);
      throw err;
    }
  }

  async restore(spec: SandboxSpec, imageId: string): Promise<void> {
    const info = await this.images.info(imageId);
    if (!info) throw new CubicleError("not_found", `image ${imageId} does not exist`);
    const runtime = this.byName.get(info.runtime);
    if (!runtime) throw new CubicleError("failed_precondition", `image ${imageId} was made by the ${info.runtime} runtime, which this host does not run`);
    this.owners.set(spec.sandboxId, runtime);
    try {
      await runtime.restore(spec, imageId);
    } catch (err) {
      if ((await runtime.state(spec.sandboxId).catch(() => "missing")) === "missing") this.owners.delete(spec.sandboxId);
      throw err;
    }
  }

  async destroy(sandboxId: string): Promise<void> {
    const owner = await this.ownerOf(sandboxId);
    // Unknown everywhere: destroy is idempotent, so ask every runtime to be sure nothing is left.
    for (const runtime of owner ? [owner] : this.runtimes) await runtime.destroy(sandboxId);
    this.owners.delete(sandboxId);
  }

  async state(sandboxId: string): Promise<RuntimeState> {
    const owner = await this.ownerOf(sandboxId);
    return owner ? owner.state(sandboxId) : "missing";
  }

  async list(): Promise<string[]> {
    const ids: string[] = [];
    for (const runtime of this.runtimes) {
      for (const id of await runtime.list()) {
        this.owners.set(id, runtime);
        ids.push(id);
      }
    }
    return ids;
  }

  /** The named runtime's (default: the default runtime's): warm images are per runtime. */
  memoryImageFingerprint(runtime?: RuntimeName): string | undefined {
    const named = runtime === undefined ? this.runtimes[0]! : this.runtimes.find((candidate) => candidate.name === runtime);
    return named?.memoryImageFingerprint?.();
  }

  async freeze(sandboxId: string): Promise<void> {
    await (await this.requireOwner(sandboxId)).freeze(sandboxId);
  }

  async thaw(sandboxId: string): Promise<void> {
    await (await this.requireOwner(sandboxId)).thaw(sandboxId);
  }

  async foreground(sandboxId: string): Promise<void> {
    await (await this.requireOwner(sandboxId)).foreground(sandboxId);
  }

  async setHostname(sandboxId: string, hostname: string): Promise<void> {
    await (await this.requireOwner(sandboxId)).setHostname(sandboxId, hostname);
  }

  async stats(sandboxId: string): Promise<SandboxStats> {
    return (await this.requireOwner(sandboxId)).stats(sandboxId);
  }

  async cpuTimeUsec(sandboxId: string): Promise<number> {
    const owner = await this.requireOwner(sandboxId);
    if (!owner.cpuTimeUsec) throw new CubicleError("unimplemented", `the ${owner.name} runtime cannot tell a sandbox's CPU time`);
    return owner.cpuTimeUsec(sandboxId);
  }

  async idleCpuShare(sandboxId: string): Promise<number | undefined> {
    const owner = await this.requireOwner(sandboxId);
    return owner.idleCpuShare?.(sandboxId);
  }

  async checkpoint(sandboxId: string, target: CheckpointTarget, options: CheckpointOptions): Promise<CheckpointInfo & { imageId: string }> {
    return (await this.requireOwner(sandboxId)).checkpoint(sandboxId, target, options);
  }

  onExit(listener: (sandboxId: string) => void): void {
    for (const runtime of this.runtimes) runtime.onExit(listener);
  }

  async watch(sandboxId: string): Promise<void> {
    const owner = await this.ownerOf(sandboxId);
    if (owner) await owner.watch(sandboxId);
  }

  private pick(name: RuntimeName | undefined): Runtime {
    if (name === undefined) return this.runtimes[0]!;
    const runtime = this.byName.get(name);
    if (!runtime) throw new CubicleError("failed_precondition", `this host cannot run ${name} sandboxes (it runs ${[...this.byName.keys()].join(", ")})`);
    return runtime;
  }

  /** The runtime running `sandboxId`: known, or the first that has it on the host (after a restart). */
  private async ownerOf(sandboxId: string): Promise<Runtime | undefined> {
    const known = this.owners.get(sandboxId);
    if (known) return known;
    for (const runtime of this.runtimes) {
      if ((await runtime.state(sandboxId).catch(() => "missing")) !== "missing") {
        this.owners.set(sandboxId, runtime);
        return runtime;
      }
    }
    return undefined;
  }

  private async requireOwner(sandboxId: string): Promise<Runtime> {
    const owner = await this.ownerOf(sandboxId);
    if (!owner) throw new CubicleError("not_found", `sandbox ${sandboxId} does not exist on this host`);
    return owner;
  }
}

/**
 * The images of several runtimes as one store. Only the runtimes write images (through their
 * own stores, in checkpoint): allocate is refused here. Lookups ask each store in turn.
 */
class SetImageStore implements ImageStore {
  constructor(private readonly runtimes: readonly Runtime[]) {}

  allocate(kind: ImageKind, name: string): Promise<PendingImage> {
    return Promise.reject(new CubicleError("internal", `images are written by a runtime's checkpoint, not through the runtime set (${kind}/${name})`));
  }

  commit(pending: PendingImage): Promise<ImageInfo> {
    return Promise.reject(new CubicleError("internal", `image ${pending.id} was not allocated through the runtime set`));
  }

  async abandon(): Promise<void> {}

  async exists(id: string): Promise<boolean> {
    for (const runtime of this.runtimes) if (await runtime.images.exists(id)) return true;
    return false;
  }

  async info(id: string): Promise<ImageInfo | undefined> {
    for (const runtime of this.runtimes) {
      const info = await runtime.images.info(id);
      if (info) return info;
    }
    return undefined;
  }

  async list(kind: ImageKind): Promise<string[]> {
    return (await Promise.all(this.runtimes.map((runtime) => runtime.images.list(kind)))).flat();
  }

  async remove(id: string, options?: { background?: boolean }): Promise<void> {
    for (const runtime of this.runtimes) await runtime.images.remove(id, options);
  }

  async usedBytes(): Promise<number> {
    let total = 0;
    for (const runtime of this.runtimes) total += await runtime.images.usedBytes();
    return total;
  }
}
