import { ContainerRuntime, type ContainerRuntimeConfig, type ContainerRuntimeOptions } from "./container/container-runtime.js";

export type { CheckpointInfo, CheckpointOptions, Runtime, RuntimeState, SandboxResources, SandboxSpec, SandboxStats, TemplateImage } from "./types.js";
export { SANDBOX_UID_BASE, SANDBOX_UID_COUNT } from "./types.js";
export { RuntimeSet } from "./runtime-set.js";
export { ContainerRuntime, CONTAINER_PREFIX, type ContainerRuntimeConfig, type ContainerRuntimeOptions, type CreateTimings } from "./container/container-runtime.js";
export { KIT_MOUNT_POINT } from "./container/agent-kit.js";
export { SandboxHelper, type HelperCallOptions, type HelperExecOptions, type HelperExecResult } from "./container/sandbox-helper.js";

/** The default runtime: runc + overlayfs + user namespace. */
export function createContainerRuntime(config: ContainerRuntimeConfig, options?: ContainerRuntimeOptions): ContainerRuntime {
  return new ContainerRuntime(config, options);
}
