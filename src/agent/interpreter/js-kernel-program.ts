/**
 * The program of the JavaScript kernel child process, run with `node -e`. It is a string so the
 * bundled agent carries it without a second file. It evaluates prepared cells (js-source.ts) in
 * its own global scope with `vm.Script#runInThisContext` — state lives in that scope between
 * cells — and reports over the IPC channel, in order: stdout/stderr writes (process.stdout/stderr
 * are replaced), then the result or error, then `done`. SIGINT breaks a synchronous cell
 * (`breakOnSigint`) or abandons the await of an asynchronous one.
 */
export const JS_KERNEL_PROGRAM = String.raw`
(() => {
  "use strict";
  const vm = require("node:vm");
  const util = require("node:util");
  const path = require("node:path");
  const { createRequire } = require("node:module");
  const send = (message) => { if (process.connected) process.send(message); };

  globalThis.require = createRequire(path.join(process.cwd(), "[cell]"));
  globalThis.module = { exports: {} };
  globalThis.exports = globalThis.module.exports;
  globalThis.__dirname = process.cwd();
  globalThis.__filename = path.join(process.cwd(), "[cell]");

  const capture = (type) => function write(chunk, encoding, callback) {
    if (typeof encoding === "function") callback = encoding;
    const text = typeof chunk === "string" ? chunk : Buffer.from(chunk).toString("utf8");
    if (text) send({ type, text });
    if (typeof callback === "function") process.nextTick(callback);
    return true;
  };
  process.stdout.write = capture("stdout");
  process.stderr.write = capture("stderr");

  let interruptCurrent = null;
  process.on("SIGINT", () => { if (interruptCurrent) interruptCurrent(); });
  process.on("uncaughtException", (error) => send({ type: "stderr", text: "Uncaught " + util.inspect(error) + "\n" }));
  process.on("unhandledRejection", (reason) => send({ type: "stderr", text: "Unhandled promise rejection: " + util.inspect(reason) + "\n" }));
  process.on("disconnect", () => process.exit(0));

  const describeError = (error) => {
    if (error instanceof Error || (error && typeof error === "object" && "stack" in error)) {
      return { name: String(error.name || "Error"), value: String(error.message ?? ""), traceback: String(error.stack || "") };
    }
    return { name: "Error", value: util.inspect(error), traceback: "Uncaught " + util.inspect(error) };
  };

  let cellNumber = 0;
  async function run(message) {
    const saved = {};
    for (const [key, value] of Object.entries(message.envVars)) {
      saved[key] = process.env[key];
      process.env[key] = value;
    }
    try {
      const script = new vm.Script(message.code, { filename: "cell" + ++cellNumber });
      let value = script.runInThisContext({ breakOnSigint: true, displayErrors: false });
      if (message.isAsync) {
        value = await Promise.race([
          value,
          new Promise((_, reject) => {
            interruptCurrent = () => reject(Object.assign(new Error("Script execution was interrupted by SIGINT"), { name: "Interrupted" }));
          }),
        ]);
      }
      if (value !== undefined) send({ type: "result", text: util.inspect(value, { depth: 4, maxArrayLength: 200 }) });
    } catch (error) {
      send({ type: "error", ...describeError(error) });
    } finally {
      interruptCurrent = null;
      for (const [key, value] of Object.entries(saved)) {
        if (value === undefined) delete process.env[key];
        else process.env[key] = value;
      }
      send({ type: "done" });
    }
  }

  process.on("message", (message) => { if (message && message.type === "execute") void run(message); });
  send({ type: "ready" });
})();
`;
