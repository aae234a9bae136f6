import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { hasQemu } from "./qemu.js";
import { QmpClient } from "./qmp.js";

async function waitFor(file: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(file)) {
    if (Date.now() > deadline) throw new Error(`${file} did not appear`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

test("drives a real QEMU: status, stop, cont, an unknown command, quit", async (t) => {
  if (!hasQemu()) return t.skip("qemu-system-x86_64 is not installed (scripts/setup-host.sh installs qemu-system-x86)");
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-qmp-"));
  const socket = path.join(dir, "qmp.sock");
  // A machine without a guest: QMP only, no CPU to emulate.
  const qemu = spawn("qemu-system-x86_64", ["-M", "none", "-nodefaults", "-no-user-config", "-nographic", "-qmp", `unix:${socket},server=on,wait=off`], { stdio: "ignore" });
  const exited = new Promise<number | null>((resolve) => qemu.on("exit", (code) => resolve(code)));
  try {
    await waitFor(socket);
    const qmp = await QmpClient.connect(socket);
    assert.equal((await qmp.execute<{ status: string }>("query-status")).status, "running");
    await qmp.execute("stop");
    assert.equal((await qmp.execute<{ status: string }>("query-status")).status, "paused");
    await qmp.execute("cont");
    assert.equal((await qmp.execute<{ status: string }>("query-status")).status, "running");
    await assert.rejects(qmp.execute("no-such-command"), /CommandNotFound/);
    // Answers go to the right caller when several commands are in flight.
    const [a, b] = await Promise.all([qmp.execute<{ status: string }>("query-status"), qmp.execute<{ qemu: { major: number } }>("query-version")]);
    assert.equal(a.status, "running");
    assert.equal(b.qemu.major >= 7, true);
    await qmp.execute("quit");
    await qmp.closed;
    assert.equal(await exited, 0);
    await assert.rejects(qmp.execute("query-status"), /closed/);
  } finally {
    if (qemu.exitCode === null) qemu.kill("SIGKILL");
    await rm(dir, { recursive: true, force: true });
  }
});

test("a server that is not QMP, or sends garbage and endless lines, fails the client without crashing it", async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-qmp-"));
  const servers: net.Server[] = [];
  const serve = (file: string, onConnection: (socket: net.Socket) => void) =>
    new Promise<void>((resolve) => {
      const server = net.createServer((socket) => {
        // The client hangs up on a bad server mid-write; that is the point, not an error here.
        socket.on("error", () => {});
        onConnection(socket);
      });
      servers.push(server);
      server.listen(file, () => resolve());
    });
  try {
    const notQmp = path.join(dir, "a.sock");
    await serve(notQmp, (socket) => socket.end("HTTP/1.1 400 Bad Request\r\n\r\n"));
    await assert.rejects(QmpClient.connect(notQmp, 2000), /bad greeting/);

    const silent = path.join(dir, "b.sock");
    await serve(silent, () => {});
    await assert.rejects(QmpClient.connect(silent, 300), /no greeting/);

    const garbage = path.join(dir, "c.sock");
    await serve(garbage, (socket) => {
      socket.write('{"QMP": {"version": {}}}\n');
      socket.on("data", (data) => {
        const request = JSON.parse(data.toString().split("\n")[0]!) as { execute: string; id: string };
        if (request.execute === "qmp_capabilities") socket.write(`not json\n{"return": {}, "id": "wrong"}\n{"event": "X"}\n{"return": {}, "id": "${request.id}"}\n`);
        else socket.write("y".repeat(2 << 20));
      });
    });
    const client = await QmpClient.connect(garbage, 2000);
    await assert.rejects(client.execute("query-status", undefined, 5000), /closed the connection/);

    await assert.rejects(QmpClient.connect(path.join(dir, "missing.sock"), 1000), /ENOENT/);
  } finally {
    for (const server of servers) server.close();
    await rm(dir, { recursive: true, force: true });
  }
});
