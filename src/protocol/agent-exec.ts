import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import http from "node:http";
import { randomBytes } from "node:crypto";
import { encodeEnvelope, envelopeFlags, EnvelopeParser } from "./envelope.js";
import type { ProcessEvent, StartRequest } from "./generated/process.js";
import { ENVD_PORT } from "./ports.js";
import { CubicleError } from "../shared/cubicle-error.js";

/**
 * BUILD_AGENT_NOTE: a build runs its steps in a build sandbox through the sandbox's own agent,
 * exactly as an SDK's `commands.run` and `files.write` would (envd's process.Process/Start and
 * `POST /files`), so a step gets the same user switching, environment and isolation as any
 * command, and nothing on the host runs what a template's author wrote. The build sandbox has
 * no access token (its agent was initialised without one); only the server reaches its address.
 */
export interface AgentCommand {
  /** argv[0] and the rest. */
  argv: string[];
  user: string;
  cwd?: string;
  envs?: Record<string, string>;
  timeoutMs: number;
  signal?: AbortSignal;
  /** Each chunk of output as it comes (stdout and stderr interleaved as the agent sends them). */
  onOutput?: (stream: "stdout" | "stderr", text: string) => void;
  /**
   * Resolve (exit code 0) as soon as the process has started and leave it running: the stream
   * is closed, and the agent keeps a process whose client went away (a template's start command).
   */
  untilStarted?: boolean;
  /** The sandbox's envd access token, when its agent has one. */
  accessToken?: string;
  /** The agent's tag for the process (`commands.connect` finds it by the tag). */
  tag?: string;
}

export interface AgentCommandResult {
  exitCode: number;
  /** The agent's word on how it ended when not a plain exit ("signal: killed" …). */
  error?: string;
}

/** Output bytes kept for one event's text; a step's log is for people, not a byte-exact copy. */
const MAX_EVENT_TEXT = 64 * 1024;

/** Runs one command in the sandbox at `address`, streaming its output; resolves with its exit code. */
export function runInSandbox(address: string, command: AgentCommand): Promise<AgentCommandResult> {
  const request: StartRequest = {
    process: { cmd: command.argv[0]!, args: command.argv.slice(1), envs: command.envs ?? {}, ...(command.cwd ? { cwd: command.cwd } : {}) },
    stdin: false,
    ...(command.tag ? { tag: command.tag } : {}),
  };
  const body = encodeEnvelope(0, JSON.stringify(request));
  return new Promise((resolve, reject) => {
    let settled = false;
    const finish = (err: Error | undefined, result?: AgentCommandResult) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      command.signal?.removeEventListener("abort", onAbort);
      if (err) {
        req.destroy();
        reject(err);
      } else {
        if (command.untilStarted) req.destroy();
        resolve(result!);
      }
    };
    const onAbort = () => finish(new CubicleError("canceled", "the build was cancelled"));
    const timer = setTimeout(() => finish(new CubicleError("deadline_exceeded", `the command did not finish within ${Math.round(command.timeoutMs / 1000)} s`)), command.timeoutMs);
    const req = http.request(
      {
        host: address,
        port: ENVD_PORT,
        method: "POST",
        path: "/process.Process/Start",
        headers: {
          "content-type": "application/connect+json",
          "connect-protocol-version": "1",
          authorization: `Basic ${Buffer.from(`${command.user}:`).toString("base64")}`,
          "content-length": body.length,
          ...(command.accessToken ? { "x-access-token": command.accessToken } : {}),
        },
      },
      (res) => {
        if (res.statusCode !== 200) {
          const chunks: Buffer[] = [];
          res.on("data", (chunk: Buffer) => chunks.length < 16 && chunks.push(chunk));
          res.on("end", () => finish(new CubicleError("internal", `the build sandbox's agent refused the command (${res.statusCode}): ${Buffer.concat(chunks).toString("utf8").slice(0, 300)}`)));
          return;
        }
        const parser = new EnvelopeParser();
        let result: AgentCommandResult | undefined;
        res.on("data", (chunk: Buffer) => {
          try {
            for (const envelope of parser.push(chunk)) {
              const text = envelope.data.toString("utf8");
              if (envelope.flags & envelopeFlags.endStream) {
                const end = JSON.parse(text) as { error?: { message?: string; code?: string } };
                if (end.error) return finish(new CubicleError("internal", `the build sandbox's agent failed the command: ${end.error.message ?? end.error.code}`));
                continue;
              }
              const event = (JSON.parse(text) as { event?: ProcessEvent }).event;
              if (event?.start && command.untilStarted) return finish(undefined, { exitCode: 0 });
              if (event?.data?.stdout) command.onOutput?.("stdout", Buffer.from(event.data.stdout, "base64").toString("utf8").slice(0, MAX_EVENT_TEXT));
              if (event?.data?.stderr) command.onOutput?.("stderr", Buffer.from(event.data.stderr, "base64").toString("utf8").slice(0, MAX_EVENT_TEXT));
              if (event?.end) result = { exitCode: event.end.exitCode ?? 0, ...(event.end.error ? { error: event.end.error } : {}) };
            }
          } catch (err) {
            finish(CubicleError.from(err));
          }
        });
        res.on("end", () => (result ? finish(undefined, result) : finish(new CubicleError("internal", "the build sandbox's agent ended the command's stream without its end"))));
        res.on("error", (err) => finish(err));
      },
    );
    req.on("error", (err) => finish(new CubicleError("unavailable", `the build sandbox's agent is unreachable: ${err.message}`)));
    command.signal?.addEventListener("abort", onAbort, { once: true });
    if (command.signal?.aborted) return onAbort();
    req.end(body);
  });
}

/**
 * Writes the host file `hostFile` to `sandboxPath` in the sandbox at `address` as `user`
 * (envd's `POST /files`, a multipart body streamed from the file).
 */
export async function uploadToSandbox(address: string, hostFile: string, sandboxPath: string, user: string, timeoutMs: number): Promise<void> {
  const size = (await stat(hostFile)).size;
  const boundary = `cubicle-${randomBytes(12).toString("hex")}`;
  const head = Buffer.from(`--${boundary}\r\ncontent-disposition: form-data; name="file"; filename="upload"\r\ncontent-type: application/octet-stream\r\n\r\n`);
  const tail = Buffer.from(`\r\n--${boundary}--\r\n`);
  const query = new URLSearchParams({ path: sandboxPath, username: user });
  await new Promise<void>((resolve, reject) => {
    const req = http.request(
      {
        host: address,
        port: ENVD_PORT,
        method: "POST",
        path: `/files?${query}`,
        timeout: timeoutMs,
        headers: { "content-type": `multipart/form-data; boundary=${boundary}`, "content-length": head.length + size + tail.length },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (chunk: Buffer) => chunks.length < 16 && chunks.push(chunk));
        res.on("end", () =>
          res.statusCode === 200 ? resolve() : reject(new CubicleError("internal", `the build sandbox's agent refused the upload (${res.statusCode}): ${Buffer.concat(chunks).toString("utf8").slice(0, 300)}`)),
        );
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(new CubicleError("deadline_exceeded", "uploading the files to the build sandbox timed out")));
    req.on("error", (err) => reject(CubicleError.from(err)));
    req.write(head);
    const file = createReadStream(hostFile);
    file.on("error", (err) => req.destroy(err));
    file.on("end", () => req.end(tail));
    file.pipe(req, { end: false });
  });
}
