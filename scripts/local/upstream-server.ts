/**
 * A deterministic OpenAI-compatible model server for the local stack, the tests and the benchmarks.
 *
 * `POST /v1/chat/completions` answers "Hello! You said: <last user message>" with `usage` counted by the same
 * tokenizer the function uses. A request may ask for misbehaviour through an extra body field (unknown fields pass
 * through the proxy untouched):
 *
 *   "mock": { "latency_ms": 200, "status": 503, "omit_usage": true, "retry_after": "7", "raw": "not json" }
 *
 * `stream: true` answers `text/event-stream` in OpenAI's chunk format: a role chunk, one chunk per word, tool-call
 * deltas when asked, a finish chunk, the usage chunk (`choices: []`) only when `stream_options.include_usage` is
 * true (every other chunk then carries `"usage": null`, as OpenAI does), then `data: [DONE]`. Stream directives:
 *
 *   "mock": { "chunk_delay_ms": 50, "words": 200, "tool_call": true, "omit_usage": true,
 *             "fail_after_chunks": 5, "stall_after_chunks": 5, "garbage_after_chunks": 5 }
 *
 * `streams` records, per streamed request, what the server actually wrote before the client went away (chunks,
 * content, completion tokens of that content) and whether it saw the request aborted.
 *
 * The function strips `mock` before forwarding unless `FORWARD_MOCK_DIRECTIVES=true`, which the local stack sets only
 * when it runs this server itself; so directives work through `npm start` and never reach a real upstream.
 *
 * Tests can also install `server.override`, which takes over the raw socket response for faults a body field
 * cannot describe (resets mid-body, slow trickles, huge bodies).
 *
 * One process serves every caller, so no request may hold the event loop for long: prompts are counted exactly up
 * to `MAX_COUNTED_PROMPT_BYTES` and extrapolated beyond (a 1 MB one-word prompt would otherwise take ~0.3 s of
 * tokenizing, stalling everyone else), and `received` keeps only the most recent requests.
 */
import http from "node:http";
import { LoopbackServer, readBody, sendJson as send } from "./loopback";
import { isRecord } from "../../functions/ai-chat/config";
import { TokenTally, countTokens, encodingForModel, estimateRequestTokens } from "../../functions/ai-chat/usage";
import type { ChatMessage } from "../../functions/ai-chat/validate";

export interface MockDirectives {
  latency_ms?: number;
  status?: number;
  omit_usage?: boolean;
  retry_after?: string;
  raw?: string;
  /** Pause before each chunk after the first, in ms. */
  chunk_delay_ms?: number;
  /** Answer with "word1 word2 … wordN" instead of echoing the prompt. */
  words?: number;
  /** Stream a tool call to the first tool of `tools` (also when `tool_choice` requires one). */
  tool_call?: boolean;
  /** Destroy the socket after this many chunks (a connection reset mid-stream). */
  fail_after_chunks?: number;
  /** Stop sending after this many chunks, keeping the connection open (an idle stream). */
  stall_after_chunks?: number;
  /** Send `data: not-json` after this many chunks, then carry on. */
  garbage_after_chunks?: number;
}

/** What the server did with one streamed request. */
export interface StreamRecord {
  /** The chunk id (`chatcmpl-mock-<n>`), which the function passes on to its client. */
  id: string;
  /** The last user message, as received. */
  said: string;
  /** `data:` events written (role, words, tool-call pieces, finish, usage), `[DONE]` excluded. */
  chunks: number;
  /** The assistant content it wrote, concatenated. */
  content: string;
  /** Tool-call arguments it wrote, concatenated. */
  toolArguments: string;
  /** Completion tokens of what it wrote (content, tool name and arguments), counted as the function's estimator does. */
  readonly completionTokensSent: number;
  /** The usage of the whole answer (what the usage chunk says, whether or not it was sent). */
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
  usageChunkSent: boolean;
  /** It wrote everything, `[DONE]` included, and ended the response. */
  finished: boolean;
  /** The client closed the connection before the server had finished. */
  aborted: boolean;
  /** The server reset the connection itself (`fail_after_chunks`). */
  reset: boolean;
}

export interface UpstreamServerOptions {
  /** When set, requests must carry `Authorization: Bearer <apiKey>` or get 401. */
  apiKey?: string;
  port?: number;
  host?: string;
  models?: string[];
  /** How many of the most recent requests `received` keeps. @default 1000 */
  keepReceived?: number;
}

/**
 * UTF-8 bytes of a prompt the server tokenizes exactly; beyond them it extrapolates, with the function's own
 * bounded estimator (`TokenTally`) on a smaller budget. Prompts within it get exactly the function's estimate.
 */
export const MAX_COUNTED_PROMPT_BYTES = 64 * 1024;
/** Request body characters `received` keeps per request. */
const MAX_RECEIVED_BODY_CHARS = 64 * 1024;

export interface ReceivedRequest {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  body: string;
}

export type Override = (req: http.IncomingMessage, res: http.ServerResponse, body: string) => boolean | void;

export class UpstreamServer extends LoopbackServer {
  /** The most recent requests (`keepReceived`), bodies cut at 64 KiB: what tests assert on. */
  readonly received: ReceivedRequest[] = [];
  /** Return true (or nothing) after handling the response yourself; return false to fall through. */
  override?: Override;
  /** Streamed requests, most recent last (`keepReceived` of them). */
  readonly streams: StreamRecord[] = [];
  private counter = 0;

  constructor(private readonly options: UpstreamServerOptions = {}) {
    super(options);
  }

  get url(): string {
    return `${this.origin}/v1`;
  }

  protected handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    readBody(req).then((raw) => {
      const body = raw.toString("utf8");
      this.received.push({ method: req.method ?? "", url: req.url ?? "", headers: req.headers, body: body.slice(0, MAX_RECEIVED_BODY_CHARS) });
      while (this.received.length > (this.options.keepReceived ?? 1000)) this.received.shift();
      try {
        if (this.override && this.override(req, res, body) !== false) return;
        this.route(req, res, body);
      } catch (err) {
        send(res, 500, { error: { message: `mock upstream failed: ${(err as Error).message}`, type: "server_error", param: null, code: null } });
      }
    }).catch(() => res.destroy());
  }

  private route(req: http.IncomingMessage, res: http.ServerResponse, body: string): void {
    const path = (req.url ?? "").split("?")[0].replace(/^\/v1/, "");
    if (this.options.apiKey && req.headers.authorization !== `Bearer ${this.options.apiKey}`) {
      return send(res, 401, { error: { message: "Incorrect API key provided.", type: "invalid_request_error", param: null, code: "invalid_api_key" } });
    }
    if (req.method === "GET" && path === "/models") {
      const models = this.options.models ?? ["gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo"];
      return send(res, 200, { object: "list", data: models.map((id) => ({ id, object: "model", created: 1700000000, owned_by: "mock" })) });
    }
    if (req.method !== "POST" || path !== "/chat/completions") {
      return send(res, 404, { error: { message: `Invalid URL (${req.method} ${req.url})`, type: "invalid_request_error", param: null, code: null } });
    }
    let request: Record<string, unknown>;
    try {
      const parsed = JSON.parse(body) as unknown;
      if (!isRecord(parsed)) throw new Error("not an object");
      request = parsed;
    } catch {
      return send(res, 400, { error: { message: "We could not parse the JSON body of your request.", type: "invalid_request_error", param: null, code: null } });
    }
    const mock: MockDirectives = isRecord(request.mock) ? (request.mock as MockDirectives) : {};
    const respond = () => {
      if (mock.raw !== undefined) {
        res.writeHead(mock.status ?? 200, { "Content-Type": "text/plain" });
        res.end(mock.raw);
        return;
      }
      if (mock.status && mock.status >= 400) {
        const headers: Record<string, string> = mock.retry_after ? { "Retry-After": mock.retry_after } : {};
        return send(res, mock.status, { error: { message: `mock upstream error ${mock.status}`, type: "server_error", param: null, code: null } }, headers);
      }
      if (request.stream === true) return this.stream(res, request, mock);
      send(res, mock.status ?? 200, this.completion(request, mock));
    };
    if (mock.latency_ms && mock.latency_ms > 0) setTimeout(respond, mock.latency_ms);
    else respond();
  }

  /** A deterministic completion whose `usage` matches what the function's tokenizer counts. */
  completion(request: Record<string, unknown>, mock: MockDirectives = {}): Record<string, unknown> {
    const { model, content, prompt } = this.answer(request, mock);
    const completion = countTokens(content, encodingForModel(model));
    this.counter += 1;
    return {
      id: `chatcmpl-mock-${this.counter}`,
      object: "chat.completion",
      created: 1700000000,
      model,
      system_fingerprint: "fp_mock",
      choices: [{ index: 0, message: { role: "assistant", content, refusal: null }, logprobs: null, finish_reason: "stop" }],
      ...(mock.omit_usage ? {} : { usage: { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion } }),
    };
  }

  /** The model, answer text, last user message and prompt tokens of a request. */
  private answer(request: Record<string, unknown>, mock: MockDirectives): { model: string; content: string; said: string; prompt: number } {
    const model = typeof request.model === "string" ? request.model : "gpt-4o-mini";
    const messages = (Array.isArray(request.messages) ? request.messages : []) as ChatMessage[];
    const lastUser = [...messages].reverse().find((m) => m.role === "user");
    const said = typeof lastUser?.content === "string" ? lastUser.content : "something";
    const words = typeof mock.words === "number" && mock.words > 0 ? Math.min(Math.floor(mock.words), 100_000) : 0;
    const content = words > 0 ? Array.from({ length: words }, (_, i) => `word${i + 1}`).join(" ") : `Hello! You said: ${said.slice(0, 200)}`;
    const prompt = estimateRequestTokens({ ...request, messages }, model, new TokenTally(encodingForModel(model), MAX_COUNTED_PROMPT_BYTES));
    return { model, content, said, prompt };
  }

  /** The tool a streamed answer calls, if any: `mock.tool_call`, or a `tool_choice` that requires one. */
  private toolToCall(request: Record<string, unknown>, mock: MockDirectives): string | undefined {
    const tools = Array.isArray(request.tools) ? request.tools : [];
    const nameOf = (tool: unknown) => (isRecord(tool) && isRecord(tool.function) && typeof tool.function.name === "string" ? tool.function.name : undefined);
    const choice = request.tool_choice;
    if (isRecord(choice)) return nameOf(choice) ?? nameOf(tools[0]);
    if (tools.length === 0) return undefined;
    return mock.tool_call === true || choice === "required" ? nameOf(tools[0]) : undefined;
  }

  /** Streams the answer as OpenAI does (see the file comment), honouring the stream directives and backpressure. */
  private stream(res: http.ServerResponse, request: Record<string, unknown>, mock: MockDirectives): void {
    const { model, content, said, prompt } = this.answer(request, mock);
    const encoding = encodingForModel(model);
    const options = isRecord(request.stream_options) ? request.stream_options : {};
    const includeUsage = options.include_usage === true;
    const tool = this.toolToCall(request, mock);
    const args = tool ? JSON.stringify({ text: said.slice(0, 200), words: said.split(/\s+/).filter(Boolean).length }) : "";
    // A tool call answers with no text, as OpenAI's models do.
    const text = tool ? "" : content;
    const completion = countTokens(text, encoding) + (tool ? countTokens(tool, encoding) + countTokens(args, encoding) : 0);
    this.counter += 1;
    let toolNameSent = false;
    const record: StreamRecord = {
      id: `chatcmpl-mock-${this.counter}`,
      said,
      chunks: 0,
      content: "",
      toolArguments: "",
      // Counted when read: tokenizing the growing text after every chunk would be quadratic.
      get completionTokensSent() {
        return countTokens(this.content, encoding) + (toolNameSent && tool ? countTokens(tool, encoding) + countTokens(this.toolArguments, encoding) : 0);
      },
      usage: { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion },
      usageChunkSent: false,
      finished: false,
      aborted: false,
      reset: false,
    };
    this.streams.push(record);
    while (this.streams.length > (this.options.keepReceived ?? 1000)) this.streams.shift();

    const base = { id: record.id, object: "chat.completion.chunk", created: 1700000000, model, system_fingerprint: "fp_mock" };
    const usageNull = includeUsage ? { usage: null } : {};
    type Piece = { json: Record<string, unknown>; content?: string; args?: string; toolName?: boolean; usage?: boolean };
    const pieces: Piece[] = [{ json: { ...base, choices: [{ index: 0, delta: { role: "assistant", content: "", refusal: null }, logprobs: null, finish_reason: null }], ...usageNull } }];
    // One chunk per word, the space before a word going with it, so the pieces concatenate to the answer.
    for (const word of text.match(/\s*\S+/g) ?? []) {
      pieces.push({ json: { ...base, choices: [{ index: 0, delta: { content: word }, logprobs: null, finish_reason: null }], ...usageNull }, content: word });
    }
    if (tool) {
      const call = { index: 0, id: `call_mock_${this.counter}`, type: "function", function: { name: tool, arguments: "" } };
      pieces.push({ json: { ...base, choices: [{ index: 0, delta: { tool_calls: [call] }, logprobs: null, finish_reason: null }], ...usageNull }, toolName: true });
      const step = Math.max(1, Math.ceil(args.length / 4));
      for (let at = 0; at < args.length; at += step) {
        const part = args.slice(at, at + step);
        pieces.push({ json: { ...base, choices: [{ index: 0, delta: { tool_calls: [{ index: 0, function: { arguments: part } }] }, logprobs: null, finish_reason: null }], ...usageNull }, args: part });
      }
    }
    pieces.push({ json: { ...base, choices: [{ index: 0, delta: {}, logprobs: null, finish_reason: tool ? "tool_calls" : "stop" }], ...usageNull } });
    if (includeUsage && !mock.omit_usage) pieces.push({ json: { ...base, choices: [], usage: record.usage }, usage: true });

    res.on("close", () => {
      if (!record.finished && !record.reset) record.aborted = true;
    });
    res.writeHead(mock.status ?? 200, { "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", Connection: "keep-alive" });
    res.flushHeaders();
    const delay = Math.max(0, Number(mock.chunk_delay_ms) || 0);
    const gone = () => res.destroyed || record.aborted || record.reset;
    const wait = (ms: number) => new Promise<void>((resolve) => (ms > 0 ? setTimeout(resolve, ms) : setImmediate(resolve)));
    const write = async (text: string) => {
      if (!res.write(text) && !gone()) await new Promise<void>((resolve) => {
        res.once("drain", resolve);
        res.once("close", resolve);
      });
    };
    const run = async () => {
      for (let i = 0; i < pieces.length; i++) {
        if (i > 0) await wait(delay);
        if (gone()) return;
        if (mock.fail_after_chunks !== undefined && record.chunks >= mock.fail_after_chunks) {
          record.reset = true;
          res.socket?.resetAndDestroy(); // a TCP RST: no final chunk, no [DONE]
          return;
        }
        if (mock.stall_after_chunks !== undefined && record.chunks >= mock.stall_after_chunks) return; // silence, socket open
        if (mock.garbage_after_chunks !== undefined && record.chunks === mock.garbage_after_chunks) await write("data: not-json\n\n");
        const piece = pieces[i];
        await write(`data: ${JSON.stringify(piece.json)}\n\n`);
        record.chunks += 1;
        if (piece.content) record.content += piece.content;
        if (piece.args) record.toolArguments += piece.args;
        if (piece.usage) record.usageChunkSent = true;
        if (piece.toolName) toolNameSent = true;
      }
      if (gone()) return;
      await write("data: [DONE]\n\n");
      record.finished = true;
      res.end();
    };
    run().catch(() => res.destroy());
  }
}
