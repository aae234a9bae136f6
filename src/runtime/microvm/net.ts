import { writeFile } from "node:fs/promises";
import { isIPv4 } from "node:net";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { createLogger } from "../../shared/log.js";
import type { SandboxNetwork } from "../../network/types.js";
import type { GuestNetworkConfig } from "./qemu.js";

const COMMAND_TIMEOUT_MS = 15_000;
const log = createLogger("microvm");

/** The veth end the network manager leaves in every sandbox's netns (netlink.h NET_SANDBOX_IF). */
export const SANDBOX_VETH_NAME = "eth0";

export interface GuestNetworkNames {
  /** Default "tap0": names inside the sandbox's own netns collide with nothing outside it. */
  tapName?: string;
  /** Default SANDBOX_VETH_NAME. */
  vethName?: string;
  /** The nftables table inside the netns; default "cubicle_guest". */
  tableName?: string;
}

/**
 * The resident helper's subcommands (the containers' sandbox-helper: `net-guest-tap`,
 * `net-guest-release`), which do this from one process instead of three or two started by Node
 * (nsenter + sysctl, ip, nft: ~65-75 ms per attach on this project's machines). Without it, the
 * same through those processes.
 */
export interface GuestNetworkHelper {
  call(command: string, args: readonly string[], options: { what: string; timeoutMs?: number }): Promise<string>;
}

/** The name of a namespace file under /run/netns (the helper's `--name`), or undefined for another path. */
function namedNetns(netnsPath: string): string | undefined {
  const dir = path.dirname(netnsPath);
  const name = path.basename(netnsPath);
  return (dir === "/run/netns" || dir === "/var/run/netns") && /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/.test(name) ? name : undefined;
}

/** Every guest's own address, its prefix and its gateway (GUEST_NETWORK_NOTE): one link, inside its netns. */
export const GUEST_ADDRESS = "169.254.0.2";
export const GUEST_GATEWAY = "169.254.0.1";
export const GUEST_PREFIX_LENGTH = 30;
/** Every guest's MAC: its link is its own, and a restored guest keeps the MAC it was saved with. */
export const GUEST_MAC_ADDRESS = "02:cb:00:00:00:02";

/**
 * GUEST_NETWORK_NOTE: a container sandbox's netns holds the sandbox's end of the veth (eth0)
 * with the sandbox address and a default route through the host end. A microVM's guest has an
 * address of its own that never changes, GUEST_ADDRESS on a tap in the same netns (whose end
 * holds GUEST_GATEWAY), and the netns translates between the two: what the guest sends out leaves
 * eth0 from the sandbox address (SNAT), what comes to the sandbox address goes on to the guest
 * (DNAT; from the guest itself too, as a container reaches its own address), DNS to the gateway
 * goes to the host end (where Cubicle's forwarder answers every DNS
 * packet), and nothing else is forwarded: not a packet from another source address (a guest's
 * root cannot spoof), not one to the netns itself. So the host side, its nftables rules, the
 * router and the egress audit see the sandbox address behind the host veth exactly as for a
 * container, and a guest restored from a memory image (its kernel still configured as when it
 * was saved) works unchanged in any sandbox's netns: a fork, a create from a snapshot, a resume
 * at another address. IPv6 is off on the new links, as on eth0. Call it once the netns exists,
 * before QEMU starts; the tap and the table go with the netns (or with releaseGuestNetwork).
 */
export async function attachGuestNetwork(
  network: Pick<SandboxNetwork, "netnsPath" | "sandboxAddress" | "hostAddress" | "prefixLength">,
  names: GuestNetworkNames = {},
  through?: {
    helper: GuestNetworkHelper;
    rulesetFile: string;
    /** A spare QEMU's tap to move in instead of making one (SPARE_QEMU_NOTE): its namespace's name and its name there. */
    spareTap?: { netnsName: string; tapName: string };
  },
): Promise<GuestNetworkConfig> {
  const { tapName, vethName, tableName } = checkedNames(names);
  for (const address of [network.sandboxAddress, network.hostAddress]) {
    if (!isIPv4(address)) throw new CubicleError("invalid_argument", `${JSON.stringify(address)} is not an IPv4 address`);
  }
  const config: GuestNetworkConfig = { tapName, macAddress: GUEST_MAC_ADDRESS, address: GUEST_ADDRESS, prefixLength: GUEST_PREFIX_LENGTH, gateway: GUEST_GATEWAY };
  const ruleset = guestNatRuleset({ tapName, vethName, tableName, sandboxAddress: network.sandboxAddress, hostAddress: network.hostAddress });
  const name = namedNetns(network.netnsPath);
  if (through && name) {
    await writeFile(through.rulesetFile, ruleset, { mode: 0o600 });
    const args = ["--name", name, "--tap", tapName, "--gateway", GUEST_GATEWAY, "--prefix", String(GUEST_PREFIX_LENGTH), "--nft-file", through.rulesetFile];
    if (through.spareTap) args.push("--from", through.spareTap.netnsName, "--from-tap", checkedNames({ tapName: through.spareTap.tapName }).tapName);
    await through.helper.call("net-guest-tap", args, { what: "the guest's tap and address translation", timeoutMs: COMMAND_TIMEOUT_MS });
    return config;
  }
  if (through?.spareTap) throw new CubicleError("internal", "a spare QEMU's tap is moved by the resident helper, into a namespace under /run/netns");
  const inNetns = ["nsenter", `--net=${network.netnsPath}`, "--"];
  // New links inherit `default`: no IPv6 on the tap (no link-local chatter). The netns forwards,
  // and sends the guest no ICMP redirect when it hairpins a packet back out of the tap.
  await runCommand(
    [...inNetns, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0"],
    { timeoutMs: COMMAND_TIMEOUT_MS },
  );
  const batch = [`tuntap add dev ${tapName} mode tap`, `address add ${GUEST_GATEWAY}/${GUEST_PREFIX_LENGTH} dev ${tapName}`, `link set ${tapName} up`].join("\n");
  await runCommand([...inNetns, "ip", "-batch", "-"], { input: batch + "\n", timeoutMs: COMMAND_TIMEOUT_MS });
  await runCommand([...inNetns, "nft", "-f", "-"], { input: ruleset, timeoutMs: COMMAND_TIMEOUT_MS });
  return config;
}

/** The netns's table (GUEST_NETWORK_NOTE): the translation both ways, and nothing else forwarded. */
export function guestNatRuleset(options: { tapName: string; vethName: string; tableName: string; sandboxAddress: string; hostAddress: string }): string {
  const { tapName, vethName, tableName, sandboxAddress, hostAddress } = options;
  // Declared and deleted first, in the same transaction: loaded again (a guest restored into the
  // network of an earlier one), the table is replaced instead of holding every rule twice.
  return `table ip ${tableName}
delete table ip ${tableName}
table ip ${tableName} {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    iifname "${vethName}" ip daddr ${sandboxAddress} dnat to ${GUEST_ADDRESS}
    iifname "${tapName}" ip saddr ${GUEST_ADDRESS} ip daddr ${GUEST_GATEWAY} meta l4proto { udp, tcp } th dport 53 dnat to ${hostAddress}
    iifname "${tapName}" ip saddr ${GUEST_ADDRESS} ip daddr ${sandboxAddress} dnat to ${GUEST_ADDRESS}
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "${vethName}" ip saddr ${GUEST_ADDRESS} snat to ${sandboxAddress}
    iifname "${tapName}" oifname "${tapName}" ip daddr ${GUEST_ADDRESS} snat to ${GUEST_GATEWAY}
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
    iifname "${tapName}" oifname "${vethName}" ip saddr ${GUEST_ADDRESS} accept
    iifname "${tapName}" oifname "${tapName}" ip saddr ${GUEST_ADDRESS} ip daddr ${GUEST_ADDRESS} ct status dnat accept
    iifname "${vethName}" oifname "${tapName}" ip daddr ${GUEST_ADDRESS} ct state established,related accept
    iifname "${vethName}" oifname "${tapName}" ip daddr ${GUEST_ADDRESS} ct status dnat accept
  }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "${tapName}" drop
  }
}
`;
}

/** Removes the tap and the table from the netns; no error when gone. */
export async function releaseGuestNetwork(netnsPath: string, names: GuestNetworkNames = {}, helper?: GuestNetworkHelper): Promise<void> {
  const { tapName, tableName } = checkedNames(names);
  const name = namedNetns(netnsPath);
  if (helper && name) {
    // As below: what is gone already is no error, and what cannot be removed goes with the netns.
    await helper
      .call("net-guest-release", ["--name", name, "--tap", tapName, "--table", tableName], { what: "removing the guest's tap and table", timeoutMs: COMMAND_TIMEOUT_MS })
      .catch((err: Error) => log.warn("could not remove a guest's tap or table", { netnsPath, error: err.message }));
    return;
  }
  await runCommand(["nsenter", `--net=${netnsPath}`, "--", "ip", "link", "del", tapName], { timeoutMs: COMMAND_TIMEOUT_MS, allowFailure: true });
  await runCommand(["nsenter", `--net=${netnsPath}`, "--", "nft", "delete", "table", "ip", tableName], { timeoutMs: COMMAND_TIMEOUT_MS, allowFailure: true });
}

function checkedNames(names: GuestNetworkNames): Required<GuestNetworkNames> {
  const checked = { tapName: names.tapName ?? "tap0", vethName: names.vethName ?? SANDBOX_VETH_NAME, tableName: names.tableName ?? "cubicle_guest" };
  for (const name of [checked.tapName, checked.vethName]) {
    if (!/^[a-z][a-z0-9]{0,14}$/.test(name)) throw new CubicleError("invalid_argument", `interface name ${JSON.stringify(name)} must be 1-15 lowercase letters or digits`);
  }
  if (!/^[a-z][a-z0-9_]{0,31}$/.test(checked.tableName)) throw new CubicleError("invalid_argument", `table name ${JSON.stringify(checked.tableName)} must be 1-32 lowercase letters, digits or _`);
  return checked;
}
