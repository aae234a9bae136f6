import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { CubicleError } from "../../shared/cubicle-error.js";
import type { SandboxSpec } from "../types.js";
import { MicrovmRuntime } from "./microvm-runtime.js";
import { guestSkipReason, localKernelDeb } from "./test-helpers.js";

const dist = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../../dist");

const refused = (code: string, pattern: RegExp) => (error: unknown) => error instanceof CubicleError && error.code === code && pattern.test(error.message);

/** A spec whose network is never reached: every restore below is refused before it. */
function spec(sandboxId: string): SandboxSpec {
  return {
    sandboxId,
    hostname: sandboxId,
    template: { templateId: "base", rootfsDir: "/nonexistent", defaultUser: "user", defaultWorkdir: "/home/user", env: {} },
    resources: { cpuCount: 1, memoryMiB: 512, diskMiB: 1024, pidsLimit: 100 },
    network: { netnsName: "none", netnsPath: "/nonexistent", hostInterface: "none", hostAddress: "10.0.0.1", sandboxAddress: "10.0.0.2", prefixLength: 30 },
  };
}

test("images a microVM runtime cannot restore are refused with a clear 4xx, before any QEMU starts (MICROVM_IMAGE_NOTE)", async (t) => {
  const reason = (await guestSkipReason()) ?? (existsSync(path.join(dist, "agent", "agent.js")) ? undefined : "dist/ is not built: run `node scripts/build.mjs`");
  if (reason) return t.skip(reason);
  const stateDir = await mkdtemp(path.join(os.tmpdir(), "cbm-rt-"));
  let runtime: MicrovmRuntime | undefined;
  try {
    runtime = new MicrovmRuntime({ stateDir, runDir: path.join(stateDir, "run"), distDir: dist, accel: "tcg", kernelDeb: await localKernelDeb() });
    await runtime.init();
    const image = async (name: string, meta: unknown) => {
      const dir = path.join(stateDir, "microvm", "images", "snapshots", name);
      await mkdir(dir, { recursive: true });
      await writeFile(path.join(dir, "meta.json"), typeof meta === "string" ? meta : JSON.stringify(meta));
      return `snapshot/${name}`;
    };
    const fingerprint = runtime.memoryImageFingerprint()!;
    assert.match(fingerprint, /^kit-[0-9a-f]+\.ext4\+.+\+[12]$/);
    const devices = Number(fingerprint.split("+")[2]);
    const good = { runtime: "microvm", memory: true, createdAt: new Date().toISOString(), sizeBytes: 1, memoryMiB: 512, cpuCount: 1, diskBytes: 1 << 30, devices };
    const kitImage = path.join(stateDir, "microvm", fingerprint.split("+")[0]!);
    const kernelVersion = fingerprint.split("+")[1]!;

    await assert.rejects(runtime.restore(spec("a"), "snapshot/none"), refused("not_found", /does not exist/));
    await assert.rejects(runtime.restore(spec("a"), await image("other", { ...good, runtime: "container" })), refused("failed_precondition", /made by the container runtime/));
    await assert.rejects(runtime.restore(spec("a"), await image("kit", { ...good, kitImage: "/old/kit.ext4", kernelVersion })), refused("failed_precondition", /agent kit disk that is gone/));
    await assert.rejects(runtime.restore(spec("a"), await image("kernel", { ...good, kitImage, kernelVersion: "5.10.0-1" })), refused("failed_precondition", /another guest kernel or QEMU device set/));
    await assert.rejects(runtime.restore(spec("a"), await image("devices", { ...good, kitImage, kernelVersion, devices: 0 })), refused("failed_precondition", /QEMU device set/));
    await assert.rejects(runtime.restore(spec("a"), await image("base", { ...good, kitImage, kernelVersion, baseImage: "/gone/template.ext4" })), refused("failed_precondition", /template disk image that is gone/));
    await assert.rejects(runtime.restore(spec("a"), await image("notjson", "{")), (error: unknown) => error instanceof CubicleError && error.code !== "internal");
    await assert.rejects(runtime.restore({ ...spec("a"), volumes: [{ source: "/v", target: "/data" }] }, await image("mounts", { ...good, kitImage, kernelVersion })), refused("failed_precondition", /volumes or codebases/));
    // Files alone (MICROVM_FILES_NOTE): the kit and kernel do not matter (a fresh boot), the template's image does.
    await assert.rejects(runtime.restore(spec("a"), await image("files-base", { ...good, memory: false, kitImage: "/old/kit.ext4", kernelVersion: "5.10.0-1", baseImage: "/gone/template.ext4" })), refused("failed_precondition", /template disk image that is gone/));
    await assert.rejects(runtime.restore(spec("a"), await image("files-nobase", { ...good, memory: false, kitImage, kernelVersion })), refused("failed_precondition", /template disk image that is gone/));
    await assert.rejects(runtime.restore(spec("a"), await image("memory-kind", { ...good, memory: "yes", kitImage, kernelVersion })), refused("failed_precondition", /damaged/));
    // RAM images (MICROVM_RAM_NOTE): the field is a boolean, and the file it names must be there.
    await assert.rejects(runtime.restore(spec("a"), await image("ram-kind", { ...good, ramFile: "ram", kitImage, kernelVersion })), refused("failed_precondition", /damaged/));
    await assert.rejects(runtime.restore(spec("a"), await image("ram-missing", { ...good, ramFile: true, kitImage, kernelVersion })), refused("failed_precondition", /RAM file is missing/));
    // A converted image's device state (RAM_FILE_CONVERSION_NOTE) is `state.ram` or nothing, and only with a RAM file.
    await assert.rejects(runtime.restore(spec("a"), await image("state-path", { ...good, ramFile: true, stateFile: "../../../etc/shadow", kitImage, kernelVersion })), refused("failed_precondition", /damaged/));
    await assert.rejects(runtime.restore(spec("a"), await image("state-stream", { ...good, stateFile: "state.ram", kitImage, kernelVersion })), refused("failed_precondition", /damaged/));
    await assert.rejects(runtime.checkpoint("nosuch", { kind: "snapshot", name: "x" }, { memory: true, leaveRunning: true }), refused("not_found", /does not exist/));
    assert.deepEqual(await runtime.list(), [], "no guest was started");

    // What a conversion cut short left goes at the next start: before its swap the new files
    // (meta.json does not name them), after it the stream; what an image uses stays.
    const files = async (name: string, names: string[]) => {
      for (const file of names) await writeFile(path.join(stateDir, "microvm", "images", "snapshots", name, file), "x");
    };
    await image("cut-before", { ...good, kitImage, kernelVersion });
    await files("cut-before", ["state", "ram", "state.ram", "meta.json.new"]);
    await image("cut-after", { ...good, ramFile: true, stateFile: "state.ram", kitImage, kernelVersion });
    await files("cut-after", ["state", "ram", "state.ram"]);
    await image("ram-image", { ...good, ramFile: true, kitImage, kernelVersion });
    await files("ram-image", ["state", "ram"]);
    await new MicrovmRuntime({ stateDir, runDir: path.join(stateDir, "run"), distDir: dist, accel: "tcg", kernelDeb: await localKernelDeb() }).init();
    const left = (name: string) => ["state", "ram", "state.ram", "meta.json.new"].filter((file) => existsSync(path.join(stateDir, "microvm", "images", "snapshots", name, file)));
    assert.deepEqual(left("cut-before"), ["state"]);
    assert.deepEqual(left("cut-after"), ["ram", "state.ram"]);
    assert.deepEqual(left("ram-image"), ["state", "ram"]);
  } finally {
    await runtime?.releaseHostMounts().catch((err) => console.error("cleanup: unmounting", err));
    await rm(stateDir, { recursive: true, force: true });
  }
});
