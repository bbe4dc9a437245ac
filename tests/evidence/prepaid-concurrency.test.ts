import { expect } from "chai";
import OpenAI from "openai";
import type { LedgerItem } from "../../functions/shared/ledger-schema";
import { ledgerItems, useLocalStack, waitUntil } from "../helpers/local-project";
import { chat, chatBody, itemOf, PREPAID_STACK_YAML, pollAccount, sum, topUp, type Outcome } from "./prepaid-fixture";

const CALLERS = 50;
const ANSWERS = 10;

/** One answer of a scenario, as the ledger of a calibration request (customer `calibration`, same plan) says. */
interface Calibration {
  reserved: number;
  cost: number;
}

describe("prepaid credits: 50 concurrent requests against a balance worth exactly 10 answers (evidence)", function () {
  this.timeout(120_000);
  // The subject is the balance under concurrency, not the store's latency: with the default 1 s bounds, a loaded
  // machine (three of these suites at once on two cores) made 1 to 49 of the 50 reservations time out, which the
  // function rightly answers 503 credit_store_unavailable (fail closed), and a ledger write that times out leaves
  // no ledger item (its fallback is the direct Moesif send). Store outages are the ledger-outage suite's subject.
  const local = useLocalStack("prepaid-concurrency", { LOG_LEVEL: "warn", CUSTOMERS_TIMEOUT_MS: "10000", LEDGER_TIMEOUT_MS: "10000" }, PREPAID_STACK_YAML);

  before(async () => {
    await topUp(local.stack.customers.store, "calibration", 1_000_000);
  });

  async function itemsOf(customerId: string): Promise<LedgerItem[]> {
    return (await ledgerItems(local.stack)).filter((item) => item.customer_id === customerId);
  }

  /** Requests the built-in model server received whose last user message was `said`. */
  function upstreamCalls(said: string): number {
    return local.stack.upstream!.received.filter((r) => {
      try {
        return (JSON.parse(r.body) as { messages?: Array<{ content?: unknown }> }).messages?.at(-1)?.content === said;
      } catch {
        return false;
      }
    }).length;
  }

  /**
   * Sends `body` once as the calibration customer, read to the end, and returns what its ledger item says one answer
   * reserves and costs; checks the plan is set up as the scenario needs (a reservation above the cost, no shortfall).
   */
  async function calibrate(body: string): Promise<Calibration> {
    const outcome = await chat(local.stack.baseUrl, local.stack.apiKeys.calibration, body);
    expect(outcome.status, JSON.stringify(outcome)).to.equal(200);
    const item = await waitUntil("the calibration request's ledger item", async () => (await ledgerItems(local.stack)).find((i) => i.request_id === outcome.requestId));
    expect(item).to.include({ billed: true, billing_mode: "prepaid", settlement: "settled", shortfall_micros: 0, client_disconnected: false });
    expect(item.completion_tokens, "the answer fits the plan's cap of 16 output tokens").to.be.at.most(16);
    expect(item.charged_micros).to.equal(item.cost_micros);
    const calibration = { reserved: item.reserved_micros!, cost: item.cost_micros! };
    expect(calibration.cost).to.be.above(0);
    expect(calibration.reserved, "a reservation holds more than the answer costs (prompt + the cap)").to.be.above(calibration.cost);
    return calibration;
  }

  interface Run {
    initial: number;
    calibration: Calibration;
    outcomes: Outcome[];
    served: Outcome[];
    refused: Outcome[];
    items: LedgerItem[];
    servedItems: LedgerItem[];
    finalBalance: number;
    poll: { reads: number; minBalance: number; minReserved: number; maxHolds: number };
  }

  /**
   * Tops `customer` up with exactly ten calibrated answers, fires 50 identical requests at once while a poller reads
   * the account, waits until every request has its ledger item and no hold is left, and checks what holds for every
   * scenario: each caller got 200 or 429 insufficient_quota (x-should-retry: false), the balance was never negative,
   * each request has one ledger item, and the balance moved by exactly what the served requests' items say.
   */
  async function run(customer: string, said: string, extra: Record<string, unknown>, disconnect = false): Promise<Run> {
    const store = local.stack.customers.store;
    const body = chatBody(said, extra);
    const calibration = await calibrate(body);
    const initial = ANSWERS * calibration.cost;
    expect(await topUp(store, customer, initial), "a customer no one has spent from yet").to.equal(initial);

    const poller = pollAccount(store, customer);
    const outcomes = await Promise.all(
      Array.from({ length: CALLERS }, () => chat(local.stack.baseUrl, local.stack.apiKeys[customer], body, { disconnectAfterContent: disconnect })),
    );
    // The function settles after the answer (or the disconnect) and then writes the ledger item: wait for both.
    const items = await waitUntil(`${CALLERS} ledger items of ${customer} and no open hold`, async () => {
      const found = await itemsOf(customer);
      const account = await store.getBalance(customer);
      return found.length >= CALLERS && account.reservedMicros === 0 ? found : undefined;
    }).catch(async (err: Error) => {
      // Say which holds are left and what their requests' ledger items and log lines say.
      const account = await store.getBalance(customer);
      const found = await itemsOf(customer);
      const left = Object.keys(account.holds).map((tx) => {
        const item = found.find((i) => i.transaction_id === tx);
        const lines = item ? local.logs.filter((line) => line.includes(item.request_id)) : [];
        return { tx, hold: account.holds[tx], item: item && { request_id: item.request_id, status: item.status, billed: item.billed, settlement: item.settlement }, lines };
      });
      throw new Error(`${err.message}: ${found.length} items; holds left: ${JSON.stringify(left)}`);
    });
    const poll = await poller.stop();
    const account = await store.getBalance(customer);

    const served = outcomes.filter((o) => o.status === 200);
    const refused = outcomes.filter((o) => o.status === 429);
    const figures = `${customer}: ${served.length} served, ${refused.length} refused; reservation ${calibration.reserved}, answer ${calibration.cost} micro-units`;
    // The figures the report quotes (the suite's own output; nothing is asserted on time).
    console.log(`      ${figures}; balance ${initial} -> ${account.balanceMicros}; ${poll.reads} account reads during the run, lowest balance seen ${poll.minBalance}, most holds at once ${poll.maxHolds}`);
    const others = outcomes.filter((o) => o.status !== 200 && o.status !== 429);
    // On failure, say why from the function's own log lines about those requests.
    const why = local.logs.filter((line) => others.some((o) => o.requestId && line.includes(o.requestId) && !line.includes('"message":"request"')));
    expect(served.length + refused.length, `every caller got 200 or 429: ${others.length} did not, e.g. ${JSON.stringify(others[0])}; the function logged: ${why.slice(0, 3).join("\n")}`).to.equal(CALLERS);
    for (const outcome of refused) {
      expect(outcome.error, JSON.stringify(outcome)).to.include({ type: "insufficient_quota", code: "insufficient_quota" });
      expect(outcome.shouldRetry, "the OpenAI SDKs do not retry a 429 that says x-should-retry: false").to.equal("false");
    }
    // Whatever the order, the first floor(initial / reservation) reservations find the balance covering them.
    expect(served.length, figures).to.be.at.least(Math.floor(initial / calibration.reserved));

    expect(poll.reads, "the poller read the account during the run").to.be.above(0);
    expect(poll.minBalance, "the balance is never negative, at any moment of the run").to.be.at.least(0);
    expect(poll.minReserved).to.be.at.least(0);

    // One ledger item per request, refused ones included; refused ones held and charged nothing.
    expect(items).to.have.length(CALLERS);
    expect(new Set(items.map((i) => i.request_id))).to.deep.equal(new Set(outcomes.map((o) => o.requestId)));
    for (const outcome of refused) {
      expect(itemOf(items, outcome.requestId)).to.include({ status: 429, billed: false, billing_mode: "prepaid", reserved_micros: 0, charged_micros: 0 });
    }
    const servedItems = served.map((o) => itemOf(items, o.requestId));
    for (const item of servedItems) {
      expect(item, item.request_id).to.include({ status: 200, billed: true, billing_mode: "prepaid", settlement: "settled", reserved_micros: calibration.reserved, shortfall_micros: 0 });
      expect(item.charged_micros, item.request_id).to.equal(item.cost_micros);
      expect(item.balance_after_micros, item.request_id).to.be.at.least(0);
    }
    // The requests the balance did not cover never reached the model server.
    expect(upstreamCalls(said), "model server calls: the calibration and the served requests").to.equal(1 + served.length);

    // The money: charged = cost, exactly; the balance moved by exactly that; nothing is left held.
    expect(sum(servedItems, "charged_micros")).to.equal(sum(servedItems, "cost_micros"));
    expect(sum(items, "charged_micros"), "only served requests are charged").to.equal(sum(servedItems, "charged_micros"));
    expect(account.balanceMicros, figures).to.equal(initial - sum(servedItems, "charged_micros"));
    expect(account.reservedMicros).to.equal(0);
    expect(account.holds).to.deep.equal({});
    expect(account.balanceMicros).to.be.at.least(0);

    // What the customer sees.
    const usage = await fetch(`${local.stack.baseUrl}/v1/usage`, { headers: { "x-api-key": local.stack.apiKeys[customer] } });
    expect(usage.status).to.equal(200);
    expect(await usage.json()).to.include({ customer, billing: "prepaid", balance_micros: account.balanceMicros, reserved_micros: 0, cost_micros: sum(servedItems, "cost_micros") });

    return { initial, calibration, outcomes, served, refused, items, servedItems, finalBalance: account.balanceMicros, poll };
  }

  /**
   * The most that can be served when every answer costs `cost`: the last one reserved found a whole reservation
   * left after the others took at least their cost, so initial − (n − 1) × cost ≥ reservation.
   */
  const mostServed = (r: Run) => 1 + Math.floor((r.initial - r.calibration.reserved) / r.calibration.cost);

  it("buffered answers: at most 10 served, the rest 429 insufficient_quota, and the balance ends at initial − Σ charged, exactly", async () => {
    const r = await run("buyer", "ten buffered answers", {});
    expect(r.served.length, "a balance worth 10 answers serves at most 10").to.be.at.most(ANSWERS);
    expect(r.served.length, "the last one served found a whole reservation left after the others' cost").to.be.at.most(mostServed(r));
    for (const item of r.servedItems) expect(item.cost_micros).to.equal(r.calibration.cost);
    expect(r.finalBalance).to.equal(r.initial - r.served.length * r.calibration.cost);
  });

  it("streams (SSE): at most 10 served, each whole, the rest 429 before any event, and the balance ends exact", async () => {
    const r = await run("streamer", "ten streamed answers", { stream: true });
    expect(r.served.length, "a balance worth 10 answers serves at most 10").to.be.at.most(ANSWERS);
    expect(r.served.length, "the last one served found a whole reservation left after the others' cost").to.be.at.most(mostServed(r));
    for (const outcome of r.served) expect(outcome.content).to.equal("Hello! You said: ten streamed answers");
    for (const item of r.servedItems) expect(item).to.include({ streamed: true, client_disconnected: false, cost_micros: r.calibration.cost });
    expect(r.finalBalance).to.equal(r.initial - r.served.length * r.calibration.cost);
  });

  it("streams whose callers disconnect after the first words: each billed what the ledger says, released the rest, and the balance ends exact", async () => {
    // 200 ms between chunks: the answer takes ~2 s, the callers leave after its first word.
    const said = "ten abandoned streams";
    const r = await run("leaver", said, { stream: true, mock: { chunk_delay_ms: 200 } }, true);
    for (const outcome of r.served) expect(outcome.disconnected, JSON.stringify(outcome)).to.equal(true);
    for (const item of r.servedItems) {
      expect(item, item.request_id).to.include({ streamed: true, client_disconnected: true });
      expect(item.cost_micros!, "a disconnected stream costs at most the whole answer").to.be.at.most(r.calibration.cost);
    }
    // The model server saw every served stream aborted before its end (the calibration stream alone finished).
    const streams = local.stack.upstream!.streams.filter((s) => s.said === said);
    expect(streams.filter((s) => s.aborted)).to.have.length(r.served.length);
    expect(streams.filter((s) => s.finished)).to.have.length(1);
    expect(sum(r.servedItems, "charged_micros"), "never more than the balance held").to.be.at.most(r.initial);
  });

  it("the official openai SDK gets the 429 insufficient_quota once and does not retry it (x-should-retry: false)", async () => {
    const store = local.stack.customers.store;
    const said = "one answer too many";
    const { reserved } = await calibrate(chatBody(said));
    // A balance one micro-unit short of the reservation: not zero, and still not enough.
    await topUp(store, "sdk", reserved - 1);

    /** The SDK's requests, counted as they leave it; `strip` removes x-should-retry from the answers it gets. */
    const counting = (strip: boolean) => {
      const statuses: number[] = [];
      const fetchFn = async (url: string | URL | Request, init?: RequestInit): Promise<Response> => {
        const response = await fetch(url, init);
        statuses.push(response.status);
        if (!strip) return response;
        const headers = new Headers(response.headers);
        headers.delete("x-should-retry");
        return new Response(await response.arrayBuffer(), { status: response.status, headers });
      };
      return { statuses, fetchFn };
    };
    const ask = async (strip: boolean) => {
      const seen = counting(strip);
      // maxRetries 2 is the SDK's default, given so the control's count is known.
      const client = new OpenAI({ baseURL: `${local.stack.baseUrl}/v1`, apiKey: local.stack.apiKeys.sdk, maxRetries: 2, fetch: seen.fetchFn });
      const error = await client.chat.completions.create({ model: "gpt-4o-mini", messages: [{ role: "user", content: said }] }).then(
        () => undefined,
        (err: unknown) => err,
      );
      return { error, statuses: seen.statuses };
    };

    const obeyed = await ask(false);
    expect(obeyed.error).to.be.instanceOf(OpenAI.RateLimitError);
    const error = obeyed.error as InstanceType<typeof OpenAI.RateLimitError>;
    expect(error.status).to.equal(429);
    expect(error.code).to.equal("insufficient_quota");
    expect(error.type).to.equal("insufficient_quota");
    expect(obeyed.statuses, "one request, no retry").to.deep.equal([429]);
    const items = await waitUntil("the SDK request's ledger item", async () => ((await itemsOf("sdk")).length > 0 ? itemsOf("sdk") : undefined));
    expect(items, "the gateway saw one request").to.have.length(1);

    // Control: the same 429 without the header is retried by the SDK (it retries 429 by default), so the count above
    // is the header's doing.
    const control = await ask(true);
    expect(control.error).to.be.instanceOf(OpenAI.RateLimitError);
    expect(control.statuses).to.deep.equal([429, 429, 429]);
    await waitUntil("the control's three ledger items", async () => ((await itemsOf("sdk")).length >= 4 ? true : undefined));

    expect(upstreamCalls(said), "only the calibration reached the model server").to.equal(1);
    const account = await store.getBalance("sdk");
    expect(account).to.include({ balanceMicros: reserved - 1, reservedMicros: 0 });
  });
});
