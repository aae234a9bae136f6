import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import type { SandboxNetwork } from "../../network/types.js";
import type { GuestNetworkConfig } from "./qemu.js";

const COMMAND_TIMEOUT_MS = 15_000;

/** The veth end the network manager leaves in every sandbox's netns (netlink.h NET_SANDBOX_IF). */
export const SANDBOX_VETH_NAME = "eth0";

export interface GuestNetworkNames {
  /** Default "br0": names inside the sandbox's own netns collide with nothing outside it. */
  bridgeName?: string;
  /** Default "tap0". */
  tapName?: string;
  /** Default SANDBOX_VETH_NAME. */
  vethName?: string;
}

/**
 * GUEST_NETWORK_NOTE: a container sandbox's netns holds the sandbox's end of the veth (eth0)
 * with the sandbox address and a default route through the host end. For a microVM the guest
 * must own that address: inside the netns this makes a bridge and a tap (QEMU's virtio-net
 * attaches to the tap), takes the address (and with it the route) off the veth end and puts the
 * veth end into the bridge. The guest then configures the address and the gateway the veth end
 * had (GuestNetworkConfig, passed on the kernel command line), and the host side, its nftables
 * rules and the router see the same address behind the same host veth as for a container.
 * IPv6 is off on the new links, as it is on eth0. Call it once the netns exists, before QEMU
 * starts; the links go with the netns (or with releaseGuestNetwork).
 */
export async function attachGuestNetwork(
  network: Pick<SandboxNetwork, "netnsPath" | "sandboxAddress" | "hostAddress" | "prefixLength">,
  macAddress: string,
  names: GuestNetworkNames = {},
): Promise<GuestNetworkConfig> {
  const { bridgeName, tapName, vethName } = checkedNames(names);
  const inNetns = ["nsenter", `--net=${network.netnsPath}`, "--"];
  // New links inherit `default`: no IPv6 on the bridge and the tap (no link-local chatter).
  await runCommand([...inNetns, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"], { timeoutMs: COMMAND_TIMEOUT_MS });
  const batch = [
    `link add ${bridgeName} type bridge`,
    `tuntap add dev ${tapName} mode tap`,
    `address flush dev ${vethName}`,
    `link set ${vethName} master ${bridgeName}`,
    `link set ${tapName} master ${bridgeName}`,
    `link set ${tapName} up`,
    `link set ${bridgeName} up`,
  ].join("\n");
  await runCommand([...inNetns, "ip", "-batch", "-"], { input: batch + "\n", timeoutMs: COMMAND_TIMEOUT_MS });
  return { tapName, macAddress, address: network.sandboxAddress, prefixLength: network.prefixLength, gateway: network.hostAddress };
}

/** Removes the tap and the bridge from the netns (eth0 leaves the bridge); no error when gone. */
export async function releaseGuestNetwork(netnsPath: string, names: GuestNetworkNames = {}): Promise<void> {
  const { bridgeName, tapName } = checkedNames(names);
  const batch = `link del ${tapName}\nlink del ${bridgeName}\n`;
  await runCommand(["nsenter", `--net=${netnsPath}`, "--", "ip", "-force", "-batch", "-"], { input: batch, timeoutMs: COMMAND_TIMEOUT_MS, allowFailure: true });
}

function checkedNames(names: GuestNetworkNames): Required<GuestNetworkNames> {
  const checked = { bridgeName: names.bridgeName ?? "br0", tapName: names.tapName ?? "tap0", vethName: names.vethName ?? SANDBOX_VETH_NAME };
  for (const name of Object.values(checked)) {
    if (!/^[a-z][a-z0-9]{0,14}$/.test(name)) throw new CubicleError("invalid_argument", `interface name ${JSON.stringify(name)} must be 1-15 lowercase letters or digits`);
  }
  return checked;
}
