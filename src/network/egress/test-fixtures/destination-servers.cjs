// The "internet" of egress-proxy.test.ts, run inside its destination namespace:
// HTTP (80) and HTTPS (443) answering with the request's headers as JSON, and a TCP echo (7000).
// argv: <listen address> <key file> <cert file>. Prints "ready" once all three listen.
const fs = require("node:fs");
const http = require("node:http");
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
let ready = 0;
const up = () => ++ready === 3 && console.log("ready");
http.createServer(answer).listen(80, address, up);
https.createServer({ key: fs.readFileSync(keyFile), cert: fs.readFileSync(certFile) }, answer).listen(443, address, up);
net.createServer((socket) => { socket.on("error", () => {}); socket.pipe(socket); }).listen(7000, address, up);
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
