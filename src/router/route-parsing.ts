import { CubicleError } from "../shared/cubicle-error.js";

/** A request for a port of a sandbox. */
export interface RouteMatch {
  sandboxId: string;
  port: number;
}

/** Quotes a value from the wire for an error message: short, and printable. */
export function quoteForMessage(value: string): string {
  const shown = value.length > 64 ? value.slice(0, 64) + "…" : value;
  return JSON.stringify(shown);
}

/**
 * A TCP port from a header or a Host label: 1–65535 in plain decimal digits. `Number()` is not
 * enough: it takes "", "0x50", "1e3" and "  8080.0 " too.
 */
export function parsePort(raw: string, what: string): number {
  const text = raw.trim();
  const port = /^\d{1,5}$/.test(text) ? Number(text) : NaN;
  if (!(port >= 1 && port <= 65535)) {
    throw new CubicleError("invalid_argument", `${what} must be a port number from 1 to 65535, not ${quoteForMessage(raw)}`);
  }
  return port;
}

/** Matches `<port>-<sandboxId>.<domain>[:<listen port>]`; the port is checked by parsePort. */
export function hostPattern(domain: string): RegExp {
  const escaped = domain.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  return new RegExp(`^(\\d+)-([a-z0-9]+)\\.${escaped}(?::\\d+)?$`, "i");
}

/**
 * The sandbox and port a request names by its `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers or
 * by its Host; undefined when it names none (API traffic). Throws an invalid_argument
 * CubicleError (400) when it names a sandbox but no usable port: that is sandbox traffic the
 * router cannot forward, and the API must not see it either.
 */
export function parseRoute(headers: { id: string | undefined; port: string | undefined; host: string | undefined }, pattern: RegExp): RouteMatch | undefined {
  if (headers.port !== undefined) {
    if (headers.id === undefined || headers.id.trim() === "") throw new CubicleError("invalid_argument", "E2b-Sandbox-Port needs an E2b-Sandbox-Id header naming the sandbox");
    return { sandboxId: headers.id.trim(), port: parsePort(headers.port, "E2b-Sandbox-Port") };
  }
  // An id without a port is not routed (protocol doc §4: the port header is mandatory).
  const hostMatch = headers.host !== undefined && headers.host.length <= 300 ? pattern.exec(headers.host) : null;
  if (hostMatch) return { sandboxId: hostMatch[2]!.toLowerCase(), port: parsePort(hostMatch[1]!, "the port in the Host name") };
  return undefined;
}
