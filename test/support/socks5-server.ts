import net from "node:net";

/**
 * A real SOCKS5 server for tests (RFC 1928 CONNECT, optional RFC 1929 username/password).
 *
 *   const socks = await startSocks5Server({ host: "127.0.0.1", port: 0, username: "u", password: "p" });
 *   // ... point a client at socks.port ...
 *   socks.connections;   // every CONNECT it carried out: [{ address, port }]
 *   await socks.close(); // stops listening and destroys open tunnels
 *
 * Without username/password it offers "no authentication" only; with them, username/password
 * only. CONNECT targets may be IPv4, IPv6 or domain names (resolved by the OS). Bad input closes
 * the client's connection; nothing throws out of the server.
 */
export interface Socks5ServerOptions {
  /** Address to listen on; default 127.0.0.1. */
  host?: string;
  /** Default 0 (any free port). */
  port?: number;
  username?: string;
  password?: string;
  /** Refuse every CONNECT with this RFC 1928 reply code (e.g. 2 "not allowed by ruleset"). */
  refuseWith?: number;
}

export interface Socks5Server {
  port: number;
  /** Every CONNECT the server dialed (successful or not), in order. */
  connections: { address: string; port: number }[];
  close(): Promise<void>;
}

export async function startSocks5Server(options: Socks5ServerOptions = {}): Promise<Socks5Server> {
  const connections: { address: string; port: number }[] = [];
  const sockets = new Set<net.Socket>();
  const needAuth = options.username !== undefined;

  const server = net.createServer((client) => {
    sockets.add(client);
    client.on("close", () => sockets.delete(client));
    client.on("error", () => client.destroy());
    client.setTimeout(10_000, () => client.destroy());
    let buffer = Buffer.alloc(0);
    let step: "greeting" | "auth" | "request" | "tunnel" = "greeting";

    const onData = (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk]);
      if (buffer.length > 1024) return client.destroy();
      if (step === "greeting") {
        if (buffer.length < 2 || buffer.length < 2 + buffer[1]!) return;
        if (buffer[0] !== 5) return client.destroy();
        const methods = [...buffer.subarray(2, 2 + buffer[1]!)];
        buffer = buffer.subarray(2 + buffer[1]!);
        const wanted = needAuth ? 0x02 : 0x00;
        if (!methods.includes(wanted)) return void client.end(Buffer.from([5, 0xff]));
        client.write(Buffer.from([5, wanted]));
        step = needAuth ? "auth" : "request";
      }
      if (step === "auth") {
        if (buffer.length < 2) return;
        const userLength = buffer[1]!;
        if (buffer.length < 3 + userLength) return;
        const passLength = buffer[2 + userLength]!;
        if (buffer.length < 3 + userLength + passLength) return;
        const username = buffer.subarray(2, 2 + userLength).toString("utf8");
        const password = buffer.subarray(3 + userLength, 3 + userLength + passLength).toString("utf8");
        buffer = buffer.subarray(3 + userLength + passLength);
        if (username !== options.username || password !== (options.password ?? "")) return void client.end(Buffer.from([1, 1]));
        client.write(Buffer.from([1, 0]));
        step = "request";
      }
      if (step === "request") {
        if (buffer.length < 5) return;
        const atyp = buffer[3];
        const addressLength = atyp === 1 ? 4 : atyp === 4 ? 16 : atyp === 3 ? 1 + buffer[4]! : -1;
        if (buffer[0] !== 5 || addressLength < 0) return client.destroy();
        if (buffer.length < 4 + addressLength + 2) return;
        const raw = buffer.subarray(4, 4 + addressLength);
        const address =
          atyp === 1 ? [...raw].join(".") : atyp === 3 ? raw.subarray(1).toString("latin1") : (raw.toString("hex").match(/.{4}/g) ?? []).join(":");
        const port = buffer.readUInt16BE(4 + addressLength);
        const rest = buffer.subarray(4 + addressLength + 2);
        step = "tunnel";
        client.off("data", onData);
        client.pause();
        connections.push({ address, port });
        if (buffer[1] !== 1) return void client.end(Buffer.from([5, 7, 0, 1, 0, 0, 0, 0, 0, 0]));
        if (options.refuseWith !== undefined) return void client.end(Buffer.from([5, options.refuseWith, 0, 1, 0, 0, 0, 0, 0, 0]));
        const upstream = net.connect({ host: address, port });
        sockets.add(upstream);
        upstream.on("close", () => sockets.delete(upstream));
        upstream.on("error", (err: NodeJS.ErrnoException) => {
          if (client.writable && !upstream.remoteAddress) {
            const code = err.code === "ECONNREFUSED" ? 5 : err.code === "EHOSTUNREACH" ? 4 : err.code === "ENETUNREACH" ? 3 : 1;
            client.end(Buffer.from([5, code, 0, 1, 0, 0, 0, 0, 0, 0]));
          } else {
            client.destroy();
          }
        });
        upstream.on("connect", () => {
          client.setTimeout(0);
          client.write(Buffer.from([5, 0, 0, 1, 0, 0, 0, 0, 0, 0]));
          if (rest.length > 0) upstream.write(rest);
          client.pipe(upstream);
          upstream.pipe(client);
          client.on("close", () => upstream.destroy());
          upstream.on("close", () => client.destroy());
        });
      }
    };
    client.on("data", onData);
  });
  server.on("error", () => {});
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port ?? 0, options.host ?? "127.0.0.1", () => resolve());
  });
  return {
    port: (server.address() as net.AddressInfo).port,
    connections,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}
