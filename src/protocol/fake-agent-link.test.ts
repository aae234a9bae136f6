import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { AgentLink } from "./agent-link.js";
import { createFakeAgentLink } from "./fake-agent-link.js";

describe("FakeAgentLink", () => {
  it("records calls and fails the methods it is told to", async () => {
    const fake = createFakeAgentLink({ warmUp: new Error("cold"), isHealthy: (call) => (call.address === "10.0.0.3" ? new Error("down") : undefined) });
    const link: AgentLink = fake;
    await link.init("10.0.0.2", { defaultUser: "user" }, { currentToken: "t" });
    await assert.rejects(link.warmUp("10.0.0.2", "user"), /cold/);
    assert.equal(await link.isHealthy("10.0.0.2"), true);
    assert.equal(await link.isHealthy("10.0.0.3"), false);
    assert.deepEqual(fake.callsOf("init"), [{ method: "init", address: "10.0.0.2", body: { defaultUser: "user" }, options: { currentToken: "t" } }]);
    assert.deepEqual(fake.calls.map((call) => call.method), ["init", "warmUp", "isHealthy", "isHealthy"]);
    link.httpAgent.destroy();
  });
});
