import { createLogger } from "../../shared/log.js";
import type { Microvm } from "./qemu.js";

const log = createLogger("microvm");

/**
 * SPARE_QEMU_NOTE (issue 17): a restore from a memory image is "start QEMU, load the state,
 * continue", and starting QEMU (its process, its devices, QMP answering) is most of the runtime's
 * part of it (~150 of ~250 ms under TCG here). So for the images that are restored again and
 * again, a snapshot's and a template's warm image, the runtime keeps QEMUs started ahead: each
 * made with the image's machine shape, its RAM file and a copy of its disk, confined like any
 * guest's QEMU (its own uid and chroot), started with `-incoming defer` (its vCPUs have never
 * run: no guest code has been in it) inside a network namespace of its own that holds only the
 * tap it opened (so a guest's QEMU stays alone in its namespace once the tap is gone). A restore of that image takes one: its directory is renamed to the sandbox's,
 * its tap moved into the sandbox's netns and renamed there (the resident helper's
 * `net-guest-tap --from`), and the state is loaded into it. A spare is made once an image has
 * been restored or saved (a snapshot, a warm image), a second after the last such event so it
 * does not compete with the restore that asked for it; only the images restored most recently
 * keep spares, and a spare whose image is removed or rewritten is ended. Pause images and
 * layers get none (each is restored once), nor does a fork's image (restored in one burst, then
 * removed). A server that stops ends its spares; one that crashed ends them at its next start.
 */
export interface Spare {
  readonly imageId: string;
  /** What the image was when the spare was made (its meta.json's creation time and size). */
  readonly stamp: string;
  /** Its directory (the shape of a guest's: root overlay, chroot, run dir). */
  readonly dir: string;
  readonly vm: Microvm;
  readonly uid: number;
  /** Its tap, in its own namespace (under /var/run/netns). */
  readonly tapName: string;
  readonly netnsName: string;
  /** Its RAM file, when it has one of its own (an image whose RAM is in the stream). */
  readonly ownRamFile?: string;
}

export interface SpareQemusOptions {
  /** Spares kept per image. */
  perImage: number;
  /** Images that keep spares (the most recently restored or saved). */
  images: number;
  /** Starts a spare for the image (slot: a number unique among live spares); undefined when the image is gone. */
  spawn(imageId: string, slot: number): Promise<Spare | undefined>;
  /** Ends a spare's QEMU and removes its files. */
  discard(spare: Spare): Promise<void>;
  /** How long after the last restore or save of an image its spares are made. Default 1 s. */
  delayMs?: number;
}

export class SpareQemus {
  private readonly byImage = new Map<string, Spare[]>();
  /** Image ids, the most recently wanted last. */
  private readonly recent: string[] = [];
  private timer: NodeJS.Timeout | undefined;
  /** The fill in progress: one spare at a time. */
  private filling: Promise<void> | undefined;
  private nextSlot = 0;
  private closed = false;
  /** Images removed while one of their spares was being made. */
  private readonly dropped = new Set<string>();

  constructor(private readonly options: SpareQemusOptions) {}

  /** A spare of the image as it is now (`stamp`), taken out of the pool; undefined when there is none. */
  take(imageId: string, stamp: string): Spare | undefined {
    const spares = this.byImage.get(imageId);
    if (!spares?.length) return undefined;
    const index = spares.findIndex((spare) => spare.stamp === stamp);
    if (index < 0) {
      // Made of an earlier image under this id: of no use any more.
      void this.drop(imageId);
      return undefined;
    }
    return spares.splice(index, 1)[0];
  }

  /** The image was restored or saved: it keeps spares (made a little later). */
  want(imageId: string): void {
    if (this.closed || this.options.perImage === 0) return;
    this.dropped.delete(imageId);
    const at = this.recent.indexOf(imageId);
    if (at >= 0) this.recent.splice(at, 1);
    this.recent.push(imageId);
    while (this.recent.length > this.options.images) void this.drop(this.recent.shift()!);
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.fill();
    }, this.options.delayMs ?? 1000);
    this.timer.unref();
  }

  /** Ends the image's spares (it is being removed). */
  async drop(imageId: string): Promise<void> {
    this.dropped.add(imageId);
    const at = this.recent.indexOf(imageId);
    if (at >= 0) this.recent.splice(at, 1);
    const spares = this.byImage.get(imageId) ?? [];
    this.byImage.delete(imageId);
    await Promise.all(spares.map((spare) => this.discard(spare)));
  }

  /** The uids live spares hold (no guest may get one). */
  uids(): Set<number> {
    return new Set([...this.byImage.values()].flat().map((spare) => spare.uid));
  }

  /** How many spares wait, per image (tests, diagnostics). */
  counts(): Record<string, number> {
    return Object.fromEntries([...this.byImage].map(([imageId, spares]) => [imageId, spares.length]));
  }

  /** Resolves once no fill is in progress (tests). */
  async settled(): Promise<void> {
    while (this.filling) await this.filling;
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    await this.settled();
    const all = [...this.byImage.values()].flat();
    this.byImage.clear();
    await Promise.all(all.map((spare) => this.discard(spare)));
  }

  private fill(): void {
    if (this.filling || this.closed) return;
    // Cleared once the run has settled, never before it is assigned: a run with nothing to make
    // ends without awaiting, and a `finally` inside it would run before the assignment.
    this.filling = this.fillAll().finally(() => {
      this.filling = undefined;
    });
  }

  /** Makes the missing spares, one at a time, the most recently wanted image first. */
  private async fillAll(): Promise<void> {
    for (;;) {
      const imageId = [...this.recent].reverse().find((id) => (this.byImage.get(id)?.length ?? 0) < this.options.perImage);
      if (!imageId || this.closed) return;
      this.dropped.delete(imageId);
      const spare = await this.options.spawn(imageId, this.nextSlot++).catch((err: Error) => {
        log.warn("could not start a spare QEMU", { imageId, error: err.message });
        return undefined;
      });
      if (!spare) {
        // The image is gone or cannot be loaded: it keeps no spares.
        const at = this.recent.indexOf(imageId);
        if (at >= 0) this.recent.splice(at, 1);
        continue;
      }
      if (this.closed || this.dropped.has(imageId) || !this.recent.includes(imageId)) {
        await this.discard(spare);
        continue;
      }
      const spares = this.byImage.get(imageId) ?? [];
      spares.push(spare);
      this.byImage.set(imageId, spares);
      // One that ends while it waits (killed, out of memory) leaves the pool and its files go.
      void spare.vm.exited?.then(() => this.forget(spare));
    }
  }

  /** A spare whose QEMU ended on its own: out of the pool (unless taken), its files removed. */
  private forget(spare: Spare): void {
    const spares = this.byImage.get(spare.imageId);
    const at = spares?.indexOf(spare) ?? -1;
    if (at < 0) return;
    spares!.splice(at, 1);
    log.warn("a spare QEMU ended while it waited", { imageId: spare.imageId, dir: spare.dir });
    void this.discard(spare);
  }

  private async discard(spare: Spare): Promise<void> {
    await this.options.discard(spare).catch((err: Error) => log.warn("could not end a spare QEMU", { imageId: spare.imageId, dir: spare.dir, error: err.message }));
  }
}
