/**
 * Signed `/files` URLs (e2b-wire-protocol.md §6.3): the SDK signs `downloadUrl()` / `uploadUrl()`
 * with the sandbox's access token; the router finds the sandbox by it and the agent checks it.
 */
import { createHash } from "node:crypto";

export type FileOperation = "read" | "write";

/** What a signature looks like: `v1_` + unpadded standard base64 of a SHA-256 (43 characters). */
export const fileSignaturePattern = /^v1_[A-Za-z0-9+/]{43}$/;

/** The operation a `/files` request performs: an upload (POST) writes, anything else reads. */
export function fileOperationOf(method: string | undefined): FileOperation {
  return method === "POST" ? "write" : "read";
}

/**
 * `v1_` + unpadded standard base64 of SHA-256("<path>:<operation>:<username>:<token>[:<expiration>]"),
 * as the SDK signs. `expiration` (Unix seconds) goes in as its decimal text, or as given when a
 * string.
 */
export function computeFileSignature(path: string, operation: FileOperation, username: string, accessToken: string, expiration?: number | string): string {
  const parts = [path, operation, username, accessToken];
  if (expiration !== undefined) parts.push(String(expiration));
  const digest = createHash("sha256").update(parts.join(":")).digest("base64");
  return "v1_" + digest.replace(/=+$/, "");
}

