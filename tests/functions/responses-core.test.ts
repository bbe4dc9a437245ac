import { expect } from "chai";
import type { APIGatewayProxyEvent } from "aws-lambda";
import { capOutputTokens, RESPONSES_OUTPUT_FIELDS } from "../../functions/ai-chat/account";
import { loadFunctionConfig } from "../../functions/ai-chat/config";
import { handleRequest, meteringReserveMs, type CoreDeps } from "../../functions/ai-chat/core";
import { CachedCustomerDirectory } from "../../functions/ai-chat/customers";
import { createDeps, toProxyRequest } from "../../functions/ai-chat/index";
import { toLedgerItem } from "../../functions/ai-chat/ledger";
import type { UsageRecord } from "../../functions/ai-chat/metering";
import { toMoesifEvent } from "../../functions/ai-chat/moesif";
import { CollectingResponder } from "../../functions/ai-chat/responder";
import { estimateResponsesInputTokens, estimateResponsesUsage } from "../../functions/ai-chat/responses";
import type { UpstreamRequest, UpstreamResponse } from "../../functions/ai-chat/upstream";
import { maxCostOf } from "../../functions/shared/pricing";
import { DynamoResponseOwners, MemoryResponseOwners } from "../../functions/shared/response-owner-store";
import type { ResponseOwner } from "../../functions/shared/response-owners";
import { createApiGatewayEvent, createContext } from "../helpers/events";
import { FakeUpstream, RecordingMeter, UPSTREAM_KEY, fakeDeps, jsonResponse, proxyRequest, testEnv } from "../helpers/fakes";
import { MemoryCustomerStore } from "../helpers/memory-customer-store";
import { recordForScan } from "../helpers/secret-scan";

const MODEL = "gpt-4o-mini";
const USAGE = { input_tokens: 12, output_tokens: 5, total_tokens: 17, input_tokens_details: { cached_tokens: 4 }, output_tokens_details: { reasoning_tokens: 2 } };

/** A Responses API response object as an upstream returns it. */
function responseObject(id: string, overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    id,
    object: "response",
    created_at: 1_760_000_000,
    status: "completed",
    model: MODEL,
    output: [{ type: "message", id: `msg_${id}`, status: "completed", role: "assistant", content: [{ type: "output_text", text: "Hi there", annotations: [] }] }],
    usage: USAGE,
    ...overrides,
  };
}

/** A Responses API event stream (typed SSE) ending with `response.completed` carrying `usage`. */
function responseEvents(id: string, words: string[], usage: Record<string, unknown> | undefined = USAGE): string {
  let sequence = 0;
  const event = (type: string, data: Record<string, unknown>) => `event: ${type}\ndata: ${JSON.stringify({ type, sequence_number: sequence++, ...data })}\n\n`;
  const base = { id, object: "response", created_at: 1_760_000_000, model: MODEL, output: [] };
  return [
    event("response.created", { response: { ...base, status: "in_progress" } }),
    event("response.in_progress", { response: { ...base, status: "in_progress" } }),
    ...words.map((delta) => event("response.output_text.delta", { item_id: `msg_${id}`, output_index: 0, content_index: 0, delta })),
    event("response.completed", { response: { ...base, status: "completed", ...(usage ? { usage } : {}) } }),
  ].join("");
}

/** An upstream that creates responses (buffered or streamed) and answers the stored-response routes. */
function responsesUpstream(options: { id?: string; echoKey?: boolean } = {}): FakeUpstream {
  let created = 0;
  return new FakeUpstream((request: UpstreamRequest): UpstreamResponse => {
    if (request.path === "/responses" && request.method === "POST") {
      const body = JSON.parse(request.body ?? "{}") as Record<string, unknown>;
      const id = options.id ?? `resp_${++created}`;
      if (body.stream === true) {
        const text = responseEvents(id, ["Hi", options.echoKey ? ` ${UPSTREAM_KEY}` : " there"]);
        return { status: 200, headers: { "content-type": "text/event-stream" }, body: Buffer.from(text) };
      }
      return jsonResponse(200, responseObject(id, options.echoKey ? { instructions: `key ${UPSTREAM_KEY}` } : {}));
    }
    const match = /^\/responses\/([^/?]+)(\/input_items|\/cancel)?(\?.*)?$/.exec(request.path);
    if (match) {
      const id = decodeURIComponent(match[1]);
      if (match[2] === "/input_items") return jsonResponse(200, { object: "list", data: [{ id: "msg_in", type: "message", role: "user", content: [] }], has_more: false });
      if (request.method === ("DELETE" as string)) return jsonResponse(200, { id, object: "response.deleted", deleted: true });
      return jsonResponse(200, responseObject(id, match[2] === "/cancel" ? { status: "cancelled" } : {}));
    }
    return jsonResponse(404, { error: { message: "unknown path", type: "invalid_request_error", param: null, code: null } });
  });
}

interface Harness {
  deps: CoreDeps;
  upstream: FakeUpstream;
  meter: RecordingMeter;
  owners: MemoryResponseOwners;
  logs: string[];
}

function harness(upstream: FakeUpstream = responsesUpstream(), env: Record<string, string> = {}): Harness {
  const meter = new RecordingMeter();
  const logs: string[] = [];
  const owners = new MemoryResponseOwners();
  const deps = { ...fakeDeps({ config: loadFunctionConfig(testEnv(env)), upstream, meter, logs }), responseOwners: owners };
  return { deps, upstream, meter, owners, logs };
}

const ALICE = "key-id-alice";
const BOB = "key-id-bob";

function create(h: Harness, body: Record<string, unknown>, apiKeyId = ALICE, responder?: CollectingResponder) {
  return handleRequest(proxyRequest({ route: "/v1/responses", uri: "https://example.test/v1/responses", apiKeyId, json: { model: MODEL, input: "Hello!", ...body } }), h.deps, responder);
}

function stored(h: Harness, method: string, route: string, id: string, apiKeyId: string, query?: Record<string, string[]>) {
  const path = route.replace("{id}", encodeURIComponent(id));
  return handleRequest(
    proxyRequest({ method, route, uri: `https://example.test${path}`, apiKeyId, pathParameters: { id }, ...(query ? { query } : {}), body: Buffer.alloc(0), headers: {} }),
    h.deps,
  );
}

const STORED_ROUTES: Array<[string, string]> = [
  ["GET", "/v1/responses/{id}"],
  ["DELETE", "/v1/responses/{id}"],
  ["GET", "/v1/responses/{id}/input_items"],
  ["POST", "/v1/responses/{id}/cancel"],
];

const lastRecord = (h: Harness): UsageRecord => h.meter.records[h.meter.records.length - 1];

describe("Responses API in the core", () => {
  describe("POST /v1/responses (buffered)", () => {
    it("proxies to <upstream>/responses and bills input as prompt and output as completion tokens, keeping cached and reasoning tokens", async () => {
      const h = harness();
      const response = await create(h, {});
      expect(response.statusCode).to.equal(200);
      expect(JSON.parse(response.body).id).to.equal("resp_1");
      expect(h.upstream.requests.map((r) => `${r.method} ${r.path}`)).to.deep.equal(["POST /responses"]);
      const record = lastRecord(h);
      expect(record.billed).to.equal(true);
      expect(record.route).to.equal("/v1/responses");
      expect(record.usage).to.deep.equal({ prompt_tokens: 12, completion_tokens: 5, total_tokens: 17, cached_tokens: 4, reasoning_tokens: 2 });
      const event = toMoesifEvent(record, false);
      expect(event.metadata).to.include({ prompt_tokens: 12, completion_tokens: 5, cached_tokens: 4, reasoning_tokens: 2, route: "/v1/responses", billed: true });
      const item = toLedgerItem(record, { logBodies: false, stripeBilling: "moesif" });
      expect(item).to.include({ prompt_tokens: 12, completion_tokens: 5, cached_tokens: 4, reasoning_tokens: 2 });
    });

    it("records the caller as the owner of the created response, with its billed input plus output as context tokens", async () => {
      const h = harness();
      await create(h, {});
      expect(await h.owners.lookup("resp_1", Date.now())).to.deep.include({ responseId: "resp_1", customerId: "alice", model: MODEL, contextTokens: 17 });
    });

    it("records no owner when the request says store: false", async () => {
      const h = harness();
      const response = await create(h, { store: false });
      expect(response.statusCode).to.equal(200);
      expect(await h.owners.lookup("resp_1", Date.now())).to.equal(undefined);
      expect(h.owners.calls.record ?? 0).to.equal(0);
    });

    it("answers 502 upstream_bad_response, unbilled, for a 2xx that is not a response object", async () => {
      const h = harness(new FakeUpstream(() => jsonResponse(200, { id: "resp_x", object: "chat.completion", choices: [] })));
      const response = await create(h, {});
      expect(response.statusCode).to.equal(502);
      expect(JSON.parse(response.body).error.code).to.equal("upstream_bad_response");
      expect(lastRecord(h).billed).to.equal(false);
      expect(await h.owners.lookup("resp_x", Date.now())).to.equal(undefined);
    });

    it("still delivers (and bills) the answer when the owner cannot be recorded, and logs response_owner_not_recorded", async () => {
      const h = harness();
      h.owners.fail.add("record");
      const response = await create(h, {});
      expect(response.statusCode).to.equal(200);
      expect(lastRecord(h).billed).to.equal(true);
      expect(h.logs.some((line) => line.includes("response_owner_not_recorded"))).to.equal(true);
      h.owners.fail.delete("record");
      // Nobody owns it now: even its creator gets "not found", which is safe.
      expect((await stored(h, "GET", "/v1/responses/{id}", "resp_1", ALICE)).statusCode).to.equal(404);
    });

    for (const [field, value] of [["background", true], ["conversation", "conv_123"]] as const) {
      it(`refuses ${field} with 400 param ${field}, without calling the upstream`, async () => {
        const h = harness();
        const response = await create(h, { [field]: value });
        expect(response.statusCode).to.equal(400);
        expect(JSON.parse(response.body).error.param).to.equal(field);
        expect(h.upstream.requests).to.have.length(0);
      });
    }

    it("refuses a model outside the caller's plan list with 404 model_not_found, without calling the upstream", async () => {
      const h = harness();
      const response = await create(h, { model: "gpt-4o" });
      expect(response.statusCode).to.equal(404);
      expect(JSON.parse(response.body).error).to.include({ code: "model_not_found", param: "model" });
      expect(h.upstream.requests).to.have.length(0);
    });

    it("answers 415 for a non-JSON content type, 413 over MAX_REQUEST_BYTES and 400 with param for an invalid field", async () => {
      const h = harness(undefined, { MAX_REQUEST_BYTES: "2000" });
      const asText = await handleRequest(proxyRequest({ route: "/v1/responses", json: { model: MODEL, input: "hi" }, headers: { "content-type": "text/plain" } }), h.deps);
      expect(asText.statusCode).to.equal(415);
      const huge = await create(h, { input: "x".repeat(5000) });
      expect(huge.statusCode).to.equal(413);
      const badCap = await create(h, { max_output_tokens: 0 });
      expect(badCap.statusCode).to.equal(400);
      expect(JSON.parse(badCap.body).error.param).to.equal("max_output_tokens");
      expect(h.upstream.requests).to.have.length(0);
    });

    it("forwards what it checked, not the caller's text: with duplicate keys the upstream sees only the last value", async () => {
      const h = harness();
      await create(h, {});
      // Bob names Alice's response first and his own last: JSON.parse (and the ownership check) reads the last; an
      // upstream keeping the first must never see Alice's id.
      await create(h, {}, BOB);
      const raw = `{"model":"${MODEL}","input":"hi","previous_response_id":"resp_1","previous_response_id":"resp_2","max_output_tokens":100000,"max_output_tokens":10}`;
      const response = await handleRequest(proxyRequest({ route: "/v1/responses", apiKeyId: BOB, json: raw }), h.deps);
      expect(response.statusCode).to.equal(200);
      const sent = h.upstream.requests[h.upstream.requests.length - 1].body!;
      expect(sent).not.to.include("resp_1");
      expect(sent.match(/previous_response_id/g)).to.have.length(1);
      expect(JSON.parse(sent)).to.include({ previous_response_id: "resp_2", max_output_tokens: 10 });
    });

    it("redacts the upstream key an upstream echoes in a response body", async () => {
      const h = harness(responsesUpstream({ echoKey: true }));
      const response = await create(h, {});
      recordForScan("responses-core buffered echo", [response.body, JSON.stringify(h.meter.records)]);
      expect(response.statusCode).to.equal(200);
      expect(response.body).to.not.include(UPSTREAM_KEY);
      expect(JSON.stringify(h.meter.records)).to.not.include(UPSTREAM_KEY);
    });

    it("estimates the usage of an answer without usage, counting a continued response's context as input", async () => {
      let calls = 0;
      const h = harness(new FakeUpstream(() => jsonResponse(200, responseObject(`resp_${++calls}`, calls === 1 ? {} : { usage: undefined }))));
      await create(h, {});
      const request = { model: MODEL, input: "Hello!", previous_response_id: "resp_1" };
      await create(h, request);
      const record = lastRecord(h);
      expect(record.usageEstimated).to.equal(true);
      const guess = estimateResponsesUsage(request, responseObject("resp_2", { usage: undefined }), MODEL);
      expect(record.usage.prompt_tokens).to.equal(guess.prompt_tokens + 17);
      expect(record.usage.completion_tokens).to.equal(guess.completion_tokens);
    });

    it("sends a plan's output cap upstream as max_output_tokens and lowers a larger value the caller asked for", async () => {
      const h = harness(undefined, { PLANS: JSON.stringify({ starter: { models: [MODEL], maxOutputTokens: 64 }, pro: {} }) });
      await create(h, {});
      await create(h, { max_output_tokens: 500 });
      await create(h, { max_output_tokens: 10 });
      const sent = h.upstream.requests.map((r) => (JSON.parse(r.body!) as Record<string, unknown>).max_output_tokens);
      expect(sent).to.deep.equal([64, 64, 10]);
    });
  });

  describe("stored responses belong to the customer that created them", () => {
    for (const [method, route] of STORED_ROUTES) {
      it(`${method} ${route}: another customer gets OpenAI's 404 for an unknown id and the upstream is never asked`, async () => {
        const h = harness();
        await create(h, {}, ALICE);
        const calls = h.upstream.requests.length;
        const response = await stored(h, method, route, "resp_1", BOB);
        expect(response.statusCode).to.equal(404);
        expect(JSON.parse(response.body)).to.deep.equal({ error: { message: "Response with id 'resp_1' not found.", type: "invalid_request_error", param: null, code: null } });
        expect(h.upstream.requests.length).to.equal(calls);
      });

      it(`${method} ${route}: the creator is proxied to the upstream's stored response`, async () => {
        const h = harness();
        await create(h, {}, ALICE);
        const response = await stored(h, method, route, "resp_1", ALICE);
        expect(response.statusCode).to.equal(200);
        const sent = h.upstream.requests[h.upstream.requests.length - 1];
        expect(sent.method).to.equal(method);
        expect(sent.path).to.equal(route.replace("/v1", "").replace("{id}", "resp_1"));
        const record = lastRecord(h);
        expect(record).to.include({ route, billed: false, status: 200 });
        expect(record.usage.total_tokens).to.equal(0);
      });
    }

    it("answers the same 404 for an id nobody recorded and for one of an unexpected shape (without a lookup)", async () => {
      const h = harness();
      expect((await stored(h, "GET", "/v1/responses/{id}", "resp_unknown", ALICE)).statusCode).to.equal(404);
      const lookups = h.owners.calls.lookup ?? 0;
      const odd = await stored(h, "GET", "/v1/responses/{id}", "resp/../../models", ALICE);
      expect(odd.statusCode).to.equal(404);
      expect(h.owners.calls.lookup ?? 0).to.equal(lookups);
      const long = "r".repeat(400);
      expect(JSON.parse((await stored(h, "GET", "/v1/responses/{id}", long, ALICE)).body).error.message).to.equal(`Response with id '${"r".repeat(256)}' not found.`);
      expect(h.upstream.requests).to.have.length(0);
    });

    it("answers 503 response_store_unavailable, not 404, when the store cannot answer, and asks the upstream nothing", async () => {
      const h = harness();
      await create(h, {}, ALICE);
      h.owners.fail.add("lookup");
      const calls = h.upstream.requests.length;
      const response = await stored(h, "GET", "/v1/responses/{id}", "resp_1", ALICE);
      expect(response.statusCode).to.equal(503);
      expect(JSON.parse(response.body).error).to.include({ code: "response_store_unavailable", type: "server_error" });
      const continued = await create(h, { previous_response_id: "resp_1" }, ALICE);
      expect(continued.statusCode).to.equal(503);
      expect(h.upstream.requests.length).to.equal(calls);
    });

    it("continues the caller's own response with previous_response_id and refuses another customer's with 400 previous_response_not_found", async () => {
      const h = harness();
      await create(h, {}, ALICE);
      const calls = h.upstream.requests.length;
      const refused = await create(h, { previous_response_id: "resp_1" }, BOB);
      expect(refused.statusCode).to.equal(400);
      expect(JSON.parse(refused.body)).to.deep.equal({
        error: { message: "Previous response with id 'resp_1' not found.", type: "invalid_request_error", param: "previous_response_id", code: "previous_response_not_found" },
      });
      expect(h.upstream.requests.length).to.equal(calls);
      const allowed = await create(h, { previous_response_id: "resp_1" }, ALICE);
      expect(allowed.statusCode).to.equal(200);
      expect(JSON.parse(h.upstream.requests[h.upstream.requests.length - 1].body!).previous_response_id).to.equal("resp_1");
    });

    it("passes only the known query parameters on, and refuses stream=true on retrieve", async () => {
      const h = harness();
      await create(h, {}, ALICE);
      await stored(h, "GET", "/v1/responses/{id}/input_items", "resp_1", ALICE, { limit: ["5"], order: ["asc"], after: ["msg_1"], "include[]": ["a", "b"], api_key: ["x"], starting_after: ["3"] });
      expect(h.upstream.requests[h.upstream.requests.length - 1].path).to.equal("/responses/resp_1/input_items?limit=5&order=asc&after=msg_1&include%5B%5D=a&include%5B%5D=b");
      await stored(h, "GET", "/v1/responses/{id}", "resp_1", ALICE, { include: ["reasoning.encrypted_content"], limit: ["5"] });
      expect(h.upstream.requests[h.upstream.requests.length - 1].path).to.equal("/responses/resp_1?include=reasoning.encrypted_content");
      await stored(h, "DELETE", "/v1/responses/{id}", "resp_1", ALICE, { include: ["x"] });
      expect(h.upstream.requests[h.upstream.requests.length - 1].path).to.equal("/responses/resp_1");
      const calls = h.upstream.requests.length;
      const streamed = await stored(h, "GET", "/v1/responses/{id}", "resp_1", ALICE, { stream: ["true"] });
      expect(streamed.statusCode).to.equal(400);
      expect(JSON.parse(streamed.body).error.param).to.equal("stream");
      expect(h.upstream.requests.length).to.equal(calls);
    });

    it("maps the upstream refusing the service's key on a stored response to 502, as for chat", async () => {
      const upstream = responsesUpstream();
      const h = harness(upstream);
      await create(h, {}, ALICE);
      const failing = new FakeUpstream(() => jsonResponse(401, { error: { message: "bad key", type: "invalid_request_error", param: null, code: "invalid_api_key" } }));
      h.deps.upstream = failing;
      const response = await stored(h, "GET", "/v1/responses/{id}", "resp_1", ALICE);
      expect(response.statusCode).to.equal(502);
      expect(JSON.parse(response.body).error.code).to.equal("upstream_auth_failed");
    });
  });

  describe("POST /v1/responses with stream: true", () => {
    it("relays the typed events and bills the usage of response.completed, cached and reasoning tokens kept", async () => {
      const h = harness();
      const response = await create(h, { stream: true });
      expect(response.statusCode).to.equal(200);
      expect(response.headers["Content-Type"]).to.match(/^text\/event-stream/);
      expect(response.body).to.include("event: response.created\n");
      expect(response.body).to.include("event: response.completed\n");
      const record = lastRecord(h);
      expect(record).to.include({ billed: true, streamed: true, usageEstimated: false });
      expect(record.usage).to.deep.equal({ prompt_tokens: 12, completion_tokens: 5, total_tokens: 17, cached_tokens: 4, reasoning_tokens: 2 });
      expect(toMoesifEvent(record, false).metadata).to.include({ cached_tokens: 4, reasoning_tokens: 2 });
    });

    it("records the owner before the first event carrying the id reaches the caller, and its context tokens once the usage is known", async () => {
      const h = harness();
      const responder = new CollectingResponder();
      const seenAtRecord: string[] = [];
      const record = h.owners.record.bind(h.owners);
      h.owners.record = async (owner: ResponseOwner, now: number) => {
        seenAtRecord.push(responder.response?.body ?? "");
        return record(owner, now);
      };
      await create(h, { stream: true }, ALICE, responder);
      expect(seenAtRecord).to.have.length(1);
      expect(seenAtRecord[0]).to.not.include("resp_1");
      expect(responder.response?.body).to.include("resp_1");
      expect(await h.owners.lookup("resp_1", Date.now())).to.deep.include({ customerId: "alice", contextTokens: 17 });
    });

    it("answers 503 response_store_unavailable and bills nothing when the owner cannot be recorded before the stream starts", async () => {
      const h = harness();
      h.owners.fail.add("record");
      const response = await create(h, { stream: true });
      expect(response.statusCode).to.equal(503);
      expect(JSON.parse(response.body).error.code).to.equal("response_store_unavailable");
      expect(response.body).to.not.include("resp_1");
      expect(lastRecord(h)).to.include({ billed: false, status: 503 });
    });

    it("redacts the upstream key an upstream echoes inside a response stream", async () => {
      const h = harness(responsesUpstream({ echoKey: true }));
      const response = await create(h, { stream: true });
      recordForScan("responses-core stream echo", [response.body, JSON.stringify(h.meter.records), ...h.logs]);
      expect(response.body).to.not.include(UPSTREAM_KEY);
      expect(JSON.stringify(h.meter.records)).to.not.include(UPSTREAM_KEY);
    });

    it("records no owner for a streamed response with store: false", async () => {
      const h = harness();
      await create(h, { stream: true, store: false });
      expect(h.owners.calls.record ?? 0).to.equal(0);
      expect(await h.owners.lookup("resp_1", Date.now())).to.equal(undefined);
    });
  });

  describe("prepaid", () => {
    const PRICE = { input: 1_000_000, output: 2_000_000 };
    const CAP = 40;
    const PLANS = { credits: { billing: "prepaid", maxOutputTokens: CAP, pricing: { currency: "usd", prices: { [MODEL]: PRICE } } } };

    /** A store that keeps every reservation it was asked for. */
    class WatchedStore extends MemoryCustomerStore {
      readonly reserved: number[] = [];
      override async reserve(args: Parameters<MemoryCustomerStore["reserve"]>[0]) {
        this.reserved.push(args.micros);
        return super.reserve(args);
      }
    }

    async function prepaid(balance: number, upstream: FakeUpstream = responsesUpstream()) {
      const store = new WatchedStore();
      store.putCustomer({ apiKeyId: "key-acme", customerId: "acme", plan: "credits", status: "active" });
      if (balance > 0) await store.credit({ customerId: "acme", currency: "usd", creditId: "test:acme", micros: balance, source: "cli", now: Date.now() });
      const meter = new RecordingMeter();
      const logs: string[] = [];
      const config = loadFunctionConfig({ UPSTREAM_API_KEY: UPSTREAM_KEY, CUSTOMERS_TABLE: "customers", PLANS: JSON.stringify(PLANS) });
      expect(config.problems).to.deep.equal([]);
      const base = fakeDeps({ config, upstream, meter, logs });
      const owners = new MemoryResponseOwners();
      const deps: CoreDeps = { ...base, store, customers: new CachedCustomerDirectory({ store, log: base.log, clock: Date.now }), responseOwners: owners };
      return { store, meter, deps, upstream, owners };
    }

    const body = (extra: Record<string, unknown> = {}) => ({ model: MODEL, input: "Tell me a story about a lighthouse.", ...extra });
    const send = (deps: CoreDeps, extra: Record<string, unknown> = {}) => handleRequest(proxyRequest({ route: "/v1/responses", apiKeyId: "key-acme", json: body(extra) }), deps);
    /** 12 input × 1 + 5 output × 2 micro-units: the upstream's usage at PRICE. */
    const COST = 12 * 1 + 5 * 2;

    for (const stream of [false, true]) {
      it(`reserves the input estimate plus the capped output and charges the exact usage (${stream ? "streamed" : "buffered"})`, async () => {
        const p = await prepaid(1_000);
        const response = await send(p.deps, stream ? { stream: true } : {});
        expect(response.statusCode).to.equal(200);
        const estimate = estimateResponsesInputTokens(capOutputTokens(body(stream ? { stream: true } : {}), CAP, RESPONSES_OUTPUT_FIELDS).request as never, MODEL);
        expect(p.store.reserved).to.deep.equal([maxCostOf(estimate, CAP, PRICE)]);
        expect(JSON.parse(p.upstream.requests[0].body!).max_output_tokens).to.equal(CAP);
        expect(p.store.account("acme")).to.deep.include({ balanceMicros: 1_000 - COST, reservedMicros: 0, holds: 0 });
        expect(p.store.violations).to.deep.equal([]);
      });
    }

    it("records a streamed response's context as its input plus the cap until its usage is known", async () => {
      const p = await prepaid(1_000);
      // The usage update is lost: what a continuation started during the stream would find.
      p.owners.fail.add("setContextTokens");
      const response = await send(p.deps, { stream: true });
      expect(response.statusCode).to.equal(200);
      const estimate = estimateResponsesInputTokens(capOutputTokens(body({ stream: true }), CAP, RESPONSES_OUTPUT_FIELDS).request as never, MODEL);
      expect((await p.owners.lookup("resp_1", Date.now()))!.contextTokens).to.equal(estimate + CAP);
      await send(p.deps, { previous_response_id: "resp_1" });
      expect(p.store.reserved[1]).to.be.greaterThan(maxCostOf(estimate, CAP, PRICE) + (estimate + CAP - 1) * PRICE.input / 1_000_000);
    });

    it("refuses, on a prepaid plan, an input file fetched by URL (its size is only known after the answer), without calling the upstream", async () => {
      const p = await prepaid(1_000_000);
      const input = [{ role: "user", content: [{ type: "input_text", text: "Summarise" }, { type: "input_file", file_url: "https://example.com/book.pdf" }] }];
      const response = await send(p.deps, { input });
      expect(response.statusCode).to.equal(400);
      expect(JSON.parse(response.body).error).to.include({ code: "unsupported_parameter", param: "input[0].content[1].file_url" });
      expect(p.upstream.requests).to.have.length(0);
      expect(p.store.reserved).to.deep.equal([]);
    });

    it("counts the previous response's context tokens in the reservation of a continuation", async () => {
      const p = await prepaid(1_000);
      await send(p.deps);
      const context = (await p.owners.lookup("resp_1", Date.now()))!.contextTokens!;
      expect(context).to.equal(17);
      await send(p.deps, { previous_response_id: "resp_1" });
      const estimate = estimateResponsesInputTokens(capOutputTokens(body({ previous_response_id: "resp_1" }), CAP, RESPONSES_OUTPUT_FIELDS).request as never, MODEL);
      expect(p.store.reserved[1]).to.equal(maxCostOf(estimate + context, CAP, PRICE));
      expect(p.store.account("acme")).to.deep.include({ balanceMicros: 1_000 - 2 * COST, reservedMicros: 0 });
    });

    it("answers 429 insufficient_quota without calling the upstream when the balance does not cover the reservation", async () => {
      const p = await prepaid(10);
      const response = await send(p.deps);
      expect(response.statusCode).to.equal(429);
      expect(JSON.parse(response.body).error.message).to.include("max_output_tokens");
      expect(p.upstream.requests).to.have.length(0);
      expect(p.store.account("acme").balanceMicros).to.equal(10);
    });
  });

  describe("the adapter (toProxyRequest) on templated routes", () => {
    function event(overrides: Partial<APIGatewayProxyEvent>): APIGatewayProxyEvent {
      const base = createApiGatewayEvent({ resource: "/v1/responses/{id}/input_items", method: "GET", body: undefined, stage: "prod" });
      return { ...base, path: "/v1/responses/resp_9/input_items", requestContext: { ...base.requestContext, domainName: "abc123.execute-api.us-east-1.amazonaws.com" }, ...overrides };
    }

    it("keeps the resource template as the route and the actual path in the metered URI", () => {
      const request = toProxyRequest(event({ path: "/v1/responses/resp_9/input_items", pathParameters: { id: "resp_9" } }), createContext());
      expect(request.route).to.equal("/v1/responses/{id}/input_items");
      expect(request.uri).to.equal("https://abc123.execute-api.us-east-1.amazonaws.com/prod/v1/responses/resp_9/input_items");
      expect(request.pathParameters).to.deep.equal({ id: "resp_9" });
    });

    it("reads every value of a repeated query parameter, falling back to the single-value map", () => {
      const multi = toProxyRequest(event({ multiValueQueryStringParameters: { "include[]": ["a", "b"], limit: ["3"] }, queryStringParameters: { "include[]": "b", limit: "3" } }), createContext());
      expect(multi.query).to.deep.equal({ "include[]": ["a", "b"], limit: ["3"] });
      const single = toProxyRequest(event({ multiValueQueryStringParameters: null, queryStringParameters: { limit: "3" } }), createContext());
      expect(single.query).to.deep.equal({ limit: ["3"] });
      const none = toProxyRequest(event({}), createContext());
      expect(none.query).to.equal(undefined);
      expect(none.pathParameters).to.equal(undefined);
    });

    it("strips the stage from a path that carries it", () => {
      const request = toProxyRequest(event({ path: "/prod/v1/responses/resp_9/input_items" }), createContext());
      expect(request.uri).to.equal("https://abc123.execute-api.us-east-1.amazonaws.com/prod/v1/responses/resp_9/input_items");
    });
  });

  describe("configuration", () => {
    it("keeps owners in memory without RESPONSES_TABLE (and says so once) and uses the table with it", () => {
      const lines: string[] = [];
      const memory = createDeps(testEnv(), { write: (line) => lines.push(line) });
      expect(memory.responseOwners).to.be.instanceOf(MemoryResponseOwners);
      expect(lines.filter((line) => line.includes("response_owners_in_memory"))).to.have.length(1);
      const table = createDeps(testEnv({ RESPONSES_TABLE: "responses", AWS_REGION: "us-east-1" }), { write: () => undefined });
      expect(table.responseOwners).to.be.instanceOf(DynamoResponseOwners);
      (table.responseOwners as DynamoResponseOwners).destroy();
    });

    it("reads RESPONSES_TABLE and RESPONSES_TIMEOUT_MS, the timeout defaulting to CUSTOMERS_TIMEOUT_MS", () => {
      expect(loadFunctionConfig(testEnv()).responseOwners).to.deep.equal({ table: undefined, timeoutMs: 1000 });
      expect(loadFunctionConfig(testEnv({ RESPONSES_TABLE: "responses", CUSTOMERS_TIMEOUT_MS: "700" })).responseOwners).to.deep.equal({ table: "responses", timeoutMs: 700 });
      expect(loadFunctionConfig(testEnv({ RESPONSES_TABLE: "responses", RESPONSES_TIMEOUT_MS: "300" })).responseOwners).to.deep.equal({ table: "responses", timeoutMs: 300 });
      expect(loadFunctionConfig(testEnv({ RESPONSES_TIMEOUT_MS: "-1" })).problems.join()).to.match(/RESPONSES_TIMEOUT_MS/);
    });

    it("keeps the responses table's write alongside metering: it counts in the reserve only when it is the longer one", () => {
      expect(meteringReserveMs(loadFunctionConfig(testEnv({ METERING_TIMEOUT_MS: "500" })))).to.equal(500);
      expect(meteringReserveMs(loadFunctionConfig(testEnv({ METERING_TIMEOUT_MS: "500", RESPONSES_TABLE: "r", RESPONSES_TIMEOUT_MS: "300" })))).to.equal(500);
      expect(meteringReserveMs(loadFunctionConfig(testEnv({ METERING_TIMEOUT_MS: "500", RESPONSES_TABLE: "r", RESPONSES_TIMEOUT_MS: "900" })))).to.equal(900);
    });
  });
});
