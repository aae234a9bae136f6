import { CubicleError } from "./cubicle-error.js";

/** An opaque list cursor: base64url of `<time>.<id>`, the last item a page returned. */
export function encodePageCursor(at: number, id: string): string {
  return Buffer.from(`${at}.${id}`).toString("base64url");
}

/** Reads a cursor made by encodePageCursor; `isId` checks the id part. Undefined for no cursor. */
export function decodePageCursor(raw: string | undefined, isId: (id: string) => boolean): { at: number; id: string } | undefined {
  if (raw === undefined || raw === "") return undefined;
  const text = Buffer.from(raw, "base64url").toString("utf8");
  const dot = text.indexOf(".");
  const at = Number(text.slice(0, dot));
  const id = text.slice(dot + 1);
  if (dot < 1 || !Number.isFinite(at) || !isId(id)) throw new CubicleError("invalid_argument", "nextToken is not a token this server issued");
  return { at, id };
}
