import assert from "node:assert/strict";
import { describe, it } from "node:test";
import vm from "node:vm";
import { DYNAMIC_IMPORT_FUNCTION, prepareCell, stripTypes } from "./js-source.js";

/** Strips, then runs the result in a fresh context and returns the completion value. */
function runTs(source: string): unknown {
  return vm.runInNewContext(stripTypes(source));
}

describe("stripTypes", () => {
  it("erases variable, parameter and return annotations", () => {
    assert.equal(runTs("const x: number = 1;\nfunction add(a: number, b?: number): number { return a + (b ?? 1) }\nadd(x)"), 2);
    assert.equal(runTs("const f = (a: string, b: Array<number>): string => a + b.length; f('n', [1, 2])"), "n2");
    assert.equal(runTs("const g = ({ a }: { a: number }): number => a; g({ a: 3 })"), 3);
  });

  it("removes interfaces, type aliases, declare and import type", () => {
    const source = [
      "import type { Foo } from 'foo'",
      "interface Point { x: number; y: number }",
      "export interface Other<T> extends Point { z: T }",
      "type Pair<T> = [T, T] | { a: T }",
      "type Fn = (x: number) => string;",
      "declare const external: string",
      "const p: Point = { x: 1, y: 2 }",
      "p.x + p.y",
    ].join("\n");
    assert.equal(runTs(source), 3);
  });

  it("keeps ternaries and object literals", () => {
    assert.equal(runTs("const big = 5 > 3 ? 'yes' : 'no'; big"), "yes");
    assert.deepEqual(runTs("const o: Record<string, number> = { a: 1, b: 2 > 1 ? 2 : 0 }; JSON.stringify(o)"), '{"a":1,"b":2}');
    assert.equal(runTs("function pick(flag: boolean, a = flag ? 1 : 2): number { return a }\npick(false)"), 2);
    assert.equal(runTs("switch (2) { case 2: 'two'; break; default: 'other' }"), "two");
  });

  it("erases casts, non-null assertions and generic arguments", () => {
    assert.equal(runTs("const v = ('7' as unknown as string).length; v"), 1);
    assert.equal(runTs("const m = new Map<string, number>(); m.set('a', 1); m.get('a')! + 1"), 2);
    assert.equal(runTs("function id<T>(x: T): T { return x }\nid<number>(4)"), 4);
    assert.equal(runTs("const c = { a: 1 } satisfies { a: number }; c.a"), 1);
    assert.equal(runTs("const arr = [1, 2] as const; arr.length"), 2);
    assert.equal(runTs("let n = 3; n != 2 && !false"), true);
  });

  it("handles classes with modifiers, fields and implements", () => {
    const source = [
      "interface Named { name: string }",
      "class Animal<T> implements Named {",
      "  private legs: number = 4",
      "  public name: string;",
      "  readonly tag?: T;",
      "  flag = 1 > 0 ? 'a' : 'b'",
      "  constructor(name: string) { this.name = name }",
      "  describe(prefix: string = '>'): string { return `${prefix} ${this.name} ${this.legs} ${this.flag}` }",
      "}",
      "new Animal<string>('cat').describe()",
    ].join("\n");
    assert.equal(runTs(source), "> cat 4 a");
  });

  it("leaves strings, templates, regexes and comments alone", () => {
    assert.equal(runTs("const s: string = 'a: number' + `${1 as number}: x` + /b: c/.source; // x: y\ns"), "a: number1: xb: c");
  });
});

describe("prepareCell", () => {
  it("turns top-level const/let into var so cells can be re-run", () => {
    const cell = prepareCell("const a = 1\nlet b = 2\nfor (let i = 0; i < 1; i++) {}\na + b", { typescript: false });
    assert.equal(cell.isAsync, false);
    const context = vm.createContext({});
    assert.equal(vm.runInContext(cell.code, context), 3);
    assert.equal(vm.runInContext(prepareCell("const a = 10; a", { typescript: false }).code, context), 10);
  });

  it("wraps top-level await, hoists simple declarations and returns the last expression", async () => {
    const cell = prepareCell("const x = await Promise.resolve(20)\nlet y = 1;\nx + y + 1;", { typescript: false });
    assert.equal(cell.isAsync, true);
    const context = vm.createContext({});
    assert.equal(await vm.runInContext(cell.code, context), 22);
    assert.equal(vm.runInContext("x", context), 20);
  });

  it("returns nothing when the last statement is not an expression", async () => {
    const cell = prepareCell("await null\nif (true) { 5 }", { typescript: false });
    assert.equal(await vm.runInNewContext(cell.code), undefined);
  });

  it("returns a multi-line last expression", async () => {
    const cell = prepareCell("const base = await Promise.resolve(1)\n[base,\n  2].map((n) => n * 2)\n  .join(',')", { typescript: false });
    assert.equal(await vm.runInNewContext(cell.code), "2,4");
  });

  it("strips types before wrapping TypeScript", async () => {
    const cell = prepareCell("const n: number = await Promise.resolve(2)\nn * 21", { typescript: true });
    assert.equal(await vm.runInNewContext(cell.code), 42);
  });
});

describe("prepareCell: ES module syntax", () => {
  const js = (source: string) => prepareCell(source, { typescript: false });
  const ts = (source: string) => prepareCell(source, { typescript: true });

  it("takes out import declarations of every form, in order, keeping line numbers", () => {
    const cell = js(
      [
        "import fs from 'fs'",
        'import { join, basename as base, default as pathDefault, "odd-name" as odd } from "node:path";',
        "import * as os from 'os'",
        "import def, { named } from 'pkg'",
        "import def2, * as all from 'pkg/sub'",
        "import 'side-effect'",
        "import {} from 'nothing-bound'",
        "import {",
        "  a,",
        "  b,",
        "} from './local.mjs'",
        "new Error().stack.split('\\n')[1]",
      ].join("\n"),
    );
    assert.deepEqual(
      cell.imports.map((d) => [d.specifier, d.bindings.map((b) => `${b.imported}:${b.local}`).join(","), d.line]),
      [
        ["fs", "default:fs", 1],
        ["node:path", "join:join,basename:base,default:pathDefault,odd-name:odd", 2],
        ["os", "*:os", 3],
        ["pkg", "default:def,named:named", 4],
        ["pkg/sub", "default:def2,*:all", 5],
        ["side-effect", "", 6],
        ["nothing-bound", "", 7],
        ["./local.mjs", "a:a,b:b", 8],
      ],
    );
    assert.equal(cell.isAsync, false);
    assert.ok(cell.imports.every((d) => d.skipMissing === false));
    assert.doesNotMatch(cell.code, /import|from/);
    // The last line is still line 12.
    assert.match(vm.runInNewContext(cell.code, {}, { filename: "cell" }), /cell:12:/);
  });

  it("reads import attributes and escaped module names", () => {
    assert.deepEqual(js("import data from './d.json' with { type: 'json' }").imports[0]!.attributes, { type: "json" });
    assert.deepEqual(js("import data from './d.json' assert { \"type\": \"json\", other: 'x', };").imports[0]!.attributes, { type: "json", other: "x" });
    assert.equal(js("import x from 'it\\'s'").imports[0]!.specifier, "it's");
    assert.equal(js('import x from "\\u0061b\\"c"').imports[0]!.specifier, 'ab"c');
    assert.equal(js("import x from 'plain'").imports[0]!.attributes, undefined);
  });

  it("keeps the cell's own code, top-level await and its last value", async () => {
    const cell = js("import fs from 'fs'\nconst x = await Promise.resolve(2)\nx * 21");
    assert.equal(cell.isAsync, true);
    assert.equal(cell.imports.length, 1);
    assert.equal(await vm.runInNewContext(cell.code), 42);
    const sync = js("import a from 'a'; const y = 1; y + 1");
    assert.equal(vm.runInNewContext(sync.code), 2);
  });

  it("leaves import in strings, comments, properties, object keys and methods alone", () => {
    const source = [
      "const s = 'import x from \"y\"' // import z from 'z'",
      "/* import q from 'q' */",
      "const o = { import: 1, export: 2 }",
      "class C { import() { return o.import } static export = 3 }",
      "o.import + o?.export + new C().import() + C.export",
    ].join("\n");
    const cell = js(source);
    assert.deepEqual(cell.imports, []);
    assert.equal(vm.runInNewContext(cell.code), 7);
  });

  it("sends dynamic import() to the kernel's loader", async () => {
    const cell = js("const m = await import('pkg')\nconst later = () => import(`./x.mjs`, { with: { type: 'json' } })");
    assert.equal(cell.imports.length, 0);
    assert.match(cell.code, new RegExp(`${DYNAMIC_IMPORT_FUNCTION}\\('pkg'\\)`));
    assert.match(cell.code, new RegExp(`${DYNAMIC_IMPORT_FUNCTION}\\(\`./x.mjs\``));
    const loaded: unknown[] = [];
    const context = vm.createContext({ [DYNAMIC_IMPORT_FUNCTION]: async (...args: unknown[]) => (loaded.push(args), { ok: true }) });
    await vm.runInContext(cell.code, context);
    await vm.runInContext("later()", context);
    assert.equal(JSON.stringify(loaded), JSON.stringify([["pkg"], ["./x.mjs", { with: { type: "json" } }]]));
  });

  it("drops export from declarations, evaluates export default, and turns re-exports into loads", () => {
    const cell = js(
      [
        "export const a = 1",
        "export let b = 2, c = 3",
        "export function f() { return a + b + c }",
        "export async function g() {}",
        "export class K {}",
        "export { a as renamed, b }",
        "export * from './all.mjs'",
        "export * as ns from 'ns-pkg'",
        "export { x as y } from 'x-pkg' with { type: 'json' }",
        "f()",
      ].join("\n"),
    );
    assert.deepEqual(cell.imports.map((d) => [d.specifier, d.bindings.length, d.attributes]), [["./all.mjs", 0, undefined], ["ns-pkg", 0, undefined], ["x-pkg", 0, { type: "json" }]]);
    const context = vm.createContext({});
    assert.equal(vm.runInContext(cell.code, context), 6);
    assert.equal(typeof context.K, "undefined", "a class declaration stays lexical, as in any script");
    assert.equal(vm.runInContext(js("export default { sum: a + b }").code, context).sum, 3);
    assert.equal(typeof vm.runInContext(js("export default function () { return 1 }").code, context), "function");
    assert.equal(typeof vm.runInContext(js("export default class extends Object {}").code, context), "function");
    vm.runInContext(js("export default function named() { return 'n' }").code, context);
    assert.equal(vm.runInContext("named()", context), "n");
    vm.runInContext(js("export default async function asyncNamed() {}").code, context);
    assert.equal(typeof context.asyncNamed, "function");
  });

  it("refuses malformed and nested import and export declarations with a SyntaxError naming the line", () => {
    const bad: [string, RegExp][] = [
      ["import { from 'fs'", /expected ',' or '}', found ''fs'' \(line 1\)/],
      ["import fs from", /expected the module name in quotes, found the end of the cell/],
      ["import fs 'fs'", /expected 'from'/],
      ["import * from 'fs'", /expected 'as' after '\*'/],
      ["import * as from 'fs'", /expected 'from', found ''fs''/],
      ["import { a b } from 'fs'", /expected ',' or '}'/],
      ["import { 'str' } from 'fs'", /expected 'as' after 'str'/],
      ["import { default } from 'fs'", /expected a name to bind/],
      ["import class from 'fs'", /expected a name to bind/],
      ["import a, b from 'fs'", /expected '\{' or '\*' after ','/],
      ["import a from 'fs' with { type: json }", /expected an attribute value in quotes/],
      ["import a from 'fs' extra", /expected ';' or a line break/],
      ["import a from ''", /the module name is empty/],
      ["import a from `fs`", /the module name in quotes/],
      ["import a from 'unterminated\n", /Unterminated string/],
      ["1;\n\nif (true) {\n  import fs from 'fs'\n}", /only be at the top level of a cell.*await import.*\(line 4\)/],
      ["function f() { export const x = 1 }", /export declaration can only be at the top level/],
      ["const x = 1 + import a from 'a'", /must start a statement/],
      ["export * 'x'", /expected 'from'/],
      ["export { a } junk", /expected ';' or a line break/],
    ];
    for (const [source, message] of bad) {
      assert.throws(() => js(source), (error: unknown) => error instanceof SyntaxError && message.test(error.message), source);
    }
  });

  it("typescript: import type goes, inline type specifiers go, renames survive type stripping", async () => {
    const cell = ts(
      [
        "import type { A } from 'types'",
        "import type B from 'types'",
        "import { type C, d as e, type F as G, type } from 'mod'",
        "import { type H } from 'types-only'",
        "import type, { i } from 'named-type'",
        "import * as ns from 'ns'",
        "const n: number = await Promise.resolve(1)",
        "n",
      ].join("\n"),
    );
    assert.deepEqual(
      cell.imports.map((d) => [d.specifier, d.bindings.map((b) => `${b.imported}:${b.local}`).join(","), d.skipMissing]),
      [
        ["mod", "d:e,type:type", true],
        ["named-type", "default:type,i:i", true],
        ["ns", "*:ns", true],
      ],
    );
    assert.equal(await vm.runInNewContext(cell.code), 1);
    const equals = ts("import fs = require('fs')\nimport type T = require('t')\ntypeof fs");
    assert.deepEqual(equals.imports, []);
    assert.equal(vm.runInNewContext(equals.code, { require: () => ({}) }), "object");
    const members = ts("class A {\n  import: number = 1\n  export?: string\n  static import(x: number): number { return x }\n}\nconst a: A = new A()\na.import + A.import(2)");
    assert.deepEqual(members.imports, []);
    assert.equal(vm.runInNewContext(members.code), 3);
    const exported = ts("export interface P { x: number }\nexport type Q = P\nexport const p: P = { x: 1 } as P\nexport { p as q }\np.x");
    assert.equal(vm.runInNewContext(exported.code), 1);
  });
});
