import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { describe, it } from "node:test";
import { DELIMITER, JupyterSession, parseJupyterJson } from "./jupyter-wire.js";

describe("JupyterSession", () => {
  it("signs the four JSON frames with HMAC-SHA256 of the connection key", () => {
    const session = new JupyterSession("secret");
    const message = session.createMessage("execute_request", { code: "1+1" });
    const frames = session.serialize(message);
    assert.equal(frames[0]!.toString(), DELIMITER);
    const expected = createHmac("sha256", "secret");
    for (const frame of frames.slice(2)) expected.update(frame);
    assert.equal(frames[1]!.toString(), expected.digest("hex"));
    assert.deepEqual(JSON.parse(frames[5]!.toString()), { code: "1+1" });
    assert.equal(JSON.parse(frames[2]!.toString()).msg_type, "execute_request");
  });

  it("parses messages behind routing identities or an iopub topic", () => {
    const session = new JupyterSession("k");
    const parent = session.createMessage("execute_request", {});
    const reply = session.createMessage("stream", { name: "stdout", text: "hi" }, parent.header);
    const parsed = session.deserialize([Buffer.from("kernel.abc.stream"), ...session.serialize(reply)]);
    assert.equal(parsed.header.msg_type, "stream");
    assert.equal(parsed.parent_header.msg_id, parent.header.msg_id);
    assert.deepEqual(parsed.content, { name: "stdout", text: "hi" });
  });

  it("rejects a bad signature and a missing delimiter", () => {
    const session = new JupyterSession("k");
    const frames = session.serialize(session.createMessage("status", { execution_state: "idle" }));
    frames[1] = Buffer.from("0".repeat(64));
    assert.throws(() => session.deserialize(frames), /invalid signature/);
    assert.throws(() => session.deserialize([Buffer.from("x")]), /delimiter/);
  });

  it("accepts unsigned messages when the key is empty", () => {
    const session = new JupyterSession("");
    const frames = session.serialize(session.createMessage("status", {}));
    assert.equal(frames[1]!.toString(), "");
    assert.equal(session.deserialize(frames).header.msg_type, "status");
  });
});

describe("parseJupyterJson", () => {
  it("turns Python's NaN and Infinity into null, but not inside strings", () => {
    assert.deepEqual(parseJupyterJson('{"a": [1.5, NaN, -Infinity, Infinity], "s": "NaN"}'), { a: [1.5, null, null, null], s: "NaN" });
  });
});
