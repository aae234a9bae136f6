import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, readdir, readFile, readlink, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { runInSandbox } from "../../protocol/agent-exec.js";
import { runCommand } from "../../shared/exec.js";
import { baseRecipe } from "../../template/recipe.js";
import { assembleAgentKit, kitSourcesIn } from "../container/agent-kit.js";
import { waitForAgentHealth } from "../container/test-helpers.js";
import { createOverlay, kitDiskImage, removeOverlay, templateDiskImage } from "./disk-images.js";
import { agentLaunchFile, prepareGuestAssets } from "./guest-assets.js";
import { attachGuestNetwork, releaseGuestNetwork } from "./net.js";
import { guestStateChannel, MICROVM_UID_START, prepareGuestChroot, startMicrovm, type Microvm, type MicrovmConfig } from "./qemu.js";
import { qemuInstall, sharesRamImages } from "./qemu-install.js";
import { builtHelper, guestSkipReason, localKernelDeb, makeTestNetwork, releaseTestNetwork, type TestSandboxNetwork } from "./test-helpers.js";

const repo = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../..");
const dist = path.join(repo, "dist");
const templateDir = process.env.CUBICLE_MICROVM_TEMPLATE ?? "/var/lib/cubicle/templates/base";
/** Boots to measure (p50 printed); 1 by default: a TCG boot costs seconds of both cores. */
const boots = Math.max(1, Number(process.env.CUBICLE_MICROVM_BOOTS ?? 1));
const guestNames = { tapName: "cbmtap0", tableName: "cbm_guest" };

async function skipReason(): Promise<string | undefined> {
  const reason = await guestSkipReason();
  if (reason) return reason;
  if (!builtHelper() || !existsSync(path.join(dist, "agent", "agent.js"))) return "dist/ is not built: run `node scripts/build.mjs` first";
  if (!existsSync(path.join(templateDir, "rootfs"))) return `no template tree at ${templateDir}/rootfs (start the server once to bootstrap base)`;
  return undefined;
}

const timed = async <T>(what: string, step: () => Promise<T>): Promise<T> => {
  const started = performance.now();
  const result = await step();
  console.log(`${what}: ${Math.round(performance.now() - started)} ms`);
  return result;
};

test("boots the base template in a microVM under TCG: the agent answers on the sandbox address and runs a command", { timeout: 15 * 60_000 }, async (t) => {
  const reason = await skipReason();
  if (reason) return t.skip(reason);
  const stateDir = await mkdtemp(path.join(os.tmpdir(), "cbm-mvm-"));
  const cacheDir = path.join(stateDir, "microvm");
  let network: TestSandboxNetwork | undefined;
  let vm: Microvm | undefined;
  try {
    const assets = await timed("guest kernel + initramfs (once)", async () => prepareGuestAssets(path.join(cacheDir, "assets"), { kernelDeb: await localKernelDeb() }));
    const kit = await assembleAgentKit(path.join(stateDir, "kit"), kitSourcesIn(dist));
    const kitImage = await kitDiskImage(kit.dir, cacheDir);
    console.log(`kit image (once): ${kitImage.buildMs} ms, ${kitImage.sizeBytes >> 20} MiB`);
    const baseImage = await templateDiskImage(path.join(templateDir, "rootfs"), cacheDir);
    console.log(`base template image (once): ${baseImage.buildMs} ms, ${baseImage.sizeBytes >> 20} MiB`);
    // The base recipe's env, as the store's record of the template carries it.
    const template = { env: baseRecipe.env };

    network = await makeTestNetwork("v", 217);
    const sandboxId = `cbm${process.pid}`;
    const guestNetwork = await attachGuestNetwork(network, guestNames);
    const launchFile = path.join(stateDir, "launch");
    await writeFile(launchFile, agentLaunchFile({ sandboxId, templateEnv: template.env ?? {}, kitCommand: kit.command }), { mode: 0o600 });
    const overlay = path.join(stateDir, "sandboxes", sandboxId, "root.qcow2");
    const chrootDir = path.join(stateDir, "sandboxes", sandboxId, "chroot");
    const guestUid = MICROVM_UID_START + 42;
    const ramFiles = sharesRamImages(qemuInstall());
    const ramFile = path.join(stateDir, "guest.ram");
    let channel = guestStateChannel(chrootDir);
    const guestConfig: MicrovmConfig = {
      accel: "tcg",
      assets,
      memoryMiB: 512,
      cpuCount: 1,
      rootDisk: overlay,
      kitDisk: kitImage.path,
      network: guestNetwork,
      hostname: "cbm-guest",
      launchFile,
      runDir: path.join(stateDir, "sandboxes", sandboxId, "run"),
      netnsPath: network.netnsPath,
      confine: { uid: guestUid, gid: guestUid, chrootDir },
      // MICROVM_RAM_NOTE: the guest's RAM a file of its own, mapped shared (QEMU 8.2+).
      ...(ramFiles ? { ram: { file: ramFile, mode: "shared" as const } } : {}),
    };

    const bootMs: number[] = [];
    for (let boot = 0; boot < boots; boot++) {
      await removeOverlay(overlay);
      await createOverlay(baseImage.path, overlay);
      channel = await prepareGuestChroot(chrootDir, overlay, guestUid);
      const started = performance.now();
      vm = await startMicrovm(guestConfig);
      const spawnedMs = performance.now() - started;
      // Confined once started (QEMU_CONFINE_NOTE): its own ids, no capability, the filter, the chroot.
      const status = await readFile(`/proc/${vm.pid}/status`, "utf8");
      const field = (name: string) => new RegExp(`^${name}:\\s+(.*)$`, "m").exec(status)?.[1]?.trim();
      assert.equal(field("Uid"), `${guestUid}\t${guestUid}\t${guestUid}\t${guestUid}`);
      assert.equal(field("Gid"), `${guestUid}\t${guestUid}\t${guestUid}\t${guestUid}`);
      assert.equal(field("CapEff"), "0000000000000000");
      assert.equal(field("CapPrm"), "0000000000000000");
      assert.equal(field("NoNewPrivs"), "1");
      assert.equal(field("Seccomp"), "2");
      assert.equal(await readlink(`/proc/${vm.pid}/root`), chrootDir);
      await waitForAgentHealth(network.sandboxAddress, 60_000).catch(async (err) => {
        throw new Error(`the agent did not answer: ${(err as Error).message}\n--- console ---\n${await vm!.consoleTail()}`);
      });
      bootMs.push(performance.now() - started);
      console.log(`boot ${boot + 1}: QEMU started in ${Math.round(spawnedMs)} ms, agent healthy after ${Math.round(bootMs[boot]!)} ms`);
      assert.equal(await vm.status(), "running");

      if (boot === boots - 1) {
        let output = "";
        const result = await runInSandbox(network.sandboxAddress, {
          argv: ["/bin/sh", "-c", "echo hello from $(hostname); uname -r; id -un; cat /proc/1/comm; ls /.cubicle/agent.js; touch /root-is-writable && echo ok"],
          user: "root",
          timeoutMs: 60_000,
          onOutput: (_stream, text) => (output += text),
        });
        assert.equal(result.exitCode, 0, output);
        assert.deepEqual(output.trim().split("\n"), ["hello from cbm-guest", assets.kernelRelease, "root", "init", "/.cubicle/agent.js", "ok"]);
        await new Promise((resolve) => setTimeout(resolve, 3000));
        console.log(`QEMU RSS, idle guest with 512 MiB after the agent answered: ${Math.round((await vm.rssBytes()) / (1 << 20))} MiB`);
        await vm.pause();
        assert.equal(await vm.status(), "paused");
        await vm.resume();
        assert.equal(await vm.status(), "running");

        // MICROVM_STATE_NOTE: the state saved through the chroot's channel, loaded into a new QEMU.
        const inGuest = async (command: string) => {
          let text = "";
          const run = await runInSandbox(network!.sandboxAddress, { argv: ["/bin/sh", "-c", command], user: "root", timeoutMs: 60_000, onOutput: (_stream, chunk) => (text += chunk) });
          assert.equal(run.exitCode, 0, text);
          return text.trim();
        };
        await inGuest("echo only-in-guest-ram > /dev/shm/marker; sync");
        const bootId = await inGuest("cat /proc/sys/kernel/random/boot_id");
        await vm.pause();
        const stateFile = path.join(stateDir, "state");
        const bytes = await timed("save state", () => vm!.saveState(stateFile, channel, { withoutSharedRam: ramFiles }));
        assert.equal((await stat(stateFile)).size, bytes);
        console.log(`saved state of a 512 MiB guest: ${(bytes / (1 << 20)).toFixed(1)} MiB${ramFiles ? " (devices only: the RAM is its file)" : ""}`);
        if (ramFiles) assert.ok(bytes < 8 << 20, `the stream holds no RAM (${bytes} bytes)`);
        assert.equal(await vm.status(), "postmigrate");
        assert.deepEqual(await readdir(channel.hostDir), [], "the channel's socket is gone");
        const channelInfo = await stat(channel.hostDir);
        assert.equal(channelInfo.uid, 0, "the channel is root's: a guest's QEMU cannot swap what is in it");
        assert.equal(channelInfo.mode & 0o777, 0o711);
        // The RAM image: the guest's RAM file copied while its vCPUs are stopped.
        const ramImage = path.join(stateDir, "ram-image");
        if (ramFiles) await timed("copy the RAM file", () => runCommand(["cp", "--sparse=always", ramFile, ramImage]));
        await vm.quit();
        const imageHash = ramFiles ? await sha256(ramImage) : "";
        channel = await prepareGuestChroot(chrootDir, overlay, guestUid, { incoming: true });
        vm = await startMicrovm({ ...guestConfig, incoming: true, ...(ramFiles ? { ram: { file: ramImage, mode: "image" as const } } : {}) });
        assert.equal(await vm.status(), "inmigrate");
        await timed("load state", () => vm!.loadState(stateFile, channel, { withoutSharedRam: ramFiles }));
        assert.equal(await vm.status(), "paused");
        assert.deepEqual(await readdir(channel.hostDir), [], "the load's own directory is gone");
        await vm.resume();
        await waitForAgentHealth(network.sandboxAddress, 30_000);
        assert.equal(await inGuest("cat /dev/shm/marker"), "only-in-guest-ram", "the guest's RAM came back");
        assert.equal(await inGuest("cat /proc/sys/kernel/random/boot_id"), bootId, "the same boot: nothing rebooted");
        if (ramFiles) {
          // Copy-on-write: the guest writes 64 MiB of RAM, and the image it maps does not change;
          // QEMU holds the image open read-only and maps it private.
          await inGuest("head -c 67108864 /dev/urandom > /dev/shm/noise");
          assert.equal(await sha256(ramImage), imageHash, "the guest's writes never reach the RAM image");
          const maps = await readFile(`/proc/${vm.pid}/maps`, "utf8");
          const mapping = maps.split("\n").find((line) => line.endsWith(ramImage));
          assert.match(mapping ?? "", /^\S+ rw-p /, `the RAM image is mapped private: ${mapping}`);
          const fds = await readdir(`/proc/${vm.pid}/fd`);
          const imageFds = [];
          for (const fd of fds) if ((await readlink(`/proc/${vm.pid}/fd/${fd}`).catch(() => "")) === ramImage) imageFds.push(fd);
          for (const fd of imageFds) {
            const flags = Number.parseInt(/^flags:\s+(\d+)/m.exec(await readFile(`/proc/${vm.pid}/fdinfo/${fd}`, "utf8"))?.[1] ?? "2", 8);
            assert.equal(flags & 3, 0, "opened O_RDONLY");
          }
          // A guest with private RAM saves it in its stream; loaded into a shared file again, it runs on.
          await vm.pause();
          const streamBytes = await vm.saveState(stateFile, channel);
          assert.ok(streamBytes > 32 << 20, `the stream holds the RAM (${streamBytes} bytes)`);
          await vm.quit();
          await rm(ramFile, { force: true });
          channel = await prepareGuestChroot(chrootDir, overlay, guestUid, { incoming: true });
          vm = await startMicrovm({ ...guestConfig, incoming: true });
          await vm.loadState(stateFile, channel);
          await vm.resume();
          await waitForAgentHealth(network.sandboxAddress, 30_000);
          assert.equal(await inGuest("cat /dev/shm/marker; test -s /dev/shm/noise && echo noise-kept"), "only-in-guest-ram\nnoise-kept");
        }
        // A broken stream makes the loading QEMU fail, and says so.
        await vm.quit();
        await writeFile(stateFile, "not a migration stream");
        channel = await prepareGuestChroot(chrootDir, overlay, guestUid, { incoming: true });
        vm = await startMicrovm({ ...guestConfig, incoming: true });
        await assert.rejects(vm.loadState(stateFile, channel, { timeoutMs: 20_000 }), /QEMU|state/);
      }
      await vm.quit();
      assert.equal(existsSync(`/proc/${vm.pid}`), false, "QEMU has ended");
      vm = undefined;
    }
    const sorted = [...bootMs].sort((a, b) => a - b);
    console.log(`QEMU spawn -> agent health (TCG, ${boots} boot(s)): p50 ${Math.round(sorted[Math.floor((sorted.length - 1) / 2)]!)} ms, all ${bootMs.map(Math.round).join(", ")}`);
  } finally {
    if (vm) await vm.quit(2000).catch(() => vm!.kill());
    if (network) {
      await releaseGuestNetwork(network.netnsPath, guestNames);
      await releaseTestNetwork(network);
    }
    await rm(stateDir, { recursive: true, force: true });
  }
});

async function sha256(file: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest("hex");
}
