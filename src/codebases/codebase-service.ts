import { randomBytes } from "node:crypto";
import { realpath, stat } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import type { CodebaseLevel, CodebaseMount, CodebaseRecord, CodebaseStore } from "../store/index.js";
import type { VolumeService } from "../volumes/volume-service.js";

const log = createLogger("codebases");

/**
 * CODEBASES_NOTE: a codebase (a Cubicle extension, after AgentFense) is a host directory under
 * one of the operator's CUBICLE_CODEBASE_ROOTS, or a volume, registered by name. A create's
 * `codebaseMounts` mounts one into the sandbox with a permission table of glob rules: each
 * mount is served by its own `codebase-fs` (FUSE) process on the host, outside the sandbox,
 * which answers every lookup, listing, open and change by the most specific rule (none:
 * invisible; view: listed, not readable; read; write), so root inside the sandbox cannot get
 * past it: the files are not in the sandbox at all, only the daemon's answers. Changes through
 * `write` paths land in the codebase at once. The daemon never follows a symlink on the host
 * side, and refuses directory renames (EXDEV: `mv` then copies file by file, each checked).
 */
export const CODEBASE_BOUNDS = {
  nameChars: 63,
  rules: 1000,
  patternChars: 256,
} as const;

const LEVELS: readonly CodebaseLevel[] = ["none", "view", "read", "write"];
const NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]*$/;

export interface CodebaseServiceOptions {
  store: CodebaseStore;
  volumes: VolumeService;
  /** Host directories codebases may be registered under (CUBICLE_CODEBASE_ROOTS); none: volumes only. */
  hostRoots: readonly string[];
}

export class CodebaseService {
  /** A live sandbox that mounts the codebase, if any: such a codebase is not deleted. Set once sandboxes exist. */
  mountedBy: (codebaseId: string) => string | undefined = () => undefined;

  constructor(private readonly options: CodebaseServiceOptions) {}

  async register(input: unknown): Promise<CodebaseRecord> {
    if (typeof input !== "object" || input === null || Array.isArray(input)) throw new CubicleError("invalid_argument", "the body must be a JSON object: {name, hostPath} or {name, volume}");
    const body = input as Record<string, unknown>;
    for (const key of Object.keys(body)) {
      if (!["name", "hostPath", "volume"].includes(key)) throw new CubicleError("invalid_argument", `${JSON.stringify(key.slice(0, 64))} is not a codebase field (name, hostPath, volume)`);
    }
    const name = body.name;
    if (typeof name !== "string" || name.length === 0 || name.length > CODEBASE_BOUNDS.nameChars || !NAME.test(name)) {
      throw new CubicleError("invalid_argument", `name must be 1-${CODEBASE_BOUNDS.nameChars} letters, digits, '.', '_' or '-', not starting with '.' or '-'`);
    }
    if ((body.hostPath === undefined) === (body.volume === undefined)) throw new CubicleError("invalid_argument", "give exactly one of hostPath (a host directory) and volume (a volume's name or id)");
    let source: CodebaseRecord["source"];
    if (body.volume !== undefined) {
      if (typeof body.volume !== "string") throw new CubicleError("invalid_argument", "volume must be a volume's name or id");
      const [mount] = await this.options.volumes.resolveMounts([{ name: body.volume, path: "/" }]);
      source = { kind: "volume", volumeId: mount!.volumeId };
    } else {
      source = { kind: "host", path: await this.checkHostPath(body.hostPath) };
    }
    if ((await this.options.store.listCodebases()).some((codebase) => codebase.name === name)) throw new CubicleError("already_exists", `a codebase named "${name}" already exists`);
    const record: CodebaseRecord = { codebaseId: `cb_${randomBytes(12).toString("hex")}`, name, source, createdAt: Date.now() };
    await this.options.store.insertCodebase(record);
    log.info("codebase registered", { codebaseId: record.codebaseId, name, source: source.kind });
    return record;
  }

  list(): Promise<CodebaseRecord[]> {
    return this.options.store.listCodebases();
  }

  /** By name or id, or not_found. */
  async get(nameOrId: string): Promise<CodebaseRecord> {
    const found = (await this.options.store.listCodebases()).find((codebase) => codebase.codebaseId === nameOrId || codebase.name === nameOrId);
    if (!found) throw new CubicleError("not_found", `codebase "${nameOrId.slice(0, 64)}" not found`);
    return found;
  }

  /** Unregisters it (its files stay where they are); refused while a sandbox mounts it. */
  async delete(nameOrId: string): Promise<boolean> {
    const found = (await this.options.store.listCodebases()).find((codebase) => codebase.codebaseId === nameOrId || codebase.name === nameOrId);
    if (!found) return false;
    const user = this.mountedBy(found.codebaseId);
    if (user) throw new CubicleError("failed_precondition", `codebase "${found.name}" is mounted by sandbox ${user}: kill the sandbox first`);
    return this.options.store.deleteCodebase(found.codebaseId);
  }

  /** Codebases that use a volume (it is not deleted under them). */
  async usingVolume(volumeId: string): Promise<string | undefined> {
    return (await this.options.store.listCodebases()).find((codebase) => codebase.source.kind === "volume" && codebase.source.volumeId === volumeId)?.name;
  }

  /** The directory the codebase's files are in, on the host. */
  sourceDir(record: CodebaseRecord): string {
    return record.source.kind === "host" ? record.source.path : this.options.volumes.dirOf(record.source.volumeId);
  }

  /** A create's `codebaseMounts` resolved (codebases by name or id); invalid_argument for one that does not exist. */
  async resolveMounts(mounts: readonly { codebase: string; path: string; rules: CodebaseMount["rules"]; defaultLevel: CodebaseLevel }[]): Promise<CodebaseMount[]> {
    const all = await this.options.store.listCodebases();
    return mounts.map((mount) => {
      const codebase = all.find((candidate) => candidate.name === mount.codebase || candidate.codebaseId === mount.codebase);
      if (!codebase) throw new CubicleError("invalid_argument", `codebaseMounts: there is no codebase named "${mount.codebase.slice(0, 64)}"; register it first (POST /codebases)`);
      return { codebaseId: codebase.codebaseId, name: codebase.name, sourceDir: this.sourceDir(codebase), path: mount.path, rules: mount.rules, defaultLevel: mount.defaultLevel };
    });
  }

  private async checkHostPath(value: unknown): Promise<string> {
    if (typeof value !== "string" || !path.isAbsolute(value) || value.includes("\0")) throw new CubicleError("invalid_argument", "hostPath must be an absolute path");
    if (this.options.hostRoots.length === 0) throw new CubicleError("failed_precondition", "this server takes no host directories as codebases (CUBICLE_CODEBASE_ROOTS is empty): register a volume instead");
    let real: string;
    try {
      real = await realpath(value);
      if (!(await stat(real)).isDirectory()) throw new Error("not a directory");
    } catch {
      throw new CubicleError("invalid_argument", "hostPath must be an existing directory");
    }
    const roots = await Promise.all(this.options.hostRoots.map((root) => realpath(root).catch(() => undefined)));
    if (!roots.some((root) => root !== undefined && (real === root || real.startsWith(`${root}/`)))) {
      throw new CubicleError("failed_precondition", "hostPath is not under any of the server's CUBICLE_CODEBASE_ROOTS");
    }
    return real;
  }
}

/** `level` checked: one of AgentFense's four. */
export function codebaseLevel(value: unknown, where: string): CodebaseLevel {
  if (typeof value !== "string" || !LEVELS.includes(value as CodebaseLevel)) throw new CubicleError("invalid_argument", `${where} must be one of ${LEVELS.join(", ")}`);
  return value as CodebaseLevel;
}
