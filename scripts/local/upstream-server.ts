/**
 * A deterministic OpenAI-compatible model server for the local stack, the tests and the benchmarks.
 *
 * Routes (below `/v1`; every answer deterministic, with `usage` counted by the tokenizer the function uses):
 *
 * - `POST /chat/completions`: "Hello! You said: <last user message>".
 * - `POST /responses`: a Response object (`resp_mock_<server>_<n>`) whose one output message says the same to the last user
 *   input; `stream: true` answers the Responses API's typed events. `instructions` count as input;
 *   `previous_response_id` must name a stored response (else 400 `previous_response_not_found`) whose input and output
 *   tokens count as input again, as OpenAI counts them; `max_output_tokens` cuts the answer (status `incomplete`,
 *   `incomplete_details.reason` `max_output_tokens`); `store: false` keeps it out of the store. A tool call to the
 *   first function tool when `tool_choice` requires one or `mock.tool_call` asks for it.
 * - `GET /responses/{id}`, `DELETE /responses/{id}`, `GET /responses/{id}/input_items` (`limit`, `order`, `after`,
 *   `before`), `POST /responses/{id}/cancel` (400: only background responses can be cancelled, and there are none):
 *   on stored responses (the most recent `keepReceived`), OpenAI's 404 for any other id.
 * - `POST /embeddings`: unit vectors derived from a hash of each input (`dimensions`, default 8), `encoding_format`
 *   `float` or `base64` (float32 little-endian, which the openai SDK asks for by default).
 * - `GET /models`, `GET /models/{model}` (404 `model_not_found` for a model not in `models`).
 *
 * A POST may ask for misbehaviour through an extra body field (unknown fields pass through the proxy untouched):
 *
 *   "mock": { "latency_ms": 200, "status": 503, "omit_usage": true, "retry_after": "7", "raw": "not json" }
 *
 * and, for `/responses`, `"cached_tokens": 5` / `"reasoning_tokens": 7` (reported in the usage details; reasoning
 * tokens count as output, as OpenAI counts them).
 *
 * Chat `stream: true` answers `text/event-stream` in OpenAI's chunk format: a role chunk, one chunk per word, tool-call
 * deltas when asked, a finish chunk, the usage chunk (`choices: []`) only when `stream_options.include_usage` is
 * true (every other chunk then carries `"usage": null`, as OpenAI does), then `data: [DONE]`. Responses `stream: true`
 * answers `event: <type>` / `data: <json>` pairs, each with its `sequence_number`: `response.created`,
 * `response.in_progress`, the output item, its content part, one `response.output_text.delta` per word, the `.done`
 * events, then `response.completed` (or `response.incomplete`) carrying the usage; no `[DONE]`. Stream directives
 * (both APIs; an "event" or "chunk" is one SSE event):
 *
 *   "mock": { "chunk_delay_ms": 50, "words": 200, "tool_call": true, "omit_usage": true,
 *             "fail_after_chunks": 5, "stall_after_chunks": 5, "garbage_after_chunks": 5 }
 *
 * `streams` records, per streamed request, what the server actually wrote before the client went away (events,
 * content, completion tokens of that content) and whether it saw the request aborted. `received` logs every request,
 * so a test can prove the proxy never asked for something.
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
import { createHash, randomBytes } from "node:crypto";
import http from "node:http";
import { LoopbackServer, readBody, sendJson as send } from "./loopback";
import { isRecord } from "../../functions/ai-chat/config";
import { TokenTally, countTokens, encodingForModel, estimateRequestTokens, type EncodingName } from "../../functions/ai-chat/usage";
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
  /** Responses: report this many of the input tokens as cached (`input_tokens_details.cached_tokens`). */
  cached_tokens?: number;
  /** Responses: add this many reasoning tokens to the output (`output_tokens_details.reasoning_tokens`). */
  reasoning_tokens?: number;
}

/** What the server did with one streamed request. */
export interface StreamRecord {
  /** Which API streamed: chat completions chunks or Responses API events. */
  api: "chat" | "responses";
  /** The chunk id (`chatcmpl-mock-<n>`) or response id (`resp_mock_<server>_<n>`), which the function passes on to its client. */
  id: string;
  /** The last user message, as received. */
  said: string;
  /** SSE events written (chat: role, words, tool-call pieces, finish, usage; `[DONE]` excluded). */
  chunks: number;
  /** The assistant content it wrote, concatenated. */
  content: string;
  /** Tool-call arguments it wrote, concatenated. */
  toolArguments: string;
  /** Completion tokens of what it wrote (content, tool name and arguments), counted as the function's estimator does. */
  readonly completionTokensSent: number;
  /**
   * The usage of the whole answer (what the usage chunk or `response.completed` says, whether or not it was sent); for
   * the Responses API, input tokens as `prompt_tokens` and output tokens as `completion_tokens`.
   */
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
  /** The usage chunk (chat) or the final `response.completed`/`response.incomplete` event with usage was written. */
  usageChunkSent: boolean;
  /** It wrote everything (`[DONE]` included for chat) and ended the response. */
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
  /** How many of the most recent requests `received` keeps (and streams, and stored responses). @default 1000 */
  keepReceived?: number;
}

/**
 * UTF-8 bytes of a prompt the server tokenizes exactly; beyond them it extrapolates, with the function's own
 * bounded estimator (`TokenTally`) on a smaller budget. Prompts within it get exactly the function's estimate.
 */
export const MAX_COUNTED_PROMPT_BYTES = 64 * 1024;
/** Request body characters `received` keeps per request. */
const MAX_RECEIVED_BODY_CHARS = 64 * 1024;
/** The models `GET /models` lists unless `models` says otherwise. */
export const DEFAULT_MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo", "text-embedding-3-small"];
/** Embedding length when the request gives no `dimensions`: small, so logs and tests stay readable. */
export const DEFAULT_EMBEDDING_DIMENSIONS = 8;
/** The largest `dimensions` accepted (text-embedding-3-large's native size). */
export const MAX_EMBEDDING_DIMENSIONS = 3072;

export interface ReceivedRequest {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  body: string;
}

export type Override = (req: http.IncomingMessage, res: http.ServerResponse, body: string) => boolean | void;

/** A stored response: what `GET /responses/{id}` and `/input_items` answer, and what a continuation counts. */
export interface StoredResponse {
  response: Record<string, unknown>;
  /** Its input items, each with an id, oldest first. */
  input: Array<Record<string, unknown> & { id: string }>;
  /** Its input plus output tokens: what a response continuing it sends to the model again as input. */
  contextTokens: number;
}

/** One SSE event to write, and what it carries (for the stream record). */
interface Frame {
  text: string;
  content?: string;
  args?: string;
  toolName?: boolean;
  usage?: boolean;
}

/** OpenAI's error body. */
function openAiError(message: string, param: string | null = null, code: string | null = null, type = "invalid_request_error") {
  return { error: { message, type, param, code } };
}

/** OpenAI's 404 for a response id it does not know (the same text the function answers for another's id). */
export function responseNotFound(id: string) {
  return openAiError(`Response with id '${id.slice(0, 256)}' not found.`);
}

export class UpstreamServer extends LoopbackServer {
  /** The most recent requests (`keepReceived`), bodies cut at 64 KiB: what tests assert on. */
  readonly received: ReceivedRequest[] = [];
  /** Return true (or nothing) after handling the response yourself; return false to fall through. */
  override?: Override;
  /** Streamed requests, most recent last (`keepReceived` of them). */
  readonly streams: StreamRecord[] = [];
  /** Stored responses by id (the most recent `keepReceived`; `store: false` ones never). */
  readonly responses = new Map<string, StoredResponse>();
  private counter = 0;
  /** Distinguishes this server's response ids from an earlier run's (see `resp_mock_<server>_<n>`). */
  private readonly idPrefix = randomBytes(4).toString("hex");

  constructor(private readonly options: UpstreamServerOptions = {}) {
    super(options);
  }

  get url(): string {
    return `${this.origin}/v1`;
  }

  private get keep(): number {
    return this.options.keepReceived ?? 1000;
  }

  private get models(): string[] {
    return this.options.models ?? DEFAULT_MODELS;
  }

  protected handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    readBody(req).then((raw) => {
      const body = raw.toString("utf8");
      this.received.push({ method: req.method ?? "", url: req.url ?? "", headers: req.headers, body: body.slice(0, MAX_RECEIVED_BODY_CHARS) });
      while (this.received.length > this.keep) this.received.shift();
      try {
        if (this.override && this.override(req, res, body) !== false) return;
        this.route(req, res, body);
      } catch (err) {
        send(res, 500, openAiError(`mock upstream failed: ${(err as Error).message}`, null, null, "server_error"));
      }
    }).catch(() => res.destroy());
  }

  private route(req: http.IncomingMessage, res: http.ServerResponse, body: string): void {
    const [rawPath, rawQuery = ""] = (req.url ?? "").split("?", 2);
    const path = rawPath.replace(/^\/v1/, "");
    const method = req.method ?? "GET";
    if (this.options.apiKey && req.headers.authorization !== `Bearer ${this.options.apiKey}`) {
      return send(res, 401, openAiError("Incorrect API key provided.", null, "invalid_api_key"));
    }
    const invalidUrl = () => send(res, 404, openAiError(`Invalid URL (${method} ${req.url})`));
    // Segments below /v1, each decoded (an id may arrive percent-encoded).
    const segments = path.split("/").slice(1).map(decodeSegment);

    if (method === "GET" && path === "/models") {
      return send(res, 200, { object: "list", data: this.models.map(modelObject) });
    }
    if (method === "GET" && segments.length === 2 && segments[0] === "models" && segments[1]) {
      const id = segments[1];
      if (this.models.includes(id)) return send(res, 200, modelObject(id));
      return send(res, 404, openAiError(`The model '${id}' does not exist`, "model", "model_not_found"));
    }
    if (segments[0] === "responses" && segments.length >= 2 && segments[1]) {
      const stored = this.responses.get(segments[1]);
      const operation = `${method} ${segments.slice(2).join("/")}`;
      if (!["GET ", "DELETE ", "GET input_items", "POST cancel"].includes(operation)) return invalidUrl();
      if (!stored) return send(res, 404, responseNotFound(segments[1]));
      return this.storedResponse(res, operation, segments[1], stored, new URLSearchParams(rawQuery));
    }

    const answer = method === "POST" ? { "/chat/completions": "chat", "/responses": "responses", "/embeddings": "embeddings" }[path] : undefined;
    if (!answer) return invalidUrl();
    let request: Record<string, unknown>;
    try {
      const parsed = JSON.parse(body) as unknown;
      if (!isRecord(parsed)) throw new Error("not an object");
      request = parsed;
    } catch {
      return send(res, 400, openAiError("We could not parse the JSON body of your request."));
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
        return send(res, mock.status, openAiError(`mock upstream error ${mock.status}`, null, null, "server_error"), headers);
      }
      if (answer === "chat") {
        if (request.stream === true) return this.stream(res, request, mock);
        return send(res, mock.status ?? 200, this.completion(request, mock));
      }
      if (answer === "responses") return this.createResponse(res, request, mock);
      return this.embeddings(res, request, mock);
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
    const prompt = estimateRequestTokens({ ...request, messages }, model, new TokenTally(encodingForModel(model), MAX_COUNTED_PROMPT_BYTES));
    return { model, content: answerText(said, mock), said, prompt };
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
    const args = tool ? toolArguments(said) : "";
    // A tool call answers with no text, as OpenAI's models do.
    const text = tool ? "" : content;
    const completion = countTokens(text, encoding) + (tool ? countTokens(tool, encoding) + countTokens(args, encoding) : 0);
    this.counter += 1;
    const id = `chatcmpl-mock-${this.counter}`;

    const base = { id, object: "chat.completion.chunk", created: 1700000000, model, system_fingerprint: "fp_mock" };
    const usageNull = includeUsage ? { usage: null } : {};
    const frame = (json: Record<string, unknown>, extra: Omit<Frame, "text"> = {}): Frame => ({ text: `data: ${JSON.stringify(json)}\n\n`, ...extra });
    const frames: Frame[] = [frame({ ...base, choices: [{ index: 0, delta: { role: "assistant", content: "", refusal: null }, logprobs: null, finish_reason: null }], ...usageNull })];
    // One chunk per word, the space before a word going with it, so the pieces concatenate to the answer.
    for (const word of words(text)) {
      frames.push(frame({ ...base, choices: [{ index: 0, delta: { content: word }, logprobs: null, finish_reason: null }], ...usageNull }, { content: word }));
    }
    if (tool) {
      const call = { index: 0, id: `call_mock_${this.counter}`, type: "function", function: { name: tool, arguments: "" } };
      frames.push(frame({ ...base, choices: [{ index: 0, delta: { tool_calls: [call] }, logprobs: null, finish_reason: null }], ...usageNull }, { toolName: true }));
      for (const part of argumentPieces(args)) {
        frames.push(frame({ ...base, choices: [{ index: 0, delta: { tool_calls: [{ index: 0, function: { arguments: part } }] }, logprobs: null, finish_reason: null }], ...usageNull }, { args: part }));
      }
    }
    frames.push(frame({ ...base, choices: [{ index: 0, delta: {}, logprobs: null, finish_reason: tool ? "tool_calls" : "stop" }], ...usageNull }));
    const usage = { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
    if (includeUsage && !mock.omit_usage) frames.push(frame({ ...base, choices: [], usage }, { usage: true }));
    this.emit(res, { api: "chat", id, said, encoding, tool, usage }, frames, mock, "data: [DONE]\n\n");
  }

  /**
   * Writes `frames` as one SSE response, recording what was written in a new `streams` entry: one frame per
   * `chunk_delay_ms`, the fault directives applied, backpressure respected; `trailer` (chat's `[DONE]`) last.
   */
  private emit(
    res: http.ServerResponse,
    about: { api: StreamRecord["api"]; id: string; said: string; encoding: EncodingName; tool?: string; usage: StreamRecord["usage"] },
    frames: Frame[],
    mock: MockDirectives,
    trailer?: string,
  ): void {
    const { encoding, tool } = about;
    let toolNameSent = false;
    const record: StreamRecord = {
      api: about.api,
      id: about.id,
      said: about.said,
      chunks: 0,
      content: "",
      toolArguments: "",
      // Counted when read: tokenizing the growing text after every chunk would be quadratic.
      get completionTokensSent() {
        return countTokens(this.content, encoding) + (toolNameSent && tool ? countTokens(tool, encoding) + countTokens(this.toolArguments, encoding) : 0);
      },
      usage: about.usage,
      usageChunkSent: false,
      finished: false,
      aborted: false,
      reset: false,
    };
    this.streams.push(record);
    while (this.streams.length > this.keep) this.streams.shift();

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
      for (let i = 0; i < frames.length; i++) {
        if (i > 0) await wait(delay);
        if (gone()) return;
        if (mock.fail_after_chunks !== undefined && record.chunks >= mock.fail_after_chunks) {
          record.reset = true;
          res.socket?.resetAndDestroy(); // a TCP RST: no final chunk, no [DONE]
          return;
        }
        if (mock.stall_after_chunks !== undefined && record.chunks >= mock.stall_after_chunks) return; // silence, socket open
        if (mock.garbage_after_chunks !== undefined && record.chunks === mock.garbage_after_chunks) await write("data: not-json\n\n");
        const piece = frames[i];
        await write(piece.text);
        record.chunks += 1;
        if (piece.content) record.content += piece.content;
        if (piece.args) record.toolArguments += piece.args;
        if (piece.usage) record.usageChunkSent = true;
        if (piece.toolName) toolNameSent = true;
      }
      if (gone()) return;
      if (trailer) await write(trailer);
      record.finished = true;
      res.end();
    };
    run().catch(() => res.destroy());
  }

  // ---- The Responses API ----

  /** `POST /responses`: a Response object, or its typed event stream. */
  private createResponse(res: http.ServerResponse, request: Record<string, unknown>, mock: MockDirectives): void {
    const previousId = request.previous_response_id;
    let previous: StoredResponse | undefined;
    if (previousId !== undefined && previousId !== null) {
      if (typeof previousId !== "string") return send(res, 400, openAiError("Invalid type for 'previous_response_id': expected a string.", "previous_response_id", "invalid_type"));
      previous = this.responses.get(previousId);
      if (!previous) {
        // OpenAI's answer for an unknown (or deleted, or unstored) previous response.
        return send(res, 400, openAiError(`Previous response with id '${previousId.slice(0, 256)}' not found.`, "previous_response_id", "previous_response_not_found"));
      }
    }
    const maxOutput = request.max_output_tokens;
    if (maxOutput !== undefined && maxOutput !== null && !(typeof maxOutput === "number" && Number.isInteger(maxOutput) && maxOutput >= 1)) {
      return send(res, 400, openAiError("Invalid 'max_output_tokens': expected an integer of at least 1.", "max_output_tokens", "invalid_value"));
    }
    this.counter += 1;
    const n = this.counter;
    const input = responseInputItems(request.input, n);
    if (!input) return send(res, 400, openAiError("Invalid type for 'input': expected a string or an array of input items.", "input", "invalid_type"));

    const model = typeof request.model === "string" ? request.model : "gpt-4o-mini";
    const encoding = encodingForModel(model);
    const instructions = typeof request.instructions === "string" ? request.instructions : null;
    const said = lastUserText(input) ?? "something";
    const messages = [...(instructions ? [{ role: "system", content: instructions }] : []), ...input.map(asChatMessage)] as ChatMessage[];
    const inputTokens =
      estimateRequestTokens({ messages, tools: Array.isArray(request.tools) ? request.tools : undefined }, model, new TokenTally(encoding, MAX_COUNTED_PROMPT_BYTES)) +
      (previous?.contextTokens ?? 0);
    const reasoningTokens = nonNegative(mock.reasoning_tokens);
    const cachedTokens = Math.min(nonNegative(mock.cached_tokens), inputTokens);

    const tool = responsesToolToCall(request, mock);
    const args = tool ? toolArguments(said) : "";
    let text = tool ? "" : answerText(said, mock);
    // max_output_tokens bounds reasoning and visible output together: the text gets what reasoning left over.
    let incomplete = false;
    if (typeof maxOutput === "number") {
      const room = maxOutput - reasoningTokens;
      const cut = cutToTokens(text, Math.max(0, room), encoding);
      incomplete = room < 0 || cut !== text;
      text = cut;
    }
    const outputTokens = countTokens(text, encoding) + (tool ? countTokens(tool, encoding) + countTokens(args, encoding) : 0) + reasoningTokens;
    const usage = {
      input_tokens: inputTokens,
      input_tokens_details: { cached_tokens: cachedTokens },
      output_tokens: outputTokens,
      output_tokens_details: { reasoning_tokens: reasoningTokens },
      total_tokens: inputTokens + outputTokens,
    };

    // A per-server prefix: the local owners table outlives a restart of this server, whose counter starts again at
    // 1, and a reused id would belong to whoever created it first (the function answers 404 to anyone else).
    const id = `resp_mock_${this.idPrefix}_${n}`;
    const status = incomplete ? "incomplete" : "completed";
    const message = { id: `msg_mock_${n}`, type: "message", status, role: "assistant", content: [{ type: "output_text", annotations: [], logprobs: [], text }] };
    const call = { id: `fc_mock_${n}`, type: "function_call", status: "completed", arguments: args, call_id: `call_mock_${n}`, name: tool };
    const store = request.store !== false;
    // The shape OpenAI answers (https://platform.openai.com/docs/api-reference/responses/object).
    const response: Record<string, unknown> = {
      id,
      object: "response",
      created_at: 1700000000,
      status,
      background: false,
      error: null,
      incomplete_details: incomplete ? { reason: "max_output_tokens" } : null,
      instructions,
      max_output_tokens: typeof maxOutput === "number" ? maxOutput : null,
      max_tool_calls: null,
      model,
      output: [tool ? call : message],
      parallel_tool_calls: true,
      previous_response_id: typeof previousId === "string" ? previousId : null,
      reasoning: { effort: null, summary: null },
      service_tier: "default",
      store,
      temperature: typeof request.temperature === "number" ? request.temperature : 1,
      text: { format: { type: "text" } },
      tool_choice: request.tool_choice ?? "auto",
      tools: Array.isArray(request.tools) ? request.tools : [],
      top_p: typeof request.top_p === "number" ? request.top_p : 1,
      truncation: "disabled",
      ...(mock.omit_usage ? {} : { usage }),
      user: null,
      metadata: isRecord(request.metadata) ? request.metadata : {},
    };
    // Stored as it will end, before the first byte: a client that learns the id can retrieve it at once.
    if (store) {
      this.responses.set(id, { response, input, contextTokens: inputTokens + outputTokens });
      while (this.responses.size > this.keep) this.responses.delete(this.responses.keys().next().value!);
    }
    if (request.stream !== true) return send(res, mock.status ?? 200, response);

    let sequence = 0;
    const event = (type: string, fields: Record<string, unknown>, extra: Omit<Frame, "text"> = {}): Frame => ({
      text: `event: ${type}\ndata: ${JSON.stringify({ type, sequence_number: sequence++, ...fields })}\n\n`,
      ...extra,
    });
    const snapshot = { ...response, status: "in_progress", incomplete_details: null, output: [], usage: null };
    const frames: Frame[] = [event("response.created", { response: snapshot }), event("response.in_progress", { response: snapshot })];
    if (tool) {
      frames.push(event("response.output_item.added", { output_index: 0, item: { ...call, status: "in_progress", arguments: "" } }, { toolName: true }));
      for (const part of argumentPieces(args)) frames.push(event("response.function_call_arguments.delta", { item_id: call.id, output_index: 0, delta: part }, { args: part }));
      frames.push(event("response.function_call_arguments.done", { item_id: call.id, output_index: 0, name: tool, arguments: args }));
      frames.push(event("response.output_item.done", { output_index: 0, item: call }));
    } else {
      const at = { item_id: message.id, output_index: 0, content_index: 0 };
      frames.push(event("response.output_item.added", { output_index: 0, item: { ...message, status: "in_progress", content: [] } }));
      frames.push(event("response.content_part.added", { ...at, part: { type: "output_text", annotations: [], logprobs: [], text: "" } }));
      for (const word of words(text)) frames.push(event("response.output_text.delta", { ...at, delta: word, logprobs: [] }, { content: word }));
      frames.push(event("response.output_text.done", { ...at, text, logprobs: [] }));
      frames.push(event("response.content_part.done", { ...at, part: message.content[0] }));
      frames.push(event("response.output_item.done", { output_index: 0, item: message }));
    }
    frames.push(event(incomplete ? "response.incomplete" : "response.completed", { response }, { usage: !mock.omit_usage }));
    const recorded = { prompt_tokens: usage.input_tokens, completion_tokens: usage.output_tokens, total_tokens: usage.total_tokens };
    this.emit(res, { api: "responses", id, said, encoding, tool, usage: recorded }, frames, mock);
  }

  /** The routes on one stored response: retrieve, delete, its input items, cancel. */
  private storedResponse(res: http.ServerResponse, operation: string, id: string, stored: StoredResponse, query: URLSearchParams): void {
    if (operation === "GET ") return send(res, 200, stored.response);
    if (operation === "DELETE ") {
      this.responses.delete(id);
      // The current API reference's answer (the openai SDK ignores the body: `delete` resolves to void).
      return send(res, 200, { id, object: "response.deleted", deleted: true });
    }
    if (operation === "POST cancel") {
      // Only a response created with `background: true` can be cancelled; OpenAI refuses the others with this 400
      // (the text vLLM copies: https://github.com/vllm-project/vllm/issues/57999).
      return send(res, 400, openAiError("Cannot cancel a synchronous response."));
    }
    // GET input_items: a cursor page, newest first by default.
    const limitText = query.get("limit");
    const limit = limitText === null ? 20 : Number(limitText);
    if (!Number.isInteger(limit) || limit < 1 || limit > 100) return send(res, 400, openAiError("Invalid 'limit': expected an integer between 1 and 100.", "limit", "invalid_value"));
    const order = query.get("order") ?? "desc";
    if (order !== "asc" && order !== "desc") return send(res, 400, openAiError("Invalid 'order': expected 'asc' or 'desc'.", "order", "invalid_value"));
    let items = order === "asc" ? [...stored.input] : [...stored.input].reverse();
    const after = query.get("after");
    const before = query.get("before");
    if (after !== null) items = items.slice(items.findIndex((item) => item.id === after) + 1);
    if (before !== null) {
      const at = items.findIndex((item) => item.id === before);
      if (at >= 0) items = items.slice(0, at);
    }
    const page = items.slice(0, limit);
    return send(res, 200, { object: "list", data: page, first_id: page[0]?.id ?? null, last_id: page[page.length - 1]?.id ?? null, has_more: items.length > page.length });
  }

  // ---- Embeddings ----

  /** `POST /embeddings`: one deterministic unit vector per input, `usage.prompt_tokens` counted by the tokenizer. */
  private embeddings(res: http.ServerResponse, request: Record<string, unknown>, mock: MockDirectives): void {
    if (typeof request.model !== "string" || request.model === "") return send(res, 400, openAiError("You must provide a model parameter.", "model", null));
    const model = request.model;
    const inputs = embeddingInputs(request.input);
    if (!inputs) return send(res, 400, openAiError("'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.", "input", null));
    const dimensions = request.dimensions ?? DEFAULT_EMBEDDING_DIMENSIONS;
    if (typeof dimensions !== "number" || !Number.isInteger(dimensions) || dimensions < 1 || dimensions > MAX_EMBEDDING_DIMENSIONS) {
      return send(res, 400, openAiError(`Invalid 'dimensions': expected an integer between 1 and ${MAX_EMBEDDING_DIMENSIONS}.`, "dimensions", "invalid_value"));
    }
    const format = request.encoding_format ?? "float";
    if (format !== "float" && format !== "base64") return send(res, 400, openAiError("Invalid 'encoding_format': expected 'float' or 'base64'.", "encoding_format", "invalid_value"));
    const tally = new TokenTally(encodingForModel(model), MAX_COUNTED_PROMPT_BYTES);
    let promptTokens = 0;
    const data = inputs.map((input, index) => {
      // Token arrays are tokens already; text is counted as the function counts it.
      promptTokens += typeof input === "string" ? tally.count(input) : input.length;
      const vector = embeddingVector(model, input, dimensions);
      return { object: "embedding", index, embedding: format === "base64" ? float32Base64(vector) : vector };
    });
    send(res, mock.status ?? 200, { object: "list", data, model, ...(mock.omit_usage ? {} : { usage: { prompt_tokens: promptTokens, total_tokens: promptTokens } }) });
  }
}

/** A model object as OpenAI lists it. */
function modelObject(id: string) {
  return { id, object: "model", created: 1700000000, owned_by: "mock" };
}

function decodeSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
}

function nonNegative(value: unknown): number {
  return typeof value === "number" && Number.isFinite(value) && value > 0 ? Math.floor(value) : 0;
}

/** The answer to `said`: an echo, or "word1 … wordN" with `mock.words`. */
function answerText(said: string, mock: MockDirectives): string {
  const count = typeof mock.words === "number" && mock.words > 0 ? Math.min(Math.floor(mock.words), 100_000) : 0;
  return count > 0 ? Array.from({ length: count }, (_, i) => `word${i + 1}`).join(" ") : `Hello! You said: ${said.slice(0, 200)}`;
}

/** Pieces of `text` with the whitespace before each word attached, which concatenate back to `text`. */
function words(text: string): string[] {
  return text.match(/\s*\S+/g) ?? [];
}

/** The arguments of a mock tool call about `said`. */
function toolArguments(said: string): string {
  return JSON.stringify({ text: said.slice(0, 200), words: said.split(/\s+/).filter(Boolean).length });
}

/** Tool-call arguments in four pieces, as a model streams them. */
function argumentPieces(args: string): string[] {
  const step = Math.max(1, Math.ceil(args.length / 4));
  const pieces: string[] = [];
  for (let at = 0; at < args.length; at += step) pieces.push(args.slice(at, at + step));
  return pieces;
}

/** The longest prefix of `text` (whole words) within `maxTokens` tokens. */
function cutToTokens(text: string, maxTokens: number, encoding: EncodingName): string {
  if (countTokens(text, encoding) <= maxTokens) return text;
  let kept = "";
  let tokens = 0;
  // Word by word (each starts with its space, where the pre-tokenizer splits anyway): linear, not quadratic.
  for (const word of words(text)) {
    const more = countTokens(word, encoding);
    if (tokens + more > maxTokens) break;
    kept += word;
    tokens += more;
  }
  return kept;
}

/**
 * The request's `input` as input items (each with an id), as `GET /responses/{id}/input_items` lists them: a string is
 * one user message; `{ role, content }` messages get OpenAI's message shape (string content as one text part).
 * Undefined when `input` is neither a string nor an array of objects; absent input is no items.
 */
function responseInputItems(input: unknown, n: number): StoredResponse["input"] | undefined {
  const id = (i: number) => `msg_mock_${n}_in_${i}`;
  if (input === undefined || input === null) return [];
  if (typeof input === "string") return [{ id: id(0), type: "message", role: "user", status: "completed", content: [{ type: "input_text", text: input }] }];
  if (!Array.isArray(input) || !input.every(isRecord)) return undefined;
  return input.map((item, i) => {
    const itemId = typeof item.id === "string" ? item.id : id(i);
    if (typeof item.role === "string" && (item.type === undefined || item.type === "message")) {
      const content = typeof item.content === "string" ? [{ type: item.role === "assistant" ? "output_text" : "input_text", text: item.content }] : item.content;
      return { id: itemId, type: "message", role: item.role, status: "completed", content };
    }
    return { ...item, id: itemId };
  });
}

/** The text of the last user message among `items`, if any. */
function lastUserText(items: StoredResponse["input"]): string | undefined {
  for (let i = items.length - 1; i >= 0; i--) {
    const item = items[i];
    if (item.role !== "user" || !Array.isArray(item.content)) continue;
    const texts = item.content.filter((part): part is { text: string } => isRecord(part) && typeof part.text === "string").map((part) => part.text);
    if (texts.length > 0) return texts.join(" ");
  }
  return undefined;
}

/** An input item as a chat message, for the token count: messages keep their parts, other items count as JSON. */
function asChatMessage(item: StoredResponse["input"][number]): { role: string; content: unknown } {
  if (item.type === "message" && typeof item.role === "string") return { role: item.role, content: item.content };
  const { id: _id, ...rest } = item;
  return { role: "user", content: JSON.stringify(rest) };
}

/** The function tool a response calls, if any: `mock.tool_call`, or a `tool_choice` that requires one. */
function responsesToolToCall(request: Record<string, unknown>, mock: MockDirectives): string | undefined {
  const tools = (Array.isArray(request.tools) ? request.tools : []).filter((tool) => isRecord(tool) && tool.type === "function" && typeof tool.name === "string");
  const first = tools.length > 0 ? ((tools[0] as Record<string, unknown>).name as string) : undefined;
  const choice = request.tool_choice;
  if (isRecord(choice) && choice.type === "function" && typeof choice.name === "string") return choice.name;
  return mock.tool_call === true || choice === "required" ? first : undefined;
}

/** The inputs of an embeddings request (a string or token array each), or undefined when `input` is invalid. */
function embeddingInputs(input: unknown): Array<string | number[]> | undefined {
  const isTokens = (value: unknown): value is number[] => Array.isArray(value) && value.length > 0 && value.every((t) => Number.isInteger(t) && (t as number) >= 0);
  if (typeof input === "string") return input.length > 0 ? [input] : undefined;
  if (!Array.isArray(input) || input.length === 0 || input.length > 2048) return undefined;
  if (input.every((item) => typeof item === "string" && item.length > 0)) return input as string[];
  if (isTokens(input)) return [input];
  if (input.every(isTokens)) return input as number[][];
  return undefined;
}

/**
 * A unit vector of `dimensions` float32 values from a hash of the model and input: the same input always gets the same
 * vector, different inputs different ones. Values are float32-exact, so the float and base64 answers agree.
 */
function embeddingVector(model: string, input: string | number[], dimensions: number): number[] {
  const seed = createHash("sha256").update(model).update("\0").update(typeof input === "string" ? `s:${input}` : `t:${input.join(",")}`).digest();
  const raw: number[] = [];
  for (let block = 0; raw.length < dimensions; block++) {
    const bytes = createHash("sha256").update(seed).update(String(block)).digest();
    for (let at = 0; at + 4 <= bytes.length && raw.length < dimensions; at += 4) raw.push(bytes.readUInt32LE(at) / 0x80000000 - 1);
  }
  const norm = Math.sqrt(raw.reduce((sum, v) => sum + v * v, 0)) || 1;
  return raw.map((v) => Math.fround(v / norm));
}

/** float32 little-endian, base64: OpenAI's `encoding_format: "base64"`. */
function float32Base64(vector: number[]): string {
  const bytes = Buffer.alloc(vector.length * 4);
  vector.forEach((v, i) => bytes.writeFloatLE(v, i * 4));
  return bytes.toString("base64");
}
