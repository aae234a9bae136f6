import assert from "node:assert/strict";
import { mkdtemp, readFile, readlink, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { runCommand } from "../../shared/exec.js";
import { writeCpioNewc } from "./cpio.js";

test("busybox cpio unpacks what the writer made: directories, files with their modes and odd sizes, symlinks", async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-cpio-"));
  try {
    const odd = Buffer.from("x".repeat(4097));
    const archive = writeCpioNewc([
      { kind: "directory", name: "bin" },
      { kind: "directory", name: "lib/", mode: 0o700 },
      { kind: "file", name: "bin/tool", data: Buffer.from("#!/bin/sh\necho hi\n"), mode: 0o755 },
      { kind: "file", name: "lib/odd", data: odd },
      { kind: "file", name: "empty", data: Buffer.alloc(0) },
      { kind: "symlink", name: "bin/sh", target: "tool" },
    ]);
    assert.equal(archive.length % 4, 0);
    const file = path.join(dir, "archive.cpio");
    await writeFile(file, archive);
    const out = path.join(dir, "out");
    await runCommand(["mkdir", out]);
    await runCommand(["/bin/busybox", "sh", "-c", `cd "$1" && /bin/busybox cpio -i -d -m < "$2"`, "sh", out, file]);
    assert.equal(await readFile(path.join(out, "bin/tool"), "utf8"), "#!/bin/sh\necho hi\n");
    assert.equal((await stat(path.join(out, "bin/tool"))).mode & 0o777, 0o755);
    assert.equal((await stat(path.join(out, "lib"))).mode & 0o777, 0o700);
    assert.deepEqual(await readFile(path.join(out, "lib/odd")), odd);
    assert.equal((await stat(path.join(out, "empty"))).size, 0);
    assert.equal(await readlink(path.join(out, "bin/sh")), "tool");
    const listing = (await runCommand(["/bin/busybox", "sh", "-c", `/bin/busybox cpio -t < "$1"`, "sh", file])).stdout.split("\n").filter(Boolean);
    assert.deepEqual(listing, ["bin", "lib", "bin/tool", "lib/odd", "empty", "bin/sh"]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("refuses names that would leave the archive's root", () => {
  assert.throws(() => writeCpioNewc([{ kind: "file", name: "../etc/passwd", data: Buffer.alloc(1) }]), /bad entry name/);
  assert.throws(() => writeCpioNewc([{ kind: "directory", name: "" }]), /bad entry name/);
});
