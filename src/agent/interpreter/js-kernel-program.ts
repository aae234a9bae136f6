import { DYNAMIC_IMPORT_FUNCTION } from "./js-source.js";

/**
 * The program of the JavaScript kernel child process, run with `node -e`. It is a string so the
 * bundled agent carries it without a second file. It evaluates prepared cells (js-source.ts) in
 * its own global scope with `vm.Script#runInThisContext` — state lives in that scope between
 * cells — and reports over the IPC channel, in order: stdout/stderr writes (process.stdout/stderr
 * are replaced), then the result or error, then `done`. SIGINT breaks a synchronous cell
 * (`breakOnSigint`) or abandons the await of an asynchronous one (or of its imports).
 *
 * Imports: a cell's import declarations are loaded before it runs, in order, and their names
 * become globals like the cell's own declarations. Modules load with Node's ES module loader as
 * if imported from a file in the kernel's working directory (`vm.constants.
 * USE_MAIN_CONTEXT_DEFAULT_LOADER`: no loader thread, no flag), so built-ins, CommonJS and
 * ESM-only packages in ./node_modules (and up the tree) work. What that does not find is looked
 * for where `require` looks (NODE_PATH, ~/.node_modules, …): a package with an `exports` map is
 * imported from inside itself (a package may import itself by name, which applies that map with
 * the `import` condition), anything else from the file `require.resolve` names (so `./util`
 * without an extension and packages that export only to `require` load too). Deno's `npm:`
 * specifiers name installed packages (the version is not checked).
 */
export const JS_KERNEL_PROGRAM = String.raw`
(() => {
  "use strict";
  const vm = require("node:vm");
  const fs = require("node:fs");
  const util = require("node:util");
  const path = require("node:path");
  const { pathToFileURL, fileURLToPath } = require("node:url");
  const { createRequire } = require("node:module");
  const send = (message) => { if (process.connected) process.send(message); };

  const cellFile = path.join(process.cwd(), "[cell]");
  const cellRequire = createRequire(cellFile);
  globalThis.require = cellRequire;
  globalThis.module = { exports: {} };
  globalThis.exports = globalThis.module.exports;
  globalThis.__dirname = process.cwd();
  globalThis.__filename = cellFile;

  const capture = (type) => function write(chunk, encoding, callback) {
    if (typeof encoding === "function") callback = encoding;
    const text = typeof chunk === "string" ? chunk : Buffer.from(chunk).toString("utf8");
    if (text) send({ type, text });
    if (typeof callback === "function") process.nextTick(callback);
    return true;
  };
  process.stdout.write = capture("stdout");
  process.stderr.write = capture("stderr");

  // Node 20 warns once that USE_MAIN_CONTEXT_DEFAULT_LOADER is experimental; that is ours, not the cell's.
  const emitWarning = process.emitWarning;
  process.emitWarning = function (warning, ...rest) {
    const text = typeof warning === "string" ? warning : warning && warning.message;
    if (typeof text === "string" && text.includes("USE_MAIN_CONTEXT_DEFAULT_LOADER")) return;
    return emitWarning.call(this, warning, ...rest);
  };
  const mainLoader = vm.constants.USE_MAIN_CONTEXT_DEFAULT_LOADER;

  /** import(specifier, options) as if written in the file "referrer". */
  const importers = new Map();
  const importFrom = (referrer, specifier, options) => {
    let importer = importers.get(referrer);
    if (!importer) {
      importer = new vm.Script("(specifier, options) => import(specifier, options)", { filename: referrer, importModuleDynamically: mainLoader }).runInThisContext();
      importers.set(referrer, importer);
    }
    return importer(specifier, options);
  };

  const isBare = (specifier) => !/^(\.{0,2}\/|\.{1,2}$|[A-Za-z][A-Za-z0-9+.-]*:)/.test(specifier);
  /** What the loader could not find (or not find an entry of), and require might. */
  const notFoundCodes = new Set(["ERR_MODULE_NOT_FOUND", "ERR_UNSUPPORTED_DIR_IMPORT", "ERR_PACKAGE_PATH_NOT_EXPORTED"]);
  const notFound = (error) => Boolean(error) && notFoundCodes.has(error.code);

  /** The first folder require would take the package of "specifier" from, when the package can import itself by name. */
  const selfImportingPackage = (specifier) => {
    const parts = specifier.split("/");
    const name = specifier.startsWith("@") ? parts.slice(0, 2).join("/") : parts[0];
    for (const dir of cellRequire.resolve.paths(name) || []) {
      const packageDir = path.join(dir, name);
      if (!fs.existsSync(packageDir)) continue;
      try {
        const manifest = JSON.parse(fs.readFileSync(path.join(packageDir, "package.json"), "utf8"));
        return manifest && manifest.exports !== undefined && manifest.name === name ? packageDir : undefined;
      } catch {
        return undefined;
      }
    }
    return undefined;
  };

  /** Deno's "npm:name@version/path" (E2B's own examples use it) names the installed package: "name/path". */
  const fromNpmSpecifier = (specifier) => {
    const match = /^npm:\/?((?:@[^/@]+\/)?[^/@]+)(?:@[^/]*)?(\/.*)?$/.exec(specifier);
    return match ? match[1] + (match[2] || "") : specifier;
  };

  const importModule = async (specifier, options) => {
    specifier = fromNpmSpecifier(String(specifier));
    let firstError;
    try {
      return await importFrom(cellFile, specifier, options);
    } catch (error) {
      if (!notFound(error)) throw error;
      firstError = error;
    }
    const packageDir = isBare(specifier) ? selfImportingPackage(specifier) : undefined;
    if (packageDir) {
      try {
        return await importFrom(path.join(packageDir, "[import]"), specifier, options);
      } catch (error) {
        if (!notFound(error)) throw error;
      }
    }
    let file;
    try {
      file = cellRequire.resolve(specifier.startsWith("file:") ? fileURLToPath(specifier) : specifier);
    } catch {
      throw firstError;
    }
    return importFrom(cellFile, pathToFileURL(file).href, options);
  };
  Object.defineProperty(globalThis, ${JSON.stringify(DYNAMIC_IMPORT_FUNCTION)}, { value: importModule, enumerable: false, writable: false, configurable: false });

  const isObjectLike = (value) => value !== null && (typeof value === "object" || typeof value === "function");

  /** Loads a cell's import declarations in order, then binds their names as globals: all of them, or none when one fails. */
  const bindImports = async (imports) => {
    const namespaces = [];
    for (const declaration of imports) namespaces.push(await importModule(declaration.specifier, declaration.attributes ? { with: declaration.attributes } : undefined));
    const values = new Map();
    imports.forEach((declaration, index) => {
      const namespace = namespaces[index];
      for (const { imported, local } of declaration.bindings) {
        if (imported === "*") values.set(local, namespace);
        else if (imported in namespace) values.set(local, namespace[imported]);
        // A CommonJS export Node's static analysis missed: its default export (module.exports) has it.
        else if (isObjectLike(namespace.default) && imported in namespace.default) values.set(local, namespace.default[imported]);
        else if (!declaration.skipMissing) throw new SyntaxError("The requested module '" + declaration.specifier + "' does not provide an export named '" + imported + "' (line " + declaration.line + ")");
      }
    });
    for (const [local, value] of values) globalThis[local] = value;
  };

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
    const interrupted = new Promise((_, reject) => {
      interruptCurrent = () => reject(Object.assign(new Error("Script execution was interrupted by SIGINT"), { name: "Interrupted" }));
    });
    interrupted.catch(() => {});
    try {
      // Compiled first: a syntax error loads no module.
      const script = new vm.Script(message.code, { filename: "cell" + ++cellNumber, importModuleDynamically: mainLoader });
      if (message.imports.length > 0) await Promise.race([bindImports(message.imports), interrupted]);
      let value = script.runInThisContext({ breakOnSigint: true, displayErrors: false });
      if (message.isAsync) value = await Promise.race([value, interrupted]);
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
