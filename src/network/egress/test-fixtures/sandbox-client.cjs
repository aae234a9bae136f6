// The "sandbox" of egress-proxy.test.ts, run inside its source namespace. argv[2] is a JSON
// request; prints one JSON line with what happened.
//   {mode: "http"|"https", host, port, hostHeader, servername, ca: [pem], headers, path}
//   {mode: "h2", host, port, tls, authority, servername, ca, headers, path, method, body | bodyRepeat, delayEndMs}
//                                               -> {status, body, trailers, alpn} or {error}
//   {mode: "tcp", host, port, text, delayMs}    -> {echo} or {error}
//   {mode: "hold", host, port}                  -> prints {connected: true}, pings every 50 ms, then {closed, error, echoes}
const http = require("node:http");
const http2 = require("node:http2");
const https = require("node:https");
const net = require("node:net");
const request = JSON.parse(process.argv[2]);
let finished = false;
const done = (result) => {
  if (finished) return;
  finished = true;
  // A pipe's writes are asynchronous: exit once the line is out (a long answer would be cut).
  process.stdout.write(JSON.stringify(result) + "\n", () => process.exit(0));
};
setTimeout(() => done({ error: "client timeout" }), request.timeoutMs ?? 8000).unref();
if (request.mode === "http" || request.mode === "https") {
  const lib = request.mode === "https" ? https : http;
  const req = lib.request({
    host: request.host,
    port: request.port,
    path: request.path ?? "/",
    method: request.method ?? "GET",
    servername: request.servername,
    ca: request.ca,
    headers: { host: request.hostHeader, ...request.headers },
    agent: false,
  });
  req.on("response", (res) => {
    let body = "";
    res.on("data", (chunk) => (body += chunk));
    res.on("end", () => done({ status: res.statusCode, body }));
    res.on("aborted", () => done({ status: res.statusCode, body, error: "aborted" }));
    res.on("error", (err) => done({ status: res.statusCode, body, error: err.code ?? err.message }));
  });
  req.on("error", (err) => done({ error: err.code ?? err.message }));
  req.end(request.body);
} else if (request.mode === "h2") {
  // bodyRepeat {text, times}: a body too big for argv, made here.
  if (request.bodyRepeat) request.body = request.bodyRepeat.text.repeat(request.bodyRepeat.times);
  const session = http2.connect(`${request.tls ? "https" : "http"}://${request.host}:${request.port}`, { servername: request.servername, ca: request.ca });
  session.on("error", (err) => done({ error: err.code ?? err.message }));
  const stream = session.request({ ":method": request.method ?? "GET", ":path": request.path ?? "/", ":authority": request.authority, ...request.headers });
  let status;
  let body = "";
  let trailers;
  stream.on("response", (headers) => (status = headers[":status"]));
  stream.on("trailers", (received) => (trailers = received));
  stream.on("data", (chunk) => (body += chunk));
  stream.on("end", () => done({ status, body, trailers, alpn: session.alpnProtocol }));
  stream.on("error", (err) => done({ status, body, error: err.code ?? err.message }));
  // delayEndMs: the request's body stays open that long (a request in flight).
  if (request.delayEndMs) {
    stream.write(request.body ?? "");
    setTimeout(() => stream.end(), request.delayEndMs);
  } else stream.end(request.body);
} else if (request.mode === "tcp") {
  const socket = net.connect(request.port, request.host);
  let echo = "";
  socket.on("connect", () => setTimeout(() => socket.write(request.text), request.delayMs ?? 0));
  socket.on("data", (chunk) => {
    echo += chunk;
    if (echo.length >= request.text.length) done({ echo });
  });
  socket.on("error", (err) => done({ error: err.code ?? err.message }));
  socket.on("close", () => done({ error: "closed", echo }));
} else if (request.mode === "hold") {
  const socket = net.connect(request.port, request.host);
  let echoes = 0;
  let timer;
  socket.on("connect", () => {
    console.log(JSON.stringify({ connected: true }));
    timer = setInterval(() => socket.write("ping"), 50);
  });
  socket.on("data", () => echoes++);
  socket.on("error", (err) => done({ closed: true, error: err.code, echoes }));
  socket.on("close", () => done({ closed: true, echoes }));
}
