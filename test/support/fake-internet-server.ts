/**
 * The fake internet's services, run by fake-internet.ts as ONE child process inside its network
 * namespace: `node --import tsx fake-internet-server.ts <config JSON>`.
 *
 * - HTTP (http:80) and HTTPS (https:443), and an "evil" host on both ports (evil:80, evil:443):
 *   each answers with a JSON echo of the request and records it. `GET /bytes/<n>` answers n
 *   bytes instead (for bandwidth tests).
 * - DNS (dns:53, UDP and TCP): the names in the config, a rebinding name, NXDOMAIN otherwise.
 * - TCP and UDP echo (echo:7).
 * - SOCKS5 (socks:<port>), from the module the config names, stoppable for fail-closed tests.
 *
 * Control is JSON lines: requests on stdin, answers (tagged CONTROL_TAG) on stdout. stdin's end
 * (the test process died) ends this process.
 */
import dgram from "node:dgram";
import { readFileSync } from "node:fs";
import http from "node:http";
import http2 from "node:http2";
import https from "node:https";
import net from "node:net";
import type { TLSSocket } from "node:tls";
import {
  aRecordAddress,
  decodeDnsMessage,
  DNS_CLASS_IN,
  DNS_RCODE,
  DNS_TYPE,
  dnsMessage,
  encodeARecordData,
  encodeDnsMessage,
  encodeDnsName,
  frameDnsTcp,
  MAX_UDP_MESSAGE_BYTES,
  peekDnsId,
  type DnsMessage,
  type DnsRecord,
} from "./dns-wire.js";
import {
  CONTROL_TAG,
  MAX_CONTROL_LINE_BYTES,
  MAX_RECORDS,
  type ControlMessage,
  type ControlRequest,
  type FakeHttpServerName,
  type FakeInternetServerConfig,
  type RecordedDnsQuery,
  type RecordedRequest,
  type RecordedSocksConnection,
} from "./fake-internet-types.js";

/** The part of test/support/socks5-server.ts this server uses. */
interface Socks5ServerModule {
  startSocks5Server(options: { host: string; port: number; username?: string; password?: string }): Promise<{
    port: number;
    connections: RecordedSocksConnection[];
    close(): Promise<void>;
  }>;
}

const IDLE_TIMEOUT_MS = 30_000;
const MAX_DNS_TCP_CONNECTIONS = 64;
const MAX_BYTES_RESPONSE = 256 * 1024 * 1024;

// Protocol lines own stdout; anything a module logs goes to stderr.
console.log = console.error;
console.info = console.error;

const config = JSON.parse(process.argv[2] ?? "") as FakeInternetServerConfig;
const requests: RecordedRequest[] = [];
const dnsQueries: RecordedDnsQuery[] = [];
const pastSocksConnections: RecordedSocksConnection[] = [];

function keep<T>(list: T[], item: T): void {
  list.push(item);
  if (list.length > MAX_RECORDS) list.splice(0, list.length - MAX_RECORDS);
}

function send(message: ControlMessage): void {
  process.stdout.write(JSON.stringify(message) + "\n");
}

// --- HTTP and HTTPS -------------------------------------------------------------------------

function echoHandler(server: FakeHttpServerName) {
  return function handleEchoRequest(req: http.IncomingMessage, res: http.ServerResponse): void {
    const rawHeaders: [string, string][] = [];
    for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) rawHeaders.push([req.rawHeaders[i]!, req.rawHeaders[i + 1]!]);
    const record: RecordedRequest = {
      time: Date.now(),
      server,
      method: req.method ?? "",
      path: req.url ?? "",
      host: req.headers.host,
      headers: { ...(req.headers as Record<string, string | string[]>) },
      rawHeaders,
      remoteAddress: req.socket.remoteAddress ?? "",
      remotePort: req.socket.remotePort ?? 0,
      tlsServername: server.endsWith("https") ? ((req.socket as TLSSocket & { servername?: string | false }).servername || undefined) : undefined,
      bodyBytes: 0,
    };
    keep(requests, record);
    req.on("data", (chunk: Buffer) => {
      record.bodyBytes += chunk.length;
    });
    req.on("error", () => res.destroy());
    req.on("end", () => {
      const bytes = /^\/bytes\/(\d{1,10})$/.exec(record.path);
      if (bytes && record.method === "GET") return sendBytes(res, Math.min(Number(bytes[1]), MAX_BYTES_RESPONSE));
      const { time: _time, bodyBytes: _bodyBytes, ...echo } = record;
      const body = JSON.stringify({ ...echo, bodyBytes: record.bodyBytes });
      res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body), "x-fake-server": server });
      res.end(body);
    });
  };
}

/** The HTTP/2 services: each stream recorded like an HTTP/1.1 request, answered with its echo. */
function echoStream(server: FakeHttpServerName) {
  return function handleEchoStream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, _flags: number, raw: string[]): void {
    const rawHeaders: [string, string][] = [];
    for (let i = 0; i + 1 < raw.length; i += 2) if (!raw[i]!.startsWith(":")) rawHeaders.push([raw[i]!, raw[i + 1]!]);
    const socket = stream.session?.socket as TLSSocket | undefined;
    const record: RecordedRequest = {
      time: Date.now(),
      server,
      method: String(headers[":method"] ?? ""),
      path: String(headers[":path"] ?? ""),
      host: headers[":authority"] as string | undefined,
      headers: Object.fromEntries(rawHeaders.map(([name]) => [name, headers[name] as string | string[]])),
      rawHeaders,
      remoteAddress: socket?.remoteAddress ?? "",
      remotePort: socket?.remotePort ?? 0,
      tlsServername: server === "h2" ? ((socket as TLSSocket & { servername?: string | false })?.servername || undefined) : undefined,
      bodyBytes: 0,
    };
    keep(requests, record);
    stream.on("error", () => {});
    stream.on("data", (chunk: Buffer) => {
      record.bodyBytes += chunk.length;
    });
    stream.on("end", () => {
      const { time: _time, bodyBytes: _bodyBytes, ...echo } = record;
      stream.respond({ ":status": 200, "content-type": "application/json", "x-fake-server": server });
      stream.end(JSON.stringify({ ...echo, bodyBytes: record.bodyBytes }));
    });
  };
}

function sendBytes(res: http.ServerResponse, total: number): void {
  res.writeHead(200, { "content-type": "application/octet-stream", "content-length": total });
  const chunk = Buffer.alloc(64 * 1024, 0x61);
  let left = total;
  const pump = () => {
    while (left > 0) {
      const piece = left >= chunk.length ? chunk : chunk.subarray(0, left);
      left -= piece.length;
      if (!res.write(piece)) return void res.once("drain", pump);
    }
    res.end();
  };
  res.on("close", () => {
    left = 0;
  });
  pump();
}

function tuneHttpServer<T extends http.Server>(server: T): T {
  server.requestTimeout = IDLE_TIMEOUT_MS;
  server.headersTimeout = 10_000;
  server.keepAliveTimeout = 5_000;
  server.on("clientError", (_err, socket) => socket.destroy());
  return server;
}

// --- DNS -------------------------------------------------------------------------------------

let rebindCount = 0;

function soaRecord(zone: string): DnsRecord {
  const ttl = config.dns.ttlSeconds;
  const numbers = Buffer.alloc(20);
  [1, 3600, 600, 86_400, ttl].forEach((value, i) => numbers.writeUInt32BE(value, i * 4));
  const data = Buffer.concat([encodeDnsName(`ns.${zone}`), encodeDnsName(`hostmaster.${zone}`), numbers]);
  return { name: zone, type: DNS_TYPE.SOA, class: DNS_CLASS_IN, ttl, data };
}

/** The zones this server is authoritative for: the last two labels of every configured name. */
const zones = new Set([...Object.keys(config.dns.records), config.dns.rebindName].map((name) => name.split(".").slice(-2).join(".")));

/** The SOA that tells a resolver how long to cache a negative answer (RFC 2308), in-zone only. */
function negativeAuthority(name: string): DnsRecord[] {
  const labels = name.split(".");
  for (let i = 0; i < labels.length; i++) {
    const zone = labels.slice(i).join(".");
    if (zones.has(zone)) return [soaRecord(zone)];
  }
  return [];
}

/** The answer to one query, and what is recorded of it; undefined: send nothing. */
function answerDns(packet: Buffer, transport: "udp" | "tcp", remote: { address: string; port: number }): Buffer | undefined {
  const record: RecordedDnsQuery = { time: Date.now(), transport, remoteAddress: remote.address, remotePort: remote.port, name: "", type: 0, rcode: undefined, answers: [] };
  keep(dnsQueries, record);
  let query: DnsMessage;
  try {
    query = decodeDnsMessage(packet);
  } catch {
    const id = peekDnsId(packet);
    if (id === undefined || packet.length < 12 || (packet[2]! & 0x80) !== 0) return undefined;
    record.rcode = DNS_RCODE.FORMERR;
    return encodeDnsMessage(dnsMessage({ id, qr: true, rcode: DNS_RCODE.FORMERR }));
  }
  if (query.qr) return undefined;
  const reply = dnsMessage({ id: query.id, qr: true, opcode: query.opcode, rd: query.rd, questions: query.questions });
  const question = query.questions[0];
  if (question) {
    record.name = question.name.toLowerCase();
    record.type = question.type;
  }
  if (query.opcode !== 0) reply.rcode = DNS_RCODE.NOTIMP;
  else if (query.questions.length !== 1 || question!.class !== DNS_CLASS_IN) reply.rcode = DNS_RCODE.FORMERR;
  else {
    const name = record.name;
    let addresses = config.dns.records[name];
    let ttl = config.dns.ttlSeconds;
    if (name === config.dns.rebindName) {
      ttl = config.dns.rebindTtlSeconds;
      addresses = question!.type === DNS_TYPE.A || question!.type === DNS_TYPE.ANY ? [config.dns.rebindAddresses[rebindCount++ % 2]!] : [];
    }
    reply.aa = true;
    if (addresses === undefined) {
      reply.rcode = DNS_RCODE.NXDOMAIN;
      reply.authorities.push(...negativeAuthority(name));
    } else if (question!.type === DNS_TYPE.A || question!.type === DNS_TYPE.ANY) {
      for (const address of addresses) reply.answers.push({ name: question!.name, type: DNS_TYPE.A, class: DNS_CLASS_IN, ttl, data: encodeARecordData(address) });
    }
    if (addresses !== undefined && reply.answers.length === 0) reply.authorities.push(...negativeAuthority(name));
  }
  record.rcode = reply.rcode;
  record.answers = reply.answers.map((answer) => aRecordAddress(answer) ?? "");
  let encoded = encodeDnsMessage(reply);
  if (transport === "udp" && encoded.length > MAX_UDP_MESSAGE_BYTES) {
    // RFC 1035 §4.2.1: a UDP answer that does not fit is truncated, the client retries over TCP.
    encoded = encodeDnsMessage({ ...reply, tc: true, answers: [], authorities: [] });
  }
  return encoded;
}

function startDnsUdp(): Promise<dgram.Socket> {
  const socket = dgram.createSocket("udp4");
  socket.on("message", (packet, remote) => {
    const reply = answerDns(packet, "udp", remote);
    if (reply) socket.send(reply, remote.port, remote.address);
  });
  socket.on("error", (err) => console.error("dns udp:", err.message));
  return new Promise((resolve, reject) => {
    socket.once("error", reject);
    socket.bind(53, config.addresses.dns, () => resolve(socket));
  });
}

function startDnsTcp(): Promise<net.Server> {
  const server = net.createServer((socket) => {
    socket.setTimeout(IDLE_TIMEOUT_MS, () => socket.destroy());
    socket.on("error", () => socket.destroy());
    let buffered = Buffer.alloc(0);
    socket.on("data", (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      // One 2-byte length and at most a 65535-byte message: a frame never needs more.
      while (buffered.length >= 2) {
        const length = buffered.readUInt16BE(0);
        if (buffered.length < 2 + length) break;
        const packet = buffered.subarray(2, 2 + length);
        buffered = buffered.subarray(2 + length);
        const reply = answerDns(Buffer.from(packet), "tcp", { address: socket.remoteAddress ?? "", port: socket.remotePort ?? 0 });
        if (reply) socket.write(frameDnsTcp(reply));
        else return void socket.destroy();
      }
    });
  });
  server.maxConnections = MAX_DNS_TCP_CONNECTIONS;
  return listen(server, 53, config.addresses.dns);
}

// --- echo --------------------------------------------------------------------------------------

function startTcpEcho(): Promise<net.Server> {
  const server = net.createServer((socket) => {
    socket.setTimeout(IDLE_TIMEOUT_MS, () => socket.destroy());
    socket.on("error", () => socket.destroy());
    socket.pipe(socket);
  });
  return listen(server, 7, config.addresses.echo);
}

function startUdpEcho(): Promise<dgram.Socket> {
  const socket = dgram.createSocket("udp4");
  socket.on("message", (packet, remote) => socket.send(packet, remote.port, remote.address));
  socket.on("error", (err) => console.error("udp echo:", err.message));
  return new Promise((resolve, reject) => {
    socket.once("error", reject);
    socket.bind(7, config.addresses.echo, () => resolve(socket));
  });
}

// --- SOCKS5 ------------------------------------------------------------------------------------

let socksServer: Awaited<ReturnType<Socks5ServerModule["startSocks5Server"]>> | undefined;
let socksModule: Socks5ServerModule | undefined;

async function startSocks(): Promise<void> {
  if (!config.socks) throw new Error("this fake internet has no SOCKS5 service");
  if (socksServer) return;
  socksModule ??= (await import(config.socks.modulePath)) as Socks5ServerModule;
  const { port, username, password } = config.socks;
  socksServer = await socksModule.startSocks5Server({ host: config.addresses.socks, port, username, password });
}

async function stopSocks(): Promise<void> {
  const server = socksServer;
  if (!server) return;
  socksServer = undefined;
  pastSocksConnections.push(...server.connections);
  await server.close();
}

// --- control -----------------------------------------------------------------------------------

async function handleControl(request: ControlRequest): Promise<unknown> {
  switch (request.op) {
    case "records":
      return { requests, dnsQueries, socksConnections: [...pastSocksConnections, ...(socksServer?.connections ?? [])] };
    case "clearRecords":
      requests.length = 0;
      dnsQueries.length = 0;
      pastSocksConnections.length = 0;
      socksServer?.connections.splice(0);
      return null;
    case "stopSocks":
      return stopSocks().then(() => null);
    case "startSocks":
      return startSocks().then(() => null);
    default:
      throw new Error(`unknown control operation ${JSON.stringify((request as { op: unknown }).op)}`);
  }
}

function readControl(): void {
  let pending = "";
  process.stdin.setEncoding("utf8");
  process.stdin.on("data", (chunk: string) => {
    pending += chunk;
    if (pending.length > MAX_CONTROL_LINE_BYTES) {
      console.error("control line too long");
      process.exit(2);
    }
    let newline: number;
    while ((newline = pending.indexOf("\n")) >= 0) {
      const line = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      let request: ControlRequest;
      try {
        request = JSON.parse(line) as ControlRequest;
      } catch {
        console.error("unreadable control line");
        continue;
      }
      handleControl(request).then(
        (result) => send({ tag: CONTROL_TAG, id: request.id, ok: true, result }),
        (err: unknown) => send({ tag: CONTROL_TAG, id: request.id, ok: false, error: err instanceof Error ? err.message : String(err) }),
      );
    }
  });
  // The test process is gone (or closed us): nothing will read records any more.
  process.stdin.on("end", () => process.exit(0));
}

function listen<T extends net.Server>(server: T, port: number, host: string): Promise<T> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => {
      server.off("error", reject);
      server.on("error", (err) => console.error(`${host}:${port}:`, err.message));
      resolve(server);
    });
  });
}

async function main(): Promise<void> {
  const tls = { cert: readFileSync(config.tls.certFile), key: readFileSync(config.tls.keyFile) };
  const { http: httpAddress, https: httpsAddress, evil } = config.addresses;
  await Promise.all([
    listen(tuneHttpServer(http.createServer(echoHandler("http"))), 80, httpAddress),
    listen(tuneHttpServer(https.createServer(tls, echoHandler("https"))), 443, httpsAddress),
    listen(tuneHttpServer(http.createServer(echoHandler("evil-http"))), 80, evil),
    listen(http2.createServer().on("stream", echoStream("h2c")), 8080, httpAddress),
    listen(http2.createSecureServer(tls).on("stream", echoStream("h2")), 8443, httpsAddress),
    listen(tuneHttpServer(https.createServer(tls, echoHandler("evil-https"))), 443, evil),
    startDnsUdp(),
    startDnsTcp(),
    startTcpEcho(),
    startUdpEcho(),
    config.socks ? startSocks() : Promise.resolve(),
  ]);
  readControl();
  send({ tag: CONTROL_TAG, event: "ready" });
}

main().catch((err: unknown) => {
  console.error("fake internet server failed to start:", err instanceof Error ? err.stack : err);
  process.exit(1);
});
