import { STATUS_CODES, type IncomingMessage, type ServerResponse } from "node:http";
import type { Duplex } from "node:stream";
import { createLogger } from "../shared/log.js";

const log = createLogger("router");

/** How long a refused connection may take to read its answer before it is cut. */
const LINGER_MS = 5_000;

/**
 * Writes a complete HTTP/1.1 response with a JSON body straight onto a socket that has no
 * ServerResponse (an upgrade, a request Node could not parse), then closes the connection.
 * Never throws: a socket that is already gone is only destroyed.
 */
export function writeRawJsonResponse(socket: Duplex, status: number, body: Record<string, unknown>): void {
  try {
    if (socket.destroyed || !socket.writable) {
      socket.destroy();
      return;
    }
    const text = JSON.stringify(body);
    const head = `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? "Error"}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(text)}\r\nconnection: close\r\n\r\n`;
    // The client may still be sending (a body behind a head Node refused): cut off now, it would
    // get a reset (EPIPE) instead of this answer. So the rest it sends is read and dropped until
    // it closes its side, LINGER_MS at most.
    socket.removeAllListeners("data");
    socket.on("data", () => undefined);
    socket.once("end", () => socket.destroy());
    socket.end(head + text);
    socket.resume();
    setTimeout(() => socket.destroy(), LINGER_MS).unref();
  } catch (err) {
    log.debug("could not answer on a raw socket", { error: String(err) });
    socket.destroy();
  }
}

/**
 * Answers a request with a JSON body, unless an answer has begun (then the connection is cut:
 * a second answer inside the first would corrupt what the client reads). Never throws.
 */
export function sendJsonResponse(res: ServerResponse, status: number, body: Record<string, unknown>): void {
  try {
    if (res.headersSent || res.destroyed) {
      res.socket?.destroy();
      return;
    }
    const text = JSON.stringify(body);
    res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
    if (res.req.complete || res.req.destroyed) return void res.end(text);
    res.write(text);
    endAfterBody(res.req, res);
  } catch (err) {
    log.debug("could not answer a request", { error: String(err) });
    res.socket?.destroy();
  }
}

/**
 * Ends an answer that may have been given before the request's body was all read. The rest of
 * the body is read and dropped, and the response ends once it is in, LINGER_MS at most. Ending
 * at once would let Node close a `Connection: close` socket while the client still sends: the
 * kernel resets a socket that receives data after its close, and the client's next write fails
 * (EPIPE) before it has read the answer. The answer itself is already sent (with its length),
 * so a client that stops sending has it at once.
 */
export function endAfterBody(req: IncomingMessage, res: ServerResponse): void {
  if (req.complete || req.destroyed) return void res.end();
  req.resume();
  const end = () => {
    clearTimeout(timer);
    if (!res.writableEnded) res.end();
  };
  const timer = setTimeout(end, LINGER_MS);
  timer.unref();
  req.once("end", end);
  req.once("close", end);
}

/** The status and message for a request Node's parser refused (its `clientError`). */
function clientErrorAnswer(code: string | undefined): { status: number; message: string } {
  switch (code) {
    case "HPE_HEADER_OVERFLOW":
      return { status: 431, message: "the request's headers are too large: send at most 16 KiB of headers" };
    case "HPE_CHUNK_EXTENSIONS_OVERFLOW":
      return { status: 413, message: "the request's chunk extensions are too large" };
    case "ERR_HTTP_REQUEST_TIMEOUT":
      return { status: 408, message: "the request's headers did not arrive in time; send them at once" };
    default:
      return { status: 400, message: "the request is not valid HTTP/1.1 (request line, headers or body framing)" };
  }
}

/**
 * The server's `clientError` handler: what Node answers with an empty body (400, 408, 413, 431)
 * gets an E2B body `{code, message}` instead. A reset connection gets nothing, and neither does
 * one with a response of ours already under way (keep-alive): a second response inside it would
 * corrupt what the client reads.
 */
export function answerClientError(err: Error & { code?: string }, socket: Duplex): void {
  if (err.code === "ECONNRESET" || socket.destroyed || !socket.writable) {
    socket.destroy();
    return;
  }
  // Node's own handler checks the same internal field before it writes its 400.
  const inFlight = (socket as Duplex & { _httpMessage?: { headersSent?: boolean } })._httpMessage;
  if (inFlight) {
    socket.destroy();
    return;
  }
  const { status, message } = clientErrorAnswer(err.code);
  log.debug("refused a request Node could not parse", { status, error: err.code ?? err.message });
  writeRawJsonResponse(socket, status, { code: status, message });
}
