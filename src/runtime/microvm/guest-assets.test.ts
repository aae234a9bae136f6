import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { runCommand } from "../../shared/exec.js";
import { GUEST_INIT_SCRIPT, GUEST_MODULES, guestAgentCommand, launchScript, prepareGuestAssets, shellQuote } from "./guest-assets.js";
import { guestSkipReason, localKernelDeb } from "./test-helpers.js";

const nasty = ["plain", "with space", "it's", "'", "$(touch /tmp/cbm-pwned)", "`id`", "a\nb", "back\\slash", "", "*", "--"];

test("the launch file gives busybox sh exactly the words it was given, expanding nothing", async () => {
  const env = { PATH: "/usr/bin:/bin", CUBICLE_TEMPLATE_ENV: JSON.stringify({ A: "it's $HOME" }), ODD: nasty.join("|") };
  const script = launchScript(env, ["/.cubicle/init", "-g", "--", ...nasty]);
  // Print each positional parameter NUL-terminated, as the init's `exec env -i "$@"` would pass them.
  const { stdout } = await runCommand(["/bin/busybox", "sh", "-c", `${script}\nfor word in "$@"; do printf '%s\\0' "$word"; done`]);
  const words = stdout.split("\0").slice(0, -1);
  assert.deepEqual(words, [
    "PATH=/usr/bin:/bin",
    `CUBICLE_TEMPLATE_ENV=${env.CUBICLE_TEMPLATE_ENV}`,
    `ODD=${env.ODD}`,
    "/bin/busybox",
    "switch_root",
    "/newroot",
    "/.cubicle/init",
    "-g",
    "--",
    ...nasty,
  ]);
  await assert.rejects(stat("/tmp/cbm-pwned"));
});

test("the launch file mounts each share with share TAG TARGET before the words, its path never expanded", async () => {
  const target = "/mnt/$(touch /tmp/cbm-pwned) it's";
  const script = launchScript({ A: "1" }, ["/x"], [{ tag: "volume-0", target: "/mnt/data" }, { tag: "codebase-0", target }]);
  const { stdout } = await runCommand(["/bin/busybox", "sh", "-c", `share() { printf '%s|%s\\0' "$1" "$2"; }\n${script}\nprintf 'then:%s\\0' "$@"`]);
  assert.deepEqual(stdout.split("\0").slice(0, -1), ["volume-0|/mnt/data", `codebase-0|${target}`, "then:A=1", "then:/bin/busybox", "then:switch_root", "then:/newroot", "then:/x"]);
  await assert.rejects(stat("/tmp/cbm-pwned"));
  assert.throws(() => launchScript({}, ["/x"], [{ tag: "volume-0", target: "relative" }]), /absolute/);
  assert.throws(() => launchScript({}, ["/x"], [{ tag: "bad tag", target: "/a" }]), /share tag/);
});

test("refuses environment names a shell word cannot carry, and NUL bytes", () => {
  assert.throws(() => launchScript({ "A B": "x" }, ["/x"]), /not valid in a microVM/);
  assert.throws(() => launchScript({ "A=B": "x" }, ["/x"]), /not valid/);
  assert.throws(() => shellQuote("a\0b"), /NUL/);
});

test("the guest runs the kit's command without sandbox-boot", () => {
  const loader = ["/.cubicle/lib/ld-linux-x86-64.so.2", "--library-path", "/.cubicle/lib", "/.cubicle/node", "/.cubicle/agent.js"];
  assert.deepEqual(guestAgentCommand(["/.cubicle/boot", "--", "/.cubicle/init", "-g", "--", ...loader]), ["/.cubicle/init", "-g", "--", ...loader]);
  assert.deepEqual(guestAgentCommand(["/.cubicle/boot", "--merge-memory", "--", ...loader]), loader);
  assert.deepEqual(guestAgentCommand(loader), loader);
});

test("the init script is valid busybox sh", async () => {
  const result = await runCommand(["/bin/busybox", "sh", "-n", "-c", GUEST_INIT_SCRIPT], { allowFailure: true });
  assert.equal(result.exitCode, 0, result.stderr);
});

test("prepares the kernel and an initramfs with busybox, the init and the modules, once", async (t) => {
  const reason = await guestSkipReason();
  if (reason) return t.skip(reason);
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-assets-"));
  try {
    const started = performance.now();
    const assets = await prepareGuestAssets(dir, { kernelDeb: await localKernelDeb() });
    const firstMs = performance.now() - started;
    assert.match(assets.kernelRelease, /^\d+\.\d+\.\d+-\d+-cloud-amd64$/);
    assert.ok((await stat(assets.kernel)).size > 1_000_000);
    const listing = (await runCommand(["/bin/busybox", "sh", "-c", `/bin/busybox cpio -t < "$1"`, "sh", assets.initramfs])).stdout.split("\n");
    for (const name of ["init", "bin/busybox", "dev/console", ...GUEST_MODULES.map((m) => `lib/modules/${path.basename(m)}`)]) assert.ok(listing.includes(name), `${name} in the initramfs`);
    const again = performance.now();
    assert.deepEqual(await prepareGuestAssets(dir), assets);
    const secondMs = performance.now() - again;
    assert.ok(secondMs < firstMs, "the second call uses the cache");
    console.log(`guest assets: first ${Math.round(firstMs)} ms, cached ${secondMs.toFixed(1)} ms; kernel ${assets.kernelVersion}`);
    assert.ok((await readFile(assets.initramfs)).subarray(0, 6).equals(Buffer.from("070701")));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
