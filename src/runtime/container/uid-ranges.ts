import { CubicleError } from "../../shared/cubicle-error.js";
import { SANDBOX_UID_COUNT } from "../types.js";

/**
 * Host uid/gid ranges for sandboxes: one range of 65536 ids per live sandbox, so that no
 * per-user kernel limit is shared between sandboxes (inotify instances, keys, nested namespaces,
 * processes …: the kernel charges them to the user, and to the owner of the user namespace,
 * which is the range's first id, see USERNS_OWNER_NOTE). Ranges start at 2^30, far above the
 * ids of real host users and of /etc/subuid ranges, and end below 2^32 - 1.
 */
export const UID_RANGE_START = 2 ** 30;
export const UID_RANGE_SLOTS = 32768;

export function uidBaseOfSlot(slot: number): number {
  return UID_RANGE_START + slot * SANDBOX_UID_COUNT;
}

export function slotOfUidBase(base: number): number | undefined {
  const offset = base - UID_RANGE_START;
  if (!Number.isInteger(offset) || offset < 0 || offset % SANDBOX_UID_COUNT !== 0) return undefined;
  const slot = offset / SANDBOX_UID_COUNT;
  return slot < UID_RANGE_SLOTS ? slot : undefined;
}

/**
 * Hands out ranges round-robin: a freed range is reused as late as possible (nothing of a
 * sandbox outlives it in the kernel that is keyed by uid, but late reuse keeps it that way).
 */
export class UidRanges {
  private readonly used = new Set<number>();
  private cursor = 0;

  /** Marks a range in use (found on the host after a restart); false when it is not ours. */
  claim(base: number): boolean {
    const slot = slotOfUidBase(base);
    if (slot === undefined) return false;
    this.used.add(slot);
    return true;
  }

  allocate(): number {
    for (let tried = 0; tried < UID_RANGE_SLOTS; tried++) {
      const slot = this.cursor;
      this.cursor = (this.cursor + 1) % UID_RANGE_SLOTS;
      if (!this.used.has(slot)) {
        this.used.add(slot);
        return uidBaseOfSlot(slot);
      }
    }
    throw new CubicleError("resource_exhausted", `all ${UID_RANGE_SLOTS} sandbox uid ranges are in use; kill sandboxes you no longer need`);
  }

  release(base: number): void {
    const slot = slotOfUidBase(base);
    if (slot !== undefined) this.used.delete(slot);
  }

  get inUse(): number {
    return this.used.size;
  }
}
