import vm from "node:vm";

/**
 * Source preparation for the JavaScript/TypeScript kernel, on a small tokenizer (no parser: the
 * sandbox has no TypeScript compiler and esbuild is a native binary we do not ship):
 *
 * - TypeScript: erases the type syntax notebook code uses — annotations on variables, parameters,
 *   return types and class fields, `interface`, `type`, `declare`, `import type`, `as` /
 *   `satisfies` casts, non-null `!`, generic parameters and arguments, `implements`, access
 *   modifiers. Not handled: `enum`, `namespace`, constructor parameter properties, decorators,
 *   arrow functions with generic parameters (`<T>(x: T) => x`).
 * - Top-level `const` / `let` become `var`, so a cell can be run again (a notebook habit) without
 *   "Identifier has already been declared".
 * - A cell with top-level `await` is wrapped in an async function; its simple top-level
 *   declarations are hoisted to globals and its last expression statement is returned.
 * - ES module syntax, which a script cannot hold, is taken out (rewriteModuleSyntax): imports
 *   become a list the kernel carries out before the cell, exports are dropped or evaluated.
 */

type TokenKind = "space" | "comment" | "string" | "template" | "regex" | "name" | "number" | "punct";

interface Token {
  kind: TokenKind;
  text: string;
}

const PUNCTUATORS = [
  ">>>=", "...", "===", "!==", "**=", "<<=", ">>=", ">>>", "&&=", "||=", "??=",
  "=>", "==", "!=", "<=", ">=", "&&", "||", "??", "?.", "++", "--", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "**", "<<", ">>",
];

/** Keywords after which a `/` starts a regular expression rather than a division. */
const REGEX_AFTER_KEYWORDS = new Set(["return", "typeof", "instanceof", "in", "of", "new", "delete", "void", "throw", "case", "do", "else", "yield", "await"]);

export function tokenize(code: string): Token[] {
  const tokens: Token[] = [];
  let i = 0;
  let lastSignificant: Token | undefined;
  const push = (kind: TokenKind, text: string) => {
    const token = { kind, text };
    tokens.push(token);
    if (kind !== "space" && kind !== "comment") lastSignificant = token;
  };
  while (i < code.length) {
    const char = code[i]!;
    const start = i;
    if (/\s/.test(char)) {
      while (i < code.length && /\s/.test(code[i]!)) i++;
      push("space", code.slice(start, i));
    } else if (code.startsWith("//", i)) {
      while (i < code.length && code[i] !== "\n") i++;
      push("comment", code.slice(start, i));
    } else if (code.startsWith("/*", i)) {
      const end = code.indexOf("*/", i + 2);
      i = end < 0 ? code.length : end + 2;
      push("comment", code.slice(start, i));
    } else if (char === '"' || char === "'") {
      i++;
      while (i < code.length && code[i] !== char && code[i] !== "\n") i += code[i] === "\\" ? 2 : 1;
      i++;
      push("string", code.slice(start, Math.min(i, code.length)));
    } else if (char === "`") {
      i = skipTemplate(code, i);
      push("template", code.slice(start, i));
    } else if (/[A-Za-z_$\u0080-\uffff]/.test(char)) {
      while (i < code.length && /[\w$\u0080-\uffff]/.test(code[i]!)) i++;
      push("name", code.slice(start, i));
    } else if (/[0-9]/.test(char) || (char === "." && /[0-9]/.test(code[i + 1] ?? ""))) {
      while (i < code.length && /[\w.]/.test(code[i]!)) i++;
      push("number", code.slice(start, i));
    } else if (char === "/" && regexAllowedAfter(lastSignificant)) {
      i = skipRegex(code, i);
      push("regex", code.slice(start, i));
    } else {
      const punct = PUNCTUATORS.find((p) => code.startsWith(p, i)) ?? char;
      i += punct.length;
      push("punct", punct);
    }
  }
  return tokens;
}

function regexAllowedAfter(previous: Token | undefined): boolean {
  if (!previous) return true;
  if (previous.kind === "name") return REGEX_AFTER_KEYWORDS.has(previous.text);
  if (previous.kind === "punct") return ![")", "]", "}", "++", "--"].includes(previous.text);
  return false;
}

function skipRegex(code: string, i: number): number {
  let inClass = false;
  i++;
  while (i < code.length && code[i] !== "\n") {
    const char = code[i]!;
    if (char === "\\") i++;
    else if (char === "[") inClass = true;
    else if (char === "]") inClass = false;
    else if (char === "/" && !inClass) {
      i++;
      while (i < code.length && /\w/.test(code[i]!)) i++;
      return i;
    }
    i++;
  }
  return i;
}

/** Skips a template literal, `${…}` substitutions included (they may hold strings and templates). */
function skipTemplate(code: string, i: number): number {
  i++;
  while (i < code.length) {
    const char = code[i]!;
    if (char === "\\") i += 2;
    else if (char === "`") return i + 1;
    else if (char === "$" && code[i + 1] === "{") {
      i += 2;
      let depth = 1;
      while (i < code.length && depth > 0) {
        const inner = code[i]!;
        if (inner === "{") depth++;
        else if (inner === "}") depth--;
        else if (inner === "`") {
          i = skipTemplate(code, i);
          continue;
        } else if (inner === '"' || inner === "'") {
          i++;
          while (i < code.length && code[i] !== inner) i += code[i] === "\\" ? 2 : 1;
        }
        i++;
      }
    } else i++;
  }
  return i;
}

/** Rewrites the code inside each `${…}` of a template literal token. */
function mapTemplateSubstitutions(template: string, rewrite: (code: string) => string): string {
  let out = "";
  let i = 0;
  while (i < template.length) {
    const char = template[i]!;
    if (char === "\\") {
      out += template.slice(i, i + 2);
      i += 2;
    } else if (char === "$" && template[i + 1] === "{") {
      const inner = findSubstitutionEnd(template, i + 2);
      out += "${" + rewrite(template.slice(i + 2, inner)) + "}";
      i = inner + 1;
    } else {
      out += char;
      i++;
    }
  }
  return out;
}

function findSubstitutionEnd(template: string, from: number): number {
  let depth = 1;
  let i = from;
  while (i < template.length) {
    const char = template[i]!;
    if (char === "{") depth++;
    else if (char === "}" && --depth === 0) return i;
    else if (char === "`") {
      i = skipTemplate(template, i);
      continue;
    } else if (char === '"' || char === "'") {
      i++;
      while (i < template.length && template[i] !== char) i += template[i] === "\\" ? 2 : 1;
    }
    i++;
  }
  return template.length;
}

/** A token list with removal that keeps line breaks (so automatic semicolon insertion still sees them). */
class Editor {
  constructor(readonly tokens: Token[]) {}

  at(index: number): Token | undefined {
    return this.tokens[index];
  }

  /** Index of the next significant token at or after `index`. */
  next(index: number): number {
    while (index < this.tokens.length && (this.tokens[index]!.kind === "space" || this.tokens[index]!.kind === "comment")) index++;
    return index;
  }

  prev(index: number): number {
    index--;
    while (index >= 0 && (this.tokens[index]!.kind === "space" || this.tokens[index]!.kind === "comment")) index--;
    return index;
  }

  is(index: number, text: string): boolean {
    const token = this.tokens[index];
    return token !== undefined && token.kind !== "string" && token.kind !== "template" && token.text === text;
  }

  isName(index: number): boolean {
    return this.tokens[index]?.kind === "name";
  }

  /** Removes tokens [from, to). */
  remove(from: number, to: number): void {
    for (let k = from; k < to; k++) {
      const token = this.tokens[k]!;
      token.text = token.text.includes("\n") ? token.text.replace(/[^\n]/g, "") : token.kind === "space" ? " " : "";
      if (token.kind !== "space") token.kind = "space";
    }
  }

  /** Index just past the bracket matching the one at `index` (`(`, `[`, `{` or `<` of type arguments). */
  matching(index: number): number {
    const open = this.tokens[index]!.text;
    const close = ({ "(": ")", "[": "]", "{": "}", "<": ">" } as Record<string, string>)[open]!;
    let depth = 0;
    for (let k = index; k < this.tokens.length; k++) {
      const token = this.tokens[k]!;
      if (token.kind !== "punct") continue;
      if (token.text === open) depth++;
      else if (token.text === close) depth--;
      else if (open === "<" && token.text === ">>") depth -= 2;
      else if (open === "<" && token.text === ">>>") depth -= 3;
      if (depth <= 0) return k + 1;
    }
    return this.tokens.length;
  }

  text(): string {
    return this.tokens.map((token) => token.text).join("");
  }
}

const TYPE_PREFIXES = new Set(["keyof", "typeof", "readonly", "unique", "infer", "asserts"]);

/** Returns the index just past the type starting at the significant token `index`. */
function skipType(editor: Editor, index: number): number {
  let k = editor.next(index);
  if (editor.is(k, "|") || editor.is(k, "&")) k = editor.next(k + 1);
  for (;;) {
    while (editor.isName(k) && TYPE_PREFIXES.has(editor.at(k)!.text) && !isTypeEnd(editor, editor.next(k + 1))) k = editor.next(k + 1);
    k = skipPrimaryType(editor, k);
    // Postfix: T[] and T[K].
    let after = editor.next(k);
    while (editor.is(after, "[")) {
      k = editor.matching(after);
      after = editor.next(k);
    }
    if (editor.isName(after) && editor.at(after)!.text === "is") {
      k = skipType(editor, after + 1);
      after = editor.next(k);
    }
    if (editor.isName(after) && editor.at(after)!.text === "extends" && conditionalTypeFollows(editor, after)) {
      k = skipType(editor, after + 1);
      const question = editor.next(k);
      k = skipType(editor, question + 1);
      const colon = editor.next(k);
      return skipType(editor, colon + 1);
    }
    if (editor.is(after, "|") || editor.is(after, "&")) {
      k = editor.next(after + 1);
      continue;
    }
    return k;
  }
}

function isTypeEnd(editor: Editor, index: number): boolean {
  const token = editor.at(index);
  return !token || (token.kind === "punct" && [",", ")", "]", "}", ";", "=", ">", "|", "&"].includes(token.text));
}

function conditionalTypeFollows(editor: Editor, extendsIndex: number): boolean {
  const end = skipType(editor, extendsIndex + 1);
  return editor.is(editor.next(end), "?");
}

function skipPrimaryType(editor: Editor, k: number): number {
  const token = editor.at(k);
  if (!token) return k;
  if (editor.is(k, "(")) {
    const end = editor.matching(k);
    const arrow = editor.next(end);
    return editor.is(arrow, "=>") ? skipType(editor, arrow + 1) : end;
  }
  if (editor.is(k, "<")) {
    // Generic function type: <T>(x: T) => T
    const end = editor.matching(k);
    return skipPrimaryType(editor, editor.next(end));
  }
  if (editor.is(k, "{") || editor.is(k, "[")) return editor.matching(k);
  if (editor.isName(k) && token.text === "new") return skipPrimaryType(editor, editor.next(k + 1));
  if (token.kind === "string" || token.kind === "number" || token.kind === "template") return k + 1;
  if (editor.is(k, "-")) return editor.next(k + 1) + 1;
  if (editor.isName(k)) {
    let end = k + 1;
    for (;;) {
      const dot = editor.next(end);
      if (editor.is(dot, ".") && editor.isName(editor.next(dot + 1))) end = editor.next(dot + 1) + 1;
      else break;
    }
    const angle = editor.next(end);
    if (editor.is(angle, "<")) end = editor.matching(angle);
    return end;
  }
  return k;
}

/** `<…>` at `index` holds only type syntax (so it is type arguments, not a comparison). */
function looksLikeTypeArguments(editor: Editor, index: number): boolean {
  const end = editor.matching(index);
  if (end > editor.tokens.length) return false;
  for (let k = index + 1; k < end - 1; k++) {
    const token = editor.at(k)!;
    if (token.kind === "punct" && !["<", ">", ",", ".", "[", "]", "|", "&", "{", "}", ":", ";", "?", "(", ")", "=>", ">>", "-"].includes(token.text)) return false;
    if (token.kind === "regex") return false;
  }
  return editor.at(end - 1)?.text.startsWith(">") ?? false;
}

const MODIFIERS = new Set(["public", "private", "protected", "readonly", "override", "abstract", "declare"]);
const NOT_CALLS = new Set(["if", "for", "while", "switch", "with", "return", "typeof", "await", "yield", "void", "delete", "in", "of", "new", "case", "do", "else", "throw"]);

type FrameKind = "paren" | "params" | "block" | "class" | "object" | "bracket";

interface Frame {
  kind: FrameKind;
  /** After a `=` in a parameter list or class body: a default value or initializer, where `:` is a ternary's. */
  inInitializer: boolean;
}

/** Erases TypeScript type syntax, leaving JavaScript. */
export function stripTypes(code: string): string {
  const editor = new Editor(tokenize(code));
  const stack: Frame[] = [];
  /** Index of a `)` closing a parameter list (a return type may follow). */
  const paramsCloses = new Set<number>();
  /** Between `const`/`let`/`var` and the `=` of its declarator, at that bracket depth. */
  let declaringDepth = -1;
  const top = () => stack[stack.length - 1]?.kind;
  const push = (kind: FrameKind) => stack.push({ kind, inInitializer: false });

  for (let k = editor.next(0); k < editor.tokens.length; k = editor.next(k + 1)) {
    const token = editor.at(k)!;
    const before = editor.prev(k);
    const atStatementStart =
      before < 0 || editor.is(before, ";") || editor.is(before, "}") || editor.is(before, "{") || hasNewlineBetween(editor, before, k) || (editor.isName(before) && editor.at(before)!.text === "export");
    if (atStatementStart && top() === "class") stack[stack.length - 1]!.inInitializer = false;

    if (token.kind === "name") {
      const nextIndex = editor.next(k + 1);
      const word = token.text;
      if ((word === "interface" || (word === "declare" && top() !== "class")) && atStatementStart && editor.isName(nextIndex)) {
        const end = word === "interface" ? editor.matching(findForward(editor, k, "{")) : statementEnd(editor, k);
        removeWithExport(editor, before, k, end);
        k = end - 1;
        continue;
      }
      if (word === "type" && atStatementStart && editor.isName(nextIndex) && (editor.is(editor.next(nextIndex + 1), "=") || editor.is(editor.next(nextIndex + 1), "<"))) {
        let eq = editor.next(nextIndex + 1);
        if (editor.is(eq, "<")) eq = editor.next(editor.matching(eq));
        const end = skipType(editor, eq + 1);
        const semicolon = editor.next(end);
        const stop = editor.is(semicolon, ";") ? semicolon + 1 : end;
        removeWithExport(editor, before, k, stop);
        k = stop - 1;
        continue;
      }
      if ((word === "import" || word === "export") && editor.isName(nextIndex) && editor.at(nextIndex)!.text === "type" && !isAnyOf(editor, editor.next(nextIndex + 1), ["=", ",", "from"])) {
        const end = statementEnd(editor, k);
        editor.remove(k, end);
        k = end - 1;
        continue;
      }
      // Import and export lists hold no types: `{ a as b }` there renames, it is no cast.
      if (atStatementStart && !editor.is(before, ".") && ((word === "import" && !isAnyOf(editor, nextIndex, NOT_DECLARATION_AFTER)) || (word === "export" && isAnyOf(editor, nextIndex, ["{", "*"])))) {
        k = moduleClauseEnd(editor, k) - 1;
        continue;
      }
      if ((word === "as" || word === "satisfies") && before >= 0 && !hasNewlineBetween(editor, before, k) && endsExpression(editor, before)) {
        const end = skipType(editor, k + 1);
        editor.remove(k, end);
        k = end - 1;
        continue;
      }
      if (MODIFIERS.has(word) && (top() === "class" || top() === "params") && (editor.isName(nextIndex) || editor.is(nextIndex, "[") || editor.is(nextIndex, "#"))) {
        editor.remove(k, nextIndex);
        continue;
      }
      if (word === "implements" && top() !== "object") {
        const brace = findForward(editor, k, "{");
        editor.remove(k, brace);
        k = brace - 1;
        continue;
      }
      if (word === "const" || word === "let" || word === "var") declaringDepth = stack.length;
      // Generic parameters on declarations: function f<T>(…), class A<T>, method<T>(…).
      if (editor.is(nextIndex, "<") && looksLikeTypeArguments(editor, nextIndex)) {
        const end = editor.matching(nextIndex);
        const follower = editor.next(end);
        const prevWord = before >= 0 ? editor.at(before)!.text : "";
        if (editor.is(follower, "(") || prevWord === "class" || prevWord === "function" || prevWord === "extends" || editor.is(follower, "{")) {
          if (!NOT_CALLS.has(word)) {
            editor.remove(nextIndex, end);
            k = end - 1;
            continue;
          }
        }
      }
      continue;
    }

    if (token.kind === "template" && token.text.includes("${")) {
      token.text = mapTemplateSubstitutions(token.text, stripTypes);
      continue;
    }
    if (token.kind !== "punct") continue;
    switch (token.text) {
      case "(": {
        push(isParameterList(editor, k) ? "params" : "paren");
        if (top() === "params") paramsCloses.add(editor.matching(k) - 1);
        break;
      }
      case "[":
        push("bracket");
        break;
      case "{":
        push(classHeadBefore(editor, k) ? "class" : isBlockBrace(editor, before) ? "block" : "object");
        break;
      case "=":
        if (stack.length === declaringDepth) declaringDepth = -1;
        if (top() === "params" || top() === "class") stack[stack.length - 1]!.inInitializer = true;
        break;
      case ",":
        if (top() === "params") stack[stack.length - 1]!.inInitializer = false;
        break;
      case ")":
      case "]":
      case "}":
        stack.pop();
        if (token.text === ")" && paramsCloses.has(k)) {
          const colon = editor.next(k + 1);
          if (editor.is(colon, ":")) {
            const end = skipType(editor, colon + 1);
            editor.remove(colon, end);
            k = end - 1;
          }
        }
        break;
      case ";":
        declaringDepth = -1;
        if (top() === "class") stack[stack.length - 1]!.inInitializer = false;
        break;
      case "?":
      case ":": {
        const frame = top();
        const initializer = stack[stack.length - 1]?.inInitializer ?? false;
        const inAnnotationSpot = ((frame === "params" || frame === "class") && !initializer) || stack.length === declaringDepth;
        if (!inAnnotationSpot) break;
        let colon = k;
        if (token.text === "?") {
          colon = editor.next(k + 1);
          if (!editor.is(colon, ":")) break;
        }
        if (editor.is(before, ")") && frame !== "params") break;
        const prevToken = editor.at(before);
        if (!prevToken || !(prevToken.kind === "name" || editor.is(before, "]") || editor.is(before, "}") || editor.is(before, "?"))) break;
        const end = skipType(editor, colon + 1);
        editor.remove(k, end);
        k = end - 1;
        break;
      }
      case "!": {
        // Non-null assertion: `value!.x`, `f()!`, never a negation (those follow operators).
        const next = editor.at(k + 1);
        if (before === k - 1 && endsExpression(editor, before) && !(next?.kind === "punct" && next.text === "=")) editor.remove(k, k + 1);
        break;
      }
    }
  }
  return editor.text();
}

function isAnyOf(editor: Editor, index: number, texts: string[]): boolean {
  return texts.some((text) => editor.is(index, text));
}

/** End of `import … from "m" with {…}` / `export {…} from "m"`, or the `=` of `import x = require(…)`. */
function moduleClauseEnd(editor: Editor, from: number): number {
  for (let k = editor.next(from + 1); k < editor.tokens.length; k = editor.next(k + 1)) {
    const token = editor.at(k)!;
    if (editor.is(k, "{")) {
      const close = editor.matching(k);
      if (!isAnyOf(editor, editor.next(close), ["from", ","])) return close;
      k = close - 1;
    } else if (editor.is(k, ";") || editor.is(k, "=")) return k;
    else if (token.kind === "string") {
      const attributes = editor.next(k + 1);
      const brace = editor.next(attributes + 1);
      if (editor.isName(attributes) && ["with", "assert"].includes(editor.at(attributes)!.text) && editor.is(brace, "{")) return editor.matching(brace);
      return k + 1;
    }
  }
  return editor.tokens.length;
}

function hasNewlineBetween(editor: Editor, from: number, to: number): boolean {
  for (let k = from + 1; k < to; k++) if (editor.at(k)!.text.includes("\n")) return true;
  return false;
}

function endsExpression(editor: Editor, index: number): boolean {
  const token = editor.at(index);
  if (!token) return false;
  if (token.kind === "name") return !NOT_CALLS.has(token.text) || token.text === "this";
  return token.kind !== "punct" || [")", "]", "}"].includes(token.text);
}

function findForward(editor: Editor, from: number, text: string): number {
  for (let k = from; k < editor.tokens.length; k++) if (editor.is(k, text)) return k;
  return editor.tokens.length;
}

/** End of a statement starting at `from`: its `;`, or the end of its line at depth 0. */
function statementEnd(editor: Editor, from: number): number {
  let depth = 0;
  for (let k = from; k < editor.tokens.length; k++) {
    const token = editor.at(k)!;
    if (token.kind === "punct") {
      if (["(", "[", "{"].includes(token.text)) depth++;
      else if ([")", "]", "}"].includes(token.text)) depth--;
      else if (token.text === ";" && depth === 0) return k + 1;
    } else if (token.kind === "space" && token.text.includes("\n") && depth === 0) return k;
  }
  return editor.tokens.length;
}

function removeWithExport(editor: Editor, before: number, from: number, to: number): void {
  const start = before >= 0 && editor.isName(before) && editor.at(before)!.text === "export" ? before : from;
  editor.remove(start, to);
}

function classHeadBefore(editor: Editor, braceIndex: number): boolean {
  // Walk back over `class Name<…> extends Base<…>` to see whether this brace opens a class body.
  let depth = 0;
  for (let k = editor.prev(braceIndex); k >= 0; k = editor.prev(k)) {
    const token = editor.at(k)!;
    if (token.kind === "punct") {
      if ([")", "]", "}", ">"].includes(token.text)) depth++;
      else if (["(", "[", "{", "<"].includes(token.text)) {
        if (depth === 0) return false;
        depth--;
      } else if (depth === 0 && [";", "=>", "="].includes(token.text)) return false;
    } else if (depth === 0 && token.kind === "name" && token.text === "class") return true;
    else if (depth === 0 && token.kind === "name" && ["function", "return", "if", "for", "while"].includes(token.text)) return false;
  }
  return false;
}

function isBlockBrace(editor: Editor, before: number): boolean {
  if (before < 0) return true;
  const token = editor.at(before)!;
  if (token.kind === "punct") return [")", ";", "{", "}", "=>"].includes(token.text);
  return token.kind === "name" && ["else", "try", "finally", "do"].includes(token.text);
}

/** A `(` opens a parameter list: `function f(`, `f(…) {` (method), `(…) =>`, `(…): T =>`, `catch (`. */
function isParameterList(editor: Editor, openIndex: number): boolean {
  const before = editor.prev(openIndex);
  const prevToken = before >= 0 ? editor.at(before)! : undefined;
  if (prevToken?.kind === "name" && (prevToken.text === "function" || prevToken.text === "catch")) return true;
  const prevPrev = before >= 0 ? editor.prev(before) : -1;
  if (prevToken?.kind === "name" && prevPrev >= 0 && editor.isName(prevPrev) && editor.at(prevPrev)!.text === "function") return true;
  if (editor.is(before, ">") || editor.is(before, "*")) {
    // function f<T>( has been stripped already; `function*` generators.
    return true;
  }
  const close = editor.matching(openIndex);
  const after = editor.next(close);
  if (editor.is(after, "=>")) return true;
  if (editor.is(after, ":")) {
    const end = skipType(editor, after + 1);
    if (editor.is(editor.next(end), "=>") || editor.is(editor.next(end), "{")) return prevToken?.kind === "name" ? !NOT_CALLS.has(prevToken.text) : true;
  }
  if (editor.is(after, "{") && prevToken?.kind === "name" && !NOT_CALLS.has(prevToken.text)) return true;
  return false;
}

const STATEMENT_KEYWORDS = new Set([
  "var", "let", "const", "if", "for", "while", "do", "switch", "try", "function", "class", "return", "throw", "break", "continue", "import", "export", "async",
]);

export interface PreparedCell {
  code: string;
  /** The code is an async function call whose promise resolves to the cell's value. */
  isAsync: boolean;
  /** The cell's import declarations, in order: the kernel loads them and binds their names before running `code`. */
  imports: ImportDeclaration[];
}

/** Turns a notebook cell into a script for `vm.Script.runInThisContext` (see the module comment). */
export function prepareCell(source: string, options: { typescript: boolean }): PreparedCell {
  const code = options.typescript ? stripTypes(source) : source;
  const editor = new Editor(tokenize(code));
  const depthAt = topLevelMask(editor);
  const imports = rewriteModuleSyntax(editor, depthAt, options.typescript);
  // Top-level const/let → var: cells can be re-run.
  const hoisted: string[] = [];
  let sync = true;
  try {
    new vm.Script(editor.text());
  } catch (error) {
    sync = !(error instanceof SyntaxError && /await/.test(error.message) && editor.tokens.some((t) => t.kind === "name" && t.text === "await"));
  }
  for (let k = editor.next(0); k < editor.tokens.length; k = editor.next(k + 1)) {
    const token = editor.at(k)!;
    if (!depthAt[k] && token.kind === "name" && (token.text === "const" || token.text === "let" || token.text === "var")) {
      const before = editor.prev(k);
      const startsStatement = before < 0 || editor.is(before, ";") || editor.is(before, "}") || hasNewlineBetween(editor, before, k);
      const name = editor.next(k + 1);
      if (!startsStatement) continue;
      if (sync && (editor.isName(name) || editor.is(name, "{") || editor.is(name, "["))) token.text = "var";
      else if (!sync && editor.isName(name) && isSimpleDeclaration(editor, name)) {
        hoisted.push(editor.at(name)!.text);
        editor.remove(k, name);
      }
    }
  }
  if (sync) return { code: editor.text(), isAsync: false, imports };

  const last = lastStatementStart(editor, depthAt);
  if (last !== undefined) {
    const first = editor.at(last)!;
    if (!(first.kind === "name" && STATEMENT_KEYWORDS.has(first.text)) && !editor.is(last, "{") && !editor.is(last, ";")) {
      let end = editor.tokens.length;
      const lastSignificant = editor.prev(end);
      if (editor.is(lastSignificant, ";")) end = lastSignificant;
      first.text = "return (" + first.text;
      editor.at(editor.prev(end))!.text += "\n)";
    }
  }
  const declarations = hoisted.length > 0 ? `var ${[...new Set(hoisted)].join(", ")}; ` : "";
  return { code: `${declarations}(async () => {\n${editor.text()}\n})()`, isAsync: true, imports };
}

/** `name = …` or `name;` with one declarator (the keyword can go and the name becomes a global). */
function isSimpleDeclaration(editor: Editor, nameIndex: number): boolean {
  const after = editor.next(nameIndex + 1);
  if (!editor.is(after, "=") && !editor.is(after, ";") && after < editor.tokens.length && !hasNewlineBetween(editor, nameIndex, after)) return false;
  // A comma at depth 0 before the statement's end means several declarators.
  const end = statementEnd(editor, nameIndex);
  let depth = 0;
  for (let k = nameIndex; k < end; k++) {
    const token = editor.at(k)!;
    if (token.kind !== "punct") continue;
    if (["(", "[", "{"].includes(token.text)) depth++;
    else if ([")", "]", "}"].includes(token.text)) depth--;
    else if (token.text === "," && depth === 0) return false;
  }
  return true;
}

/** For each token index: true when it sits inside brackets (not at the top level). */
function topLevelMask(editor: Editor): boolean[] {
  const mask: boolean[] = [];
  let depth = 0;
  editor.tokens.forEach((token, index) => {
    if (token.kind === "punct" && [")", "]", "}"].includes(token.text)) depth--;
    mask[index] = depth > 0;
    if (token.kind === "punct" && ["(", "[", "{"].includes(token.text)) depth++;
  });
  return mask;
}

const CONTINUES_EXPRESSION = new Set([".", "?.", ",", "(", "[", "{", "=", "=>", "+", "-", "*", "/", "%", "**", "&&", "||", "??", "?", ":", "<", ">", "<=", ">=", "==", "===", "!=", "!==", "&", "|", "^", "+=", "-=", "*=", "/="]);

/** Index of the first token of the last top-level statement, by `;`, block ends and line breaks (ASI). */
function lastStatementStart(editor: Editor, nested: boolean[]): number | undefined {
  let start: number | undefined;
  let boundary = true;
  for (let k = editor.next(0); k < editor.tokens.length; k = editor.next(k + 1)) {
    if (nested[k]) continue;
    const token = editor.at(k)!;
    if (boundary && !editor.is(k, ";")) {
      start = k;
      boundary = false;
    }
    if (editor.is(k, ";")) {
      boundary = true;
      continue;
    }
    const next = editor.next(k + 1);
    if (next < editor.tokens.length && hasNewlineBetween(editor, k, next)) {
      const endsHere = !(token.kind === "punct" && CONTINUES_EXPRESSION.has(token.text));
      const nextToken = editor.at(next)!;
      const nextContinues = nextToken.kind === "punct" && [".", "?.", ")", "]", "}", ",", "+", "*", "/", "=", "=>", "&&", "||", "??", "?", ":"].includes(nextToken.text);
      if (endsHere && !nextContinues) boundary = true;
    }
  }
  return start;
}

/**
 * A top-level `import` for the kernel to carry out before the cell runs (js-kernel-program.ts):
 * load `specifier` as `import()` would, then bind each local name to an export. ES modules load
 * their imports before their body too, so the cell sees the same order.
 */
export interface ImportDeclaration {
  specifier: string;
  /** Import attributes, as in `with { type: "json" }`. */
  attributes?: Record<string, string>;
  /** Empty for `import "m"` and `export … from "m"`, which only load the module. */
  bindings: ImportBinding[];
  /**
   * TypeScript: a named import the module does not export is skipped, not an error. It may be a
   * type (tsc drops imports used only as types, which needs a type checker to tell).
   */
  skipMissing: boolean;
  /** 1-based line in the cell. */
  line: number;
}

export interface ImportBinding {
  /** An export's name, `default`, or `*` for the module namespace. */
  imported: string;
  local: string;
}

/** After `import` or `export`, these make it no declaration: `import(…)`, `import.meta`, a property or class member named so. */
const NOT_DECLARATION_AFTER = [".", "(", ":", "=", ";", ",", ")", "}", "?"];

/** Dynamic `import(…)` in a cell calls this global instead (the kernel's loader), so it resolves like a static import. */
export const DYNAMIC_IMPORT_FUNCTION = "__cubicleImport";

const RESERVED_WORDS = new Set([
  "await", "break", "case", "catch", "class", "const", "continue", "debugger", "default", "delete", "do", "else", "enum", "export", "extends", "false",
  "finally", "for", "function", "if", "implements", "import", "in", "instanceof", "interface", "let", "new", "null", "package", "private", "protected",
  "public", "return", "static", "super", "switch", "this", "throw", "true", "try", "typeof", "var", "void", "while", "with", "yield", "arguments", "eval",
]);

/**
 * Takes the ES module syntax out of a cell, which runs as a script:
 * - `import … from "m"` (and `import "m"`) at the top level is removed and returned, to be
 *   carried out by the kernel; a TypeScript `import x = require("m")` becomes `var x = …`;
 * - dynamic `import(…)` calls the kernel's loader (DYNAMIC_IMPORT_FUNCTION);
 * - `export` has no meaning in a cell, which nothing imports: before a declaration it is dropped
 *   (the declaration stays), `export default <expression>` evaluates the expression,
 *   `export { … }` is dropped, and `export … from "m"` loads `m` as `import "m"` does.
 * An import or export declaration that is malformed, or not at the top level, is a SyntaxError.
 */
function rewriteModuleSyntax(editor: Editor, nested: boolean[], typescript: boolean): ImportDeclaration[] {
  const imports: ImportDeclaration[] = [];
  // The line of token `counted`, counted as the loop goes (removals keep line breaks).
  let line = 1;
  let counted = 0;
  // The significant token before k as written, and whether it ended a statement taken out: looking
  // back with editor.prev would cross every removed statement (quadratic with thousands of imports).
  let previous = -1;
  let previousEndedStatement = false;
  for (let k = editor.next(0); k < editor.tokens.length; k = editor.next(k + 1)) {
    const before = previous;
    const afterStatement = previousEndedStatement;
    previous = k;
    previousEndedStatement = false;
    const token = editor.at(k)!;
    if (token.kind !== "name" || (token.text !== "import" && token.text !== "export")) continue;
    const next = editor.next(k + 1);
    if (editor.is(before, ".") || editor.is(before, "?.")) continue;
    if (token.text === "import" && editor.is(next, "(")) {
      // `import(…) {` is a method named import, not a call.
      if (!editor.is(editor.next(editor.matching(next)), "{")) token.text = DYNAMIC_IMPORT_FUNCTION;
      continue;
    }
    // import.meta is left for the script compiler to refuse; the rest are properties and class members.
    if (isAnyOf(editor, next, NOT_DECLARATION_AFTER)) continue;
    const keyword = token.text;
    // A class field named so, its type erased: `import\n`.
    if (nested[k] && hasNewlineBetween(editor, k, next)) continue;
    if (nested[k]) {
      throw moduleSyntaxError(editor, k, keyword === "import" ? "An import declaration can only be at the top level of a cell; inside a block or function, use `await import(…)`" : "An export declaration can only be at the top level of a cell");
    }
    if (!(before < 0 || afterStatement || editor.is(before, ";") || editor.is(before, "}") || hasNewlineBetween(editor, before, k))) throw moduleSyntaxError(editor, k, `Unexpected '${keyword}': an ${keyword} declaration must start a statement`);
    if (keyword === "import" && typescript && editor.isName(next) && editor.is(editor.next(next + 1), "=")) {
      token.text = "var"; // import x = require("m") / import A = B.C
      continue;
    }
    for (; counted < k; counted++) line += newlines(editor.at(counted)!.text);
    const { declaration, end, wholeStatement } = keyword === "import" ? readImport(editor, k, line, typescript) : rewriteExport(editor, k, line);
    if (declaration) imports.push(declaration);
    if (end !== undefined) {
      editor.remove(k, end);
      k = end - 1;
      previous = k;
      previousEndedStatement = wholeStatement ?? false;
    }
  }
  return imports;
}

/** What to remove (up to `end`), and whether that is the whole statement. */
type ModuleStatement = { declaration?: ImportDeclaration; end?: number; wholeStatement?: boolean };

function readImport(editor: Editor, start: number, line: number, typescript: boolean): ModuleStatement {
  const fail = (at: number, expected: string) => moduleSyntaxError(editor, at, `Invalid import declaration: expected ${expected}, found ${describeToken(editor, at)}`);
  const bindingName = (at: number): string => {
    const token = editor.at(at);
    if (token?.kind !== "name" || RESERVED_WORDS.has(token.text)) throw fail(at, "a name to bind");
    return token.text;
  };
  const bindings: ImportBinding[] = [];
  let named = 0;
  let typeOnly = 0;
  let i = editor.next(start + 1);
  if (editor.at(i)?.kind !== "string") {
    if (editor.isName(i)) {
      bindings.push({ imported: "default", local: bindingName(i) });
      i = editor.next(i + 1);
      if (editor.is(i, ",")) {
        i = editor.next(i + 1);
        if (!isAnyOf(editor, i, ["{", "*"])) throw fail(i, "'{' or '*' after ','");
      }
    }
    if (editor.is(i, "*")) {
      const as = editor.next(i + 1);
      if (!isWord(editor, as, "as")) throw fail(as, "'as' after '*'");
      const name = editor.next(as + 1);
      bindings.push({ imported: "*", local: bindingName(name) });
      i = editor.next(name + 1);
    } else if (editor.is(i, "{")) {
      i = editor.next(i + 1);
      while (!editor.is(i, "}")) {
        let spec = i;
        const isType = typescript && isWord(editor, i, "type") && isTypeModifier(editor, i);
        if (isType) spec = editor.next(i + 1);
        const token = editor.at(spec);
        const imported = token?.kind === "string" ? stringValue(editor, spec) : token?.kind === "name" ? token.text : undefined;
        if (imported === undefined) throw fail(spec, "a name to import");
        let after = editor.next(spec + 1);
        let local: string;
        if (isWord(editor, after, "as")) {
          const alias = editor.next(after + 1);
          local = bindingName(alias);
          after = editor.next(alias + 1);
        } else {
          if (token!.kind === "string") throw fail(after, `'as' after ${token!.text}`);
          local = bindingName(spec);
        }
        named++;
        if (isType) typeOnly++;
        else bindings.push({ imported, local });
        if (editor.is(after, ",")) after = editor.next(after + 1);
        else if (!editor.is(after, "}")) throw fail(after, "',' or '}'");
        i = after;
      }
      i = editor.next(i + 1);
    } else if (bindings.length === 0) {
      throw fail(i, "a name, '{', '*' or the module name in quotes");
    }
    if (!isWord(editor, i, "from")) throw fail(i, "'from'");
    i = editor.next(i + 1);
  }
  const { specifier, attributes, end } = readModuleName(editor, i, "import");
  // tsc drops an import whose names are all types, module and all.
  if (typescript && named > 0 && typeOnly === named && bindings.length === 0) return { end, wholeStatement: true };
  return { declaration: { specifier, ...(attributes ? { attributes } : {}), bindings, skipMissing: typescript, line }, end, wholeStatement: true };
}

/** In a TypeScript import list, `type` at `index` marks a type-only import (`type A`, `type A as B`), not an import named "type". */
function isTypeModifier(editor: Editor, index: number): boolean {
  const next = editor.next(index + 1);
  if (isAnyOf(editor, next, [",", "}"])) return false;
  if (isWord(editor, next, "as")) {
    // `type as x` imports "type" as x; `type as as x` imports the type "as".
    const alias = editor.next(next + 1);
    return !(editor.isName(alias) && isAnyOf(editor, editor.next(alias + 1), [",", "}"]));
  }
  return editor.isName(next) || editor.at(next)?.kind === "string";
}

function rewriteExport(editor: Editor, start: number, line: number): ModuleStatement {
  const fail = (at: number, expected: string) => moduleSyntaxError(editor, at, `Invalid export declaration: expected ${expected}, found ${describeToken(editor, at)}`);
  const next = editor.next(start + 1);
  if (editor.is(next, "{") || editor.is(next, "*")) {
    let i = editor.is(next, "{") ? editor.next(editor.matching(next)) : editor.next(next + 1);
    if (editor.is(next, "*") && isWord(editor, i, "as")) i = editor.next(editor.next(i + 1) + 1);
    if (isWord(editor, i, "from")) {
      const { specifier, attributes, end } = readModuleName(editor, editor.next(i + 1), "export");
      return { declaration: { specifier, ...(attributes ? { attributes } : {}), bindings: [], skipMissing: false, line }, end, wholeStatement: true };
    }
    if (editor.is(next, "*")) throw fail(i, "'from'");
    return { end: statementTerminatorEnd(editor, editor.matching(next), fail), wholeStatement: true };
  }
  if (isWord(editor, next, "default")) {
    const value = editor.next(next + 1);
    let declaration = value;
    if (isWord(editor, value, "async") && isWord(editor, editor.next(value + 1), "function") && !hasNewlineBetween(editor, value, editor.next(value + 1))) declaration = editor.next(value + 1);
    const isFunction = isWord(editor, declaration, "function");
    if (isFunction || isWord(editor, declaration, "class")) {
      let name = editor.next(declaration + 1);
      if (isFunction && editor.is(name, "*")) name = editor.next(name + 1);
      // A named function or class stays a declaration.
      if (editor.isName(name) && !isWord(editor, name, "extends")) return { end: value };
    }
    // Anything else is an expression: `0, <expression>` evaluates it (the cell's value when last).
    Object.assign(editor.at(start)!, { kind: "number", text: "0" });
    Object.assign(editor.at(next)!, { kind: "punct", text: "," });
    return {};
  }
  // export const / let / var / function / class …: the declaration stays.
  return { end: next };
}

/** `"m"` with optional import attributes and the end of the statement. */
function readModuleName(editor: Editor, index: number, keyword: string): { specifier: string; attributes?: Record<string, string>; end: number } {
  const fail = (at: number, expected: string) => moduleSyntaxError(editor, at, `Invalid ${keyword} declaration: expected ${expected}, found ${describeToken(editor, at)}`);
  const specifier = stringValue(editor, index);
  if (specifier === undefined) throw fail(index, "the module name in quotes");
  if (specifier === "") throw moduleSyntaxError(editor, index, `Invalid ${keyword} declaration: the module name is empty`);
  let end = index + 1;
  let attributes: Record<string, string> | undefined;
  const word = editor.next(end);
  if ((isWord(editor, word, "with") || isWord(editor, word, "assert")) && editor.is(editor.next(word + 1), "{")) {
    attributes = {};
    let a = editor.next(editor.next(word + 1) + 1);
    while (!editor.is(a, "}")) {
      const key = editor.isName(a) ? editor.at(a)!.text : stringValue(editor, a);
      if (key === undefined) throw fail(a, "an attribute name");
      const colon = editor.next(a + 1);
      if (!editor.is(colon, ":")) throw fail(colon, "':'");
      const valueIndex = editor.next(colon + 1);
      const value = stringValue(editor, valueIndex);
      if (value === undefined) throw fail(valueIndex, "an attribute value in quotes");
      attributes[key] = value;
      a = editor.next(valueIndex + 1);
      if (editor.is(a, ",")) a = editor.next(a + 1);
      else if (!editor.is(a, "}")) throw fail(a, "',' or '}'");
    }
    end = a + 1;
  }
  return { specifier, attributes, end: statementTerminatorEnd(editor, end, fail) };
}

/** Past a `;` after a statement ending before `end`, or `end` when a line break or the cell's end follows. */
function statementTerminatorEnd(editor: Editor, end: number, fail: (at: number, expected: string) => SyntaxError): number {
  const after = editor.next(end);
  if (editor.is(after, ";")) return after + 1;
  if (after < editor.tokens.length && !hasNewlineBetween(editor, end - 1, after)) throw fail(after, "';' or a line break");
  return end;
}

function isWord(editor: Editor, index: number, word: string): boolean {
  return editor.isName(index) && editor.at(index)!.text === word;
}

/** The value of the string literal token at `index`; undefined when there is none. */
function stringValue(editor: Editor, index: number): string | undefined {
  const token = editor.at(index);
  if (token?.kind !== "string") return undefined;
  const quote = token.text[0]!;
  if (token.text.length < 2 || !token.text.endsWith(quote)) throw moduleSyntaxError(editor, index, "Unterminated string literal");
  const body = token.text.slice(1, -1);
  if (!body.includes("\\")) return body;
  try {
    return JSON.parse(`"${body.replace(/\\(.)|"/gs, (match, escaped: string | undefined) => (escaped === undefined ? '\\"' : escaped === "'" ? "'" : match))}"`) as string;
  } catch {
    throw moduleSyntaxError(editor, index, `Unsupported escape in ${token.text}`);
  }
}

function describeToken(editor: Editor, index: number): string {
  const token = editor.at(index);
  return token ? `'${token.text}'` : "the end of the cell";
}

function newlines(text: string): number {
  let count = 0;
  for (let i = text.indexOf("\n"); i >= 0; i = text.indexOf("\n", i + 1)) count++;
  return count;
}

function lineOf(editor: Editor, index: number): number {
  let line = 1;
  for (let k = 0; k < index && k < editor.tokens.length; k++) line += newlines(editor.at(k)!.text);
  return line;
}

function moduleSyntaxError(editor: Editor, index: number, message: string): SyntaxError {
  return new SyntaxError(`${message} (line ${lineOf(editor, index)})`);
}
