import { createHash, timingSafeEqual } from "node:crypto";

/**
 * Whether a presented secret (API key, access token, signature) equals the expected one, in
 * time that depends on neither: both are hashed first, so their lengths are not compared.
 */
export function constantTimeEquals(expected: string, presented: string | undefined): boolean {
  if (presented === undefined) return false;
  const a = createHash("sha256").update(expected).digest();
  const b = createHash("sha256").update(presented).digest();
  return timingSafeEqual(a, b);
}
