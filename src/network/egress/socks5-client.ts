import net from "node:net";
import { CubicleError } from "../../shared/cubicle-error.js";
import type { EgressProxyConfig } from "../egress-types.js";

/**
 * A SOCKS5 CONNECT (RFC 1928) with no authentication or username/password (RFC 1929), to reach
 * a sandbox's destination through the egress proxy the user configured.
 */

export interface Socks5ConnectOptions {
  proxy: EgressProxyConfig;
  /** An IPv4 or IPv6 literal: the proxy is never asked to resolve a name. */
  destination: { address: string; port: number };
  /** Covers the TCP connect to the proxy and the whole negotiation. Default 10 s. */
  timeoutMs?: number;
}

/** Why a SOCKS5 connect failed, for the audit log. */
export type Socks5FailureKind = "unreachable" | "auth" | "refused" | "protocol" | "timeout";

export class Socks5Error extends CubicleError {
  constructor(
    readonly kind: Socks5FailureKind,
    message: string,
    cause?: unknown,
  ) {
    super(kind === "timeout" ? "deadline_exceeded" : "bad_gateway", message, { cause, details: { kind } });
  }
}

const VERSION = 0x05;
const METHOD_NONE = 0x00;
const METHOD_USER_PASS = 0x02;
const METHOD_REFUSED = 0xff;
const COMMAND_CONNECT = 0x01;
const ATYP_IPV4 = 0x01;
const ATYP_DOMAIN = 0x03;
const ATYP_IPV6 = 0x04;
/** The longest reply: VER REP RSV ATYP, a 255-byte domain with its length byte, a port. */
const MAX_REPLY = 4 + 1 + 255 + 2;

// RFC 1928 §6.
const REPLY_TEXT: Record<number, string> = {
  1: "general SOCKS server failure",
  2: "connection not allowed by ruleset",
  3: "network unreachable",
  4: "host unreachable",
  5: "connection refused",
  6: "TTL expired",
  7: "command not supported",
  8: "address type not supported",
};

/**
 * Connects to `destination` through the SOCKS5 proxy. Resolves with the tunnel (a socket that
 * now carries the destination's bytes, paused); rejects with a Socks5Error. The proxy's host name
 * is resolved on each call, so a changed DNS record takes effect on the next connection.
 */
export function socks5Connect(options: Socks5ConnectOptions): Promise<net.Socket> {
  const { proxy, destination } = options;
  const timeoutMs = options.timeoutMs ?? 10_000;
  const where = `${proxy.host}:${proxy.port}`;
  const useAuth = proxy.username !== undefined || proxy.password !== undefined;
  const username = Buffer.from(proxy.username ?? "", "utf8");
  const password = Buffer.from(proxy.password ?? "", "utf8");
  if (useAuth && (username.length === 0 || username.length > 255 || password.length > 255)) {
    return Promise.reject(new Socks5Error("auth", `egress proxy ${where}: a username of 1-255 bytes and a password of at most 255 bytes are needed`));
  }
  const address = addressBytes(destination.address);
  if (!address) return Promise.reject(new Socks5Error("protocol", `egress proxy ${where}: ${destination.address} is not an IP address`));

  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: proxy.host, port: proxy.port, allowHalfOpen: true, noDelay: true });
    let step: "connect" | "method" | "auth" | "reply" = "connect";
    let received = Buffer.alloc(0);
    let settled = false;

    const fail = (error: Socks5Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      reject(error);
    };
    const timer = setTimeout(() => fail(new Socks5Error("timeout", `egress proxy ${where} did not answer within ${timeoutMs} ms (${step})`)), timeoutMs);

    socket.on("error", (err: NodeJS.ErrnoException) => {
      const kind: Socks5FailureKind = step === "connect" ? "unreachable" : "protocol";
      fail(new Socks5Error(kind, `egress proxy ${where} ${step === "connect" ? "unreachable" : "failed"}: ${err.code ?? err.message}`, err));
    });
    socket.on("close", () => fail(new Socks5Error(step === "connect" ? "unreachable" : "protocol", `egress proxy ${where} closed the connection during ${step}`)));
    socket.on("connect", () => {
      step = "method";
      socket.write(Buffer.from(useAuth ? [VERSION, 2, METHOD_NONE, METHOD_USER_PASS] : [VERSION, 1, METHOD_NONE]));
    });
    socket.on("data", onData);

    function onData(chunk: Buffer): void {
      if (settled) return;
      received = Buffer.concat([received, chunk]);
      if (received.length > MAX_REPLY + 2) return fail(new Socks5Error("protocol", `egress proxy ${where} sent more than a reply`));
      if (step === "method") {
        if (received.length < 2) return;
        const [version, method] = [received[0], received[1]];
        received = received.subarray(2);
        if (version !== VERSION) return fail(new Socks5Error("protocol", `egress proxy ${where} is not a SOCKS5 server`));
        if (method === METHOD_USER_PASS && useAuth) {
          step = "auth";
          // RFC 1929 §2: VER=1 ULEN UNAME PLEN PASSWD.
          socket.write(Buffer.concat([Buffer.from([1, username.length]), username, Buffer.from([password.length]), password]));
          return;
        }
        if (method === METHOD_NONE) return sendConnect();
        if (method === METHOD_REFUSED) {
          return fail(new Socks5Error("auth", `egress proxy ${where} accepts none of our authentication methods (${useAuth ? "username/password" : "none"})`));
        }
        return fail(new Socks5Error("protocol", `egress proxy ${where} chose an authentication method we did not offer (${method})`));
      }
      if (step === "auth") {
        if (received.length < 2) return;
        const status = received[1];
        received = received.subarray(2);
        if (status !== 0) return fail(new Socks5Error("auth", `egress proxy ${where} refused the username or password`));
        return sendConnect();
      }
      if (step === "reply") {
        if (received.length < 5) return;
        const [version, reply, , atyp] = [received[0], received[1], received[2], received[3]];
        if (version !== VERSION) return fail(new Socks5Error("protocol", `egress proxy ${where} sent a malformed reply`));
        if (reply !== 0) {
          const text = REPLY_TEXT[reply!] ?? `reply ${reply}`;
          return fail(new Socks5Error("refused", `egress proxy ${where} could not connect to ${destination.address}:${destination.port}: ${text}`));
        }
        const addressLength = atyp === ATYP_IPV4 ? 4 : atyp === ATYP_IPV6 ? 16 : atyp === ATYP_DOMAIN ? 1 + received[4]! : -1;
        if (addressLength < 0) return fail(new Socks5Error("protocol", `egress proxy ${where} sent an unknown address type ${atyp}`));
        const replyLength = 4 + addressLength + 2;
        if (received.length < replyLength) return;
        const rest = received.subarray(replyLength);
        settled = true;
        clearTimeout(timer);
        socket.off("data", onData);
        socket.removeAllListeners("close");
        socket.removeAllListeners("error");
        socket.removeAllListeners("connect");
        socket.pause();
        if (rest.length > 0) socket.unshift(rest);
        resolve(socket);
      }
    }

    function sendConnect(): void {
      step = "reply";
      const port = Buffer.alloc(2);
      port.writeUInt16BE(destination.port);
      socket.write(Buffer.concat([Buffer.from([VERSION, COMMAND_CONNECT, 0x00]), address!, port]));
    }
  });
}

/** ATYP and address bytes of an IP literal, or undefined. */
function addressBytes(address: string): Buffer | undefined {
  if (net.isIPv4(address)) return Buffer.from([ATYP_IPV4, ...address.split(".").map(Number)]);
  if (net.isIPv6(address)) {
    const bytes = ipv6Bytes(address);
    return bytes ? Buffer.concat([Buffer.from([ATYP_IPV6]), bytes]) : undefined;
  }
  return undefined;
}

function ipv6Bytes(address: string): Buffer | undefined {
  const [head, tail] = address.includes("::") ? address.split("::") : [address, undefined];
  const parse = (part: string | undefined) => (part ? part.split(":") : []);
  let groups = parse(head);
  let tailGroups = parse(tail);
  const last = (tail === undefined ? groups : tailGroups).at(-1);
  const embedded: number[] = [];
  if (last && net.isIPv4(last)) {
    const [a, b, c, d] = last.split(".").map(Number) as [number, number, number, number];
    embedded.push((a << 8) | b, (c << 8) | d);
    if (tail === undefined) groups = groups.slice(0, -1);
    else tailGroups = tailGroups.slice(0, -1);
  }
  const values = groups.map((g) => parseInt(g, 16));
  const tailValues = tailGroups.map((g) => parseInt(g, 16));
  (tail === undefined ? values : tailValues).push(...embedded);
  const fill = 8 - values.length - tailValues.length;
  if (fill < 0 || (tail === undefined && fill !== 0)) return undefined;
  const all = [...values, ...new Array<number>(fill).fill(0), ...tailValues];
  const out = Buffer.alloc(16);
  all.forEach((value, i) => out.writeUInt16BE(value & 0xffff, i * 2));
  return out;
}
