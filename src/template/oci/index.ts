/**
 * OCI images as template rootfs trees: pull from a registry (Distribution API, token/basic auth,
 * mirror), import a `docker save` tarball or an OCI layout, unpack layers safely, read the image
 * config. The build runner calls `pullImage` / `importImage`; the rest is exported for tools and
 * tests. Test helpers (a real loopback registry, image builders) live in test-registry.ts and
 * test-image.ts and are not exported here.
 */
export { pullImage, importImage } from "./pull.js";
export type { PullOptions, ImportOptions, ImageResult, PullProgress, RegistryHosts } from "./pull.js";
export { parseImageConfig, defaultCommand } from "./image-config.js";
export type { ImageConfig } from "./image-config.js";
export { parseImageReference, normalizeRegistryHost } from "./reference.js";
export type { ImageReference } from "./reference.js";
export type { RegistryCredentials } from "./registry-client.js";
export type { SandboxAccount } from "./prepare-rootfs.js";
export { unpackLayers } from "./unpack.js";
export type { LayerSource, UnpackOptions, UnpackStats } from "./unpack.js";
