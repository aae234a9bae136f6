import assert from "node:assert/strict";
import { describe, it } from "node:test";
import vm from "node:vm";
import { prepareCell, stripTypes } from "./js-source.js";

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
