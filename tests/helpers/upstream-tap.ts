import type http from "node:http";
import type { UpstreamServer } from "../../scripts/local/upstream-server";

/** One request the model server answered, and the bytes it wrote back (what the proxy read). */
export interface UpstreamExchange {
  method: string;
  url: string;
  /** The request body the model server received. */
  request: string;
  status: number;
  /** Everything the model server wrote (a JSON body, or a whole SSE stream as far as it got). */
  response: string;
  /** The model server called `end()` (a stream cut by the client or a reset never ends). */
  ended: boolean;
}

/** The Responses API and embeddings usage an answer reported, in the ledger's terms (input → prompt, output → completion). */
export interface ReportedUsage {
  prompt_tokens: number;
  completion_tokens: number;
}

/**
 * Records what the built-in model server writes back to the proxy, through its `override` test seam: every response's
 * `write`/`end` is teed and the request then falls through to the server's own routes (the seam returns false). So a
 * test compares the proxy's records with what the upstream itself reported, not with what the proxy relayed.
 */
export function tapUpstream(server: UpstreamServer): UpstreamExchange[] {
  const log: UpstreamExchange[] = [];
  server.override = (req: http.IncomingMessage, res: http.ServerResponse, body: string) => {
    const exchange: UpstreamExchange = { method: req.method ?? "", url: req.url ?? "", request: body, status: 0, response: "", ended: false };
    log.push(exchange);
    const chunks: Buffer[] = [];
    const keep = (chunk: unknown) => {
      if (typeof chunk === "string") chunks.push(Buffer.from(chunk));
      else if (chunk instanceof Uint8Array) chunks.push(Buffer.from(chunk));
      exchange.response = Buffer.concat(chunks).toString("utf8");
      exchange.status = res.statusCode;
    };
    const write = res.write.bind(res) as (...args: unknown[]) => boolean;
    const end = res.end.bind(res) as (...args: unknown[]) => http.ServerResponse;
    res.write = ((chunk: unknown, ...rest: unknown[]) => {
      keep(chunk);
      return write(chunk, ...rest);
    }) as typeof res.write;
    res.end = ((chunk?: unknown, ...rest: unknown[]) => {
      if (typeof chunk !== "function") keep(chunk);
      exchange.ended = true;
      return end(chunk, ...rest);
    }) as typeof res.end;
    return false;
  };
  return log;
}

/** The SSE events of a Responses API stream as written: `{ type, ...data }` each. */
export function sseEvents(text: string): Array<Record<string, unknown> & { type: string }> {
  return text
    .split("\n\n")
    .filter((block) => block.includes("data: "))
    .map((block) => JSON.parse(block.slice(block.indexOf("data: ") + 6)) as Record<string, unknown> & { type: string });
}

/**
 * The usage the model server reported in an exchange: a Response object's (or a stream's final
 * `response.completed`/`response.incomplete` event's) `input_tokens`/`output_tokens`, or an embeddings list's
 * `prompt_tokens` (0 completion). Throws when it reported none.
 */
export function reportedUsage(exchange: UpstreamExchange): ReportedUsage {
  const usageOf = (body: Record<string, unknown>): ReportedUsage | undefined => {
    const usage = body.usage as Record<string, number> | undefined;
    if (!usage) return undefined;
    if (typeof usage.input_tokens === "number") return { prompt_tokens: usage.input_tokens, completion_tokens: usage.output_tokens };
    if (typeof usage.prompt_tokens === "number") return { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens ?? 0 };
    return undefined;
  };
  let found: ReportedUsage | undefined;
  if (exchange.response.startsWith("event: ") || exchange.response.startsWith("data: ")) {
    const final = sseEvents(exchange.response).find((e) => e.type === "response.completed" || e.type === "response.incomplete");
    found = final ? usageOf(final.response as Record<string, unknown>) : undefined;
  } else if (exchange.response) {
    found = usageOf(JSON.parse(exchange.response) as Record<string, unknown>);
  }
  if (!found) throw new Error(`the model server reported no usage for ${exchange.method} ${exchange.url}`);
  return found;
}
