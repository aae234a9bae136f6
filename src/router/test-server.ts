import { EventEmitter } from "node:events";
import type { ServerResponse } from "node:http";
import type https from "node:https";
import net from "node:net";
import { createFakeAgentLink } from "../protocol/fake-agent-link.js";
import { createRoutedHttpServer, createRoutedHttpsServer, type TlsCredentials } from "./http-server.js";
import { answerClientError } from "./raw-response.js";
import { SandboxRouter } from "./sandbox-router.js";

/** The stand-in sandbox that routes to 127.0.0.1 (requests name the port of a test's listener). */
export const SANDBOX_ID = "ifake";
/** A stand-in paused sandbox with auto-resume: its route comes after `resumeDelayMs`. */
export const RESUMING_ID = "iresuming";

export interface RouterTestServer {
  port: number;
  /** The HTTPS listener's port, when the server was started with `https` credentials. */
  httpsPort: number | undefined;
  /** How often the stand-in core was asked to resume a paused sandbox for traffic. */
  resumes: number;
  /** Exceptions and rejections nobody handled: each would have ended a real server process. */
  unhandled: unknown[];
  close(): Promise<void>;
}

/**
 * The API port's HTTP server with a real router in front of a stand-in API (which answers
 * `200 {"api":true}`), wired as the server does it, clientError handler included.
 */
export async function startRouterTestServer(
  options: {
    resumeDelayMs?: number;
    liveSandboxes?: { sandboxId: string; envdAccessToken: string | undefined; state: string; trafficAccessToken?: string }[];
    /** The ingress policy of both stand-in sandboxes (the paused one's token also goes into its live record). */
    ingress?: { trafficAccessToken?: string; maskRequestHost?: string; httpsPorts?: number[] };
    /** Also serve the same routing over TLS with these credentials, as the server's HTTPS port does. */
    https?: TlsCredentials;
  } = {},
): Promise<RouterTestServer> {
  const unhandled: unknown[] = [];
  const record = (err: unknown) => unhandled.push(err);
  process.on("uncaughtException", record);
  process.on("unhandledRejection", record);
  let resumes = 0;
  const ingress = options.ingress ?? {};
  const pausedRecord = { sandboxId: RESUMING_ID, envdAccessToken: undefined, state: "paused", trafficAccessToken: ingress.trafficAccessToken };
  const source = Object.assign(new EventEmitter(), {
    routeTarget: (id: string) => (id === SANDBOX_ID ? { sandboxId: id, address: "127.0.0.1", ...ingress } : undefined),
    resumeForTraffic: async (id: string) => {
      if (id !== RESUMING_ID) return undefined;
      resumes++;
      await new Promise((r) => setTimeout(r, options.resumeDelayMs ?? 100));
      return { sandboxId: id, address: "127.0.0.1", ...ingress };
    },
    liveSandboxes: () => [...(options.liveSandboxes ?? []), ...(options.ingress ? [pausedRecord] : [])],
  });
  const router = new SandboxRouter(source, "cubicle.test", { agentLink: createFakeAgentLink() });
  const api = (_req: unknown, res: ServerResponse) => {
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ api: true }));
  };
  const server = createRoutedHttpServer(router, api);
  // What the API installs as fastify's clientErrorHandler on this server.
  server.on("clientError", answerClientError);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  let httpsServer: https.Server | undefined;
  if (options.https) {
    httpsServer = createRoutedHttpsServer(router, api, options.https);
    await new Promise<void>((resolve) => httpsServer!.listen(0, "127.0.0.1", resolve));
  }
  return {
    port: (server.address() as net.AddressInfo).port,
    httpsPort: httpsServer ? (httpsServer.address() as net.AddressInfo).port : undefined,
    get resumes() {
      return resumes;
    },
    unhandled,
    async close() {
      server.closeAllConnections();
      httpsServer?.closeAllConnections();
      await Promise.all([server, ...(httpsServer ? [httpsServer] : [])].map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
      process.off("uncaughtException", record);
      process.off("unhandledRejection", record);
    },
  };
}

/** A process "in the sandbox" that answers every connection with `answer()`'s bytes and closes. */
export async function sandboxProcess(answer: string | (() => string)): Promise<{ port: number; close(): void }> {
  const listener = net.createServer((socket) => {
    socket.on("error", () => undefined);
    socket.once("data", () => socket.end(typeof answer === "string" ? answer : answer()));
  });
  await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve));
  return { port: (listener.address() as net.AddressInfo).port, close: () => listener.close() };
}

/**
 * Sends raw bytes to a port and collects what comes back until the connection closes, or until
 * `timeoutMs` (then `timedOut`). `halfClose` ends the sending side after the bytes;
 * `resetAfterWrite` resets the connection.
 */
export function exchangeTimed(port: number, text: string, options: { resetAfterWrite?: boolean; halfClose?: boolean; timeoutMs?: number } = {}): Promise<{ raw: string; timedOut: boolean }> {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    let received = "";
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      socket.destroy();
    }, options.timeoutMs ?? 2000);
    socket.on("connect", () => {
      if (options.halfClose) socket.end(Buffer.from(text, "latin1"));
      else socket.write(Buffer.from(text, "latin1"));
      if (options.resetAfterWrite) socket.resetAndDestroy();
    });
    socket.on("data", (d) => (received += d.toString("latin1")));
    socket.on("error", () => undefined);
    socket.on("close", () => {
      clearTimeout(timer);
      resolve({ raw: received, timedOut });
    });
  });
}

/** {@link exchangeTimed}, only what came back. */
export async function exchange(port: number, text: string, options: { resetAfterWrite?: boolean; halfClose?: boolean; timeoutMs?: number } = {}): Promise<string> {
  return (await exchangeTimed(port, text, options)).raw;
}

/** GET /health of the stand-in API through the routed server. */
export async function apiAnswers(port: number): Promise<boolean> {
  const res = await fetch(`http://127.0.0.1:${port}/health`, { signal: AbortSignal.timeout(5000) });
  return res.status === 200 && (await res.text()) === '{"api":true}';
}
