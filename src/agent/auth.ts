/**
 * envd authentication (e2b-wire-protocol.md §6): the `X-Access-Token` header, the user from
 * `Authorization: Basic base64("user:")`, and signed `/files` URLs (src/protocol/file-signature.ts).
 */
import type { IncomingHttpHeaders } from "node:http";
import { computeFileSignature, fileOperationOf } from "../protocol/index.js";
import { constantTimeEquals } from "../shared/compare.js";
import { headerString } from "../shared/headers.js";
import { CubicleError } from "../shared/cubicle-error.js";
import type { AgentState } from "./state.js";

export const accessTokenHeader = "x-access-token";

/** upstream envd's text for a request without the right token. */
export const unauthorizedMessage = "unauthorized access, please provide a valid access token or method signing if supported";

/**
 * Paths that skip the general token check (upstream `authExcludedPaths`). `/files` has its own
 * check (token or signature, `checkFilesAuth`); `/init` is handled by `checkInitAuth`.
 */
const exemptPaths = new Set(["GET /health", "HEAD /health", "GET /files", "POST /files", "POST /init"]);

/**
 * The general check run before dispatching any request: with a token set, everything but the
 * exempt paths needs a matching `X-Access-Token`. Returns the error to answer with, if any.
 */
export function checkAccessToken(state: AgentState, method: string, pathname: string, headers: IncomingHttpHeaders): CubicleError | undefined {
  if (state.accessToken === undefined) return undefined;
  if (exemptPaths.has(`${method} ${pathname}`)) return undefined;
  if (constantTimeEquals(state.accessToken, headerString(headers, accessTokenHeader))) return undefined;
  return new CubicleError("unauthenticated", unauthorizedMessage);
}

/**
 * `/init` is exempt upstream (secured there by the hypervisor's metadata service). Here, once
 * a token is set, only a caller that knows it may re-init: otherwise any process inside the
 * sandbox could replace the token and the default user.
 */
export function checkInitAuth(state: AgentState, headers: IncomingHttpHeaders): CubicleError | undefined {
  if (state.accessToken === undefined) return undefined;
  if (constantTimeEquals(state.accessToken, headerString(headers, accessTokenHeader))) return undefined;
  return new CubicleError("unauthenticated", unauthorizedMessage);
}

/**
 * The `/files` check: with a token set, either `X-Access-Token` matches or the query carries a
 * valid, unexpired signature. Returns the 401 (or 400) error to answer with, if any.
 */
export function checkFilesAuth(
  state: AgentState,
  method: string,
  query: URLSearchParams,
  headers: IncomingHttpHeaders,
  nowMs: number = Date.now(),
): CubicleError | undefined {
  const token = state.accessToken;
  if (token === undefined) return undefined;
  const presented = headerString(headers, accessTokenHeader);
  if (presented !== undefined && presented !== "") {
    return constantTimeEquals(token, presented) ? undefined : new CubicleError("unauthenticated", "access token present in header but does not match");
  }
  const signature = query.get("signature");
  if (signature === null) return new CubicleError("unauthenticated", "missing signature query parameter");
  const expirationText = query.get("signature_expiration");
  let expiration: number | undefined;
  if (expirationText !== null) {
    if (!/^-?\d{1,19}$/.test(expirationText)) {
      return new CubicleError("invalid_argument", `invalid format for parameter signature_expiration: "${expirationText}"`);
    }
    expiration = Number(expirationText);
  }
  const expected = computeFileSignature(query.get("path") ?? "", fileOperationOf(method), query.get("username") ?? "", token, expiration);
  if (!constantTimeEquals(expected, signature)) return new CubicleError("unauthenticated", "invalid signature");
  if (expiration !== undefined && expiration < Math.floor(nowMs / 1000)) {
    return new CubicleError("unauthenticated", "signature is already expired");
  }
  return undefined;
}

/** The user name of `Authorization: Basic base64("user:")`, or undefined when absent or malformed. */
export function usernameFromAuthorization(headers: IncomingHttpHeaders): string | undefined {
  const header = headerString(headers, "authorization");
  if (!header) return undefined;
  const match = /^basic\s+([A-Za-z0-9+/=_-]+)\s*$/i.exec(header);
  if (!match) return undefined;
  const decoded = Buffer.from(match[1]!, "base64").toString("utf8");
  const colon = decoded.indexOf(":");
  // Go's BasicAuth requires the colon; without it the header is ignored.
  if (colon < 0) return undefined;
  return decoded.slice(0, colon);
}
