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
