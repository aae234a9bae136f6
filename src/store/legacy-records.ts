import path from "node:path";
import type { SandboxRecord, SnapshotRecord } from "./types.js";

/**
 * Records written before images had ids name them by directory (`imageDir`): the layout the
 * core made them in, `<images>/snapshots/<name>`, `<images>/paused/<name>`,
 * `<images>/warm/<name>`. The container runtime's image store keeps that layout, so the same
 * image has the id `<kind>/<name>` (see runtime/images.ts); a directory elsewhere is taken to
 * be of the kind its record implies.
 */
const LEGACY_KIND_DIRS: Record<string, string> = { snapshots: "snapshot", paused: "pause", warm: "warm" };

export function imageIdFromLegacyDir(imageDir: string, kindOfRecord: "snapshot" | "pause"): string {
  const kind = LEGACY_KIND_DIRS[path.basename(path.dirname(imageDir))] ?? kindOfRecord;
  return `${kind}/${path.basename(imageDir)}`;
}

/** A sandbox record as stored (any version), with `pause.imageDir` turned into `pause.imageId`. */
export function sandboxFromBody(body: string): SandboxRecord {
  const record = JSON.parse(body) as SandboxRecord & { pause?: { imageDir?: string } };
  if (record.pause && "imageDir" in record.pause) {
    const { imageDir, ...pause } = record.pause;
    record.pause = { ...pause, ...(imageDir ? { imageId: record.pause.imageId ?? imageIdFromLegacyDir(imageDir, "pause") } : {}) };
  }
  return record;
}

/** A snapshot record as stored (any version), with `imageDir` turned into `imageId`. */
export function snapshotFromBody(body: string): SnapshotRecord {
  const record = JSON.parse(body) as SnapshotRecord & { imageDir?: string };
  if ("imageDir" in record) {
    const { imageDir, ...rest } = record;
    return { ...rest, imageId: rest.imageId ?? imageIdFromLegacyDir(imageDir ?? "", "snapshot") };
  }
  return record;
}
