import http from "node:http";
import https from "node:https";
import type { Readable } from "node:stream";
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

/** The start of a streamed answer: a 2xx with its body still arriving, or any other status with its body read. */
export type UpstreamStreamResponse =
  | { status: number; headers: Record<string, string>; stream: Readable; body?: undefined }
  | { status: number; headers: Record<string, string>; body: Buffer; stream?: undefined };

/**
 * Narrow port to the model server. Implementations throw `UpstreamTimeoutError` when the deadline passes and
 * `UpstreamError` when no HTTP answer arrived; every HTTP answer, whatever its status, is returned.
 */
export interface UpstreamClient {
  send(request: UpstreamRequest): Promise<UpstreamResponse>;
  /**
   * Sends a request whose answer is streamed (`Accept: text/event-stream`). `timeoutMs` (and the client's own
   * timeout) bound the wait for the status and headers only; from then on the caller reads `stream` at its own
   * pace and bounds it itself. Aborting `signal`, or destroying `stream`, aborts the upstream request.
   */
  openStream(request: UpstreamRequest, signal: AbortSignal): Promise<UpstreamStreamResponse>;
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
    const timeoutMs = this.timeoutFor(request);
    // A timer cleared in `finally` rather than AbortSignal.timeout: nothing stays scheduled once the call is over.
    const deadline = new AbortController();
    const timer = setTimeout(() => deadline.abort(), timeoutMs);
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
        signal: deadline.signal,
      });
      return { status: response.status, headers: flattenHeaders(response.headers), body: Buffer.from(response.data ?? []) };
    } catch (err) {
      throw mapError(err, deadline.signal.aborted, timeoutMs);
    } finally {
      clearTimeout(timer);
    }
  }

  async openStream(request: UpstreamRequest, signal: AbortSignal): Promise<UpstreamStreamResponse> {
    const timeoutMs = this.timeoutFor(request);
    const controller = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, timeoutMs);
    const onAbort = () => controller.abort();
    if (signal.aborted) controller.abort();
    else signal.addEventListener("abort", onAbort, { once: true });
    const apiKey = typeof this.options.apiKey === "function" ? this.options.apiKey() : this.options.apiKey;
    try {
      const response = await this.http.request<Readable>({
        method: request.method,
        url: request.path,
        data: request.body,
        headers: {
          Accept: "text/event-stream",
          // Undecoded bytes: the body handed out is the socket's own response, so destroying it aborts the request.
          "Accept-Encoding": "identity",
          ...(request.body !== undefined ? { "Content-Type": "application/json" } : {}),
          ...(apiKey ? { Authorization: `Bearer ${apiKey}` } : {}),
          "User-Agent": "metered-ai-api",
        },
        responseType: "stream",
        decompress: false,
        // No byte cap here: axios would wrap the socket's response in a generator stream whose destroy() does not
        // reach the socket (the upstream would keep generating). The relay bounds each event and the stream's time.
        maxContentLength: -1,
        signal: controller.signal,
      });
      clearTimeout(timer);
      const headers = flattenHeaders(response.headers);
      const stream = response.data;
      // From here the caller owns the body; aborting its signal still ends the request.
      signal.removeEventListener("abort", onAbort);
      if (signal.aborted) stream.destroy();
      else signal.addEventListener("abort", () => stream.destroy(), { once: true });
      stream.once("close", () => signal.removeEventListener("abort", onAbort));
      if (response.status >= 200 && response.status < 300) return { status: response.status, headers, stream };
      return { status: response.status, headers, body: await readBounded(stream, this.options.maxResponseBytes ?? 5 * 1024 * 1024, timeoutMs) };
    } catch (err) {
      signal.removeEventListener("abort", onAbort);
      if (err instanceof UpstreamError || err instanceof UpstreamTimeoutError) throw err;
      if (signal.aborted && !timedOut) throw new UpstreamError("The request was cancelled before the upstream model server answered.", "client_disconnected");
      throw mapError(err, timedOut, timeoutMs);
    } finally {
      clearTimeout(timer);
    }
  }

  private timeoutFor(request: UpstreamRequest): number {
    return Math.max(1, Math.min(this.options.timeoutMs, request.timeoutMs ?? Infinity));
  }
}

function flattenHeaders(raw: Record<string, unknown>): Record<string, string> {
  const headers: Record<string, string> = {};
  for (const [name, value] of Object.entries(raw)) {
    if (value !== undefined && value !== null) headers[name.toLowerCase()] = Array.isArray(value) ? value.join(", ") : String(value);
  }
  return headers;
}

function mapError(err: unknown, timedOut: boolean, timeoutMs: number): Error {
  if (timedOut) return new UpstreamTimeoutError(timeoutMs);
  if (isAxiosError(err)) {
    if (err.code === "ECONNABORTED" || err.code === "ETIMEDOUT") return new UpstreamTimeoutError(timeoutMs);
    if (err.code === "ERR_BAD_RESPONSE" && /maxContentLength/.test(err.message)) {
      return new UpstreamError("The upstream model server's answer is larger than this service can return.", "upstream_response_too_large");
    }
    return new UpstreamError(`The upstream model server could not be reached (${err.code ?? "network error"}).`, "upstream_unreachable");
  }
  return new UpstreamError("The upstream model server could not be reached.", "upstream_unreachable");
}

/** The body of a non-2xx streamed answer (an error), bounded in bytes and time. */
function readBounded(stream: Readable, maxBytes: number, timeoutMs: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const timer = setTimeout(() => {
      stream.destroy();
      reject(new UpstreamTimeoutError(timeoutMs));
    }, timeoutMs);
    stream.on("data", (chunk: Buffer) => {
      size += chunk.length;
      if (size > maxBytes) {
        clearTimeout(timer);
        stream.destroy();
        reject(new UpstreamError("The upstream model server's answer is larger than this service can return.", "upstream_response_too_large"));
        return;
      }
      chunks.push(chunk);
    });
    stream.once("end", () => {
      clearTimeout(timer);
      resolve(Buffer.concat(chunks));
    });
    stream.once("error", () => {
      clearTimeout(timer);
      reject(new UpstreamError("The upstream model server's answer was cut off.", "upstream_unreachable"));
    });
  });
}
