import fs from "node:fs";
import type { IncomingMessage, ServerResponse } from "node:http";
import type https from "node:https";
import type { AddressInfo } from "node:net";
import type { CertificateAuthority } from "../network/index.js";
import { createRoutedHttpsServer, type SandboxRouter, type TlsCredentials } from "../router/index.js";
import type { CubicleConfig } from "../shared/config.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { createLogger } from "../shared/log.js";

const log = createLogger("server");

/**
 * The names the HTTPS listener's certificate covers: `*.<domain>` (every `<port>-<sandboxId>`
 * host) and `<domain>`. A one-label domain gets no wildcard: clients refuse `*.tld` patterns
 * (RFC 6125 §7.2; Node's checkServerIdentity, curl, browsers), so sandbox hosts need a domain of
 * two labels or more (`cubicle.localhost`, `sandbox.example.com`).
 */
export function certificateNamesFor(domain: string): string[] {
  const name = domain.replace(/:\d+$/, "").toLowerCase();
  return name.includes(".") ? [`*.${name}`, name] : [name];
}

/** The operator's certificate (CUBICLE_TLS_CERT / CUBICLE_TLS_KEY) or a wildcard from the CA. */
export async function tlsCredentialsFor(config: Pick<CubicleConfig, "domain" | "tlsCertFile" | "tlsKeyFile">, ca: CertificateAuthority): Promise<TlsCredentials> {
  if (config.tlsCertFile && config.tlsKeyFile) {
    const read = (file: string, variable: string) => {
      try {
        return fs.readFileSync(file);
      } catch (err) {
        throw new CubicleError("failed_precondition", `${variable}: cannot read ${file} (${(err as Error).message})`, { cause: err });
      }
    };
    return { cert: read(config.tlsCertFile, "CUBICLE_TLS_CERT"), key: read(config.tlsKeyFile, "CUBICLE_TLS_KEY") };
  }
  const names = certificateNamesFor(config.domain);
  if (names.length === 1) log.warn("the domain has one label: sandbox hosts under it cannot have a certificate clients accept; use a domain like cubicle.localhost", { domain: config.domain });
  return ca.issue(names);
}

/**
 * Starts the HTTPS listener on `host:port` (0 = any free port, for tests). A port in use or not
 * permitted is a failed_precondition with what to do, not a crash; bad credentials likewise.
 */
export async function listenHttps(
  router: SandboxRouter,
  apiHandler: (req: IncomingMessage, res: ServerResponse) => void,
  credentials: TlsCredentials,
  host: string,
  port: number,
): Promise<{ server: https.Server; port: number }> {
  let server: https.Server;
  try {
    server = createRoutedHttpsServer(router, apiHandler, credentials);
  } catch (err) {
    throw new CubicleError("failed_precondition", `the HTTPS listener's certificate or key is unusable: ${(err as Error).message}`, { cause: err });
  }
  await new Promise<void>((resolve, reject) => {
    const failed = (err: NodeJS.ErrnoException) => {
      const hint =
        err.code === "EADDRINUSE"
          ? `port ${port} on ${host} is in use (CUBICLE_HTTPS_PORT): stop what listens there, or set CUBICLE_HTTPS_PORT to a free port, or to off`
          : err.code === "EACCES"
            ? `port ${port} on ${host} needs root (CUBICLE_HTTPS_PORT): run as root, or set CUBICLE_HTTPS_PORT to a port above 1023, or to off`
            : `cannot listen for HTTPS on ${host}:${port}: ${err.message}`;
      reject(new CubicleError("failed_precondition", hint, { cause: err }));
    };
    server.once("error", failed);
    server.listen(port, host, () => {
      server.off("error", failed);
      resolve();
    });
  });
  return { server, port: (server.address() as AddressInfo).port };
}
