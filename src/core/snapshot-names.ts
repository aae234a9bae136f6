import { CubicleError } from "../shared/cubicle-error.js";
import { decodePageCursor, encodePageCursor } from "../shared/page-cursor.js";

const namePattern = /^[a-z0-9][a-z0-9._-]{0,62}$/;
const snapshotIdPattern = /^snap-[a-z0-9]{20}$/;

/**
 * A snapshot name as given to `createSnapshot({name})`: lowercased, letters, digits, `.`, `_`, `-`,
 * at most 63 characters. A `:default` tag (upstream's only tag for snapshots) is dropped.
 * Names that look like snapshot ids are refused: a name must never shadow an id.
 */
export function parseSnapshotName(raw: unknown): string | undefined {
  if (raw === undefined || raw === null || raw === "") return undefined;
  if (typeof raw !== "string") throw new CubicleError("invalid_argument", "name must be a string");
  const name = stripDefaultTag(raw.trim().toLowerCase());
  if (!namePattern.test(name)) {
    throw new CubicleError("invalid_argument", `snapshot name "${raw}" must be 1–63 lowercase letters, digits, ".", "_" or "-", starting with a letter or digit`);
  }
  if (isSnapshotId(name)) throw new CubicleError("invalid_argument", `snapshot name "${raw}" looks like a snapshot id; choose another name`);
  return name;
}

/** A reference to a snapshot (id or name) as it arrives in `templateID` or a filter: `x:default` is `x`. */
export function normaliseSnapshotRef(raw: string): string {
  return stripDefaultTag(raw.trim().toLowerCase());
}

export function isSnapshotId(value: string): boolean {
  return snapshotIdPattern.test(value);
}

function stripDefaultTag(value: string): string {
  return value.endsWith(":default") ? value.slice(0, -":default".length) : value;
}

/** Paging cursor of `GET /snapshots`: the last snapshot's creation time and id. */
export function encodeSnapshotCursor(createdAt: number, snapshotId: string): string {
  return encodePageCursor(createdAt, snapshotId);
}

export function decodeSnapshotCursor(raw: string | undefined): { createdAt: number; snapshotId: string } | undefined {
  const cursor = decodePageCursor(raw, isSnapshotId);
  return cursor && { createdAt: cursor.at, snapshotId: cursor.id };
}
