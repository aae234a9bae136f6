/**
 * A small authoritative DNS server for tests (UDP and TCP on one port), built on Cubicle's own
 * codec: A records and CNAMEs from tables, NXDOMAIN for anything else, NODATA for other types.
 * Like a real server it sets TC when a UDP answer does not fit the client's size (512 bytes,
 * or its EDNS size), so a test can drive a TCP fallback with a name that has many addresses.
 */
import dgram from "node:dgram";
import net from "node:net";
import {
  DnsRcode,
  DnsType,
  buildResponse,
  parseDnsMessage,
  type DnsMessage,
  type DnsRecord,
} from "../../src/network/dns/dns-message.js";

export interface DnsServerOptions {
  host: string;
  /** 0 = a free port (the same for UDP and TCP). */
  port: number;
  /** Lowercase name → IPv4 addresses. */
  records: Record<string, string[]>;
  /** TTL of every record, seconds (default 300). */
  ttl?: number;
  /** Lowercase name → the name it is an alias of. */
  cnames?: Record<string, string>;
  /** Names never answered (to make a client time out). */
  silent?: string[];
  /** Answer every UDP query with TC set and no records (a TCP fallback must follow). */
  truncateUdp?: boolean;
}

export interface DnsServerQuery {
  name: string;
  type: number;
  transport: "udp" | "tcp";
  id: number;
  /** The client's source port. */
  sourcePort: number;
}

export interface DnsServer {
  port: number;
  /** Lowercase question names, in the order asked. */
  queries: string[];
  /** Every query with its type, transport and id. */
  log: DnsServerQuery[];
  close(): Promise<void>;
}

const MAX_CNAME_HOPS = 8;

export async function startDnsServer(options: DnsServerOptions, attempt = 0): Promise<DnsServer> {
  const ttl = options.ttl ?? 300;
  const cnames = options.cnames ?? {};
  const silent = new Set(options.silent ?? []);
  const queries: string[] = [];
  const log: DnsServerQuery[] = [];

  const answer = (request: DnsMessage, transport: "udp" | "tcp", sourcePort: number): Buffer | undefined => {
    const question = request.questions[0];
    if (request.header.qr || request.questions.length !== 1 || !question) return buildResponse({ header: request.header, questions: [] }, { rcode: DnsRcode.FORMERR });
    const name = question.name.toLowerCase();
    queries.push(name);
    log.push({ name, type: question.type, transport, id: request.header.id, sourcePort });
    if (silent.has(name)) return undefined;
    const answers: DnsRecord[] = [];
    let current = name;
    let owner = question.name;
    for (let hop = 0; hop < MAX_CNAME_HOPS && cnames[current] !== undefined; hop++) {
      const target = cnames[current]!;
      answers.push({ name: owner, type: DnsType.CNAME, class: 1, ttl, data: { kind: "cname", target } });
      current = owner = target;
    }
    const addresses = options.records[current];
    if (answers.length === 0 && addresses === undefined) return buildResponse(request, { rcode: DnsRcode.NXDOMAIN, authoritative: true });
    if (question.type === DnsType.A) {
      for (const address of addresses ?? []) answers.push({ name: owner, type: DnsType.A, class: 1, ttl, data: { kind: "a", address } });
    }
    const full = buildResponse(request, { rcode: DnsRcode.NOERROR, answers, authoritative: true });
    if (transport === "tcp") return full;
    const opt = request.additionals.find((record) => record.type === DnsType.OPT);
    const limit = opt ? Math.max(512, opt.class) : 512;
    if (options.truncateUdp || full.length > limit) return buildResponse(request, { rcode: DnsRcode.NOERROR, truncated: true, authoritative: true });
    return full;
  };

  const parse = (bytes: Buffer): DnsMessage | undefined => {
    try {
      return parseDnsMessage(bytes);
    } catch {
      return undefined;
    }
  };

  const udp = dgram.createSocket("udp4");
  const sockets = new Set<net.Socket>();
  const tcp = net.createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => {});
    socket.setTimeout(10_000, () => socket.destroy());
    let buffered = Buffer.alloc(0);
    socket.on("data", (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      while (buffered.length >= 2 && buffered.length >= 2 + buffered.readUInt16BE(0)) {
        const length = buffered.readUInt16BE(0);
        const request = parse(buffered.subarray(2, 2 + length));
        buffered = buffered.subarray(2 + length);
        const response = request && answer(request, "tcp", socket.remotePort ?? 0);
        if (!response) continue;
        const frame = Buffer.alloc(2 + response.length);
        frame.writeUInt16BE(response.length);
        response.copy(frame, 2);
        socket.write(frame);
      }
    });
  });
  udp.on("message", (bytes, remote) => {
    const request = parse(bytes);
    const response = request && answer(request, "udp", remote.port);
    if (response) udp.send(response, remote.port, remote.address);
  });

  // UDP first on the asked (or a free) port, then TCP on the same number; on a clash with a
  // free port, start over (a closed dgram socket cannot be bound again).
  await new Promise<void>((resolve, reject) => {
    udp.once("error", reject);
    udp.bind(options.port, options.host, () => {
      udp.off("error", reject);
      resolve();
    });
  });
  try {
    await new Promise<void>((resolve, reject) => {
      tcp.once("error", reject);
      tcp.listen(udp.address().port, options.host, () => {
        tcp.off("error", reject);
        resolve();
      });
    });
  } catch (error) {
    await new Promise<void>((resolve) => udp.close(() => resolve()));
    if (options.port !== 0 || attempt >= 10) throw error;
    return startDnsServer(options, attempt + 1);
  }

  return {
    port: udp.address().port,
    queries,
    log,
    async close() {
      for (const socket of sockets) socket.destroy();
      await Promise.all([new Promise<void>((resolve) => tcp.close(() => resolve())), new Promise<void>((resolve) => udp.close(() => resolve()))]);
    },
  };
}
