import { createRequire } from "node:module";
import type net from "node:net";
import { CubicleError } from "../../shared/cubicle-error.js";

/**
 * ORIGINAL_DST_NOTE: nftables' `redirect` sends a sandbox's TCP connection to the egress proxy;
 * the destination the sandbox asked for survives only in conntrack, read back with
 * getsockopt(SO_ORIGINAL_DST) by the addon src/network/native/original-dst.c
 * (`<distDir>/network/original-dst.node`, built by scripts/build.mjs).
 */
export interface Destination {
  address: string;
  port: number;
}

interface OriginalDstAddon {
  originalDestination(fd: number): Destination;
}

/**
 * Loads the addon at `addonPath` and returns the function the egress proxy's
 * `originalDestination` option wants. Throws `unimplemented` when the addon cannot be loaded.
 */
export function loadOriginalDestination(addonPath: string): (socket: net.Socket) => Destination {
  let addon: OriginalDstAddon;
  try {
    addon = createRequire(import.meta.url)(addonPath) as OriginalDstAddon;
  } catch (err) {
    throw new CubicleError("unimplemented", `the egress proxy needs its addon ${addonPath}: install a C compiler and run scripts/build.mjs`, { cause: err });
  }
  return function originalDestination(socket: net.Socket): Destination {
    // Linux: an accepted socket's libuv handle exposes its descriptor.
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (typeof fd !== "number" || fd < 0) throw new CubicleError("internal", "the connection has no file descriptor");
    return addon.originalDestination(fd);
  };
}
