/**
 * The client the network benchmark runs at both ends it compares: inside a sandbox (the base
 * template's python3) and in the floor namespace (the host's /usr/bin/python3). One process
 * loops in-process, so no sample pays a process start, and prints one JSON line.
 *
 * Its argument is a JSON `NetworkClientRequest`; its output a `NetworkClientReport`.
 */

/** What one client run measures against one fake host. */
export interface NetworkClientRequest {
  /** Host header and TLS server name. */
  host: string;
  /** Connect to this address; null: resolve `host` before every connection (getaddrinfo). */
  address: string | null;
  port: number;
  tls: boolean;
  /** A CA file added to the system's roots (the fake internet's CA for direct HTTPS). */
  caFile?: string;
  /** Connections measured (connect, and first byte of a small response), after `warmup`. */
  samples: number;
  warmup: number;
  /** Bulk downloads (`GET /bytes/<downloadBytes>`), one connection each. */
  downloads: number;
  downloadBytes: number;
  timeoutSec: number;
}

/** One connection: [resolve ms, TCP connect ms, TLS handshake ms, first response byte ms, whole response ms], all from the connect's start except resolve. */
export type ConnectionSample = [number, number, number, number, number];

export interface NetworkClientReport {
  samples: ConnectionSample[];
  /** Per download: bytes received and seconds from the request to the last byte. */
  downloads: { bytes: number; seconds: number; ttfbMs: number }[];
  errors: string[];
  /** The fake server's JSON echo of the last small request: who connected, with which headers. */
  lastEcho: { remoteAddress?: string; headers?: Record<string, unknown> } | null;
}

export const NETWORK_CLIENT_PY = String.raw`
import json, socket, ssl, sys, time

req = json.loads(sys.argv[1])
host, port, use_tls = req["host"], int(req["port"]), bool(req["tls"])
timeout = float(req.get("timeoutSec", 20))
ctx = None
if use_tls:
    ctx = ssl.create_default_context()
    if req.get("caFile"):
        ctx.load_verify_locations(cafile=req["caFile"])
errors = []

def note(err):
    if len(errors) < 20:
        errors.append(type(err).__name__ + ": " + str(err)[:200])

def open_conn():
    t0 = time.perf_counter()
    addr = req["address"]
    if addr is None:
        addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    t1 = time.perf_counter()
    s = socket.create_connection((addr, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t2 = time.perf_counter()
    if ctx is not None:
        s = ctx.wrap_socket(s, server_hostname=host)
    t3 = time.perf_counter()
    return s, t0, t1, t2, t3

def request(path):
    return ("GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\nUser-Agent: cubicle-bench\r\n\r\n").encode()

def read_head(s, first):
    data = first
    while b"\r\n\r\n" not in data:
        more = s.recv(65536)
        if not more:
            raise IOError("connection closed in the response head")
        data += more
        if len(data) > 65536:
            raise IOError("response head too large")
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        raise IOError("status " + lines[0][:80])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return length, rest

def small():
    s, t0, t1, t2, t3 = open_conn()
    try:
        s.sendall(request("/"))
        first = s.recv(65536)
        t4 = time.perf_counter()
        if not first:
            raise IOError("no response")
        length, body = read_head(s, first)
        while length is None or len(body) < length:
            more = s.recv(65536)
            if not more:
                break
            body += more
            if len(body) > 1048576:
                raise IOError("response too large")
        t5 = time.perf_counter()
    finally:
        s.close()
    ms = lambda a, b: round((b - a) * 1000, 3)
    return [ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t1, t4), ms(t1, t5)], body

samples, last = [], None
for i in range(int(req["warmup"]) + int(req["samples"])):
    try:
        sample, body = small()
        if i >= int(req["warmup"]):
            samples.append(sample)
        last = body
    except Exception as err:
        note(err)

downloads = []
buf = bytearray(1048576)
view = memoryview(buf)
for _ in range(int(req["downloads"])):
    try:
        s, t0, t1, t2, t3 = open_conn()
        try:
            s.sendall(request("/bytes/" + str(int(req["downloadBytes"]))))
            t_req = time.perf_counter()
            first = s.recv(65536)
            t_first = time.perf_counter()
            length, rest = read_head(s, first)
            got = len(rest)
            while got < length:
                n = s.recv_into(view)
                if n == 0:
                    break
                got += n
            t_end = time.perf_counter()
        finally:
            s.close()
        if got != length:
            raise IOError("short download: %d of %d bytes" % (got, length))
        downloads.append({"bytes": got, "seconds": round(t_end - t_req, 6), "ttfbMs": round((t_first - t_req) * 1000, 3)})
    except Exception as err:
        note(err)

echo = None
if last:
    try:
        parsed = json.loads(last.decode())
        echo = {"remoteAddress": parsed.get("remoteAddress"), "headers": parsed.get("headers")}
    except Exception as err:
        note(err)
print(json.dumps({"samples": samples, "downloads": downloads, "errors": errors, "lastEcho": echo}))
`;
