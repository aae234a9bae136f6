import assert from "node:assert/strict";
import { createRequire } from "node:module";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, describe, it } from "node:test";
import { JupyterKernel, type JupyterKernelSpec } from "./jupyter-kernel.js";
import type { ExecutionOutput } from "./types.js";

/**
 * A small kernel speaking the real Jupyter wire protocol over ZeroMQ (signed with the connection
 * file's key), doing what IRkernel and ipykernel do in the cases the agent must handle: an
 * interrupted cell answered with `status: "abort"` and nothing on iopub (IRkernel), a reply
 * that arrives after `idle`, and a silent execution whose error is only in its reply.
 */
const FAKE_KERNEL = String.raw`
const fs = require("node:fs");
const crypto = require("node:crypto");
const zmq = require(process.env.ZMQ_PATH);
const info = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
const at = (port) => "ipc://" + info.ip + "-" + port;
const shell = new zmq.Router(); const iopub = new zmq.Publisher(); const control = new zmq.Router();
let interrupted = null;
setInterval(() => {}, 60_000); // stays alive while a cell waits (no socket read is pending then)
process.on("SIGINT", () => { if (interrupted) interrupted(); });
const sign = (parts) => { const h = crypto.createHmac("sha256", info.key); for (const p of parts) h.update(p); return h.digest("hex"); };
let n = 0;
function frames(type, parent, content, ids = []) {
  const header = { msg_id: "k" + ++n, msg_type: type, session: "fake", username: "k", date: new Date().toISOString(), version: "5.3" };
  const parts = [header, parent, {}, content].map((x) => Buffer.from(JSON.stringify(x)));
  return [...ids, Buffer.from("<IDS|MSG>"), Buffer.from(sign(parts)), ...parts];
}
const pub = (type, parent, content) => iopub.send(frames(type, parent, content));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
(async () => {
  await shell.bind(at(info.shell_port)); await iopub.bind(at(info.iopub_port)); await control.bind(at(info.control_port));
  for await (const msg of shell) {
    const d = msg.findIndex((f) => f.toString() === "<IDS|MSG>");
    const ids = msg.slice(0, d);
    const header = JSON.parse(msg[d + 2].toString()); const content = JSON.parse(msg[d + 5].toString());
    const reply = (c) => shell.send(frames(header.msg_type.replace("_request", "_reply"), header, c, ids));
    await pub("status", header, { execution_state: "busy" });
    if (header.msg_type === "kernel_info_request") { await reply({ status: "ok" }); await pub("status", header, { execution_state: "idle" }); continue; }
    const code = content.code;
    if (!content.silent) await pub("execute_input", header, { code, execution_count: ++n });
    if (code === "wait for an interrupt") {
      await new Promise((resolve) => (interrupted = resolve)); interrupted = null;
      await reply({ status: "abort" }); await pub("status", header, { execution_state: "idle" });
    } else if (code === "reply late") {
      await pub("stream", header, { name: "stdout", text: "before idle\n" });
      await pub("status", header, { execution_state: "idle" });
      await sleep(200);
      await reply({ status: "aborted" });
    } else if (code.startsWith("set env")) {
      await reply({ status: "error", ename: "BadName", evalue: "no such name", traceback: [] }); await pub("status", header, { execution_state: "idle" });
    } else {
      await pub("execute_result", header, { data: { "text/plain": "value of " + code }, execution_count: n });
      await reply({ status: "ok" }); await pub("status", header, { execution_state: "idle" });
    }
  }
})();
`;

const runtimeDir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-jupyter-kernel-test-"));
after(() => fs.rmSync(runtimeDir, { recursive: true, force: true }));

const spec: JupyterKernelSpec = {
  language: "fake",
  kernelName: "fake",
  command: (connectionFile) => ({ file: process.execPath, args: ["-e", FAKE_KERNEL, connectionFile] }),
  setEnvCode: (envVars) => `set env ${JSON.stringify(envVars)}`,
  restoreEnvCode: "restore env",
};

async function run(kernel: JupyterKernel, code: string, envVars: Record<string, string> = {}, signal = new AbortController().signal) {
  const outputs: ExecutionOutput[] = [];
  await kernel.execute({ code, envVars }, (output) => outputs.push(output), signal);
  return outputs;
}

describe("JupyterKernel against a kernel on the real wire protocol", () => {
  it("ends a cell on idle and reply both, reports IRkernel's silent abort and a failed env setup", async () => {
    const env = { PATH: "/usr/bin:/bin", ZMQ_PATH: createRequire(import.meta.url).resolve("zeromq") };
    const kernel = new JupyterKernel(spec, { launch: { cwd: "/tmp", env }, runtimeDir });
    await kernel.start();
    try {
      const value = await run(kernel, "1+1");
      assert.deepEqual(value.map((o) => o.type), ["number_of_executions", "result"]);
      assert.equal((value[1] as { text?: string }).text, "value of 1+1");

      // The reply comes 200 ms after idle: the cell is not over before it, and its status counts.
      const late = await run(kernel, "reply late");
      assert.deepEqual(late.map((o) => (o.type === "error" ? o.name : o.type)), ["number_of_executions", "stdout", "ExecutionAborted"]);

      const controller = new AbortController();
      setTimeout(() => controller.abort(), 200);
      const interrupted = await run(kernel, "wait for an interrupt", {}, controller.signal);
      const error = interrupted.find((o) => o.type === "error");
      assert.equal(error?.type === "error" && error.name, "Interrupted", JSON.stringify(error));

      const badEnv = await run(kernel, "never runs", { "A=B": "1" });
      assert.deepEqual(badEnv.map((o) => o.type), ["error"]);
      assert.match((badEnv[0] as { value: string }).value, /env vars could not be set: BadName: no such name/);
    } finally {
      await kernel.shutdown();
    }
    assert.equal(kernel.exited, true);
  });
});
