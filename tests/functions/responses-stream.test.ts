import { expect } from "chai";
import { PassThrough } from "node:stream";
import { createOpenAI } from "@ai-sdk/openai";
import { Stream } from "openai/core/streaming";
import { createParser, type EventSourceMessage } from "eventsource-parser";
import { ApiError, ResponseStoreUnavailableError } from "../../functions/ai-chat/errors";
import type { StreamWriter } from "../../functions/ai-chat/responder";
import { estimateResponsesInputTokens } from "../../functions/ai-chat/responses";
import { relayResponsesStream, type ResponsesRelayOptions, type ResponsesRelayOutcome } from "../../functions/ai-chat/responses-stream";
import { TokenTally } from "../../functions/ai-chat/usage";
import { SecretRedactor } from "../../functions/shared/secret-redactor";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const SECRET = "sk-upstream-responses-stream-secret-0123456789";
registerSecret(SECRET);

const RESPONSE_ID = "resp_0123456789abcdef";
const MODEL = "gpt-4o-mini";
const response = (status: string, usage: unknown = null) => ({ id: RESPONSE_ID, object: "response", created_at: 1700000000, model: MODEL, status, output: [], usage });
const event = (type: string, sequence: number, fields: Record<string, unknown>) => `event: ${type}\ndata: ${JSON.stringify({ type, sequence_number: sequence, ...fields })}\n\n`;
const created = () => event("response.created", 0, { response: response("in_progress") });
const delta = (text: string, sequence: number) => event("response.output_text.delta", sequence, { item_id: "msg_1", output_index: 0, content_index: 0, delta: text, logprobs: [] });
const completed = (sequence: number, usage: unknown) => event("response.completed", sequence, { response: response("completed", usage) });
const USAGE = { input_tokens: 11, input_tokens_details: { cached_tokens: 0 }, output_tokens: 7, output_tokens_details: { reasoning_tokens: 0 }, total_tokens: 18 };
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A writer that records what reached the caller, and when (as a log of steps shared with the test). */
class RecordingWriter implements StreamWriter {
  text = "";
  ended = false;
  constructor(private readonly steps: string[]) {}
  async write(text: string): Promise<void> {
    this.steps.push(`write:${text}`);
    this.text += text;
  }
  async end(): Promise<void> {
    this.ended = true;
  }
}

function parseEvents(text: string): EventSourceMessage[] {
  const events: EventSourceMessage[] = [];
  const parser = createParser({ onEvent: (e) => events.push(e) });
  parser.feed(text);
  return events;
}

interface Run {
  outcome: ResponsesRelayOutcome;
  writer: RecordingWriter;
  steps: string[];
  upstream: PassThrough;
}

const INPUT = { model: MODEL, input: "Tell me a story about a lighthouse." };

/** Runs the relay over an upstream fed by `feed`; `overrides` replace options. */
async function run(feed: (upstream: PassThrough) => Promise<void> | void, overrides: Partial<ResponsesRelayOptions> = {}): Promise<Run> {
  const upstream = new PassThrough();
  const steps: string[] = [];
  const writer = new RecordingWriter(steps);
  const relay = relayResponsesStream({
    upstream,
    redactor: new SecretRedactor([SECRET]),
    start: () => {
      steps.push("start");
      return writer;
    },
    clientGone: new AbortController().signal,
    idleTimeoutMs: 2000,
    clock: Date.now,
    estimateInput: (tally) => estimateResponsesInputTokens(INPUT, MODEL, tally),
    newTally: () => new TokenTally("o200k_base"),
    ...overrides,
  });
  await feed(upstream);
  const outcome = await relay;
  recordForScan("responses-stream relay", [writer.text, outcome.content, JSON.stringify(outcome)]);
  return { outcome, writer, steps, upstream };
}

describe("relayResponsesStream", () => {
  it("forwards each typed event as `event:` + `data:`, and bills the usage of response.completed", async () => {
    const { outcome, writer } = await run((up) => {
      up.write(created());
      up.write(delta("Once ", 1) + delta("upon a time.", 2));
      up.end(completed(3, USAGE));
    });
    const events = parseEvents(writer.text);
    expect(events.map((e) => e.event)).to.deep.equal(["response.created", "response.output_text.delta", "response.output_text.delta", "response.completed"]);
    for (const e of events) expect(JSON.parse(e.data).type).to.equal(e.event);
    expect(writer.ended).to.equal(true);
    expect(outcome).to.deep.include({ started: true, completed: true, usageEstimated: false, id: RESPONSE_ID, model: MODEL, status: "completed", content: "Once upon a time." });
    expect(outcome.usage).to.deep.equal({ prompt_tokens: 11, completion_tokens: 7, total_tokens: 18, cached_tokens: 0, reasoning_tokens: 0 });
    expect(outcome.streamError).to.equal(undefined);
  });

  it("bills the usage of response.incomplete and response.failed too", async () => {
    for (const type of ["response.incomplete", "response.failed"]) {
      const { outcome } = await run((up) => {
        up.write(created());
        up.end(delta("Hi", 1) + event(type, 2, { response: response(type.slice(9), USAGE) }));
      });
      expect(outcome, type).to.deep.include({ completed: true, usageEstimated: false, status: type.slice(9) });
      expect(outcome.usage.prompt_tokens).to.equal(11);
    }
  });

  it("estimates the usage when the terminal event has none or an implausible one", async () => {
    for (const usage of [null, { ...USAGE, input_tokens: "11" }, { ...USAGE, output_tokens: -1 }, { ...USAGE, input_tokens: 0 }]) {
      const { outcome } = await run((up) => {
        up.write(created());
        up.end(delta("Once upon a time there was a lighthouse.", 1) + completed(2, usage));
      });
      expect(outcome.usageEstimated, JSON.stringify(usage)).to.equal(true);
      expect(outcome.usage.prompt_tokens).to.equal(estimateResponsesInputTokens(INPUT, MODEL));
      expect(outcome.usage.completion_tokens).to.be.within(5, 15);
    }
  });

  it("ends a cut stream with one error event after the last sequence number, and estimates what was sent", async () => {
    const { outcome, writer } = await run((up) => {
      up.write(created());
      up.end(delta("Once upon a time", 1) + delta(" there was", 2));
    });
    const events = parseEvents(writer.text);
    const last = events[events.length - 1];
    expect(events.filter((e) => e.event === "error")).to.have.length(1);
    expect(last.event).to.equal("error");
    const data = JSON.parse(last.data);
    expect(data).to.deep.equal({ type: "error", code: "upstream_stream_failed", message: data.message, param: null, sequence_number: 3 });
    expect(data.message).to.be.a("string").and.not.equal("");
    expect(outcome).to.deep.include({ started: true, completed: false, usageEstimated: true, streamError: "upstream_stream_failed" });
    expect(outcome.usage.completion_tokens).to.be.greaterThan(3);
    expect(outcome.usage.prompt_tokens).to.be.greaterThan(5);
  });

  it("redacts an echoed secret in an event's data and reports it", async () => {
    let echoed = 0;
    const { outcome, writer } = await run(
      (up) => {
        up.write(created());
        up.end(delta(`the key is ${SECRET}`, 1) + completed(2, USAGE));
      },
      { onEchoedSecret: () => (echoed += 1) },
    );
    expect(writer.text).to.not.include(SECRET);
    expect(writer.text).to.include("[REDACTED]");
    expect(echoed).to.be.greaterThan(0);
    expect(outcome.content).to.not.include(SECRET);
  });

  it("never sends a secret split across two deltas, and ends the stream with an error event instead", async () => {
    const { outcome, writer } = await run((up) => {
      up.write(created());
      up.write(delta(`key: ${SECRET.slice(0, 20)}`, 1));
      up.end(delta(SECRET.slice(20), 2) + completed(3, USAGE));
    });
    expect(writer.text).to.not.include(SECRET.slice(0, 20));
    expect(outcome.streamError).to.equal("upstream_echoed_secret");
    expect(parseEvents(writer.text).pop()?.event).to.equal("error");
  });

  it("passes the upstream's own error event on as the last event", async () => {
    const upstreamError = event("error", 2, { code: "server_error", message: "The model crashed.", param: null });
    const { outcome, writer } = await run((up) => {
      up.write(created());
      up.end(delta("Hi", 1) + upstreamError);
    });
    const events = parseEvents(writer.text);
    expect(events[events.length - 1]).to.deep.include({ event: "error" });
    expect(JSON.parse(events[events.length - 1].data)).to.include({ code: "server_error", message: "The model crashed." });
    expect(outcome.streamError).to.equal("upstream_failed");
  });

  it("ends with an upstream_idle_timeout error event when the upstream goes silent after starting", async () => {
    const { outcome, writer, upstream } = await run(
      async (up) => {
        up.write(created() + delta("Once", 1));
        await sleep(10);
      },
      { idleTimeoutMs: 100 },
    );
    const last = parseEvents(writer.text).pop();
    expect(last?.event).to.equal("error");
    expect(JSON.parse(last!.data)).to.include({ type: "error", code: "upstream_idle_timeout", sequence_number: 2 });
    expect(outcome).to.deep.include({ started: true, usageEstimated: true, streamError: "upstream_idle_timeout" });
    expect(upstream.destroyed).to.equal(true);
  });

  it("returns a failure, and sends nothing, when the upstream is silent from the start", async () => {
    const { outcome, steps } = await run(() => undefined, { idleTimeoutMs: 50 });
    expect(steps).to.deep.equal([]);
    expect(outcome.started).to.equal(false);
    expect(outcome.failure).to.be.instanceOf(ApiError);
    expect(outcome.failure?.status).to.equal(504);
    expect(outcome.usage.total_tokens).to.equal(0);
  });

  it("returns 502 for an upstream that answered JSON instead of events", async () => {
    const { outcome } = await run((up) => {
      up.end(JSON.stringify(response("completed", USAGE)));
    });
    expect(outcome.started).to.equal(false);
    expect(outcome.failure?.status).to.equal(502);
  });

  it("stops when the caller goes away, and bills what was relayed", async () => {
    const gone = new AbortController();
    const { outcome, upstream } = await run(
      async (up) => {
        up.write(created() + delta("Once upon a time", 1));
        await sleep(20);
        gone.abort();
      },
      { clientGone: gone.signal },
    );
    expect(outcome).to.deep.include({ started: true, clientDisconnected: true, usageEstimated: true, completed: false });
    expect(outcome.usage.completion_tokens).to.be.greaterThan(0);
    expect(upstream.destroyed).to.equal(true);
  });

  it("forwards no event carrying the response id before onResponseId resolves", async () => {
    let resolveRecord!: () => void;
    const recorded: string[] = [];
    const steps: string[] = [];
    const upstream = new PassThrough();
    const writer = new RecordingWriter(steps);
    const relay = relayResponsesStream({
      upstream,
      redactor: new SecretRedactor([SECRET]),
      start: () => {
        steps.push("start");
        return writer;
      },
      clientGone: new AbortController().signal,
      idleTimeoutMs: 5000,
      clock: Date.now,
      estimateInput: () => 1,
      newTally: () => new TokenTally("o200k_base"),
      onResponseId: (id) => {
        steps.push(`record:${id}`);
        recorded.push(id);
        return new Promise<void>((resolve) => (resolveRecord = resolve));
      },
    });
    upstream.write(created() + delta("Hi", 1));
    await sleep(30);
    // The record is pending: nothing carrying the id (nor anything after it) has reached the caller.
    expect(recorded).to.deep.equal([RESPONSE_ID]);
    expect(writer.text).to.not.include(RESPONSE_ID);
    expect(steps).to.deep.equal([`record:${RESPONSE_ID}`]);
    resolveRecord();
    upstream.end(completed(2, USAGE));
    const outcome = await relay;
    expect(steps[0]).to.equal(`record:${RESPONSE_ID}`);
    expect(steps[1]).to.equal("start");
    expect(writer.text).to.include(RESPONSE_ID);
    // One record per id, though several events carry it.
    expect(recorded).to.deep.equal([RESPONSE_ID]);
    expect(outcome.completed).to.equal(true);
  });

  it("fails before starting, sending nothing, when recording the first id is rejected", async () => {
    const { outcome, steps } = await run(
      (up) => {
        up.end(created() + delta("Hi", 1) + completed(2, USAGE));
      },
      { onResponseId: () => Promise.reject(new ResponseStoreUnavailableError()) },
    );
    expect(steps).to.deep.equal([]);
    expect(outcome.started).to.equal(false);
    expect(outcome.failure).to.be.instanceOf(ResponseStoreUnavailableError);
    expect(outcome.failure?.status).to.equal(503);
    expect(outcome.usage.total_tokens).to.equal(0);
  });

  it("ends with an error event when a later event carries a new id whose record is rejected", async () => {
    const calls: string[] = [];
    const { outcome, writer } = await run(
      (up) => {
        up.write(event("response.queued", 0, { type: "response.queued" }));
        up.write(event("response.in_progress", 1, { response: { ...response("in_progress"), id: "resp_other" } }));
        up.end(completed(2, USAGE));
      },
      {
        onResponseId: (id) => {
          calls.push(id);
          return Promise.reject(new ResponseStoreUnavailableError());
        },
      },
    );
    expect(calls).to.deep.equal(["resp_other"]);
    expect(writer.text).to.not.include("resp_other");
    const events = parseEvents(writer.text);
    expect(events.map((e) => e.event)).to.deep.equal(["response.queued", "error"]);
    expect(JSON.parse(events[1].data)).to.deep.include({ type: "error", code: "response_store_unavailable", param: null, sequence_number: 1 });
    expect(outcome).to.deep.include({ started: true, streamError: "response_store_unavailable" });
  });

  describe("the error event parses in real clients", () => {
    /** What the relay sends for a stream cut after two deltas. */
    const cutStream = async () =>
      (
        await run((up) => {
          up.write(created());
          up.end(delta("Once upon", 1) + delta(" a time", 2));
        })
      ).writer.text;
    const sseResponse = (text: string) => new Response(text, { status: 200, headers: { "content-type": "text/event-stream" } });

    it("the openai SDK yields it as a ResponseErrorEvent", async () => {
      const stream = Stream.fromSSEResponse<Record<string, unknown>>(sseResponse(await cutStream()), new AbortController());
      const items: Array<Record<string, unknown>> = [];
      for await (const item of stream) items.push(item);
      expect(items.map((i) => i.type)).to.deep.equal(["response.created", "response.output_text.delta", "response.output_text.delta", "error"]);
      expect(items[3]).to.deep.include({ code: "upstream_stream_failed", param: null, sequence_number: 3 });
    });

    it("@ai-sdk/openai's Responses model reports it as an error part", async () => {
      const text = await cutStream();
      const provider = createOpenAI({ apiKey: "test-key", baseURL: "http://127.0.0.1:9/v1", fetch: async () => sseResponse(text) });
      const { stream } = await provider.responses(MODEL).doStream({ prompt: [{ role: "user", content: [{ type: "text", text: "hi" }] }] });
      const parts: Array<{ type: string; [key: string]: unknown }> = [];
      const reader = stream.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        parts.push(value as { type: string });
      }
      const types = parts.map((p) => p.type);
      expect(types).to.include("text-delta");
      const error = parts.find((p) => p.type === "error");
      expect(error, JSON.stringify(types)).to.not.equal(undefined);
      // Parsed by its error-chunk schema (a chunk that failed the schema would be a validation error instead).
      const parsed = (error as unknown as { error: { code?: unknown; message?: unknown; data?: unknown } }).error;
      expect(parsed.code).to.equal("upstream_stream_failed");
      expect(parsed.message).to.be.a("string").and.not.equal("");
      expect(parsed.data).to.deep.include({ type: "error", sequence_number: 3 });
    });
  });
});
