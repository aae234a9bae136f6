/**
 * envd's `/files` endpoint (wire-protocol §9.3, §9.4): download with `GET`, upload with `POST`
 * (multipart with full-path filenames, or an octet-stream body), run with the selected user's
 * permissions. Authentication and signatures are checked by the caller (server.ts).
 */
import fs from "node:fs";
import path from "node:path";
import zlib from "node:zlib";
import { pipeline } from "node:stream/promises";
import type { Readable } from "node:stream";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { AgentUser } from "../users.js";
import { lookupUser, resolveUserPath } from "../users.js";
import { runAsUser } from "../as-user.js";
import { CubicleError, errnoName } from "../../shared/cubicle-error.js";
import { createLogger } from "../../shared/log.js";
import { boundaryOf, MultipartError, readMultipart } from "./multipart.js";
import { checkMetadataAvailable, replaceMetadata, validateMetadata, type Metadata } from "../filesystem/file-metadata.js";
import { fsErrorCode, fsFailure, syscallErrorText, toCubicleError } from "../errors.js";
import { openRegularFileForReading, openRegularFileForWriting } from "../filesystem/regular-file.js";
import { ensureDirectories } from "../filesystem/operations.js";
import { makeMissingParentsAsRoot } from "../filesystem/parents-as-root.js";
import { abandonBody } from "./request-body.js";

const log = createLogger("agent.files");

export interface FilesRequestOptions {
  /** The `username` query parameter; undefined selects the default user. */
  username: string | undefined;
  defaultUser: string;
}

/** One entry of the upload response (the REST `EntryInfo` of envd.yaml). */
export interface UploadedEntry {
  path: string;
  name: string;
  type: "file";
  metadata?: Metadata;
}

/** An error that carries its own HTTP status (upstream uses a few outside CubicleError's table). */
class FilesError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

/** Serves `GET /files` and `POST /files`. Never throws: failures become `{code, message}` JSON. */
export async function handleFilesRequest(req: IncomingMessage, res: ServerResponse, opts: FilesRequestOptions): Promise<void> {
  try {
    if (req.method === "GET" || req.method === "HEAD") await handleDownload(req, res, opts);
    else if (req.method === "POST") await handleUpload(req, res, opts);
    else {
      res.setHeader("Allow", "GET, POST");
      throw new FilesError(405, `method ${req.method} not allowed`);
    }
  } catch (reason) {
    sendError(req, res, reason);
  }
}

function sendError(req: IncomingMessage, res: ServerResponse, reason: unknown): void {
  const status = reason instanceof FilesError ? reason.status : toCubicleError(reason).httpStatus;
  const message = reason instanceof Error ? reason.message : String(reason);
  if (status >= 500) log.warn("files request failed", { method: req.method, status, message });
  if (res.headersSent) {
    // Mid-stream failure: the client must not take a truncated body for a whole one.
    res.destroy(reason instanceof Error ? reason : undefined);
    return;
  }
  const body = JSON.stringify({ code: status, message });
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
  res.end(body);
  // Drop an unread request body without reading it into memory, keeping the connection usable.
  if (!req.readableEnded) abandonBody(req);
}

function requestUrl(req: IncomingMessage): URL {
  return new URL(req.url ?? "/", "http://agent.invalid");
}

function selectUser(opts: FilesRequestOptions): AgentUser {
  const username = opts.username === undefined || opts.username === "" ? opts.defaultUser : opts.username;
  try {
    return lookupUser(username);
  } catch (reason) {
    throw new FilesError(401, `error looking up user '${username}': ${(reason as Error).message}`);
  }
}

// ---------------------------------------------------------------------------------------------
// GET /files

async function handleDownload(req: IncomingMessage, res: ServerResponse, opts: FilesRequestOptions): Promise<void> {
  const user = selectUser(opts);
  const requestedPath = requestUrl(req).searchParams.get("path") ?? "";
  const resolvedPath = resolveUserPath(requestedPath, user);

  // Only regular files: a FIFO or a device would block the agent or never end (regular-file.ts).
  const { fd, stats } = runAsUser(user, () => openRegularFileForReading(resolvedPath));
  const size = stats.size;
  const mtime = stats.mtime;

  const source = fs.createReadStream("", { fd, autoClose: true });
  try {
    const encoding = chooseResponseEncoding(req);
    res.setHeader("Vary", "Accept-Encoding");
    res.setHeader("Content-Type", contentTypeOf(resolvedPath));
    res.setHeader("Last-Modified", mtime.toUTCString());
    if (encoding === "gzip") {
      res.writeHead(200, { "Content-Encoding": "gzip" });
      if (req.method === "HEAD") return void res.end();
      await pipeline(source, zlib.createGzip({ level: zlib.constants.Z_BEST_SPEED }), res);
    } else {
      res.writeHead(200, { "Content-Length": size });
      if (req.method === "HEAD") return void res.end();
      await pipeline(source, res);
    }
  } finally {
    source.destroy();
  }
}

/**
 * Upstream's Accept-Encoding negotiation (RFC 7231 §5.3.4): the highest-q supported coding,
 * identity unless explicitly refused; gzip is the only coding besides identity. Range and
 * conditional requests fall back to identity.
 */
export function chooseResponseEncoding(req: IncomingMessage): "gzip" | "identity" {
  if (req.headers.range || req.headers["if-modified-since"] || req.headers["if-none-match"] || req.headers["if-range"]) {
    return "identity";
  }
  const header = req.headers["accept-encoding"];
  if (!header) return "identity";
  const offers = header
    .split(",")
    .map((part) => {
      const [name = "", ...params] = part.split(";").map((piece) => piece.trim());
      let quality = 1;
      for (const param of params) {
        if (param.toLowerCase().startsWith("q=")) {
          const parsed = Number(param.slice(2));
          if (!Number.isNaN(parsed)) quality = parsed;
        }
      }
      return { name: name.toLowerCase(), quality };
    })
    .filter((offer) => offer.name !== "")
    .sort((a, b) => b.quality - a.quality);
  const identityRefused = offers.some((offer) => offer.name === "identity" && offer.quality === 0);
  for (const offer of offers) {
    if (offer.quality === 0) continue;
    if (offer.name === "identity") return "identity";
    if (offer.name === "*") return identityRefused ? "gzip" : "identity";
    if (offer.name === "gzip") return "gzip";
  }
  if (!identityRefused) return "identity";
  throw new FilesError(406, "no acceptable encoding found, supported: [identity, gzip]");
}

const contentTypes: Record<string, string> = {
  ".txt": "text/plain; charset=utf-8",
  ".html": "text/html; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".json": "application/json",
  ".png": "image/png",
  ".jpg": "image/jpeg",
  ".jpeg": "image/jpeg",
  ".gif": "image/gif",
  ".svg": "image/svg+xml",
  ".pdf": "application/pdf",
  ".csv": "text/csv; charset=utf-8",
};

function contentTypeOf(filePath: string): string {
  return contentTypes[path.extname(filePath).toLowerCase()] ?? "application/octet-stream";
}

// ---------------------------------------------------------------------------------------------
// POST /files

/**
 * `X-Metadata-<key>` headers as a metadata set: key lower-cased, the first of repeated headers
 * wins (raw headers, since Node joins repeats), validated like upstream.
 */
export function metadataFromHeaders(rawHeaders: string[]): Metadata {
  // No prototype: `X-Metadata-Constructor` or `X-Metadata-__proto__` are keys like any other.
  const metadata: Metadata = Object.create(null) as Metadata;
  const prefix = "x-metadata-";
  for (let index = 0; index + 1 < rawHeaders.length; index += 2) {
    const name = rawHeaders[index]!.toLowerCase();
    if (!name.startsWith(prefix)) continue;
    const key = name.slice(prefix.length);
    if (!Object.hasOwn(metadata, key)) metadata[key] = rawHeaders[index + 1]!;
  }
  try {
    validateMetadata(metadata);
  } catch (reason) {
    throw new FilesError(400, `invalid metadata: ${(reason as Error).message}`);
  }
  if (Object.keys(metadata).length > 0) checkMetadataAvailable();
  return metadata;
}

/** The body as sent, decompressed if `Content-Encoding: gzip`. */
function decodedBody(req: IncomingMessage): Readable {
  const header = req.headers["content-encoding"];
  const encoding = (header ?? "").split(";")[0]!.trim().toLowerCase();
  if (encoding === "" || encoding === "identity") return req;
  if (encoding !== "gzip") throw new FilesError(400, `error decompressing request body: unsupported Content-Encoding: ${header}, supported: [gzip]`);
  const gunzip = zlib.createGunzip();
  req.on("error", (reason) => gunzip.destroy(reason));
  return req.pipe(gunzip);
}

async function handleUpload(req: IncomingMessage, res: ServerResponse, opts: FilesRequestOptions): Promise<void> {
  const user = selectUser(opts);
  const queryPath = requestUrl(req).searchParams.get("path");
  const metadata = metadataFromHeaders(req.rawHeaders);
  const contentType = (req.headers["content-type"] ?? "").toLowerCase();

  let uploaded: UploadedEntry[];
  if (contentType.startsWith("multipart/form-data")) {
    uploaded = await receiveMultipart(req, user, queryPath, metadata);
  } else if (contentType.startsWith("application/octet-stream")) {
    if (queryPath === null || queryPath === "") {
      throw new FilesError(400, "path query parameter is required for application/octet-stream uploads");
    }
    const body = decodedBody(req);
    uploaded = [await writeUploadedFile(user, resolveUserPath(queryPath, user), body, metadata)];
  } else {
    throw new FilesError(400, `unsupported content type: ${req.headers["content-type"] ?? "(none)"}, supported: multipart/form-data, application/octet-stream`);
  }

  const body = JSON.stringify(uploaded);
  res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
  res.end(body);
}

/**
 * Reads the parts one after another (multipart.ts: the next part is read once the current one
 * is written). Every part named `file` is written, with or without a filename or a
 * Content-Type (a browser's plain form field, a Blob): to the `path` query if given, else to
 * its filename, which may be a whole destination path (as the SDKs send it for writeFiles).
 */
async function receiveMultipart(req: IncomingMessage, user: AgentUser, queryPath: string | null, metadata: Metadata): Promise<UploadedEntry[]> {
  let boundary: string;
  try {
    boundary = boundaryOf(req.headers["content-type"] ?? "");
  } catch (reason) {
    throw new FilesError(400, `error parsing multipart form: ${(reason as Error).message}`);
  }
  const body = decodedBody(req);
  const uploaded: UploadedEntry[] = [];
  try {
    for await (const part of readMultipart(body, boundary)) {
      if (part.name !== "file") continue; // read through and dropped by the reader
      const requested = queryPath ?? part.filename;
      if (requested === undefined || requested === "") {
        throw new FilesError(400, "error getting multipart custom part file name: part has no filename and there is no path query parameter");
      }
      const destination = resolveUserPath(requested, user);
      if (uploaded.some((entry) => entry.path === destination)) throw duplicateDestination(destination, uploaded);
      uploaded.push(await writeUploadedFile(user, destination, part.body, metadata));
    }
  } catch (reason) {
    if (reason instanceof MultipartError) throw new FilesError(400, `error reading form: ${reason.message}`);
    const code = errnoName(reason);
    if (code === "Z_DATA_ERROR" || code === "Z_BUF_ERROR") throw new FilesError(400, `error decompressing request body: ${(reason as Error).message}`);
    if (code === "ECONNRESET" || code === "ERR_STREAM_PREMATURE_CLOSE" || (reason as Error).message === "aborted") {
      throw new FilesError(400, `error reading request body: ${(reason as Error).message}`);
    }
    throw reason;
  }
  if (uploaded.length === 0) throw new FilesError(400, "no file part in the multipart upload");
  return uploaded;
}

function duplicateDestination(destination: string, uploaded: UploadedEntry[]): FilesError {
  let message = `you cannot upload multiple files to the same path '${destination}' in one upload request, only the first specified file was uploaded`;
  const others = uploaded.filter((entry) => entry.path !== destination).map((entry) => entry.path);
  if (others.length > 1) message += `, also the following files were uploaded: ${others.join(", ")}`;
  return new FilesError(400, message);
}

/**
 * Writes one uploaded file: missing parents the user could not make are made as root and handed
 * to the user (makeMissingParentsAsRoot), the others and the file (O_TRUNC) as the user, so
 * they are owned by them; the file is chowned to the user if it belonged to someone else (upstream
 * chowns every upload); the data then streams into the descriptor as root.
 */
export async function writeUploadedFile(user: AgentUser, destination: string, source: Readable, metadata: Metadata): Promise<UploadedEntry> {
  const parent = path.dirname(destination);
  // Parents and the file as the user; only parents the user may not make (`/newdir`) as root,
  // like upstream, and then once more as the user.
  const prepare = () => {
    try {
      ensureDirectories(parent);
    } catch (reason) {
      return { failed: reason };
    }
    // Only regular files: a FIFO or a device would block the agent (regular-file.ts).
    return { opened: openRegularFileForWriting(destination) };
  };
  let prepared = runAsUser(user, prepare);
  if (prepared.failed !== undefined && errnoName(prepared.failed) === "EACCES" && makeMissingParentsAsRoot(user, parent)) prepared = runAsUser(user, prepare);
  if (prepared.failed !== undefined) {
    const reason = prepared.failed;
    const errno = errnoName(reason);
    if (errno === "EEXIST" || errno === "ENOTDIR") {
      throw new CubicleError("invalid_argument", `error ensuring directories: ${syscallErrorText("mkdir", parent, reason)} (a parent is not a directory)`, { cause: reason });
    }
    throw fsFailure("error ensuring directories", "mkdir", parent, reason);
  }
  const { fd, stats } = prepared.opened!;

  const sink = fs.createWriteStream("", { fd, autoClose: true });
  try {
    if (Number(stats.uid) !== user.uid || Number(stats.gid) !== user.gid) fs.fchownSync(fd, user.uid, user.gid);
    // On the descriptor, as root: the file just opened, whatever its path points to by now.
    replaceMetadata(fd, metadata);
    await copyInto(source, sink);
  } catch (reason) {
    sink.destroy();
    if (reason instanceof FilesError || reason instanceof CubicleError) throw reason;
    if (reason instanceof MultipartError) throw new FilesError(400, `error reading form: ${reason.message}`);
    const code = errnoName(reason);
    if (code === "ENOSPC" || code === "EDQUOT") throw new FilesError(507, `not enough disk space available: ${syscallErrorText("write", destination, reason)}`);
    if (fsErrorCode(code) !== undefined) throw fsFailure("error writing file", "write", destination, reason);
    if (code === "Z_DATA_ERROR" || code === "Z_BUF_ERROR") throw new FilesError(400, `error decompressing request body: ${(reason as Error).message}`);
    if (code === "ECONNRESET" || code === "ERR_STREAM_PREMATURE_CLOSE") throw new FilesError(400, `error reading request body: ${(reason as Error).message}`);
    throw new FilesError(500, `error writing file: ${(reason as Error).message}`);
  }

  const entry: UploadedEntry = { path: destination, name: path.basename(destination), type: "file" };
  if (Object.keys(metadata).length > 0) entry.metadata = { ...metadata };
  return entry;
}

/**
 * Pipes `source` into `sink` and settles when the file is closed. Unlike `pipeline`, a failing
 * sink (ENOSPC) does not destroy the source: for an octet-stream upload that is the request,
 * and destroying it would cut the connection before the 507 answer is sent.
 */
function copyInto(source: Readable, sink: fs.WriteStream): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    let settled = false;
    const settle = (reason?: unknown) => {
      if (settled) return;
      settled = true;
      if (reason === undefined) return resolve();
      source.unpipe(sink);
      sink.destroy();
      reject(reason);
    };
    source.on("error", settle);
    source.once("aborted", () => settle(Object.assign(new Error("request aborted"), { code: "ECONNRESET" })));
    sink.on("error", settle);
    sink.once("close", () => settle());
    source.pipe(sink);
  });
}
