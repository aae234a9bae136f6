import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import type { CubicleConfig } from "../shared/config.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { parseTemplateName } from "../template/builder/build-spec.js";
import { ImageBases } from "../template/builder/image-bases.js";
import { newTemplateId } from "../template/builder/template-builder.js";
import { findRecipe } from "../template/recipe.js";
import type { TemplateRecord, TemplateRecordStore } from "../store/types.js";
import type { RegistryCredentials } from "../template/oci/registry-client.js";

/** The registry credentials file (CUBICLE_REGISTRY_AUTH_FILE), read at each pull so edits apply; never logged. */
function readAuthFile(file: string): Record<string, RegistryCredentials> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch (err) {
    throw new CubicleError("failed_precondition", `the registry credentials file ${file} is not readable JSON (${(err as NodeJS.ErrnoException).code ?? "parse error"})`);
  }
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new CubicleError("failed_precondition", `the registry credentials file ${file} must hold an object by registry host`);
  const auth: Record<string, RegistryCredentials> = {};
  for (const [host, value] of Object.entries(parsed)) {
    const entry = value as { username?: unknown; password?: unknown };
    if (typeof entry?.username !== "string" || typeof entry.password !== "string") {
      throw new CubicleError("failed_precondition", `the registry credentials file ${file}: the entry for ${host} needs a username and a password (strings)`);
    }
    auth[host] = { username: entry.username, password: entry.password };
  }
  return auth;
}

/** The image bases of this server's state directory, with its registry settings. */
export function imageBasesFor(config: Pick<CubicleConfig, "stateDir" | "registry" | "distDir">): ImageBases {
  const { registry } = config;
  return new ImageBases({
    dir: path.join(config.stateDir, "images"),
    blobCacheDir: path.join(config.stateDir, "image-blobs"),
    xattrAddon: path.join(config.distDir, "agent", "xattr.node"),
    registryHosts: {
      insecure: registry.insecure,
      ...(registry.mirror ? { mirror: registry.mirror } : {}),
      get auth() {
        return registry.authFile ? readAuthFile(registry.authFile) : undefined;
      },
    },
  });
}

/**
 * `./cubicle template import SOURCE --name NAME [--image REF]`: a `docker save` tarball or an
 * OCI layout directory becomes the template NAME (no steps: the image as it is, its config's
 * user, workdir, env and start command), which builds can extend with `fromTemplate(NAME)`.
 * Runs on the host, beside the server (which sees the new template at its next look).
 */
export async function importTemplate(config: Pick<CubicleConfig, "stateDir" | "registry" | "distDir">, records: TemplateRecordStore, source: string, name: string, image?: string): Promise<string> {
  const { name: templateName } = parseTemplateName(name);
  if (findRecipe(templateName)) throw new CubicleError("already_exists", `"${templateName}" is one of Cubicle's built-in templates; choose another name`);
  const base = await imageBasesFor(config).import(source, image);
  const existing = (await records.listTemplates()).find((t) => t.source === "build" && (t.templateId === templateName || t.aliases.includes(templateName)));
  const templateId = existing?.templateId ?? newTemplateId();
  const record: TemplateRecord = {
    templateId,
    aliases: [templateName],
    defaultUser: base.user ?? "user",
    defaultWorkdir: base.workdir ?? "/home/user",
    env: { PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", ...base.env },
    cpuCount: 2,
    memoryMB: 1024,
    diskSizeMB: 4096,
    runtime: "container",
    recipeHash: createHash("sha256").update(`image:${base.digest}\n${base.startCmd ?? ""}`).digest("hex"),
    builtAt: new Date().toISOString(),
    sizeBytes: 0,
    source: "build",
    rootfsDir: base.rootfsDir,
    ...(base.startCmd ? { startCmd: base.startCmd } : {}),
    tags: {},
    public: false,
  };
  // The server sees it at its next look at the store's template version.
  await records.putTemplate(record);
  return templateId;
}
