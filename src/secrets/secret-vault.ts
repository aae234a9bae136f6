import { createCipheriv, createDecipheriv, randomBytes } from "node:crypto";
import type { SecretResolver } from "../network/egress-types.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";
import type { SecretRecord, Store } from "../store/index.js";
import { SECRET_ID_PREFIX, type NewSecretInput, type SecretUpdateInput } from "./secret-input.js";
import { SECRET_KEY_BYTES } from "./secret-key.js";

const log = createLogger("secrets");

/** Most secrets a server keeps: the vault holds them all (sealed) in memory, ≤ ~72 KiB each. */
export const MAX_SECRETS = 1000;

const IV_BYTES = 12;

/** A secret as the API shows it: never its value. */
export interface SecretInfo {
  secretId: string;
  name: string;
  currentVersion: number;
  metadata: Record<string, string>;
  /** Epoch ms. */
  createdAt: number;
  updatedAt: number;
}

interface Sealed {
  iv: Buffer;
  ciphertext: Buffer;
  authTag: Buffer;
}

/** AES-256-GCM with a fresh IV; the secret id is the associated data, so a value cannot be moved to another secret's row. */
function seal(key: Buffer, secretId: string, value: string): Sealed {
  const iv = randomBytes(IV_BYTES);
  const cipher = createCipheriv("aes-256-gcm", key, iv);
  cipher.setAAD(Buffer.from(secretId, "utf8"));
  const ciphertext = Buffer.concat([cipher.update(value, "utf8"), cipher.final()]);
  return { iv, ciphertext, authTag: cipher.getAuthTag() };
}

/** Throws when the key, the id, or any stored byte is not what sealed it. */
function unseal(key: Buffer, record: SecretRecord): string {
  const decipher = createDecipheriv("aes-256-gcm", key, record.iv);
  decipher.setAAD(Buffer.from(record.secretId, "utf8"));
  decipher.setAuthTag(record.authTag);
  return Buffer.concat([decipher.update(record.ciphertext), decipher.final()]).toString("utf8");
}

function infoOf(record: SecretRecord): SecretInfo {
  const { secretId, name, currentVersion, metadata, createdAt, updatedAt } = record;
  return { secretId, name, currentVersion, metadata, createdAt, updatedAt };
}

export interface SecretVaultOptions {
  /** Epoch ms; injected by tests. */
  now?: () => number;
}

/**
 * The project's secrets (E2B `Secret`): stored sealed in the store, only the current version's
 * value kept. Every sealed record is also held here, so the egress proxy can resolve a
 * `${e2b.secrets.<name>}` placeholder synchronously (`resolveSecret`) while the store's
 * interface stays async. This vault is the only writer of the store's secrets.
 */
export class SecretVault {
  private readonly byId = new Map<string, SecretRecord>();
  private readonly idByName = new Map<string, string>();
  private readonly now: () => number;

  private constructor(
    private readonly store: Store,
    private readonly key: Buffer,
    options: SecretVaultOptions,
  ) {
    this.now = options.now ?? Date.now;
  }

  /**
   * Loads the stored secrets. Refuses (failed_precondition) a key that opens none of them: a
   * replaced or regenerated secrets.key would otherwise seal new secrets beside unreadable ones.
   */
  static async open(store: Store, key: Buffer, options: SecretVaultOptions = {}): Promise<SecretVault> {
    if (key.length !== SECRET_KEY_BYTES) throw new CubicleError("internal", `a secrets key is ${SECRET_KEY_BYTES} bytes, not ${key.length}`);
    const vault = new SecretVault(store, Buffer.from(key), options);
    for (const record of await store.querySecrets({})) vault.remember(record);
    // A wrong key opens none of them; one damaged row (which then resolves to nothing) must not
    // stop the server, so the key is refused only when no stored secret opens.
    let failure: unknown;
    for (const record of vault.byId.values()) {
      try {
        unseal(vault.key, record);
        failure = undefined;
        break;
      } catch (err) {
        failure ??= { err, record };
      }
    }
    if (failure) {
      const { err, record } = failure as { err: unknown; record: SecretRecord };
      throw new CubicleError(
        "failed_precondition",
        `secrets.key in the state directory does not decrypt the ${vault.byId.size} stored secret(s) (secret ${record.secretId}): put back the key file they were stored with`,
        { cause: err },
      );
    }
    return vault;
  }

  get size(): number {
    return this.byId.size;
  }

  async create(input: NewSecretInput): Promise<SecretInfo> {
    if (this.idByName.has(input.name)) throw new CubicleError("already_exists", `a secret named "${input.name}" already exists: update it, or delete it first`);
    if (this.byId.size >= MAX_SECRETS) throw new CubicleError("failed_precondition", `this server keeps at most ${MAX_SECRETS} secrets: delete one first`);
    const secretId = SECRET_ID_PREFIX + randomBytes(12).toString("hex");
    const at = this.now();
    const record: SecretRecord = { secretId, name: input.name, currentVersion: 1, ...seal(this.key, secretId, input.value), metadata: input.metadata, createdAt: at, updatedAt: at };
    await this.store.insertSecret(record);
    this.remember(record);
    log.info("secret created", { secretId, name: record.name });
    return infoOf(record);
  }

  /** Replaces the value (version + 1) and, when given, the metadata. */
  async update(ref: string, input: SecretUpdateInput): Promise<SecretInfo> {
    const current = this.find(ref);
    const updated = await this.store.updateSecretValue(current.secretId, { ...seal(this.key, current.secretId, input.value), metadata: input.metadata, updatedAt: this.now() });
    if (!updated) {
      this.forget(current.secretId);
      throw new CubicleError("not_found", `secret ${shownRef(ref)} not found`);
    }
    this.remember(updated);
    log.info("secret updated", { secretId: updated.secretId, name: updated.name, version: updated.currentVersion });
    return infoOf(updated);
  }

  /** By id (`sec_…`) or name; names are matched lower-case. Throws not_found. */
  info(ref: string): SecretInfo {
    return infoOf(this.find(ref));
  }

  /** Oldest first; `after` is the last secret of the previous page. */
  async list(query: { after?: { createdAt: number; secretId: string }; limit: number }): Promise<SecretInfo[]> {
    return (await this.store.querySecrets(query)).map(infoOf);
  }

  /** False when there is no such secret. */
  async delete(ref: string): Promise<boolean> {
    const record = this.lookup(ref);
    if (!record) return false;
    const deleted = await this.store.deleteSecret(record.secretId);
    this.forget(record.secretId);
    if (deleted) log.info("secret deleted", { secretId: record.secretId, name: record.name });
    return deleted;
  }

  /** The current value of the secret of that name (matched lower-case), for the egress proxy; undefined when there is none. */
  readonly resolveSecret: SecretResolver = (name: string): string | undefined => {
    const secretId = this.idByName.get(name.toLowerCase());
    const record = secretId === undefined ? undefined : this.byId.get(secretId);
    if (!record) return undefined;
    try {
      return unseal(this.key, record);
    } catch (err) {
      log.error("a stored secret does not decrypt: its row was changed outside Cubicle", { secretId: record.secretId, error: String(err) });
      return undefined;
    }
  };

  private lookup(ref: string): SecretRecord | undefined {
    const key = ref.toLowerCase();
    const secretId = key.startsWith(SECRET_ID_PREFIX) ? key : this.idByName.get(key);
    return secretId === undefined ? undefined : this.byId.get(secretId);
  }

  private find(ref: string): SecretRecord {
    const record = this.lookup(ref);
    if (!record) throw new CubicleError("not_found", `secret ${shownRef(ref)} not found`);
    return record;
  }

  private remember(record: SecretRecord): void {
    const previous = this.byId.get(record.secretId);
    if (previous && previous.name !== record.name) this.idByName.delete(previous.name);
    this.byId.set(record.secretId, record);
    this.idByName.set(record.name, record.secretId);
  }

  private forget(secretId: string): void {
    const record = this.byId.get(secretId);
    if (!record) return;
    this.byId.delete(secretId);
    if (this.idByName.get(record.name) === secretId) this.idByName.delete(record.name);
  }
}

function shownRef(ref: string): string {
  return JSON.stringify(ref.length > 100 ? ref.slice(0, 100) + "…" : ref);
}
