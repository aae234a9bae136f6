import { randomBytes } from "node:crypto";

const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";

function randomLowerAlnum(length: number): string {
  const bytes = randomBytes(length);
  let out = "";
  for (const byte of bytes) out += alphabet[byte % alphabet.length];
  return out;
}

/** Sandbox ids look like upstream's: `i` + 20 lowercase alphanumerics (the proxy validates `[a-z0-9]+`). */
export function newSandboxId(): string {
  return "i" + randomLowerAlnum(20);
}

/** Tokens handed to secure sandboxes. */
export function newToken(): string {
  return randomBytes(24).toString("hex");
}

/** `e2b_` + 40 lowercase hex, the key format some SDK versions validate client-side. */
export function newApiKey(): string {
  return "e2b_" + randomBytes(20).toString("hex");
}

/** Snapshot ids: `snap-` + 20 lowercase alphanumerics; valid as a `templateID` and in URL paths. */
export function newSnapshotId(): string {
  return "snap-" + randomLowerAlnum(20);
}

/** Ids of a fork's one-off hidden snapshot: never listed, removed after use. */
export function newForkSnapshotId(): string {
  return "img-" + randomLowerAlnum(20);
}
