import http from "node:http";
import https from "node:https";
import axios, { type AxiosInstance, isAxiosError } from "axios";
import { UpstreamError, UpstreamTimeoutError } from "./errors";

export interface UpstreamRequest {
  method: "GET" | "POST";
  /** Path below the upstream base URL, e.g. `/chat/completions`. */
  path: string;
  body?: string;
  /** A tighter deadline for this call (the time the function has left); the client's own timeout still applies. */
  timeoutMs?: number;
}

export interface UpstreamResponse {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

/**
 * Narrow port to the model server. Implementations throw `UpstreamTimeoutError` when the deadline passes and
 * `UpstreamError` when no HTTP answer arrived; every HTTP answer, whatever its status, is returned.
 */
export interface UpstreamClient {
  send(request: UpstreamRequest): Promise<UpstreamResponse>;
}

export interface AxiosUpstreamOptions {
  baseUrl: string;
  /** The key, or a function returning it: a key read from SSM is known only after the first request started. */
  apiKey?: string | (() => string | undefined);
  timeoutMs: number;
  /** Larger answers are refused (502): Lambda cannot return more than 6 MB anyway. */
  maxResponseBytes?: number;
}

/** The upstream client: axios with keep-alive agents and a hard deadline on the whole exchange. */
export class AxiosUpstreamClient implements UpstreamClient {
  private readonly http: AxiosInstance;

  constructor(private readonly options: AxiosUpstreamOptions) {
    this.http = axios.create({
      baseURL: options.baseUrl,
      httpAgent: new http.Agent({ keepAlive: true, maxSockets: 64 }),
      httpsAgent: new https.Agent({ keepAlive: true, maxSockets: 64 }),
      maxContentLength: options.maxResponseBytes ?? 5 * 1024 * 1024,
      maxRedirects: 0,
      proxy: false,
      responseType: "arraybuffer",
      transformResponse: [(data: unknown) => data],
      validateStatus: () => true,
    });
  }

  async send(request: UpstreamRequest): Promise<UpstreamResponse> {
    const timeoutMs = Math.max(1, Math.min(this.options.timeoutMs, request.timeoutMs ?? Infinity));
    const deadline = AbortSignal.timeout(timeoutMs);
    const apiKey = typeof this.options.apiKey === "function" ? this.options.apiKey() : this.options.apiKey;
    try {
      const response = await this.http.request<Buffer>({
        method: request.method,
        url: request.path,
        data: request.body,
        headers: {
          Accept: "application/json",
          ...(request.body !== undefined ? { "Content-Type": "application/json" } : {}),
          ...(apiKey ? { Authorization: `Bearer ${apiKey}` } : {}),
          "User-Agent": "metered-ai-api",
        },
        // axios' timeout restarts on every chunk; the signal bounds a slow trickle too.
        timeout: timeoutMs,
        signal: deadline,
      });
      const headers: Record<string, string> = {};
      for (const [name, value] of Object.entries(response.headers)) {
        if (value !== undefined && value !== null) headers[name.toLowerCase()] = Array.isArray(value) ? value.join(", ") : String(value);
      }
      return { status: response.status, headers, body: Buffer.from(response.data ?? []) };
    } catch (err) {
      if (deadline.aborted) throw new UpstreamTimeoutError(timeoutMs);
      if (isAxiosError(err)) {
        if (err.code === "ECONNABORTED" || err.code === "ETIMEDOUT") throw new UpstreamTimeoutError(timeoutMs);
        if (err.code === "ERR_BAD_RESPONSE" && /maxContentLength/.test(err.message)) {
          throw new UpstreamError("The upstream model server's answer is larger than this service can return.", "upstream_response_too_large");
        }
        throw new UpstreamError(`The upstream model server could not be reached (${err.code ?? "network error"}).`, "upstream_unreachable");
      }
      throw new UpstreamError("The upstream model server could not be reached.", "upstream_unreachable");
    }
  }
}
