import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { EventEmitter } from "node:events";
import type { IncomingMessage } from "node:http";
import { test } from "node:test";
import { createFakeAgentLink } from "../protocol/fake-agent-link.js";
import { SandboxRouter } from "./sandbox-router.js";

function source(sandboxes: { sandboxId: string; envdAccessToken: string | undefined; state: string }[]) {
  const emitter = new EventEmitter();
  return Object.assign(emitter, {
    routeTarget: (id: string) => (sandboxes.some((s) => s.sandboxId === id) ? { sandboxId: id, address: "10.0.0.2" } : undefined),
    liveSandboxes: () => sandboxes,
  });
}

function request(url: string, headers: Record<string, string>, method = "GET"): IncomingMessage {
  return { url, headers, method } as unknown as IncomingMessage;
}

test("routes by E2b-Sandbox-* headers, then by <port>-<id>.<domain> Host", () => {
  const router = new SandboxRouter(source([]), "cubicle.local", { agentLink: createFakeAgentLink() });
  assert.deepEqual(router.match(request("/health", { "e2b-sandbox-id": "iabc", "e2b-sandbox-port": "49983" })), { sandboxId: "iabc", port: 49983 });
  assert.deepEqual(router.match(request("/", { host: "8080-iabc.cubicle.local:3000" })), { sandboxId: "iabc", port: 8080 });
  assert.equal(router.match(request("/v2/sandboxes", { host: "127.0.0.1:3000" })), undefined);
  assert.equal(router.match(request("/", { host: "8080-iabc.other.domain" })), undefined);
});

test("a signed /files URL without routing headers goes to the sandbox whose token signed it", () => {
  const token = "secret-token";
  const expiration = "1900000000";
  const signature = "v1_" + createHash("sha256").update(`/home/user/a.txt:read:user:${token}:${expiration}`).digest("base64").replace(/=+$/, "");
  const router = new SandboxRouter(
    source([
      { sandboxId: "iother", envdAccessToken: "another", state: "running" },
      { sandboxId: "isigned", envdAccessToken: token, state: "running" },
    ]),
    "cubicle.local",
    { agentLink: createFakeAgentLink() },
  );
  const url = `/files?path=${encodeURIComponent("/home/user/a.txt")}&username=user&signature=${encodeURIComponent(signature)}&signature_expiration=${expiration}`;
  assert.deepEqual(router.match(request(url, {})), { sandboxId: "isigned", port: 49983 });
  assert.equal(router.match(request(url, {}, "POST")), undefined, "a read signature does not authorise a write");
  assert.equal(router.match(request(url.replace("isigned", "x").replace(/signature=[^&]+/, "signature=v1_nope"), {})), undefined);
});

test("a /files request with only X-Access-Token (SDKs before 2.14) goes to the sandbox with that token, and only that", () => {
  const router = new SandboxRouter(
    source([
      { sandboxId: "iother", envdAccessToken: "another-token", state: "running" },
      { sandboxId: "iowner", envdAccessToken: "owner-token", state: "running" },
      { sandboxId: "ipaused", envdAccessToken: "paused-token", state: "paused" },
      { sandboxId: "iopen", envdAccessToken: undefined, state: "running" },
    ]),
    "cubicle.local",
    { agentLink: createFakeAgentLink() },
  );
  const url = `/files?path=${encodeURIComponent("/home/user/a.txt")}&username=user`;
  assert.deepEqual(router.match(request(url, { "x-access-token": "owner-token" })), { sandboxId: "iowner", port: 49983 });
  assert.deepEqual(router.match(request("/files", { "x-access-token": "owner-token" }, "POST")), { sandboxId: "iowner", port: 49983 });
  for (const token of ["owner-toke", "owner-token2", "", "paused-token"]) {
    assert.equal(router.match(request(url, { "x-access-token": token })), undefined, `token ${JSON.stringify(token)} routes nowhere`);
  }
  assert.equal(router.match(request("/filesystem", { "x-access-token": "owner-token" })), undefined, "only /files");
  assert.equal(router.match(request("/v2/sandboxes", { "x-access-token": "owner-token" })), undefined, "API calls stay with the API");
});

test("an ended sandbox's open connections are destroyed", () => {
  const src = source([{ sandboxId: "ia", envdAccessToken: undefined, state: "running" }]);
  const router = new SandboxRouter(src, "cubicle.local", { agentLink: createFakeAgentLink() });
  let destroyed = 0;
  (router as unknown as { track(id: string, h: { destroy(): void }): () => void }).track("ia", { destroy: () => destroyed++ });
  src.emit("ended", "ia");
  assert.equal(destroyed, 1);
});
