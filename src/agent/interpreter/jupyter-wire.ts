import { createHmac, randomUUID, timingSafeEqual } from "node:crypto";

/**
 * The Jupyter messaging protocol (v5.3) as it travels over ZeroMQ:
 * `[...identities, "<IDS|MSG>", signature, header, parent_header, metadata, content, ...buffers]`,
 * the signature being the hex HMAC-SHA256 of the four JSON frames under the connection key.
 * https://jupyter-client.readthedocs.io/en/stable/messaging.html#the-wire-protocol
 */

export const DELIMITER = "<IDS|MSG>";
export const PROTOCOL_VERSION = "5.3";

export interface JupyterHeader {
  msg_id: string;
  msg_type: string;
  session: string;
  username: string;
  date: string;
  version: string;
}

export interface JupyterMessage<Content = Record<string, unknown>> {
  header: JupyterHeader;
  /** Empty object when the message answers nothing. */
  parent_header: Partial<JupyterHeader>;
  metadata: Record<string, unknown>;
  content: Content;
}

/** Signs and checks messages for one kernel connection. An empty key disables signing, as in Jupyter. */
export class JupyterSession {
  readonly sessionId = randomUUID();

  constructor(private readonly key: string, private readonly username = "cubicle") {}

  createMessage<Content>(msgType: string, content: Content, parent: Partial<JupyterHeader> = {}): JupyterMessage<Content> {
    return {
      header: {
        msg_id: randomUUID(),
        msg_type: msgType,
        session: this.sessionId,
        username: this.username,
        date: new Date().toISOString(),
        version: PROTOCOL_VERSION,
      },
      parent_header: parent,
      metadata: {},
      content,
    };
  }

  sign(frames: readonly (string | Buffer)[]): string {
    if (!this.key) return "";
    const hmac = createHmac("sha256", this.key);
    for (const frame of frames) hmac.update(frame);
    return hmac.digest("hex");
  }

  /** The frames to send for a message (no routing identities: we talk through DEALER sockets). */
  serialize(message: JupyterMessage<unknown>): Buffer[] {
    const parts = [
      Buffer.from(JSON.stringify(message.header)),
      Buffer.from(JSON.stringify(message.parent_header)),
      Buffer.from(JSON.stringify(message.metadata)),
      Buffer.from(JSON.stringify(message.content)),
    ];
    return [Buffer.from(DELIMITER), Buffer.from(this.sign(parts)), ...parts];
  }

  /**
   * Parses received frames (routing identities or an iopub topic may precede the delimiter).
   * Throws on a bad signature or a malformed message.
   */
  deserialize(frames: readonly Buffer[]): JupyterMessage {
    const delimiterIndex = frames.findIndex((frame) => frame.length === DELIMITER.length && frame.toString() === DELIMITER);
    if (delimiterIndex < 0) throw new Error("jupyter message without the <IDS|MSG> delimiter");
    const signature = frames[delimiterIndex + 1];
    const parts = frames.slice(delimiterIndex + 2, delimiterIndex + 6);
    if (!signature || parts.length !== 4) throw new Error("jupyter message with missing frames");
    if (this.key) {
      const expected = Buffer.from(this.sign(parts));
      if (signature.length !== expected.length || !timingSafeEqual(signature, expected)) {
        throw new Error("jupyter message with an invalid signature");
      }
    }
    const [header, parentHeader, metadata, content] = parts.map((part) => parseJupyterJson(part.toString("utf8")));
    return {
      header: header as JupyterHeader,
      parent_header: (parentHeader ?? {}) as Partial<JupyterHeader>,
      metadata: (metadata ?? {}) as Record<string, unknown>,
      content: (content ?? {}) as Record<string, unknown>,
    };
  }
}

/**
 * Python's json module writes NaN, Infinity and -Infinity when a kernel lets them through
 * (e.g. a float column in `e2b/data`); JSON.parse rejects them. Retry with them as null.
 */
export function parseJupyterJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (error) {
    const repaired = replaceNonFiniteNumbers(text);
    if (repaired === text) throw error;
    return JSON.parse(repaired);
  }
}

function replaceNonFiniteNumbers(text: string): string {
  let out = "";
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const char = text[i]!;
    if (inString) {
      out += char;
      if (char === "\\") out += text[++i] ?? "";
      else if (char === '"') inString = false;
      continue;
    }
    if (char === '"') {
      inString = true;
      out += char;
      continue;
    }
    const rest = text.startsWith("-Infinity", i) ? "-Infinity" : text.startsWith("Infinity", i) ? "Infinity" : text.startsWith("NaN", i) ? "NaN" : "";
    if (rest) {
      out += "null";
      i += rest.length - 1;
      continue;
    }
    out += char;
  }
  return out;
}
