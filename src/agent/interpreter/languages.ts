import { CubicleError } from "../../shared/cubicle-error.js";

/** Languages the E2B code interpreter knows (§10.3). Only some have a kernel in a Cubicle sandbox. */
export type Language = "python" | "javascript" | "typescript" | "bash" | "r" | "java";

const aliases: Record<string, Language> = {
  python: "python",
  javascript: "javascript",
  js: "javascript",
  typescript: "typescript",
  ts: "typescript",
  bash: "bash",
  r: "r",
  java: "java",
};

/** Trims and lower-cases a language name and resolves its aliases; unknown names come back cleaned, as strings. */
export function normalizeLanguage(name: string | undefined | null): string {
  const cleaned = (name ?? "").trim().toLowerCase();
  if (!cleaned) return "python";
  return aliases[cleaned] ?? cleaned;
}

/**
 * A known language name (normalised); anything else is invalid_argument. Unknown names are not
 * kept: each would become a context of its own, and their names end up in `/contexts`.
 */
export function checkLanguage(name: string | undefined | null): Language {
  if (name === undefined || name === null) return "python";
  const language = name.length <= 64 ? normalizeLanguage(name) : "";
  if (!Object.hasOwn(knownLanguages, language)) {
    throw new CubicleError("invalid_argument", `unsupported language ${JSON.stringify(name.slice(0, 64))}: use one of python, javascript (js), typescript (ts), bash, r, java`);
  }
  return language as Language;
}

const knownLanguages: Record<Language, true> = { python: true, javascript: true, typescript: true, bash: true, r: true, java: true };
