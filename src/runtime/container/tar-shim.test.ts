import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, openSync, closeSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { tarShimEnv, writeTarShim } from "./criu.js";

const repoRoot = path.join(import.meta.dirname, "..", "..", "..");
const builtShim = path.join(repoRoot, "dist", "tar-shim");

/** Runs `tar args` as CRIU does: stdin and stdout are image files. */
function runAsCriu(shim: string, args: string[], io: { stdin?: string; stdout?: string }): void {
  const stdin = io.stdin ? openSync(io.stdin, "r") : "ignore";
  const stdout = io.stdout ? openSync(io.stdout, "w") : "ignore";
  try {
    execFileSync(shim, args, { stdio: [stdin, stdout, "pipe"], env: { PATH: "/usr/bin:/bin", ...tarShimEnv("/usr/bin/tar") } });
  } finally {
    if (typeof stdin === "number") closeSync(stdin);
    if (typeof stdout === "number") closeSync(stdout);
  }
}

// The arguments CRIU 4.2 gives tar for a tmpfs mount (mount.c), with --gzip it cannot leave out.
const dumpArgs = (dir: string) => ["--create", "--gzip", "--no-unquote", "--no-wildcards", "--one-file-system", "--check-links", "--preserve-permissions", "--sparse", "--numeric-owner", "--directory", dir, "."];
const restoreArgs = (dir: string) => ["--extract", "--gzip", "--no-unquote", "--no-wildcards", "--directory", dir];

describe("CRIU's tar shim (TAR_SHIM_NOTE)", () => {
  let work: string;
  before(async () => {
    work = await mkdtemp(path.join(os.tmpdir(), "cubicle-tar-shim-"));
    await mkdir(path.join(work, "source", "sub"), { recursive: true });
    await writeFile(path.join(work, "source", "sub", "note"), "kept\n");
  });
  after(() => rm(work, { recursive: true, force: true }));

  it("is built (scripts/build.mjs, gcc is a host package)", () => assert.ok(existsSync(builtShim), builtShim));

  for (const kind of ["static", "shell"] as const) {
    it(`${kind}: archives without gzip and restores both its own archives and gzip ones made before the shim`, async () => {
      const dir = path.join(work, kind);
      await writeTarShim(dir, "/usr/bin/tar", kind === "static" ? builtShim : undefined);
      const shim = path.join(dir, "tar");
      assert.equal((await readFile(shim)).subarray(0, 2).toString() === "#!", kind === "shell");

      const image = path.join(work, `${kind}.tar.gz.img`);
      runAsCriu(shim, dumpArgs(path.join(work, "source")), { stdout: image });
      const header = await readFile(image);
      assert.notDeepEqual([...header.subarray(0, 2)], [0x1f, 0x8b], "no gzip magic: the shim dropped --gzip");

      const oldImage = path.join(work, `${kind}-old.tar.gz.img`);
      execFileSync("/usr/bin/tar", ["--create", "--gzip", "--file", oldImage, "--directory", path.join(work, "source"), "."]);
      for (const source of [image, oldImage]) {
        const target = path.join(work, `${kind}-restored-${path.basename(source)}`);
        await mkdir(target);
        runAsCriu(shim, restoreArgs(target), { stdin: source });
        assert.equal(await readFile(path.join(target, "sub", "note"), "utf8"), "kept\n");
      }
    });
  }
});
