import { expect } from "chai";
import { loadFunctionConfig } from "../../functions/ai-chat/config";
import { DEADLINE_RESERVE_MS, LAMBDA_RESPONSE_LIMIT_BYTES, handleRequest, serialisedSize } from "../../functions/ai-chat/core";
import { transactionIdFor } from "../../functions/ai-chat/metering";
import { UpstreamError, UpstreamTimeoutError } from "../../functions/ai-chat/errors";
import { FakeUpstream, RecordingMeter, UPSTREAM_KEY, fakeDeps, jsonResponse, proxyRequest, testEnv } from "../helpers/fakes";
import { chatBody } from "../helpers/events";
import { recordForScan, registerSecret } from "../helpers/secret-scan";
import { SecretRedactor } from "../../functions/shared/secret-redactor";

const completion = (usage?: unknown) => ({
  id: "chatcmpl-1",
  object: "chat.completion",
  model: "gpt-4o-mini",
  choices: [{ index: 0, message: { role: "assistant", content: "Hi there" }, finish_reason: "stop" }],
  ...(usage === undefined ? {} : { usage }),
});

describe("handleRequest (core)", () => {
  it("forwards the caller's bytes unchanged and returns the upstream body unchanged", async () => {
    const raw = JSON.stringify({ ...chatBody(), temperature: 0.2, some_future_field: { x: [1, 2] } });
    const upstreamBody = JSON.stringify(completion({ prompt_tokens: 9, completion_tokens: 12, total_tokens: 21 }));
    const upstream = new FakeUpstream(() => jsonResponse(200, upstreamBody));
    const meter = new RecordingMeter();

    const response = await handleRequest(proxyRequest({ json: raw }), fakeDeps({ upstream, meter }));

    expect(response.statusCode).to.equal(200);
    expect(response.body).to.equal(upstreamBody);
    expect(response.headers["Content-Type"]).to.equal("application/json");
    expect(upstream.requests[0]).to.deep.equal({ method: "POST", path: "/chat/completions", body: raw });
    expect(meter.records).to.have.length(1);
    expect(meter.records[0].usage).to.deep.equal({ prompt_tokens: 9, completion_tokens: 12, total_tokens: 21 });
    expect(meter.records[0].usageEstimated).to.equal(false);
    expect(meter.records[0].customer?.customerId).to.equal("alice");
  });

  it("derives a stable UUID transaction id from the request id", async () => {
    const meter = new RecordingMeter();
    await handleRequest(proxyRequest({ requestId: "abc", json: "{" }), fakeDeps({ meter }));
    expect(meter.records[0].transactionId).to.equal(transactionIdFor("abc"));
    expect(transactionIdFor("abc")).to.match(/^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    expect(transactionIdFor("abd")).to.not.equal(transactionIdFor("abc"));
  });

  it("estimates usage with the tokenizer when the upstream omits it, and flags the estimate", async () => {
    const upstream = new FakeUpstream(() => jsonResponse(200, completion()));
    const meter = new RecordingMeter();
    await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ upstream, meter }));
    const record = meter.records[0];
    expect(record.usageEstimated).to.equal(true);
    // "Hi there" is 2 tokens in o200k_base; the prompt counts OpenAI's per-message overhead.
    expect(record.usage.completion_tokens).to.equal(2);
    expect(record.usage.prompt_tokens).to.be.greaterThan(10);
    expect(record.usage.total_tokens).to.equal(record.usage.prompt_tokens + 2);
  });

  it("wraps /ai-chat in request_payload only when RESPONSE_ENVELOPE=request_payload", async () => {
    const body = JSON.stringify(completion({ prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 }));
    const upstream = new FakeUpstream(() => jsonResponse(200, body));
    const config = loadFunctionConfig(testEnv({ RESPONSE_ENVELOPE: "request_payload" }));
    const seed = await handleRequest(proxyRequest({ route: "/ai-chat", json: chatBody() }), fakeDeps({ upstream, config }));
    const sdk = await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ upstream, config }));
    expect(JSON.parse(seed.body)).to.deep.equal({ request_payload: JSON.parse(body) });
    expect(sdk.body).to.equal(body);
  });

  it("answers 404 model_not_found for a model outside the plan, without calling the upstream", async () => {
    const upstream = new FakeUpstream(() => jsonResponse(200, completion()));
    const response = await handleRequest(proxyRequest({ json: chatBody({ model: "gpt-4o" }) }), fakeDeps({ upstream }));
    expect(response.statusCode).to.equal(404);
    expect(JSON.parse(response.body).error).to.include({ code: "model_not_found", param: "model", type: "invalid_request_error" });
    expect(upstream.requests).to.have.length(0);
  });

  it("allows every model on a plan without a model list", async () => {
    const upstream = new FakeUpstream(() => jsonResponse(200, completion({ prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 })));
    const response = await handleRequest(proxyRequest({ apiKeyId: "key-id-bob", json: chatBody({ model: "anything" }) }), fakeDeps({ upstream }));
    expect(response.statusCode).to.equal(200);
  });

  it("answers 403 and still meters when the key id has no customer", async () => {
    const meter = new RecordingMeter();
    const response = await handleRequest(proxyRequest({ apiKeyId: "stranger", json: chatBody() }), fakeDeps({ meter }));
    expect(response.statusCode).to.equal(403);
    expect(JSON.parse(response.body).error.type).to.equal("permission_error");
    expect(meter.records).to.have.length(1);
    expect(meter.records[0].customer).to.equal(undefined);
  });

  it("answers 404 in the OpenAI shape for unknown routes and methods", async () => {
    for (const request of [proxyRequest({ route: "/v1/completions" }), proxyRequest({ method: "GET", route: "/v1/chat/completions" })]) {
      const response = await handleRequest(request, fakeDeps());
      expect(response.statusCode).to.equal(404);
      expect(JSON.parse(response.body).error).to.have.keys("message", "type", "param", "code");
    }
  });

  it("lists the plan's models in OpenAI's list shape", async () => {
    const response = await handleRequest(proxyRequest({ method: "GET", route: "/v1/models" }), fakeDeps());
    const body = JSON.parse(response.body);
    expect(body.object).to.equal("list");
    expect(body.data.map((m: { id: string }) => m.id)).to.deep.equal(["gpt-4o-mini"]);
    expect(body.data[0].object).to.equal("model");
  });

  it("lists the upstream's models for a plan without a model list", async () => {
    const upstream = new FakeUpstream(() => jsonResponse(200, { object: "list", data: [{ id: "m1", object: "model" }] }));
    const response = await handleRequest(proxyRequest({ method: "GET", route: "/v1/models", apiKeyId: "key-id-bob" }), fakeDeps({ upstream }));
    expect(JSON.parse(response.body).data[0].id).to.equal("m1");
    expect(upstream.requests[0]).to.include({ method: "GET", path: "/models" });
  });

  describe("upstream failures", () => {
    const cases: Array<[string, () => ReturnType<typeof jsonResponse> | never, number, string | undefined]> = [
      ["400 passes through", () => jsonResponse(400, { error: { message: "bad temperature", type: "invalid_request_error", param: "temperature", code: null } }), 400, undefined],
      ["404 passes through", () => jsonResponse(404, { error: { message: "no such model", type: "invalid_request_error", param: "model", code: "model_not_found" } }), 404, "model_not_found"],
      ["422 passes through", () => jsonResponse(422, { error: { message: "unprocessable", type: "invalid_request_error", param: null, code: null } }), 422, undefined],
      ["401 becomes 502", () => jsonResponse(401, { error: { message: `Incorrect API key provided: ${UPSTREAM_KEY}`, type: "invalid_request_error", param: null, code: "invalid_api_key" } }), 502, "upstream_auth_failed"],
      ["403 becomes 502", () => jsonResponse(403, { error: { message: "forbidden" } }), 502, "upstream_auth_failed"],
      ["500 becomes 502", () => jsonResponse(500, { error: { message: "boom" } }), 502, "upstream_failed"],
      ["503 becomes 502", () => jsonResponse(503, "Service Unavailable"), 502, "upstream_failed"],
      ["a non-JSON 200 becomes 502", () => jsonResponse(200, "<html>oops</html>"), 502, "upstream_bad_response"],
      ["a 200 carrying an error instead of choices becomes 502", () => jsonResponse(200, { error: { message: "model overloaded" } }), 502, "upstream_bad_response"],
      ["a connection error becomes 502", () => { throw new UpstreamError("could not connect", "upstream_unreachable"); }, 502, "upstream_unreachable"],
      ["a timeout becomes 504", () => { throw new UpstreamTimeoutError(28000); }, 504, "upstream_timeout"],
    ];
    for (const [name, answer, status, code] of cases) {
      it(`${name}, in the OpenAI shape, metered with zero tokens`, async () => {
        const meter = new RecordingMeter();
        const logs: string[] = [];
        const response = await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ upstream: new FakeUpstream(answer), meter, logs }));
        expect(response.statusCode).to.equal(status);
        const error = JSON.parse(response.body).error;
        expect(error).to.have.keys("message", "type", "param", "code");
        if (code) expect(error.code).to.equal(code);
        expect(response.body).to.not.include(UPSTREAM_KEY);
        expect(logs.join("\n")).to.not.include(UPSTREAM_KEY);
        expect(meter.records).to.have.length(1);
        expect(meter.records[0].usage.total_tokens).to.equal(0);
        expect(meter.records[0].status).to.equal(status);
      });
    }

    it("429 stays 429 and keeps Retry-After", async () => {
      const upstream = new FakeUpstream(() => jsonResponse(429, { error: { message: "slow down", type: "requests", code: "rate_limit_exceeded" } }, { "retry-after": "7" }));
      const response = await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ upstream }));
      expect(response.statusCode).to.equal(429);
      expect(response.headers["Retry-After"]).to.equal("7");
      expect(JSON.parse(response.body).error.type).to.equal("rate_limit_error");
    });
  });

  it("answers 500 with a clear message and a log line when no upstream key is configured", async () => {
    const logs: string[] = [];
    const config = loadFunctionConfig(testEnv({ UPSTREAM_API_KEY: undefined }));
    const response = await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ config, logs }));
    expect(response.statusCode).to.equal(500);
    expect(JSON.parse(response.body).error.message).to.match(/no upstream API key/i);
    expect(logs.some((l) => l.includes("UPSTREAM_API_KEY"))).to.equal(true);
  });

  it("answers 500 when CUSTOMERS is unreadable, naming the variable in the log only", async () => {
    const logs: string[] = [];
    const config = loadFunctionConfig(testEnv({ CUSTOMERS: "{oops" }));
    const response = await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ config, logs }));
    expect(response.statusCode).to.equal(500);
    expect(response.body).to.not.include("CUSTOMERS");
    expect(logs.some((l) => l.includes("CUSTOMERS is not valid JSON"))).to.equal(true);
  });

  it("answers the caller normally when the meter throws", async () => {
    const upstream = new FakeUpstream(() => jsonResponse(200, completion({ prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 })));
    const meter = { record: async () => { throw new Error("meter exploded"); } };
    const logs: string[] = [];
    const response = await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ upstream, meter, logs }));
    expect(response.statusCode).to.equal(200);
    expect(logs.some((l) => l.includes("metering_failed"))).to.equal(true);
  });
});

describe("handleRequest: billing", () => {
  const PRICED_PLANS = {
    starter: {
      models: ["gpt-4o-mini", "gpt-4o", "unpriced-model"],
      // Micro-units per 1M tokens: gpt-4o-mini at $0.15 / $0.60, cached input $0.075.
      pricing: { currency: "usd", prices: { "gpt-4o-mini": { input: 150_000, output: 600_000, cachedInput: 75_000 }, "gpt-4o": { input: 2_500_000, output: 10_000_000 } } },
    },
    pro: {},
  };
  const pricedConfig = () => loadFunctionConfig(testEnv({ PLANS: JSON.stringify(PRICED_PLANS) }));

  it("puts the plan's per-model cost on the record, in integer micro-units with cached tokens at their own price", async () => {
    const usage = { prompt_tokens: 1000, completion_tokens: 500, total_tokens: 1500, prompt_tokens_details: { cached_tokens: 400 } };
    const upstream = new FakeUpstream(() => jsonResponse(200, completion(usage)));
    const meter = new RecordingMeter();
    const response = await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ upstream, meter, config: pricedConfig() }));
    expect(response.statusCode).to.equal(200);
    // 600 × 0.15 + 400 × 0.075 + 500 × 0.60 = 90 + 30 + 300 = 420 micro-dollars.
    expect(meter.records[0].cost).to.deep.equal({ currency: "usd", micros: 420 });
    expect(meter.records[0].billed).to.equal(true);
    expect(meter.records[0].usage).to.deep.equal({ prompt_tokens: 1000, completion_tokens: 500, total_tokens: 1500, cached_tokens: 400 });
  });

  it("prices each model at its own price", async () => {
    const upstream = new FakeUpstream(() => jsonResponse(200, completion({ prompt_tokens: 1000, completion_tokens: 1000, total_tokens: 2000 })));
    const meter = new RecordingMeter();
    const deps = fakeDeps({ upstream, meter, config: pricedConfig() });
    await handleRequest(proxyRequest({ json: chatBody({ model: "gpt-4o-mini" }) }), deps);
    await handleRequest(proxyRequest({ json: chatBody({ model: "gpt-4o" }) }), deps);
    expect(meter.records.map((r) => r.cost?.micros)).to.deep.equal([750, 12_500]);
  });

  it("refuses a model without a price on a plan that bills, with 400 model_not_priced, without calling the upstream", async () => {
    const upstream = new FakeUpstream(() => jsonResponse(200, completion({ prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 })));
    const meter = new RecordingMeter();
    const response = await handleRequest(proxyRequest({ json: chatBody({ model: "unpriced-model" }) }), fakeDeps({ upstream, meter, config: pricedConfig() }));
    expect(response.statusCode).to.equal(400);
    expect(JSON.parse(response.body).error).to.include({ type: "invalid_request_error", param: "model", code: "model_not_priced" });
    expect(upstream.requests).to.have.length(0);
    expect(meter.records[0]).to.include({ status: 400, model: "unpriced-model", cost: undefined });
    expect(meter.records[0].usage.total_tokens).to.equal(0);
  });

  it("serves a plan without pricing and records no cost", async () => {
    const upstream = new FakeUpstream(() => jsonResponse(200, completion({ prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 })));
    const meter = new RecordingMeter();
    const response = await handleRequest(proxyRequest({ apiKeyId: "key-id-bob", json: chatBody({ model: "anything" }) }), fakeDeps({ upstream, meter, config: pricedConfig() }));
    expect(response.statusCode).to.equal(200);
    expect(meter.records[0].cost).to.equal(undefined);
    expect(meter.records[0].usage.total_tokens).to.equal(2);
  });

  it("bills the validated usage: total recomputed when the upstream reports total_tokens 0", async () => {
    const upstream = new FakeUpstream(() => jsonResponse(200, completion({ prompt_tokens: 40, completion_tokens: 2, total_tokens: 0 })));
    const meter = new RecordingMeter();
    await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ upstream, meter, config: pricedConfig() }));
    expect(meter.records[0].usage).to.deep.equal({ prompt_tokens: 40, completion_tokens: 2, total_tokens: 42 });
    expect(meter.records[0].usageEstimated).to.equal(false);
  });

  for (const [name, usage] of [
    ["negative counts", { prompt_tokens: -1000, completion_tokens: -5, total_tokens: -1005 }],
    ["string counts", { prompt_tokens: "12", completion_tokens: "3", total_tokens: "15" }],
    ["fractional counts", { prompt_tokens: 1.5, completion_tokens: 2, total_tokens: 3.5 }],
    ["absurd counts", { prompt_tokens: 1e15, completion_tokens: 1, total_tokens: 1e15 + 1 }],
  ] as const) {
    it(`estimates instead of billing ${name}`, async () => {
      const upstream = new FakeUpstream(() => jsonResponse(200, completion(usage)));
      const meter = new RecordingMeter();
      await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ upstream, meter, config: pricedConfig() }));
      const record = meter.records[0];
      expect(record.usageEstimated).to.equal(true);
      expect(record.usage.completion_tokens).to.equal(2);
      expect(record.usage.prompt_tokens).to.be.greaterThan(10);
      expect(record.usage.total_tokens).to.equal(record.usage.prompt_tokens + 2);
      expect(record.cost?.micros).to.be.greaterThan(0);
    });
  }

  for (const status of [201, 203, 206]) {
    it(`passes an upstream ${status} completion through and bills it`, async () => {
      const upstream = new FakeUpstream(() => jsonResponse(status, completion({ prompt_tokens: 5, completion_tokens: 5, total_tokens: 10 })));
      const meter = new RecordingMeter();
      const response = await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ upstream, meter, config: pricedConfig() }));
      expect(response.statusCode).to.equal(status);
      expect(meter.records[0]).to.include({ status, upstreamStatus: status, usageEstimated: false });
      expect(meter.records[0].usage.total_tokens).to.equal(10);
      expect(meter.records[0].cost).to.deep.equal({ currency: "usd", micros: 4 });
    });
  }

  it("answers 502 response_too_large, bills nothing and records 502 when the serialised answer exceeds Lambda's 6 MiB", async () => {
    // 2 MB of quotes: the upstream's JSON escapes each one (\"), and the proxy result escapes them again (\\\").
    const answer = completion({ prompt_tokens: 5, completion_tokens: 900_000, total_tokens: 900_005 });
    answer.choices[0].message.content = '"'.repeat(2_000_000);
    const body = JSON.stringify(answer);
    const upstream = new FakeUpstream(() => jsonResponse(200, body));
    const meter = new RecordingMeter();
    const logs: string[] = [];
    const response = await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ upstream, meter, logs }));
    expect(Buffer.byteLength(body)).to.be.lessThan(LAMBDA_RESPONSE_LIMIT_BYTES);
    expect(response.statusCode).to.equal(502);
    expect(JSON.parse(response.body).error).to.include({ code: "response_too_large", type: "api_error" });
    expect(meter.records[0]).to.include({ status: 502, upstreamStatus: 200, cost: undefined, usageEstimated: false, billed: false });
    expect(meter.records[0].usage).to.deep.equal({ prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 });
    expect(logs.some((l) => l.includes('"answer_not_delivered"') && l.includes('"unbilled_completion_tokens":900000'))).to.equal(true);
  });

  it("counts the request_payload envelope and headers against Lambda's limit", async () => {
    // An answer whose proxy result is 10 bytes under the limit without the envelope, and over it with the envelope.
    const fill = (length: number) => JSON.stringify(completion({ prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 })).replace("Hi there", "x".repeat(length));
    const sizeOf = (text: string) => serialisedSize({ statusCode: 200, headers: { "Content-Type": "application/json", "x-request-id": "same-id" }, body: text });
    const body = fill(LAMBDA_RESPONSE_LIMIT_BYTES - 10 - sizeOf(fill(0)));
    expect(sizeOf(body)).to.equal(LAMBDA_RESPONSE_LIMIT_BYTES - 10);
    const upstream = new FakeUpstream(() => jsonResponse(200, body));
    const config = loadFunctionConfig(testEnv({ RESPONSE_ENVELOPE: "request_payload" }));
    const plain = await handleRequest(proxyRequest({ requestId: "same-id", json: chatBody() }), fakeDeps({ upstream, config }));
    const wrapped = await handleRequest(proxyRequest({ requestId: "same-id", route: "/ai-chat", json: chatBody() }), fakeDeps({ upstream, config }));
    expect(plain.statusCode).to.equal(200);
    expect(wrapped.statusCode).to.equal(502);
  });

  it("gives the upstream only the time left before the deadline, keeping the metering timeout and a reserve", async () => {
    const upstream = new FakeUpstream(() => jsonResponse(200, completion({ prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 })));
    const deps = { ...fakeDeps({ upstream }), clock: () => 1_000_000 };
    await handleRequest(proxyRequest({ json: chatBody(), remainingMs: 10_000 }), deps);
    expect(upstream.requests[0].timeoutMs).to.equal(10_000 - deps.config.moesif.timeoutMs - DEADLINE_RESERVE_MS);
  });

  it("answers 504 and bills nothing when the upstream's answer arrives too late to be delivered and metered", async () => {
    let now = 1_000_000;
    const upstream = new FakeUpstream(() => {
      now += 9_500; // the upstream used almost all of the invocation's time
      return jsonResponse(200, completion({ prompt_tokens: 7, completion_tokens: 7, total_tokens: 14 }));
    });
    const meter = new RecordingMeter();
    const deps = { ...fakeDeps({ upstream, meter }), clock: () => now };
    const response = await handleRequest(proxyRequest({ json: chatBody(), remainingMs: 10_000 }), deps);
    expect(response.statusCode).to.equal(504);
    expect(JSON.parse(response.body).error.code).to.equal("deadline_exceeded");
    expect(meter.records[0]).to.include({ status: 504, upstreamStatus: 200, cost: undefined, billed: false });
    expect(meter.records[0].usage.total_tokens).to.equal(0);
  });

  it("does not call the upstream when the invocation has no time left for it", async () => {
    const upstream = new FakeUpstream(() => jsonResponse(200, completion()));
    const response = await handleRequest(proxyRequest({ json: chatBody(), remainingMs: 1500 }), fakeDeps({ upstream }));
    expect(response.statusCode).to.equal(504);
    expect(upstream.requests).to.have.length(0);
  });
});

describe("handleRequest: what reaches the upstream", () => {
  it("strips a top-level `mock` field before forwarding, and only then re-serialises", async () => {
    const upstream = new FakeUpstream(() => jsonResponse(200, completion({ prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 })));
    const meter = new RecordingMeter();
    await handleRequest(proxyRequest({ json: chatBody({ temperature: 0.5, mock: { status: 500 } }) }), fakeDeps({ upstream, meter }));
    const forwarded = JSON.parse(upstream.requests[0].body!);
    expect(forwarded).to.not.have.property("mock");
    expect(forwarded).to.deep.equal(chatBody({ temperature: 0.5 }));
    expect(JSON.stringify(meter.records[0].requestBody)).to.not.include("mock");
  });

  it("forwards `mock` unchanged with FORWARD_MOCK_DIRECTIVES=true (the local model server)", async () => {
    const raw = JSON.stringify(chatBody({ mock: { omit_usage: true } }));
    const upstream = new FakeUpstream(() => jsonResponse(200, completion({ prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 })));
    const config = loadFunctionConfig(testEnv({ FORWARD_MOCK_DIRECTIVES: "true" }));
    await handleRequest(proxyRequest({ json: raw }), fakeDeps({ upstream, config }));
    expect(upstream.requests[0].body).to.equal(raw);
  });

  it("strips `mock` from a request nested 20,000 deep without crashing", async () => {
    const raw = JSON.stringify(chatBody({ mock: {} })).replace(/}$/, `,"deep":${"[".repeat(20_000)}${"]".repeat(20_000)}}`);
    const upstream = new FakeUpstream(() => jsonResponse(200, completion({ prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 })));
    const response = await handleRequest(proxyRequest({ json: raw }), fakeDeps({ upstream }));
    expect(response.statusCode).to.equal(200);
    expect(upstream.requests[0].body).to.not.include('"mock"');
    expect(upstream.requests[0].body!.length).to.be.greaterThan(40_000);
  });
});

describe("handleRequest: estimates that no input can break", () => {
  // Built as text: JSON.stringify itself overflows the stack on these values.
  const DEEP = "[".repeat(20_000) + '"x"' + "]".repeat(20_000);
  const toolCalls = `[{"id":"c1","type":"function","function":{"name":"f","arguments":${DEEP}}}]`;

  it("estimates an answer whose tool call arguments are nested 20,000 deep, and bills it", async () => {
    const answer = `{"id":"chatcmpl-deep","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":${toolCalls}}}]}`;
    const upstream = new FakeUpstream(() => jsonResponse(200, answer));
    const meter = new RecordingMeter();
    const response = await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ upstream, meter }));
    expect(response.statusCode).to.equal(200);
    expect(meter.records[0].usageEstimated).to.equal(true);
    expect(meter.records[0].usage.completion_tokens).to.be.greaterThan(1000);
  });

  it("estimates a prompt with tool calls and a content part nested 20,000 deep", async () => {
    const messages = [
      `{"role":"user","content":[{"type":"text","text":"hi"},{"type":"x-custom","data":${DEEP}}]}`,
      `{"role":"assistant","content":null,"tool_calls":${toolCalls}}`,
      `{"role":"tool","tool_call_id":"c1","content":"ok"}`,
    ];
    const upstream = new FakeUpstream(() => jsonResponse(200, completion()));
    const meter = new RecordingMeter();
    const response = await handleRequest(proxyRequest({ json: `{"model":"gpt-4o-mini","messages":[${messages.join(",")}]}` }), fakeDeps({ upstream, meter }));
    expect(response.statusCode).to.equal(200);
    expect(meter.records[0].usage.prompt_tokens).to.be.greaterThan(2000);
  });

  it("counts tool definitions in the estimate", async () => {
    const properties = Object.fromEntries(Array.from({ length: 400 }, (_, i) => [`field_${i}`, { type: "string", description: `The customer's ${i}th address line, as printed on the invoice.` }]));
    const tools = [{ type: "function", function: { name: "create_invoice", description: "Creates an invoice.", parameters: { type: "object", properties } } }];
    const upstream = new FakeUpstream(() => jsonResponse(200, completion()));
    const meter = new RecordingMeter();
    await handleRequest(proxyRequest({ json: chatBody({ tools }) }), fakeDeps({ upstream, meter }));
    expect(meter.records[0].usage.prompt_tokens).to.be.greaterThan(8000);
  });
});

describe("handleRequest: the model on every record", () => {
  it("records the model of a request refused by validation", async () => {
    const meter = new RecordingMeter();
    const response = await handleRequest(proxyRequest({ json: { model: "gpt-4o-mini", messages: "not an array" } }), fakeDeps({ meter }));
    expect(response.statusCode).to.equal(400);
    expect(meter.records[0].model).to.equal("gpt-4o-mini");
  });

  it("records the model of a request refused before validation (unknown customer)", async () => {
    const meter = new RecordingMeter();
    await handleRequest(proxyRequest({ apiKeyId: "stranger", json: chatBody({ model: "gpt-4o" }) }), fakeDeps({ meter }));
    expect(meter.records[0]).to.include({ status: 403, model: "gpt-4o" });
  });

  it("cuts a very long model name, in the record and in the error message", async () => {
    const meter = new RecordingMeter();
    const response = await handleRequest(proxyRequest({ json: chatBody({ model: "m".repeat(100_000) }) }), fakeDeps({ meter }));
    expect(response.statusCode).to.equal(404);
    expect(meter.records[0].model).to.equal("m".repeat(256));
    expect(response.body.length).to.be.lessThan(1000);
  });

  it("records no model when the request names none (or not as a string)", async () => {
    const meter = new RecordingMeter();
    await handleRequest(proxyRequest({ json: { model: 42, messages: [] } }), fakeDeps({ meter }));
    expect(meter.records[0].model).to.equal(undefined);
  });
});

describe("handleRequest: secrets an upstream echoes", () => {
  const APP_ID = "moesif-app-id-echo-test-0001";
  registerSecret(APP_ID);
  const config = () => loadFunctionConfig(testEnv({ MOESIF_APPLICATION_ID: APP_ID }));
  const base64 = (s: string) => Buffer.from(s).toString("base64");
  const escaped = (s: string) => s.replace(/-/g, "\\u002d");

  /** Everything that left the core for the caller, the logs and the meter. */
  const expectNoSecret = (response: { body: string; headers: Record<string, string> }, logs: string[], meter: RecordingMeter) => {
    const everything = [response.body, JSON.stringify(response.headers), ...logs, JSON.stringify(meter.records)].join("\n");
    recordForScan("core echo tests", [everything]);
    for (const secret of [UPSTREAM_KEY, APP_ID]) expect(everything).to.not.include(secret);
    // Every other spelling (escaped, percent-encoded, base64 at any offset): the redactor's own tests cover the finder.
    expect(new SecretRedactor([UPSTREAM_KEY, APP_ID]).containsSecret(everything)).to.equal(false);
  };

  const run = async (answer: () => ReturnType<typeof jsonResponse>, request = proxyRequest({ json: chatBody() })) => {
    const meter = new RecordingMeter();
    const logs: string[] = [];
    const response = await handleRequest(request, fakeDeps({ upstream: new FakeUpstream(answer), meter, logs, config: config() }));
    return { response, logs, meter };
  };

  it("redacts the key from a 2xx body's id and model", async () => {
    const { response, logs, meter } = await run(() => jsonResponse(200, { ...completion({ prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 }), id: `chatcmpl-${UPSTREAM_KEY}`, model: UPSTREAM_KEY }));
    expect(response.statusCode).to.equal(200);
    expect(JSON.parse(response.body).id).to.equal("chatcmpl-[REDACTED]");
    expectNoSecret(response, logs, meter);
  });

  it("redacts the key from the upstream's model list", async () => {
    const { response, logs, meter } = await run(
      () => jsonResponse(200, { object: "list", data: [{ id: "m1", object: "model", owned_by: UPSTREAM_KEY }] }),
      proxyRequest({ method: "GET", route: "/v1/models", apiKeyId: "key-id-bob" }),
    );
    expect(response.statusCode).to.equal(200);
    expectNoSecret(response, logs, meter);
  });

  it("drops a Retry-After header that carries the key", async () => {
    const { response, logs, meter } = await run(() => jsonResponse(429, { error: { message: "slow", type: "requests", code: null } }, { "retry-after": UPSTREAM_KEY }));
    expect(response.statusCode).to.equal(429);
    expect(response.headers["Retry-After"]).to.equal(undefined);
    expectNoSecret(response, logs, meter);
  });

  it("redacts a JSON-escaped key (sk\\u002d…) from a 4xx body, and the metering record never holds it decoded", async () => {
    const text = `{"error":{"message":"Incorrect API key provided: ${escaped(UPSTREAM_KEY)}","type":"invalid_request_error","param":null,"code":"bad_key"}}`;
    const { response, logs, meter } = await run(() => jsonResponse(400, text));
    expect(response.statusCode).to.equal(400);
    expect(JSON.parse(response.body).error.message).to.equal("Incorrect API key provided: [REDACTED]");
    expectNoSecret(response, logs, meter);
  });

  for (const [name, spell] of [
    ["base64", (s: string) => `token=${base64(`user:${s}`)}`],
    ["percent-encoded", (s: string) => `https://example.test/?key=${s.replace(/-/g, "%2D")}&again=${s.replace(/-/g, "%2d")}`],
  ] as const) {
    it(`redacts a ${name} key and Moesif application id from a 4xx body`, async () => {
      const text = `{"error":{"message":"${spell(UPSTREAM_KEY)} ${spell(APP_ID)}","type":"invalid_request_error","param":null,"code":null}}`;
      const { response, logs, meter } = await run(() => jsonResponse(422, text));
      expect(response.statusCode).to.equal(422);
      expectNoSecret(response, logs, meter);
    });
  }
});

describe("handleRequest: streamed answers without a transport", () => {
  const sseBody = (...data: string[]) => data.map((d) => `data: ${d}\n\n`).join("");
  const delta = (content: string) => JSON.stringify({ id: "c1", object: "chat.completion.chunk", created: 1, model: "gpt-4o-mini", choices: [{ index: 0, delta: { content } }], usage: null });

  it("collects the SSE text and meters the upstream's usage chunk", async () => {
    const usage = JSON.stringify({ id: "c1", object: "chat.completion.chunk", created: 1, model: "gpt-4o-mini", choices: [], usage: { prompt_tokens: 4, completion_tokens: 2, total_tokens: 6 } });
    const upstream = new FakeUpstream(() => ({ status: 200, headers: { "content-type": "text/event-stream" }, body: Buffer.from(sseBody(delta("Hi"), delta(" there"), usage, "[DONE]")) }));
    const meter = new RecordingMeter();
    const response = await handleRequest(proxyRequest({ json: chatBody({ stream: true }) }), fakeDeps({ upstream, meter }));
    expect(response.statusCode).to.equal(200);
    expect(response.headers["Content-Type"]).to.equal("text/event-stream; charset=utf-8");
    expect(response.body).to.equal(sseBody(delta("Hi"), delta(" there"), "[DONE]"));
    expect(JSON.parse(upstream.requests[0].body ?? "{}").stream_options).to.deep.equal({ include_usage: true });
    expect(meter.records[0]).to.deep.include({ status: 200, streamed: true, usageEstimated: false, billed: true });
    expect(meter.records[0].usage).to.deep.include({ prompt_tokens: 4, completion_tokens: 2 });
  });

  it("replaces an invalid usage chunk by an estimated one for a caller who asked", async () => {
    const bad = JSON.stringify({ id: "c1", object: "chat.completion.chunk", created: 1, model: "gpt-4o-mini", choices: [], usage: { prompt_tokens: -4, completion_tokens: "2" } });
    const upstream = new FakeUpstream(() => ({ status: 200, headers: {}, body: Buffer.from(sseBody(delta("Hi"), bad, "[DONE]")) }));
    const meter = new RecordingMeter();
    const response = await handleRequest(proxyRequest({ json: chatBody({ stream: true, stream_options: { include_usage: true } }) }), fakeDeps({ upstream, meter }));
    expect(response.body).to.not.include(`"prompt_tokens":-4`);
    const usageChunks = response.body.split("\n\n").filter((b) => b.includes('"usage":{'));
    expect(usageChunks).to.have.length(1);
    expect(meter.records[0].usageEstimated).to.equal(true);
    expect(JSON.parse(usageChunks[0].slice(6)).usage).to.deep.equal(meter.records[0].usage);
  });
});

describe("handleRequest: streams with nothing but [DONE]", () => {
  it("answers an empty stream (only [DONE]) as a stream, billing the prompt", async () => {
    const upstream = new FakeUpstream(() => ({ status: 200, headers: {}, body: Buffer.from("data: [DONE]\n\n") }));
    const meter = new RecordingMeter();
    const response = await handleRequest(proxyRequest({ json: chatBody({ stream: true }) }), fakeDeps({ upstream, meter }));
    expect(response.statusCode).to.equal(200);
    expect(response.body).to.equal("data: [DONE]\n\n");
    expect(meter.records[0]).to.deep.include({ status: 200, streamed: true, billed: true, usageEstimated: true });
    expect(meter.records[0].usage.completion_tokens).to.equal(0);
  });
});
