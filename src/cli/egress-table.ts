import type { apiSchema } from "../protocol/index.js";

/**
 * `./cubicle sandbox egress` as a table. Domains and reasons come from sandboxes (a TLS SNI is
 * whatever the sandbox sent): control characters are shown as `?`, never written to the terminal.
 */
export function formatEgressTable(records: apiSchema.EgressRecord[]): string {
  const rows = records.map((r) => [
    r.time,
    r.protocol,
    r.port === undefined ? r.address : `${r.address.includes(":") ? `[${r.address}]` : r.address}:${r.port}`,
    r.domain ?? "-",
    r.verdict,
    r.reason,
    r.bytesOut === undefined && r.bytesIn === undefined ? "-" : `${r.bytesOut ?? "-"}/${r.bytesIn ?? "-"}`,
  ].map((cell) => printable(String(cell))));
  const header = ["TIME", "PROTO", "DESTINATION", "DOMAIN", "VERDICT", "REASON", "BYTES OUT/IN"];
  const widths = header.map((title, column) => Math.min(60, Math.max(title.length, ...rows.map((row) => row[column]!.length))));
  const line = (cells: string[]) => cells.map((cell, column) => (column === cells.length - 1 ? cell : clip(cell, widths[column]!).padEnd(widths[column]! + 2))).join("").trimEnd();
  return [line(header), ...rows.map(line)].join("\n") + "\n";
}

function printable(text: string): string {
  return text.replace(/[\p{Cc}\p{Cf}\u2028\u2029]/gu, "?");
}

function clip(text: string, width: number): string {
  return text.length > width ? text.slice(0, width - 1) + "…" : text;
}
