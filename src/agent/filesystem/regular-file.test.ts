import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { fifoWithDelayedWriter, makeTempDir } from "./test-helpers.js";
import { openRegularFileForReading, openRegularFileForWriting, readRegularFileSync } from "./regular-file.js";

function isCode(code: string, message?: RegExp) {
  return (reason: unknown) => reason instanceof CubicleError && reason.code === code && (!message || message.test(reason.message));
}

test("the agent's own small files are read whole, but a FIFO, a device or an oversized file is refused without blocking", async () => {
  const directory = makeTempDir();
  const table = path.join(directory, "passwd");
  fs.writeFileSync(table, "root:x:0:0:root:/root:/bin/bash\n".repeat(100));
  assert.equal(readRegularFileSync(table, 1 << 20), "root:x:0:0:root:/root:/bin/bash\n".repeat(100));
  assert.throws(() => readRegularFileSync(table, 100), isCode("failed_precondition", /larger than 100 bytes/));

  const fifo = path.join(directory, "fifo");
  const release = await fifoWithDelayedWriter(fifo, 1500);
  try {
    const started = Date.now();
    assert.throws(() => readRegularFileSync(fifo, 1 << 20), isCode("failed_precondition", /named pipe/));
    assert.throws(() => openRegularFileForReading(fifo), isCode("invalid_argument", /named pipe/));
    assert.throws(() => openRegularFileForWriting(fifo), isCode("invalid_argument", /named pipe/));
    assert.ok(Date.now() - started < 1000, `took ${Date.now() - started} ms`);
  } finally {
    release();
  }
  assert.throws(() => readRegularFileSync("/dev/zero", 1 << 20), isCode("failed_precondition", /character device/));
  fs.rmSync(directory, { recursive: true });
});

test("a regular file opens for reading and for writing (created, or truncated) and reports its stats", () => {
  const directory = makeTempDir();
  const file = path.join(directory, "f");
  const written = openRegularFileForWriting(file);
  fs.writeSync(written.fd, "hello");
  fs.closeSync(written.fd);
  const read = openRegularFileForReading(file);
  assert.equal(read.stats.size, 5);
  assert.equal(fs.readFileSync(read.fd, "utf8"), "hello");
  fs.closeSync(read.fd);
  const truncated = openRegularFileForWriting(file);
  fs.closeSync(truncated.fd);
  assert.equal(fs.statSync(file).size, 0);
  assert.throws(() => openRegularFileForReading(directory), isCode("invalid_argument", /is a directory/));
  assert.throws(() => openRegularFileForWriting(directory), isCode("invalid_argument", /is a directory/));
  assert.throws(() => openRegularFileForReading(path.join(directory, "missing")), isCode("not_found"));
  fs.rmSync(directory, { recursive: true });
});
