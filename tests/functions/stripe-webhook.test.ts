import { expect } from "chai";
import { buildSync } from "esbuild";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import Stripe from "stripe";
import type { Plan } from "../../functions/ai-chat/config";
import { createLogger } from "../../functions/ai-chat/logger";
import { handleStripeWebhook, type StripeWebhookDeps } from "../../functions/ai-chat/stripe-webhook";
import type { CreditArgs, CreditResult, CustomerRecord, CustomerStore } from "../../functions/shared/customer-port";
import { CustomerStoreError } from "../../functions/shared/customer-port";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const SECRET = "whsec_test_webhook_secret_0123456789abcdef";
const OTHER_SECRET = "whsec_some_other_endpoint_secret_98765";
registerSecret(SECRET, OTHER_SECRET);

/** The function's clock in every test: the signatures are made relative to it, so no test depends on real time. */
const NOW_MS = 1_800_000_000_000;
const NOW_S = NOW_MS / 1000;

const PLANS: Record<string, Plan> = {
  usd: { pricing: { currency: "usd", prices: { "gpt-4o-mini": { input: 150_000, output: 600_000 } } } },
  jpy: { pricing: { currency: "jpy", prices: { "gpt-4o-mini": { input: 20_000_000, output: 90_000_000 } } } },
  kwd: { pricing: { currency: "kwd", prices: { "gpt-4o-mini": { input: 45_000, output: 180_000 } } } },
  unpriced: {},
};

const CUSTOMERS: CustomerRecord[] = [
  { apiKeyId: "key-acme", customerId: "acme", plan: "usd", stripeCustomerId: "cus_acme", status: "active" },
  { apiKeyId: "key-tokyo", customerId: "tokyo", plan: "jpy", stripeCustomerId: "cus_tokyo", status: "active" },
  { apiKeyId: "key-kuwait", customerId: "kuwait", plan: "kwd", stripeCustomerId: "cus_kuwait", status: "active" },
  { apiKeyId: "key-free", customerId: "free", plan: "unpriced", stripeCustomerId: "cus_free", status: "active" },
];

/**
 * The two store methods the webhook calls, with the real store's credit rules: a credit id is applied once, an
 * account keeps the currency it was first written in. `failing` makes every call reject as DynamoDB would.
 */
class MemoryCreditStore implements Pick<CustomerStore, "findByStripeCustomer" | "credit"> {
  readonly balances = new Map<string, { currency: string; micros: number }>();
  readonly applied = new Map<string, CreditArgs>();
  readonly calls: string[] = [];
  failing = false;

  async findByStripeCustomer(stripeCustomerId: string): Promise<CustomerRecord | undefined> {
    this.calls.push(`find:${stripeCustomerId}`);
    if (this.failing) throw new CustomerStoreError("customers table did not answer within 1000 ms");
    return CUSTOMERS.find((c) => c.stripeCustomerId === stripeCustomerId);
  }

  async credit(args: CreditArgs): Promise<CreditResult> {
    this.calls.push(`credit:${args.creditId}`);
    if (this.failing) throw new CustomerStoreError("customers table did not answer within 1000 ms");
    const account = this.balances.get(args.customerId) ?? { currency: args.currency, micros: 0 };
    if (account.currency !== args.currency) return { applied: false, reason: "currency_mismatch", balanceMicros: account.micros };
    if (this.applied.has(args.creditId)) return { applied: false, reason: "duplicate", balanceMicros: account.micros };
    this.applied.set(args.creditId, args);
    account.micros += args.micros;
    this.balances.set(args.customerId, account);
    return { applied: true, balanceMicros: account.micros };
  }

  balance(customerId: string): number {
    return this.balances.get(customerId)?.micros ?? 0;
  }
}

let eventCounter = 0;

/** A Stripe event as delivered (the fields the handler reads, plus some it must never log). */
function stripeEvent(type: string, object: Record<string, unknown>, id = `evt_test_${++eventCounter}`): string {
  return JSON.stringify(
    { id, object: "event", api_version: "2025-10-29.clover", created: NOW_S - 2, livemode: false, type, data: { object } },
    null,
    2,
  );
}

/** A Checkout Session in payment mode, paid: what a credit purchase completes with. */
function session(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    id: "cs_test_a1b2c3",
    object: "checkout.session",
    mode: "payment",
    payment_status: "paid",
    status: "complete",
    customer: "cus_acme",
    currency: "usd",
    amount_subtotal: 2500,
    amount_total: 2500,
    customer_details: { email: "buyer-private@example.com" },
    metadata: { purpose: "credits" },
    ...overrides,
  };
}

function invoice(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return { id: "in_test_credits_1", object: "invoice", status: "paid", customer: "cus_acme", currency: "usd", amount_due: 10_000, amount_paid: 10_000, metadata: { purpose: "credits" }, ...overrides };
}

/** The `stripe-signature` header Stripe would send for `payload`, made with the SDK's own test helper. */
function sign(payload: string, options: { secret?: string; timestamp?: number } = {}): string {
  return Stripe.webhooks.generateTestHeaderString({ payload, secret: options.secret ?? SECRET, timestamp: options.timestamp ?? NOW_S - 1 });
}

interface Harness {
  store: MemoryCreditStore;
  logs: string[];
  deps: StripeWebhookDeps;
  /** Delivers a body with its headers and records what came back for the secret scan. */
  deliver(body: string | Buffer, headers?: Record<string, string>): Promise<{ status: number; body: Record<string, unknown> }>;
}

function harness(overrides: Partial<StripeWebhookDeps> = {}): Harness {
  const store = new MemoryCreditStore();
  const logs: string[] = [];
  // No redaction configured: a leak must show up here, not be hidden by the logger's last line of defence.
  const log = createLogger({ level: "debug", write: (line) => logs.push(line) });
  const deps: StripeWebhookDeps = { store, plans: PLANS, secret: SECRET, log, clock: () => NOW_MS, ...overrides };
  return {
    store,
    logs,
    deps,
    async deliver(body, headers) {
      const raw = typeof body === "string" ? Buffer.from(body, "utf8") : body;
      const response = await handleStripeWebhook(raw, headers ?? { "stripe-signature": sign(raw.toString("utf8")) }, deps);
      recordForScan("stripe-webhook response", [response.body, JSON.stringify(response.headers)]);
      recordForScan("stripe-webhook log", logs);
      return { status: response.statusCode, body: JSON.parse(response.body) as Record<string, unknown> };
    },
  };
}

/** The one `stripe_webhook` line a call logged (and a check that it is the only one). */
function webhookLine(logs: string[]): Record<string, unknown> {
  const lines = logs.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.message === "stripe_webhook");
  expect(lines, "one stripe_webhook line per call").to.have.length(1);
  return lines[0];
}

function expectInvalidSignature(result: { status: number; body: Record<string, unknown> }): void {
  expect(result.status).to.equal(400);
  expect(result.body).to.deep.equal({
    error: { message: "The Stripe-Signature header is missing, invalid or too old for this body.", type: "invalid_request_error", param: null, code: "invalid_signature" },
  });
}

describe("handleStripeWebhook", () => {
  describe("crediting a paid Checkout Session", () => {
    it("credits amount_total converted to micro-units once, and a replayed delivery credits nothing more", async () => {
      const h = harness();
      const body = stripeEvent("checkout.session.completed", session());
      const headers = { "stripe-signature": sign(body) };

      const first = await h.deliver(body, headers);
      const replay = await h.deliver(body, headers);

      expect(first).to.deep.equal({ status: 200, body: { received: true, credited: true } });
      expect(replay).to.deep.equal({ status: 200, body: { received: true, credited: false, reason: "duplicate" } });
      expect(h.store.balance("acme")).to.equal(25_000_000); // $25.00 = 2500 cents × 10,000 micros
      expect(h.store.applied.get("stripe:cs_test_a1b2c3")).to.deep.include({ customerId: "acme", currency: "usd", micros: 25_000_000, source: "stripe_checkout", now: NOW_MS });
    });

    it("credits a Session once when both completed and async_payment_succeeded arrive for it", async () => {
      const h = harness();

      const completed = await h.deliver(stripeEvent("checkout.session.completed", session()));
      const succeeded = await h.deliver(stripeEvent("checkout.session.async_payment_succeeded", session()));

      expect(completed.body).to.deep.equal({ received: true, credited: true });
      expect(succeeded.body).to.deep.equal({ received: true, credited: false, reason: "duplicate" });
      expect(h.store.balance("acme")).to.equal(25_000_000);
    });

    it("credits a delayed payment when async_payment_succeeded follows an unpaid completed", async () => {
      const h = harness();

      const completed = await h.deliver(stripeEvent("checkout.session.completed", session({ payment_status: "unpaid" })));
      const succeeded = await h.deliver(stripeEvent("checkout.session.async_payment_succeeded", session()));

      expect(completed.body).to.deep.equal({ received: true, credited: false, reason: "not_paid" });
      expect(succeeded.body).to.deep.equal({ received: true, credited: true });
      expect(h.store.balance("acme")).to.equal(25_000_000);
    });

    it("finds the customer when the event carries the Customer object expanded", async () => {
      const h = harness();

      const result = await h.deliver(stripeEvent("checkout.session.completed", session({ customer: { id: "cus_acme", object: "customer" } })));

      expect(result.body).to.deep.equal({ received: true, credited: true });
      expect(h.store.balance("acme")).to.equal(25_000_000);
    });

    it("converts zero-decimal JPY and three-decimal KWD amounts exactly", async () => {
      const h = harness();

      await h.deliver(stripeEvent("checkout.session.completed", session({ id: "cs_jpy", customer: "cus_tokyo", currency: "jpy", amount_total: 1234 })));
      await h.deliver(stripeEvent("checkout.session.completed", session({ id: "cs_kwd", customer: "cus_kuwait", currency: "kwd", amount_total: 1234 })));

      expect(h.store.balance("tokyo")).to.equal(1_234_000_000); // ¥1234: the API's amount is whole yen
      expect(h.store.balance("kuwait")).to.equal(1_234_000); // 1.234 KWD: the API's amount is in fils (thousandths)
    });

    it("reads the signature header whatever the case of its name", async () => {
      const h = harness();
      const body = stripeEvent("checkout.session.completed", session());

      const result = await h.deliver(body, { "Stripe-Signature": sign(body) });

      expect(result.body).to.deep.equal({ received: true, credited: true });
    });

    it("accepts a signature exactly as old as the tolerance", async () => {
      const h = harness();
      const body = stripeEvent("checkout.session.completed", session());

      const result = await h.deliver(body, { "stripe-signature": sign(body, { timestamp: NOW_S - 300 }) });

      expect(result.body).to.deep.equal({ received: true, credited: true });
    });
  });

  describe("crediting an invoice", () => {
    it("credits amount_paid of an invoice marked metadata.purpose = credits", async () => {
      const h = harness();

      const result = await h.deliver(stripeEvent("invoice.paid", invoice()));

      expect(result.body).to.deep.equal({ received: true, credited: true });
      expect(h.store.applied.get("stripe:in_test_credits_1")).to.deep.include({ micros: 100_000_000, source: "stripe_invoice" });
    });

    it("ignores a paid invoice that is not a credit pack (a subscription's, say)", async () => {
      const h = harness();

      const result = await h.deliver(stripeEvent("invoice.paid", invoice({ metadata: {} })));

      expect(result.body).to.deep.equal({ received: true, credited: false, reason: "not_credit_invoice" });
      expect(h.store.calls).to.deep.equal([]);
    });
  });

  describe("refusing what Stripe did not sign", () => {
    const cases: Array<[string, (body: string) => { body: string | Buffer; headers: Record<string, string> }]> = [
      ["a missing stripe-signature header", (body) => ({ body, headers: {} })],
      ["a malformed signature", (body) => ({ body, headers: { "stripe-signature": `t=${NOW_S - 1},v1=${"0".repeat(64)}` } })],
      ["a header without a v1 signature", (body) => ({ body, headers: { "stripe-signature": `t=${NOW_S - 1}` } })],
      ["a signature made with another endpoint's secret", (body) => ({ body, headers: { "stripe-signature": sign(body, { secret: OTHER_SECRET }) } })],
      ["a timestamp older than 300 s", (body) => ({ body, headers: { "stripe-signature": sign(body, { timestamp: NOW_S - 301 }) } })],
      [
        "a body altered by one byte",
        (body) => {
          const altered = Buffer.from(body, "utf8");
          const at = altered.indexOf("2500");
          altered[at] = "9".charCodeAt(0); // amount_total 2500 → 9500, signature of the original
          return { body: altered, headers: { "stripe-signature": sign(body) } };
        },
      ],
      ["a body re-serialised from the parsed JSON", (body) => ({ body: JSON.stringify(JSON.parse(body)), headers: { "stripe-signature": sign(body) } })],
    ];
    for (const [name, make] of cases) {
      it(`answers 400 invalid_signature and changes nothing for ${name}`, async () => {
        const h = harness();
        const { body, headers } = make(stripeEvent("checkout.session.completed", session()));

        const result = await h.deliver(body, headers);

        expectInvalidSignature(result);
        expect(h.store.calls).to.deep.equal([]);
        expect(h.store.balance("acme")).to.equal(0);
      });
    }

    it("logs which check failed without logging the header or the body", async () => {
      const h = harness();
      const body = stripeEvent("checkout.session.completed", session());
      const stale = sign(body, { timestamp: NOW_S - 301 });

      await h.deliver(body, { "stripe-signature": stale });

      const line = webhookLine(h.logs);
      expect(line).to.deep.include({ level: "warn", reason: "stale_timestamp", status: 400, credited_micros: 0 });
      expect(h.logs.join("\n")).not.to.include(stale.split("v1=")[1]);
      expect(h.logs.join("\n")).not.to.include("buyer-private@example.com");
    });
  });

  describe("answering 200 without crediting", () => {
    const cases: Array<[string, string, Record<string, unknown>, string, boolean]> = [
      ["an event type it does not handle", "customer.created", { id: "cus_acme", object: "customer" }, "ignored_event_type", false],
      ["an unpaid Session", "checkout.session.completed", session({ payment_status: "unpaid" }), "not_paid", false],
      ["a subscription-mode Session", "checkout.session.completed", session({ mode: "subscription" }), "not_payment_mode", false],
      ["a Session without a customer (a Payment Link's guest)", "checkout.session.completed", session({ customer: null }), "no_customer", false],
      ["an unknown Stripe customer", "checkout.session.completed", session({ customer: "cus_nobody" }), "unknown_customer", true],
      ["a payment-mode Session not marked metadata.purpose = credits", "checkout.session.completed", session({ metadata: { purpose: "support-pack" } }), "not_credit_session", false],
      ["a payment-mode Session without metadata", "checkout.session.completed", session({ metadata: undefined }), "not_credit_session", false],
      ["an amount of zero", "checkout.session.completed", session({ amount_total: 0 }), "invalid_amount", true],
      ["an amount that is not an integer", "checkout.session.completed", session({ amount_total: 12.5 }), "invalid_amount", true],
      ["an amount whose micro-units are not exact", "checkout.session.completed", session({ amount_total: 2 ** 52 }), "invalid_amount", true],
    ];
    for (const [name, type, object, reason, looksUpCustomer] of cases) {
      it(`answers credited:false with reason ${reason} for ${name}`, async () => {
        const h = harness();

        const result = await h.deliver(stripeEvent(type, object));

        expect(result).to.deep.equal({ status: 200, body: { received: true, credited: false, reason } });
        expect(h.store.applied.size).to.equal(0);
        expect(h.store.calls.some((c) => c.startsWith("credit:"))).to.equal(false);
        expect(h.store.calls.length > 0).to.equal(looksUpCustomer);
      });
    }

    it("logs a currency mismatch as an error, with both currencies", async () => {
      const h = harness();

      await h.deliver(stripeEvent("checkout.session.completed", session({ currency: "eur" })));

      expect(webhookLine(h.logs)).to.deep.include({ level: "error", reason: "currency_mismatch", currency: "eur", plan_currency: "usd", customer_id: "acme" });
    });

  });

  describe("a payment it cannot credit in the balance's currency (500: Stripe retries, the Dashboard shows it failing)", () => {
    const cases: Array<[string, Record<string, unknown>]> = [
      ["a payment in another currency than the plan's", session({ currency: "eur" })],
      ["a customer whose plan has no currency", session({ customer: "cus_free" })],
    ];
    for (const [name, object] of cases) {
      it(`answers 500 currency_mismatch for ${name}, crediting nothing`, async () => {
        const h = harness();

        const result = await h.deliver(stripeEvent("checkout.session.completed", object));

        expect(result.status).to.equal(500);
        expect((result.body.error as Record<string, unknown>).code).to.equal("currency_mismatch");
        expect(h.store.applied.size).to.equal(0);
        const lines = h.logs.map((l) => JSON.parse(l) as Record<string, unknown>);
        expect(lines.filter((l) => l.message === "stripe_credit_currency_mismatch" && l.level === "error")).to.have.length(1);
      });
    }

    it("answers 500 currency_mismatch when the account was first written in another currency", async () => {
      const h = harness();
      h.store.balances.set("acme", { currency: "eur", micros: 5 });

      const result = await h.deliver(stripeEvent("checkout.session.completed", session()));

      expect(result.status).to.equal(500);
      expect((result.body.error as Record<string, unknown>).code).to.equal("currency_mismatch");
      expect(h.store.balance("acme")).to.equal(5);
    });
  });

  describe("faults Stripe should retry", () => {
    it("answers 500 when the store fails, and the retry after it recovers credits once", async () => {
      const h = harness();
      const body = stripeEvent("checkout.session.completed", session());
      const headers = { "stripe-signature": sign(body) };
      h.store.failing = true;

      const failed = await h.deliver(body, headers);
      h.store.failing = false;
      const retried = await h.deliver(body, headers);

      expect(failed.status).to.equal(500);
      expect(failed.body).to.deep.equal({
        error: { message: "The credit could not be recorded; Stripe will retry this event.", type: "server_error", param: null, code: "credit_store_unavailable" },
      });
      expect(retried.body).to.deep.equal({ received: true, credited: true });
      expect(h.store.balance("acme")).to.equal(25_000_000);
    });

    it("answers 500 webhook_not_configured without a signing secret", async () => {
      const h = harness({ secret: undefined });
      const body = stripeEvent("checkout.session.completed", session());

      const result = await h.deliver(body, { "stripe-signature": sign(body) });

      expect(result.status).to.equal(500);
      expect((result.body.error as { code: string }).code).to.equal("webhook_not_configured");
      expect(h.store.calls).to.deep.equal([]);
    });

    it("answers 500 webhook_not_configured for a crediting event when there is no customers table", async () => {
      const h = harness({ store: undefined });

      const result = await h.deliver(stripeEvent("checkout.session.completed", session()));

      expect(result.status).to.equal(500);
      expect((result.body.error as { code: string }).code).to.equal("webhook_not_configured");
    });

    it("answers 400 invalid_payload for a signed body that is not a Stripe event", async () => {
      const h = harness();

      const result = await h.deliver("[1, 2, 3]");

      expect(result.status).to.equal(400);
      expect((result.body.error as { code: string }).code).to.equal("invalid_payload");
    });
  });

  describe("logging", () => {
    it("logs one stripe_webhook line with the event, the customer and the micro-units credited", async () => {
      const h = harness();
      const body = stripeEvent("checkout.session.completed", session(), "evt_logged_1");
      const header = sign(body);

      await h.deliver(body, { "stripe-signature": header });

      expect(webhookLine(h.logs)).to.deep.include({
        level: "info",
        event_id: "evt_logged_1",
        event_type: "checkout.session.completed",
        object_id: "cs_test_a1b2c3",
        stripe_customer_id: "cus_acme",
        customer_id: "acme",
        credited_micros: 25_000_000,
        reason: "credited",
        status: 200,
      });
      const all = h.logs.join("\n");
      expect(all).not.to.include(SECRET);
      expect(all).not.to.include(header.split("v1=")[1]);
      expect(all).not.to.include("buyer-private@example.com");
    });

    it("never puts the signing secret in a response or a log line, whatever the outcome", async () => {
      const h = harness();
      const body = stripeEvent("checkout.session.completed", session());
      const outcomes = [
        await h.deliver(body),
        await h.deliver(body, { "stripe-signature": sign(body, { secret: OTHER_SECRET }) }),
        await h.deliver(body, { "stripe-signature": `t=${NOW_S},v1=${SECRET}` }),
        await h.deliver(Buffer.alloc(0), { "stripe-signature": sign("") }),
      ];

      expect(outcomes.map((o) => o.status)).to.deep.equal([200, 400, 400, 400]);
      for (const text of [...outcomes.map((o) => JSON.stringify(o.body)), ...h.logs]) {
        expect(text).not.to.include(SECRET);
        expect(text).not.to.include(OTHER_SECRET);
      }
    });
  });

  describe("loading and bundling", () => {
    const root = path.resolve(__dirname, "../..");

    it("does not load the stripe SDK until a webhook arrives", () => {
      const script = `
        require(${JSON.stringify(require.resolve("ts-node/register/transpile-only"))});
        require(${JSON.stringify(path.join(root, "functions/ai-chat/stripe-webhook.ts"))});
        process.stdout.write(String(Object.keys(require.cache).some((f) => f.includes(${JSON.stringify(`${path.sep}stripe${path.sep}`)}) && f.includes("node_modules"))));`;
      expect(execFileSync(process.execPath, ["-e", script], { cwd: root }).toString()).to.equal("false");
    });

    it("verifies and credits from an esbuild bundle built as infra/bundle.ts builds the function", async () => {
      const outdir = fs.mkdtempSync(path.join(os.tmpdir(), "stripe-webhook-bundle-"));
      try {
        const outfile = path.join(outdir, "index.js");
        buildSync({
          entryPoints: [path.join(root, "functions/ai-chat/stripe-webhook.ts")],
          outfile,
          bundle: true,
          platform: "node",
          target: "node22",
          format: "cjs",
          minify: true,
          legalComments: "none",
          external: ["@aws-sdk/*"],
          logLevel: "error",
        });
        // Run the bundle in a directory with no node_modules, so nothing can resolve `stripe` but the bundle itself.
        const bundled = require(outfile) as typeof import("../../functions/ai-chat/stripe-webhook");
        const h = harness();
        const body = stripeEvent("checkout.session.completed", session());

        const ok = await bundled.handleStripeWebhook(Buffer.from(body), { "stripe-signature": sign(body) }, h.deps);
        const forged = await bundled.handleStripeWebhook(Buffer.from(body), { "stripe-signature": sign(body, { secret: OTHER_SECRET }) }, h.deps);
        recordForScan("stripe-webhook bundle", [ok.body, forged.body, ...h.logs]);

        expect(ok.statusCode).to.equal(200);
        expect(JSON.parse(ok.body)).to.deep.equal({ received: true, credited: true });
        expect(forged.statusCode).to.equal(400);
        expect(h.store.balance("acme")).to.equal(25_000_000);
      } finally {
        fs.rmSync(outdir, { recursive: true, force: true });
      }
    });

    it("answers 500, not 400, when the stripe SDK cannot be loaded (so Stripe retries)", async () => {
      const outdir = fs.mkdtempSync(path.join(os.tmpdir(), "stripe-webhook-nosdk-"));
      try {
        const outfile = path.join(outdir, "index.js");
        // `stripe` left out of the bundle, and no node_modules beside it: the lazy require fails.
        buildSync({ entryPoints: [path.join(root, "functions/ai-chat/stripe-webhook.ts")], outfile, bundle: true, platform: "node", format: "cjs", external: ["stripe"], logLevel: "error" });
        const bundled = require(outfile) as typeof import("../../functions/ai-chat/stripe-webhook");
        const h = harness();
        const body = stripeEvent("checkout.session.completed", session());

        const response = await bundled.handleStripeWebhook(Buffer.from(body), { "stripe-signature": sign(body) }, h.deps);
        recordForScan("stripe-webhook without sdk", [response.body, ...h.logs]);

        expect(response.statusCode).to.equal(500);
        expect(JSON.parse(response.body)).to.deep.equal({
          error: { message: "The server had an error while processing your request.", type: "server_error", param: null, code: "internal_error" },
        });
        expect(webhookLine(h.logs)).to.deep.include({ level: "error", reason: "sdk_unavailable" });
        expect(h.store.calls).to.deep.equal([]);
      } finally {
        fs.rmSync(outdir, { recursive: true, force: true });
      }
    });
  });
});
