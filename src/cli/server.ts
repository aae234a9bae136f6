import fs from "node:fs";
import { RuntimeSet } from "../runtime/runtime-set.js";
import { MicrovmRuntime } from "../runtime/microvm/microvm-runtime.js";
import { helperLauncher } from "../runtime/microvm/qemu.js";
import { createHash } from "node:crypto";
import { TemplateBuilder } from "../template/builder/template-builder.js";
import { adoptLegacyRecords } from "../template/index.js";
import { imageBasesFor } from "./image-bases-config.js";
import path from "node:path";
import type { IncomingMessage, ServerResponse } from "node:http";
import type https from "node:https";
import type { AddressInfo } from "node:net";
import { VolumeService } from "../volumes/volume-service.js";
import { CodebaseService } from "../codebases/codebase-service.js";
import { createApiApp } from "../api/index.js";
import { newApiKey, SandboxManager } from "../core/index.js";
import { createEgressService, createNetworkManager, EgressAuditLog, openCertificateAuthority, type CertificateAuthority, type NetworkManager } from "../network/index.js";
import { HttpAgentLink } from "../protocol/index.js";
import { answerClientError, createRoutedHttpServer, SandboxRouter } from "../router/index.js";
import { createContainerRuntime } from "../runtime/index.js";
import { loadOrCreateSecretKey, SecretVault } from "../secrets/index.js";
import type { CubicleConfig } from "../shared/config.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import { SqliteStore, storeFile, type SandboxRecord } from "../store/index.js";
import { listenHttps, tlsCredentialsFor } from "./https-listener.js";
import { createTemplateCatalog } from "./template-catalog.js";

const log = createLogger("server");

export interface RunningServer {
  url: string;
  /** `https://<host>:<port>` of the HTTPS listener; undefined when it is off (CUBICLE_HTTPS_PORT). */
  httpsUrl: string | undefined;
  /** Cubicle's CA (`<stateDir>/ca`): it signs the HTTPS listener's certificate unless the operator gave one. */
  ca: CertificateAuthority;
  apiKey: string;
  manager: SandboxManager;
  /** The project's secrets; `secrets.resolveSecret` is the egress proxy's SecretResolver. */
  secrets: SecretVault;
  /** Where the egress enforcement records what sandboxes tried to reach. */
  egressAudit: EgressAuditLog;
  /** Resolves once default templates are ready (GET /health answers 200). */
  ready: Promise<void>;
  /** Stops listening and closes the store; sandboxes keep running for the next start to adopt. */
  close(): Promise<void>;
}

/** The API key: CUBICLE_API_KEY, or one generated on first start and kept in the state dir. */
export function loadOrCreateApiKey(config: CubicleConfig): string {
  if (config.apiKey) return config.apiKey;
  const file = path.join(config.stateDir, "api-key");
  try {
    const existing = fs.readFileSync(file, "utf8").trim();
    if (existing) return existing;
  } catch {
    // first start
  }
  const key = newApiKey();
  fs.mkdirSync(config.stateDir, { recursive: true, mode: 0o700 });
  // Created 0600 (an empty leftover is replaced, not reused with its mode).
  fs.rmSync(file, { force: true });
  fs.writeFileSync(file, key + "\n", { mode: 0o600, flag: "wx" });
  return key;
}

/** Assembles store, network, runtime, core, API and router, recovers, and listens. */
export interface StartServerOptions {
  /** Progress of the first-start builds of the default templates (`./cubicle up` draws it). */
  onTemplateProgress?: (templateId: string, message: string) => void;
}

export async function startServer(config: CubicleConfig, options: StartServerOptions = {}): Promise<RunningServer> {
  // Host root's alone: the database (tokens, env vars), the API key, templates, the storage pool's
  // image. What sandboxes must reach is under config.runDir.
  fs.mkdirSync(config.stateDir, { recursive: true, mode: 0o700 });
  if ((fs.statSync(config.stateDir).mode & 0o077) !== 0) fs.chmodSync(config.stateDir, 0o700);
  const apiKey = loadOrCreateApiKey(config);
  const ca = await openCertificateAuthority(path.join(config.stateDir, "ca"));
  // Before anything listens or starts: a bad certificate is a configuration error.
  const tlsCredentials = config.httpsPort === undefined ? undefined : await tlsCredentialsFor(config, ca);
  const store = new SqliteStore(storeFile(config.stateDir));
  // Before anything is set up: a secrets key that cannot be used stops the start here.
  const secrets = await SecretVault.open(store, loadOrCreateSecretKey(config.stateDir)).catch(async (err) => {
    await store.close();
    throw err;
  });
  // Kept in the database as well: a restart keeps what sandboxes tried to reach (AUDIT_PERSISTENCE_NOTE).
  const egressAudit = new EgressAuditLog({ store });
  // The host side of sandbox egress first: nftables redirects sandbox DNS and TCP to its ports.
  // Its lookups go to the network manager and the core, made just below.
  let network: NetworkManager | undefined;
  let manager: SandboxManager | undefined;
  const egress = createEgressService({
    subnet: config.subnet,
    tableName: config.nftTable,
    privateAllowed: config.egressPrivateAllow,
    dnsUpstreams: config.dnsUpstreams,
    upstreamCa: config.egressCaFiles.map((file) => fs.readFileSync(file, "utf8")),
    distDir: config.distDir,
    sandboxAt: (address) => network?.sandboxAt(address),
    pinInKernel: async (runtimeId, name, addresses, ttlSec) => network?.pin(runtimeId, name, addresses, ttlSec),
    sandboxIdOf: (runtimeId) => manager?.sandboxIdOfRuntime(runtimeId),
    issueCertificate: (hostname) => ca.issue([hostname]),
    resolveSecret: (name) => secrets.resolveSecret(name),
    audit: { record: (record) => egressAudit.record(record), finished: (record) => egressAudit.finished(record) },
  });
  const egressPorts = await egress.start().catch(async (err) => {
    await store.close();
    throw err;
  });
  const containers = createContainerRuntime(config);
  // The microVM runtime beside the containers when configured (RUNTIME_SET_NOTE); QEMU starts in a
  // sandbox's netns through the containers' resident helper.
  const microvms =
    config.microvm === "off"
      ? undefined
      : new MicrovmRuntime({
        stateDir: config.stateDir,
        runDir: config.runDir,
        distDir: config.distDir,
        accel: config.microvm,
        launcher: helperLauncher(containers.helper),
        // Templates the builder made: their layer images are the containers'.
        templateLayerDir: (template) => containers.templateLayer(template),
        layerExists: (id) => containers.images.exists(id),
        // Volumes and codebases (MICROVM_SHARES_NOTE) are bound and unmounted by it too.
        hostHelper: containers.helper,
        // One image budget for both runtimes (IMAGE_BUDGET_NOTE): the storage pool's.
        imageBudget: () => ({ otherUsedBytes: containers.images.usedBytes(), limitBytes: containers.imageBudget().limitBytes }),
        spares: config.microvmSpares,
      });
  if (microvms) containers.otherImagesBytes = () => microvms.images.usedBytes();
  const runtime = microvms ? new RuntimeSet([containers, microvms]) : containers;
  network = createNetworkManager(config, {
    tableName: config.nftTable,
    egressPorts,
    privateAllowed: config.egressPrivateAllow,
    livePins: (runtimeId) => egress.livePins(runtimeId),
    onPolicyChange: (runtimeId) => egress.policyChanged(runtimeId),
    onRelease: (runtimeId, address) => egress.released(runtimeId, address),
    // Network set-up and teardown go through the runtime's resident helper: no process start per sandbox.
    helper: ([command, ...args]) => containers.helper.call(command!, args, { what: `sandbox network (${command})`, timeoutMs: 15_000 }),
  });
  // Templates are records in the store (TEMPLATE_RECORDS_NOTE); earlier versions' files become records.
  await adoptLegacyRecords(config.builtTemplateDir, store);
  const templates = createTemplateCatalog(config, store);
  await network.init();
  await runtime.init();
  // Volumes are images in the state directory, mounted under the run directory (VOLUMES_NOTE);
  // earlier versions' volumes are subvolumes on the containers' storage pool, mounted by runtime.init().
  const volumes = new VolumeService({
    store,
    imagesDir: path.join(config.stateDir, "volumes"),
    mountsDir: path.join(config.runDir, "volumes"),
    volumesDir: path.join(config.runDir, "pool", "volumes"),
    defaultSizeMB: config.volumeSizeMB,
    maxVolumes: config.maxVolumes,
  });
  await volumes.init();
  const codebases = new CodebaseService({ store, volumes, hostRoots: config.codebaseRoots });

  // One link to the agents for the whole server: the core and the router share its socket pool,
  // so the core's dropIdleSockets (before a memory dump) also closes the router's idle connections.
  const agentLink = new HttpAgentLink();
  manager = new SandboxManager({
    store,
    runtime,
    network,
    agent: agentLink,
    templates,
    volumes,
    codebases,
    poolSizes: config.poolSizes,
    admission: { slots: config.maxStarting, maxWaiting: config.maxWaitingCreates, minAvailableBytes: config.minAvailableMB * 1024 * 1024 },
    durablePauseAfterSec: config.durablePauseAfterSec,
    pauseImageAfterMs: config.pauseImageAfterMs,
    idleFreezeAfterSec: config.idleFreezeAfterSec,
    idleDiskAfterSec: config.idleDiskAfterSec,
    warmSnapshotTemplates: config.warmSnapshotTemplates,
    templateFingerprint: (template) => templates.fingerprint(template),
    caCertificates: ca.certificatePem,
  });
  const liveUser = (uses: (record: SandboxRecord) => boolean | undefined) => manager?.liveSandboxes().find((record) => (record.state === "running" || record.state === "paused") && uses(record))?.sandboxId;
  volumes.mountedBy = async (volumeId) => {
    const sandbox = liveUser((record) => record.volumeMounts?.some((mount) => mount.volumeId === volumeId));
    if (sandbox) return `sandbox ${sandbox}`;
    const codebase = await codebases.usingVolume(volumeId);
    return codebase === undefined ? undefined : `codebase ${codebase}`;
  };
  codebases.mountedBy = (codebaseId) => liveUser((record) => record.codebaseMounts?.some((mount) => mount.codebaseId === codebaseId));
  await manager.recover();
  const imageBases = imageBasesFor(config);
  const templateBuilder = new TemplateBuilder({
    filesDir: path.join(config.stateDir, "template-files"),
    store,
    catalog: templates,
    sandboxes: manager.builds,
    // Upload links stay valid across restarts, and only this server's key signs them.
    uploadKey: createHash("sha256").update(`cubicle template uploads\n${apiKey}`).digest(),
    buildInternet: config.buildInternet,
    pullImage: (reference, credentials, onLog, signal) => imageBases.pull(reference, credentials, onLog, signal),
    ...(config.registry.ecrEndpoint ? { ecrEndpoint: config.registry.ecrEndpoint } : {}),
  });
  await templateBuilder.recover();

  const router = new SandboxRouter(manager, config.domain, { agentLink });
  let templatesReady = false;
  // The API's request handler, handed over by its serverFactory: the HTTPS listener serves it too.
  let apiHandler: ((req: IncomingMessage, res: ServerResponse) => void) | undefined;
  const app = createApiApp({
    manager,
    apiKey,
    domain: config.domain,
    defaultTimeoutSec: config.defaultTimeoutSec,
    createLimits: { maxCpuCount: config.maxCpuCount, maxMemoryMB: config.maxMemoryMB, maxDiskMB: config.maxDiskMB },
    requireSecure: config.requireSecure,
    secrets,
    egressAudit,
    templateBuilder,
    volumes,
    codebases,
    hostDirs: [config.stateDir, config.templateDir, config.distDir, config.runDir],
    isReady: () => templatesReady,
    listTemplates: () => templates.list(),
    serverFactory: (handler) => {
      apiHandler = handler;
      return createRoutedHttpServer(router, handler);
    },
    clientErrorHandler: answerClientError,
  });
  await app.ready();
  const hostInUrl = config.host.includes(":") ? `[${config.host}]` : config.host;
  let httpsServer: https.Server | undefined;
  let httpsUrl: string | undefined;
  try {
    if (config.httpsPort !== undefined && tlsCredentials) {
      if (!apiHandler) throw new CubicleError("internal", "the API made no server to share its handler with the HTTPS listener");
      const listening = await listenHttps(router, apiHandler, tlsCredentials, config.host, config.httpsPort);
      httpsServer = listening.server;
      httpsUrl = `https://${hostInUrl}:${listening.port}`;
      log.info("listening for HTTPS", { url: httpsUrl, certificate: config.tlsCertFile ?? ca.certPath });
    }
    await app.listen({ host: config.host, port: config.port });
  } catch (err) {
    httpsServer?.close();
    await app.close().catch(() => undefined);
    await manager.close().catch(() => undefined);
    egressAudit.close();
    await store.close().catch(() => undefined);
    throw err;
  }
  const address = app.server.address() as AddressInfo;
  const url = `http://${hostInUrl}:${address.port}`;
  log.info("listening", { url });

  const ready = (async () => {
    for (const templateId of config.defaultTemplates) {
      await templates.ensure(templateId, { onProgress: options.onTemplateProgress && ((message) => options.onTemplateProgress!(templateId, message)) });
    }
    templatesReady = true;
    log.info("ready: default templates are built");
    await manager.startPools(config.defaultTemplates);
  })();
  ready.catch((err) => log.error("default templates failed to build; creates will fail until this is fixed", { error: String(err) }));

  return {
    url,
    httpsUrl,
    ca,
    apiKey,
    manager,
    secrets,
    egressAudit,
    ready,
    async close() {
      await templateBuilder.close();
      await manager!.close();
      // QEMUs started ahead for restores end with the server (SPARE_QEMU_NOTE); guests run on.
      await microvms?.close();
      await egress.stop();
      network!.close();
      if (httpsServer) {
        const closed = new Promise<void>((resolve) => httpsServer!.close(() => resolve()));
        httpsServer.closeAllConnections();
        await closed;
      }
      await app.close();
      egressAudit.close();
      await store.close();
    },
  };
}
