import { expect } from "chai";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import Stripe from "stripe";
import { createStripeClient, isDuplicateIdentifier } from "../../functions/usage-forwarder/stripe-sink";
import { parseStripeForm, StripeServer } from "../../scripts/local/stripe-server";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const API_KEY = "sk_test_stripe_server_suite_4242424242";
registerSecret(API_KEY);

/** Runs `call` and returns what it threw (a test failure when it did not throw). */
async function thrown(call: () => Promise<unknown>): Promise<Stripe.errors.StripeError> {
  try {
    await call();
  } catch (err) {
    recordForScan("stripe server error", [JSON.stringify(err instanceof Error ? { message: err.message, raw: (err as Stripe.errors.StripeError).raw } : err)]);
    return err as Stripe.errors.StripeError;
  }
  throw new Error("expected the call to fail");
}

const minute = (ms: number) => Math.floor(ms / 60_000) * 60;

describe("StripeServer (local Stripe stand-in, driven by the official stripe SDK)", () => {
  let server: StripeServer;
  let stripe: Stripe;
  let dir: string;

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "stripe-server-"));
    server = await new StripeServer({ apiKey: API_KEY, dbFile: path.join(dir, "stripe.db") }).start();
    stripe = createStripeClient(API_KEY, server.url);
  });
  afterEach(async () => {
    await server.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  describe("v1 POST /v1/billing/meter_events", () => {
    it("stores the meter event the SDK sends, form-encoded with the secret key", async () => {
      const timestamp = Math.floor(Date.now() / 1000) - 60;

      const event = await stripe.billing.meterEvents.create({ event_name: "ai_usage_cost", identifier: "txn-1", timestamp, payload: { stripe_customer_id: "cus_a", value: "1500" } });

      expect(event).to.include({ object: "billing.meter_event", identifier: "txn-1", event_name: "ai_usage_cost", timestamp });
      expect(server.events()).to.deep.equal([{ identifier: "txn-1", event_name: "ai_usage_cost", stripe_customer_id: "cus_a", value: 1500, timestamp, api: "v1" }]);
      expect(server.requests[0]).to.include({ method: "POST", path: "/v1/billing/meter_events", contentType: "application/x-www-form-urlencoded", auth: "secret_key" });
    });

    it("refuses an identifier it already has as Stripe does (400, no retry), and counts the event once", async () => {
      const params = { event_name: "ai_usage_cost", identifier: "txn-dup", payload: { stripe_customer_id: "cus_a", value: "7" } };
      await stripe.billing.meterEvents.create(params);

      const err = await thrown(() => stripe.billing.meterEvents.create(params));

      expect(err.statusCode).to.equal(400);
      expect(err.type).to.equal("StripeInvalidRequestError");
      expect(err.message).to.equal("An event already exists with identifier txn-dup.");
      expect(err.headers?.["stripe-should-retry"]).to.equal("false");
      expect(isDuplicateIdentifier(err)).to.equal(true);
      expect(server.totals()).to.deep.equal({ cus_a: 7 });
    });

    it("refuses a timestamp older than 35 days at once", async () => {
      const err = await thrown(() =>
        stripe.billing.meterEvents.create({ event_name: "ai_usage_cost", identifier: "old", timestamp: Math.floor(Date.now() / 1000) - 36 * 86400, payload: { stripe_customer_id: "cus_a", value: "1" } }),
      );

      expect(err.statusCode).to.equal(400);
      expect(err.message).to.match(/35 days/);
      expect(isDuplicateIdentifier(err)).to.equal(false);
      expect(server.events()).to.deep.equal([]);
    });

    it("answers 401 to a wrong key without echoing it", async () => {
      const wrongKey = "sk_test_wrong_key_for_local_server_999";
      registerSecret(wrongKey);

      const err = await thrown(() => createStripeClient(wrongKey, server.url).billing.meterEvents.create({ event_name: "ai_usage_cost", payload: { stripe_customer_id: "cus_a", value: "1" } }));

      expect(err.statusCode).to.equal(401);
      expect(JSON.stringify(err.raw)).to.not.include(wrongKey);
      expect(server.events()).to.deep.equal([]);
    });
  });

  describe("v2 meter event session + stream", () => {
    it("takes the stream on the custom host (the SDK's meter-events base follows `host`), authenticated with the session token", async () => {
      const session = await stripe.v2.billing.meterEventSession.create();
      const at = new Date(Date.now() - 60_000);

      await stripe.v2.billing.meterEventStream.create(
        {
          events: [
            { event_name: "ai_usage_cost", identifier: "s-1", timestamp: at.toISOString(), payload: { stripe_customer_id: "cus_a", value: "10" } },
            { event_name: "ai_usage_cost", identifier: "s-2", timestamp: at.toISOString(), payload: { stripe_customer_id: "cus_b", value: "20" } },
          ],
        },
        { apiKey: session.authentication_token },
      );

      expect(session.object).to.equal("v2.billing.meter_event_session");
      expect(Date.parse(session.expires_at)).to.be.greaterThan(Date.now());
      expect(server.requests.map((r) => [r.path, r.contentType, r.auth])).to.deep.equal([
        ["/v2/billing/meter_event_session", "application/json", "secret_key"],
        ["/v2/billing/meter_event_stream", "application/json", "session"],
      ]);
      expect(server.totals()).to.deep.equal({ cus_a: 10, cus_b: 20 });
      expect(server.events().map((e) => e.timestamp)).to.deep.equal([Math.floor(at.getTime() / 1000), Math.floor(at.getTime() / 1000)]);
    });

    it("drops a repeated identifier silently, as the stream de-duplicates asynchronously", async () => {
      const { authentication_token: token } = await stripe.v2.billing.meterEventSession.create();
      const event = { event_name: "ai_usage_cost", identifier: "same", payload: { stripe_customer_id: "cus_a", value: "5" } };

      await stripe.v2.billing.meterEventStream.create({ events: [event] }, { apiKey: token });
      await stripe.v2.billing.meterEventStream.create({ events: [event, { ...event, identifier: "other" }] }, { apiKey: token });

      expect(server.events().map((e) => e.identifier)).to.deep.equal(["same", "other"]);
      expect(server.totals()).to.deep.equal({ cus_a: 10 });
    });

    it("accepts but does not count what Stripe rejects while processing (too old, unknown customer), and reports it", async () => {
      await server.stop();
      server = await new StripeServer({ apiKey: API_KEY, knownCustomers: ["cus_a"] }).start();
      stripe = createStripeClient(API_KEY, server.url);
      const { authentication_token: token } = await stripe.v2.billing.meterEventSession.create();

      await stripe.v2.billing.meterEventStream.create(
        {
          events: [
            { event_name: "ai_usage_cost", identifier: "ok", payload: { stripe_customer_id: "cus_a", value: "1" } },
            { event_name: "ai_usage_cost", identifier: "old", timestamp: new Date(Date.now() - 40 * 86400_000).toISOString(), payload: { stripe_customer_id: "cus_a", value: "1" } },
            { event_name: "ai_usage_cost", identifier: "stranger", payload: { stripe_customer_id: "cus_nobody", value: "1" } },
          ],
        },
        { apiKey: token },
      );

      expect(server.events().map((e) => e.identifier)).to.deep.equal(["ok"]);
      expect(server.errorReports().map((r) => [r.identifier, r.code])).to.deep.equal([
        ["old", "timestamp_too_far_in_past"],
        ["stranger", "meter_event_customer_not_found"],
      ]);
    });

    it("answers an expired session token with Stripe's temporary_session_expired error", async () => {
      let now = Date.now();
      await server.stop();
      server = await new StripeServer({ apiKey: API_KEY, sessionTtlMs: 1000, clock: () => now }).start();
      stripe = createStripeClient(API_KEY, server.url);
      const { authentication_token: token } = await stripe.v2.billing.meterEventSession.create();
      now += 2000;

      const err = await thrown(() => stripe.v2.billing.meterEventStream.create({ events: [{ event_name: "ai_usage_cost", payload: { stripe_customer_id: "cus_a", value: "1" } }] }, { apiKey: token }));

      expect(err).to.be.instanceOf(Stripe.errors.TemporarySessionExpiredError);
      expect(err.statusCode).to.equal(401);
      expect(server.events()).to.deep.equal([]);
    });

    it("refuses the stream to the secret key (it takes session tokens only)", async () => {
      const err = await thrown(() => stripe.v2.billing.meterEventStream.create({ events: [{ event_name: "ai_usage_cost", payload: { stripe_customer_id: "cus_a", value: "1" } }] }));

      expect(err.statusCode).to.equal(401);
    });

    it("refuses more than 100 events in one call", async () => {
      const { authentication_token: token } = await stripe.v2.billing.meterEventSession.create();
      const events = Array.from({ length: 101 }, (_, i) => ({ event_name: "ai_usage_cost", identifier: `e${i}`, payload: { stripe_customer_id: "cus_a", value: "1" } }));

      const err = await thrown(() => stripe.v2.billing.meterEventStream.create({ events }, { apiKey: token }));

      expect(err.statusCode).to.equal(400);
      expect(server.events()).to.deep.equal([]);
    });
  });

  describe("Stripe's limits on identifiers and values", () => {
    it("counts an identifier again once its de-duplication window has passed on its clock, as Stripe (24 h) would", async () => {
      let now = Date.now();
      await server.stop();
      server = await new StripeServer({ apiKey: API_KEY, clock: () => now, dedupWindowMs: 60_000 }).start();
      stripe = createStripeClient(API_KEY, server.url);
      const params = { event_name: "ai_usage_cost", identifier: "txn-late", payload: { stripe_customer_id: "cus_a", value: "7" } };

      await stripe.billing.meterEvents.create(params);
      now += 59_000;
      const within = await thrown(() => stripe.billing.meterEvents.create(params));
      now += 2000;
      await stripe.billing.meterEvents.create(params);

      expect(isDuplicateIdentifier(within)).to.equal(true);
      expect(server.totals()).to.deep.equal({ cus_a: 14 });
      expect(server.events().map((e) => e.identifier)).to.deep.equal(["txn-late", "txn-late"]);
    });

    it("refuses a value of more than 15 digits (v1: 400 at once; v2: an asynchronous error report) and counts exact values", async () => {
      const sixteen = "1000000000000000";
      const fifteen = "999999999999999";

      const err = await thrown(() => stripe.billing.meterEvents.create({ event_name: "ai_usage_cost", identifier: "v1-big", payload: { stripe_customer_id: "cus_a", value: sixteen } }));
      await stripe.billing.meterEvents.create({ event_name: "ai_usage_cost", identifier: "v1-max", payload: { stripe_customer_id: "cus_a", value: fifteen } });
      const { authentication_token: token } = await stripe.v2.billing.meterEventSession.create();
      await stripe.v2.billing.meterEventStream.create(
        {
          events: [
            { event_name: "ai_usage_cost", identifier: "v2-big", payload: { stripe_customer_id: "cus_b", value: "123456789012345678901" } },
            { event_name: "ai_usage_cost", identifier: "v2-max", payload: { stripe_customer_id: "cus_b", value: fifteen } },
          ],
        },
        { apiKey: token },
      );

      expect(err.statusCode).to.equal(400);
      expect(err.message).to.match(/at most 15 digits/);
      expect(server.errorReports().map((r) => [r.identifier, r.code])).to.deep.equal([["v2-big", "meter_event_value_too_many_digits"]]);
      expect(server.events().map((e) => [e.identifier, e.value])).to.deep.equal([
        ["v1-max", 999_999_999_999_999],
        ["v2-max", 999_999_999_999_999],
      ]);
      expect(server.totals()).to.deep.equal({ cus_a: 999_999_999_999_999, cus_b: 999_999_999_999_999 });
    });
  });

  describe("meters and event summaries (for reconciliation)", () => {
    it("lists the ai_usage_cost meter and sums a customer's events in a minute-aligned window", async () => {
      const now = Date.now();
      const timestamp = Math.floor(now / 1000) - 120;
      await stripe.billing.meterEvents.create({ event_name: "ai_usage_cost", identifier: "a1", timestamp, payload: { stripe_customer_id: "cus_a", value: "300" } });
      await stripe.billing.meterEvents.create({ event_name: "ai_usage_cost", identifier: "a2", timestamp, payload: { stripe_customer_id: "cus_a", value: "45" } });
      await stripe.billing.meterEvents.create({ event_name: "ai_usage_cost", identifier: "b1", timestamp, payload: { stripe_customer_id: "cus_b", value: "9" } });

      const meters = await stripe.billing.meters.list();
      const meter = meters.data.find((m) => m.event_name === "ai_usage_cost")!;
      const summaries = await stripe.billing.meters.listEventSummaries(meter.id, { customer: "cus_a", start_time: minute(now - 86400_000), end_time: minute(now) + 60 });

      expect(meter.id).to.match(/^mtr_local_/);
      expect(meter).to.deep.include({ status: "active", default_aggregation: { formula: "sum" }, value_settings: { event_payload_key: "value" } });
      expect(summaries.data.map((s) => s.aggregated_value)).to.deep.equal([345]);
      expect(summaries.data[0]).to.include({ object: "billing.meter_event_summary", meter: meter.id });
    });

    it("groups summaries by hour when asked", async () => {
      const hour = Math.floor(Date.now() / 3600_000) * 3600;
      await stripe.billing.meterEvents.create({ event_name: "ai_usage_cost", identifier: "h1", timestamp: hour - 3600 + 5, payload: { stripe_customer_id: "cus_a", value: "2" } });
      await stripe.billing.meterEvents.create({ event_name: "ai_usage_cost", identifier: "h2", timestamp: hour - 10, payload: { stripe_customer_id: "cus_a", value: "3" } });

      const summaries = await stripe.billing.meters.listEventSummaries(server.meterId, { customer: "cus_a", start_time: hour - 7200, end_time: hour, value_grouping_window: "hour" });

      expect(summaries.data.map((s) => [s.start_time, s.aggregated_value])).to.deep.equal([
        [hour - 7200, 0],
        [hour - 3600, 5],
      ]);
    });

    it("refuses a window that is not minute-aligned, as Stripe does", async () => {
      const err = await thrown(() => stripe.billing.meters.listEventSummaries(server.meterId, { customer: "cus_a", start_time: 61, end_time: 120 }));

      expect(err.statusCode).to.equal(400);
    });
  });

  describe("persistence", () => {
    it("keeps events, the meter id and de-duplication across a restart on the same file", async () => {
      await stripe.billing.meterEvents.create({ event_name: "ai_usage_cost", identifier: "kept", payload: { stripe_customer_id: "cus_a", value: "11" } });
      const meterId = server.meterId;
      await server.stop();

      server = await new StripeServer({ apiKey: API_KEY, dbFile: path.join(dir, "stripe.db") }).start();
      stripe = createStripeClient(API_KEY, server.url);
      const err = await thrown(() => stripe.billing.meterEvents.create({ event_name: "ai_usage_cost", identifier: "kept", payload: { stripe_customer_id: "cus_a", value: "11" } }));

      expect(server.meterId).to.equal(meterId);
      expect(isDuplicateIdentifier(err)).to.equal(true);
      expect(server.totals()).to.deep.equal({ cus_a: 11 });
    });
  });

  describe("fault modes", () => {
    const create = () => stripe.billing.meterEvents.create({ event_name: "ai_usage_cost", payload: { stripe_customer_id: "cus_a", value: "1" } }, { timeout: 300 });

    it("rate_limited answers 429 with Retry-After", async () => {
      server.mode = "rate_limited";
      server.retryAfterSeconds = 7;

      const err = await thrown(create);

      expect(err.statusCode).to.equal(429);
      expect(err.headers?.["retry-after"]).to.equal("7");
    });

    it("error answers 500", async () => {
      server.mode = "error";
      expect((await thrown(create)).statusCode).to.equal(500);
    });

    it("refuse drops the connection and hang never answers (the SDK reports a connection error)", async () => {
      server.mode = "refuse";
      const refused = await thrown(create);
      server.mode = "hang";
      const hung = await thrown(create);

      expect(refused).to.be.instanceOf(Stripe.errors.StripeConnectionError);
      expect(hung).to.be.instanceOf(Stripe.errors.StripeConnectionError);
      expect(server.events()).to.deep.equal([]);
    });

    it("refuseCustomers refuses a stream call carrying that customer's event with 400", async () => {
      server.refuseCustomers.add("cus_poison");
      const { authentication_token: token } = await stripe.v2.billing.meterEventSession.create();

      const err = await thrown(() =>
        stripe.v2.billing.meterEventStream.create(
          { events: [{ event_name: "ai_usage_cost", payload: { stripe_customer_id: "cus_a", value: "1" } }, { event_name: "ai_usage_cost", payload: { stripe_customer_id: "cus_poison", value: "1" } }] },
          { apiKey: token },
        ),
      );

      expect(err.statusCode).to.equal(400);
      expect(server.events()).to.deep.equal([]);
    });
  });

  it("parses Stripe's nested form encoding", () => {
    expect(parseStripeForm("event_name=x&payload[stripe_customer_id]=cus_1&payload%5Bvalue%5D=2&identifier=a%20b")).to.deep.equal({
      event_name: "x",
      payload: { stripe_customer_id: "cus_1", value: "2" },
      identifier: "a b",
    });
  });
});
