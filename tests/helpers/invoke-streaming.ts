import { LocalResponseStream, PreludeParser, type HttpResponsePrelude, type StreamingHandler } from "../../functions/ai-chat/lambda-stream";

/** What a streaming handler sent, as API Gateway reads it: the prelude's status and headers, then the body. */
export interface StreamedResult {
  statusCode: number;
  headers: Record<string, string>;
  body: string;
  /** Whether a prelude was written at all (API Gateway answers 500 without one). */
  hasPrelude: boolean;
  /** Body pieces in the order they were written (the first is often the empty prelude write). */
  pieces: string[];
  /** Whether the handler ended the stream. */
  ended: boolean;
}

export interface InvokeOptions {
  /** Called with each body piece as it is written (after the prelude); may call `stream.clientGone()`. */
  onPiece?: (piece: string, stream: LocalResponseStream) => void;
  /** Called when the handler ends the stream (before the handler's promise resolves). */
  onEnd?: () => void;
}

/**
 * Invokes a streaming handler as the Lambda runtime does — `handler(event, responseStream, context)` — with a
 * `LocalResponseStream`, and collects the prelude and body.
 */
export async function invokeStreaming<E, C>(handler: StreamingHandler<E, C>, event: E, context: C, options: InvokeOptions = {}): Promise<StreamedResult> {
  const parser = new PreludeParser();
  let prelude: HttpResponsePrelude | undefined;
  const pieces: string[] = [];
  let ended = false;
  const stream: LocalResponseStream = new LocalResponseStream({
    write(chunk) {
      let bytes = chunk;
      if (!prelude) {
        const parsed = parser.push(chunk);
        if (!parsed) return true;
        prelude = parsed.prelude;
        bytes = parsed.rest;
      }
      const piece = bytes.toString("utf8");
      if (piece) {
        pieces.push(piece);
        options.onPiece?.(piece, stream);
      }
      return true;
    },
    end() {
      ended = true;
      options.onEnd?.();
    },
  });
  await handler(event, stream, context);
  return {
    statusCode: prelude?.statusCode ?? 500,
    headers: prelude?.headers ?? {},
    body: pieces.join(""),
    hasPrelude: prelude !== undefined,
    pieces,
    ended,
  };
}

/** The `data:` payloads of an SSE body, in order (`[DONE]` included). */
export function sseData(body: string): string[] {
  return body
    .split("\n\n")
    .filter((block) => block.startsWith("data: "))
    .map((block) => block.slice("data: ".length));
}
