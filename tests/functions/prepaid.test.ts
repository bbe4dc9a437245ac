import { expect } from "chai";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { Readable } from "node:stream";
import OpenAI from "openai";
import Stripe from "stripe";
import { loadFunctionConfig, type FunctionConfig } from "../../functions/ai-chat/config";
import { handleRequest, meteringReserveMs, type CoreDeps, type ProxyRequest } from "../../functions/ai-chat/core";
import { createDeps } from "../../functions/ai-chat/index";
import { capOutputTokens, usagePeriodOf } from "../../functions/ai-chat/account";
import { CachedCustomerDirectory } from "../../functions/ai-chat/customers";
import { toLedgerItem } from "../../functions/ai-chat/ledger";
import type { UsageRecord } from "../../functions/ai-chat/metering";
import { toMoesifEvent } from "../../functions/ai-chat/moesif";
import type { ProxyResponse, Responder, StreamWriter } from "../../functions/ai-chat/responder";
import type { UpstreamRequest, UpstreamStreamResponse } from "../../functions/ai-chat/upstream";
import { estimateRequestTokens } from "../../functions/ai-chat/usage";
import type { CustomerStore, ReserveArgs, ReserveResult } from "../../functions/shared/customer-port";
import { keyItem } from "../../functions/shared/customer-schema";
import { costOf } from "../../functions/shared/pricing";
import { chatBody } from "../helpers/events";
import { FakeUpstream, RecordingMeter, UPSTREAM_KEY, fakeDeps, jsonResponse, proxyRequest } from "../helpers/fakes";
import { MemoryCustomerStore } from "../helpers/memory-customer-store";
import { recordForScan, registerSecret } from "../helpers/secret-scan";
import { CreditsFixture } from "../credits/dynalite-fixture";

/** 1 micro-unit per prompt token, 2 per completion token: costs are easy to check by hand. */
const PRICE = { input: 1_000_000, output: 2_000_000 };
const CAP = 50;
const PLANS = {
  credits: { billing: "prepaid", maxOutputTokens: CAP, pricing: { currency: "usd", prices: { "gpt-4o-mini": PRICE } }, quota: { limit: 1000, period: "MONTH", offset: 0 } },
  roomy: { billing: "prepaid", pricing: { currency: "usd", prices: { "gpt-4o-mini": PRICE } } },
  metered: { pricing: { currency: "usd", prices: { "gpt-4o-mini": PRICE } } },
  cappedPostpaid: { maxOutputTokens: 100 },
};
const WEBHOOK_SECRET = "whsec_prepaid_test_secret_0123456789";
registerSecret(WEBHOOK_SECRET);

const KEYS = {
  acme: { apiKeyId: "key-acme", customerId: "acme", plan: "credits", stripeCustomerId: "cus_acme", status: "active" as const },
  roomy: { apiKeyId: "key-roomy", customerId: "roomy", plan: "roomy", status: "active" as const },
  postpaid: { apiKeyId: "key-post", customerId: "globex", plan: "metered", stripeCustomerId: "cus_globex", status: "active" as const },
  capped: { apiKeyId: "key-capped", customerId: "initech", plan: "cappedPostpaid", status: "active" as const },
  suspended: { apiKeyId: "key-suspended", customerId: "umbrella", plan: "credits", status: "suspended" as const },
  lost: { apiKeyId: "key-lost", customerId: "hooli", plan: "gold", status: "active" as const },
};

const sleepTurns = async (turns: number) => {
  for (let i = 0; i < turns; i++) await new Promise<void>((resolve) => setImmediate(resolve));
};

/** The prompt tokens the function reserves for (its tokenizer estimate), and what a full answer costs at CAP. */
const PROMPT = estimateRequestTokens(chatBody(), "gpt-4o-mini");
const FULL_COST = PROMPT * 1 + CAP * 2;

const completion = (prompt: number, completionTokens: number) => ({
  id: "chatcmpl-prepaid",
  object: "chat.completion",
  model: "gpt-4o-mini",
  choices: [{ index: 0, message: { role: "assistant", content: "Hi there" }, finish_reason: "stop" }],
  usage: { prompt_tokens: prompt, completion_tokens: completionTokens, total_tokens: prompt + completionTokens },
});

interface Setup {
  store: MemoryCustomerStore;
  meter: RecordingMeter;
  logs: string[];
  deps: CoreDeps;
  config: FunctionConfig;
}

function setup(options: { upstream?: FakeUpstream; store?: MemoryCustomerStore; clock?: () => number; env?: Record<string, string> } = {}): Setup {
  const store = options.store ?? new MemoryCustomerStore();
  for (const key of Object.values(KEYS)) store.putCustomer(key);
  const meter = new RecordingMeter();
  const logs: string[] = [];
  const config = loadFunctionConfig({ UPSTREAM_API_KEY: UPSTREAM_KEY, CUSTOMERS_TABLE: "customers", PLANS: JSON.stringify(PLANS), STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET, ...options.env });
  expect(config.problems).to.deep.equal([]);
  const base = fakeDeps({ config, upstream: options.upstream, meter, logs });
  const clock = options.clock ?? Date.now;
  const deps: CoreDeps = { ...base, clock, store, customers: new CachedCustomerDirectory({ store, log: base.log, clock }) };
  return { store, meter, logs, deps, config };
}

async function topUp(store: MemoryCustomerStore, customerId: string, micros: number): Promise<void> {
  const result = await store.credit({ customerId, currency: "usd", creditId: `test:${customerId}:${micros}:${Math.random()}`, micros, source: "cli", now: Date.now() });
  expect(result.applied).to.equal(true);
}

const chat = (overrides: Record<string, unknown> = {}, request: Partial<ProxyRequest> = {}) => proxyRequest({ apiKeyId: KEYS.acme.apiKeyId, json: chatBody(overrides), ...request });

/** A store whose upstream waits until every reservation of a burst has been answered, so no settlement frees credit early. */
class GatedStore extends MemoryCustomerStore {
  answered = 0;
  private waiters: Array<() => void> = [];
  async reserve(args: ReserveArgs): Promise<ReserveResult> {
    try {
      return await super.reserve(args);
    } finally {
      this.answered += 1;
      for (const wake of this.waiters.splice(0)) wake();
    }
  }
  async until(count: number): Promise<void> {
    while (this.answered < count) await new Promise<void>((resolve) => this.waiters.push(resolve));
  }
}

/** An OpenAI stream: one content chunk per word, finish, then a usage chunk when `usage` is given. */
function sseStream(words: string[], usage?: [number, number]): string {
  const chunk = (delta: Record<string, unknown>, finish: string | null = null) =>
    `data: ${JSON.stringify({ id: "chatcmpl-s", object: "chat.completion.chunk", model: "gpt-4o-mini", choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`;
  const parts = [chunk({ role: "assistant", content: "" }), ...words.map((w) => chunk({ content: w })), chunk({}, "stop")];
  if (usage) parts.push(`data: ${JSON.stringify({ id: "chatcmpl-s", object: "chat.completion.chunk", model: "gpt-4o-mini", choices: [], usage: { prompt_tokens: usage[0], completion_tokens: usage[1], total_tokens: usage[0] + usage[1] } })}\n\n`);
  return parts.join("") + "data: [DONE]\n\n";
}

/** A responder whose caller goes away after `leaveAfter` writes (what the local stack reports on a disconnect). */
class LeavingResponder implements Responder {
  private readonly gone = new AbortController();
  readonly clientGone = this.gone.signal;
  response?: ProxyResponse;
  constructor(private readonly leaveAfter: number) {}
  async send(response: ProxyResponse): Promise<void> {
    this.response = response;
  }
  startStream(statusCode: number, headers: Record<string, string>): StreamWriter {
    const response: ProxyResponse = { statusCode, headers, body: "" };
    this.response = response;
    let writes = 0;
    return {
      write: async (text) => {
        response.body += text;
        if (++writes >= this.leaveAfter) this.gone.abort();
      },
      end: async () => undefined,
    };
  }
}

/** What the served requests of a burst were charged, from their records, and the checks every burst must pass. */
function expectExactAccounting(store: MemoryCustomerStore, records: UsageRecord[], initial: number): { served: UsageRecord[]; refused: UsageRecord[] } {
  const served = records.filter((r) => r.billed);
  const refused = records.filter((r) => r.status === 429);
  expect(store.violations).to.deep.equal([]);
  expect(store.lowestBalance).to.be.at.least(0);
  for (const record of served) {
    expect(record.billing).to.include({ mode: "prepaid", settlement: "settled", shortfallMicros: 0 });
    expect(record.billing?.chargedMicros).to.equal(record.cost?.micros);
  }
  const charged = served.reduce((sum, r) => sum + r.cost!.micros, 0);
  const account = store.account("acme");
  expect(account.balanceMicros).to.equal(initial - charged);
  expect(account.reservedMicros).to.equal(0);
  expect(account.holds).to.equal(0);
  for (const record of refused) {
    expect(record.billed).to.equal(false);
    expect(record.billing).to.deep.include({ mode: "prepaid", chargedMicros: 0 });
  }
  return { served, refused };
}

describe("prepaid credits (core, in-memory customer store)", () => {
  describe("50 concurrent requests against a balance worth exactly 10 answers", () => {
    it("serves at most 10 buffered answers, refuses the rest with 429 insufficient_quota, and charges exactly their cost", async () => {
      const store = new GatedStore();
      const upstream = new FakeUpstream(async () => {
        await store.until(50);
        await sleepTurns(Math.floor(Math.random() * 5));
        return jsonResponse(200, completion(PROMPT, CAP));
      });
      const { meter, deps, logs } = setup({ upstream, store });
      await topUp(store, "acme", 10 * FULL_COST);

      const responses = await Promise.all(Array.from({ length: 50 }, () => handleRequest(chat(), deps)));
      recordForScan("prepaid responses", responses.map((r) => r.body));
      recordForScan("prepaid logs", logs);

      const ok = responses.filter((r) => r.statusCode === 200);
      const refused = responses.filter((r) => r.statusCode === 429);
      expect(ok.length).to.be.at.most(10);
      expect(ok.length + refused.length).to.equal(50);
      expect(upstream.requests).to.have.length(ok.length);
      for (const response of refused) {
        expect(JSON.parse(response.body).error).to.include({ type: "insufficient_quota", code: "insufficient_quota", param: null });
        expect(response.headers["x-should-retry"]).to.equal("false");
      }
      const { served } = expectExactAccounting(store, meter.records, 10 * FULL_COST);
      // Every reservation was made before any settlement, and each answer cost its whole reservation: exactly 10.
      expect(served).to.have.length(10);
      expect(store.account("acme").balanceMicros).to.equal(0);
    });

    it("charges exactly the actual cost when answers cost less than their reservation, whatever the interleaving", async () => {
      const costs: number[] = [];
      const upstream = new FakeUpstream(async () => {
        await sleepTurns(Math.floor(Math.random() * 8));
        const tokens = 1 + Math.floor(Math.random() * CAP);
        costs.push(PROMPT + 2 * tokens);
        return jsonResponse(200, completion(PROMPT, tokens));
      });
      const { store, meter, deps } = setup({ upstream });
      await topUp(store, "acme", 10 * FULL_COST);

      const responses = await Promise.all(Array.from({ length: 50 }, () => handleRequest(chat(), deps)));

      expect(responses.every((r) => r.statusCode === 200 || r.statusCode === 429)).to.equal(true);
      const { served } = expectExactAccounting(store, meter.records, 10 * FULL_COST);
      // Released credit serves later requests, so at least 10 are served; none was refused while 10 full answers fit.
      expect(served.length).to.be.at.least(10);
      expect(served.map((r) => r.cost!.micros).sort()).to.deep.equal([...costs].sort());
    });

    it("serves at most 10 streams and charges exactly what each stream billed", async () => {
      const store = new GatedStore();
      const upstream = new FakeUpstream(async () => {
        await store.until(50);
        return { status: 200, headers: { "content-type": "text/event-stream" }, body: Buffer.from(sseStream([" apple", " pear"], [PROMPT, CAP])) };
      });
      const { meter, deps } = setup({ upstream, store });
      await topUp(store, "acme", 10 * FULL_COST);

      const responses = await Promise.all(Array.from({ length: 50 }, () => handleRequest(chat({ stream: true }), deps)));

      const streamed = responses.filter((r) => r.statusCode === 200);
      expect(streamed.length).to.be.at.most(10);
      expect(streamed.every((r) => r.body.endsWith("data: [DONE]\n\n"))).to.equal(true);
      expect(responses.filter((r) => r.statusCode === 429)).to.have.length(50 - streamed.length);
      // The upstream was asked for at most the cap, which is what each stream reserved.
      for (const request of upstream.requests) expect(JSON.parse(request.body!).max_completion_tokens).to.equal(CAP);
      const { served } = expectExactAccounting(store, meter.records, 10 * FULL_COST);
      expect(served).to.have.length(10);
      expect(served.every((r) => r.streamed && r.cost!.micros === FULL_COST)).to.equal(true);
    });

    it("serves at most 10 streams whose callers leave mid-stream, charges what each had received and releases the rest", async () => {
      const store = new GatedStore();
      const upstream = new FakeUpstream(async () => ({ status: 200, headers: {}, body: Buffer.alloc(0) }));
      // A slow upstream that never sends usage: the caller leaves after its third event, while the upstream still talks.
      upstream.openStream = async (request: UpstreamRequest): Promise<UpstreamStreamResponse> => {
        upstream.requests.push(request);
        await store.until(50);
        const events = sseStream(Array.from({ length: 40 }, () => " apple")).split(/(?<=\n\n)/);
        async function* slowly() {
          for (const event of events) {
            await sleepTurns(2);
            yield Buffer.from(event);
          }
        }
        return { status: 200, headers: { "content-type": "text/event-stream" }, stream: Readable.from(slowly()) };
      };
      const { meter, deps } = setup({ upstream, store });
      await topUp(store, "acme", 10 * FULL_COST);

      const responders = Array.from({ length: 50 }, () => new LeavingResponder(3));
      await Promise.all(responders.map((responder) => handleRequest(chat({ stream: true }), deps, responder)));

      const statuses = responders.map((r) => r.response?.statusCode);
      expect(statuses.filter((s) => s === 200).length).to.be.at.most(10);
      expect(statuses.filter((s) => s === 429)).to.have.length(50 - statuses.filter((s) => s === 200).length);
      const { served } = expectExactAccounting(store, meter.records, 10 * FULL_COST);
      expect(served).to.have.length(10);
      for (const record of served) {
        expect(record.clientDisconnected).to.equal(true);
        expect(record.usageEstimated).to.equal(true);
        // What had arrived, not the whole reservation: the rest went back to the balance.
        expect(record.cost!.micros).to.equal(costOf(record.usage, PRICE));
        expect(record.cost!.micros).to.be.below(FULL_COST);
      }
    });
  });

  describe("the same burst against the DynamoDB store (dynalite), through createDeps", function () {
    this.timeout(60_000);
    const db = new CreditsFixture();
    before(() => db.start());
    after(() => db.stop());

    it("serves at most 10 of 50 concurrent requests, and the account item ends at initial − Σ cost with no hold left", async () => {
      await db.newTables();
      await db.putCustomerItem({ ...keyItem(KEYS.acme.apiKeyId, "acme", { plan: "credits" }) });
      const env = db.env({ UPSTREAM_API_KEY: UPSTREAM_KEY, PLANS: JSON.stringify(PLANS), CUSTOMERS_TIMEOUT_MS: "20000", LEDGER_TABLE: undefined, LOG_LEVEL: "warn" });
      const logs: string[] = [];
      const built = createDeps(env, { write: (line) => logs.push(line) });
      const real = built.store!;
      // The same gate as above: the upstream answers once all 50 reservations were answered.
      let answered = 0;
      const waiters: Array<() => void> = [];
      const store: CustomerStore = Object.assign(Object.create(real) as CustomerStore, {
        reserve: async (args: ReserveArgs) => {
          try {
            return await real.reserve(args);
          } finally {
            answered += 1;
            for (const wake of waiters.splice(0)) wake();
          }
        },
      });
      const upstream = new FakeUpstream(async () => {
        while (answered < 50) await new Promise<void>((resolve) => waiters.push(resolve));
        return jsonResponse(200, completion(PROMPT, CAP));
      });
      const meter = new RecordingMeter();
      const deps: CoreDeps = { ...built, store, upstream, meter };
      expect((await real.credit({ customerId: "acme", currency: "usd", creditId: "test:dynalite", micros: 10 * FULL_COST, source: "cli", now: Date.now() })).applied).to.equal(true);

      const responses = await Promise.all(Array.from({ length: 50 }, () => handleRequest(chat(), deps)));
      recordForScan("prepaid dynalite logs", logs);

      expect(responses.filter((r) => r.statusCode === 200).length).to.be.at.most(10);
      expect(responses.filter((r) => r.statusCode === 429).length + responses.filter((r) => r.statusCode === 200).length).to.equal(50);
      const served = meter.records.filter((r) => r.billed);
      expect(served).to.have.length(10);
      const account = await db.account("acme");
      expect(account).to.include({ balance_micros: 10 * FULL_COST - served.reduce((sum, r) => sum + r.cost!.micros, 0), reserved_micros: 0 });
      expect(account?.holds).to.deep.equal({});
      expect(served.every((r) => r.billing?.settlement === "settled" && r.billing.chargedMicros === FULL_COST)).to.equal(true);
      (real as { destroy?: () => void }).destroy?.();
    });
  });

  describe("reservation and refusal", () => {
    it("answers 429 insufficient_quota with x-should-retry: false, calls nothing and bills nothing when the balance is short", async () => {
      const upstream = new FakeUpstream(() => jsonResponse(200, completion(PROMPT, CAP)));
      const { store, meter, deps } = setup({ upstream });
      await topUp(store, "acme", FULL_COST - 1);

      const response = await handleRequest(chat(), deps);

      expect(response.statusCode).to.equal(429);
      expect(response.headers["x-should-retry"]).to.equal("false");
      expect(JSON.parse(response.body)).to.deep.equal({
        error: {
          message:
            `Your prepaid balance (${((FULL_COST - 1) / 1e6).toFixed(6)} USD) does not cover the most this request can cost (${(FULL_COST / 1e6).toFixed(6)} USD: ` +
            `its prompt and ${CAP} output tokens). Top up your credits, or ask for fewer output tokens (max_completion_tokens).`,
          type: "insufficient_quota",
          param: null,
          code: "insufficient_quota",
        },
      });
      expect(upstream.requests).to.have.length(0);
      expect(store.account("acme")).to.include({ balanceMicros: FULL_COST - 1, reservedMicros: 0, holds: 0 });
      expect(meter.records[0]).to.include({ status: 429, billed: false });
      expect(meter.records[0].responseHeaders["x-should-retry"]).to.equal("false");
    });

    it("answers 503 credit_store_unavailable without calling the upstream when the reservation cannot be made", async () => {
      const upstream = new FakeUpstream(() => jsonResponse(200, completion(PROMPT, CAP)));
      const { store, meter, deps, logs } = setup({ upstream });
      await topUp(store, "acme", 10 * FULL_COST);
      store.fail.add("reserve");

      const response = await handleRequest(chat(), deps);

      expect(response.statusCode).to.equal(503);
      expect(JSON.parse(response.body).error).to.include({ code: "credit_store_unavailable", type: "server_error" });
      expect(upstream.requests).to.have.length(0);
      expect(meter.records[0]).to.include({ status: 503, billed: false });
      // The write might have landed: the request released it at 0 (here: there was none).
      expect(store.calls.settle).to.equal(1);
      expect(store.account("acme")).to.include({ balanceMicros: 10 * FULL_COST, reservedMicros: 0 });
      expect(logs.some((l) => l.includes('"credit_reserve_failed"'))).to.equal(true);
    });

    it("releases the whole reservation when the upstream fails", async () => {
      const upstream = new FakeUpstream(() => jsonResponse(500, { error: { message: "boom" } }));
      const { store, meter, deps } = setup({ upstream });
      await topUp(store, "acme", 10 * FULL_COST);

      const response = await handleRequest(chat(), deps);

      expect(response.statusCode).to.equal(502);
      expect(store.account("acme")).to.include({ balanceMicros: 10 * FULL_COST, reservedMicros: 0, holds: 0 });
      expect(meter.records[0].billing).to.deep.equal({ mode: "prepaid", reservedMicros: FULL_COST, chargedMicros: 0, shortfallMicros: 0, balanceAfterMicros: 10 * FULL_COST, settlement: "settled" });
    });

    it("charges above the reservation only what the balance holds, never going negative, and records the shortfall", async () => {
      // An upstream that reports more prompt tokens than the tokenizer counted (another tokenizer, hidden context).
      const upstream = new FakeUpstream(() => jsonResponse(200, completion(PROMPT + 1000, CAP)));
      const { store, meter, deps, logs } = setup({ upstream });
      await topUp(store, "acme", FULL_COST + 300);

      await handleRequest(chat(), deps);

      expect(meter.records[0].billing).to.deep.equal({ mode: "prepaid", reservedMicros: FULL_COST, chargedMicros: FULL_COST + 300, shortfallMicros: 700, balanceAfterMicros: 0, settlement: "settled" });
      expect(store.account("acme").balanceMicros).to.equal(0);
      expect(store.violations).to.deep.equal([]);
      expect(logs.some((l) => l.includes('"credit_shortfall"'))).to.equal(true);
    });

    it("leaves the settlement pending in the ledger item when the store cannot settle, and keeps the hold for the sweep", async () => {
      const upstream = new FakeUpstream(() => jsonResponse(200, completion(PROMPT, 20)));
      const { store, meter, deps } = setup({ upstream });
      await topUp(store, "acme", 10 * FULL_COST);
      store.fail.add("settle");

      const response = await handleRequest(chat(), deps);

      expect(response.statusCode).to.equal(200);
      const [record] = meter.records;
      expect(record.billing).to.deep.equal({ mode: "prepaid", reservedMicros: FULL_COST, settlement: "pending" });
      const item = toLedgerItem(record, { logBodies: false, stripeBilling: "meters" });
      expect(item).to.include({ billing_mode: "prepaid", reserved_micros: FULL_COST, settlement: "pending", cost_micros: PROMPT + 40, billed: true });
      expect(item.charged_micros).to.equal(undefined);
      expect(item.stripe_state).to.equal(undefined);
      expect(store.account("acme")).to.include({ reservedMicros: FULL_COST, holds: 1 });
    });

    it("puts the settlement in the ledger item and the Moesif event, and never owes Stripe a prepaid charge", async () => {
      const upstream = new FakeUpstream(() => jsonResponse(200, completion(PROMPT, 20)));
      const { store, meter, deps } = setup({ upstream });
      await topUp(store, "acme", 10 * FULL_COST);

      await handleRequest(chat(), deps);

      const [record] = meter.records;
      const cost = PROMPT + 40;
      const item = toLedgerItem(record, { logBodies: false, stripeBilling: "meters" });
      expect(item).to.include({
        billing_mode: "prepaid",
        reserved_micros: FULL_COST,
        charged_micros: cost,
        shortfall_micros: 0,
        balance_after_micros: 10 * FULL_COST - cost,
        settlement: "settled",
        cost_micros: cost,
        billed: true,
      });
      expect(item).to.not.have.property("stripe_state");
      expect(toMoesifEvent(record, false).metadata).to.include({ billing_mode: "prepaid", charged_micros: cost, balance_after_micros: 10 * FULL_COST - cost });
    });

    it("still owes Stripe a postpaid charge, and says postpaid in the Moesif event", async () => {
      const upstream = new FakeUpstream(() => jsonResponse(200, completion(PROMPT, 20)));
      const { meter, deps } = setup({ upstream });

      await handleRequest(proxyRequest({ apiKeyId: KEYS.postpaid.apiKeyId, json: chatBody() }), deps);

      const [record] = meter.records;
      expect(record.billing).to.deep.equal({ mode: "postpaid" });
      const item = toLedgerItem(record, { logBodies: false, stripeBilling: "meters" });
      expect(item).to.include({ billing_mode: "postpaid", stripe_state: "pending" });
      expect(item).to.not.have.property("settlement");
      expect(toMoesifEvent(record, false).metadata).to.include({ billing_mode: "postpaid", charged_micros: null, balance_after_micros: null });
    });
  });

  describe("the output cap", () => {
    const served = () => new FakeUpstream(() => jsonResponse(200, completion(PROMPT, 1)));

    it("sends max_completion_tokens: cap upstream when the caller sent no limit, and reserves for it", async () => {
      const upstream = served();
      const { store, meter, deps } = setup({ upstream });
      await topUp(store, "acme", 10 * FULL_COST);
      await handleRequest(chat(), deps);
      expect(JSON.parse(upstream.requests[0].body!)).to.deep.include({ max_completion_tokens: CAP });
      expect(meter.records[0].billing?.reservedMicros).to.equal(PROMPT + 2 * CAP);
    });

    it("forwards the caller's bytes unchanged when its limit is under the cap, and reserves only that much", async () => {
      const upstream = served();
      const { store, meter, deps } = setup({ upstream });
      await topUp(store, "acme", 10 * FULL_COST);
      const raw = JSON.stringify({ ...chatBody(), max_completion_tokens: 20 });
      await handleRequest(chat({}, { body: Buffer.from(raw) }), deps);
      expect(upstream.requests[0].body).to.equal(raw);
      expect(meter.records[0].billing?.reservedMicros).to.equal(PROMPT + 2 * 20);
    });

    for (const field of ["max_completion_tokens", "max_tokens"]) {
      it(`rewrites ${field} above the cap to the cap`, async () => {
        const upstream = served();
        const { store, meter, deps } = setup({ upstream });
        await topUp(store, "acme", 10 * FULL_COST);
        await handleRequest(chat({ [field]: 10_000 }), deps);
        const sent = JSON.parse(upstream.requests[0].body!);
        expect(sent[field]).to.equal(CAP);
        expect(sent).to.not.have.property(field === "max_tokens" ? "max_completion_tokens" : "max_tokens");
        expect(meter.records[0].billing?.reservedMicros).to.equal(PROMPT + 2 * CAP);
      });
    }

    it("reserves n × the output cap", async () => {
      const upstream = served();
      const { store, meter, deps } = setup({ upstream });
      await topUp(store, "acme", 10 * FULL_COST);
      await handleRequest(chat({ n: 3 }), deps);
      expect(meter.records[0].billing?.reservedMicros).to.equal(PROMPT + 3 * 2 * CAP);
    });

    for (const n of [0, 129, 2.5]) {
      it(`answers 400 with param n for n = ${n}, without reserving or calling anything`, async () => {
        const upstream = served();
        const { store, deps } = setup({ upstream });
        await topUp(store, "acme", 10 * FULL_COST);
        const response = await handleRequest(chat({ n }), deps);
        expect(response.statusCode).to.equal(400);
        expect(JSON.parse(response.body).error.param).to.equal("n");
        expect(store.calls.reserve).to.equal(undefined);
        expect(upstream.requests).to.have.length(0);
      });
    }

    it("caps a postpaid plan that sets maxOutputTokens, and leaves a postpaid plan without one alone", async () => {
      const upstream = served();
      const { deps } = setup({ upstream });
      await handleRequest(proxyRequest({ apiKeyId: KEYS.capped.apiKeyId, json: chatBody({ max_tokens: 5000 }) }), deps);
      const raw = JSON.stringify(chatBody({ max_tokens: 5000 }));
      await handleRequest(proxyRequest({ apiKeyId: KEYS.postpaid.apiKeyId, body: Buffer.from(raw) }), deps);
      expect(JSON.parse(upstream.requests[0].body!).max_tokens).to.equal(100);
      expect(upstream.requests[1].body).to.equal(raw);
    });

    it("uses the default cap of 4096 on a prepaid plan that sets none", async () => {
      const upstream = served();
      const { store, meter, deps } = setup({ upstream });
      await store.credit({ customerId: "roomy", currency: "usd", creditId: "test:roomy", micros: 1_000_000, source: "cli", now: Date.now() });
      await handleRequest(proxyRequest({ apiKeyId: KEYS.roomy.apiKeyId, json: chatBody() }), deps);
      expect(JSON.parse(upstream.requests[0].body!).max_completion_tokens).to.equal(4096);
      expect(meter.records[0].billing?.reservedMicros).to.equal(PROMPT + 2 * 4096);
    });
  });

  describe("customers from the table", () => {
    it("answers 403 customer_suspended to a suspended customer, without reserving or calling anything", async () => {
      const upstream = new FakeUpstream(() => jsonResponse(200, completion(PROMPT, 1)));
      const { store, deps } = setup({ upstream });
      const response = await handleRequest(proxyRequest({ apiKeyId: KEYS.suspended.apiKeyId, json: chatBody() }), deps);
      expect(response.statusCode).to.equal(403);
      expect(JSON.parse(response.body).error).to.include({ code: "customer_suspended", type: "permission_error" });
      expect(upstream.requests).to.have.length(0);
      expect(store.calls.reserve).to.equal(undefined);
    });

    it("answers 403 plan_unknown and logs an error when a key item names a plan the deployment does not define", async () => {
      const upstream = new FakeUpstream(() => jsonResponse(200, completion(PROMPT, 1)));
      const { deps, logs } = setup({ upstream });
      const response = await handleRequest(proxyRequest({ apiKeyId: KEYS.lost.apiKeyId, json: chatBody() }), deps);
      expect(response.statusCode).to.equal(403);
      expect(JSON.parse(response.body).error.code).to.equal("plan_unknown");
      expect(upstream.requests).to.have.length(0);
      const line = logs.map((l) => JSON.parse(l)).find((l) => l.message === "customer_plan_unknown");
      expect(line).to.include({ level: "error", customer_id: "hooli", plan: "gold" });
    });

    it("answers 403 to a key the table does not know, and 503 customer_store_unavailable when the table cannot answer", async () => {
      const { store, deps } = setup();
      const unknown = await handleRequest(proxyRequest({ apiKeyId: "key-nobody", json: chatBody() }), deps);
      expect(unknown.statusCode).to.equal(403);
      store.fail.add("getCustomer");
      const down = await handleRequest(proxyRequest({ apiKeyId: KEYS.acme.apiKeyId, json: chatBody() }), deps);
      expect(down.statusCode).to.equal(503);
      expect(JSON.parse(down.body).error.code).to.equal("customer_store_unavailable");
    });

    it("counts a postpaid customer's requests, tokens and cost for its period", async () => {
      const upstream = new FakeUpstream(() => jsonResponse(200, completion(30, 7)));
      const { store, deps } = setup({ upstream });
      await handleRequest(proxyRequest({ apiKeyId: KEYS.postpaid.apiKeyId, json: chatBody() }), deps);
      await handleRequest(proxyRequest({ apiKeyId: KEYS.postpaid.apiKeyId, json: chatBody({ model: "unpriced-model" }) }), deps);
      const month = new Date().toISOString().slice(0, 7);
      const totals = await store.getUsage("globex", `${month}-01`);
      // Two requests; only the served one has tokens and a cost (30 × 1 + 7 × 2).
      expect(totals).to.deep.include({ periodStart: `${month}-01`, requests: 2, promptTokens: 30, completionTokens: 7, costMicros: 44 });
    });

    it("keeps back the customers table's timeout for the work after the answer", () => {
      const config = loadFunctionConfig({ UPSTREAM_API_KEY: UPSTREAM_KEY, CUSTOMERS_TABLE: "customers", CUSTOMERS_TIMEOUT_MS: "700", LEDGER_TABLE: "ledger", LEDGER_TIMEOUT_MS: "400", METERING_TIMEOUT_MS: "300" });
      expect(meteringReserveMs(config)).to.equal(1400);
      expect(meteringReserveMs(loadFunctionConfig({ UPSTREAM_API_KEY: UPSTREAM_KEY, METERING_TIMEOUT_MS: "300" }))).to.equal(300);
    });
  });

  describe("GET /v1/usage", () => {
    const NOW = Date.UTC(2026, 10, 15, 12, 0, 0);
    const usageRequest = (apiKeyId: string) => proxyRequest({ method: "GET", route: "/v1/usage", uri: "https://example.test/v1/usage", apiKeyId, body: Buffer.alloc(0) });

    it("answers a prepaid customer's balance and this period's counters, exactly in the documented shape", async () => {
      const upstream = new FakeUpstream(() => jsonResponse(200, completion(PROMPT, 20)));
      const { store, deps } = setup({ upstream, clock: () => NOW });
      await topUp(store, "acme", 5_000_000);
      await handleRequest(chat(), deps);
      await handleRequest(chat({ n: 500 }), deps);

      const response = await handleRequest(usageRequest(KEYS.acme.apiKeyId), deps);

      expect(response.statusCode).to.equal(200);
      const cost = PROMPT + 40;
      expect(JSON.parse(response.body)).to.deep.equal({
        object: "usage",
        customer: "acme",
        plan: "credits",
        billing: "prepaid",
        currency: "usd",
        balance_micros: 5_000_000 - cost,
        reserved_micros: 0,
        balance: `4.${String(1_000_000 - cost).padStart(6, "0")}`,
        period: { type: "MONTH", start: "2026-11-01", end: "2026-12-01" },
        quota: { limit: 1000 },
        requests: 2,
        prompt_tokens: PROMPT,
        completion_tokens: 20,
        total_tokens: PROMPT + 20,
        cost_micros: cost,
        cost: `0.${String(cost).padStart(6, "0")}`,
      });
    });

    it("answers a postpaid customer with null balance fields and the calendar month", async () => {
      const upstream = new FakeUpstream(() => jsonResponse(200, completion(30, 7)));
      const { deps, meter, store } = setup({ upstream, clock: () => NOW });
      await handleRequest(proxyRequest({ apiKeyId: KEYS.postpaid.apiKeyId, json: chatBody() }), deps);

      const response = await handleRequest(usageRequest(KEYS.postpaid.apiKeyId), deps);

      expect(JSON.parse(response.body)).to.deep.equal({
        object: "usage",
        customer: "globex",
        plan: "metered",
        billing: "postpaid",
        currency: "usd",
        balance_micros: null,
        reserved_micros: null,
        balance: null,
        period: { type: "MONTH", start: "2026-11-01", end: "2026-12-01" },
        quota: null,
        requests: 1,
        prompt_tokens: 30,
        completion_tokens: 7,
        total_tokens: 37,
        cost_micros: 44,
        cost: "0.000044",
      });
      // Reading one's usage is metered like any request, but not counted as usage.
      expect(meter.records.map((r) => r.route)).to.deep.equal(["/v1/chat/completions", "/v1/usage"]);
      expect(meter.records[1].billed).to.equal(false);
      expect(store.calls.addUsage).to.equal(1);
    });

    it("answers 503 customer_store_unavailable when the table cannot answer", async () => {
      const { store, deps } = setup({ clock: () => NOW });
      await handleRequest(usageRequest(KEYS.acme.apiKeyId), deps);
      store.fail.add("getUsage");
      const response = await handleRequest(usageRequest(KEYS.acme.apiKeyId), deps);
      expect(response.statusCode).to.equal(503);
      expect(JSON.parse(response.body).error.code).to.equal("customer_store_unavailable");
    });
  });

  describe("POST /stripe/webhook", () => {
    const event = (id: string) =>
      JSON.stringify({
        id,
        object: "event",
        type: "checkout.session.completed",
        created: Math.floor(Date.now() / 1000),
        data: { object: { id: `cs_${id}`, object: "checkout.session", mode: "payment", payment_status: "paid", customer: "cus_acme", currency: "usd", amount_total: 500, metadata: { purpose: "credits" } } },
      });
    const webhook = (body: string, signature?: string) =>
      proxyRequest({ route: "/stripe/webhook", uri: "https://example.test/stripe/webhook", apiKeyId: undefined, headers: { "content-type": "application/json", ...(signature ? { "stripe-signature": signature } : {}) }, body: Buffer.from(body) });

    it("is served without an API key or customer lookup, credits a paid session once, and is not metered as usage", async () => {
      const { store, meter, deps, logs } = setup();
      const body = event("evt_prepaid_1");
      const signature = Stripe.webhooks.generateTestHeaderString({ payload: body, secret: WEBHOOK_SECRET });

      const first = await handleRequest(webhook(body, signature), deps);
      const replay = await handleRequest(webhook(body, signature), deps);
      recordForScan("prepaid webhook", [first.body, replay.body, ...logs]);

      expect(first.statusCode).to.equal(200);
      expect(JSON.parse(first.body)).to.include({ received: true, credited: true });
      expect(JSON.parse(replay.body)).to.include({ received: true, credited: false });
      expect(store.account("acme").balanceMicros).to.equal(500 * 10_000);
      expect(store.calls.getCustomer).to.equal(undefined);
      expect(meter.records).to.have.length(0);
    });

    it("answers 400 to a bad signature, crediting nothing", async () => {
      const { store, meter, deps } = setup();
      const body = event("evt_prepaid_2");
      const response = await handleRequest(webhook(body, Stripe.webhooks.generateTestHeaderString({ payload: body, secret: "whsec_someone_else" })), deps);
      expect(response.statusCode).to.equal(400);
      expect(JSON.parse(response.body).error.code).to.equal("invalid_signature");
      expect(store.account("acme").balanceMicros).to.equal(0);
      expect(meter.records).to.have.length(0);
    });
  });

  describe("what an OpenAI SDK sees at zero", () => {
    let server: http.Server;
    let hits = 0;
    let deps: CoreDeps;
    before(async () => {
      ({ deps } = setup({ upstream: new FakeUpstream(() => jsonResponse(200, completion(PROMPT, 1))) }));
      server = http.createServer((req, res) => {
        const parts: Buffer[] = [];
        req.on("data", (part: Buffer) => parts.push(part));
        req.on("end", async () => {
          hits += 1;
          const response = await handleRequest(chat({}, { body: Buffer.concat(parts) }), deps);
          res.writeHead(response.statusCode, response.headers).end(response.body);
        });
      });
      await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", () => resolve()));
    });
    after(() => new Promise<void>((resolve) => server.close(() => resolve())));

    it("raises RateLimitError with code insufficient_quota and does not retry", async () => {
      const client = new OpenAI({ apiKey: "caller-key", baseURL: `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`, maxRetries: 3 });
      const error = await client.chat.completions.create({ model: "gpt-4o-mini", messages: chatBody().messages as never }).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(error).to.be.instanceOf(OpenAI.RateLimitError);
      expect(error).to.include({ status: 429, code: "insufficient_quota", type: "insufficient_quota" });
      expect(hits).to.equal(1);
    });
  });

  describe("account maths", () => {
    it("reports the period the counters are kept in, with API Gateway's offsets", () => {
      const at = (iso: string) => Date.parse(iso);
      expect(usagePeriodOf(undefined, at("2026-12-31T23:59:59Z"))).to.deep.equal({ type: "MONTH", start: "2026-12-01", end: "2027-01-01" });
      expect(usagePeriodOf({ quota: { limit: 1, period: "MONTH", offset: 27 } }, at("2027-01-10T00:00:00Z"))).to.deep.equal({ type: "MONTH", start: "2026-12-28", end: "2027-01-28" });
      expect(usagePeriodOf({ quota: { limit: 1, period: "MONTH", offset: 27 } }, at("2027-02-28T00:00:00Z"))).to.deep.equal({ type: "MONTH", start: "2027-02-28", end: "2027-03-28" });
      // 2026-11-15 is a Sunday: offset 1 weeks start on Mondays.
      expect(usagePeriodOf({ quota: { limit: 1, period: "WEEK", offset: 1 } }, at("2026-11-15T12:00:00Z"))).to.deep.equal({ type: "WEEK", start: "2026-11-09", end: "2026-11-16" });
      expect(usagePeriodOf({ quota: { limit: 1, period: "DAY", offset: 0 } }, at("2026-11-15T12:00:00Z"))).to.deep.equal({ type: "DAY", start: "2026-11-15", end: "2026-11-16" });
    });

    it("replaces a null output limit by the cap, and keeps the larger of two limits as the maximum", () => {
      expect(capOutputTokens({ model: "m", max_tokens: null }, 100)).to.deep.equal({ request: { model: "m", max_completion_tokens: 100 }, changed: true, maxOutputTokens: 100 });
      expect(capOutputTokens({ max_tokens: 80, max_completion_tokens: 20 }, 100)).to.deep.include({ changed: false, maxOutputTokens: 80 });
      expect(capOutputTokens({ max_tokens: 800, max_completion_tokens: 20 }, 100)).to.deep.equal({ request: { max_tokens: 100, max_completion_tokens: 20 }, changed: true, maxOutputTokens: 100 });
      expect(capOutputTokens({ max_tokens: 800 }, undefined)).to.deep.include({ changed: false, maxOutputTokens: 800 });
    });
  });
});
