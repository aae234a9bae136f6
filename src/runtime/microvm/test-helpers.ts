/** What the microVM tests share: the guest kernel package they unpack, skip reasons. */
import type { SandboxNetwork } from "../../network/types.js";
import { existsSync } from "node:fs";
import path from "node:path";
import { runCommand } from "../../shared/exec.js";
import { findCachedKernelDeb, GUEST_KERNEL_PACKAGE } from "./guest-assets.js";
import { hasQemu } from "./qemu.js";

/**
 * A local copy of the guest kernel package: tests never download (their traffic stays on this
 * machine). CUBICLE_GUEST_KERNEL_DEB, else apt's cache (`apt-get install --download-only
 * linux-image-…` or a copy of an `apt-get download`).
 */
export async function localKernelDeb(): Promise<string | undefined> {
  const fromEnv = process.env.CUBICLE_GUEST_KERNEL_DEB;
  if (fromEnv && existsSync(fromEnv)) return fromEnv;
  return findCachedKernelDeb(GUEST_KERNEL_PACKAGE);
}

/** Why a test that boots a guest cannot run here, or undefined when it can. */
export async function guestSkipReason(): Promise<string | undefined> {
  if (!hasQemu()) return "qemu-system-x86_64 is not installed (scripts/setup-host.sh installs qemu-system-x86)";
  if (!hasQemu("qemu-img")) return "qemu-img is not installed (scripts/setup-host.sh installs qemu-utils)";
  if (!(await localKernelDeb())) return `no local ${GUEST_KERNEL_PACKAGE} package: set CUBICLE_GUEST_KERNEL_DEB or put it in /var/cache/apt/archives (apt-get download ${GUEST_KERNEL_PACKAGE})`;
  return undefined;
}

/** A sandbox-like network made by the sandbox helper's net-setup, as the network manager makes it. */
export type TestSandboxNetwork = SandboxNetwork;

/** The sandbox helper the build made (`node scripts/build.mjs`), or undefined before a build. */
export function builtHelper(): string | undefined {
  const file = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../../dist/sandbox-helper");
  return existsSync(file) ? file : undefined;
}

/**
 * Makes a netns `cbm-<suffix>-<pid>` with a veth pair (host end `cbm<suffix><pid>` in this
 * netns holding .1 of a /30 of 10.<second>.<pid % 250>.0, eth0 inside holding .2), through the
 * helper's net-setup: what the network manager does for a sandbox.
 */
export async function makeTestNetwork(suffix: string, secondOctet: number, hostOctet = 1): Promise<TestSandboxNetwork> {
  const helper = builtHelper();
  if (!helper) throw new Error("dist/sandbox-helper is missing: run `node scripts/build.mjs` first");
  const block = `10.${secondOctet}.${process.pid % 250}`;
  const network = {
    netnsName: `cbm-${suffix}-${process.pid}`,
    netnsPath: `/var/run/netns/cbm-${suffix}-${process.pid}`,
    hostInterface: `cbm${suffix}${process.pid}`.slice(0, 15),
    hostAddress: `${block}.${hostOctet}`,
    sandboxAddress: `${block}.${hostOctet + 1}`,
    prefixLength: 30,
  };
  await runCommand([helper, "net-setup", "--name", network.netnsName, "--host-if", network.hostInterface, "--host-addr", network.hostAddress, "--sandbox-addr", network.sandboxAddress, "--prefix", "30"]);
  return network;
}

export async function releaseTestNetwork(network: TestSandboxNetwork): Promise<void> {
  const helper = builtHelper();
  if (helper) await runCommand([helper, "net-release", "--name", network.netnsName, "--host-if", network.hostInterface], { allowFailure: true });
}
