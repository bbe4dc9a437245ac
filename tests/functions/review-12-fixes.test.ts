/**
 * Fixes for the adversarial review of issue 12 (/work/review-12/findings.md): F1 (a router's `models` list answered
 * at a dearer price than held), F2 (`prediction` not reserved), F3 (upstream-specific output-limit fields), F12
 * (duplicate JSON keys), F4 (any paid Session credited), F5 (refunds and disputes), F6 (Adaptive Pricing), F7 (one
 * unreadable key item taken for an outage). Each test failed before its fix.
 */
import { expect } from "chai";
import Stripe from "stripe";
import { loadFunctionConfig, type Plan } from "../../functions/ai-chat/config";
import { handleRequest, type CoreDeps } from "../../functions/ai-chat/core";
import { CachedCustomerDirectory } from "../../functions/ai-chat/customers";
import { createLogger } from "../../functions/ai-chat/logger";
import { handleStripeWebhook } from "../../functions/ai-chat/stripe-webhook";
import { CustomerItemInvalidError, CustomerStoreError, type CustomerRecord } from "../../functions/shared/customer-port";
import { FakeUpstream, RecordingMeter, UPSTREAM_KEY, fakeDeps, jsonResponse, proxyRequest } from "../helpers/fakes";
import { MemoryCustomerStore } from "../helpers/memory-customer-store";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

// gpt-4o-mini: 1 µ/token in, 2 µ/token out. o1-pro: 100× dearer. Both priced on each plan; `gpt-4o` is not.
const PRICES = { "gpt-4o-mini": { input: 1_000_000, output: 2_000_000 }, "o1-pro": { input: 100_000_000, output: 200_000_000 } };
const PLANS = {
  credits: { billing: "prepaid", maxOutputTokens: 50, pricing: { currency: "usd", prices: PRICES } },
  metered: { maxOutputTokens: 50, pricing: { currency: "usd", prices: PRICES } },
};

interface Setup {
  store: MemoryCustomerStore;
  meter: RecordingMeter;
  deps: CoreDeps;
  upstream: FakeUpstream;
  logs: string[];
}

function setup(answer: (body: Record<string, unknown>) => unknown, plan: keyof typeof PLANS = "credits"): Setup {
  const store = new MemoryCustomerStore();
  store.putCustomer({ apiKeyId: "key-acme", customerId: "acme", plan, status: "active" });
  const meter = new RecordingMeter();
  const config = loadFunctionConfig({ UPSTREAM_API_KEY: UPSTREAM_KEY, CUSTOMERS_TABLE: "customers", PLANS: JSON.stringify(PLANS) });
  expect(config.problems).to.deep.equal([]);
  const upstream = new FakeUpstream(async (req) => {
    await new Promise((r) => setTimeout(r, 20)); // every reservation lands before any settlement
    return jsonResponse(200, answer(JSON.parse(String(req.body)) as Record<string, unknown>));
  });
  const logs: string[] = [];
  const base = fakeDeps({ config, upstream, meter, logs });
  return { store, meter, upstream, logs, deps: { ...base, store, customers: new CachedCustomerDirectory({ store, log: base.log }) } };
}

const completion = (model: string, prompt: number, out: number) => ({
  id: "chatcmpl-1",
  object: "chat.completion",
  model,
  choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }],
  usage: { prompt_tokens: prompt, completion_tokens: out, total_tokens: prompt + out },
});

const responseObject = (model: string, input: number, output: number) => ({
  id: "resp_0123456789abcdef",
  object: "response",
  model,
  status: "completed",
  output: [{ type: "message", role: "assistant", content: [{ type: "output_text", text: "hi" }] }],
  usage: { input_tokens: input, output_tokens: output, total_tokens: input + output },
});

const credit = (store: MemoryCustomerStore, micros: number) => store.credit({ customerId: "acme", currency: "usd", creditId: `t-${micros}`, micros, source: "cli", now: Date.now() });
const chat = (json: Record<string, unknown>) => proxyRequest({ apiKeyId: "key-acme", json: { model: "gpt-4o-mini", messages: [{ role: "user", content: "hello" }], ...json } });
const responses = (json: Record<string, unknown>) =>
  proxyRequest({ apiKeyId: "key-acme", route: "/v1/responses", uri: "https://example.test/v1/responses", json: { model: "gpt-4o-mini", input: "hello", store: false, ...json } });
const errorOf = (body: string) => (JSON.parse(body) as { error: { code: string; param: string | null; type: string } }).error;
const sentBody = (upstream: FakeUpstream, i = 0) => JSON.parse(String(upstream.requests[i].body)) as Record<string, unknown>;

describe("review 12 fixes: prepaid reservations", () => {
  describe("F1: a router's `models` fallback list", () => {
    it("reserves at the dearest model listed, so 20 concurrent requests answered by the dear model leave no shortfall", async () => {
      const { store, meter, deps } = setup((body) => completion(Array.isArray(body.models) ? "o1-pro" : "gpt-4o-mini", 20, 50));
      await credit(store, 1_000);
      const answers = await Promise.all(Array.from({ length: 20 }, () => handleRequest(chat({ models: ["gpt-4o-mini", "o1-pro"] }), deps)));

      const served = meter.records.filter((r) => r.billed);
      const shortfall = meter.records.reduce((sum, r) => sum + (r.billing?.shortfallMicros ?? 0), 0);
      const servedCost = served.reduce((sum, r) => sum + (r.cost?.micros ?? 0), 0);
      expect(shortfall).to.equal(0);
      expect(servedCost).to.be.at.most(1_000);
      // 50 output tokens of o1-pro alone cost 10,000 µ: the balance covers none of them.
      expect(answers.every((a) => a.statusCode === 429)).to.equal(true);
      expect(errorOf(answers[0].body).code).to.equal("insufficient_quota");
      expect(store.account("acme").balanceMicros).to.equal(1_000);
    });

    it("holds enough for the dear model when the balance covers it, and charges it in full", async () => {
      // The prompt as the tokenizer counts it (the reservation's estimate); the answer at the cap, by the dear model.
      const { store, meter, deps } = setup(() => completion("o1-pro", 1, 50));
      await credit(store, 1_000_000);
      const answer = await handleRequest(chat({ models: ["gpt-4o-mini", "o1-pro"] }), deps);

      expect(answer.statusCode).to.equal(200);
      const record = meter.records[0];
      expect(record.cost?.micros).to.equal(1 * 100 + 50 * 200);
      expect(record.billing?.reservedMicros).to.be.at.least(record.cost!.micros);
      expect(record.billing).to.include({ shortfallMicros: 0, chargedMicros: record.cost!.micros });
    });

    for (const plan of ["credits", "metered"] as const) {
      it(`refuses (400 models / model_not_found) a list naming a model the ${plan === "credits" ? "prepaid" : "postpaid"} plan does not price, without calling the upstream`, async () => {
        const { store, upstream, deps } = setup(() => completion("gpt-4o-mini", 1, 1), plan);
        await credit(store, 1_000_000);
        const answer = await handleRequest(chat({ models: ["gpt-4o-mini", "gpt-4o"] }), deps);

        expect(answer.statusCode).to.equal(400);
        expect(errorOf(answer.body)).to.include({ param: "models", code: "model_not_found", type: "invalid_request_error" });
        expect(upstream.requests).to.have.length(0);
      });
    }

    it("refuses a `models` field that is not a list of names", async () => {
      const { upstream, deps } = setup(() => completion("gpt-4o-mini", 1, 1), "metered");
      const answer = await handleRequest(chat({ models: "o1-pro" }), deps);
      expect(answer.statusCode).to.equal(400);
      expect(errorOf(answer.body).param).to.equal("models");
      expect(upstream.requests).to.have.length(0);
    });

    it("does the same on the Responses API: the hold is at the dearest model listed", async () => {
      const { store, meter, deps } = setup(() => responseObject("o1-pro", 1, 50));
      await credit(store, 1_000);
      const refused = await handleRequest(responses({ models: ["gpt-4o-mini", "o1-pro"] }), deps);
      expect(refused.statusCode).to.equal(429);

      await credit(store, 1_000_000);
      const answer = await handleRequest(responses({ models: ["gpt-4o-mini", "o1-pro"] }), deps);
      expect(answer.statusCode).to.equal(200);
      const record = meter.records[1];
      expect(record.billing?.reservedMicros).to.be.at.least(record.cost!.micros);
      expect(record.billing?.shortfallMicros).to.equal(0);

      const unpriced = await handleRequest(responses({ models: ["gpt-4o"] }), deps);
      expect(errorOf(unpriced.body)).to.include({ param: "models", code: "model_not_found" });
    });
  });

  describe("F2: `prediction` (rejected prediction tokens are billed as completion tokens)", () => {
    const big = "word ".repeat(100_000); // ≈100k tokens

    it("reserves the prediction's tokens × choices at the output price: a balance that covers only the cap is refused", async () => {
      const { store, upstream, deps, meter } = setup(() => completion("gpt-4o-mini", 20, 100_050));
      await credit(store, 1_000);
      const answers = await Promise.all(Array.from({ length: 5 }, () => handleRequest(chat({ prediction: { type: "content", content: big } }), deps)));

      expect(answers.map((a) => a.statusCode)).to.deep.equal([429, 429, 429, 429, 429]);
      expect(upstream.requests).to.have.length(0);
      expect(meter.records.reduce((sum, r) => sum + (r.billing?.shortfallMicros ?? 0), 0)).to.equal(0);
      expect(errorOf(answers[0].body).code).to.equal("insufficient_quota");
    });

    it("covers what a fully rejected prediction costs, for text parts and n > 1 too", async () => {
      const { store, deps, meter } = setup(() => ({ ...completion("gpt-4o-mini", 5, 2 * 100_050), choices: [0, 1].map((index) => ({ index, message: { role: "assistant", content: "hi" }, finish_reason: "stop" })) }));
      await credit(store, 10_000_000);
      const answer = await handleRequest(chat({ n: 2, prediction: { type: "content", content: [{ type: "text", text: big }] } }), deps);

      expect(answer.statusCode).to.equal(200);
      const record = meter.records[0];
      expect(record.billing?.reservedMicros).to.be.at.least(record.cost!.micros);
      expect(record.billing?.shortfallMicros).to.equal(0);
    });
  });

  describe("F3: upstream-specific output-limit fields", () => {
    it("drops n_predict, num_predict, max_new_tokens and max_output_tokens from a prepaid chat request", async () => {
      const { store, upstream, deps } = setup(() => completion("gpt-4o-mini", 20, 50));
      await credit(store, 1_000_000);
      await handleRequest(chat({ n_predict: -1, num_predict: -1, max_new_tokens: 100_000, max_output_tokens: 100_000, options: { num_predict: -1, temperature: 0 } }), deps);

      const sent = sentBody(upstream);
      for (const field of ["n_predict", "num_predict", "max_new_tokens", "max_output_tokens"]) expect(sent, field).to.not.have.property(field);
      expect(sent.options).to.deep.equal({ temperature: 0 });
      expect(sent.max_completion_tokens).to.equal(50);
    });

    it("drops them from a prepaid Responses API request but keeps (and caps) its own max_output_tokens", async () => {
      const { store, upstream, deps } = setup(() => responseObject("gpt-4o-mini", 20, 50));
      await credit(store, 1_000_000);
      await handleRequest(responses({ n_predict: -1, max_new_tokens: 9_999, max_output_tokens: 100_000 }), deps);

      const sent = sentBody(upstream);
      expect(sent).to.not.have.property("n_predict");
      expect(sent).to.not.have.property("max_new_tokens");
      expect(sent.max_output_tokens).to.equal(50);
    });
  });

  describe("F12: duplicate JSON keys", () => {
    it("forwards what was parsed and reserved for, never the caller's text with a first duplicate the upstream may read", async () => {
      const { store, upstream, deps, meter } = setup(() => completion("gpt-4o-mini", 10, 10));
      await credit(store, 1_000);
      const text = '{"model":"gpt-4o-mini","max_completion_tokens":100000,"n":128,"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":10,"n":1}';
      const answer = await handleRequest(proxyRequest({ apiKeyId: "key-acme", body: Buffer.from(text) }), deps);

      expect(answer.statusCode).to.equal(200);
      const sent = String(upstream.requests[0].body);
      expect(sent).to.not.include("100000");
      expect((sent.match(/"max_completion_tokens"/g) ?? []).length).to.equal(1);
      expect(JSON.parse(sent)).to.include({ max_completion_tokens: 10, n: 1 });
      expect(meter.records[0].billing?.shortfallMicros).to.equal(0);
    });
  });
});

describe("review 12 fixes: the Stripe credits webhook", () => {
  const SECRET = "whsec_review12_fixes_secret_abcdef0123";
  registerSecret(SECRET);
  const NOW_MS = 1_800_000_000_000;
  const WEBHOOK_PLANS: Record<string, Plan> = { usd: { billing: "prepaid", pricing: { currency: "usd", prices: { "gpt-4o-mini": { input: 1, output: 1 } } } } };
  let counter = 0;

  async function deliver(type: string, object: Record<string, unknown>) {
    const store = new MemoryCustomerStore();
    store.putCustomer({ apiKeyId: "key-acme", customerId: "acme", plan: "usd", stripeCustomerId: "cus_acme", status: "active" });
    const logs: string[] = [];
    const log = createLogger({ level: "debug", write: (line) => logs.push(line) });
    const payload = JSON.stringify({ id: `evt_r12_${++counter}`, object: "event", api_version: "2024-04-10", created: NOW_MS / 1000 - 2, type, data: { object } });
    const signature = Stripe.webhooks.generateTestHeaderString({ payload, secret: SECRET, timestamp: NOW_MS / 1000 - 1 });
    const response = await handleStripeWebhook(Buffer.from(payload), { "stripe-signature": signature }, { store, plans: WEBHOOK_PLANS, secret: SECRET, log, clock: () => NOW_MS });
    recordForScan("review-12 webhook", [response.body, ...logs]);
    const lines = logs.map((l) => JSON.parse(l) as Record<string, unknown>);
    return { status: response.statusCode, body: JSON.parse(response.body) as Record<string, unknown>, store, lines };
  }

  const session = (overrides: Record<string, unknown> = {}) => ({
    id: "cs_test_r12",
    object: "checkout.session",
    mode: "payment",
    payment_status: "paid",
    customer: "cus_acme",
    currency: "usd",
    amount_total: 2_500,
    metadata: { purpose: "credits" },
    ...overrides,
  });

  it("F4: credits a payment-mode Session only when it is marked metadata.purpose = credits", async () => {
    const merch = await deliver("checkout.session.completed", session({ metadata: { purpose: "merch" } }));
    expect(merch).to.deep.include({ status: 200, body: { received: true, credited: false, reason: "not_credit_session" } });
    expect(merch.store.account("acme").balanceMicros).to.equal(0);

    const credits = await deliver("checkout.session.completed", session());
    expect(credits.body).to.deep.equal({ received: true, credited: true });
    expect(credits.store.account("acme").balanceMicros).to.equal(25_000_000);
  });

  it("F6: credits Adaptive Pricing's currency_conversion.amount_total when its source currency is the plan's", async () => {
    const result = await deliver("checkout.session.completed", session({ currency: "eur", amount_total: 2_300, currency_conversion: { source_currency: "usd", amount_total: 2_500, amount_subtotal: 2_500, fx_rate: "0.92" } }));
    expect(result.body).to.deep.equal({ received: true, credited: true });
    expect(result.store.account("acme")).to.include({ balanceMicros: 25_000_000, currency: "usd" });
    expect(result.lines.find((l) => l.message === "stripe_webhook")).to.deep.include({ converted_from: "eur", amount: 2_500 });
  });

  it("F6: answers 500 (Stripe retries) and logs stripe_credit_currency_mismatch when no conversion applies", async () => {
    const result = await deliver("checkout.session.completed", session({ currency: "eur", amount_total: 2_300, currency_conversion: { source_currency: "gbp", amount_total: 2_000 } }));
    expect(result.status).to.equal(500);
    expect((result.body.error as Record<string, unknown>).code).to.equal("currency_mismatch");
    expect(result.store.account("acme").balanceMicros).to.equal(0);
    expect(result.lines.find((l) => l.message === "stripe_credit_currency_mismatch")).to.deep.include({ level: "error", stripe_customer_id: "cus_acme", customer_id: "acme", currency: "eur", plan_currency: "usd" });
  });

  it("F5: logs a refund as an error line for a manual debit, answers 200 credited:false, and changes no balance", async () => {
    const result = await deliver("charge.refunded", { id: "ch_r12", object: "charge", customer: "cus_acme", currency: "usd", amount: 2_500, amount_refunded: 1_000, payment_intent: "pi_r12", metadata: { purpose: "credits" } });
    expect(result).to.deep.include({ status: 200, body: { received: true, credited: false, reason: "refund_not_debited" } });
    expect(result.lines.find((l) => l.message === "stripe_credit_refunded")).to.deep.include({
      level: "error",
      stripe_customer_id: "cus_acme",
      customer_id: "acme",
      amount: 1_000,
      amount_micros: 10_000_000,
      currency: "usd",
      charge_id: "ch_r12",
    });
    expect(result.store.account("acme").balanceMicros).to.equal(0);
  });

  it("F5: logs a dispute as an error line (its charge, amount and, when expanded, customer), answering 200 credited:false", async () => {
    const result = await deliver("charge.dispute.created", { id: "dp_r12", object: "dispute", charge: { id: "ch_r12", customer: "cus_acme" }, amount: 2_500, currency: "usd", payment_intent: "pi_r12", status: "needs_response" });
    expect(result).to.deep.include({ status: 200, body: { received: true, credited: false, reason: "dispute_not_debited" } });
    expect(result.lines.find((l) => l.message === "stripe_credit_disputed")).to.deep.include({ level: "error", stripe_customer_id: "cus_acme", customer_id: "acme", amount: 2_500, charge_id: "ch_r12" });

    const plain = await deliver("charge.dispute.created", { id: "dp_r13", object: "dispute", charge: "ch_r13", amount: 900, currency: "usd" });
    expect(plain.lines.find((l) => l.message === "stripe_credit_disputed")).to.deep.include({ level: "error", charge_id: "ch_r13", amount: 900 });
  });
});

describe("review 12 fixes: F7, one unreadable key item", () => {
  it("refuses that key alone (403 customer_invalid, cached like a miss, logged), never serving its stale entry nor backing off other keys", async () => {
    let now = 0;
    const items: Record<string, CustomerRecord | "broken" | "down"> = {
      a: { apiKeyId: "a", customerId: "alice", plan: "p", status: "active" },
      b: { apiKeyId: "b", customerId: "bob", plan: "p", status: "active" },
    };
    let reads = 0;
    const store = {
      async getCustomer(id: string) {
        reads += 1;
        const item = items[id];
        if (item === "broken") throw new CustomerItemInvalidError(`customer store: key item "key#${id}" lacks customer_id, plan or a known status`);
        if (item === "down") throw new CustomerStoreError("customer store getCustomer failed: no answer within 1000 ms");
        return item;
      },
    };
    const logs: string[] = [];
    const dir = new CachedCustomerDirectory({ store, clock: () => now, log: createLogger({ level: "debug", write: (line) => logs.push(line) }) });
    const codeOf = async (id: string) => {
      try {
        return (await dir.lookup(id))?.status;
      } catch (err) {
        return (err as { code?: string }).code;
      }
    };
    expect(await codeOf("a")).to.equal("active");
    items.a = "broken"; // a hand edit: status "Suspended"
    now = 31_000; // past the 30 s TTL

    expect(await codeOf("a")).to.equal("customer_invalid");
    expect(await codeOf("b")).to.equal("active"); // no back-off armed for everyone
    const before = reads;
    expect(await codeOf("a")).to.equal("customer_invalid"); // cached like a miss: no second read
    expect(reads).to.equal(before);
    expect(logs.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.message === "customer_item_invalid" && l.level === "error")).to.have.length(1);

    // Over ten minutes of alice calling every second, bob (never cached before) is never refused.
    let bobRefused = 0;
    items.b = { apiKeyId: "b", customerId: "bob", plan: "p", status: "active" };
    for (now = 36_000; now < 600_000; now += 1_000) {
      expect(await codeOf("a")).to.equal("customer_invalid");
      if (now % 7_000 === 0 && (await codeOf("b")) !== "active") bobRefused += 1;
    }
    expect(bobRefused).to.equal(0);

    // A real outage still backs off and serves a recently known key from the cache.
    items.b = "down";
    now += 31_000;
    expect(await codeOf("b")).to.equal("active");
  });

  it("answers the caller 403 customer_invalid through the function", async () => {
    const store = new MemoryCustomerStore();
    store.getCustomer = async () => {
      throw new CustomerItemInvalidError('customer store: key item "key#key-acme" lacks customer_id, plan or a known status');
    };
    const config = loadFunctionConfig({ UPSTREAM_API_KEY: UPSTREAM_KEY, CUSTOMERS_TABLE: "customers", PLANS: JSON.stringify(PLANS) });
    const upstream = new FakeUpstream(async () => jsonResponse(200, completion("gpt-4o-mini", 1, 1)));
    const base = fakeDeps({ config, upstream });
    const answer = await handleRequest(chat({}), { ...base, store, customers: new CachedCustomerDirectory({ store, log: base.log }) });
    expect(answer.statusCode).to.equal(403);
    expect(errorOf(answer.body)).to.include({ code: "customer_invalid", type: "permission_error" });
    expect(upstream.requests).to.have.length(0);
  });
});
