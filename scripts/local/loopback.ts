/** What the local servers (gateway emulator, model server, collector) share: lifecycle, body reading, JSON replies. */
import http from "node:http";
import type { AddressInfo } from "node:net";

/** An HTTP server on loopback with start/stop. Subclasses answer requests in `handle`. */
export abstract class LoopbackServer {
  private server?: http.Server;

  protected constructor(private readonly address: { port?: number; host?: string }) {}

  protected abstract handle(req: http.IncomingMessage, res: http.ServerResponse): void;

  /** `http://host:port` once listening. */
  protected get origin(): string {
    const bound = this.server?.address() as AddressInfo | null | undefined;
    if (!bound) throw new Error(`${this.constructor.name} is not listening`);
    return `http://${this.address.host ?? "127.0.0.1"}:${bound.port}`;
  }

  /** Listens on `host:port` (port 0 picks a free one); rejects with the listen error, e.g. EADDRINUSE. */
  async start(): Promise<this> {
    const server = http.createServer((req, res) => this.handle(req, res));
    server.keepAliveTimeout = 65_000;
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(this.address.port ?? 0, this.address.host ?? "127.0.0.1", () => {
        server.off("error", reject);
        resolve();
      });
    });
    this.server = server;
    return this;
  }

  /** Closes the server and every connection it holds, idle or not. */
  async stop(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    if (!server) return;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

/** Reads a request body; past `limit` bytes the rest is drained and "too large" returned. */
export function readBody(req: http.IncomingMessage): Promise<Buffer>;
export function readBody(req: http.IncomingMessage, limit: number): Promise<Buffer | "too large">;
export function readBody(req: http.IncomingMessage, limit = Number.POSITIVE_INFINITY): Promise<Buffer | "too large"> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on("data", (chunk: Buffer) => {
      size += chunk.length;
      if (size <= limit) chunks.push(chunk);
    });
    req.on("end", () => resolve(size > limit ? "too large" : Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

export function sendJson(res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": String(Buffer.byteLength(text)), ...headers });
  res.end(text);
}
