// The "internet" of egress-proxy.test.ts, run inside its destination namespace:
// HTTP (80) and HTTPS (443) answering with the request's headers as JSON, the same over HTTP/2
// (cleartext prior knowledge on 8080, TLS with ALPN h2 on 8443; with a trailer, as gRPC sends),
// and a TCP echo (7000). argv: <listen address> <key file> <cert file>. Prints "ready" once all listen.
const fs = require("node:fs");
const http = require("node:http");
const http2 = require("node:http2");
const https = require("node:https");
const net = require("node:net");
const [address, keyFile, certFile] = process.argv.slice(2);
const answer = (req, res) => {
  let body = "";
  req.on("data", (chunk) => (body += chunk));
  req.on("end", () => {
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify({ method: req.method, url: req.url, headers: req.headers, body, tls: Boolean(req.socket.encrypted) }));
  });
};
const answerH2 = (stream, headers) => {
  let body = "";
  stream.on("error", () => {});
  stream.on("data", (chunk) => (body += chunk));
  stream.on("end", () => {
    // A session the proxy cut (a policy change) can end a stream that is already destroyed.
    if (stream.destroyed) return;
    const plain = Object.fromEntries(Object.entries(headers).filter(([name]) => typeof name === "string"));
    stream.respond({ ":status": 200, "content-type": "application/json" }, { waitForTrailers: true });
    stream.on("wantTrailers", () => stream.sendTrailers({ "x-trailer": "done" }));
    stream.end(JSON.stringify({ method: headers[":method"], url: headers[":path"], headers: plain, body, tls: Boolean(stream.session.encrypted), http2: true }));
  });
};
let ready = 0;
const up = () => ++ready === 5 && console.log("ready");
http.createServer(answer).listen(80, address, up);
https.createServer({ key: fs.readFileSync(keyFile), cert: fs.readFileSync(certFile) }, answer).listen(443, address, up);
http2.createServer().on("stream", answerH2).listen(8080, address, up);
http2.createSecureServer({ key: fs.readFileSync(keyFile), cert: fs.readFileSync(certFile) }).on("stream", answerH2).listen(8443, address, up);
net.createServer((socket) => { socket.on("error", () => {}); socket.pipe(socket); }).listen(7000, address, up);
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
