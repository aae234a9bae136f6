/** The microVM runtime's parts (issue 17): guest assets, disk images, QEMU, the guest's network. */
export { agentLaunchFile, GUEST_KERNEL_PACKAGE, guestAgentCommand, launchScript, prepareGuestAssets, type GuestAssets } from "./guest-assets.js";
export { createOverlay, kitDiskImage, removeOverlay, templateDiskImage, type DiskImage } from "./disk-images.js";
export { attachGuestNetwork, releaseGuestNetwork } from "./net.js";
export { buildQemuArgv, helperLauncher, Microvm, nsenterLauncher, probeKvm, startMicrovm, type Accelerator, type GuestNetworkConfig, type KvmProbeResult, type MicrovmConfig, type QemuLauncher } from "./qemu.js";
export { QmpClient, type QmpEvent } from "./qmp.js";
