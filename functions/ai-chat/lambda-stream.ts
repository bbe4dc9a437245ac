/**
 * Lambda response streaming: the nodejs runtime's `awslambda.streamifyResponse` / `awslambda.HttpResponseStream`
 * when they exist (on Lambda), and a faithful stand-in everywhere else (tests, the local stack).
 *
 * The contract, from the runtime interface client (aws/aws-lambda-nodejs-runtime-interface-client v3.3.0,
 * src/HttpResponseStream.js L10-30, src/ResponseStream.js L211-245) and API Gateway's streaming doc
 * (https://docs.aws.amazon.com/apigateway/latest/developerguide/response-transfer-mode-lambda.html):
 * - a streaming handler is `(event, responseStream, context) => Promise<void>`, tagged with
 *   `Symbol.for("aws.lambda.runtime.handler.streaming") = "response"`;
 * - `HttpResponseStream.from(stream, {statusCode, headers})` writes nothing itself: on the FIRST `write()` the
 *   runtime sends `JSON.stringify(prelude)` then 8 NUL bytes, then the data. `end(data)` bypasses that hook
 *   (runtime-interface-client issue #97), and `end()` without any write sends no prelude at all, which API Gateway
 *   answers with 500. So: always `write()` at least once (an empty string is enough), never pass data to `end()`;
 * - API Gateway reads only `statusCode`, `headers`, `multiValueHeaders` and `cookies` from the prelude, and needs the
 *   delimiter within the first 16 KB;
 * - the runtime never tells the function that the client went away (runtime-interface-client issue #145). The
 *   stand-in does (it emits `close` before `end()`), so the local stack can abort the upstream; on Lambda that event
 *   only fires after `end()`.
 */
import { EventEmitter } from "node:events";

export const STREAMING_HANDLER = Symbol.for("aws.lambda.runtime.handler.streaming");
export const HTTP_INTEGRATION_CONTENT_TYPE = "application/vnd.awslambda.http-integration-response";
export const PRELUDE_DELIMITER = Buffer.alloc(8);
/** API Gateway's limit on where the delimiter may appear. */
export const MAX_PRELUDE_BYTES = 16 * 1024;

/** What a streaming handler may use of the runtime's response stream. */
export interface LambdaResponseStream {
  write(chunk: string | Uint8Array): boolean;
  end(): void;
  setContentType(contentType: string): void;
  on(event: "drain" | "close" | "error", listener: (...args: unknown[]) => void): unknown;
  once(event: "drain" | "close" | "error", listener: (...args: unknown[]) => void): unknown;
  off(event: "drain" | "close" | "error", listener: (...args: unknown[]) => void): unknown;
  readonly writableEnded?: boolean;
}

export interface HttpResponsePrelude {
  statusCode: number;
  headers?: Record<string, string>;
  multiValueHeaders?: Record<string, string[]>;
  cookies?: string[];
}

export type StreamingHandler<E, C> = (event: E, responseStream: LambdaResponseStream, context: C) => Promise<void>;

interface AwsLambdaGlobal {
  streamifyResponse<E, C>(handler: StreamingHandler<E, C>): StreamingHandler<E, C>;
  HttpResponseStream: { from(stream: LambdaResponseStream, prelude: HttpResponsePrelude): LambdaResponseStream };
}

function runtime(): AwsLambdaGlobal | undefined {
  const candidate = (globalThis as unknown as { awslambda?: AwsLambdaGlobal }).awslambda;
  return candidate && typeof candidate.streamifyResponse === "function" ? candidate : undefined;
}

/** Marks a handler as streaming: the runtime's own function on Lambda, the same tag elsewhere. */
export function streamifyResponse<E, C>(handler: StreamingHandler<E, C>): StreamingHandler<E, C> {
  const aws = runtime();
  if (aws) return aws.streamifyResponse(handler);
  (handler as unknown as Record<symbol, string>)[STREAMING_HANDLER] = "response";
  return handler;
}

export function isStreamingHandler(handler: unknown): boolean {
  return typeof handler === "function" && (handler as unknown as Record<symbol, unknown>)[STREAMING_HANDLER] === "response";
}

/** Sets the HTTP status and headers of a streamed response: the runtime's own on Lambda, the stand-in elsewhere. */
export function httpResponseStream(stream: LambdaResponseStream, prelude: HttpResponsePrelude): LambdaResponseStream {
  const aws = runtime();
  if (aws) return aws.HttpResponseStream.from(stream, prelude);
  // A brand rather than `instanceof`: a bundled handler (its own copy of this module) gets the stack's or a test's stream.
  if (!isLocalResponseStream(stream)) throw new TypeError("httpResponseStream needs a LocalResponseStream outside Lambda");
  stream.setContentType(HTTP_INTEGRATION_CONTENT_TYPE);
  stream.beforeFirstWrite = (write) => {
    write(Buffer.from(JSON.stringify(prelude)));
    write(PRELUDE_DELIMITER);
  };
  return stream;
}

/** Where a LocalResponseStream's bytes go (the gateway emulator's socket, or a test's buffer). */
export interface ResponseSink {
  /** Returns false when the sink wants the writer to wait for `drain`. */
  write(chunk: Buffer): boolean;
  end(): void;
}

const LOCAL_STREAM_BRAND = Symbol.for("metered-ai-api.local-response-stream");

function isLocalResponseStream(stream: LambdaResponseStream): stream is LocalResponseStream {
  return (stream as unknown as Record<symbol, unknown>)[LOCAL_STREAM_BRAND] === true;
}

/**
 * The runtime's response stream, on loopback. Bytes go to a sink as they are written, the prelude hook behaves as the
 * runtime's (including the `end()`-without-`write()` pitfall), and `clientGone()` emits `close` early, which the
 * runtime on Lambda never does.
 */
export class LocalResponseStream extends EventEmitter implements LambdaResponseStream {
  readonly [LOCAL_STREAM_BRAND] = true;
  contentType = "application/octet-stream";
  /** Set by `httpResponseStream`; runs once, before the first write. */
  beforeFirstWrite?: (write: (chunk: Buffer) => void) => void;
  private wrote = false;
  private ended = false;
  private gone = false;

  constructor(private readonly sink: ResponseSink) {
    super();
  }

  get writableEnded(): boolean {
    return this.ended;
  }

  setContentType(contentType: string): void {
    if (this.wrote) throw new Error("Cannot set content-type, too late.");
    this.contentType = contentType;
  }

  write(chunk: string | Uint8Array): boolean {
    if (this.ended) throw new Error("write after end");
    let ok = true;
    const push = (bytes: Buffer) => {
      if (!this.gone) ok = this.sink.write(bytes) && ok;
    };
    if (!this.wrote) {
      this.wrote = true;
      this.beforeFirstWrite?.(push);
    }
    const bytes = typeof chunk === "string" ? Buffer.from(chunk, "utf8") : Buffer.from(chunk);
    if (bytes.length > 0) push(bytes);
    return ok;
  }

  /** Ends the stream. Like the runtime, it writes no prelude if nothing was written before. */
  end(): void {
    if (this.ended) return;
    this.ended = true;
    if (!this.gone) this.sink.end();
    this.emit("close");
  }

  /** The sink drained: writers waiting on `drain` may continue. */
  drained(): void {
    this.emit("drain");
  }

  /** The client went away: later writes are dropped and `close` fires now. */
  clientGone(): void {
    if (this.gone || this.ended) return;
    this.gone = true;
    this.emit("close");
  }
}

/** A parsed prelude and the body bytes that followed it in the same chunk. */
export interface ParsedPrelude {
  prelude: HttpResponsePrelude;
  rest: Buffer;
}

/**
 * Incrementally finds the prelude in a streamed integration response, as API Gateway does: JSON, then 8 NULs within
 * the first 16 KB. `push` returns undefined until the delimiter arrives, then the prelude and the body bytes after it;
 * it throws when the format is broken (API Gateway then answers 500).
 */
export class PreludeParser {
  private buffered = Buffer.alloc(0);

  push(chunk: Buffer): ParsedPrelude | undefined {
    this.buffered = Buffer.concat([this.buffered, chunk]);
    const at = this.buffered.indexOf(PRELUDE_DELIMITER);
    if (at < 0) {
      if (this.buffered.length > MAX_PRELUDE_BYTES) throw new Error("no prelude delimiter within the first 16 KB");
      return undefined;
    }
    if (at + PRELUDE_DELIMITER.length > MAX_PRELUDE_BYTES) throw new Error("no prelude delimiter within the first 16 KB");
    let prelude: unknown;
    try {
      prelude = JSON.parse(this.buffered.subarray(0, at).toString("utf8"));
    } catch {
      throw new Error("the prelude is not valid JSON");
    }
    if (typeof prelude !== "object" || prelude === null || Array.isArray(prelude)) throw new Error("the prelude is not a JSON object");
    const parsed = prelude as HttpResponsePrelude;
    return { prelude: { ...parsed, statusCode: typeof parsed.statusCode === "number" ? parsed.statusCode : 200 }, rest: this.buffered.subarray(at + PRELUDE_DELIMITER.length) };
  }
}
