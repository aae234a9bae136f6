import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { CubicleError } from "../shared/cubicle-error.js";

/** AES-256: the key file holds exactly this many random bytes, nothing else. */
export const SECRET_KEY_BYTES = 32;

export const SECRET_KEY_FILE = "secrets.key";

/**
 * The key that seals stored secrets: `<stateDir>/secrets.key`, 32 random bytes, 0600, made on
 * first use. A file of another size is refused (a truncated copy, a text file put there by
 * hand): the server must not start and seal new secrets with a key it cannot use again.
 */
export function loadOrCreateSecretKey(stateDir: string): Buffer {
  const file = path.join(stateDir, SECRET_KEY_FILE);
  const existing = readKeyFile(file);
  if (existing) return existing;
  // Written aside and linked into place: a crash never leaves a short key file, and of two
  // processes starting at once, one key wins and both use it.
  const pending = `${file}.${process.pid}.tmp`;
  fs.rmSync(pending, { force: true });
  const fd = fs.openSync(pending, fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_WRONLY, 0o600);
  try {
    fs.writeSync(fd, randomBytes(SECRET_KEY_BYTES));
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  try {
    fs.linkSync(pending, file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
  } finally {
    fs.rmSync(pending, { force: true });
  }
  const created = readKeyFile(file);
  if (!created) throw new CubicleError("internal", `${file} vanished right after it was created`);
  return created;
}

function readKeyFile(file: string): Buffer | undefined {
  let key: Buffer;
  try {
    key = fs.readFileSync(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw new CubicleError("failed_precondition", `cannot read the secrets key ${file}: ${(err as Error).message}`, { cause: err });
  }
  if (key.length !== SECRET_KEY_BYTES) {
    throw new CubicleError(
      "failed_precondition",
      `${file} holds ${key.length} bytes, not the ${SECRET_KEY_BYTES} random bytes of a Cubicle secrets key: put the original file back ` +
        `(the secrets in the database can be decrypted with it only); the server does not start with this one.`,
    );
  }
  if ((fs.statSync(file).mode & 0o077) !== 0) fs.chmodSync(file, 0o600);
  return key;
}
