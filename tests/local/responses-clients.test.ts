import { createOpenAI } from "@ai-sdk/openai";
import { APICallError, generateText, streamText } from "ai";
import { expect } from "chai";
import { execFile } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import OpenAI from "openai";
import type { LedgerItem } from "../../functions/shared/ledger-schema";
import type { LocalStack } from "../../scripts/local/stack";
import { topUp } from "../evidence/prepaid-fixture";
import { ledgerItems, useLocalStack, waitUntil } from "../helpers/local-project";
import { recordForScan } from "../helpers/secret-scan";
import { reportedUsage, tapUpstream, type ReportedUsage, type UpstreamExchange } from "../helpers/upstream-tap";
import { upstreamStream, waitFor } from "./streaming-helpers";

/**
 * A postpaid plan serving a chat model and an embeddings model (a billing plan serves exactly its priced models),
 * one whose list names only the chat model, one with no list (every model: the upstream's own model objects), and a
 * prepaid plan with an output cap. Each concern below has its own customers, so the usage report's rows of one are
 * not mixed with another's requests.
 */
const STACK_YAML = `
config:
  metered-ai-api:stageName: beta
  metered-ai-api:plans:
    open:
      rateLimit: 10000
      burstLimit: 5000
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
        text-embedding-3-small: { input: 0.02, output: 0 }
    narrow:
      rateLimit: 10000
      burstLimit: 5000
      models: [gpt-4o-mini]
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
    free:
      rateLimit: 10000
      burstLimit: 5000
    credits:
      rateLimit: 10000
      burstLimit: 5000
      billing: prepaid
      currency: usd
      maxOutputTokens: 64
      prices:
        gpt-4o-mini: { input: 2.5, output: 10 }
        text-embedding-3-small: { input: 100, output: 0 }
  metered-ai-api:customers:
    vercel: { plan: open, stripeCustomerId: cus_vercel }
    sdk: { plan: open, stripeCustomerId: cus_sdk }
    owner: { plan: open, stripeCustomerId: cus_owner }
    intruder: { plan: open, stripeCustomerId: cus_intruder }
    leaver: { plan: open, stripeCustomerId: cus_leaver }
    narrow: { plan: narrow, stripeCustomerId: cus_narrow }
    free: { plan: free }
    payg: { plan: credits }
    broke: { plan: credits }
`;

/** The prices above in micro-units per 1,000,000 tokens (1 USD = 1,000,000 micro-units), written out independently. */
const PRICES: Record<string, Record<string, { input: number; output: number }>> = {
  open: { "gpt-4o-mini": { input: 150_000, output: 600_000 }, "text-embedding-3-small": { input: 20_000, output: 0 } },
  credits: { "gpt-4o-mini": { input: 2_500_000, output: 10_000_000 }, "text-embedding-3-small": { input: 100_000_000, output: 0 } },
};
/** The documented rounding: the exact cost rounded up to a whole micro-unit once (functions/shared/pricing.ts `costOf`). */
const cost = (usage: ReportedUsage, price: { input: number; output: number }) => Math.ceil((usage.prompt_tokens * price.input + usage.completion_tokens * price.output) / 1_000_000);

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, "../..");
const TS_NODE = [path.join(ROOT, "node_modules/ts-node/dist/bin.js"), "--transpile-only"];

let counter = 0;
/** A text no other request sends: the model server's records are found by it. */
const unique = (label: string) => `${label} #${++counter} ${Date.now()}`;

interface ReportRow {
  customer: string;
  model: string;
  requests: number;
  billed_requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  estimated_requests: number;
  cost_micros: number | null;
}

describe("Responses API, embeddings and model retrieval through the local stack, with the openai SDK and the Vercel AI SDK", function () {
  this.timeout(60_000);
  const local = useLocalStack("responses-clients", {}, STACK_YAML);
  let stack: LocalStack;
  /** What the model server wrote back for every request it was asked (see `tapUpstream`). */
  let tap: UpstreamExchange[];
  /** What the clients were answered: scanned for secrets with the rest of the suite. */
  const answers: string[] = [];
  /** Per `customer/model`: requests sent that reached the function, and the upstream's reported token sums. */
  const expected: Record<string, { requests: number; prompt_tokens: number; completion_tokens: number }> = {};
  /** Per `customer/model`: the sum of each billed request's cost at the plan's price, from the upstream's usage. */
  const expectedCost: Record<string, number> = {};

  before(() => {
    stack = local.stack;
    tap = tapUpstream(stack.upstream!);
  });
  after(() => {
    recordForScan("responses-clients answers", answers);
    // The upstream must see the service's key, never a customer's.
    recordForScan("responses-clients upstream requests", stack.upstream?.received.map((r) => JSON.stringify(r)) ?? []);
  });

  const sdk = (customer: string, options: ConstructorParameters<typeof OpenAI>[0] = {}) =>
    new OpenAI({ baseURL: `${stack.baseUrl}/v1`, apiKey: stack.apiKeys[customer], maxRetries: 0, ...options });

  /** Counts one request of `customer` on `model` in the expected report, with the upstream's usage when it had one. */
  function count(customer: string, model: string, usage: ReportedUsage = { prompt_tokens: 0, completion_tokens: 0 }): void {
    const row = (expected[`${customer}/${model}`] ??= { requests: 0, prompt_tokens: 0, completion_tokens: 0 });
    row.requests += 1;
    row.prompt_tokens += usage.prompt_tokens;
    row.completion_tokens += usage.completion_tokens;
    if (usage.prompt_tokens + usage.completion_tokens > 0) {
      const plan = customer === "payg" ? "credits" : "open";
      expectedCost[`${customer}/${model}`] = (expectedCost[`${customer}/${model}`] ?? 0) + cost(usage, PRICES[plan][model]);
    }
  }

  /** The one upstream exchange on `route` (e.g. "/v1/responses") whose request body contains `marker`. */
  function exchangeWith(marker: string, route = "/v1/responses"): UpstreamExchange {
    const found = tap.filter((e) => e.url.split("?")[0] === route && e.request.includes(marker));
    if (found.length !== 1) throw new Error(`expected one upstream ${route} request containing ${JSON.stringify(marker)}, found ${found.length}`);
    return found[0];
  }

  /** The ledger item of a request (API Gateway's request id, echoed as x-amzn-RequestId), once written. */
  async function ledgerOf(requestId: string | null | undefined): Promise<LedgerItem> {
    if (!requestId) throw new Error("the answer carried no x-amzn-requestid");
    return waitUntil(`the ledger item of ${requestId}`, async () => (await ledgerItems(stack)).find((i) => i.request_id === requestId), 10_000);
  }

  /** Asserts a billed item carries the upstream's usage, unestimated, under `route`. */
  function expectBilled(item: LedgerItem, route: string, usage: ReportedUsage, customer: string, model: string): void {
    const plan = customer === "payg" ? "credits" : "open";
    expect(item, `ledger item ${item.request_id}`).to.include({
      cost_micros: cost(usage, PRICES[plan][model]),
      route,
      customer_id: customer,
      model,
      prompt_tokens: usage.prompt_tokens,
      completion_tokens: usage.completion_tokens,
      total_tokens: usage.prompt_tokens + usage.completion_tokens,
      usage_estimated: false,
      billed: true,
    });
  }

  /** Runs `call`, which must fail; returns what it threw and how many requests the model server received meanwhile. */
  async function refused(call: () => Promise<unknown>): Promise<{ error: InstanceType<typeof OpenAI.APIError>; upstreamAsked: number }> {
    const before = stack.upstream!.received.length;
    const outcome = await call().then(
      (value) => ({ value }),
      (error: unknown) => ({ error }),
    );
    if (!("error" in outcome)) throw new Error(`the call succeeded: ${JSON.stringify(outcome.value).slice(0, 300)}`);
    expect(outcome.error).to.be.instanceOf(OpenAI.APIError);
    const error = outcome.error as InstanceType<typeof OpenAI.APIError>;
    answers.push(JSON.stringify(error.error ?? null), error.message);
    return { error, upstreamAsked: stack.upstream!.received.length - before };
  }

  describe("the Vercel AI SDK's default OpenAI provider (POST /v1/responses)", () => {
    const provider = (options: Parameters<typeof createOpenAI>[0] = {}) => createOpenAI({ baseURL: `${stack.baseUrl}/v1`, apiKey: stack.apiKeys.vercel, ...options });

    it("generateText with the key as apiKey (Authorization: Bearer): the model server's text, and the usage it reports is the upstream's and the ledger's", async () => {
      const said = unique("vercel generate");
      const result = await generateText({ model: provider()("gpt-4o-mini"), prompt: said, maxRetries: 0 });
      answers.push(JSON.stringify(result.response.body ?? null));
      expect(result.text).to.equal(`Hello! You said: ${said}`);
      const upstream = reportedUsage(exchangeWith(said));
      expect({ prompt_tokens: result.usage.inputTokens, completion_tokens: result.usage.outputTokens }).to.deep.equal(upstream);
      expectBilled(await ledgerOf(result.response.headers?.["x-amzn-requestid"]), "/v1/responses", upstream, "vercel", "gpt-4o-mini");
      // The upstream got the service's key, not the customer's.
      const asked = stack.upstream!.received.find((r) => r.body.includes(said))!;
      expect(asked.headers.authorization).to.not.include(stack.apiKeys.vercel);
      count("vercel", "gpt-4o-mini", upstream);
    });

    it("generateText with the key in an x-api-key header (apiKey a placeholder) is served and billed the same way", async () => {
      const said = unique("vercel x-api-key");
      const result = await generateText({ model: provider({ apiKey: "placeholder", headers: { "x-api-key": stack.apiKeys.vercel } })("gpt-4o-mini"), prompt: said, maxRetries: 0 });
      expect(result.text).to.equal(`Hello! You said: ${said}`);
      const upstream = reportedUsage(exchangeWith(said));
      expect({ prompt_tokens: result.usage.inputTokens, completion_tokens: result.usage.outputTokens }).to.deep.equal(upstream);
      expectBilled(await ledgerOf(result.response.headers?.["x-amzn-requestid"]), "/v1/responses", upstream, "vercel", "gpt-4o-mini");
      count("vercel", "gpt-4o-mini", upstream);
    });

    it("streamText streams the model server's words without an error part; its usage is the upstream's response.completed usage and the ledger's", async () => {
      const said = unique("vercel stream");
      const result = streamText({ model: provider()("gpt-4o-mini"), prompt: said, maxRetries: 0 });
      const parts: Array<{ type: string }> = [];
      for await (const part of result.fullStream) parts.push(part);
      expect(parts.filter((p) => p.type === "error")).to.deep.equal([]);
      const text = await result.text;
      answers.push(text);
      expect(text).to.equal(`Hello! You said: ${said}`);
      const exchange = exchangeWith(said);
      expect(exchange.request).to.include('"stream":true');
      const upstream = reportedUsage(exchange);
      const usage = await result.usage;
      expect({ prompt_tokens: usage.inputTokens, completion_tokens: usage.outputTokens }).to.deep.equal(upstream);
      const item = await ledgerOf((await result.response).headers?.["x-amzn-requestid"]);
      expectBilled(item, "/v1/responses", upstream, "vercel", "gpt-4o-mini");
      expect(item).to.include({ streamed: true, client_disconnected: false });
      count("vercel", "gpt-4o-mini", upstream);
    });
  });

  describe("the official openai SDK", () => {
    let created: OpenAI.Responses.Response;
    let createdUsage: ReportedUsage;

    it("responses.create: the model server's Response, billed at its usage under /v1/responses", async () => {
      const said = unique("sdk create");
      const { data, response } = await sdk("sdk").responses.create({ model: "gpt-4o-mini", input: [{ role: "user", content: "first" }, { role: "user", content: said }] }).withResponse();
      answers.push(JSON.stringify(data));
      created = data;
      expect(data.object).to.equal("response");
      expect(data.output_text).to.equal(`Hello! You said: ${said}`);
      const exchange = exchangeWith(said);
      createdUsage = reportedUsage(exchange);
      expect(data.id).to.equal((JSON.parse(exchange.response) as { id: string }).id);
      expectBilled(await ledgerOf(response.headers.get("x-amzn-requestid")), "/v1/responses", createdUsage, "sdk", "gpt-4o-mini");
      count("sdk", "gpt-4o-mini", createdUsage);
    });

    it("responses.create with stream: true: typed events ending in response.completed, whose usage is the upstream's and the ledger's", async () => {
      const said = unique("sdk stream");
      const { data: stream, response } = await sdk("sdk").responses.create({ model: "gpt-4o-mini", input: said, stream: true }).withResponse();
      const events: OpenAI.Responses.ResponseStreamEvent[] = [];
      for await (const event of stream) events.push(event);
      answers.push(JSON.stringify(events));
      expect(events[0].type).to.equal("response.created");
      const last = events[events.length - 1];
      expect(last.type).to.equal("response.completed");
      const completed = (last as OpenAI.Responses.ResponseCompletedEvent).response;
      expect(completed.output_text ?? (completed.output[0] as OpenAI.Responses.ResponseOutputMessage).content.map((c) => (c as { text: string }).text).join("")).to.equal(`Hello! You said: ${said}`);
      const deltas = events.filter((e): e is OpenAI.Responses.ResponseTextDeltaEvent => e.type === "response.output_text.delta").map((e) => e.delta);
      expect(deltas.join("")).to.equal(`Hello! You said: ${said}`);
      const upstream = reportedUsage(exchangeWith(said));
      expect({ prompt_tokens: completed.usage!.input_tokens, completion_tokens: completed.usage!.output_tokens }).to.deep.equal(upstream);
      const item = await ledgerOf(response.headers.get("x-amzn-requestid"));
      expectBilled(item, "/v1/responses", upstream, "sdk", "gpt-4o-mini");
      expect(item.streamed).to.equal(true);
      count("sdk", "gpt-4o-mini", upstream);
    });

    it("responses.retrieve and responses.inputItems.list: the stored response and its input, counted at 0 tokens under their route templates", async () => {
      const { data: retrieved, response } = await sdk("sdk").responses.retrieve(created.id).withResponse();
      answers.push(JSON.stringify(retrieved));
      expect(retrieved.id).to.equal(created.id);
      expect(retrieved.output_text).to.equal(created.output_text);
      expect({ prompt_tokens: retrieved.usage!.input_tokens, completion_tokens: retrieved.usage!.output_tokens }).to.deep.equal(createdUsage);
      expect(await ledgerOf(response.headers.get("x-amzn-requestid"))).to.include({ route: "/v1/responses/{id}", method: "GET", customer_id: "sdk", model: "gpt-4o-mini", prompt_tokens: 0, completion_tokens: 0, billed: false });
      count("sdk", "gpt-4o-mini");

      const page = await sdk("sdk").responses.inputItems.list(created.id, { order: "asc" }).withResponse();
      const texts = page.data.data.map((item) => ((item as OpenAI.Responses.ResponseInputMessageItem).content[0] as { text: string }).text);
      expect(texts).to.deep.equal(["first", created.output_text.slice("Hello! You said: ".length)]);
      const asked = tap[tap.length - 1];
      expect(`${asked.method} ${asked.url}`).to.equal(`GET /v1/responses/${created.id}/input_items?order=asc`);
      expect(await ledgerOf(page.response.headers.get("x-amzn-requestid"))).to.include({ route: "/v1/responses/{id}/input_items", method: "GET", customer_id: "sdk", prompt_tokens: 0, billed: false });
      count("sdk", "gpt-4o-mini");
    });

    it("responses.create with previous_response_id continues the caller's own response, billed at the upstream's usage (the context counted as input)", async () => {
      const said = unique("sdk continue");
      const { data, response } = await sdk("sdk").responses.create({ model: "gpt-4o-mini", input: said, previous_response_id: created.id }).withResponse();
      expect(data.previous_response_id).to.equal(created.id);
      const exchange = exchangeWith(said);
      expect((JSON.parse(exchange.request) as { previous_response_id: string }).previous_response_id).to.equal(created.id);
      const upstream = reportedUsage(exchange);
      // The model server counts the previous response's input and output as input again: more than the new text alone.
      expect(upstream.prompt_tokens).to.be.greaterThan(createdUsage.prompt_tokens + createdUsage.completion_tokens);
      expectBilled(await ledgerOf(response.headers.get("x-amzn-requestid")), "/v1/responses", upstream, "sdk", "gpt-4o-mini");
      count("sdk", "gpt-4o-mini", upstream);
    });

    it("responses.delete deletes it upstream (DELETE /v1/responses/{id}); retrieving it afterwards is the upstream's 404", async () => {
      const { response } = await sdk("sdk").responses.delete(created.id).withResponse();
      expect(stack.upstream!.responses.has(created.id)).to.equal(false);
      expect(await ledgerOf(response.headers.get("x-amzn-requestid"))).to.include({ route: "/v1/responses/{id}", method: "DELETE", customer_id: "sdk", prompt_tokens: 0, billed: false });
      count("sdk", "gpt-4o-mini");
      const { error, upstreamAsked } = await refused(() => sdk("sdk").responses.retrieve(created.id));
      expect(error).to.be.instanceOf(OpenAI.NotFoundError);
      expect(upstreamAsked).to.equal(1);
      count("sdk", "gpt-4o-mini");
    });

    it("embeddings.create, default base64 and encoding_format float: the same vectors, billed at the upstream's prompt_tokens and 0 completion under /v1/embeddings", async () => {
      const words = unique("embed");
      const { data: base64, response: first } = await sdk("sdk").embeddings.create({ model: "text-embedding-3-small", input: [words, "second input"] }).withResponse();
      const base64Exchange = exchangeWith(words, "/v1/embeddings");
      expect(base64Exchange.request).to.include('"encoding_format":"base64"');
      const { data: float, response: second } = await sdk("sdk").embeddings.create({ model: "text-embedding-3-small", input: [words, "second input"], encoding_format: "float" }).withResponse();
      answers.push(JSON.stringify(base64), JSON.stringify(float));
      const floatExchange = tap[tap.length - 1];
      expect(floatExchange.request).to.include('"encoding_format":"float"');
      const upstreamFloat = (JSON.parse(floatExchange.response) as { data: Array<{ embedding: number[] }> }).data.map((d) => d.embedding);
      expect(float.data.map((d) => d.embedding)).to.deep.equal(upstreamFloat);
      expect(base64.data.map((d) => Array.from(d.embedding))).to.deep.equal(upstreamFloat);
      expect(upstreamFloat[0]).to.not.deep.equal(upstreamFloat[1]);
      for (const [response, exchange] of [
        [first, base64Exchange],
        [second, floatExchange],
      ] as const) {
        const upstream = reportedUsage(exchange);
        expect(upstream.completion_tokens).to.equal(0);
        expect(upstream.prompt_tokens).to.be.greaterThan(0);
        expectBilled(await ledgerOf(response.headers.get("x-amzn-requestid")), "/v1/embeddings", upstream, "sdk", "text-embedding-3-small");
        count("sdk", "text-embedding-3-small", upstream);
      }
      expect(float.usage.prompt_tokens).to.equal(reportedUsage(floatExchange).prompt_tokens);
    });

    it("models.retrieve: a model the plan serves is its object (without asking the upstream); one it does not is NotFoundError 404 model_not_found", async () => {
      const before = stack.upstream!.received.length;
      const { data: model, response } = await sdk("sdk").models.retrieve("gpt-4o-mini").withResponse();
      expect(model).to.deep.equal({ id: "gpt-4o-mini", object: "model", created: 0, owned_by: "metered-ai-api" });
      expect(stack.upstream!.received.length).to.equal(before);
      expect(await ledgerOf(response.headers.get("x-amzn-requestid"))).to.include({ route: "/v1/models/{model}", method: "GET", customer_id: "sdk", model: "gpt-4o-mini", prompt_tokens: 0, completion_tokens: 0, billed: false });
      count("sdk", "gpt-4o-mini");

      // gpt-4o is a model the upstream serves, but not one this plan prices.
      const { error, upstreamAsked } = await refused(() => sdk("sdk").models.retrieve("gpt-4o"));
      expect(error).to.be.instanceOf(OpenAI.NotFoundError);
      expect(error.status).to.equal(404);
      expect(error.code).to.equal("model_not_found");
      expect(upstreamAsked).to.equal(0);
      const item = await ledgerOf(error.headers?.get("x-amzn-requestid"));
      expect(item).to.include({ route: "/v1/models/{model}", status: 404, customer_id: "sdk", prompt_tokens: 0, billed: false });
      count("sdk", item.model ?? "-");
    });

    it("models.retrieve on a plan with no model list is the upstream's own object, or its 404", async () => {
      const model = await sdk("free").models.retrieve("gpt-4o");
      expect(model).to.deep.equal({ id: "gpt-4o", object: "model", created: 1700000000, owned_by: "mock" });
      const { error, upstreamAsked } = await refused(() => sdk("free").models.retrieve("no-such-model"));
      expect(error).to.be.instanceOf(OpenAI.NotFoundError);
      expect(error.code).to.equal("model_not_found");
      expect(upstreamAsked).to.equal(1);
    });
  });

  describe("ownership of stored responses", () => {
    let mine: OpenAI.Responses.Response;
    let mineStreamed: string;

    before(async () => {
      mine = await sdk("owner").responses.create({ model: "gpt-4o-mini", input: [{ role: "user", content: "alpha" }, { role: "user", content: unique("owned") }] });
      const stream = await sdk("owner").responses.create({ model: "gpt-4o-mini", input: unique("owned stream"), stream: true });
      for await (const event of stream) if (event.type === "response.completed") mineStreamed = event.response.id;
    });

    it("another customer cannot retrieve, list the input items of, continue, cancel or delete it: OpenAI's not-found answers, and the upstream is never asked", async () => {
      const intruder = sdk("intruder");
      const beforeUpstream = stack.upstream!.received.length;
      const beforeTap = tap.length;
      const notFound = (id: string) => ({ message: `Response with id '${id}' not found.`, type: "invalid_request_error", param: null, code: null });

      for (const id of [mine.id, mineStreamed]) {
        for (const [what, call] of [
          ["retrieve", () => intruder.responses.retrieve(id)],
          ["input items", () => intruder.responses.inputItems.list(id)],
          ["cancel", () => intruder.responses.cancel(id)],
          ["delete", () => intruder.responses.delete(id)],
        ] as const) {
          const { error, upstreamAsked } = await refused(call);
          expect(error, what).to.be.instanceOf(OpenAI.NotFoundError);
          expect(error.error, what).to.deep.equal(notFound(id));
          expect(upstreamAsked, what).to.equal(0);
        }
        for (const stream of [false, true]) {
          const { error, upstreamAsked } = await refused(() => intruder.responses.create({ model: "gpt-4o-mini", input: "continue theirs", previous_response_id: id, stream }));
          expect(error).to.be.instanceOf(OpenAI.BadRequestError);
          expect(error.error).to.deep.equal({ message: `Previous response with id '${id}' not found.`, type: "invalid_request_error", param: "previous_response_id", code: "previous_response_not_found" });
          expect(upstreamAsked).to.equal(0);
        }
      }
      // Exactly what an id nobody created gets: nothing tells the intruder the id exists.
      const nobody = "resp_mock_00000000_999999";
      expect((await refused(() => intruder.responses.retrieve(nobody))).error.error).to.deep.equal(notFound(nobody));

      expect(stack.upstream!.received.length - beforeUpstream).to.equal(0);
      expect(tap.length - beforeTap).to.equal(0);
      expect(stack.upstream!.received.filter((r) => r.url.includes(mine.id) || r.url.includes(mineStreamed) || r.body.includes(mine.id) || r.body.includes(mineStreamed))).to.deep.equal([]);
      expect(stack.upstream!.responses.has(mine.id)).to.equal(true);
      expect(stack.upstream!.responses.has(mineStreamed)).to.equal(true);

      // Counted against the intruder at 0 tokens, under the route templates; none billed.
      const items = await waitUntil("the intruder's 13 ledger items", async () => {
        const found = (await ledgerItems(stack)).filter((i) => i.customer_id === "intruder");
        return found.length >= 13 ? found : undefined;
      });
      expect(items.map((i) => `${i.method} ${i.route} ${i.status}`).sort()).to.deep.equal(
        [
          ...[1, 2, 3].map(() => "GET /v1/responses/{id} 404"),
          ...[1, 2].map(() => "GET /v1/responses/{id}/input_items 404"),
          ...[1, 2].map(() => "POST /v1/responses/{id}/cancel 404"),
          ...[1, 2].map(() => "DELETE /v1/responses/{id} 404"),
          ...[1, 2, 3, 4].map(() => "POST /v1/responses 400"),
        ].sort(),
      );
      expect(items.filter((i) => i.billed || i.prompt_tokens !== 0 || i.completion_tokens !== 0)).to.deep.equal([]);
    });

    it("the owner can still do all of it afterwards, each request reaching the upstream", async () => {
      const owner = sdk("owner");
      const retrieved = await owner.responses.retrieve(mine.id);
      expect(retrieved.output_text).to.equal(mine.output_text);
      expect((await owner.responses.retrieve(mineStreamed)).id).to.equal(mineStreamed);
      const items = await owner.responses.inputItems.list(mine.id, { order: "asc" });
      expect(items.data.map((i) => ((i as OpenAI.Responses.ResponseInputMessageItem).content[0] as { text: string }).text)[0]).to.equal("alpha");

      const said = unique("owner continues");
      const continued = await owner.responses.create({ model: "gpt-4o-mini", input: said, previous_response_id: mine.id });
      expect(continued.previous_response_id).to.equal(mine.id);
      expect(JSON.parse(exchangeWith(said).request)).to.include({ previous_response_id: mine.id });

      // The model server refuses to cancel a synchronous response: its answer proves the request reached it.
      const { error, upstreamAsked } = await refused(() => owner.responses.cancel(mine.id));
      expect(error).to.be.instanceOf(OpenAI.BadRequestError);
      expect(error.error).to.deep.equal({ message: "Cannot cancel a synchronous response.", type: "invalid_request_error", param: null, code: null });
      expect(upstreamAsked).to.equal(1);

      await owner.responses.delete(mine.id);
      await owner.responses.delete(mineStreamed);
      expect(stack.upstream!.responses.has(mine.id)).to.equal(false);
      expect(stack.upstream!.responses.has(mineStreamed)).to.equal(false);
      const asked = tap.map((e) => `${e.method} ${e.url}`);
      for (const line of [`GET /v1/responses/${mine.id}`, `GET /v1/responses/${mine.id}/input_items?order=asc`, `POST /v1/responses/${mine.id}/cancel`, `DELETE /v1/responses/${mine.id}`, `DELETE /v1/responses/${mineStreamed}`]) {
        expect(asked).to.include(line);
      }
    });
  });

  describe("the plan's model list", () => {
    it("refuses a model the plan does not serve with 404 model_not_found on /v1/responses and /v1/embeddings, without asking the upstream", async () => {
      const client = sdk("narrow");
      for (const call of [
        () => client.responses.create({ model: "gpt-4o", input: "not mine" }),
        () => client.responses.create({ model: "gpt-4o", input: "not mine", stream: true }),
        () => client.embeddings.create({ model: "text-embedding-3-small", input: "not mine" }),
      ]) {
        const { error, upstreamAsked } = await refused(call);
        expect(error).to.be.instanceOf(OpenAI.NotFoundError);
        expect(error.code).to.equal("model_not_found");
        expect(upstreamAsked).to.equal(0);
      }
      // The Vercel provider gets the same 404.
      const before = stack.upstream!.received.length;
      const failure = await generateText({ model: createOpenAI({ baseURL: `${stack.baseUrl}/v1`, apiKey: stack.apiKeys.narrow })("gpt-4o"), prompt: "not mine", maxRetries: 0 }).catch((err: unknown) => err);
      expect(APICallError.isInstance(failure)).to.equal(true);
      expect((failure as APICallError).statusCode).to.equal(404);
      expect(stack.upstream!.received.length).to.equal(before);
      // And the model it does serve is served.
      expect((await client.responses.create({ model: "gpt-4o-mini", input: "mine" })).output_text).to.equal("Hello! You said: mine");
      expect((await refused(() => client.models.retrieve("text-embedding-3-small"))).error.code).to.equal("model_not_found");
    });
  });

  describe("prepaid", () => {
    /** Waits until the customer's balance has no open hold; returns the balance. */
    const settled = (customer: string) =>
      waitUntil(`${customer}'s holds to settle`, async () => {
        const account = await stack.customers.store.getBalance(customer);
        return account.reservedMicros === 0 ? account.balanceMicros : undefined;
      });

    it("a responses.create and an embeddings.create each take exactly the ledger's cost from the balance: the upstream's usage at the plan's price", async () => {
      await topUp(stack.customers.store, "payg", 1_000_000);
      let balance = await settled("payg");
      expect(balance).to.equal(1_000_000);

      const said = unique("prepaid response");
      const { data, response } = await sdk("payg").responses.create({ model: "gpt-4o-mini", input: said }).withResponse();
      expect(data.output_text).to.equal(`Hello! You said: ${said}`);
      const exchange = exchangeWith(said);
      // The plan's output cap went upstream.
      expect(JSON.parse(exchange.request)).to.include({ max_output_tokens: 64 });
      const usage = reportedUsage(exchange);
      const item = await ledgerOf(response.headers.get("x-amzn-requestid"));
      expectBilled(item, "/v1/responses", usage, "payg", "gpt-4o-mini");
      const responseCost = cost(usage, PRICES.credits["gpt-4o-mini"]);
      expect(responseCost).to.be.greaterThan(0);
      expect(item).to.include({ billing_mode: "prepaid", cost_micros: responseCost, charged_micros: responseCost, shortfall_micros: 0 });
      let after = await settled("payg");
      expect(balance - after).to.equal(responseCost);
      balance = after;
      count("payg", "gpt-4o-mini", usage);

      const words = unique("prepaid embed");
      const embedded = await sdk("payg").embeddings.create({ model: "text-embedding-3-small", input: words }).withResponse();
      const embedUsage = reportedUsage(exchangeWith(words, "/v1/embeddings"));
      const embedItem = await ledgerOf(embedded.response.headers.get("x-amzn-requestid"));
      expectBilled(embedItem, "/v1/embeddings", embedUsage, "payg", "text-embedding-3-small");
      const embedCost = cost(embedUsage, PRICES.credits["text-embedding-3-small"]);
      expect(embedItem).to.include({ billing_mode: "prepaid", cost_micros: embedCost, charged_micros: embedCost });
      after = await settled("payg");
      expect(balance - after).to.equal(embedCost);
      count("payg", "text-embedding-3-small", embedUsage);
      expect(after).to.equal(1_000_000 - responseCost - embedCost);
    });

    it("with a zero balance both are refused with 429 insufficient_quota, once (the SDK does not retry), and the upstream is never asked", async () => {
      expect(await settled("broke")).to.equal(0);
      for (const call of [
        () => sdk("broke", { maxRetries: 2 }).responses.create({ model: "gpt-4o-mini", input: "no money" }),
        () => sdk("broke", { maxRetries: 2 }).responses.create({ model: "gpt-4o-mini", input: "no money", stream: true }),
        () => sdk("broke", { maxRetries: 2 }).embeddings.create({ model: "text-embedding-3-small", input: "no money" }),
      ]) {
        const gatewayBefore = stack.gateway.received;
        const { error, upstreamAsked } = await refused(call);
        expect(error).to.be.instanceOf(OpenAI.RateLimitError);
        expect(error.status).to.equal(429);
        expect(error.code).to.equal("insufficient_quota");
        expect(upstreamAsked).to.equal(0);
        expect(stack.gateway.received - gatewayBefore).to.equal(1);
      }
      expect(await settled("broke")).to.equal(0);
    });
  });

  describe("a streamed response the caller leaves mid-stream", () => {
    it("is billed for what the upstream sent before the disconnect, as chat streams are", async () => {
      const said = unique("leaver");
      const controller = new AbortController();
      const { data: stream, response } = await sdk("leaver")
        .responses.create({ model: "gpt-4o-mini", input: said, stream: true, ...({ mock: { words: 400, chunk_delay_ms: 20 } } as object) }, { signal: controller.signal })
        .withResponse();
      let deltas = 0;
      await (async () => {
        for await (const event of stream) if (event.type === "response.output_text.delta" && ++deltas === 5) controller.abort();
      })().catch((err: unknown) => expect(err).to.be.instanceOf(OpenAI.APIUserAbortError));
      expect(deltas).to.equal(5);
      const upstream = upstreamStream(stack, said);
      await waitFor("the upstream to see its request aborted", () => (upstream.aborted ? true : undefined));
      expect(upstream).to.include({ api: "responses", finished: false, usageChunkSent: false });
      const item = await ledgerOf(response.headers.get("x-amzn-requestid"));
      expect(item).to.include({ route: "/v1/responses", customer_id: "leaver", billed: true, streamed: true, client_disconnected: true, usage_estimated: true });
      expect(item.completion_tokens).to.be.greaterThan(0);
      expect(Math.abs(item.completion_tokens - upstream.completionTokensSent)).to.be.at.most(2);
      expect(upstream.completionTokensSent).to.be.lessThan(upstream.usage.completion_tokens);
      // The input is the function's estimate (the upstream never reported usage): the model server's own count.
      expect(item.prompt_tokens).to.equal(upstream.usage.prompt_tokens);
      expect(item.cost_micros).to.equal(cost(item, PRICES.open["gpt-4o-mini"]));
    });
  });

  describe("the usage report", () => {
    it("npm run usage -- --json: per customer and model, the upstream's usage summed (input as prompt, output as completion), nothing estimated", async () => {
      // Every request above has its ledger item (each test waited for its own); the report reads the same ledger.
      const { stdout } = await run(process.execPath, [...TS_NODE, path.join(ROOT, "scripts/usage.ts"), "--json", "--data-dir", local.dataDir], { cwd: ROOT, timeout: 60_000 });
      const report = JSON.parse(stdout) as ReportRow[];
      const rows = Object.fromEntries(
        report
          .filter((r) => ["sdk", "vercel", "payg"].includes(r.customer))
          .map((r) => [`${r.customer}/${r.model}`, { requests: r.requests, prompt_tokens: r.prompt_tokens, completion_tokens: r.completion_tokens }]),
      );
      expect(rows).to.deep.equal(expected);
      for (const row of report.filter((r) => r.customer === "sdk" || r.customer === "vercel" || r.customer === "payg")) {
        expect(row.estimated_requests, `${row.customer}/${row.model}`).to.equal(0);
      }
      // Costs: the sums of each request's cost at the plan's price, from the upstream's usage.
      for (const [key, micros] of Object.entries(expectedCost)) {
        const row = report.find((r) => `${r.customer}/${r.model}` === key)!;
        expect(row.cost_micros, key).to.equal(micros);
      }
      expect(Object.keys(expectedCost)).to.have.length(5);
      expect(report.find((r) => r.customer === "vercel" && r.model === "gpt-4o-mini")!.billed_requests).to.equal(3);
      console.log(`      compared ${Object.keys(expected).length} customer/model rows, ${Object.values(expected).reduce((n, r) => n + r.requests, 0)} requests, ${Object.values(expected).reduce((n, r) => n + r.prompt_tokens + r.completion_tokens, 0)} tokens`);
    });
  });
});
