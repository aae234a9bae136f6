// A stand-in for the Cubicle agent while developing the runtime: answers GET /health with 204 on
// the envd port. Runs inside sandboxes from the kit, as CommonJS.
const http = require("node:http");
const fs = require("node:fs");

// State that lives only in this process's memory: a checkpoint/restore must bring it back.
let counter = 0;

const server = http.createServer((req, res) => {
  if (req.method === "GET" && req.url === "/health") {
    res.writeHead(204).end();
  } else if (req.method === "GET" && req.url === "/counter") {
    counter += 1;
    res.writeHead(200, { "content-type": "text/plain" }).end(String(counter));
  } else if (req.method === "GET" && req.url.startsWith("/run?")) {
    // Development only: runs an argv inside the sandbox, as the agent (its cgroup, caps, seccomp).
    const argv = JSON.parse(new URL(req.url, "http://x").searchParams.get("argv"));
    const result = require("node:child_process").spawnSync(argv[0], argv.slice(1), { encoding: "utf8", timeout: 10000 });
    res.writeHead(200, { "content-type": "application/json" }).end(
      JSON.stringify({ exitCode: result.status ?? -1, stdout: result.stdout ?? "", stderr: (result.stderr ?? "") + (result.error ? String(result.error) : "") }),
    );
  } else if (req.method === "GET" && req.url === "/info") {
    const read = (file) => {
      try {
        return fs.readFileSync(file, "utf8");
      } catch (err) {
        return `error: ${err.code}`;
      }
    };
    res.writeHead(200, { "content-type": "application/json" }).end(
      JSON.stringify({
        uid: process.getuid(),
        pid: process.pid,
        env: { CUBICLE_AGENT: process.env.CUBICLE_AGENT, PATH: process.env.PATH },
        status: read("/proc/self/status"),
        mounts: read("/proc/self/mounts"),
        uidMap: read("/proc/self/uid_map"),
        hostname: require("node:os").hostname(),
        sys: fs.existsSync("/sys") ? fs.readdirSync("/sys") : null,
        kit: fs.readdirSync("/.cubicle"),
        fds: fs.readdirSync("/proc/self/fd").map((fd) => {
          try {
            return `${fd} -> ${fs.readlinkSync(`/proc/self/fd/${fd}`)}`;
          } catch {
            return fd;
          }
        }),
      }),
    );
  } else {
    res.writeHead(404).end();
  }
});
server.listen(49983, "0.0.0.0");
