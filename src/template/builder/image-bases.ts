import { randomBytes } from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { createLogger } from "../../shared/log.js";
import { defaultCommand, importImage, pullImage, type ImageConfig, type ImageResult, type RegistryHosts } from "../oci/index.js";
import { parseImageReference } from "../oci/reference.js";
import { RegistryClient, type RegistryCredentials } from "../oci/registry-client.js";
import type { PulledBase } from "./template-builder.js";

const log = createLogger("image-bases");

/** What `<dir>/<key>/image.json` holds next to the image's `rootfs/`. */
interface StoredImage {
  reference: string;
  digest: string;
  manifestDigest?: string;
  config: ImageConfig;
  pulledAt: string;
}

/** Commands an image's Cmd often is that are no service: a shell or a REPL waiting on stdin. */
const INTERACTIVE_COMMANDS = /^(\/(usr\/)?(local\/)?bin\/)?(sh|bash|ash|dash|zsh|python[0-9.]*|node|irb|jshell|ipython[0-9.]*|R)$/;

/**
 * IMAGE_BASES_NOTE: OCI images that builds stand on, one flattened rootfs per image manifest
 * (`<dir>/<manifest digest hex>/rootfs`, ids shifted like every template tree; src/template/oci
 * pulls and unpacks them), kept so a rebuild from the same image downloads and unpacks nothing:
 * a pull first resolves the reference (one manifest request), and an image already here is used
 * as it is. A template made from an image runs as the image's `User` (else the `user` account
 * the pull ensures, like E2B's) in its `WorkingDir` (else that account's home), with its `Env`;
 * `Entrypoint` + `Cmd` become the template's start command, except a lone shell or interpreter
 * (`bash`, `python3`, …: the Cmd of most language images, which would only wait on stdin).
 */
export class ImageBases {
  constructor(
    private readonly options: {
      dir: string;
      /** Layer blobs by digest, kept between pulls. */
      blobCacheDir: string;
      registryHosts: RegistryHosts;
      /** The xattr addon unpacking keeps layers' attributes with (LAYER_XATTRS_NOTE). */
      xattrAddon?: string;
    },
  ) {}

  async pull(reference: string, credentials: RegistryCredentials | undefined, onLog: (message: string) => void, signal: AbortSignal): Promise<PulledBase> {
    // One manifest request says which image the reference names now; one already here is used as it is.
    const client = new RegistryClient({ ...this.options.registryHosts, log });
    const resolved = await client.resolveImage(parseImageReference(reference), { credentials, signal });
    const known = path.join(this.options.dir, resolved.manifestDigest.replace(/^sha256:/, ""));
    const stored = await fs.readFile(path.join(known, "image.json"), "utf8").then((text) => JSON.parse(text) as StoredImage, () => undefined);
    if (stored) {
      onLog(`${reference} is ${resolved.digest}, unpacked already`);
      return this.toBase(known, stored);
    }
    let lastReport = 0;
    return this.fetch(reference, async (destDir) => {
      onLog(`pulling ${reference}`);
      const result = await pullImage({
        reference,
        destDir,
        credentials,
        registryHosts: this.options.registryHosts,
        blobCacheDir: this.options.blobCacheDir,
        xattrAddon: this.options.xattrAddon,
        signal,
        onProgress: (progress) => {
          const now = Date.now();
          if (progress.bytes < progress.total && now - lastReport < 1000) return;
          lastReport = now;
          onLog(`layer ${progress.layer.slice(7, 19)}: ${progress.cached ? "cached" : `${formatBytes(progress.bytes)} / ${formatBytes(progress.total)}`}`);
        },
      });
      onLog(`pulled ${reference} (${result.digest})`);
      return result;
    });
  }

  /** A `docker save` tarball or an OCI layout directory (`./cubicle template import`). */
  async import(source: string, image?: string): Promise<PulledBase> {
    return this.fetch(`import:${path.resolve(source)}`, (destDir) => importImage({ source, destDir, image, xattrAddon: this.options.xattrAddon }));
  }

  private async fetch(reference: string, make: (destDir: string) => Promise<ImageResult>): Promise<PulledBase> {
    await fs.mkdir(this.options.dir, { recursive: true, mode: 0o700 });
    const staging = path.join(this.options.dir, `.pull-${randomBytes(6).toString("hex")}`);
    // Not 0700: the root of a template tree is what the sandbox's root sees as `/`.
    await fs.mkdir(staging, { mode: 0o755 });
    try {
      const result = await make(path.join(staging, "rootfs"));
      const key = (result.manifestDigest ?? result.digest).replace(/^sha256:/, "");
      if (!/^[a-f0-9]{64}$/.test(key)) throw new CubicleError("internal", `the image's digest ${result.digest} is not a sha256 digest`);
      const finalDir = path.join(this.options.dir, key);
      const stored: StoredImage = { reference, digest: result.digest, manifestDigest: result.manifestDigest, config: result.config, pulledAt: new Date().toISOString() };
      await fs.writeFile(path.join(staging, "image.json"), JSON.stringify(stored, null, 2) + "\n", { mode: 0o644 });
      try {
        await fs.rename(staging, finalDir);
      } catch (err) {
        // The same image is here already (another build pulled it meanwhile): use that one.
        if ((err as NodeJS.ErrnoException).code !== "ENOTEMPTY" && (err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
        log.info("image already unpacked; keeping the first", { key });
      }
      return this.toBase(finalDir, JSON.parse(await fs.readFile(path.join(finalDir, "image.json"), "utf8")) as StoredImage);
    } finally {
      await fs.rm(staging, { recursive: true, force: true });
    }
  }

  private toBase(dir: string, stored: StoredImage): PulledBase {
    const { config } = stored;
    const command = defaultCommand(config);
    const startCmd = command.length === 0 || (config.entrypoint.length === 0 && command.length === 1 && INTERACTIVE_COMMANDS.test(command[0]!)) ? undefined : command.map(shellQuote).join(" ");
    return {
      rootfsDir: path.join(dir, "rootfs"),
      digest: stored.manifestDigest ?? stored.digest,
      env: config.envMap,
      user: config.user || "user",
      workdir: config.workingDir || (config.user && config.user !== "user" ? "/" : "/home/user"),
      ...(startCmd ? { startCmd } : {}),
    };
  }
}

function shellQuote(word: string): string {
  return /^[A-Za-z0-9_./:=@%+-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

function formatBytes(bytes: number): string {
  return bytes >= 1024 * 1024 ? `${(bytes / 1024 / 1024).toFixed(1)} MiB` : `${Math.ceil(bytes / 1024)} KiB`;
}
