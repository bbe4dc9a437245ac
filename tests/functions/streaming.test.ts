import { expect } from "chai";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { createDeps, createHandler } from "../../functions/ai-chat/index";
import type { UsageMeter, UsageRecord } from "../../functions/ai-chat/metering";
import { toMoesifEvent } from "../../functions/ai-chat/moesif";
import { createParser } from "eventsource-parser";
import { countTokens } from "../../functions/shared/tokenizer";
import { chatBody, createApiGatewayEvent, createContext } from "../helpers/events";
import { CUSTOMERS, PLANS, UPSTREAM_KEY } from "../helpers/fakes";
import { invokeStreaming, sseData, type InvokeOptions } from "../helpers/invoke-streaming";
import { recordForScan } from "../helpers/secret-scan";

/** What the loopback upstream saw of one request. */
interface Seen {
  body: Record<string, unknown>;
  headers: http.IncomingHttpHeaders;
  /** Data events written before the connection closed. */
  written: number;
  /** The client (the function) closed the connection before the answer ended. */
  aborted: boolean;
  closed: Promise<void>;
}

type Script = (res: http.ServerResponse, seen: Seen) => Promise<void> | void;

const ID = "chatcmpl-stream-test";
const chunk = (delta: Record<string, unknown>, finish: string | null = null) =>
  JSON.stringify({ id: ID, object: "chat.completion.chunk", created: 1700000000, model: "gpt-4o-mini", choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }], usage: null });
const usageChunk = (prompt: number, completion: number) =>
  JSON.stringify({ id: ID, object: "chat.completion.chunk", created: 1700000000, model: "gpt-4o-mini", choices: [], usage: { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion } });
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

class RecordingMeter implements UsageMeter {
  readonly records: UsageRecord[] = [];
  constructor(private readonly order: string[] = []) {}
  async record(record: UsageRecord): Promise<void> {
    this.order.push("meter");
    this.records.push(record);
  }
}

describe("ai-chat handler: streamed chat completions (loopback SSE upstream)", () => {
  let server: http.Server;
  let baseUrl: string;
  let script: Script;
  let seen: Seen[];
  let logs: string[];

  before(async () => {
    server = http.createServer((req, res) => {
      const parts: Buffer[] = [];
      req.on("data", (part: Buffer) => parts.push(part));
      req.on("end", () => {
        let closedResolve!: () => void;
        const record: Seen = { body: JSON.parse(Buffer.concat(parts).toString("utf8") || "{}"), headers: req.headers, written: 0, aborted: false, closed: new Promise((r) => (closedResolve = r)) };
        seen.push(record);
        res.on("close", () => {
          record.aborted = !res.writableFinished;
          closedResolve();
        });
        const write = res.write.bind(res) as (data: string) => boolean;
        // Count the data events the upstream wrote (what it would bill for).
        (res as unknown as { write: (data: string) => boolean }).write = (data: string) => {
          if (typeof data === "string" && data.startsWith("data: {")) record.written += 1;
          return write(data);
        };
        void Promise.resolve(script(res, record)).catch(() => res.destroy());
      });
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", () => resolve()));
    baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`;
  });
  after(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  beforeEach(() => {
    seen = [];
    logs = [];
  });
  afterEach(() => recordForScan("streaming handler logs", logs));

  const sse = (res: http.ServerResponse) => res.writeHead(200, { "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache" });
  /** A complete OpenAI stream: role chunk, one chunk per word, finish chunk, usage chunk when asked, [DONE]. */
  const openAiStream = (words: string[], options: { usage?: [number, number]; pauseAfterFirst?: Promise<unknown> } = {}): Script => async (res, record) => {
    sse(res);
    res.write(`data: ${chunk({ role: "assistant", content: "" })}\n\n`);
    for (const [i, word] of words.entries()) {
      res.write(`data: ${chunk({ content: word })}\n\n`);
      if (i === 0 && options.pauseAfterFirst) await options.pauseAfterFirst;
    }
    res.write(`data: ${chunk({}, "stop")}\n\n`);
    const asked = (record.body.stream_options as { include_usage?: boolean } | undefined)?.include_usage === true;
    if (asked && options.usage) res.write(`data: ${usageChunk(...options.usage)}\n\n`);
    res.end("data: [DONE]\n\n");
  };

  const setup = (env: Record<string, string | undefined> = {}, order: string[] = []) => {
    const meter = new RecordingMeter(order);
    const handler = createHandler(() => ({
      ...createDeps(
        {
          UPSTREAM_BASE_URL: baseUrl,
          UPSTREAM_API_KEY: UPSTREAM_KEY,
          UPSTREAM_TIMEOUT_MS: "2000",
          UPSTREAM_IDLE_TIMEOUT_MS: "2000",
          CUSTOMERS: JSON.stringify(CUSTOMERS),
          PLANS: JSON.stringify(PLANS),
          METERING_TIMEOUT_MS: "300",
          ...env,
        },
        { write: (line) => logs.push(line) },
      ),
      meter,
    }));
    return { handler, meter };
  };

  const invoke = async (handler: ReturnType<typeof createHandler>, body: unknown, options: InvokeOptions & { resource?: string; context?: Parameters<typeof createContext>[0] } = {}) => {
    const result = await invokeStreaming(handler, createApiGatewayEvent({ apiKey: "caller-key", body, resource: options.resource }), createContext(options.context), options);
    recordForScan("streaming handler response", [result.body, JSON.stringify(result.headers)]);
    return result;
  };

  const words = [" apple", " banana", " cherry", " grape", " lemon"];
  const wordTokens = countTokens(words.join(""), "o200k_base");

  it("forwards each upstream chunk as it arrives, before the upstream has sent its last one", async () => {
    let release!: () => void;
    const firstSeenByCaller = new Promise<void>((resolve) => (release = resolve));
    let upstreamFinished = false;
    // The upstream holds its second word until the caller has the first (or 3 s, so a buffering function fails, not hangs).
    script = async (res, record) => {
      await openAiStream(words, { usage: [10, wordTokens], pauseAfterFirst: Promise.race([firstSeenByCaller, sleep(3000)]) })(res, record);
      upstreamFinished = true;
    };
    const { handler } = setup();
    let finishedWhenFirstSeen: boolean | undefined;
    const result = await invoke(handler, chatBody({ stream: true }), {
      onPiece: (piece) => {
        if (finishedWhenFirstSeen === undefined && piece.includes(" apple")) {
          finishedWhenFirstSeen = upstreamFinished;
          release();
        }
      },
    });
    expect(finishedWhenFirstSeen).to.equal(false);
    expect(result.statusCode).to.equal(200);
    expect(result.headers).to.include({ "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache" });
    expect(result.headers).to.not.have.property("Content-Length");
    expect(result.headers["x-request-id"]).to.be.a("string");
    const data = sseData(result.body);
    expect(data.at(-1)).to.equal("[DONE]");
    const content = data.slice(0, -1).map((d) => JSON.parse(d).choices[0].delta.content ?? "").join("");
    expect(content).to.equal(words.join(""));
  });

  it("asks the upstream for include_usage whatever the caller sent, and forwards the usage chunk only to a caller who asked", async () => {
    script = openAiStream(words, { usage: [21, wordTokens] });
    const { handler, meter } = setup();

    const asked = await invoke(handler, chatBody({ stream: true, stream_options: { include_usage: true } }));
    const notAsked = await invoke(handler, chatBody({ stream: true }));

    for (const request of seen) {
      expect(request.body.stream).to.equal(true);
      expect(request.body.stream_options).to.deep.equal({ include_usage: true });
      expect(request.headers.accept).to.equal("text/event-stream");
    }
    const usageOf = (body: string) => sseData(body).filter((d) => d !== "[DONE]").map((d) => JSON.parse(d)).filter((c) => c.usage);
    expect(usageOf(asked.body)).to.have.length(1);
    expect(usageOf(asked.body)[0]).to.deep.include({ choices: [], usage: { prompt_tokens: 21, completion_tokens: wordTokens, total_tokens: 21 + wordTokens } });
    expect(usageOf(notAsked.body)).to.have.length(0);
    expect(sseData(notAsked.body).at(-1)).to.equal("[DONE]");

    expect(meter.records).to.have.length(2);
    for (const record of meter.records) {
      expect(record.status).to.equal(200);
      expect(record.streamed).to.equal(true);
      expect(record.usageEstimated).to.equal(false);
      expect(record.usage).to.deep.include({ prompt_tokens: 21, completion_tokens: wordTokens });
      expect(record.billed).to.equal(true);
    }
  });

  it("estimates an upstream without a usage chunk, and sends the caller who asked an estimated usage chunk", async () => {
    script = openAiStream(words); // never a usage chunk, as some OpenAI-compatible servers do
    const { handler, meter } = setup();
    const result = await invoke(handler, chatBody({ stream: true, stream_options: { include_usage: true } }));
    const [record] = meter.records;
    expect(record.usageEstimated).to.equal(true);
    expect(record.usage.completion_tokens).to.equal(wordTokens);
    expect(record.usage.prompt_tokens).to.be.greaterThan(0);
    const data = sseData(result.body);
    expect(data.at(-1)).to.equal("[DONE]");
    const last = JSON.parse(data.at(-2)!);
    expect(last).to.deep.include({ id: ID, object: "chat.completion.chunk", model: "gpt-4o-mini", choices: [] });
    expect(last.usage).to.deep.equal({ prompt_tokens: record.usage.prompt_tokens, completion_tokens: wordTokens, total_tokens: record.usage.prompt_tokens + wordTokens });
  });

  it("estimates from tool-call names and argument deltas", async () => {
    const args = ['{"city"', ':"Paris', ' France"', "}"];
    script = (res) => {
      sse(res);
      res.write(`data: ${chunk({ role: "assistant", content: null, tool_calls: [{ index: 0, id: "call_1", type: "function", function: { name: "get_weather", arguments: "" } }] })}\n\n`);
      for (const part of args) res.write(`data: ${chunk({ tool_calls: [{ index: 0, function: { arguments: part } }] })}\n\n`);
      res.write(`data: ${chunk({}, "tool_calls")}\n\n`);
      res.end("data: [DONE]\n\n");
    };
    const { handler, meter } = setup();
    await invoke(handler, chatBody({ stream: true }));
    const expected = countTokens("get_weather", "o200k_base") + countTokens(args.join(""), "o200k_base");
    expect(meter.records[0].usage.completion_tokens).to.equal(expected);
    expect(meter.records[0].usageEstimated).to.equal(true);
  });

  describe("failures after the first chunk end the stream with one error event and bill what was received", () => {
    const expectErrorEnd = (body: string, code: string) => {
      const data = sseData(body);
      expect(data).to.not.include("[DONE]");
      const last = JSON.parse(data.at(-1)!);
      expect(last.error).to.have.keys("message", "type", "param", "code");
      expect(last.error.code).to.equal(code);
      expect(last.error.param).to.equal(null);
    };

    it("a connection reset", async () => {
      script = (res) => {
        sse(res);
        for (const word of words.slice(0, 3)) res.write(`data: ${chunk({ content: word })}\n\n`);
        setTimeout(() => res.socket?.destroy(), 50);
      };
      const { handler, meter } = setup();
      const result = await invoke(handler, chatBody({ stream: true }));
      expect(result.statusCode).to.equal(200);
      expectErrorEnd(result.body, "upstream_stream_failed");
      const [record] = meter.records;
      expect(record).to.deep.include({ status: 200, streamError: "upstream_stream_failed", usageEstimated: true, billed: true });
      expect(record.usage.completion_tokens).to.equal(countTokens(words.slice(0, 3).join(""), "o200k_base"));
      expect(toMoesifEvent(record, false).metadata).to.include({ stream_error: "upstream_stream_failed", streamed: true, client_disconnected: false, usage_estimated: true });
    });

    it("an event that is not JSON", async () => {
      script = (res) => {
        sse(res);
        res.write(`data: ${chunk({ content: " apple" })}\n\n`);
        res.write("data: <html>502 Bad Gateway</html>\n\n");
        res.write(`data: ${chunk({ content: " never" })}\n\n`);
        res.end("data: [DONE]\n\n");
      };
      const { handler, meter } = setup();
      const result = await invoke(handler, chatBody({ stream: true }));
      expectErrorEnd(result.body, "upstream_stream_failed");
      expect(result.body).to.not.include("never");
      expect(meter.records[0].usage.completion_tokens).to.equal(countTokens(" apple", "o200k_base"));
    });

    it("no chunk within UPSTREAM_IDLE_TIMEOUT_MS, aborting the upstream request", async () => {
      script = (res) => {
        sse(res);
        res.write(`data: ${chunk({ content: " apple" })}\n\n`);
        res.write(`data: ${chunk({ content: " banana" })}\n\n`); // then silence, connection open
      };
      const { handler, meter } = setup({ UPSTREAM_IDLE_TIMEOUT_MS: "300" });
      const result = await invoke(handler, chatBody({ stream: true }));
      expectErrorEnd(result.body, "upstream_idle_timeout");
      await seen[0].closed;
      expect(seen[0].aborted).to.equal(true);
      expect(meter.records[0]).to.deep.include({ status: 200, streamError: "upstream_idle_timeout" });
      expect(meter.records[0].usage.completion_tokens).to.equal(countTokens(" apple banana", "o200k_base"));
    });

    it("the invocation's deadline (Lambda's remaining time less the metering reserve)", async () => {
      script = async (res) => {
        sse(res);
        for (let i = 0; i < 100 && !res.destroyed; i++) {
          res.write(`data: ${chunk({ content: " apple" })}\n\n`);
          await sleep(50);
        }
        res.end("data: [DONE]\n\n");
      };
      const { handler, meter } = setup();
      // 2.9 s left: 300 ms for metering and 2 s in reserve leave the stream 600 ms.
      const result = await invoke(handler, chatBody({ stream: true }), { context: { getRemainingTimeInMillis: () => 2900 } });
      expectErrorEnd(result.body, "deadline_exceeded");
      expect(meter.records[0].streamError).to.equal("deadline_exceeded");
      expect(meter.records[0].usage.completion_tokens).to.be.greaterThan(0);
    });

    it("an error event from the upstream is forwarded as the last event", async () => {
      script = (res) => {
        sse(res);
        res.write(`data: ${chunk({ content: " apple" })}\n\n`);
        res.end(`data: ${JSON.stringify({ error: { message: "overloaded", type: "server_error", param: null, code: "overloaded" } })}\n\n`);
      };
      const { handler, meter } = setup();
      const result = await invoke(handler, chatBody({ stream: true }));
      expectErrorEnd(result.body, "overloaded");
      expect(meter.records[0].streamError).to.equal("upstream_failed");
    });
  });

  describe("failures before the first chunk are ordinary JSON errors", () => {
    const rows: Array<[string, Script, number, string]> = [
      ["an upstream 500", (res) => { res.writeHead(500, { "Content-Type": "application/json" }); res.end('{"error":{"message":"boom","type":"server_error","param":null,"code":null}}'); }, 502, "upstream_failed"],
      ["an upstream 429", (res) => { res.writeHead(429, { "Content-Type": "application/json", "Retry-After": "3" }); res.end('{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":null}}'); }, 429, "rate_limit_exceeded"],
      ["a reset before any event", (res) => { sse(res); setTimeout(() => res.socket?.destroy(), 20); }, 502, "upstream_unreachable"],
      ["a body that is not an event stream", (res) => { res.writeHead(200, { "Content-Type": "text/html" }); res.end("<html>hello</html>"); }, 502, "upstream_bad_response"],
    ];
    for (const [name, upstreamScript, status, code] of rows) {
      it(`${name} → ${status} ${code}, billing nothing`, async () => {
        script = upstreamScript;
        const { handler, meter } = setup();
        const result = await invoke(handler, chatBody({ stream: true }));
        expect(result.statusCode).to.equal(status);
        expect(result.headers["Content-Type"]).to.equal("application/json");
        expect(result.headers["Content-Length"]).to.equal(String(Buffer.byteLength(result.body)));
        expect(JSON.parse(result.body).error.code).to.equal(code);
        expect(meter.records[0]).to.deep.include({ status, billed: false });
        expect(meter.records[0].usage.total_tokens).to.equal(0);
      });
    }

    it("passes an upstream 400 through as JSON", async () => {
      script = (res) => {
        res.writeHead(400, { "Content-Type": "application/json" });
        res.end(JSON.stringify({ error: { message: "bad temperature", type: "invalid_request_error", param: "temperature", code: null } }));
      };
      const { handler } = setup();
      const result = await invoke(handler, chatBody({ stream: true }));
      expect(result.statusCode).to.equal(400);
      expect(JSON.parse(result.body).error.param).to.equal("temperature");
    });

    it("answers a validation error (stream_options without stream) with 400 before calling the upstream", async () => {
      const { handler } = setup();
      const result = await invoke(handler, chatBody({ stream_options: { include_usage: true } }));
      expect(result.statusCode).to.equal(400);
      expect(JSON.parse(result.body).error.param).to.equal("stream_options");
      expect(seen).to.have.length(0);
    });
  });

  it("aborts the upstream when the client disconnects after 3 chunks, and bills the prompt plus what the upstream sent", async () => {
    script = async (res) => {
      sse(res);
      res.write(`data: ${chunk({ role: "assistant", content: "" })}\n\n`);
      for (let i = 0; i < 200 && !res.destroyed; i++) {
        res.write(`data: ${chunk({ content: " apple" })}\n\n`);
        await sleep(20);
      }
      res.end("data: [DONE]\n\n");
    };
    const { handler, meter } = setup();
    let contentPieces = 0;
    const result = await invoke(handler, chatBody({ stream: true, max_tokens: 500 }), {
      onPiece: (piece, stream) => {
        if (piece.includes(" apple")) contentPieces += 1;
        if (contentPieces === 3) stream.clientGone();
      },
    });
    expect(result.statusCode).to.equal(200);
    await seen[0].closed;
    expect(seen[0].aborted).to.equal(true);
    const sentContentChunks = seen[0].written - 1; // less the role chunk
    const [record] = meter.records;
    expect(record).to.deep.include({ status: 200, clientDisconnected: true, usageEstimated: true, billed: true });
    expect(record.usage.completion_tokens).to.be.greaterThan(0);
    expect(Math.abs(record.usage.completion_tokens - sentContentChunks)).to.be.at.most(2);
    expect(record.usage.completion_tokens).to.be.lessThan(500);
    expect(record.usage.prompt_tokens).to.be.greaterThan(0);
    expect(toMoesifEvent(record, false).metadata).to.include({ client_disconnected: true, billed: true });
  });

  it("ends the caller's stream normally when the upstream sends [DONE] but keeps its connection open", async () => {
    script = (res) => {
      sse(res);
      res.write(`data: ${chunk({ content: " apple" })}\n\n`);
      res.write("data: [DONE]\n\n"); // and never ends the response
    };
    const { handler, meter } = setup({ UPSTREAM_IDLE_TIMEOUT_MS: "300" });
    const result = await invoke(handler, chatBody({ stream: true }));
    expect(sseData(result.body).at(-1)).to.equal("[DONE]");
    expect(meter.records[0].streamError).to.equal(undefined);
    await seen[0].closed;
    expect(seen[0].aborted).to.equal(true);
  });

  it("redacts the upstream key echoed inside a chunk", async () => {
    script = (res) => {
      sse(res);
      res.write(`data: ${chunk({ content: `your key is ${UPSTREAM_KEY}` })}\n\n`);
      res.write(`data: ${chunk({ content: ` or ${UPSTREAM_KEY.replace(/-/g, "\\u002d")}` })}\n\n`);
      res.end("data: [DONE]\n\n");
    };
    const { handler, meter } = setup({ MOESIF_LOG_BODIES: "true" });
    const result = await invoke(handler, chatBody({ stream: true }));
    expect(result.body).to.include("[REDACTED]");
    expect(result.body).to.not.include(UPSTREAM_KEY);
    expect(result.body).to.not.include(UPSTREAM_KEY.replace(/-/g, "\\u002d"));
    expect(JSON.stringify(toMoesifEvent(meter.records[0], true))).to.not.include(UPSTREAM_KEY);
    expect(logs.some((line) => line.includes("upstream_echoed_secret"))).to.equal(true);
  });

  it("meters after the stream has ended", async () => {
    script = openAiStream(words, { usage: [5, wordTokens] });
    const order: string[] = [];
    const { handler } = setup({}, order);
    await invoke(handler, chatBody({ stream: true }), { onEnd: () => order.push("end") });
    await invoke(handler, chatBody(), { onEnd: () => order.push("end") });
    expect(order).to.deep.equal(["end", "meter", "end", "meter"]);
  });

  describe("buffered answers through the streaming handler", () => {
    const completion = { id: "chatcmpl-b", object: "chat.completion", created: 1, model: "gpt-4o-mini", choices: [{ index: 0, message: { role: "assistant", content: "héllo" }, finish_reason: "stop" }], usage: { prompt_tokens: 3, completion_tokens: 2, total_tokens: 5 } };
    const buffered: Script = (res) => {
      const text = JSON.stringify(completion);
      res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(text) });
      res.end(text);
    };

    it("keeps status, headers (with the exact Content-Length) and body unchanged", async () => {
      script = buffered;
      const { handler, meter } = setup();
      const result = await invoke(handler, chatBody());
      expect(result.statusCode).to.equal(200);
      expect(result.headers["Content-Type"]).to.equal("application/json");
      expect(result.headers["Content-Length"]).to.equal(String(Buffer.byteLength(result.body)));
      expect(JSON.parse(result.body)).to.deep.equal(completion);
      expect(seen[0].body.stream).to.equal(undefined);
      expect(seen[0].headers.accept).to.equal("application/json");
      expect(meter.records[0]).to.deep.include({ status: 200, usageEstimated: false });
      expect(meter.records[0].streamed).to.equal(undefined);
    });

    it("wraps non-stream /ai-chat answers in request_payload, and never a stream", async () => {
      script = buffered;
      const { handler } = setup({ RESPONSE_ENVELOPE: "request_payload" });
      const wrapped = await invoke(handler, chatBody(), { resource: "/ai-chat" });
      expect(JSON.parse(wrapped.body).request_payload).to.deep.equal(completion);
      script = openAiStream(words);
      const streamed = await invoke(handler, chatBody({ stream: true }), { resource: "/ai-chat" });
      expect(streamed.body).to.not.include("request_payload");
      expect(sseData(streamed.body).at(-1)).to.equal("[DONE]");
    });

    it("writes a prelude and ends the stream even when the function cannot start", async () => {
      const handler = createHandler(() => {
        throw new Error("cannot build dependencies");
      });
      const result = await invoke(handler, chatBody());
      expect(result.hasPrelude).to.equal(true);
      expect(result.ended).to.equal(true);
      expect(result.statusCode).to.equal(500);
      expect(JSON.parse(result.body).error).to.have.keys("message", "type", "param", "code");
    });
  });

  it("serves 100 streams at concurrency 25, each metered once with the upstream's exact usage", async () => {
    script = async (res, record) => {
      const n = Number((record.body.messages as Array<{ content: string }>)[1].content.split(" ")[1]);
      await openAiStream(words.slice(0, 1 + (n % words.length)), { usage: [100 + n, 1 + (n % words.length)] })(res, record);
    };
    const { handler, meter } = setup();
    const ids: string[] = [];
    let next = 0;
    const worker = async () => {
      while (next < 100) {
        const n = next++;
        const event = createApiGatewayEvent({ apiKey: "caller-key", body: chatBody({ stream: true, messages: [{ role: "system", content: "s" }, { role: "user", content: `request ${n}` }] }) });
        ids.push(event.requestContext.requestId);
        const result = await invokeStreaming(handler, event, createContext());
        expect(sseData(result.body).at(-1)).to.equal("[DONE]");
      }
    };
    await Promise.all(Array.from({ length: 25 }, worker));
    expect(meter.records).to.have.length(100);
    expect(new Set(meter.records.map((r) => r.requestId)).size).to.equal(100);
    expect(meter.records.map((r) => r.requestId)).to.have.members(ids);
    for (const record of meter.records) {
      const n = Number((record.requestBody as { messages: Array<{ content: string }> }).messages[1].content.split(" ")[1]);
      expect(record.usageEstimated).to.equal(false);
      expect(record.usage).to.deep.include({ prompt_tokens: 100 + n, completion_tokens: 1 + (n % words.length) });
    }
  });
  describe("hostile upstreams (adversarial review)", () => {
    /** The events a real SSE client sees (multi-line data joined with newlines, as the SDKs' parsers do). */
    const clientEvents = (body: string): string[] => {
      const events: string[] = [];
      const parser = createParser({ onEvent: (event) => events.push(event.data) });
      parser.feed(body);
      return events;
    };
    const many = Array.from({ length: 200 }, (_, i) => ` word${i}`);

    it("does not believe a usage chunk of 0 completion tokens after a long answer: it estimates instead", async () => {
      script = async (res) => {
        sse(res);
        for (const word of many) res.write(`data: ${chunk({ content: word })}\n\n`);
        res.write(`data: ${chunk({}, "stop")}\n\n`);
        res.write(`data: ${usageChunk(0, 0)}\n\n`);
        res.end("data: [DONE]\n\n");
      };
      const { handler, meter } = setup();
      await invoke(handler, chatBody({ stream: true }));
      const [record] = meter.records;
      expect(record.usageEstimated).to.equal(true);
      expect(record.usage.completion_tokens).to.equal(countTokens(many.join(""), "o200k_base"));
      expect(record.usage.prompt_tokens).to.be.greaterThan(0);
    });

    it("ends the caller's stream soon after [DONE] even if the upstream keeps sending comments", async () => {
      script = async (res) => {
        sse(res);
        res.write(`data: ${chunk({ content: "hi" }, "stop")}\n\n`);
        res.write("data: [DONE]\n\n");
        // Ten seconds of keep-alive comments: the relay must cut them after its grace period, not wait them out.
        for (let i = 0; i < 100 && !res.destroyed; i++) {
          res.write(": ping\n\n");
          await sleep(100);
        }
        res.end();
      };
      const { handler } = setup();
      const result = await invoke(handler, chatBody({ stream: true }));
      expect(result.body.trimEnd().endsWith("data: [DONE]")).to.equal(true);
      await seen[0].closed;
      expect(seen[0].aborted, "the upstream was cut, not waited out").to.equal(true);
    });

    it("never sends the upstream key split across two events, not even its first half", async () => {
      const cut = 16;
      script = async (res) => {
        sse(res);
        res.write(`data: ${chunk({ role: "assistant", content: "" })}\n\n`);
        res.write(`data: ${chunk({ content: `Your key is ${UPSTREAM_KEY.slice(0, cut)}` })}\n\n`);
        res.write(`data: ${chunk({ content: `${UPSTREAM_KEY.slice(cut)} ok` })}\n\n`);
        res.write(`data: ${chunk({}, "stop")}\n\n`);
        res.end("data: [DONE]\n\n");
      };
      const { handler, meter } = setup({ MOESIF_LOG_BODIES: "true" });
      const result = await invoke(handler, chatBody({ stream: true }));
      expect(result.body).to.not.include(UPSTREAM_KEY.slice(0, cut));
      expect(result.body).to.include("upstream_echoed_secret");
      const event = JSON.stringify(toMoesifEvent(meter.records[0], true));
      recordForScan("streaming moesif event", [event]);
      expect(event).to.not.include(UPSTREAM_KEY.slice(0, cut));
      expect(meter.records[0].streamError).to.equal("upstream_echoed_secret");
    });

    it("relays an event whose data spans several lines so that the client still parses it", async () => {
      script = async (res) => {
        sse(res);
        const pretty = JSON.stringify(JSON.parse(chunk({ content: "multi" }, "stop")), null, 1);
        res.write(`${pretty.split("\n").map((line) => `data: ${line}`).join("\n")}\n\n`);
        res.end("data: [DONE]\n\n");
      };
      const { handler } = setup();
      const result = await invoke(handler, chatBody({ stream: true }));
      const events = clientEvents(result.body);
      expect(events.at(-1)).to.equal("[DONE]");
      const parsed = JSON.parse(events[0]) as { choices: Array<{ delta: { content: string } }> };
      expect(parsed.choices[0].delta.content).to.equal("multi");
    });

    it("reports a stream that ends cleanly but mid-answer (no finish_reason, no [DONE]) as cut off", async () => {
      script = async (res) => {
        sse(res);
        res.write(`data: ${chunk({ content: "half an" })}\n\n`);
        res.end();
      };
      const { handler, meter } = setup();
      const result = await invoke(handler, chatBody({ stream: true }));
      expect(result.body).to.include("upstream_stream_failed").and.not.include("[DONE]");
      expect(meter.records[0].streamError).to.equal("upstream_stream_failed");
    });

    it("tells the SDKs not to retry when the upstream ignores stream: true and answers JSON", async () => {
      script = (res) => {
        res.writeHead(200, { "Content-Type": "application/json" });
        res.end(JSON.stringify({ id: ID, object: "chat.completion", choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }] }));
      };
      const { handler } = setup();
      const result = await invoke(handler, chatBody({ stream: true }));
      expect(result.statusCode).to.equal(502);
      expect(result.headers["x-should-retry"]).to.equal("false");
    });
  });
});
