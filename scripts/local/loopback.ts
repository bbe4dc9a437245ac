/** Start and stop helpers shared by the local servers (gateway emulator, model server, collector). */
import http from "node:http";
import type { AddressInfo } from "node:net";

/** Listens on `host:port` (port 0 picks a free one); rejects with the listen error, e.g. EADDRINUSE. */
export async function listen(server: http.Server, port = 0, host = "127.0.0.1"): Promise<http.Server> {
  server.keepAliveTimeout = 65_000;
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  return server;
}

/** Closes the server and every connection it holds, idle or not. */
export async function close(server: http.Server | undefined): Promise<void> {
  if (!server) return;
  server.closeAllConnections();
  await new Promise<void>((resolve) => server.close(() => resolve()));
}

/** `http://host:port` of a listening server. */
export function origin(server: http.Server | undefined, host = "127.0.0.1"): string {
  const address = server?.address() as AddressInfo | null | undefined;
  if (!address) throw new Error("server is not listening");
  return `http://${host}:${address.port}`;
}
