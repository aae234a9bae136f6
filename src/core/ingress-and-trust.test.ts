import assert from "node:assert/strict";
import { test } from "node:test";
import { createRequest, lastInit, withFakeManager } from "./test-fakes.js";

const PEM = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

test("every agent gets Cubicle's CA in its /init when the manager has one", async () => {
  await withFakeManager({ caCertificates: PEM }, async (f) => {
    const record = await f.manager.create(createRequest());
    assert.equal(lastInit(f.agent, record.network!.sandboxAddress)?.caCertificates, PEM);
  });
  await withFakeManager({}, async (f) => {
    const record = await f.manager.create(createRequest());
    assert.equal(lastInit(f.agent, record.network!.sandboxAddress)?.caCertificates, undefined, "none without a CA");
  });
});

test("the router's route carries the sandbox's maskRequestHost, and no token for a public sandbox", async () => {
  await withFakeManager({}, async (f) => {
    const masked = await f.manager.create(createRequest({ networkConfig: { maskRequestHost: "localhost:${PORT}" } }));
    assert.deepEqual(f.manager.routeTarget(masked.sandboxId), { sandboxId: masked.sandboxId, address: masked.network!.sandboxAddress, maskRequestHost: "localhost:${PORT}" });
    const plain = await f.manager.create(createRequest({ networkConfig: { maskRequestHost: 42 } }));
    assert.deepEqual(f.manager.routeTarget(plain.sandboxId), { sandboxId: plain.sandboxId, address: plain.network!.sandboxAddress });
  });
});
