import assert from "node:assert/strict";
import { test } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { decodeCursor, encodeCursor, parseCreateRequest, parseLimit, parseMetadataFilter, parseStates, singleQueryValue, type CreateParsingOptions } from "./request-parsing.js";

const limits = { maxCpuCount: 2, maxMemoryMB: 4096, maxDiskMB: 65536 };
/** A server that allows insecure v1 sandboxes (upstream's behaviour). */
const permissive: CreateParsingOptions = { defaultTimeoutSec: 300, limits, requireSecure: false };
/** A server that requires secure sandboxes (the default). */
const strict: CreateParsingOptions = { ...permissive, requireSecure: true };
const isBadRequest = (message: RegExp) => (err: unknown) => err instanceof CubicleError && err.httpStatus === 400 && message.test(err.message);

test("metadata filters decode the SDK's double encoding like upstream parseFilters", () => {
  // On the wire: metadata=user%252520id%3Da%252526b%26app%3Dprod; the query layer decodes once.
  const onceDecoded = new URLSearchParams("metadata=user%252520id%3Da%252526b%26app%3Dprod").get("metadata")!;
  assert.deepEqual(parseMetadataFilter(onceDecoded), { "user id": "a&b", app: "prod" });
  assert.equal(parseMetadataFilter(undefined), undefined);
  assert.throws(() => parseMetadataFilter("novalue"), CubicleError);
  assert.throws(() => parseMetadataFilter("a=b=c"), CubicleError);
});

test("v2 creates are secure with the server's default timeout; v1 honours secure and defaults to 15 s when the server allows insecure sandboxes", () => {
  const v2 = parseCreateRequest({ templateID: "base" }, 2, permissive);
  assert.equal(v2.secure, true);
  assert.equal(v2.timeoutSec, 300);
  assert.equal(v2.allowInternetAccess, true);
  const v1 = parseCreateRequest({ templateID: "base", secure: false, allow_internet_access: false }, 1, permissive);
  assert.equal(v1.secure, false);
  assert.equal(v1.timeoutSec, 15);
  assert.equal(v1.allowInternetAccess, false);
  const paused = parseCreateRequest({ templateID: "base", autoPause: true, autoResume: { enabled: true } }, 2, permissive);
  assert.equal(paused.autoPause, true);
  assert.equal(paused.autoResume, true);
});

test("invalid create bodies are invalid_argument errors naming the field", () => {
  const cases: [unknown, RegExp][] = [
    [undefined, /templateID/],
    [[], /object/],
    [{ templateID: "" }, /templateID/],
    [{ templateID: "base", timeout: 1.5 }, /timeout/],
    [{ templateID: "base", timeout: 10 ** 9 }, /24 hours/],
    [{ templateID: "base", envVars: { A: 1 } }, /envVars\.A/],
    [{ templateID: "base", secure: "yes" }, /secure/],
    [{ templateID: "base", memoryMB: 5 }, /memoryMB/],
  ];
  for (const [body, message] of cases) {
    assert.throws(() => parseCreateRequest(body, 2, strict), (err: unknown) => err instanceof CubicleError && err.httpStatus === 400 && message.test(err.message));
  }
});

test("list parameters: states, limits and opaque cursors", () => {
  assert.deepEqual(parseStates("running,paused"), ["running", "paused"]);
  assert.deepEqual(parseStates(["running", "paused"]), ["running", "paused"]);
  assert.throws(() => parseStates("dead"), CubicleError);
  assert.equal(parseLimit(undefined), 100);
  assert.throws(() => parseLimit("0"), CubicleError);
  assert.throws(() => parseLimit("101"), CubicleError);
  const token = encodeCursor(1700000000123, "iabc123");
  assert.deepEqual(decodeCursor(token), { startedAt: 1700000000123, sandboxId: "iabc123" });
  assert.throws(() => decodeCursor("garbage!!"), CubicleError);
});

test("a server that requires secure sandboxes refuses v1 secure: false and makes v1 creates without the field secure", () => {
  assert.throws(() => parseCreateRequest({ templateID: "base", secure: false }, 1, strict), isBadRequest(/requires secure sandboxes.*CUBICLE_REQUIRE_SECURE=false/));
  assert.equal(parseCreateRequest({ templateID: "base" }, 1, strict).secure, true);
  assert.equal(parseCreateRequest({ templateID: "base", secure: true }, 1, strict).secure, true);
  assert.equal(parseCreateRequest({ templateID: "base", secure: false }, 2, strict).secure, true, "v2 creates are always secure");
  assert.equal(parseCreateRequest({ templateID: "base" }, 1, permissive).secure, false, "upstream's v1 default when allowed");
});

test("cpuCount, memoryMB and diskSizeMB are checked against the floors and the operator's limits, which the message names", () => {
  const parsed = parseCreateRequest({ templateID: "base", cpuCount: 2, memoryMB: 4096, diskSizeMB: 1024 }, 2, strict);
  assert.deepEqual([parsed.cpuCount, parsed.memoryMB, parsed.diskSizeMB], [2, 4096, 1024]);
  const absent = parseCreateRequest({ templateID: "base" }, 2, strict);
  assert.deepEqual([absent.cpuCount, absent.memoryMB, absent.diskSizeMB], [undefined, undefined, undefined]);
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ cpuCount: 64 }, /cpuCount must be at most 2 .*CUBICLE_MAX_CPU_COUNT/],
    [{ memoryMB: 10_000_000 }, /memoryMB must be at most 4096 .*CUBICLE_MAX_MEMORY_MB/],
    [{ diskSizeMB: 1e9 }, /diskSizeMB must be at most 65536 .*CUBICLE_MAX_DISK_MB/],
    [{ cpuCount: 0 }, /cpuCount must be at least 1/],
    [{ memoryMB: 127 }, /memoryMB must be at least 128/],
    [{ diskSizeMB: 10 }, /diskSizeMB must be at least 256/],
    [{ cpuCount: 1.5 }, /cpuCount must be a whole number/],
    [{ memoryMB: "512" }, /memoryMB must be a whole number/],
    [{ memoryMB: 1e308 }, /memoryMB/],
    [{ diskSizeMB: -0.5 }, /diskSizeMB/],
  ];
  for (const [fields, message] of cases) assert.throws(() => parseCreateRequest({ templateID: "base", ...fields }, 2, strict), isBadRequest(message), JSON.stringify(fields));
});

test("env var names are POSIX-style, values hold no NUL and fit execve", () => {
  const ok = parseCreateRequest({ templateID: "base", envVars: { A: "1", _B2: "x=y", lower_case: "", __proto__x: "v" } }, 2, strict);
  assert.deepEqual(ok.envVars, { A: "1", _B2: "x=y", lower_case: "", __proto__x: "v" });
  for (const name of ["", "1A", "A-B", "A B", "A=B", "Ä", "A\u0000", "x".repeat(257)]) {
    assert.throws(() => parseCreateRequest({ templateID: "base", envVars: { [name]: "v" } }, 2, strict), isBadRequest(/not a valid variable name/), JSON.stringify(name));
  }
  assert.throws(() => parseCreateRequest({ templateID: "base", envVars: { A: "a\u0000b" } }, 2, strict), isBadRequest(/NUL/));
  assert.throws(() => parseCreateRequest({ templateID: "base", envVars: { A: "x".repeat(128 * 1024) } }, 2, strict), isBadRequest(/longer than/));
  const many = Object.fromEntries(Array.from({ length: 1001 }, (_, i) => [`V${i}`, ""]));
  assert.throws(() => parseCreateRequest({ templateID: "base", envVars: many }, 2, strict), isBadRequest(/at most 1000/));
});

test("a __proto__ key in envVars or metadata is an ordinary key, not a prototype", () => {
  const body = JSON.parse('{"templateID":"base","envVars":{"__proto__":"v"},"metadata":{"__proto__":"m","constructor":"c"}}');
  const parsed = parseCreateRequest(body, 2, strict);
  assert.deepEqual(Object.keys(parsed.envVars), ["__proto__"]);
  assert.equal(Object.getPrototypeOf(parsed.envVars), Object.prototype);
  assert.deepEqual(Object.entries(parsed.metadata), [["__proto__", "m"], ["constructor", "c"]]);
});

test("metadata, templateID and network are bounded", () => {
  const many = Object.fromEntries(Array.from({ length: 101 }, (_, i) => [`k${i}`, "v"]));
  assert.throws(() => parseCreateRequest({ templateID: "base", metadata: many }, 2, strict), isBadRequest(/at most 100/));
  assert.throws(() => parseCreateRequest({ templateID: "base", metadata: { ["k".repeat(257)]: "v" } }, 2, strict), isBadRequest(/metadata keys/));
  assert.throws(() => parseCreateRequest({ templateID: "base", metadata: { "": "v" } }, 2, strict), isBadRequest(/metadata keys/));
  assert.throws(() => parseCreateRequest({ templateID: "base", metadata: { k: "v".repeat(4097) } }, 2, strict), isBadRequest(/longer than 4096/));
  assert.throws(() => parseCreateRequest({ templateID: "b".repeat(257) }, 2, strict), isBadRequest(/templateID/));
  assert.throws(() => parseCreateRequest({ templateID: "base", network: { allowOut: "0.0.0.0/0" } }, 2, strict), isBadRequest(/network.allowOut/));
  assert.throws(() => parseCreateRequest({ templateID: "base", network: { allowOut: ["x".repeat(70_000)] } }, 2, strict), isBadRequest(/not an IPv4 address, an IPv4 CIDR or a domain name/));
  const manyNames = Array.from({ length: 900 }, (_, i) => `host-${i}-${"a".repeat(50)}.example.com`);
  assert.throws(() => parseCreateRequest({ templateID: "base", network: { allowOut: manyNames } }, 2, strict), isBadRequest(/64 KiB/));
  const deep = JSON.parse('{"x":'.repeat(100_000) + "1" + "}".repeat(100_000));
  assert.throws(() => parseCreateRequest({ templateID: "base", network: { extra: deep } }, 2, strict), isBadRequest(/network.extra is not a network field/));
  const deepRules = { "api.example.com": [{ transform: { headers: { x: deep } } }] };
  assert.throws(() => parseCreateRequest({ templateID: "base", network: { rules: deepRules } }, 2, strict), isBadRequest(/must be a string/));
  assert.deepEqual(parseCreateRequest({ templateID: "base", network: { allowOut: ["1.1.1.1/32"], allowPublicTraffic: false } }, 2, strict).networkConfig, { allowOut: ["1.1.1.1/32"], allowPublicTraffic: false });
});

test("a query parameter given twice is refused", () => {
  assert.equal(singleQueryValue({ limit: "5" }, "limit"), "5");
  assert.equal(singleQueryValue({}, "limit"), undefined);
  assert.throws(() => singleQueryValue({ limit: ["1", "2"] }, "limit"), isBadRequest(/limit may be given once/));
});

test("network: ingress fields are typed (httpsPorts: ports, never envd's), unknown fields are refused, bandwidth is bounded", () => {
  const strict = { defaultTimeoutSec: 300, limits: { maxCpuCount: 2, maxMemoryMB: 4096, maxDiskMB: 65536 }, requireSecure: true };
  const create = (network: unknown) => parseCreateRequest({ templateID: "base", network }, 2, strict);
  const bad = (pattern: RegExp) => (err: unknown) => err instanceof CubicleError && err.code === "invalid_argument" && pattern.test(err.message);
  assert.throws(() => create({ allowPublicTraffic: "no" }), bad(/allowPublicTraffic must be true or false/));
  assert.throws(() => create({ maskRequestHost: "evil\r\nX-Injected: 1" }), bad(/maskRequestHost must be a host name/));
  assert.throws(() => create({ maskRequestHost: 5 }), bad(/maskRequestHost must be a host name/));
  for (const ports of [[0], [65536], [8443.5], ["8443"], [null], "8443", { 0: 8443 }, Array.from({ length: 65 }, (_, i) => 8000 + i)]) assert.throws(() => create({ httpsPorts: ports }), bad(/httpsPorts must/), JSON.stringify(ports));
  assert.throws(() => create({ httpsPorts: [8443, 49983] }), bad(/cannot list envd's port 49983/));
  assert.deepEqual(create({ httpsPorts: [8443, 3000] }).networkConfig, { httpsPorts: [8443, 3000] });
  assert.throws(() => create({ bandwidth: { egressMbps: 0 } }), bad(/egressMbps/));
  assert.throws(() => create({ bandwidth: { burst: 1 } }), bad(/burst/));
  assert.deepEqual(create({ maskRequestHost: "localhost:${PORT}", httpsPorts: [], bandwidth: { ingressMbps: 50 } }).networkConfig, { maskRequestHost: "localhost:${PORT}", httpsPorts: [], bandwidth: { ingressMbps: 50 } });
});

test("create fields that are not enforced yet (iam, mcp) are refused, not ignored", () => {
  const strict = { defaultTimeoutSec: 300, limits: { maxCpuCount: 2, maxMemoryMB: 4096, maxDiskMB: 65536 }, requireSecure: true };
  const create = (extra: Record<string, unknown>) => parseCreateRequest({ templateID: "base", ...extra }, 2, strict);
  const bad = (pattern: RegExp) => (err: unknown) => err instanceof CubicleError && err.code === "invalid_argument" && pattern.test(err.message);
  assert.throws(() => create({ iam: { tokens: { aws: { audience: "sts.amazonaws.com", tokenType: "JWT-SVID" } } } }), bad(/iam .* not supported/));
  assert.throws(() => create({ iam: "x" }), bad(/iam .* not supported/));
  assert.throws(() => create({ mcp: { "github/x": { runCmd: "x" } } }), bad(/mcp .* not supported/));
  for (const empty of [{ iam: { tokens: {} } }, { iam: {} }, { volumeMounts: [] }, { mcp: null }, { iam: null }]) assert.equal(create(empty).templateId, "base");
});

test("volumeMounts: plain absolute paths that do not nest, outside the kernel's and the agent's trees", () => {
  const strict = { defaultTimeoutSec: 300, limits: { maxCpuCount: 2, maxMemoryMB: 4096, maxDiskMB: 65536 }, requireSecure: true };
  const create = (volumeMounts: unknown) => parseCreateRequest({ templateID: "base", volumeMounts }, 2, strict);
  const bad = (pattern: RegExp) => (err: unknown) => err instanceof CubicleError && err.code === "invalid_argument" && pattern.test(err.message);
  assert.deepEqual(create([{ name: "data", path: "/mnt/data" }, { name: "vol_1", path: "/home/user/work" }]).volumeMounts, [
    { name: "data", path: "/mnt/data" },
    { name: "vol_1", path: "/home/user/work" },
  ]);
  assert.equal(create([]).volumeMounts, undefined);
  for (const path of ["/", "relative", "/a/../etc", "/a/./b", "/a//b", "/a/", "/proc/x", "/sys", "/dev/shm", "/.cubicle/bin", "/x\0y", "/run/x", "/etc", "/usr", "/usr/bin", "/home", "/tmp", "/var/lib"]) {
    assert.throws(() => create([{ name: "data", path }]), bad(/path/), path);
  }
  assert.throws(() => create([{ name: "a", path: "/mnt" }, { name: "b", path: "/mnt/inner" }]), bad(/must not nest/));
  assert.throws(() => create([{ name: "a", path: "/mnt" }, { name: "b", path: "/mnt" }]), bad(/must not nest/));
  assert.throws(() => create([{ name: "", path: "/mnt" }]), bad(/name/));
  assert.throws(() => create([{ name: "a", path: "/mnt", readOnly: true }]), bad(/not a mount field/));
  assert.throws(() => create({ name: "a" }), bad(/list/));
  assert.throws(() => create(Array.from({ length: 17 }, (_, i) => ({ name: "a", path: `/m${i}` }))), bad(/at most 16/));
});

test("codebaseMounts: levels, relative glob patterns codebase-fs takes, and no nesting with volumes", () => {
  const strict = { defaultTimeoutSec: 300, limits: { maxCpuCount: 2, maxMemoryMB: 4096, maxDiskMB: 65536 }, requireSecure: true };
  const create = (extra: Record<string, unknown>) => parseCreateRequest({ templateID: "base", ...extra }, 2, strict);
  const bad = (pattern: RegExp) => (err: unknown) => err instanceof CubicleError && err.code === "invalid_argument" && pattern.test(err.message);
  assert.deepEqual(create({ codebaseMounts: [{ codebase: "app", path: "/workspace", rules: { "src/**": "write", "**/*.env": "none" } }] }).codebaseMounts, [
    { codebase: "app", path: "/workspace", rules: [{ pattern: "src/**", level: "write" }, { pattern: "**/*.env", level: "none" }], defaultLevel: "read" },
  ]);
  for (const pattern of ["/etc/**", "secrets/", "a//b", "./x", "a/../b", "", "x\ty", "x".repeat(257)]) {
    assert.throws(() => create({ codebaseMounts: [{ codebase: "app", path: "/w", rules: { [pattern]: "none" } }] }), bad(/not a pattern/), JSON.stringify(pattern.slice(0, 20)));
  }
  assert.throws(() => create({ codebaseMounts: [{ codebase: "app", path: "/w", rules: { "a/**": "admin" } }] }), bad(/none, view, read, write/));
  assert.throws(() => create({ codebaseMounts: [{ codebase: "app", path: "/w", default: "all" }] }), bad(/default/));
  assert.throws(() => create({ codebaseMounts: [{ codebase: "app", path: "/w", rules: ["src/**"] }] }), bad(/rules must be an object/));
  const manyRules = Object.fromEntries(Array.from({ length: 1001 }, (_, i) => [`dir${i}/**`, "read"]));
  assert.throws(() => create({ codebaseMounts: [{ codebase: "app", path: "/w", rules: manyRules }] }), bad(/at most 1000/));
  assert.equal(create({ codebaseMounts: [{ codebase: "app", path: "/w", rules: Object.fromEntries(Object.entries(manyRules).slice(1)) }] }).codebaseMounts?.[0]?.rules.length, 1000);
  assert.throws(() => create({ codebaseMounts: Array.from({ length: 17 }, (_, i) => ({ codebase: "app", path: `/w${i}` })) }), bad(/at most 16/));
  assert.throws(() => create({ codebaseMounts: [{ codebase: "app", path: "/w" }], volumeMounts: [{ name: "v", path: "/w/data" }] }), bad(/must not nest/));
});
