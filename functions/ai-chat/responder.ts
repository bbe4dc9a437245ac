/**
 * How the core hands an answer to its transport: whole (`send`), or as a stream of text (`startStream`). The core
 * never sees a Lambda response stream; the adapter (`index.ts`) wraps one in a `LambdaResponder`, tests and
 * `handleRequest` without a transport use a `CollectingResponder`.
 */
import { httpResponseStream, type LambdaResponseStream } from "./lambda-stream";

export interface ProxyResponse {
  statusCode: number;
  headers: Record<string, string>;
  body: string;
}

/** The caller's side of a started stream. */
export interface StreamWriter {
  /** Writes text; resolves once the transport can take more (after `drain`), or at once when the caller is gone. */
  write(text: string): Promise<void>;
  /** Ends the response. Nothing may be written after it. */
  end(): Promise<void>;
}

export interface Responder {
  /** Sends a whole answer and ends the response. */
  send(response: ProxyResponse): Promise<void>;
  /** Sends the status line and headers of a streamed answer; the body follows through the writer. */
  startStream(statusCode: number, headers: Record<string, string>): StreamWriter;
  /**
   * Aborted when the caller goes away before the response ended. On Lambda it never is (see `LambdaResponder`).
   */
  readonly clientGone: AbortSignal;
}

/** Collects what the core answers into one `ProxyResponse` (a stream's events concatenated): tests, buffered use. */
export class CollectingResponder implements Responder {
  response?: ProxyResponse;
  private readonly gone = new AbortController();
  readonly clientGone = this.gone.signal;

  async send(response: ProxyResponse): Promise<void> {
    this.response = { statusCode: response.statusCode, headers: { ...response.headers }, body: response.body };
  }

  startStream(statusCode: number, headers: Record<string, string>): StreamWriter {
    const response: ProxyResponse = { statusCode, headers: { ...headers }, body: "" };
    this.response = response;
    return {
      write: async (text) => {
        response.body += text;
      },
      end: async () => undefined,
    };
  }
}

/**
 * A Lambda response stream (or the local stand-in) behind the `Responder` port, following the runtime's contract
 * (research note §1): the prelude is set before anything is written, at least one `write()` happens before `end()`,
 * and `end()` never carries data (runtime-interface-client issue #97: `end(data)` loses the prelude).
 *
 * `clientGone` fires when the stream emits `close` before this responder ended it. The local stack's stand-in does
 * that when the client disconnects; the Lambda runtime never does (runtime-interface-client issue #145, and Lambda's
 * doc: "streamed responses are not interrupted or stopped when the invoking client connection is broken"). So on AWS
 * a disconnected client is not detected: generation runs to its end and is billed in full, bounded by the request's
 * max tokens, the upstream idle timeout and the function's timeout.
 */
export class LambdaResponder implements Responder {
  private readonly gone = new AbortController();
  readonly clientGone = this.gone.signal;
  private stream?: LambdaResponseStream;
  private ended = false;

  constructor(private readonly raw: LambdaResponseStream) {
    raw.on("close", () => {
      if (!this.ended) this.gone.abort();
    });
  }

  /** Whether a prelude has been set (an answer has begun). */
  get started(): boolean {
    return this.stream !== undefined;
  }

  async send(response: ProxyResponse): Promise<void> {
    if (this.stream) throw new Error("a response was already started");
    const body = Buffer.from(response.body, "utf8");
    // Streamed bytes, not a proxy result: the exact length lets API Gateway frame the answer as a buffered one.
    const headers = { ...withoutLength(response.headers), "Content-Length": String(body.length) };
    this.stream = httpResponseStream(this.raw, { statusCode: response.statusCode, headers });
    // Always one write, even of an empty body: it is what sends the prelude.
    await this.write(body);
    this.finish();
  }

  startStream(statusCode: number, headers: Record<string, string>): StreamWriter {
    if (this.stream) throw new Error("a response was already started");
    this.stream = httpResponseStream(this.raw, { statusCode, headers: withoutLength(headers) });
    // The prelude goes out now, so the caller sees the status before the first token.
    this.stream.write("");
    return {
      write: (text) => this.write(Buffer.from(text, "utf8")),
      end: async () => this.finish(),
    };
  }

  /**
   * Makes sure the invocation ends with a well-formed response: a prelude (500, empty) if nothing was ever sent, and
   * an ended stream. For the adapter's `finally`.
   */
  close(): void {
    if (!this.stream) {
      this.stream = httpResponseStream(this.raw, { statusCode: 500, headers: { "Content-Type": "application/json", "Content-Length": "0" } });
      this.stream.write("");
    }
    this.finish();
  }

  private finish(): void {
    if (this.ended) return;
    this.ended = true;
    this.stream?.end();
  }

  private async write(bytes: Buffer): Promise<void> {
    const stream = this.stream;
    if (!stream || this.ended) return;
    // Written even when the caller is gone (the stream drops it): the first write is what carries the prelude.
    if (stream.write(bytes) || this.gone.signal.aborted) return;
    await new Promise<void>((resolve) => {
      const done = () => {
        stream.off("drain", done);
        stream.off("close", done);
        this.gone.signal.removeEventListener("abort", done);
        resolve();
      };
      stream.once("drain", done);
      stream.once("close", done);
      this.gone.signal.addEventListener("abort", done, { once: true });
    });
  }
}

function withoutLength(headers: Record<string, string>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) if (name.toLowerCase() !== "content-length") out[name] = value;
  return out;
}
