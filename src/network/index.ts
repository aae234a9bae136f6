import type { CubicleConfig } from "../shared/config.js";
import { createNetnsManager, type NetnsManagerOptions } from "./netns-manager.js";
import type { NetworkManager } from "./types.js";

export type { NetworkManager, NetworkPolicy, SandboxNetwork } from "./types.js";
export type { NetnsManagerOptions, NetworkHelperRunner } from "./netns-manager.js";
export { checkSandboxId } from "./netns-manager.js";
export { openCertificateAuthority, normalizeCertificateHostname } from "./tls/certificate-authority.js";
export type { CertificateAuthority, CertificateAuthorityOptions, IssuedCertificate } from "./tls/certificate-authority.js";

/** The network manager for this host: netns + veth + one nftables table; `distDir` locates sandbox-helper. */
export function createNetworkManager(config: Pick<CubicleConfig, "subnet"> & Partial<Pick<CubicleConfig, "distDir">>, options?: NetnsManagerOptions): NetworkManager {
  return createNetnsManager(config, options);
}
export { EgressAuditLog, EGRESS_AUDIT_DEFAULTS, type EgressAuditOptions, type EgressPage } from "./egress-audit.js";
export type { EgressRecord, SecretResolver } from "./egress-types.js";

export { createEgressService, type EgressService } from "./egress-service.js";
