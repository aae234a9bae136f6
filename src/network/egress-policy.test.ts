import assert from "node:assert/strict";
import { test } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { EgressRules, buildEgressPolicy, domainMatches, headerRuleFor, parseCidr, referencedSecrets, resolvePlaceholders } from "./egress-policy.js";

const isBadRequest = (pattern: RegExp) => (err: unknown) => err instanceof CubicleError && err.code === "invalid_argument" && pattern.test(err.message);

const rules = new EgressRules({ sandboxSubnet: "10.88.0.0/16", privateAllowed: ["192.168.50.0/24"], hostAddresses: () => new Set(["192.0.2.2"]) });

test("allowOut and denyOut are normalised; domains are only allowed, IPv6 is refused", () => {
  const policy = buildEgressPolicy(true, { allowOut: ["8.8.8.8", "1.2.3.9/24", "API.Example.com.", "*.example.org"], denyOut: ["0.0.0.0/0"] });
  assert.deepEqual(policy.allowCidrs, ["8.8.8.8/32", "1.2.3.0/24"]);
  assert.deepEqual(policy.allowDomains, ["api.example.com", "*.example.org"]);
  assert.deepEqual(policy.denyCidrs, ["0.0.0.0/0"]);
  assert.equal(policy.allowInternet, true);
  assert.throws(() => buildEgressPolicy(true, { denyOut: ["example.com"] }), isBadRequest(/domain names cannot be denied/));
  assert.throws(() => buildEgressPolicy(true, { allowOut: ["2001:db8::1"] }), isBadRequest(/IPv6/));
  assert.throws(() => buildEgressPolicy(true, { allowOut: ["1.2.3.4/33"] }), isBadRequest(/prefix length/));
  assert.throws(() => buildEgressPolicy(true, { allowOut: ["*"] }), isBadRequest(/not an IPv4 address/));
  assert.throws(() => buildEgressPolicy(true, { allowOut: ["*.com"] }), isBadRequest(/too broad/));
  assert.throws(() => buildEgressPolicy(true, { allowOut: ["exa mple.com"] }), isBadRequest(/not an IPv4 address/));
  assert.throws(() => buildEgressPolicy(true, { allowOut: "1.1.1.1" }), isBadRequest(/list of strings/));
  assert.throws(() => buildEgressPolicy(true, { allowOut: Array(1001).fill("1.1.1.1") }), isBadRequest(/at most 1000/));
  assert.equal(parseCidr("10.1.2.3/8"), "10.0.0.0/8");
});

test("allowInternetAccess false is denyOut 0.0.0.0/0, and with nothing allowed nothing leaves", () => {
  const closed = buildEgressPolicy(false, undefined);
  assert.equal(closed.allowInternet, false);
  assert.deepEqual(closed.denyCidrs, ["0.0.0.0/0"]);
  const holes = buildEgressPolicy(false, { allowOut: ["example.com"] });
  assert.equal(holes.allowInternet, true);
  assert.equal(rules.mayResolve(holes, "example.com").allowed, true);
  assert.equal(rules.mayResolve(holes, "evil.example.net").allowed, false);
  assert.equal(rules.mayResolve(closed, "example.com").allowed, false);
});

test("E2B precedence: allow beats deny, domains need the sandbox's own DNS answer", () => {
  const policy = buildEgressPolicy(true, { allowOut: ["203.0.113.0/24", "api.example.com", "*.cdn.example"], denyOut: ["0.0.0.0/0"] });
  assert.deepEqual(rules.decide(policy, "203.0.113.9"), { allowed: true, reason: "allowOut address" });
  assert.equal(rules.decide(policy, "198.51.100.1").allowed, false);
  assert.equal(rules.decide(policy, "198.51.100.1", { name: "api.example.com", pinned: true }).allowed, true);
  assert.match(rules.decide(policy, "198.51.100.1", { name: "api.example.com", pinned: false }).reason, /did not resolve it/);
  assert.equal(rules.decide(policy, "198.51.100.1", { name: "a.b.cdn.example", pinned: true }).allowed, true);
  assert.equal(rules.decide(policy, "198.51.100.1", { name: "cdn.example", pinned: true }).allowed, false);
  const denyList = buildEgressPolicy(true, { denyOut: ["198.51.100.0/24"] });
  assert.equal(rules.decide(denyList, "198.51.100.1").allowed, false);
  assert.equal(rules.decide(denyList, "198.51.100.1", { name: "whatever.test", pinned: true }).allowed, false);
  assert.equal(rules.decide(denyList, "203.0.113.1").allowed, true);
  assert.equal(rules.mayResolve(denyList, "anything.test").allowed, true);
});

test("the floor denies host, sandboxes, loopback, metadata and private space whatever the rules say", () => {
  const everything = buildEgressPolicy(true, { allowOut: ["0.0.0.0/0"] });
  for (const address of ["192.0.2.2", "10.88.3.6", "127.0.0.1", "169.254.169.254", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "224.0.0.1", "255.255.255.255", "0.0.0.0"]) {
    assert.equal(rules.decide(everything, address).allowed, false, address);
  }
  assert.equal(rules.decide(everything, "192.168.50.7").allowed, true, "an operator-opened private range");
  assert.equal(rules.decide(everything, "::1").allowed, false);
});

test("header rules: exact before the longest wildcard, secrets as placeholders, identity tokens refused", () => {
  const policy = buildEgressPolicy(true, {
    rules: {
      "*.example.com": [{ transform: { headers: { "X-Which": "wild" } } }],
      "*.api.example.com": [{ transform: { headers: { "X-Which": "longer" } } }],
      "v1.api.example.com": [{ transform: { headers: { "X-Which": "exact" } } }, { transform: { headers: { Authorization: "Bearer ${e2b.secrets.OpenAI}" } } }],
    },
  });
  assert.equal(headerRuleFor(policy, "v1.api.example.com")?.headers["X-Which"], "exact");
  assert.equal(headerRuleFor(policy, "v2.api.example.com")?.headers["X-Which"], "longer");
  assert.equal(headerRuleFor(policy, "www.example.com")?.headers["X-Which"], "wild");
  assert.equal(headerRuleFor(policy, "example.com"), undefined);
  assert.deepEqual(referencedSecrets(policy), ["openai"]);
  const resolved = resolvePlaceholders("Bearer ${e2b.secrets.OpenAI}", (name) => (name === "openai" ? "sk-123" : undefined));
  assert.equal(resolved, "Bearer sk-123");
  assert.throws(() => resolvePlaceholders("${e2b.secrets.gone}", () => undefined), /does not exist/);
  assert.throws(() => buildEgressPolicy(true, { rules: { "a.example": [{ transform: { headers: { x: "${e2b.identity.tokens.aws}" } } }] } }), isBadRequest(/workload identity/));
  assert.throws(() => buildEgressPolicy(true, { rules: { "a.example": [{ transform: { headers: { x: "a\r\nInjected: 1" } } }] } }), isBadRequest(/one line/));
  assert.throws(() => buildEgressPolicy(true, { rules: { "a.example": [{ transform: { headers: { "Bad Name": "x" } } }] } }), isBadRequest(/not an HTTP header name/));
  assert.throws(() => buildEgressPolicy(true, { rules: { "a.example": [{ transform: { headers: { Host: "x" } } }] } }), isBadRequest(/cannot be injected/));
  assert.throws(() => buildEgressPolicy(true, { rules: { "*": [] } }), isBadRequest(/bare "\*"/));
  assert.throws(() => buildEgressPolicy(true, { rules: { "a.example": [{ block: true }] } }), isBadRequest(/not a rule field/));
  assert.equal(domainMatches("*.example.com", "a.b.example.com"), true);
  assert.equal(domainMatches("*.example.com", "badexample.com"), false);
});

test("egressProxy is host:port with RFC 1929 credentials", () => {
  assert.deepEqual(buildEgressPolicy(true, { egressProxy: { address: "Proxy.Example.com:1080", username: "u", password: "p" } }).egressProxy, { host: "proxy.example.com", port: 1080, username: "u", password: "p" });
  assert.deepEqual(buildEgressPolicy(true, { egressProxy: { address: "198.18.0.9:1080" } }).egressProxy, { host: "198.18.0.9", port: 1080 });
  assert.throws(() => buildEgressPolicy(true, { egressProxy: { address: "proxy:0" } }), isBadRequest(/host:port/));
  assert.throws(() => buildEgressPolicy(true, { egressProxy: { address: "proxy" } }), isBadRequest(/host:port/));
  assert.throws(() => buildEgressPolicy(true, { egressProxy: { address: "[::1]:1080" } }), isBadRequest(/IPv6/));
  assert.throws(() => buildEgressPolicy(true, { egressProxy: { address: "p:1080", password: "x" } }), isBadRequest(/needs a username/));
  assert.throws(() => buildEgressPolicy(true, { egressProxy: { address: "p:1080", username: "u".repeat(256) } }), isBadRequest(/1–255 bytes/));
  assert.throws(() => buildEgressPolicy(true, { egressProxy: { address: "p:1080", token: "x" } }), isBadRequest(/not a field/));
});
