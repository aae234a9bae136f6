import type net from "node:net";
import { looksLikeTls, MAX_CLIENT_HELLO_BYTES, parseClientHello } from "./client-hello.js";
import { H2_PREFACE } from "./h2-injection.js";
import { looksLikeHttp, MAX_HTTP_HEAD_BYTES, parseHttpHead } from "./http-head.js";

/** What a connection's first bytes say about where it is going. */
export interface PeekResult {
  /** Everything read from the socket so far: it must be sent on before anything else. */
  head: Buffer;
  domain: string | undefined;
  domainSource: "sni" | "host" | undefined;
  /** The client closed (or failed) before the peek ended. */
  clientGone: boolean;
  /** The head is HTTP/2's client preface: cleartext h2 with prior knowledge, which names no host before HPACK. */
  h2Preface: boolean;
}

const MAX_PEEK_BYTES = Math.max(MAX_CLIENT_HELLO_BYTES, MAX_HTTP_HEAD_BYTES);

/**
 * Reads the first bytes of `socket` until they name a domain (TLS SNI, HTTP Host), prove they
 * cannot, MAX_PEEK_BYTES are read, or `timeoutMs` passes (a protocol where the server speaks
 * first sends nothing). Leaves the socket paused with no listeners of its own.
 */
export function peekDomain(socket: net.Socket, timeoutMs: number): Promise<PeekResult> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let length = 0;
    let done = false;
    const finish = (domain: string | undefined, domainSource: PeekResult["domainSource"], clientGone = false, h2Preface = false) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.off("data", onData);
      socket.off("end", onEnd);
      socket.off("close", onGone);
      socket.off("error", onGone);
      socket.pause();
      resolve({ head: chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, length), domain, domainSource, clientGone, h2Preface });
    };
    const onGone = () => finish(undefined, undefined, true);
    // A half-closed client (all sent, FIN) still waits for an answer: decide on what came.
    const onEnd = () => finish(undefined, undefined);
    const onData = (chunk: Buffer) => {
      chunks.push(chunk);
      length += chunk.length;
      const head = Buffer.concat(chunks, length);
      chunks.splice(0, chunks.length, head);
      if (looksLikeTls(head)) {
        const result = parseClientHello(head);
        if (result.state === "complete") return finish(result.sni, result.sni ? "sni" : undefined);
        if (result.state === "invalid") return finish(undefined, undefined);
      } else if (H2_PREFACE.subarray(0, head.length).equals(head.subarray(0, H2_PREFACE.length))) {
        if (head.length >= H2_PREFACE.length) return finish(undefined, undefined, false, true);
      } else if (looksLikeHttp(head)) {
        const result = parseHttpHead(head);
        if (result.state === "complete") return finish(result.host, result.host ? "host" : undefined);
        if (result.state === "invalid") return finish(undefined, undefined);
      } else {
        return finish(undefined, undefined);
      }
      if (length >= MAX_PEEK_BYTES) finish(undefined, undefined);
    };
    const timer = setTimeout(() => finish(undefined, undefined), timeoutMs);
    socket.on("data", onData);
    socket.once("end", onEnd);
    socket.once("close", onGone);
    socket.once("error", onGone);
    socket.resume();
  });
}
