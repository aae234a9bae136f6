import assert from "node:assert/strict";
import { test } from "node:test";
import { defaultGateway } from "./resolver-config.js";

test("the default gateway is read from /proc/net/route's little-endian hex", () => {
  const table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n" + "eth0\t00000000\t0100580A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n" + "eth0\t0000580A\t00000000\t0001\t0\t0\t0\tFCFFFFFF\t0\t0\t0\n";
  assert.equal(defaultGateway(table), "10.88.0.1");
  assert.equal(defaultGateway("Iface\tDestination\n"), undefined);
  assert.equal(defaultGateway("header\neth0\t00000000\tzz\n"), undefined);
});
