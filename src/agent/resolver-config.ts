import fs from "node:fs";
import { createLogger } from "../shared/log.js";

const log = createLogger("agent");

/** The default route's gateway from /proc/net/route ("00000000" destination), dotted; undefined without one. */
export function defaultGateway(routeTable: string): string | undefined {
  for (const line of routeTable.split("\n").slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields[1] !== "00000000" || !/^[0-9A-Fa-f]{8}$/.test(fields[2] ?? "")) continue;
    // Little-endian hex: "0100580A" is 10.88.0.1.
    const value = Number.parseInt(fields[2]!, 16);
    return [value & 255, (value >>> 8) & 255, (value >>> 16) & 255, value >>> 24].join(".");
  }
  return undefined;
}

/**
 * Gives a sandbox whose /etc/resolv.conf names no nameserver (the templates ship it empty) its
 * gateway as resolver. Every DNS packet a sandbox sends, to any address, is answered by Cubicle's
 * DNS forwarder on the host (NFT_RULESET_NOTE), so the address only has to route out; after a
 * restore onto another address the old one still does. A resolv.conf the user or the template
 * filled is left alone. The file stays the sandbox's own to edit.
 */
export function ensureResolverConfig(root = "/"): void {
  const file = `${root.replace(/\/$/, "")}/etc/resolv.conf`;
  try {
    const current = fs.existsSync(file) ? fs.readFileSync(file, "utf8") : "";
    if (/^\s*nameserver\s/m.test(current)) return;
    const gateway = defaultGateway(fs.readFileSync("/proc/net/route", "utf8"));
    if (!gateway) return;
    const temporary = `${file}.cubicle-${process.pid}`;
    fs.writeFileSync(temporary, `# Written by Cubicle's agent: DNS goes to Cubicle's forwarder on the host.\nnameserver ${gateway}\noptions timeout:2 attempts:2\n`, { mode: 0o644 });
    fs.renameSync(temporary, file);
  } catch (err) {
    log.warn("could not write /etc/resolv.conf; names will not resolve", { error: String(err) });
  }
}
