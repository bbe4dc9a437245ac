/**
 * A deterministic OpenAI-compatible model server for the local stack, the tests and the benchmarks.
 *
 * `POST /v1/chat/completions` answers "Hello! You said: <last user message>" with `usage` counted by the same
 * tokenizer the function uses. A request may ask for misbehaviour through an extra body field (unknown fields pass
 * through the proxy untouched):
 *
 *   "mock": { "latency_ms": 200, "status": 503, "omit_usage": true, "retry_after": "7", "raw": "not json" }
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
      send(res, mock.status ?? 200, this.completion(request, mock));
    };
    if (mock.latency_ms && mock.latency_ms > 0) setTimeout(respond, mock.latency_ms);
    else respond();
  }

  /** A deterministic completion whose `usage` matches what the function's tokenizer counts. */
  completion(request: Record<string, unknown>, mock: MockDirectives = {}): Record<string, unknown> {
    const model = typeof request.model === "string" ? request.model : "gpt-4o-mini";
    const messages = (Array.isArray(request.messages) ? request.messages : []) as ChatMessage[];
    const lastUser = [...messages].reverse().find((m) => m.role === "user");
    const said = typeof lastUser?.content === "string" ? lastUser.content : "something";
    const content = `Hello! You said: ${said.slice(0, 200)}`;
    const prompt = estimateRequestTokens({ ...request, messages }, model, new TokenTally(encodingForModel(model), MAX_COUNTED_PROMPT_BYTES));
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
}
