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
      token.text = token.text.includes("\n") ? "\n" : token.kind === "space" ? " " : "";
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
      if ((word === "import" || word === "export") && editor.isName(nextIndex) && editor.at(nextIndex)!.text === "type" && !editor.is(editor.next(nextIndex + 1), "=")) {
        const end = statementEnd(editor, k);
        editor.remove(k, end);
        k = end - 1;
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
}

/** Turns a notebook cell into a script for `vm.Script.runInThisContext` (see the module comment). */
export function prepareCell(source: string, options: { typescript: boolean }): PreparedCell {
  const code = options.typescript ? stripTypes(source) : source;
  const editor = new Editor(tokenize(code));
  const depthAt = topLevelMask(editor);
  // Top-level const/let → var: cells can be re-run.
  const hoisted: string[] = [];
  let sync = true;
  try {
    new vm.Script(code);
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
  if (sync) return { code: editor.text(), isAsync: false };

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
  return { code: `${declarations}(async () => {\n${editor.text()}\n})()`, isAsync: true };
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
