import assert from "node:assert/strict";
import { test } from "node:test";
import { parseLdd } from "./agent-kit.js";

test("reads libraries and the loader from ldd output, skipping the vDSO", () => {
  const { libraries, loader } = parseLdd(
    [
      "\tlinux-vdso.so.1 (0x00007ffc4a5f2000)",
      "\tlibstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x00007f873c000000)",
      "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f873be1e000)",
      "\t/lib64/ld-linux-x86-64.so.2 (0x00007f873c3a3000)",
    ].join("\n"),
  );
  assert.deepEqual([...libraries], [
    ["libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6"],
    ["libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"],
  ]);
  assert.equal(loader, "/lib64/ld-linux-x86-64.so.2");
});

test("refuses a binary with a missing library", () => {
  assert.throws(() => parseLdd("\tlibfoo.so.1 => not found\n"), /libfoo\.so\.1 => not found/);
});
