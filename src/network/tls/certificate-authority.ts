/**
 * Cubicle's own certificate authority: one EC P-256 CA per state directory, made once with the
 * `openssl` CLI, and the leaf certificates it signs for the HTTPS listener (a wildcard for the
 * sandbox domain) and for the egress proxy's TLS interception (one per SNI). Clients trust the
 * CA by its certificate file (`NODE_EXTRA_CA_CERTS`, `SSL_CERT_FILE`); sandboxes get it through
 * the agent's `/init`.
 */
import { generateKeyPairSync, randomBytes, X509Certificate, createPrivateKey } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand, type RunOptions, type RunResult } from "../../shared/exec.js";
import { createLogger } from "../../shared/log.js";

const log = createLogger("ca");

export interface IssuedCertificate {
  /** PEM private key of the leaf (the same key for every leaf this CA object issues). */
  key: string;
  /** PEM leaf certificate, signed by the CA. */
  cert: string;
}

export interface CertificateAuthority {
  /** The CA certificate's file: what clients are told to trust. */
  certPath: string;
  certificatePem: string;
  /**
   * A leaf certificate for `hostnames` (DNS names, `*.example.com` wildcards), valid ~90 days.
   * Cached per sorted name list; concurrent calls for the same names share one openssl run.
   * Throws an invalid_argument CubicleError for a name that is not a strict host name.
   */
  issue(hostnames: string[]): Promise<IssuedCertificate>;
}

export interface CertificateAuthorityOptions {
  /** Leaf certificates kept in memory (least recently used dropped first). Default 1000. */
  maxCachedCertificates?: number;
  /** The command runner (tests wrap the real one to count spawns). */
  run?: (argv: readonly string[], options?: RunOptions) => Promise<RunResult>;
}

const CA_DAYS = 3650;
const LEAF_DAYS = 90;
/** A cached leaf is reissued this long before it expires (a server may run for months). */
const LEAF_RENEW_BEFORE_MS = 7 * 24 * 3600 * 1000;
const OPENSSL_TIMEOUT_MS = 30_000;
/** How far before its issue a leaf's validity starts (LEAF_BACKDATE_NOTE). */
const LEAF_BACKDATE_MS = 60 * 60 * 1000;

// RFC 1123 labels: letters, digits, hyphens, not at either end.
const ldhLabel = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

/**
 * A host name as a certificate may name it, lowercased: LDH labels of at most 63 characters, at
 * most 253 in all, at least two labels when the first is `*`, and `*` only as the whole leftmost
 * label. IPv4 literals (an all-digit last label) are refused: TLS SNI never carries them.
 */
export function normalizeCertificateHostname(hostname: unknown): string {
  if (typeof hostname !== "string") throw new CubicleError("invalid_argument", "a certificate host name must be a string");
  const name = hostname.toLowerCase().replace(/\.$/, "");
  const shown = JSON.stringify(hostname.slice(0, 80));
  if (name.length === 0 || name.length > 253) throw new CubicleError("invalid_argument", `${shown} is not a host name (1 to 253 characters)`);
  const labels = name.split(".");
  const wildcard = labels[0] === "*";
  const rest = wildcard ? labels.slice(1) : labels;
  if (rest.length === 0 || (wildcard && rest.length < 2)) throw new CubicleError("invalid_argument", `${shown}: a wildcard needs a domain of two labels or more under it`);
  for (const label of rest) {
    if (!ldhLabel.test(label)) throw new CubicleError("invalid_argument", `${shown} is not a host name: each label is letters, digits and inner hyphens (at most 63), and "*" only as the whole leftmost label`);
  }
  if (/^\d+$/.test(rest[rest.length - 1]!)) throw new CubicleError("invalid_argument", `${shown} looks like an IP address, not a host name`);
  return name;
}

/**
 * The one leaf key of this CA directory (`leaf.key`, 0600): made once without a process and
 * created with link(2), which never replaces a file, so CA objects opened on the same directory
 * (the listener's, the egress proxy's) sign with the same key that they hand out.
 */
function ensureLeafKey(file: string): string {
  const existing = readIfExists(file);
  if (existing !== undefined) {
    try {
      createPrivateKey(existing);
      return existing;
    } catch {
      fs.rmSync(file, { force: true });
    }
  }
  const pem = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey.export({ type: "pkcs8", format: "pem" }).toString();
  const temporary = `${file}.tmp-${randomBytes(6).toString("hex")}`;
  try {
    fs.writeFileSync(temporary, pem, { mode: 0o600, flag: "wx" });
    try {
      fs.linkSync(temporary, file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
  } finally {
    fs.rmSync(temporary, { force: true });
  }
  return fs.readFileSync(file, "utf8");
}

function readIfExists(file: string): string | undefined {
  try {
    return fs.readFileSync(file, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
}

/** Makes the CA's key and certificate (one openssl run), then moves them into place. */
async function createCa(dir: string, keyPath: string, certPath: string, run: NonNullable<CertificateAuthorityOptions["run"]>): Promise<void> {
  const suffix = randomBytes(6).toString("hex");
  const newKey = path.join(dir, `.ca.key.new-${suffix}`);
  const newCert = path.join(dir, `.ca.crt.new-${suffix}`);
  const name = `Cubicle local CA ${randomBytes(4).toString("hex")}`;
  try {
    // Created 0600 before openssl writes into it (openssl would otherwise follow the umask).
    fs.writeFileSync(newKey, "", { mode: 0o600, flag: "wx" });
    await run(
      [
        "openssl", "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", newKey, "-out", newCert, "-days", String(CA_DAYS), "-sha256", "-config", "/dev/null",
        "-subj", `/CN=${name}`,
        "-addext", "basicConstraints=critical,CA:true",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
      ],
      { timeoutMs: OPENSSL_TIMEOUT_MS },
    );
    fs.chmodSync(newKey, 0o600);
    // The key first: a crash between the renames leaves a key without a certificate, which the
    // next start replaces; never a certificate whose key is missing.
    fs.renameSync(newKey, keyPath);
    fs.renameSync(newCert, certPath);
    log.info("made a new certificate authority", { certPath, name });
  } finally {
    fs.rmSync(newKey, { force: true });
    fs.rmSync(newCert, { force: true });
  }
}

/**
 * Opens the CA kept in `dir` (made 0700), making it on first use: `ca.key` (0600) and `ca.crt`.
 * Leaves are signed with one key pair, `dir/leaf.key` (0600), made on first use.
 */
export async function openCertificateAuthority(dir: string, options: CertificateAuthorityOptions = {}): Promise<CertificateAuthority> {
  const run = options.run ?? runCommand;
  const maxCached = Math.max(1, options.maxCachedCertificates ?? 1000);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  if ((fs.statSync(dir).mode & 0o077) !== 0) fs.chmodSync(dir, 0o700);
  const keyPath = path.join(dir, "ca.key");
  const certPath = path.join(dir, "ca.crt");

  let keyPem = readIfExists(keyPath);
  let certificatePem = readIfExists(certPath);
  if (keyPem === undefined || certificatePem === undefined) {
    await createCa(dir, keyPath, certPath, run);
    keyPem = fs.readFileSync(keyPath, "utf8");
    certificatePem = fs.readFileSync(certPath, "utf8");
  }
  if ((fs.statSync(keyPath).mode & 0o077) !== 0) fs.chmodSync(keyPath, 0o600);
  let caCertificate: X509Certificate;
  try {
    caCertificate = new X509Certificate(certificatePem);
    if (!caCertificate.ca || !caCertificate.checkPrivateKey(createPrivateKey(keyPem))) throw new Error("the key does not belong to the certificate, or it is no CA");
  } catch (err) {
    throw new CubicleError("failed_precondition", `the certificate authority in ${dir} is unusable (${(err as Error).message}); remove ca.key and ca.crt there to make a new one`, { cause: err });
  }

  const leafKeyPath = path.join(dir, "leaf.key");
  const leafKeyPem = ensureLeafKey(leafKeyPath);

  // Insertion order is recency: a hit moves its entry to the end; the first entry is evicted.
  const cache = new Map<string, { issued: Promise<IssuedCertificate>; renewAt: number }>();

  /**
   * LEAF_BACKDATE_NOTE: a leaf is valid from an hour before it is issued, as public CAs backdate
   * theirs: a microVM guest's clock may lag the host's by a second or two (its RTC has whole
   * seconds; TCG loses ticks), and to it a certificate issued "now" is "not yet valid". `openssl
   * req -x509` (3.0) has no start date, so the leaf is a request signed by `openssl ca`, with a
   * throwaway database in a directory of its own per signing.
   */
  async function sign(names: string[]): Promise<IssuedCertificate> {
    // A CN holds at most 64 characters (RFC 5280 ub-common-name); clients read the SAN anyway.
    const commonName = names[0]!.length <= 64 ? names[0]! : "Cubicle";
    const request = await run(
      [
        "openssl", "req", "-new", "-key", leafKeyPath, "-sha256", "-config", "/dev/null",
        "-subj", `/CN=${commonName}`,
        "-addext", `subjectAltName=${names.map((n) => `DNS:${n}`).join(",")}`,
        "-addext", "basicConstraints=critical,CA:false",
        "-addext", "keyUsage=critical,digitalSignature",
        "-addext", "extendedKeyUsage=serverAuth",
      ],
      { timeoutMs: OPENSSL_TIMEOUT_MS },
    );
    if (!request.stdout.includes("-----BEGIN CERTIFICATE REQUEST-----")) throw new CubicleError("internal", `openssl made no certificate request for ${names.join(", ")}`);
    const work = fs.mkdtempSync(path.join(dir, "signing-"));
    try {
      const file = (name: string) => path.join(work, name);
      fs.writeFileSync(file("request.csr"), request.stdout);
      fs.writeFileSync(file("index.txt"), "");
      // A random positive serial (RFC 5280: at most 20 octets), as `req -x509` gave each leaf.
      const serial = randomBytes(16);
      serial[0] = serial[0]! & 0x7f;
      fs.writeFileSync(file("serial"), `${serial.toString("hex")}\n`);
      fs.writeFileSync(
        file("ca.cnf"),
        [
          "[ca]", "default_ca = cubicle",
          "[cubicle]", `database = ${file("index.txt")}`, `new_certs_dir = ${work}`, `serial = ${file("serial")}`, "default_md = sha256", "policy = any", "copy_extensions = copy", "unique_subject = no", "email_in_dn = no",
          "[any]", "commonName = supplied", "",
        ].join("\n"),
      );
      const backdated = new Date(Date.now() - LEAF_BACKDATE_MS).toISOString().replace(/^\d\d(\d\d)-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d).*$/, "$1$2$3$4$5$6Z");
      await run(
        [
          "openssl", "ca", "-batch", "-config", file("ca.cnf"), "-in", file("request.csr"), "-out", file("leaf.crt"),
          "-cert", certPath, "-keyfile", keyPath, "-startdate", backdated, "-days", String(LEAF_DAYS), "-notext",
        ],
        { timeoutMs: OPENSSL_TIMEOUT_MS },
      );
      const cert = fs.readFileSync(file("leaf.crt"), "utf8");
      if (!cert.includes("-----BEGIN CERTIFICATE-----")) throw new CubicleError("internal", `openssl printed no certificate for ${names.join(", ")}`);
      return { key: leafKeyPem, cert };
    } finally {
      fs.rmSync(work, { recursive: true, force: true });
    }
  }

  return {
    certPath,
    certificatePem,
    issue(hostnames: string[]): Promise<IssuedCertificate> {
      if (!Array.isArray(hostnames) || hostnames.length === 0) return Promise.reject(new CubicleError("invalid_argument", "a certificate needs at least one host name"));
      if (hostnames.length > 100) return Promise.reject(new CubicleError("invalid_argument", "a certificate may name at most 100 host names"));
      let names: string[];
      try {
        names = [...new Set(hostnames.map(normalizeCertificateHostname))].sort();
      } catch (err) {
        return Promise.reject(err);
      }
      const cacheKey = names.join(",");
      const now = Date.now();
      const hit = cache.get(cacheKey);
      if (hit && hit.renewAt > now) {
        cache.delete(cacheKey);
        cache.set(cacheKey, hit);
        return hit.issued;
      }
      const entry = { issued: sign(names), renewAt: now + (LEAF_DAYS * 24 * 3600 * 1000 - LEAF_RENEW_BEFORE_MS) };
      cache.delete(cacheKey);
      cache.set(cacheKey, entry);
      while (cache.size > maxCached) cache.delete(cache.keys().next().value!);
      // A failure is not cached: the next call tries again.
      entry.issued.catch(() => {
        if (cache.get(cacheKey) === entry) cache.delete(cacheKey);
      });
      return entry.issued;
    },
  };
}
