import { expect } from "chai";
import { loadFunctionConfig } from "../../functions/ai-chat/config";
import { handleRequest, type CoreDeps } from "../../functions/ai-chat/core";
import { CachedCustomerDirectory } from "../../functions/ai-chat/customers";
import { estimateEmbeddingsInputTokens } from "../../functions/ai-chat/embeddings";
import type { UsageRecord } from "../../functions/ai-chat/metering";
import { scalarFields, toMoesifEvent } from "../../functions/ai-chat/moesif";
import type { UpstreamRequest } from "../../functions/ai-chat/upstream";
import { maxCostOf } from "../../functions/shared/pricing";
import { FakeUpstream, RecordingMeter, UPSTREAM_KEY, fakeDeps, jsonResponse, proxyRequest, testEnv } from "../helpers/fakes";
import { MemoryCustomerStore } from "../helpers/memory-customer-store";
import { recordForScan } from "../helpers/secret-scan";

const MODEL = "text-embedding-3-small";
/** alice's plan lists models; bob's (pro) allows every model. */
const PLANS = { starter: { models: ["gpt-4o-mini", MODEL] }, pro: {} };

function embeddingsAnswer(promptTokens: number | undefined, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    object: "list",
    data: [{ object: "embedding", index: 0, embedding: [0.1, -0.2, 0.3] }],
    model: MODEL,
    ...(promptTokens !== undefined ? { usage: { prompt_tokens: promptTokens, total_tokens: promptTokens } } : {}),
    ...extra,
  };
}

function harness(answer: (request: UpstreamRequest) => ReturnType<typeof jsonResponse> = () => jsonResponse(200, embeddingsAnswer(9)), env: Record<string, string> = {}) {
  const upstream = new FakeUpstream(answer);
  const meter = new RecordingMeter();
  const logs: string[] = [];
  const deps = fakeDeps({ config: loadFunctionConfig(testEnv({ PLANS: JSON.stringify(PLANS), ...env })), upstream, meter, logs });
  return { deps, upstream, meter, logs };
}

const embed = (deps: CoreDeps, body: unknown, apiKeyId = "key-id-alice", headers?: Record<string, string>) =>
  handleRequest(proxyRequest({ route: "/v1/embeddings", uri: "https://example.test/v1/embeddings", apiKeyId, json: body, ...(headers ? { headers } : {}) }), deps);

const retrieve = (deps: CoreDeps, model: string, apiKeyId = "key-id-alice") =>
  handleRequest(
    proxyRequest({ method: "GET", route: "/v1/models/{model}", uri: `https://example.test/v1/models/${encodeURIComponent(model)}`, apiKeyId, pathParameters: { model }, body: Buffer.alloc(0) }),
    deps,
  );

const last = (meter: RecordingMeter): UsageRecord => meter.records[meter.records.length - 1];

describe("POST /v1/embeddings in the core", () => {
  it("proxies to <upstream>/embeddings and bills the upstream's prompt_tokens with 0 completion tokens", async () => {
    const h = harness();
    const response = await embed(h.deps, { model: MODEL, input: "The food was delicious." });
    expect(response.statusCode).to.equal(200);
    expect(JSON.parse(response.body).data[0].embedding).to.deep.equal([0.1, -0.2, 0.3]);
    expect(h.upstream.requests.map((r) => `${r.method} ${r.path}`)).to.deep.equal(["POST /embeddings"]);
    const record = last(h.meter);
    expect(record).to.include({ route: "/v1/embeddings", billed: true, usageEstimated: false, model: MODEL });
    expect(record.usage).to.deep.equal({ prompt_tokens: 9, completion_tokens: 0, total_tokens: 9 });
  });

  it("estimates the input tokens when the upstream reports no usage", async () => {
    const h = harness(() => jsonResponse(200, embeddingsAnswer(undefined)));
    const body = { model: MODEL, input: ["first text to embed", "second text"] };
    await embed(h.deps, body);
    const record = last(h.meter);
    expect(record.usageEstimated).to.equal(true);
    expect(record.usage.prompt_tokens).to.equal(estimateEmbeddingsInputTokens(body, MODEL));
    expect(record.usage.prompt_tokens).to.be.greaterThan(0);
    expect(record.usage.completion_tokens).to.equal(0);
  });

  it("does not believe a count below one token per input or per 128 bytes: estimates instead", async () => {
    const h = harness(() => jsonResponse(200, embeddingsAnswer(1)));
    const body = { model: MODEL, input: Array.from({ length: 20 }, (_, i) => `text number ${i} to embed, long enough to be several tokens`) };
    await embed(h.deps, body);
    const record = last(h.meter);
    expect(record.usageEstimated).to.equal(true);
    expect(record.usage.prompt_tokens).to.equal(estimateEmbeddingsInputTokens(body, MODEL)).and.be.greaterThan(20);
  });

  it("answers 502 upstream_bad_response, unbilled, for a 2xx without a data list", async () => {
    const h = harness(() => jsonResponse(200, { object: "list", usage: { prompt_tokens: 3, total_tokens: 3 } }));
    const response = await embed(h.deps, { model: MODEL, input: "hi" });
    expect(response.statusCode).to.equal(502);
    expect(JSON.parse(response.body).error.code).to.equal("upstream_bad_response");
    expect(last(h.meter).billed).to.equal(false);
  });

  it("refuses a model outside the caller's plan list with 404 model_not_found, without calling the upstream", async () => {
    const h = harness();
    const response = await embed(h.deps, { model: "text-embedding-3-large", input: "hi" });
    expect(response.statusCode).to.equal(404);
    expect(JSON.parse(response.body).error).to.include({ code: "model_not_found", param: "model" });
    expect(h.upstream.requests).to.have.length(0);
  });

  it("answers 415 for a non-JSON content type, 413 over MAX_REQUEST_BYTES and 400 param input for an empty input", async () => {
    const h = harness(undefined, { MAX_REQUEST_BYTES: "1000" });
    expect((await embed(h.deps, { model: MODEL, input: "hi" }, "key-id-alice", { "content-type": "text/plain" })).statusCode).to.equal(415);
    expect((await embed(h.deps, { model: MODEL, input: "x".repeat(2000) })).statusCode).to.equal(413);
    const empty = await embed(h.deps, { model: MODEL, input: [] });
    expect(empty.statusCode).to.equal(400);
    expect(JSON.parse(empty.body).error.param).to.equal("input");
    expect(h.upstream.requests).to.have.length(0);
  });

  it("redacts the upstream key an upstream echoes in an embeddings body", async () => {
    const h = harness(() => jsonResponse(200, embeddingsAnswer(4, { model: `echo ${UPSTREAM_KEY}` })));
    const response = await embed(h.deps, { model: MODEL, input: "hi" });
    recordForScan("embeddings echo", [response.body, JSON.stringify(h.meter.records), ...h.logs]);
    expect(response.statusCode).to.equal(200);
    expect(response.body).to.not.include(UPSTREAM_KEY);
    expect(JSON.stringify(h.meter.records)).to.not.include(UPSTREAM_KEY);
  });

  describe("prepaid", () => {
    const PRICE = { input: 1_000_000, output: 2_000_000 };
    class WatchedStore extends MemoryCustomerStore {
      readonly reserved: number[] = [];
      override async reserve(args: Parameters<MemoryCustomerStore["reserve"]>[0]) {
        this.reserved.push(args.micros);
        return super.reserve(args);
      }
    }

    async function prepaid(balance: number) {
      const store = new WatchedStore();
      store.putCustomer({ apiKeyId: "key-acme", customerId: "acme", plan: "credits", status: "active" });
      if (balance > 0) await store.credit({ customerId: "acme", currency: "usd", creditId: "test:acme", micros: balance, source: "cli", now: Date.now() });
      const upstream = new FakeUpstream(() => jsonResponse(200, embeddingsAnswer(9)));
      const config = loadFunctionConfig({
        UPSTREAM_API_KEY: UPSTREAM_KEY,
        CUSTOMERS_TABLE: "customers",
        PLANS: JSON.stringify({ credits: { billing: "prepaid", pricing: { currency: "usd", prices: { [MODEL]: PRICE } } } }),
      });
      const meter = new RecordingMeter();
      const base = fakeDeps({ config, upstream, meter });
      const deps: CoreDeps = { ...base, store, customers: new CachedCustomerDirectory({ store, log: base.log, clock: Date.now }) };
      return { store, deps, upstream, meter };
    }

    it("reserves the input estimate at the input price (no output) and charges the upstream's prompt tokens", async () => {
      const p = await prepaid(1_000);
      const body = { model: MODEL, input: "Embed this sentence, please." };
      const response = await embed(p.deps, body, "key-acme");
      expect(response.statusCode).to.equal(200);
      expect(p.store.reserved).to.deep.equal([maxCostOf(estimateEmbeddingsInputTokens(body, MODEL), 0, PRICE)]);
      expect(p.store.account("acme")).to.deep.include({ balanceMicros: 1_000 - 9, reservedMicros: 0, holds: 0 });
      expect(last(p.meter).billing).to.deep.include({ mode: "prepaid", chargedMicros: 9 });
    });

    it("answers 429 insufficient_quota without calling the upstream when the balance does not cover the input", async () => {
      const p = await prepaid(1);
      const response = await embed(p.deps, { model: MODEL, input: "A sentence long enough to cost more than one micro-unit." }, "key-acme");
      expect(response.statusCode).to.equal(429);
      expect(JSON.parse(response.body).error.message).to.include("its input");
      expect(p.upstream.requests).to.have.length(0);
    });
  });
});

describe("GET /v1/models/{model} in the core", () => {
  it("answers a model the plan lists with its model object, without calling the upstream", async () => {
    const h = harness();
    const response = await retrieve(h.deps, "gpt-4o-mini");
    expect(response.statusCode).to.equal(200);
    expect(JSON.parse(response.body)).to.deep.equal({ id: "gpt-4o-mini", object: "model", created: 0, owned_by: "metered-ai-api" });
    expect(h.upstream.requests).to.have.length(0);
    expect(last(h.meter)).to.include({ route: "/v1/models/{model}", billed: false, status: 200 });
  });

  it("answers 404 model_not_found for a model the plan does not list, without calling the upstream", async () => {
    const h = harness();
    const response = await retrieve(h.deps, "gpt-4o");
    expect(response.statusCode).to.equal(404);
    expect(JSON.parse(response.body).error).to.include({ code: "model_not_found", param: "model", type: "invalid_request_error" });
    expect(h.upstream.requests).to.have.length(0);
  });

  it("answers the upstream's own object, asked for by its encoded id, on a plan without a list", async () => {
    const model = "ft:gpt-4o-mini:acme::abc/1";
    const h = harness(() => jsonResponse(200, { id: model, object: "model", created: 1_700_000_000, owned_by: "acme" }));
    const response = await retrieve(h.deps, model, "key-id-bob");
    expect(response.statusCode).to.equal(200);
    expect(JSON.parse(response.body)).to.deep.equal({ id: model, object: "model", created: 1_700_000_000, owned_by: "acme" });
    expect(h.upstream.requests.map((r) => `${r.method} ${r.path}`)).to.deep.equal([`GET /models/${encodeURIComponent(model)}`]);
    expect(last(h.meter).usage.total_tokens).to.equal(0);
  });

  it("passes the upstream's 404 for an unknown model through on a plan without a list", async () => {
    const notFound = { error: { message: "The model 'nope' does not exist", type: "invalid_request_error", param: "model", code: "model_not_found" } };
    const h = harness(() => jsonResponse(404, notFound));
    const response = await retrieve(h.deps, "nope", "key-id-bob");
    expect(response.statusCode).to.equal(404);
    expect(JSON.parse(response.body)).to.deep.equal(notFound);
  });
});

describe("Moesif request fields", () => {
  it("never keeps prompt text: input, instructions, prompt and messages are dropped, options kept", () => {
    const body = { model: "m", input: "secret input text", instructions: "secret instructions", prompt: "secret prompt", messages: "secret messages", temperature: 0.5, store: false, previous_response_id: "resp_1" };
    expect(scalarFields(body)).to.deep.equal({ model: "m", temperature: 0.5, store: false, previous_response_id: "resp_1" });
    const record: UsageRecord = {
      transactionId: "t",
      requestId: "r",
      method: "POST",
      route: "/v1/responses",
      uri: "https://example.test/v1/responses",
      startedAt: 0,
      finishedAt: 1,
      usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 },
      usageEstimated: false,
      status: 200,
      requestHeaders: {},
      responseHeaders: {},
      requestBody: body,
    };
    expect(JSON.stringify(toMoesifEvent(record, false))).to.not.match(/secret/);
  });
});
