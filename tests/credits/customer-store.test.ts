import { DynamoDBClient } from "@aws-sdk/client-dynamodb";
import { DynamoDBDocumentClient } from "@aws-sdk/lib-dynamodb";
import { expect } from "chai";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { CustomerItemInvalidError, CustomerStoreError, type CustomerStore } from "../../functions/shared/customer-port";
import { accountItemKey, keyItem, usageCounterName, type HoldEntry } from "../../functions/shared/customer-schema";
import { createCustomerStoreFromEnv, DynamoCustomerStore } from "../../functions/shared/customer-store";
import { recordForScan, registerSecret } from "../helpers/secret-scan";
import { CreditsFixture, HungServer } from "./dynalite-fixture";

const NOW = Date.UTC(2026, 10, 28, 12, 0, 0);
/** One reservation's worth in these tests. */
const HOLD = 40_000;

function sumOf(holds: Record<string, HoldEntry> | undefined): number {
  return Object.values(holds ?? {}).reduce((sum, hold) => sum + hold.m, 0);
}

/** Fails unless `promise` rejects with a `CustomerStoreError`; returns it. */
async function storeErrorOf(promise: Promise<unknown>): Promise<CustomerStoreError> {
  try {
    await promise;
  } catch (err) {
    expect(err).to.be.instanceOf(CustomerStoreError);
    return err as CustomerStoreError;
  }
  expect.fail("expected a CustomerStoreError");
}

/**
 * An HTTP proxy in front of dynalite that, for the next `lose` UpdateItem calls, lets the write through and then
 * drops the connection instead of answering: the answer lost in transit that makes the SDK send the call again.
 */
class LosingProxy {
  lose = 0;
  lost = 0;
  private server?: http.Server;
  constructor(private readonly target: string) {}

  get endpoint(): string {
    return `http://127.0.0.1:${(this.server!.address() as AddressInfo).port}`;
  }

  async start(): Promise<this> {
    const target = new URL(this.target);
    this.server = http.createServer((req, res) => {
      const dropAnswer = String(req.headers["x-amz-target"]).endsWith(".UpdateItem") && this.lose > 0;
      if (dropAnswer) this.lose -= 1;
      const upstream = http.request({ hostname: target.hostname, port: target.port, path: req.url, method: req.method, headers: req.headers }, (answer) => {
        if (dropAnswer) {
          answer.resume();
          answer.on("end", () => {
            this.lost += 1;
            res.socket?.destroy();
          });
          return;
        }
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
      });
      upstream.on("error", () => res.destroy());
      req.pipe(upstream);
    });
    await new Promise<void>((resolve) => this.server!.listen(0, "127.0.0.1", resolve));
    return this;
  }

  async stop(): Promise<void> {
    this.server?.closeAllConnections();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}

describe("DynamoCustomerStore on dynalite", function () {
  this.timeout(60_000);
  const db = new CreditsFixture();
  let store: DynamoCustomerStore;

  before(() => db.start());
  after(() => db.stop());
  beforeEach(async () => {
    await db.newTables();
    store = db.store();
  });

  const credit = (customerId: string, micros: number, creditId = `cli:${customerId}:${micros}:${Math.random()}`, currency = "usd") =>
    store.credit({ customerId, currency, creditId, micros, source: "cli", now: NOW });
  const reserve = (customerId: string, transactionId: string, micros = HOLD, currency = "usd") => store.reserve({ customerId, currency, transactionId, micros, now: NOW });

  describe("balances and credits", () => {
    it("reads a never-written account as zero, and writes nothing to read it", async () => {
      const balance = await store.getBalance("ghost");
      expect(balance).to.deep.equal({ customerId: "ghost", balanceMicros: 0, reservedMicros: 0, holds: {} });
      expect(await store.getUsage("ghost", "2026-11-01")).to.deep.include({ periodStart: "2026-11-01", requests: 0, promptTokens: 0, completionTokens: 0, costMicros: 0 });
      expect(await db.customerItems()).to.deep.equal([]);
    });

    it("creates the account with its whole skeleton on the first credit, so nested holds can be written under it", async () => {
      const result = await credit("acme", 5_000_000, "stripe:cs_1");
      expect(result).to.deep.equal({ applied: true, balanceMicros: 5_000_000 });
      const item = await db.account("acme");
      expect(item).to.deep.include({ pk: accountItemKey("acme"), customer_id: "acme", currency: "usd", balance_micros: 5_000_000, reserved_micros: 0, holds: {} });
      expect(item?.credits).to.deep.equal({ "stripe:cs_1": { m: 5_000_000, t: NOW, s: "cli" } });
      expect(await reserve("acme", "tx-1")).to.deep.equal({ ok: true, balanceMicros: 5_000_000 - HOLD });
    });

    it("applies a credit id once, however often and however concurrently it is replayed", async () => {
      expect(await credit("acme", 2_000_000, "stripe:cs_2")).to.deep.equal({ applied: true, balanceMicros: 2_000_000 });
      expect(await credit("acme", 2_000_000, "stripe:cs_2")).to.deep.equal({ applied: false, reason: "duplicate", balanceMicros: 2_000_000 });
      const replays = await Promise.all(Array.from({ length: 20 }, () => credit("acme", 1_000_000, "stripe:cs_3")));
      expect(replays.filter((r) => r.applied)).to.have.length(1);
      expect(replays.filter((r) => !r.applied && r.reason === "duplicate")).to.have.length(19);
      expect((await store.getBalance("acme")).balanceMicros).to.equal(3_000_000);
    });

    it("applies the first credit of a new account once when several race to create it", async () => {
      const results = await Promise.all(Array.from({ length: 10 }, (_, i) => credit("fresh", 100 + i, `cli:fresh-${i}`)));
      expect(results.every((r) => r.applied)).to.equal(true);
      const item = await db.account("fresh");
      expect(item?.balance_micros).to.equal(Array.from({ length: 10 }, (_, i) => 100 + i).reduce((a, b) => a + b, 0));
      expect(Object.keys(item?.credits ?? {})).to.have.length(10);
    });

    it("refuses a debit that would take the balance below zero, and applies one the balance covers", async () => {
      await credit("acme", 1_000_000);
      expect(await credit("acme", -1_000_001, "cli:too-much")).to.deep.equal({ applied: false, reason: "insufficient_balance", balanceMicros: 1_000_000 });
      expect(await credit("acme", -400_000, "cli:fine")).to.deep.equal({ applied: true, balanceMicros: 600_000 });
      expect(await credit("nobody", -1, "cli:nobody")).to.deep.equal({ applied: false, reason: "insufficient_balance", balanceMicros: 0 });
      expect(await db.account("nobody")).to.equal(undefined);
    });

    it("fixes the currency on the first write and refuses credits and reservations in another", async () => {
      await credit("acme", 1_000_000, "cli:usd", "USD");
      expect(await credit("acme", 1_000_000, "cli:eur", "eur")).to.deep.equal({ applied: false, reason: "currency_mismatch", balanceMicros: 1_000_000 });
      expect(await reserve("acme", "tx-eur", HOLD, "eur")).to.deep.equal({ ok: false, reason: "currency_mismatch", balanceMicros: 1_000_000 });
      const item = await db.account("acme");
      expect(item).to.deep.include({ currency: "usd", balance_micros: 1_000_000, reserved_micros: 0, holds: {} });
    });
  });

  describe("reservations", () => {
    it("refuses a reservation on an account never credited, and writes nothing", async () => {
      expect(await reserve("nobody", "tx-1")).to.deep.equal({ ok: false, reason: "insufficient_balance", balanceMicros: 0 });
      expect(await db.account("nobody")).to.equal(undefined);
    });

    for (const leftover of [0, HOLD - 1]) {
      it(`lets exactly 10 of 50 concurrent reservations through against a balance worth 10 (+${leftover}), never below zero`, async () => {
        await credit("acme", 10 * HOLD + leftover);
        const seen: number[] = [];
        let racing = true;
        const watch = (async () => {
          while (racing) {
            const item = await db.account("acme");
            seen.push(item!.balance_micros);
            expect(item!.reserved_micros).to.equal(sumOf(item!.holds));
          }
        })();
        const results = await Promise.all(Array.from({ length: 50 }, (_, i) => reserve("acme", `tx-${i}`)));
        racing = false;
        await watch;

        expect(results.filter((r) => r.ok)).to.have.length(10);
        expect(results.filter((r) => !r.ok && r.reason === "insufficient_balance")).to.have.length(40);
        expect(results.every((r) => r.balanceMicros >= 0)).to.equal(true);
        expect(seen.length).to.be.greaterThan(0);
        expect(Math.min(...seen)).to.be.at.least(0);
        const item = await db.account("acme");
        expect(item!.balance_micros).to.equal(leftover);
        expect(item!.reserved_micros).to.equal(10 * HOLD);
        expect(Object.keys(item!.holds!)).to.have.length(10);
        expect(sumOf(item!.holds)).to.equal(item!.reserved_micros);
      });
    }

    it("holds a transaction once when its reservation is repeated", async () => {
      await credit("acme", 1_000_000);
      expect(await reserve("acme", "tx-1")).to.deep.equal({ ok: true, balanceMicros: 1_000_000 - HOLD });
      expect(await reserve("acme", "tx-1")).to.deep.equal({ ok: true, balanceMicros: 1_000_000 - HOLD });
      await storeErrorOf(reserve("acme", "tx-1", HOLD + 1));
      const item = await db.account("acme");
      expect(item).to.deep.include({ balance_micros: 1_000_000 - HOLD, reserved_micros: HOLD });
      expect(Object.keys(item!.holds!)).to.deep.equal(["tx-1"]);
    });
  });

  describe("settlements", () => {
    const usage = { periodStart: "2026-11-01", requests: 1, promptTokens: 100, completionTokens: 50, costMicros: 12_345 };

    it("charges the cost, releases the rest and counts the usage in one write; a second settlement changes nothing", async () => {
      await credit("acme", 1_000_000);
      await reserve("acme", "tx-1");
      const first = await store.settle({ customerId: "acme", transactionId: "tx-1", reservedMicros: HOLD, costMicros: 12_345, now: NOW, usage });
      expect(first).to.deep.equal({ settled: true, chargedMicros: 12_345, shortfallMicros: 0, balanceMicros: 1_000_000 - 12_345 });
      const again = await store.settle({ customerId: "acme", transactionId: "tx-1", reservedMicros: HOLD, costMicros: 12_345, now: NOW, usage });
      expect(again).to.deep.equal({ settled: false, chargedMicros: 0, shortfallMicros: 0, balanceMicros: 1_000_000 - 12_345 });

      const item = await db.account("acme");
      expect(item).to.deep.include({ balance_micros: 1_000_000 - 12_345, reserved_micros: 0, holds: {} });
      expect(item![usageCounterName("requests", "2026-11-01")]).to.equal(1);
      const read = await store.getUsage("acme", "2026-11-01");
      expect(read).to.deep.include({ periodStart: "2026-11-01", requests: 1, promptTokens: 100, completionTokens: 50, costMicros: 12_345 });
      // The balance comes from the same read as the counters (GET /v1/usage never shows one without the other).
      expect(read.balance).to.deep.include({ balanceMicros: 1_000_000 - 12_345, reservedMicros: 0, currency: "usd" });
    });

    it("settles a hold once when ten settlements of it race", async () => {
      await credit("acme", 1_000_000);
      await reserve("acme", "tx-1");
      const results = await Promise.all(Array.from({ length: 10 }, () => store.settle({ customerId: "acme", transactionId: "tx-1", reservedMicros: HOLD, costMicros: 30_000, now: NOW, usage })));
      expect(results.filter((r) => r.settled)).to.have.length(1);
      expect((await db.account("acme"))!.balance_micros).to.equal(1_000_000 - 30_000);
      expect((await store.getUsage("acme", "2026-11-01")).requests).to.equal(1);
    });

    it("takes a cost above the hold from the balance when the balance covers it", async () => {
      await credit("acme", 100_000);
      await reserve("acme", "tx-1");
      const result = await store.settle({ customerId: "acme", transactionId: "tx-1", reservedMicros: HOLD, costMicros: HOLD + 25_000, now: NOW });
      expect(result).to.deep.equal({ settled: true, chargedMicros: HOLD + 25_000, shortfallMicros: 0, balanceMicros: 100_000 - HOLD - 25_000 });
    });

    it("charges at most the balance (never below zero) and reports the shortfall when the cost exceeds hold and balance", async () => {
      await credit("acme", HOLD + 10_000);
      await reserve("acme", "tx-1");
      const result = await store.settle({ customerId: "acme", transactionId: "tx-1", reservedMicros: HOLD, costMicros: HOLD + 50_000, now: NOW });
      expect(result).to.deep.equal({ settled: true, chargedMicros: HOLD + 10_000, shortfallMicros: 40_000, balanceMicros: 0 });
      expect(await db.account("acme")).to.deep.include({ balance_micros: 0, reserved_micros: 0, holds: {} });
      expect((await store.settle({ customerId: "acme", transactionId: "tx-1", reservedMicros: HOLD, costMicros: HOLD + 50_000, now: NOW })).settled).to.equal(false);
    });

    it("settles with the amount actually held when the caller names another, so reserved stays the sum of the holds", async () => {
      await credit("acme", 1_000_000);
      await reserve("acme", "tx-1");
      await reserve("acme", "tx-2");
      const result = await store.settle({ customerId: "acme", transactionId: "tx-1", reservedMicros: 999, costMicros: 1_000, now: NOW });
      expect(result).to.deep.equal({ settled: true, chargedMicros: 1_000, shortfallMicros: 0, balanceMicros: 1_000_000 - HOLD - 1_000 });
      const item = await db.account("acme");
      expect(item!.reserved_micros).to.equal(HOLD);
      expect(sumOf(item!.holds)).to.equal(HOLD);
    });

    it("ends 50 concurrent reserve-then-settle requests at initial − Σ charged, exactly, with nothing reserved", async () => {
      const initial = 10 * HOLD + 7;
      await credit("acme", initial);
      const costs = Array.from({ length: 50 }, (_, i) => (i % 7 === 0 ? HOLD + 3_001 : 1_000 + i * 517));
      const outcomes = await Promise.all(
        costs.map(async (cost, i) => {
          const held = await reserve("acme", `tx-${i}`);
          if (!held.ok) return { served: false, charged: 0 };
          const settled = await store.settle({ customerId: "acme", transactionId: `tx-${i}`, reservedMicros: HOLD, costMicros: cost, now: NOW, usage: { ...usage, costMicros: cost } });
          expect(settled.settled).to.equal(true);
          expect(settled.balanceMicros).to.be.at.least(0);
          return { served: true, charged: settled.chargedMicros };
        }),
      );
      const served = outcomes.filter((o) => o.served).length;
      expect(served).to.be.at.least(10);
      const charged = outcomes.reduce((sum, o) => sum + o.charged, 0);
      const item = await db.account("acme");
      expect(item).to.deep.include({ balance_micros: initial - charged, reserved_micros: 0, holds: {} });
      expect(item![usageCounterName("requests", "2026-11-01")]).to.equal(served);
    });

    it("reports a settlement as made when DynamoDB applied it but the answer was lost and the SDK sent it again", async () => {
      const proxy = await new LosingProxy(db.endpoint).start();
      const lossy = createCustomerStoreFromEnv(db.env({ AWS_ENDPOINT_URL_DYNAMODB: proxy.endpoint }), { timeoutMs: 5000 });
      try {
        await credit("acme", 1_000_000);
        await reserve("acme", "tx-1");
        proxy.lose = 1;
        const result = await lossy.settle({ customerId: "acme", transactionId: "tx-1", reservedMicros: HOLD, costMicros: 12_345, now: NOW });
        expect(proxy.lost).to.equal(1);
        expect(result).to.deep.equal({ settled: true, chargedMicros: 12_345, shortfallMicros: 0, balanceMicros: 1_000_000 - 12_345 });

        proxy.lose = 1;
        const credited = await lossy.credit({ customerId: "acme", currency: "usd", creditId: "stripe:cs_lost", micros: 500, source: "stripe_checkout", now: NOW + 1 });
        expect(proxy.lost).to.equal(2);
        expect(credited).to.deep.equal({ applied: true, balanceMicros: 1_000_000 - 12_345 + 500 });

        proxy.lose = 1;
        const held = await lossy.reserve({ customerId: "acme", currency: "usd", transactionId: "tx-2", micros: HOLD, now: NOW });
        expect(proxy.lost).to.equal(3);
        expect(held).to.deep.equal({ ok: true, balanceMicros: 1_000_000 - 12_345 + 500 - HOLD });
        expect((await db.account("acme"))!.reserved_micros).to.equal(HOLD);
      } finally {
        lossy.destroy();
        await proxy.stop();
      }
    });
  });

  describe("usage counters", () => {
    it("adds a postpaid request's counters, creating the account's skeleton, which a later credit then uses", async () => {
      await store.addUsage("post", { periodStart: "2026-11-01", requests: 1, promptTokens: 10, completionTokens: 5, costMicros: 70 }, NOW);
      await store.addUsage("post", { periodStart: "2026-11-01", requests: 1, promptTokens: 0, completionTokens: 0, costMicros: 0 }, NOW);
      expect(await store.getUsage("post", "2026-11-01")).to.deep.include({ periodStart: "2026-11-01", requests: 2, promptTokens: 10, completionTokens: 5, costMicros: 70 });
      expect(await store.getUsage("post", "2026-12-01")).to.deep.include({ periodStart: "2026-12-01", requests: 0, promptTokens: 0, completionTokens: 0, costMicros: 0 });
      expect(await db.account("post")).to.deep.include({ balance_micros: 0, reserved_micros: 0, holds: {}, credits: {} });
      expect(await credit("post", 1_000)).to.deep.include({ applied: true, balanceMicros: 1_000 });
    });
  });

  describe("customers", () => {
    it("finds a key's customer and a Stripe customer's key, and says when there is none", async () => {
      await db.putCustomerItem({ ...keyItem("key-a", "acme", { plan: "starter", stripeCustomerId: "cus_A" }) });
      await db.putCustomerItem({ ...keyItem("key-b", "bolt", { plan: "pro", status: "suspended" }) });
      expect(await store.getCustomer("key-a")).to.deep.equal({ apiKeyId: "key-a", customerId: "acme", plan: "starter", stripeCustomerId: "cus_A", status: "active" });
      expect(await store.getCustomer("key-b")).to.deep.equal({ apiKeyId: "key-b", customerId: "bolt", plan: "pro", status: "suspended" });
      expect(await store.getCustomer("key-z")).to.equal(undefined);
      expect(await store.findByStripeCustomer("cus_A")).to.deep.equal({ apiKeyId: "key-a", customerId: "acme", plan: "starter", stripeCustomerId: "cus_A", status: "active" });
      expect(await store.findByStripeCustomer("cus_Z")).to.equal(undefined);
    });

    it("refuses a key item it cannot use rather than inventing a customer", async () => {
      await db.putCustomerItem({ pk: "key#broken", api_key_id: "broken", plan: "starter" });
      const err = await storeErrorOf(store.getCustomer("broken"));
      expect(err.message).to.match(/customer_id/);
    });

    it("says a readable answer about an unreadable key item (unknown status, no plan) apart from an outage: CustomerItemInvalidError", async () => {
      await db.putCustomerItem({ pk: "key#typo", api_key_id: "typo", customer_id: "acme", plan: "starter", status: "Suspended" });
      await db.putCustomerItem({ pk: "key#noplan", api_key_id: "noplan", customer_id: "acme" });
      for (const key of ["typo", "noplan"]) {
        const err = await storeErrorOf(store.getCustomer(key));
        expect(err, key).to.be.instanceOf(CustomerItemInvalidError);
      }
      // An outage stays a plain CustomerStoreError (the directory's global back-off is for that one only).
      const hung = await new HungServer().start();
      try {
        const doc = DynamoDBDocumentClient.from(new DynamoDBClient({ region: "us-east-1", endpoint: hung.endpoint, credentials: { accessKeyId: "local", secretAccessKey: "local" } }));
        const down = new DynamoCustomerStore({ doc, table: "customers", timeoutMs: 150 });
        const err = await storeErrorOf(down.getCustomer("typo"));
        expect(err).to.not.be.instanceOf(CustomerItemInvalidError);
        down.destroy();
      } finally {
        await hung.stop();
      }
    });

    it("lists every key with its balance, page by page", async () => {
      const paged = db.store({ scanPageSize: 2 });
      for (const [key, customer] of [["k1", "acme"], ["k2", "bolt"], ["k3", "cleo"], ["k4", "dart"], ["k5", "acme"]]) await db.putCustomerItem({ ...keyItem(key, customer, { plan: "starter" }) });
      await credit("acme", 700);
      await credit("cleo", 300);
      await reserve("cleo", "tx-c", 100);
      await credit("gone", 5); // an account whose customer has no key any more
      const listed = await paged.listAccounts();
      expect(listed.map((a) => `${a.customer.customerId}/${a.customer.apiKeyId}:${a.balance.balanceMicros}/${a.balance.reservedMicros}`)).to.deep.equal([
        "acme/k1:700/0",
        "acme/k5:700/0",
        "bolt/k2:0/0",
        "cleo/k3:200/100",
        "dart/k4:0/0",
      ]);
      expect(listed[3].balance.holds).to.deep.equal({ "tx-c": { micros: 100, at: NOW } });
      expect(listed[0].balance.currency).to.equal("usd");
    });

    it("finds the holds made before a time across every account, page by page", async () => {
      const paged = db.store({ scanPageSize: 1 });
      for (const customer of ["a1", "a2", "a3", "a4"]) await credit(customer, 1_000_000);
      await store.reserve({ customerId: "a1", currency: "usd", transactionId: "old-1", micros: 10, now: NOW - 10_000 });
      await store.reserve({ customerId: "a1", currency: "usd", transactionId: "new-1", micros: 20, now: NOW });
      await store.reserve({ customerId: "a3", currency: "usd", transactionId: "old-3", micros: 30, now: NOW - 20_000 });
      await store.addUsage("a5", { periodStart: "2026-11-01", requests: 1, promptTokens: 0, completionTokens: 0, costMicros: 0 }, NOW);
      const stale = await paged.staleHolds(NOW - 5_000);
      expect(stale).to.deep.equal([
        { customerId: "a3", transactionId: "old-3", micros: 30, at: NOW - 20_000 },
        { customerId: "a1", transactionId: "old-1", micros: 10, at: NOW - 10_000 },
      ]);
      expect(await paged.staleHolds(NOW + 1)).to.have.length(3);
    });
  });
});

describe("DynamoCustomerStore at DynamoDB's item size limit", function () {
  this.timeout(30_000);
  // 2 KB instead of 400 KB: the same refusal, reached with ~30 holds instead of ~7,000.
  const db = new CreditsFixture();
  before(() => db.start({ maxItemSizeKb: 2 }));
  after(() => db.stop());

  it("refuses a reservation that would grow the account past the limit with a CustomerStoreError, changing nothing", async () => {
    await db.newTables();
    const store = db.store();
    await store.credit({ customerId: "acme", currency: "usd", creditId: "cli:1", micros: 1_000_000, source: "cli", now: NOW });
    let held = 0;
    let refusal: CustomerStoreError | undefined;
    while (!refusal && held < 100) {
      try {
        await store.reserve({ customerId: "acme", currency: "usd", transactionId: `${"0".repeat(28)}-${String(held).padStart(7, "0")}`, micros: 100, now: NOW });
        held += 1;
      } catch (err) {
        expect(err).to.be.instanceOf(CustomerStoreError);
        refusal = err as CustomerStoreError;
      }
    }
    expect(refusal?.message).to.match(/^customer store reserve failed: ValidationException: the account item reached DynamoDB's 400 KB item limit/);
    const item = await db.account("acme");
    expect(Object.keys(item!.holds!)).to.have.length(held);
    expect(item).to.deep.include({ balance_micros: 1_000_000 - 100 * held, reserved_micros: 100 * held });
  });
});

describe("DynamoCustomerStore when DynamoDB never answers", function () {
  this.timeout(20_000);
  const SECRET = "hung-store-secret-access-key-7777777";
  registerSecret(SECRET);
  let hung: HungServer;
  const messages: string[] = [];

  before(async () => (hung = await new HungServer().start()));
  after(async () => {
    recordForScan("customer store timeout errors", messages);
    await hung.stop();
  });

  const calls = (store: CustomerStore): Array<[string, () => Promise<unknown>]> => [
    ["getCustomer", () => store.getCustomer("key-a")],
    ["findByStripeCustomer", () => store.findByStripeCustomer("cus_A")],
    ["getBalance", () => store.getBalance("acme")],
    ["getUsage", () => store.getUsage("acme", "2026-11-01")],
    ["reserve", () => store.reserve({ customerId: "acme", currency: "usd", transactionId: "tx", micros: 1, now: NOW })],
    ["settle", () => store.settle({ customerId: "acme", transactionId: "tx", reservedMicros: 1, costMicros: 1, now: NOW })],
    ["addUsage", () => store.addUsage("acme", { periodStart: "2026-11-01", requests: 1, promptTokens: 0, completionTokens: 0, costMicros: 0 }, NOW)],
    ["credit", () => store.credit({ customerId: "acme", currency: "usd", creditId: "c", micros: 1, source: "cli", now: NOW })],
    ["listAccounts", () => store.listAccounts()],
    ["staleHolds", () => store.staleHolds(NOW)],
  ];

  it("rejects every call with CustomerStoreError at its own timeout, even on a client with no timeout of its own", async () => {
    // A client without request timeouts: only the store's own deadline can end these calls.
    const doc = DynamoDBDocumentClient.from(new DynamoDBClient({ region: "us-east-1", endpoint: hung.endpoint, credentials: { accessKeyId: "local", secretAccessKey: SECRET } }));
    const store = new DynamoCustomerStore({ doc, table: "customers", timeoutMs: 150 });
    try {
      for (const [name, call] of calls(store)) {
        const err = await storeErrorOf(call());
        messages.push(err.message);
        expect(err.message, name).to.equal(`customer store ${name} failed: no answer within 150 ms`);
      }
    } finally {
      store.destroy();
    }
  });

  it("rejects every call with CustomerStoreError when built from the environment", async () => {
    const store = createCustomerStoreFromEnv(
      { CUSTOMERS_TABLE: "customers", AWS_ENDPOINT_URL_DYNAMODB: hung.endpoint, AWS_REGION: "us-east-1", AWS_ACCESS_KEY_ID: "local", AWS_SECRET_ACCESS_KEY: SECRET },
      { timeoutMs: 150 },
    );
    try {
      for (const [name, call] of calls(store)) {
        const err = await storeErrorOf(call());
        messages.push(err.message);
        expect(err.message, name).to.match(new RegExp(`^customer store ${name} failed: `));
        expect(err.message).not.to.include(SECRET);
      }
    } finally {
      store.destroy();
    }
  });

  it("refuses to build a store without CUSTOMERS_TABLE", () => {
    expect(() => createCustomerStoreFromEnv({ AWS_REGION: "us-east-1" })).to.throw(CustomerStoreError, /CUSTOMERS_TABLE/);
  });
});
