import { expect } from "chai";
import { createLogger } from "../../functions/ai-chat/logger";
import { sanitizeHeaders, transactionIdFor, type UsageRecord } from "../../functions/ai-chat/metering";
import { MoesifMeter, prepareEvent, toMoesifEvent, type MoesifMeterOptions } from "../../functions/ai-chat/moesif";
import type { TokenUsage } from "../../functions/ai-chat/usage";
import { MoesifCollector, type StoredEvent } from "../../scripts/local/moesif-collector";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const APP_ID = "moesif-app-id-for-meter-tests";
/** The per-event cap the README documents. */
const MAX_EVENT_BYTES = 64 * 1024;
registerSecret(APP_ID);

let counter = 0;
/** A usage record as the core builds it; `usage` is what the core validated. */
function usageRecord(overrides: Partial<UsageRecord> = {}): UsageRecord {
  counter += 1;
  const requestId = `meter-req-${counter}`;
  return {
    transactionId: transactionIdFor(requestId),
    requestId,
    method: "POST",
    route: "/v1/chat/completions",
    uri: "https://example.test/beta/v1/chat/completions",
    startedAt: 1_700_000_000_000,
    finishedAt: 1_700_000_000_250,
    apiKeyId: "key-id-alice",
    customer: { customerId: "alice", plan: "pro", stripeCustomerId: "cus_alice" },
    sourceIp: "203.0.113.7",
    stage: "beta",
    model: "gpt-4o-mini",
    usage: { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 },
    usageEstimated: false,
    upstreamStatus: 200,
    upstreamMs: 12,
    status: 200,
    requestHeaders: { "content-type": "application/json" },
    responseHeaders: { "Content-Type": "application/json", "x-request-id": requestId },
    requestBody: { model: "gpt-4o-mini", messages: [{ role: "user", content: "Hello!" }], temperature: 0.5 },
    responseBody: {
      id: "chatcmpl-1",
      object: "chat.completion",
      model: "gpt-4o-mini",
      choices: [{ index: 0, message: { role: "assistant", content: "Hi" }, finish_reason: "stop" }],
      usage: { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 },
    },
    ...overrides,
  };
}

/** 20,000 arrays inside each other: what made every later send fail before. */
function deeplyNested(depth = 20_000): unknown {
  let value: unknown = [];
  for (let i = 0; i < depth; i++) value = [value];
  return value;
}

/** ~4,000 top-level string fields of 250 characters: a 1 MB request body with no messages text. */
function manyLongFields(): Record<string, unknown> {
  const body: Record<string, unknown> = { model: "gpt-4o-mini", messages: [{ role: "user", content: "Hi" }] };
  for (let i = 0; i < 4000; i++) body[`field_${i}`] = "x".repeat(250);
  return body;
}

describe("Moesif event (toMoesifEvent)", () => {
  const rawUsages: Array<[string, unknown]> = [
    ["omits usage", undefined],
    ["reports negative numbers", { prompt_tokens: -3, completion_tokens: -9, total_tokens: -12 }],
    ["reports strings", { prompt_tokens: "10", completion_tokens: "5", total_tokens: "15" }],
    ["reports total_tokens 0 with non-zero parts", { prompt_tokens: 10, completion_tokens: 5, total_tokens: 0 }],
  ];
  for (const [name, raw] of rawUsages) {
    for (const logBodies of [false, true]) {
      it(`meters the validated usage when the upstream ${name} (logBodies ${logBodies})`, () => {
        const { usage: _ignored, ...completion } = usageRecord().responseBody as Record<string, unknown>;
        const record = usageRecord({ responseBody: raw === undefined ? completion : { ...completion, usage: raw }, usageEstimated: raw === undefined });

        const event = toMoesifEvent(record, logBodies);

        expect((event.response.body as { usage: unknown }).usage).to.deep.equal({ prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 });
        expect(event.metadata).to.include({ prompt_tokens: 10, completion_tokens: 5, total_tokens: 15, billed: true });
      });
    }
  }

  it("recomputes total_tokens and meters zero for counts that are not non-negative integers", () => {
    const usage = { prompt_tokens: 7, completion_tokens: 4, total_tokens: 0 } as TokenUsage;
    expect(toMoesifEvent(usageRecord({ usage }), false).metadata.total_tokens).to.equal(11);

    const garbage = { prompt_tokens: -5, completion_tokens: "3", total_tokens: 1e300 } as unknown as TokenUsage;
    const event = toMoesifEvent(usageRecord({ usage: garbage }), false);
    expect(event.metadata).to.include({ prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, billed: false });
  });

  it("shows cached and reasoning tokens in OpenAI's usage shape and in metadata", () => {
    const event = toMoesifEvent(usageRecord({ usage: { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15, cached_tokens: 4, reasoning_tokens: 2 } }), false);
    expect((event.response.body as { usage: unknown }).usage).to.deep.equal({
      prompt_tokens: 10,
      completion_tokens: 5,
      total_tokens: 15,
      prompt_tokens_details: { cached_tokens: 4 },
      completion_tokens_details: { reasoning_tokens: 2 },
    });
    expect(event.metadata).to.include({ cached_tokens: 4, reasoning_tokens: 2 });
  });

  it("carries the cost in integer micro-units with its currency, and null on unpriced plans", () => {
    const priced = toMoesifEvent(usageRecord({ cost: { currency: "usd", micros: 1234 } }), false);
    expect(priced.metadata).to.include({ cost_micros: 1234, currency: "usd", stage: "beta", model: "gpt-4o-mini", route: "/v1/chat/completions" });
    const unpriced = toMoesifEvent(usageRecord(), false);
    expect(unpriced.metadata).to.include({ cost_micros: null, currency: null });
  });

  it("marks every 2xx answer carrying usage as billed, and nothing else", () => {
    for (const status of [200, 201, 203]) expect(toMoesifEvent(usageRecord({ status }), false).metadata.billed, `status ${status}`).to.equal(true);
    const none: TokenUsage = { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 };
    expect(toMoesifEvent(usageRecord({ status: 200, usage: none }), false).metadata.billed).to.equal(false);
    expect(toMoesifEvent(usageRecord({ status: 200, billed: false }), false).metadata.billed).to.equal(false);
    expect(toMoesifEvent(usageRecord({ status: 502, billed: true }), false).metadata.billed).to.equal(false);
    for (const status of [400, 429, 502]) {
      const error = { error: { message: "nope", type: "api_error", param: null, code: null } };
      expect(toMoesifEvent(usageRecord({ status, usage: none, responseBody: error }), false).metadata.billed).to.equal(false);
    }
  });

  it("sends only allow-listed headers: credentials under any name never leave", () => {
    const headers = {
      "X-Auth": "secret-1",
      "X-OpenAI-Key": "secret-2",
      Authentication: "secret-3",
      "X-Access-Key": "secret-4",
      "x-api-key": "secret-5",
      authorization: "Bearer secret-6",
      cookie: "session=secret-7",
      "x-stainless-api-key": "secret-8",
      "x-forwarded-for": "6.6.6.6",
      "Content-Type": "application/json",
      "user-agent": "OpenAI/JS 6.49.0",
      "x-stainless-lang": "js",
      "openai-organization": "org-123",
    };
    const event = toMoesifEvent(usageRecord({ requestHeaders: headers, responseHeaders: { ...headers, "Retry-After": "7" } }), false);
    const expected = { "Content-Type": "application/json", "user-agent": "OpenAI/JS 6.49.0", "x-stainless-lang": "js", "openai-organization": "org-123" };
    expect(event.request.headers).to.deep.equal(expected);
    expect(event.response.headers).to.deep.equal({ ...expected, "Retry-After": "7" });
    expect(sanitizeHeaders({ "user-agent": "u".repeat(10_000) })["user-agent"]).to.have.length(512);
  });

  it("keeps only the scalar fields of an upstream error object", () => {
    const error = { error: { message: "bad", type: "invalid_request_error", param: "temperature", code: null, extra: { deep: deeplyNested(10) } } };
    const event = toMoesifEvent(usageRecord({ status: 400, responseBody: error }), false);
    expect(event.response.body).to.deep.equal({ error: { message: "bad", type: "invalid_request_error", param: "temperature", code: null } });
  });
});

describe("Moesif event serialisation (prepareEvent)", () => {
  it("replaces a body of 20,000 nested arrays by a truncation marker instead of failing", () => {
    const prepared = prepareEvent(toMoesifEvent(usageRecord({ requestBody: { model: "gpt-4o-mini", extra: deeplyNested() } }), true));
    const sent = JSON.parse(prepared.json) as StoredEvent & { request: { body: Record<string, unknown> } };
    expect(sent.request.body).to.include({ _truncated: true });
    expect(sent.metadata).to.include({ total_tokens: 15 });
    // What the deferred log line holds must stringify again without overflowing.
    expect(JSON.parse(JSON.stringify(prepared.event))).to.deep.equal(sent);
  });

  it(`caps an event with ~4,000 long top-level fields at ${MAX_EVENT_BYTES} bytes, marking the cut body`, () => {
    for (const logBodies of [false, true]) {
      const prepared = prepareEvent(toMoesifEvent(usageRecord({ requestBody: manyLongFields() }), logBodies));
      expect(prepared.bytes).to.be.at.most(MAX_EVENT_BYTES);
      expect(Buffer.byteLength(prepared.json)).to.equal(prepared.bytes);
      const body = (JSON.parse(prepared.json) as { request: { body: Record<string, unknown> } }).request.body;
      expect(body).to.include({ _truncated: true });
      expect(body._original_bytes).to.be.greaterThan(MAX_EVENT_BYTES);
      expect(body._preview).to.be.a("string");
    }
  });

  it("serialises exactly the event it describes when nothing needs cutting", () => {
    const event = toMoesifEvent(usageRecord(), true);
    const prepared = prepareEvent(event);
    expect(JSON.parse(prepared.json)).to.deep.equal(JSON.parse(JSON.stringify(event)));
    expect(prepared.truncated).to.deep.equal([]);
  });
});

describe("MoesifMeter over the wire (loopback collector)", () => {
  let collector: MoesifCollector;
  let logs: string[];

  const meter = (options: Partial<MoesifMeterOptions> = {}) =>
    new MoesifMeter({
      applicationId: APP_ID,
      baseUri: collector.url,
      logBodies: false,
      timeoutMs: 5000,
      log: createLogger({ level: "debug", write: (line) => logs.push(line) }),
      ...options,
    });

  /** Every event the collector accepted, counted per transaction id across every payload (duplicates included). */
  const arrivals = (): Map<string, number> => {
    const seen = new Map<string, number>();
    for (const payload of collector.rawPayloads) {
      const parsed = JSON.parse(payload) as StoredEvent | StoredEvent[];
      for (const event of Array.isArray(parsed) ? parsed : [parsed]) seen.set(event.transaction_id!, (seen.get(event.transaction_id!) ?? 0) + 1);
    }
    return seen;
  };
  const logLines = (message: string) => logs.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.message === message);

  beforeEach(async () => {
    logs = [];
    collector = await new MoesifCollector({ applicationId: APP_ID, keepRawPayloads: "all" }).start();
  });
  afterEach(async () => {
    recordForScan("meter logs", logs);
    recordForScan("meter collector payloads", collector.rawPayloads);
    await collector.stop();
  });

  it("keeps metering after an event with 20,000 nested arrays (logBodies): both arrive, the deep body truncated", async () => {
    const m = meter({ logBodies: true });
    const deep = usageRecord({ requestBody: { model: "gpt-4o-mini", messages: [], extra: deeplyNested() } });
    const normal = usageRecord();

    await m.record(deep);
    await m.record(normal);

    const events = collector.events();
    expect(events.map((e) => e.transaction_id)).to.have.members([deep.transactionId, normal.transactionId]);
    const sentDeep = events.find((e) => e.transaction_id === deep.transactionId)!;
    expect((sentDeep.request as { body: Record<string, unknown> }).body).to.include({ _truncated: true });
    expect(logLines("metering_event_truncated")).to.have.length(1);
  });

  it("writes the whole event into the metering_deferred line even when a body cannot be serialised", async () => {
    collector.mode = "refuse";
    const deep = usageRecord({ requestBody: { model: "gpt-4o-mini", messages: [], extra: deeplyNested() } });

    await meter({ logBodies: true }).record(deep);

    const [line] = logLines("metering_deferred");
    const event = line.event as StoredEvent;
    expect(event.transaction_id).to.equal(deep.transactionId);
    expect(event.user_id).to.equal("alice");
    expect(event.metadata).to.include({ total_tokens: 15 });
    expect((event.request as { body: Record<string, unknown> }).body).to.include({ _truncated: true });
  });

  it(`never sends an event over ${MAX_EVENT_BYTES} bytes, whatever the request's top-level fields`, async () => {
    await meter().record(usageRecord({ requestBody: manyLongFields() }));
    expect(collector.events()).to.have.length(1);
    expect(Math.max(...collector.rawPayloads.map((p) => Buffer.byteLength(p)))).to.be.at.most(MAX_EVENT_BYTES);
  });

  it("re-sends a backlog in bounded chunks after an outage, every event exactly once", async () => {
    const m = meter({ backoffMs: 1, maxBackoffMs: 1, logBodies: true });
    collector.mode = "error";
    const big = () => usageRecord({ requestBody: { model: "gpt-4o-mini", messages: [{ role: "user", content: "y".repeat(50_000) }] } });
    const deferred = Array.from({ length: 40 }, big);
    for (const record of deferred) await m.record(record);
    expect(collector.events()).to.have.length(0);

    collector.mode = "ok";
    const later: UsageRecord[] = [];
    for (let i = 0; i < 20 && arrivals().size < deferred.length + later.length; i++) {
      await new Promise((resolve) => setTimeout(resolve, 2));
      later.push(usageRecord());
      await m.record(later.at(-1)!);
    }

    const seen = arrivals();
    for (const record of [...deferred, ...later]) expect(seen.get(record.transactionId), record.requestId).to.equal(1);
    expect(Math.max(...collector.rawPayloads.map((p) => Buffer.byteLength(p)))).to.be.at.most(1024 * 1024);
    expect(collector.rawPayloads.length).to.be.greaterThan(1);
  });

  it("loses no event when 500 concurrent sends fail during an outage and the collector then recovers", async () => {
    const m = meter({ backoffMs: 1, maxBackoffMs: 1 });
    collector.mode = "error";
    const outage = Array.from({ length: 500 }, () => usageRecord());

    await Promise.all(outage.map((record) => m.record(record)));
    expect(logLines("metering_deferred")).to.have.length(500);

    collector.mode = "ok";
    const later: UsageRecord[] = [];
    for (let i = 0; i < 50 && arrivals().size < outage.length + later.length; i++) {
      await new Promise((resolve) => setTimeout(resolve, 2));
      later.push(usageRecord());
      await m.record(later.at(-1)!);
    }

    const seen = arrivals();
    const missing = outage.filter((r) => seen.get(r.transactionId) === undefined);
    expect(missing.length, "events never delivered").to.equal(0);
    for (const record of [...outage, ...later]) expect(seen.get(record.transactionId)).to.equal(1);
    expect(logLines("metering_dropped_from_memory")).to.have.length(0);
  });

  it("bounds what waits in memory by bytes, dropping the oldest with an error log naming them", async () => {
    collector.mode = "refuse";
    const one = prepareEvent(toMoesifEvent(usageRecord(), false)).bytes;
    const m = meter({ maxPendingBytes: one * 3 + 100, backoffMs: 60_000 });
    const records = Array.from({ length: 5 }, () => usageRecord());

    for (const record of records) await m.record(record);

    const dropped = logLines("metering_dropped_from_memory").flatMap((l) => l.transaction_ids as string[]);
    expect(dropped).to.deep.equal(records.slice(0, 2).map((r) => r.transactionId));
    expect(logLines("metering_deferred")).to.have.length(5);
  });
});
