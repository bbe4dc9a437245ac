import { expect } from "chai";
import { loadFunctionConfig } from "../../functions/ai-chat/config";
import { handleRequest } from "../../functions/ai-chat/core";
import { transactionIdFor } from "../../functions/ai-chat/metering";
import { UpstreamError, UpstreamTimeoutError } from "../../functions/ai-chat/errors";
import { FakeUpstream, RecordingMeter, UPSTREAM_KEY, fakeDeps, jsonResponse, proxyRequest, testEnv } from "../helpers/fakes";
import { chatBody } from "../helpers/events";

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
    for (const request of [proxyRequest({ route: "/v1/embeddings" }), proxyRequest({ method: "GET", route: "/v1/chat/completions" })]) {
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
