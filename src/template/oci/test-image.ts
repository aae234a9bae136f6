/**
 * Test-only: builds image layers, configs and manifests in memory (a small tar writer that can
 * also write the hostile entries real tools refuse to), and lays them out as an OCI layout
 * directory or a `docker save` tarball. Used by this module's tests and the lead's e2e tests.
 */
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import zlib from "node:zlib";

export interface TarSpecEntry {
  path: string;
  type?: "file" | "directory" | "symlink" | "hardlink" | "fifo" | "chardev";
  data?: string | Buffer;
  linkPath?: string;
  mode?: number;
  uid?: number;
  gid?: number;
  /** Seconds since the epoch. Default 1700000000. */
  mtime?: number;
  /** Extra PAX records written before the entry (e.g. `SCHILY.xattr.user.x`); values may be bytes. */
  pax?: Record<string, string | Buffer>;
  /** How a name longer than 100 bytes is written. Default "pax". */
  longNames?: "pax" | "gnu";
}

const typeFlags = { file: "0", hardlink: "1", symlink: "2", chardev: "3", directory: "5", fifo: "6" } as const;

function header(name: string, flag: string, fields: { mode: number; uid: number; gid: number; size: number; mtime: number; linkPath?: string }): Buffer {
  const block = Buffer.alloc(512);
  const put = (text: string, offset: number, length: number) => {
    const bytes = Buffer.from(text, "utf8");
    bytes.copy(block, offset, 0, Math.min(bytes.length, length));
  };
  const octal = (value: number, offset: number, length: number) => put(value.toString(8).padStart(length - 1, "0") + "\0", offset, length);
  put(name, 0, 100);
  octal(fields.mode, 100, 8);
  octal(fields.uid, 108, 8);
  octal(fields.gid, 116, 8);
  octal(fields.size, 124, 12);
  octal(fields.mtime, 136, 12);
  put(flag, 156, 1);
  put(fields.linkPath ?? "", 157, 100);
  put("ustar\0", 257, 6);
  put("00", 263, 2);
  block.fill(0x20, 148, 156);
  let sum = 0;
  for (const byte of block) sum += byte;
  put(sum.toString(8).padStart(6, "0") + "\0 ", 148, 8);
  return block;
}

function pad(data: Buffer): Buffer[] {
  const rest = (512 - (data.length % 512)) % 512;
  return rest ? [data, Buffer.alloc(rest)] : [data];
}

function paxRecords(records: Record<string, string | Buffer>): Buffer {
  const parts: Buffer[] = [];
  for (const [key, value] of Object.entries(records)) {
    const body = Buffer.concat([Buffer.from(` ${key}=`, "utf8"), typeof value === "string" ? Buffer.from(value, "utf8") : value, Buffer.from("\n")]);
    let length = body.length + 1;
    while (String(length).length + body.length !== length) length = String(length).length + body.length;
    parts.push(Buffer.from(String(length)), body);
  }
  return Buffer.concat(parts);
}

/** An uncompressed tar archive of `entries`, in order, with end-of-archive blocks. */
export function writeTar(entries: TarSpecEntry[]): Buffer {
  const out: Buffer[] = [];
  for (const entry of entries) {
    const type = entry.type ?? "file";
    const data = type === "file" ? Buffer.from(entry.data ?? "") : Buffer.alloc(0);
    const fields = {
      mode: entry.mode ?? (type === "directory" ? 0o755 : 0o644),
      uid: entry.uid ?? 0,
      gid: entry.gid ?? 0,
      size: data.length,
      mtime: entry.mtime ?? 1_700_000_000,
      linkPath: entry.linkPath,
    };
    const pax: Record<string, string | Buffer> = { ...entry.pax };
    let name = entry.path;
    const long = Buffer.byteLength(name) > 100;
    const longLink = Buffer.byteLength(entry.linkPath ?? "") > 100;
    if ((long || longLink) && entry.longNames === "gnu") {
      if (long) {
        const nameData = Buffer.from(name + "\0");
        out.push(header("././@LongLink", "L", { mode: 0, uid: 0, gid: 0, size: nameData.length, mtime: 0 }), ...pad(nameData));
      }
      if (longLink) {
        const linkData = Buffer.from(entry.linkPath + "\0");
        out.push(header("././@LongLink", "K", { mode: 0, uid: 0, gid: 0, size: linkData.length, mtime: 0 }), ...pad(linkData));
      }
      name = name.slice(0, 100);
    } else {
      if (long) {
        pax.path = name;
        name = name.slice(0, 100);
      }
      if (longLink) pax.linkpath = entry.linkPath!;
    }
    if (Object.keys(pax).length > 0) {
      const records = paxRecords(pax);
      out.push(header(`PaxHeaders/${name.slice(0, 80)}`, "x", { mode: 0o644, uid: 0, gid: 0, size: records.length, mtime: 0 }), ...pad(records));
    }
    out.push(header(name, typeFlags[type], { ...fields, linkPath: longLink ? "" : entry.linkPath }));
    if (data.length) out.push(...pad(data));
  }
  out.push(Buffer.alloc(1024));
  return Buffer.concat(out);
}

export type Compression = "gzip" | "zstd" | "none";

export const MEDIA = {
  ociIndex: "application/vnd.oci.image.index.v1+json",
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",
  dockerList: "application/vnd.docker.distribution.manifest.list.v2+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  dockerConfig: "application/vnd.docker.container.image.v1+json",
} as const;

export function sha256(data: Buffer | string): string {
  return `sha256:${createHash("sha256").update(data).digest("hex")}`;
}

export interface Blob {
  mediaType: string;
  digest: string;
  size: number;
  data: Buffer;
}

export function blob(mediaType: string, data: Buffer): Blob {
  return { mediaType, digest: sha256(data), size: data.length, data };
}

/** A layer blob: the tar compressed as asked (zstd through Debian's `zstd` binary). */
export function layerBlob(tar: Buffer, compression: Compression = "gzip", format: "oci" | "docker" = "oci"): Blob & { diffId: string } {
  let data: Buffer;
  let mediaType: string;
  if (compression === "gzip") {
    data = zlib.gzipSync(tar);
    mediaType = format === "oci" ? "application/vnd.oci.image.layer.v1.tar+gzip" : "application/vnd.docker.image.rootfs.diff.tar.gzip";
  } else if (compression === "zstd") {
    const result = spawnSync("zstd", ["-q", "-c", "-"], { input: tar, maxBuffer: 1 << 30 });
    if (result.status !== 0) throw new Error(`zstd failed: ${result.stderr}`);
    data = result.stdout;
    mediaType = "application/vnd.oci.image.layer.v1.tar+zstd";
  } else {
    data = tar;
    mediaType = format === "oci" ? "application/vnd.oci.image.layer.v1.tar" : "application/vnd.docker.image.rootfs.diff.tar";
  }
  return { ...blob(mediaType, data), diffId: sha256(tar) };
}

export interface TestImageSpec {
  layers: Array<{ entries: TarSpecEntry[]; compression?: Compression } | { tar: Buffer; compression?: Compression }>;
  /** Merged into the config's `config` object (Env, Cmd, WorkingDir, User, Entrypoint). */
  config?: Record<string, unknown>;
  architecture?: string;
  os?: string;
  /** Manifest flavour. Default "oci". */
  format?: "oci" | "docker";
}

export interface TestImage {
  manifest: Blob;
  config: Blob;
  layers: Array<Blob & { diffId: string }>;
  /** Every blob to upload: config and layers. */
  blobs: Blob[];
}

/** An image (config, layers, manifest) as a registry would store it. */
export function buildImage(spec: TestImageSpec): TestImage {
  const format = spec.format ?? "oci";
  const layers = spec.layers.map((layer) => layerBlob("tar" in layer ? layer.tar : writeTar(layer.entries), layer.compression ?? "gzip", format));
  const configJson = {
    architecture: spec.architecture ?? "amd64",
    os: spec.os ?? "linux",
    created: "2024-01-01T00:00:00Z",
    config: { Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], ...spec.config },
    rootfs: { type: "layers", diff_ids: layers.map((layer) => layer.diffId) },
    history: layers.map(() => ({ created_by: "test" })),
  };
  const config = blob(format === "oci" ? MEDIA.ociConfig : MEDIA.dockerConfig, Buffer.from(JSON.stringify(configJson)));
  const manifestJson = {
    schemaVersion: 2,
    mediaType: format === "oci" ? MEDIA.ociManifest : MEDIA.dockerManifest,
    config: { mediaType: config.mediaType, digest: config.digest, size: config.size },
    layers: layers.map((layer) => ({ mediaType: layer.mediaType, digest: layer.digest, size: layer.size })),
  };
  const manifest = blob(manifestJson.mediaType, Buffer.from(JSON.stringify(manifestJson)));
  return { manifest, config, layers, blobs: [config, ...layers] };
}

/** An image index (OCI or Docker manifest list) over platform manifests. */
export function buildIndex(entries: Array<{ image: TestImage; architecture: string; os?: string; variant?: string }>, format: "oci" | "docker" = "oci"): Blob {
  const json = {
    schemaVersion: 2,
    mediaType: format === "oci" ? MEDIA.ociIndex : MEDIA.dockerList,
    manifests: entries.map(({ image, architecture, os, variant }) => ({
      mediaType: image.manifest.mediaType,
      digest: image.manifest.digest,
      size: image.manifest.size,
      platform: { architecture, os: os ?? "linux", ...(variant ? { variant } : {}) },
    })),
  };
  return blob(json.mediaType, Buffer.from(JSON.stringify(json)));
}

/** Writes an OCI image layout directory (oci-layout, index.json, blobs/sha256/…) holding `images`. */
export function writeOciLayout(dir: string, top: Blob, images: TestImage[], refName?: string): void {
  fs.mkdirSync(path.join(dir, "blobs", "sha256"), { recursive: true });
  fs.writeFileSync(path.join(dir, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  const put = (b: Blob) => fs.writeFileSync(path.join(dir, "blobs", "sha256", b.digest.slice("sha256:".length)), b.data);
  for (const image of images) {
    put(image.manifest);
    image.blobs.forEach(put);
  }
  put(top);
  const index = {
    schemaVersion: 2,
    mediaType: MEDIA.ociIndex,
    manifests: [{ mediaType: top.mediaType, digest: top.digest, size: top.size, ...(refName ? { annotations: { "org.opencontainers.image.ref.name": refName } } : {}) }],
  };
  fs.writeFileSync(path.join(dir, "index.json"), JSON.stringify(index));
}

/**
 * A `docker save` tarball in the classic layout: manifest.json, `<config hex>.json` and
 * `<n>/layer.tar` (uncompressed, as docker writes them).
 */
export function writeDockerSave(file: string, image: TestImage, repoTags: string[] = ["test/image:latest"]): void {
  const entries: TarSpecEntry[] = [];
  const layerPaths: string[] = [];
  image.layers.forEach((layer, i) => {
    const tar = layer.mediaType.endsWith("gzip") ? zlib.gunzipSync(layer.data) : layer.mediaType.endsWith("zstd") ? spawnSync("zstd", ["-d", "-q", "-c", "-"], { input: layer.data, maxBuffer: 1 << 30 }).stdout : layer.data;
    const dir = `${String(i).padStart(2, "0")}${"0".repeat(62)}`;
    entries.push({ path: `${dir}/`, type: "directory" }, { path: `${dir}/layer.tar`, data: tar }, { path: `${dir}/VERSION`, data: "1.0" });
    layerPaths.push(`${dir}/layer.tar`);
  });
  const configName = `${image.config.digest.slice("sha256:".length)}.json`;
  entries.push({ path: configName, data: image.config.data });
  entries.push({ path: "manifest.json", data: JSON.stringify([{ Config: configName, RepoTags: repoTags, Layers: layerPaths }]) });
  fs.writeFileSync(file, writeTar(entries));
}
