import assert from "node:assert/strict";
import { test } from "node:test";
import { AddressPool } from "./address-pool.js";

test("hands out /30 blocks with the host on .1 and the sandbox on .2", () => {
  const pool = new AddressPool("10.88.0.0/16");
  assert.deepEqual(pool.allocate(), { blockIndex: 0, hostAddress: "10.88.0.1", sandboxAddress: "10.88.0.2", prefixLength: 30 });
  assert.deepEqual(pool.allocate(), { blockIndex: 1, hostAddress: "10.88.0.5", sandboxAddress: "10.88.0.6", prefixLength: 30 });
  assert.equal(pool.block(16383).sandboxAddress, "10.88.255.254");
});

test("reuses a freed block only after the others (round robin)", () => {
  const pool = new AddressPool("192.168.7.0/28");
  const blocks = [pool.allocate(), pool.allocate()];
  pool.release(blocks[0]!.blockIndex);
  assert.equal(pool.allocate().blockIndex, 2);
  assert.equal(pool.allocate().blockIndex, 3);
  assert.equal(pool.allocate().blockIndex, 0);
  assert.throws(() => pool.allocate(), /all 4 sandbox addresses/);
});

test("claims an adopted address so it is not handed out again", () => {
  const pool = new AddressPool("10.1.2.0/29");
  assert.equal(pool.claim("10.1.2.2"), 0);
  assert.equal(pool.allocate().sandboxAddress, "10.1.2.6");
  assert.throws(() => pool.claim("10.1.2.1"), /not a sandbox address/);
  assert.throws(() => pool.claim("10.1.3.2"), /not a sandbox address/);
});

test("normalizes the CIDR and rejects nonsense", () => {
  assert.equal(new AddressPool("10.88.3.7/16").normalizedCidr, "10.88.0.0/16");
  assert.throws(() => new AddressPool("10.88.0.0/31"), /CUBICLE_SUBNET/);
  assert.throws(() => new AddressPool("banana"), /CUBICLE_SUBNET/);
});
