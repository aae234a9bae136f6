/**
 * The image the `template-build` benchmark pulls: a "python:3.12-slim-like" image made from the
 * server's `base` template rootfs (Debian with python3), one gzip layer written by GNU tar +
 * gzip with the ids shifted back from Cubicle's mapped range (100000+) to 0-based, plus a file
 * naming the run so every run's layer has a new digest (a cold pull, not a blob-cache hit).
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { PassThrough } from "node:stream";
import { pipeline } from "node:stream/promises";
import { runCommand } from "../../shared/exec.js";
import { blob, MEDIA, type Blob, type TestImage } from "../../template/oci/test-image.js";

/** Cubicle's template trees are owned by the mapped range starting here (userns 0→100000). */
const UID_BASE = 100_000;
const UID_COUNT = 65_536;
const DEFAULT_TEMPLATE_DIR = "/var/lib/cubicle/templates";
/** Where the run marker lands in the image (and so in every sandbox of it). */
export const RUN_MARKER_PATH = "etc/cubicle-bench-run";

export interface BenchImageLayer {
  /** The compressed layer on disk (what is pushed, and what the `tar -xzf` floor unpacks). */
  file: string;
  digest: string;
  /** sha256 of the uncompressed tar (the config's diff_id). */
  diffId: string;
  compressedBytes: number;
  tarBytes: number;
  rootfs: string;
  /** Wall time of tar | gzip (not part of any measured figure). */
  makeMs: number;
}

/** The `base` template's rootfs: the server's template dir, else the default cache. */
export function findBaseRootfs(templateDir: string): string | undefined {
  return [path.join(templateDir, "base", "rootfs"), path.join(DEFAULT_TEMPLATE_DIR, "base", "rootfs")].find((dir) => fs.existsSync(path.join(dir, "usr", "bin", "python3")));
}

/** GNU tar's --owner-map/--group-map lines (`+OLD NAME:NEW`) for every mapped id in the tree. */
async function idMap(rootfs: string): Promise<string> {
  const { stdout } = await runCommand(["find", rootfs, "-xdev", "-printf", "%U\\n%G\\n"], { timeoutMs: 120_000 });
  const ids = new Set(stdout.split("\n").filter(Boolean).map(Number));
  return [...ids]
    .filter((id) => id >= UID_BASE && id < UID_BASE + UID_COUNT)
    .map((id) => `+${id} ${id === UID_BASE ? "root" : `id${id - UID_BASE}`}:${id - UID_BASE}\n`)
    .join("");
}

function hashing(into: { hash: ReturnType<typeof createHash>; bytes: number }): PassThrough {
  const tap = new PassThrough();
  tap.on("data", (chunk: Buffer) => {
    into.hash.update(chunk);
    into.bytes += chunk.length;
  });
  return tap;
}

function exited(child: ReturnType<typeof spawn>, name: string, stderr: () => string): Promise<void> {
  return new Promise((resolve, reject) => {
    child.once("error", reject);
    child.once("close", (code, signal) => (code === 0 ? resolve() : reject(new Error(`${name} exited with ${code ?? signal}: ${stderr().slice(-500)}`))));
  });
}

/**
 * `tar -c` of the rootfs (ids shifted to 0-based, numeric, sorted by name) and the run marker,
 * piped through `gzip -1 -n` into `<workDir>/layer.tar.gz`, digests taken on the way.
 */
export async function makeBaseLayer(rootfs: string, workDir: string, runId: string, timeoutMs = 600_000): Promise<BenchImageLayer> {
  const started = performance.now();
  const mapFile = path.join(workDir, "id-map");
  fs.writeFileSync(mapFile, await idMap(rootfs));
  const markerDir = path.join(workDir, "marker");
  fs.mkdirSync(path.join(markerDir, path.dirname(RUN_MARKER_PATH)), { recursive: true });
  fs.writeFileSync(path.join(markerDir, RUN_MARKER_PATH), `${runId}\n`);
  const file = path.join(workDir, "layer.tar.gz");
  const tarArgs = ["--numeric-owner", `--owner-map=${mapFile}`, `--group-map=${mapFile}`, "--sort=name", "-C", rootfs, "-cf", "-", ".", "-C", markerDir, `./${RUN_MARKER_PATH}`];
  const tar = spawn("tar", tarArgs, { stdio: ["ignore", "pipe", "pipe"] });
  const gzip = spawn("gzip", ["-1", "-n"], { stdio: ["pipe", "pipe", "pipe"] });
  let tarErr = "";
  let gzipErr = "";
  tar.stderr!.on("data", (d: Buffer) => (tarErr += d.toString()));
  gzip.stderr!.on("data", (d: Buffer) => (gzipErr += d.toString()));
  const timer = setTimeout(() => {
    tar.kill("SIGKILL");
    gzip.kill("SIGKILL");
  }, timeoutMs);
  const raw = { hash: createHash("sha256"), bytes: 0 };
  const packed = { hash: createHash("sha256"), bytes: 0 };
  try {
    await Promise.all([
      pipeline(tar.stdout!, hashing(raw), gzip.stdin!),
      pipeline(gzip.stdout!, hashing(packed), fs.createWriteStream(file)),
      exited(tar, "tar", () => tarErr),
      exited(gzip, "gzip", () => gzipErr),
    ]);
  } finally {
    clearTimeout(timer);
  }
  return {
    file,
    digest: `sha256:${packed.hash.digest("hex")}`,
    diffId: `sha256:${raw.hash.digest("hex")}`,
    compressedBytes: packed.bytes,
    tarBytes: raw.bytes,
    rootfs,
    makeMs: Math.round(performance.now() - started),
  };
}

/**
 * The image around the layer: config (Env like python:3.12-slim's, `Cmd ["python3"]`, which
 * Cubicle treats as an interactive default and so gives the template no start command) and an
 * OCI manifest. The layer's bytes are read into memory once, for the push.
 */
export function benchImage(layer: BenchImageLayer): TestImage {
  const architecture = process.arch === "arm64" ? "arm64" : "amd64";
  const config = blob(
    MEDIA.ociConfig,
    Buffer.from(
      JSON.stringify({
        architecture,
        os: "linux",
        created: "2024-01-01T00:00:00Z",
        config: { Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "PYTHON_VERSION=3.12-like"], Cmd: ["python3"] },
        rootfs: { type: "layers", diff_ids: [layer.diffId] },
        history: [{ created_by: "cubicle bench template-build: the base template's rootfs" }],
      }),
    ),
  );
  const layerBlob: Blob & { diffId: string } = { mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: layer.digest, size: layer.compressedBytes, data: fs.readFileSync(layer.file), diffId: layer.diffId };
  const manifest = blob(
    MEDIA.ociManifest,
    Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MEDIA.ociManifest,
        config: { mediaType: config.mediaType, digest: config.digest, size: config.size },
        layers: [{ mediaType: layerBlob.mediaType, digest: layerBlob.digest, size: layerBlob.size }],
      }),
    ),
  );
  return { manifest, config, layers: [layerBlob], blobs: [config, layerBlob] };
}
