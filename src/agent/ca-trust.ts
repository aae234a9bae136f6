/**
 * Makes the sandbox trust Cubicle's CA (handed over in `/init`'s `caCertificates`), so the
 * egress proxy's TLS interception is accepted whatever the template: the certificates are added
 * to the system bundle (Debian's `/etc/ssl/certs/ca-certificates.crt`, which OpenSSL, curl and
 * Python's ssl read) and kept in `/usr/local/share/ca-certificates/cubicle-ca.crt` (which
 * `update-ca-certificates` folds into a rebuilt bundle); processes the agent starts get the
 * variables that point Python's requests, Node and curl at them.
 *
 * The agent runs as root in the sandbox, whose users may plant symlinks: no file is opened
 * through a symlink in its last component (O_NOFOLLOW), and what is written is replaced by a
 * rename, which replaces a symlink rather than following it.
 */
import { X509Certificate, randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { CubicleError } from "../shared/cubicle-error.js";

export const SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt";
export const CUBICLE_CA_FILE = "/usr/local/share/ca-certificates/cubicle-ca.crt";

/** A system bundle larger than this is not read (Debian's is about 200 KiB). */
const MAX_BUNDLE_BYTES = 16 * 1024 * 1024;

const pemBlock = /-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----/g;

/** The whitespace-free base64 bodies of the PEM certificates in `text`. */
function certificateBodies(text: string): string[] {
  return [...text.matchAll(pemBlock)].map((m) => m[1]!.replace(/\s+/g, ""));
}

/** Reads a regular file without following a symlink in its last component; undefined when absent. */
function readRegularFile(file: string, maxBytes: number): string | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return undefined;
    if (code === "ELOOP") throw new CubicleError("failed_precondition", `${file} is a symlink; not following it`);
    throw err;
  }
  try {
    const stat = fs.fstatSync(fd);
    if (!stat.isFile()) throw new CubicleError("failed_precondition", `${file} is not a regular file`);
    if (stat.size > maxBytes) throw new CubicleError("failed_precondition", `${file} is larger than ${maxBytes} bytes`);
    return fs.readFileSync(fd, "utf8");
  } finally {
    fs.closeSync(fd);
  }
}

/** Appends to a regular file without following a symlink in its last component. */
function appendToRegularFile(file: string, text: string): void {
  const fd = fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  try {
    if (!fs.fstatSync(fd).isFile()) throw new CubicleError("failed_precondition", `${file} is not a regular file`);
    fs.writeSync(fd, text);
  } finally {
    fs.closeSync(fd);
  }
}

/** Writes `file` (0644) by a rename from a fresh temporary file beside it. */
function replaceFile(file: string, text: string): void {
  fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o755 });
  const temporary = path.join(path.dirname(file), `.${path.basename(file)}.${randomBytes(6).toString("hex")}`);
  try {
    fs.writeFileSync(temporary, text, { mode: 0o644, flag: "wx" });
    fs.renameSync(temporary, file);
  } finally {
    fs.rmSync(temporary, { force: true });
  }
}

export interface InstalledTrust {
  /** Whether the system bundle existed and now holds the certificates. */
  systemBundle: boolean;
  /** What processes the agent starts get, under their own env (paths as seen in the sandbox). */
  env: Record<string, string>;
}

/**
 * Installs `pem` (PEM CERTIFICATE blocks, normalised by the `/init` parser) under `root` (the
 * sandbox's `/`; tests pass a temporary directory). Idempotent: certificates already in the
 * bundle are not added again. Throws a CubicleError when a certificate does not parse or a file
 * is not what it should be (a symlink, a directory).
 */
export function installCaCertificates(pem: string, root = "/"): InstalledTrust {
  const bodies = certificateBodies(pem);
  if (bodies.length === 0) throw new CubicleError("invalid_argument", "no PEM certificate to install");
  for (const body of bodies) {
    try {
      new X509Certificate(Buffer.from(body, "base64"));
    } catch (err) {
      throw new CubicleError("invalid_argument", `a CA certificate does not parse: ${(err as Error).message}`, { cause: err });
    }
  }
  const ownFile = path.join(root, CUBICLE_CA_FILE);
  let current: string | undefined;
  try {
    current = readRegularFile(ownFile, MAX_BUNDLE_BYTES);
  } catch {
    // A symlink or something else planted there: replaced below, never written through.
  }
  if (current !== pem) replaceFile(ownFile, pem);

  const bundleFile = path.join(root, SYSTEM_BUNDLE);
  const bundle = readRegularFile(bundleFile, MAX_BUNDLE_BYTES);
  if (bundle !== undefined) {
    const present = new Set(certificateBodies(bundle));
    const missing = [...pem.matchAll(pemBlock)].filter((m) => !present.has(m[1]!.replace(/\s+/g, ""))).map((m) => m[0] + "\n");
    if (missing.length > 0) appendToRegularFile(bundleFile, (bundle === "" || bundle.endsWith("\n") ? "" : "\n") + missing.join(""));
  }
  // NODE_EXTRA_CA_CERTS adds to Node's own roots: Cubicle's CA alone is enough there. The others
  // replace a client's roots, so they name the whole bundle, and only when there is one.
  const env: Record<string, string> = { NODE_EXTRA_CA_CERTS: CUBICLE_CA_FILE };
  if (bundle !== undefined) {
    env.SSL_CERT_FILE = SYSTEM_BUNDLE;
    env.REQUESTS_CA_BUNDLE = SYSTEM_BUNDLE;
    env.CURL_CA_BUNDLE = SYSTEM_BUNDLE;
  }
  return { systemBundle: bundle !== undefined, env };
}
