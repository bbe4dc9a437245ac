import { expect } from "chai";
import type { LedgerItem, SinkName } from "../../functions/shared/ledger-schema";
import { createForwarderFromEnv, type CreateForwarderOptions, type UsageForwarder } from "../../functions/usage-forwarder/forwarder";
import { createStripeClient } from "../../functions/usage-forwarder/stripe-sink";
import { MoesifCollector } from "../../scripts/local/moesif-collector";
import { StripeServer } from "../../scripts/local/stripe-server";
import { recordForScan, registerSecret } from "../helpers/secret-scan";
import { eventually, LedgerFixture, ledgerItem, RateLimitingProxy } from "./ledger-fixture";

const APP_ID = "moesif-app-id-forwarder-suite-0001";
const STRIPE_KEY = "sk_test_forwarder_suite_key_5555555555";
registerSecret(APP_ID, STRIPE_KEY);

type Fault = "refuse" | "error" | "rate_limited" | "hang";

describe("usage forwarder: ledger → Moesif and Stripe (dynalite, local collector, local Stripe, real SDK)", () => {
  const ledger = new LedgerFixture();
  let collector: MoesifCollector;
  let moesifProxy: RateLimitingProxy;
  let stripe: StripeServer;
  let logs: string[];
  let forwarders: UsageForwarder[];

  const fast: CreateForwarderOptions = { backoff: { initialMs: 5, maxMs: 20, maxRetryAfterMs: 20 } };
  const make = (env: Record<string, string | undefined> = {}, options: CreateForwarderOptions = {}) => {
    const fwd = createForwarderFromEnv(
      ledger.env({
        MOESIF_BASE_URI: moesifProxy.url,
        MOESIF_APPLICATION_ID: APP_ID,
        STRIPE_BILLING: "meters",
        STRIPE_API_KEY: STRIPE_KEY,
        STRIPE_API_BASE: stripe.url,
        SINK_TIMEOUT_MS: "400",
        ...env,
      }),
      { write: (line) => logs.push(line), ...fast, ...options },
    );
    forwarders.push(fwd);
    return fwd;
  };
  const logged = (message: string) => logs.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.message === message);
  const owed = (item: LedgerItem, sink: SinkName) => item[`${sink}_state`] === "pending" || item[`${sink}_state`] === "failed";
  /** Sweeps until no item owes anything (or gives up): the back-offs are a few milliseconds here. */
  const drain = async (fwd: UsageForwarder) =>
    eventually(async () => {
      await fwd.sweep();
      return (await ledger.all()).every((i) => !owed(i, "moesif") && !owed(i, "stripe"));
    });
  const moesifCount = (id: string) => collector.events().filter((e) => e.transaction_id === id).length;
  const sumByCustomer = (items: LedgerItem[]) =>
    items.reduce<Record<string, number>>((acc, i) => ({ ...acc, [i.stripe_customer_id!]: (acc[i.stripe_customer_id!] ?? 0) + i.cost_micros! }), {});

  before(() => ledger.start());
  after(() => ledger.stop());
  beforeEach(async () => {
    // A fresh table, collector and Stripe server per test: the counts below are this test's alone.
    await ledger.newTable();
    collector = await new MoesifCollector({ applicationId: APP_ID, keepRawPayloads: "all" }).start();
    moesifProxy = await new RateLimitingProxy(collector.url).start();
    stripe = await new StripeServer({ apiKey: STRIPE_KEY }).start();
    logs = [];
    forwarders = [];
  });
  afterEach(async () => {
    // Let a sweep still running (a test that failed early) finish before its servers go.
    await Promise.all(forwarders.map((f) => f.sweep()));
    await stripe.stop();
    await moesifProxy.stop();
    await collector.stop();
    recordForScan("forwarder logs", logs);
    recordForScan("forwarder ledger items", (await ledger.all()).map((i) => JSON.stringify(i)));
    recordForScan("forwarder Moesif payloads", collector.rawPayloads);
  });

  it("delivers every item to both sinks exactly once, in batches of at most 100, and empties the backlog", async () => {
    const customers = ["cus_alice", "cus_bob", "cus_carol"];
    const billed = Array.from({ length: 230 }, (_, i) => ledgerItem({ customer: customers[i % 3], cost: 1000 + i }));
    const unbilled = Array.from({ length: 20 }, () => ledgerItem({ stripe: false, cost: 0 }));
    await ledger.put(...billed, ...unbilled);
    const fwd = make();
    const batchesBefore = collector.requests.length;

    const report = await fwd.sweep();
    const again = await fwd.sweep();

    expect(report.delivered).to.deep.equal({ moesif: 250, stripe: 230 });
    expect(again.considered).to.equal(0);
    const sent = collector.rawPayloads.flatMap((p) => (JSON.parse(p) as Array<{ transaction_id: string }>).map((e) => e.transaction_id));
    expect(sent.sort(), "each event sent once").to.deep.equal([...billed, ...unbilled].map((i) => i.transaction_id).sort());
    for (const item of [...billed, ...unbilled]) expect(moesifCount(item.transaction_id), item.transaction_id).to.equal(1);
    expect(collector.requests.length - batchesBefore).to.equal(3);
    expect(stripe.events().map((e) => e.identifier).sort()).to.deep.equal(billed.map((i) => i.transaction_id).sort());
    expect(stripe.totals()).to.deep.equal(sumByCustomer(billed));
    expect(stripe.requests.filter((r) => r.path === "/v2/billing/meter_event_stream").map((r) => r.auth)).to.deep.equal(["session", "session", "session"]);
    const stored = await ledger.all();
    expect(stored.every((i) => i.moesif_state === "delivered" && i.undelivered === undefined)).to.equal(true);
    expect(stored.filter((i) => i.stripe_state === "delivered")).to.have.length(230);
  });

  it("sends the meter event Stripe expects: ai_usage_cost, the Stripe customer, the cost as a string, the request's start time", async () => {
    const startedAt = Date.now() - 3 * 3600_000;
    const item = ledgerItem({ customer: "cus_dora", cost: 987654, startedAt, createdAt: startedAt + 2000 });
    await ledger.put(item);

    await make().sweep();

    expect(stripe.events()).to.deep.equal([{ identifier: item.transaction_id, event_name: "ai_usage_cost", stripe_customer_id: "cus_dora", value: 987654, timestamp: Math.floor(startedAt / 1000), api: "v2" }]);
  });

  for (const sink of ["moesif", "stripe"] as const) {
    for (const fault of ["refuse", "error", "rate_limited", "hang"] as const) {
      it(`leaves items pending while ${sink} is down (${fault}), marks none failed, and delivers each exactly once after it recovers`, async () => {
        const items = Array.from({ length: 30 }, (_, i) => ledgerItem({ customer: i % 2 ? "cus_alice" : "cus_bob", cost: 10 + i }));
        await ledger.put(...items);
        const fwd = make();
        setFault(sink, fault);

        const during = await fwd.sweep();
        const whileDown = await ledger.all();
        setFault(sink, "ok");
        const drained = await drain(fwd);

        expect(during.pending[sink]).to.equal(30);
        expect(during.failed).to.deep.equal({ moesif: 0, stripe: 0 });
        for (const item of whileDown) {
          expect(item[`${sink}_state`]).to.equal("pending");
          expect(item).to.not.have.any.keys(`${sink}_attempts`, `${sink}_error`, `${sink}_next_at`);
          expect(item.undelivered).to.be.a("string");
        }
        expect(logged("sink_unavailable").map((l) => l.sink)).to.include(sink);
        expect(drained).to.equal(true);
        for (const item of items) expect(moesifCount(item.transaction_id)).to.equal(1);
        expect(stripe.events()).to.have.length(30);
        expect(stripe.totals()).to.deep.equal(sumByCustomer(items));
        expect((await ledger.all()).every((i) => i.moesif_state === "delivered" && i.stripe_state === "delivered" && !i.undelivered)).to.equal(true);
      });
    }
  }

  function setFault(sink: SinkName, fault: Fault | "ok"): void {
    if (sink === "stripe") {
      stripe.mode = fault;
      stripe.retryAfterSeconds = 30;
      return;
    }
    moesifProxy.rateLimited = fault === "rate_limited";
    moesifProxy.retryAfterSeconds = 30;
    collector.mode = fault === "rate_limited" || fault === "ok" ? "ok" : fault;
  }

  for (const api of ["v2", "v1"] as const) {
    it(`fails the one meter event Stripe refuses (400) and delivers its batch-mates (${api})`, async () => {
      const items = Array.from({ length: 12 }, (_, i) => ledgerItem({ customer: i === 5 ? "cus_poison" : "cus_alice", cost: 100 }));
      await ledger.put(...items);
      stripe.refuseCustomers.add("cus_poison");
      const before = Date.now();

      const report = await make({ STRIPE_METER_API: api }).sweep();

      const poison = (await ledger.get(items[5].transaction_id))!;
      expect(report.delivered).to.deep.equal({ moesif: 12, stripe: 11 });
      expect(report.failed).to.deep.equal({ moesif: 0, stripe: 1 });
      expect(poison).to.include({ stripe_state: "failed", stripe_attempts: 1, moesif_state: "delivered", undelivered: items[5].undelivered });
      expect(poison.stripe_error).to.match(/HTTP 400.*No such customer: 'cus_poison'/);
      expect(poison.stripe_next_at).to.be.at.least(before + 2 * 60_000);
      expect(stripe.totals()).to.deep.equal({ cus_alice: 1100 });
      expect(logged("delivery_refused")).to.have.length(1);
    });
  }

  it("treats an identifier Stripe already has as delivered (v1 duplicate refusal)", async () => {
    const items = [ledgerItem({ cost: 500 }), ledgerItem({ cost: 700 })];
    await ledger.put(...items);
    await createStripeClient(STRIPE_KEY, stripe.url).billing.meterEvents.create({
      event_name: "ai_usage_cost",
      identifier: items[0].transaction_id,
      timestamp: Math.floor(items[0].started_at / 1000),
      payload: { stripe_customer_id: "cus_alice", value: "500" },
    });

    const report = await make({ STRIPE_METER_API: "v1" }).sweep();

    expect(report.delivered.stripe).to.equal(2);
    expect(report.failed.stripe).to.equal(0);
    expect(stripe.totals()).to.deep.equal({ cus_alice: 1200 });
    expect(stripe.requests.filter((r) => r.path === "/v1/billing/meter_events").map((r) => r.status)).to.deep.equal([200, 400, 200]);
  });

  it("renews an expired meter event session and delivers", async () => {
    let stripeNow = Date.now();
    await stripe.stop();
    stripe = await new StripeServer({ apiKey: STRIPE_KEY, clock: () => stripeNow }).start();
    const fwd = make();
    await ledger.put(ledgerItem());
    await fwd.sweep();
    // Stripe's clock runs ahead of the forwarder's: the cached token has expired there.
    stripeNow += 20 * 60_000;
    const item = ledgerItem();
    await ledger.put(item);

    const report = await fwd.sweep();

    expect(report.delivered.stripe).to.equal(1);
    expect(stripe.requests.map((r) => [r.path, r.status])).to.deep.equal([
      ["/v2/billing/meter_event_session", 200],
      ["/v2/billing/meter_event_stream", 200],
      ["/v2/billing/meter_event_stream", 401],
      ["/v2/billing/meter_event_session", 200],
      ["/v2/billing/meter_event_stream", 200],
    ]);
  });

  it("fails, without sending, a meter event older than the 35 days Stripe accepts (Moesif still gets it)", async () => {
    const old = Date.now() - 36 * 86400_000;
    const item = ledgerItem({ startedAt: old, createdAt: old + 1000 });
    await ledger.put(item);

    const report = await make().sweep();

    const stored = (await ledger.get(item.transaction_id))!;
    expect(report.failed.stripe).to.equal(1);
    expect(stored).to.include({ stripe_state: "failed", moesif_state: "delivered" });
    expect(stored.stripe_error).to.match(/older than the 35 days/);
    expect(stripe.requests).to.deep.equal([]);
  });

  it("sends nothing to Stripe with STRIPE_BILLING=moesif, leaving what an item owes Stripe pending", async () => {
    const item = ledgerItem();
    await ledger.put(item);

    const report = await make({ STRIPE_BILLING: "moesif" }).sweep();

    expect(report.delivered).to.deep.equal({ moesif: 1, stripe: 0 });
    expect(stripe.requests).to.deep.equal([]);
    expect(await ledger.get(item.transaction_id)).to.include({ stripe_state: "pending", moesif_state: "delivered" });
  });

  it("keeps the Moesif application id, the Stripe key and the session token out of logs and items, even when refused", async () => {
    const wrongKey = "sk_test_wrong_forwarder_key_77777777";
    registerSecret(wrongKey);
    const item = ledgerItem();
    await ledger.put(item);

    const refused = await make({ STRIPE_API_KEY: wrongKey, MOESIF_APPLICATION_ID: "moesif-wrong-app-id-0002", LOG_LEVEL: "debug" }).sweep();
    const delivered = await make({ LOG_LEVEL: "debug" }).sweep();

    const text = logs.join("\n") + JSON.stringify(await ledger.all());
    expect(refused.pending).to.deep.equal({ moesif: 1, stripe: 1 });
    expect(logged("sink_unavailable").map((l) => [l.sink, String(l.reason).match(/HTTP \d+/)?.[0]])).to.deep.include.members([
      ["moesif", "HTTP 401"],
      ["stripe", "HTTP 401"],
    ]);
    expect(delivered.delivered).to.deep.equal({ moesif: 1, stripe: 1 });
    for (const secret of [APP_ID, STRIPE_KEY, wrongKey, "moesif-wrong-app-id-0002"]) expect(text).to.not.include(secret);
    expect(text).to.not.match(/mes_token_local_/);
    registerSecret("moesif-wrong-app-id-0002");
  });

  it("reads the secrets from SSM parameters when named, and keeps items pending while they cannot be read", async () => {
    const item = ledgerItem();
    await ledger.put(item);
    let ssmUp = false;
    const reader = {
      read: async (names: string[]) => {
        if (!ssmUp) throw new Error("SSM unavailable (AccessDeniedException)");
        return Object.fromEntries(names.map((n) => [n, n === "/app/moesif" ? APP_ID : STRIPE_KEY]));
      },
    };
    const fwd = make({ MOESIF_APPLICATION_ID: undefined, STRIPE_API_KEY: undefined, MOESIF_APPLICATION_ID_PARAMETER: "/app/moesif", STRIPE_API_KEY_PARAMETER: "/app/stripe" }, { parameterReader: reader, secretsRetryAfterMs: 10 });

    const without = await fwd.sweep();
    ssmUp = true;
    const drained = await eventually(async () => {
      await fwd.sweep();
      const stored = await ledger.get(item.transaction_id);
      return stored?.moesif_state === "delivered" && stored.stripe_state === "delivered";
    });

    expect(without.pending).to.deep.equal({ moesif: 1, stripe: 1 });
    expect(logged("secrets_unavailable")).to.not.have.length(0);
    expect(drained).to.equal(true);
  });
});
