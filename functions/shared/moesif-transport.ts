import http from "node:http";
import https from "node:https";

/** What the collector answered: its status and, on 429/503, when to come back. */
export interface CollectorAnswer {
  status: number;
  retryAfter?: string;
}

/**
 * POSTs gzip JSON to a Moesif collector (`/v1/events` or `/v1/events/batch`, app id in `X-Moesif-Application-Id`,
 * Moesif's documented wire format) over node:http(s) with a keep-alive agent. Shared by the request path's direct
 * send (`functions/ai-chat/moesif.ts`) and the usage forwarder's Moesif sink.
 */
export class MoesifTransport {
  private readonly target: URL;
  private readonly transport: typeof http | typeof https;
  private readonly agent: http.Agent;

  constructor(baseUri: string, private readonly userAgent: string, maxSockets: number) {
    this.target = new URL(baseUri.replace(/\/+$/, ""));
    const secure = this.target.protocol === "https:";
    this.transport = secure ? https : http;
    this.agent = secure ? new https.Agent({ keepAlive: true, maxSockets }) : new http.Agent({ keepAlive: true, maxSockets });
  }

  /**
   * Resolves once the answer has been read; rejects on a network error, a connection closed before the answer was
   * complete, or after `timeoutMs` in all (one timer bounds connect, send and answer, a slow trickle included).
   */
  post(path: string, gzipBody: Buffer, applicationId: string, timeoutMs: number): Promise<CollectorAnswer> {
    return new Promise((resolve, reject) => {
      let settled = false;
      const finish = (err: Error | undefined, answer?: CollectorAnswer) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) reject(err);
        else resolve(answer!);
      };
      const req = this.transport.request(
        {
          protocol: this.target.protocol,
          hostname: this.target.hostname,
          port: this.target.port || undefined,
          path: `${this.target.pathname === "/" ? "" : this.target.pathname}${path}`,
          method: "POST",
          agent: this.agent,
          headers: {
            "Content-Type": "application/json; charset=utf-8",
            "Content-Encoding": "gzip",
            "Content-Length": String(gzipBody.length),
            "X-Moesif-Application-Id": applicationId,
            "User-Agent": this.userAgent,
          },
        },
        (res) => {
          const retryAfter = res.headers["retry-after"];
          res.on("error", (err) => finish(err));
          res.on("end", () => finish(undefined, { status: res.statusCode ?? 0, retryAfter: Array.isArray(retryAfter) ? retryAfter[0] : retryAfter }));
          res.on("close", () => finish(new Error("connection closed before the answer was complete")));
          res.resume();
        },
      );
      const timer = setTimeout(() => {
        const err = Object.assign(new Error(`no answer within ${timeoutMs} ms`), { code: "ETIMEDOUT" });
        req.destroy(err);
        finish(err);
      }, timeoutMs);
      req.on("error", (err) => finish(err));
      req.end(gzipBody);
    });
  }
}
