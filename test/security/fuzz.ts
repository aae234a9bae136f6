/**
 * Shared pieces of the property-based tests (fast-check): the run budget, a runner that reports
 * runs and time per target, and arbitraries for what hostile clients send to the REST API and
 * the router.
 */
import type { TestContext } from "node:test";
import fc from "fast-check";

/** The base run count when CUBICLE_FUZZ_RUNS is not set. */
const DEFAULT_BASE_RUNS = 150;

/**
 * Runs per fuzz target: the base count (CUBICLE_FUZZ_RUNS, default 150, which keeps the whole
 * fuzz suite well under a minute on a 2-core CI machine) scaled by the target's weight: a cheap
 * target runs more, one that starts processes fewer. CUBICLE_FUZZ_SEED replays a reported failure.
 */
export function fuzzRuns(weight = 1): number {
  const raw = process.env.CUBICLE_FUZZ_RUNS;
  let base = DEFAULT_BASE_RUNS;
  if (raw !== undefined && raw !== "") {
    base = Number(raw);
    if (!Number.isInteger(base) || base < 1) throw new Error(`CUBICLE_FUZZ_RUNS: "${raw}" is not a positive whole number`);
  }
  return Math.max(1, Math.round(base * weight));
}

/** Runs of each REST API and router target (twice the base: each run is cheap). */
export const FUZZ_RUNS = fuzzRuns(2);

/** Runs a property for `runs` runs and reports the count and the time in the test's output. */
export async function assertProperty(t: TestContext, target: string, property: fc.IAsyncProperty<any> | fc.IProperty<any>, runs = FUZZ_RUNS): Promise<void> {
  const seed = process.env.CUBICLE_FUZZ_SEED ? Number(process.env.CUBICLE_FUZZ_SEED) : undefined;
  const started = performance.now();
  await fc.assert(property as fc.IAsyncProperty<unknown>, { numRuns: runs, ...(seed === undefined ? {} : { seed }) });
  const ms = performance.now() - started;
  t.diagnostic(`fuzz ${target}: ${runs} runs in ${ms.toFixed(0)} ms`);
}

// ---- values -------------------------------------------------------------------------------

/** Strings chosen to trip parsers: prototype keys, numbers in disguise, NUL, paths, huge, unicode. */
export const nastyString: fc.Arbitrary<string> = fc.oneof(
  { weight: 4, arbitrary: fc.string({ maxLength: 30 }) },
  { weight: 2, arbitrary: fc.string({ unit: "grapheme", maxLength: 12 }) },
  { weight: 2, arbitrary: fc.string({ unit: "binary", maxLength: 12 }) },
  {
    weight: 4,
    arbitrary: fc.constantFrom(
      "",
      " ",
      "__proto__",
      "constructor",
      "prototype",
      "toString",
      "hasOwnProperty",
      "\u0000",
      "a\u0000b",
      "1e308",
      "-0",
      "NaN",
      "Infinity",
      "-1",
      "0x10",
      "1.5",
      "null",
      "true",
      "../../etc/passwd",
      "/var/lib/cubicle/cubicle.db",
      "%",
      "%00",
      "%zz",
      "a=b&c",
      "base",
      "code-interpreter-v1",
      "running,paused",
      "asc",
      "\u202e\u0301",
      "\ud800",
      "😀".repeat(40),
      "A_B",
      "1BAD",
    ),
  },
  { weight: 1, arbitrary: fc.integer({ min: 1000, max: 300_000 }).map((n) => "x".repeat(n)) },
);

export const nastyNumber: fc.Arbitrary<number> = fc.oneof(
  fc.integer(),
  fc.double(),
  fc.constantFrom(1e308, -1e308, -0, 0, 1, -1, 0.5, 2 ** 31, 2 ** 53, 2 ** 53 + 2, 64, 65535, 65536, 1e-300, 10_000_000),
);

const nastyKey: fc.Arbitrary<string> = fc.oneof(fc.string({ maxLength: 8 }), fc.constantFrom("__proto__", "constructor", "prototype", "templateID", "enabled", "allowOut", "A", "1A"));

/** Any JSON value, tilted towards the values above. */
export const nastyJson: fc.Arbitrary<unknown> = fc.letrec((tie) => ({
  value: fc.oneof(
    { maxDepth: 3, depthSize: "small" },
    nastyString,
    nastyNumber,
    fc.boolean(),
    fc.constant(null),
    fc.array(tie("value"), { maxLength: 3 }),
    fc.dictionary(nastyKey, tie("value"), { maxKeys: 3 }),
  ),
})).value;

/** A field of a create body: mostly a plausible value, sometimes anything. */
const field = <T>(plausible: fc.Arbitrary<T>) => fc.oneof({ weight: 3, arbitrary: plausible }, { weight: 1, arbitrary: nastyJson });
const stringMap = fc.dictionary(nastyString, nastyString, { maxKeys: 4 });

/** Create bodies: known fields with right and wrong types. `templateIds` are the ids to use. */
export function createBody(templateIds: fc.Arbitrary<string>): fc.Arbitrary<Record<string, unknown>> {
  return fc.record(
    {
      templateID: field(templateIds),
      timeout: field(fc.integer({ min: -5, max: 200_000 })),
      secure: field(fc.boolean()),
      allow_internet_access: field(fc.boolean()),
      metadata: field(stringMap),
      envVars: field(fc.oneof(stringMap, fc.dictionary(fc.stringMatching(/^[A-Za-z_][A-Za-z0-9_]{0,8}$/), fc.string({ maxLength: 20 }), { maxKeys: 4 }))),
      cpuCount: field(fc.integer({ min: -1, max: 100 })),
      memoryMB: field(fc.integer({ min: -1, max: 20_000_000 })),
      diskSizeMB: field(fc.integer({ min: -1, max: 20_000_000 })),
      autoPause: field(fc.boolean()),
      autoResume: field(fc.record({ enabled: field(fc.boolean()) })),
      lifecycle: field(fc.record({ onTimeout: field(fc.constantFrom("kill", "pause")), autoResume: field(fc.boolean()) }, { requiredKeys: [] })),
      network: field(fc.record({ allowOut: field(fc.array(nastyString, { maxLength: 3 })), allowPublicTraffic: field(fc.boolean()) }, { requiredKeys: [] })),
    },
    { requiredKeys: [] },
  );
}

/** Bodies of the other POST routes (timeout, connect, pause, snapshots, fork, rollback …). */
export const otherBody: fc.Arbitrary<Record<string, unknown>> = fc.record(
  {
    timeout: field(fc.integer({ min: -5, max: 200_000 })),
    duration: field(fc.integer({ min: -5, max: 200_000 })),
    memory: field(fc.boolean()),
    name: field(fc.oneof(nastyString, fc.stringMatching(/^[a-z0-9][a-z0-9._-]{0,10}$/))),
    count: field(fc.integer({ min: -1, max: 200 })),
    snapshotID: field(nastyString),
    autoPause: field(fc.boolean()),
  },
  { requiredKeys: [] },
);

/** Raw body text: JSON of the given bodies, JSON of anything, broken JSON, deep nesting. */
export function bodyText(bodies: fc.Arbitrary<unknown>): fc.Arbitrary<string> {
  return fc.oneof(
    { weight: 6, arbitrary: bodies.map((b) => JSON.stringify(b) ?? "null") },
    { weight: 2, arbitrary: nastyJson.map((b) => JSON.stringify(b) ?? "null") },
    { weight: 1, arbitrary: fc.string({ maxLength: 40 }) },
    {
      weight: 2,
      arbitrary: fc.constantFrom(
        "",
        "{",
        "[]",
        "null",
        "1e309",
        '"string"',
        '{"__proto__":{"polluted":1},"templateID":"base"}',
        '{"constructor":{"prototype":{"polluted":1}}}',
        '{"templateID":"base","network":' + '{"a":'.repeat(50_000) + "1" + "}".repeat(50_001),
        '{"templateID":"base","metadata":' + "[".repeat(100_000) + "]".repeat(100_000) + "}",
        "\u0000",
      ),
    },
  );
}

/** A query string built from the API's parameter names, repeated and broken at will. */
export const queryString: fc.Arbitrary<string> = fc
  .array(
    fc.tuple(
      fc.oneof(
        { weight: 5, arbitrary: fc.constantFrom("limit", "order", "state", "metadata", "startedAfter", "nextToken", "template", "sandboxID", "name") },
        { weight: 1, arbitrary: nastyKey },
      ),
      nastyString,
      fc.boolean(),
    ),
    { maxLength: 4 },
  )
  .map((pairs) =>
    pairs
      .map(([key, value, encode]) => `${percentEncode(key)}=${encode ? percentEncode(value) : value.replace(/[#\s\u0000-\u001f\u007f-\uffff]/g, "")}`)
      .join("&"),
  );

/** Percent-encodes the UTF-8 bytes of a string (lone surrogates included, as U+FFFD). */
export function percentEncode(value: string): string {
  let out = "";
  for (const byte of Buffer.from(value, "utf8")) {
    const c = String.fromCharCode(byte);
    out += /[A-Za-z0-9\-._~]/.test(c) ? c : "%" + byte.toString(16).toUpperCase().padStart(2, "0");
  }
  return out;
}

// ---- the router ---------------------------------------------------------------------------

/** Values for E2b-Sandbox-Port and the port label of a Host. */
export const portText: fc.Arbitrary<string> = fc.oneof(
  fc.integer({ min: -10, max: 70_000 }).map(String),
  fc.constantFrom("49983", "49999", "0", "65535", "65536", "99999", "-1", "", " ", "abc", "0x50", "1e3", "80.0", "+80", "８０", "49983, 49983", "99999999999999999999"),
  nastyString,
);

/** Header values: mostly printable, sometimes with the bytes that break HTTP framing. */
export const headerValue: fc.Arbitrary<string> = fc.oneof(
  { weight: 6, arbitrary: fc.string({ maxLength: 30 }).map((s) => s.replace(/[\r\n]/g, "")) },
  { weight: 1, arbitrary: nastyString },
  { weight: 1, arbitrary: fc.constantFrom("a\r\nInjected: 1", "\u0000", "\u00ff\u00fe", "x".repeat(20_000)) },
);

export interface RawRequestParts {
  method: string;
  path: string;
  headers: [string, string][];
  body: string;
  framing: "content-length" | "chunked" | "none" | "broken";
}

/**
 * The parts of a raw HTTP/1.1 request aimed at the router: routing headers, Hosts, upgrades,
 * odd methods and targets, and bodies with right or broken framing. `ids` names the sandboxes.
 */
export function rawRequestParts(ids: fc.Arbitrary<string>, domain: string): fc.Arbitrary<RawRequestParts> {
  const routing = fc.oneof(
    fc.tuple(ids, portText).map(([id, port]) => [["E2b-Sandbox-Id", id], ["E2b-Sandbox-Port", port]] as [string, string][]),
    fc.tuple(ids, portText).map(([id, port]) => [["Host", `${port}-${id}.${domain}`]] as [string, string][]),
    portText.map((port) => [["E2b-Sandbox-Port", port]] as [string, string][]),
    ids.map((id) => [["E2b-Sandbox-Id", id]] as [string, string][]),
    fc.constant([] as [string, string][]),
  );
  const extra = fc.array(
    fc.oneof(
      fc.constant(["Connection", "Upgrade"] as [string, string]),
      fc.constant(["Upgrade", "websocket"] as [string, string]),
      fc.tuple(fc.constantFrom("Host", "Expect", "Content-Type", "X-Access-Token", "Authorization", "E2b-Sandbox-Id", "E2b-Sandbox-Port", "Upgrade", "X-Api-Key"), headerValue),
      fc.tuple(fc.string({ minLength: 1, maxLength: 12 }), headerValue),
    ),
    { maxLength: 4 },
  );
  return fc.record({
    method: fc.oneof({ weight: 5, arbitrary: fc.constantFrom("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH") }, { weight: 1, arbitrary: fc.constantFrom("CONNECT", "BREW", "get", "") }),
    path: fc.oneof(
      { weight: 4, arbitrary: fc.constantFrom("/", "/health", "/files?path=/etc/passwd", "/process.Process/Start", "/execute", "/v2/sandboxes", "*", "http://evil.test/x", "//x", "/%zz", "/files?signature=v1_" + "A".repeat(43)) },
      { weight: 2, arbitrary: fc.string({ maxLength: 20 }).map((s) => "/" + s.replace(/[\s]/g, "")) },
      { weight: 1, arbitrary: nastyString.map((s) => "/" + s) },
    ),
    headers: fc.tuple(routing, extra).map(([a, b]) => [...a, ...b]),
    body: fc.oneof(fc.constant(""), fc.string({ maxLength: 40 })),
    framing: fc.constantFrom("content-length", "chunked", "none", "broken"),
  });
}

/** Serialises request parts; `Connection: close` last so the exchange ends with the response. */
export function rawRequestText(parts: RawRequestParts): string {
  const lines = [`${parts.method} ${parts.path} HTTP/1.1`];
  for (const [name, value] of parts.headers) lines.push(`${name}: ${value}`);
  const bodyBytes = Buffer.byteLength(parts.body, "latin1");
  let body = "";
  if (parts.framing === "content-length") {
    lines.push(`Content-Length: ${bodyBytes}`);
    body = parts.body;
  } else if (parts.framing === "chunked") {
    lines.push("Transfer-Encoding: chunked");
    body = (bodyBytes ? `${bodyBytes.toString(16)}\r\n${parts.body}\r\n` : "") + "0\r\n\r\n";
  } else if (parts.framing === "broken") {
    lines.push(`Content-Length: ${bodyBytes + 10}`);
    body = parts.body;
  }
  if (!parts.headers.some(([name]) => name.toLowerCase() === "host")) lines.push("Host: 127.0.0.1");
  lines.push("Connection: close");
  return lines.join("\r\n") + "\r\n\r\n" + body;
}

/** A raw upstream answer of a process in a sandbox: valid, odd or broken HTTP. */
export const upstreamAnswer: fc.Arbitrary<string> = fc.oneof(
  fc
    .record({
      status: fc.oneof(fc.integer({ min: 0, max: 999 }).map((n) => String(n).padStart(3, "0")), fc.constantFrom("1000", "abc", "", "-1", "42")),
      reason: fc.string({ maxLength: 10 }).map((s) => s.replace(/[\r\n]/g, "")),
      headers: fc.array(fc.tuple(fc.constantFrom("Content-Type", "Set-Cookie", "X-Weird", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade"), headerValue), { maxLength: 3 }),
      body: fc.string({ maxLength: 30 }),
    })
    .map(({ status, reason, headers, body }) => [`HTTP/1.1 ${status} ${reason}`, "X-Fake-Sandbox: 1", ...headers.map(([n, v]) => `${n}: ${v}`)].join("\r\n") + "\r\n\r\n" + body),
  fc.string({ maxLength: 40 }),
  fc.constantFrom("", "HTTP/1.1 200 OK\r\nX-Fake-Sandbox: 1\r\nContent-Length: 100\r\n\r\nshort", "HTTP/1.1 101 Switching Protocols\r\nX-Fake-Sandbox: 1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
);

/** Status and body of the first response in raw bytes, if any. */
export function parseRawResponse(raw: string): { status: number; headers: string; body: string } | undefined {
  const match = /^HTTP\/1\.[01] (\d{3})[^\r\n]*\r\n/.exec(raw);
  if (!match) return undefined;
  const end = raw.indexOf("\r\n\r\n");
  const headers = end < 0 ? raw : raw.slice(0, end);
  let body = end < 0 ? "" : raw.slice(end + 4);
  const length = /\r\ncontent-length: *(\d+)/i.exec(headers);
  if (length) body = body.slice(0, Number(length[1]));
  return { status: Number(match[1]), headers, body };
}

/** True when `body` is an E2B error body whose code is `status`. */
export function isE2bErrorBody(body: string, status: number): boolean {
  try {
    const parsed = JSON.parse(body) as { code?: unknown; message?: unknown };
    return parsed.code === status && typeof parsed.message === "string";
  } catch {
    return false;
  }
}

/** Paths of the host that must never be in a response. */
export const HOST_PATH_IN_TEXT = /(?<![\w.~-])\/(?:tmp|var|run|proc|sys|srv|etc|usr|root|work)\/[\w.-]/;
