/**
 * The contract between the fake internet harness (fake-internet.ts, in the test process on the
 * host) and its server (fake-internet-server.ts, one child process inside the namespace): the
 * server's configuration, what it records, and the JSON lines of the control channel.
 */

/** Where each service listens inside the namespace. */
export interface FakeServiceAddresses {
  http: string;
  https: string;
  evil: string;
  dns: string;
  echo: string;
  socks: string;
}

export interface FakeDnsConfig {
  /** Lowercase name (no trailing dot) → IPv4 addresses answered for A queries. */
  records: Record<string, string[]>;
  /** TTL of every answer, in seconds. */
  ttlSeconds: number;
  /** Name whose A answer alternates between the two addresses, starting with the first. */
  rebindName: string;
  rebindAddresses: [string, string];
  rebindTtlSeconds: number;
}

export interface FakeSocksConfig {
  port: number;
  username?: string;
  password?: string;
  /** Absolute path of the module exporting startSocks5Server (test/support/socks5-server.ts). */
  modulePath: string;
}

export interface FakeInternetServerConfig {
  addresses: FakeServiceAddresses;
  tls: { certFile: string; keyFile: string };
  dns: FakeDnsConfig;
  /** Absent: no SOCKS5 service. */
  socks?: FakeSocksConfig;
}

/** `h2c`: cleartext HTTP/2 (prior knowledge) on the HTTP host's port 8080; `h2`: HTTP/2 over TLS on the HTTPS host's port 8443. */
export type FakeHttpServerName = "http" | "https" | "evil-http" | "evil-https" | "h2c" | "h2";

/** One HTTP request as a service saw it. */
export interface RecordedRequest {
  /** Milliseconds since the epoch. */
  time: number;
  server: FakeHttpServerName;
  method: string;
  /** The request target as sent (path and query). */
  path: string;
  host: string | undefined;
  /** Node's view: lowercase names, repeated headers joined (set-cookie stays a list). */
  headers: Record<string, string | string[]>;
  /** Every header line in order, names as sent. */
  rawHeaders: [string, string][];
  remoteAddress: string;
  remotePort: number;
  /** The TLS server name the client sent (HTTPS only). */
  tlsServername: string | undefined;
  /** Request body size in bytes (bodies are counted, not kept). */
  bodyBytes: number;
}

/** One DNS query as the DNS service saw it. */
export interface RecordedDnsQuery {
  time: number;
  transport: "udp" | "tcp";
  remoteAddress: string;
  remotePort: number;
  /** Lowercase question name without the trailing dot; "" when the query could not be read. */
  name: string;
  /** Question type (1 = A, 28 = AAAA, ...); 0 when the query could not be read. */
  type: number;
  /** Response code sent (0 NOERROR, 1 FORMERR, 3 NXDOMAIN, 4 NOTIMP); undefined: no answer sent. */
  rcode: number | undefined;
  /** Addresses answered. */
  answers: string[];
}

/** One CONNECT the SOCKS5 service dialed. */
export interface RecordedSocksConnection {
  address: string;
  port: number;
}

export interface FakeInternetRecords {
  requests: RecordedRequest[];
  dnsQueries: RecordedDnsQuery[];
  socksConnections: RecordedSocksConnection[];
}

export type ControlOperation = "records" | "clearRecords" | "stopSocks" | "startSocks";

/** Harness → server, one JSON object per line on the server's stdin. */
export interface ControlRequest {
  id: number;
  op: ControlOperation;
}

/** Marks the server's protocol lines on stdout; anything else there is ignored. */
export const CONTROL_TAG = "cbi-fake-internet";

/** Server → harness, one JSON object per line on the server's stdout. */
export type ControlMessage =
  | { tag: typeof CONTROL_TAG; event: "ready" }
  | { tag: typeof CONTROL_TAG; id: number; ok: true; result: unknown }
  | { tag: typeof CONTROL_TAG; id: number; ok: false; error: string };

/** The most of each kind of record the server keeps (the oldest go first). */
export const MAX_RECORDS = 5_000;
/** The longest control line either side accepts. */
export const MAX_CONTROL_LINE_BYTES = 64 * 1024 * 1024;
