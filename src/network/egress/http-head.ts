import { normaliseHostname } from "../egress-policy.js";

/**
 * The request line and Host of the first HTTP/1.x request on a connection, read before the egress
 * proxy decides where the connection may go.
 */

/** The most bytes read to find the end of the first request head; beyond it there is no Host. */
export const MAX_HTTP_HEAD_BYTES = 16 * 1024;

export type HttpHeadResult =
  | { state: "incomplete" }
  /** `host` is the Host header's name (lowercase, no port, no trailing dot) when it has one. */
  | { state: "complete"; method: string; target: string; host: string | undefined }
  | { state: "invalid" };

// RFC 9110 §9 methods and the WebDAV ones a client may start with.
const METHODS = new Set(["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH"]);
const LONGEST_METHOD = 9;

/** True when `head` starts with an HTTP method and a space (or could, given more bytes). */
export function looksLikeHttp(head: Buffer): boolean {
  const prefix = head.subarray(0, LONGEST_METHOD + 1).toString("latin1");
  const space = prefix.indexOf(" ");
  if (space >= 0) return METHODS.has(prefix.slice(0, space));
  return [...METHODS].some((method) => method.startsWith(prefix) && prefix.length > 0);
}

/** Parses the request head at the start of `data`. */
export function parseHttpHead(data: Buffer): HttpHeadResult {
  const window = data.subarray(0, MAX_HTTP_HEAD_BYTES);
  // RFC 9112 §2.2: a bare LF may end a line; accept it like CRLF.
  const end = findHeadEnd(window);
  if (end < 0) return data.length >= MAX_HTTP_HEAD_BYTES ? { state: "invalid" } : { state: "incomplete" };
  const lines = window.subarray(0, end).toString("latin1").split("\n").map((line) => line.replace(/\r$/, ""));
  const requestLine = /^([A-Z]+) (\S+) HTTP\/1\.[01]$/.exec(lines[0] ?? "");
  if (!requestLine || !METHODS.has(requestLine[1]!)) return { state: "invalid" };
  const hosts: string[] = [];
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    if (colon <= 0) continue;
    if (line.slice(0, colon).toLowerCase() === "host") hosts.push(line.slice(colon + 1).trim());
  }
  // RFC 9112 §3.2: more than one Host is a bad request; name no host rather than guess one.
  const host = hosts.length === 1 ? hostWithoutPort(hosts[0]!) : undefined;
  return { state: "complete", method: requestLine[1]!, target: requestLine[2]!, host };
}

/** The name of a Host header value (`name[:port]`), normalised; undefined for IP literals and junk. */
export function hostWithoutPort(value: string): string | undefined {
  if (value.startsWith("[")) return undefined; // an IPv6 literal
  const match = /^([^:]*)(:\d{1,5})?$/.exec(value.trim());
  return match ? normaliseHostname(match[1]!) : undefined;
}

function findHeadEnd(data: Buffer): number {
  for (let i = 0; i < data.length; i++) {
    if (data[i] !== 0x0a) continue;
    if (data[i + 1] === 0x0a) return i;
    if (data[i + 1] === 0x0d && data[i + 2] === 0x0a) return i;
  }
  return -1;
}
