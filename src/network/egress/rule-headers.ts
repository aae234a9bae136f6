/**
 * What header injection sets and strips, shared by the HTTP/1.1 and the HTTP/2 paths
 * (header-injection.ts, h2-injection.ts).
 */

/** RFC 9110 §7.6.1 hop-by-hop fields (and the proxy ones): never forwarded either way. */
export const HOP_BY_HOP = new Set(["connection", "keep-alive", "proxy-connection", "proxy-authorization", "transfer-encoding", "te", "trailer", "upgrade"]);

const PLACEHOLDER = /\$\{e2b\.secrets\.([^}]*)\}/g;

export type ResolvedRuleHeaders = { headers: [name: string, value: string][]; names: Set<string> } | { error: string };

/**
 * The rule's headers with their `${e2b.secrets.NAME}` placeholders filled on the host, and their
 * lowercase names (the sandbox's own values of them are dropped). An undefined secret or a value
 * no request can carry is an error: the request is answered 502 and not sent.
 */
export function resolveRuleHeaders(rules: Record<string, string>, domain: string, resolveSecret: (name: string) => string | undefined): ResolvedRuleHeaders {
  const headers: [string, string][] = [];
  for (const [name, template] of Object.entries(rules)) {
    let missing: string | undefined;
    const value = template.replace(PLACEHOLDER, (_match, secret: string) => {
      const resolved = resolveSecret(secret);
      if (resolved === undefined) missing ??= secret;
      return resolved ?? "";
    });
    if (missing !== undefined) return { error: `egress proxy: the secret ${JSON.stringify(missing)} of the header rule for ${domain} is not defined` };
    if (/[\r\n\0]/.test(value)) return { error: `egress proxy: the header ${name} for ${domain} resolves to an invalid value` };
    headers.push([name, value]);
  }
  return { headers, names: new Set(headers.map(([name]) => name.toLowerCase())) };
}
