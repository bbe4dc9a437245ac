import { expect } from "chai";
import net from "node:net";
import { createLogger } from "../../functions/ai-chat/logger";
import type { LedgerItem, SinkName } from "../../functions/shared/ledger-schema";
import { createLedgerDocumentClient, LedgerStore } from "../../functions/shared/ledger-store";
import { createForwarderFromEnv, UsageForwarder } from "../../functions/usage-forwarder/forwarder";
import type { Sink } from "../../functions/usage-forwarder/sink";
import { outcomeOfStripeError, StripeSink } from "../../functions/usage-forwarder/stripe-sink";
import { StripeServer } from "../../scripts/local/stripe-server";
import { recordForScan, registerSecret } from "../helpers/secret-scan";
import { LedgerFixture, ledgerItem } from "./ledger-fixture";

const STRIPE_KEY = "sk_test_forwarder_faults_key_8888888888";
registerSecret(STRIPE_KEY);

/** A sink that takes everything and counts what it was sent. */
function countingSink(name: SinkName, sent: string[]): Sink {
  return {
    name,
    concurrency: 1,
    ready: async () => ({ ok: true }),
    check: () => undefined,
    batches: (items) => [items],
    send: async (batch) => {
      sent.push(...batch.map((i) => i.transaction_id));
      return { kind: "delivered" };
    },
  };
}

const markDenied = () => Object.assign(new Error("User is not authorized to perform: dynamodb:UpdateItem"), { name: "AccessDeniedException" });

describe("usage forwarder under faults", function () {
  this.timeout(30_000);
  let logs: string[];
  const log = () => createLogger({ level: "debug", write: (line) => logs.push(line) });
  beforeEach(() => (logs = []));
  afterEach(() => recordForScan("forwarder fault logs", logs));

  describe("a DynamoDB that accepts connections and never answers", () => {
    let server: net.Server;
    let sockets: net.Socket[];
    let endpoint: string;
    before(async () => {
      sockets = [];
      server = net.createServer((socket) => {
        sockets.push(socket);
        socket.on("error", () => undefined);
      });
      await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
      endpoint = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`;
    });
    after(async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    });

    it("ends a sweep by its deadline, so the next sweep is a new one rather than the hung one", async () => {
      const fwd = createForwarderFromEnv(
        { LEDGER_TABLE: "usage-ledger", AWS_ENDPOINT_URL_DYNAMODB: endpoint, AWS_REGION: "us-east-1", AWS_ACCESS_KEY_ID: "local", AWS_SECRET_ACCESS_KEY: "local", MOESIF_APPLICATION_ID: "app", MOESIF_BASE_URI: "http://127.0.0.1:9", FORWARDER_SWEEP_GRACE_MS: "0" },
        { write: (line) => logs.push(line), sweepTimeoutMs: 1000 },
      );

      const first = fwd.sweep();
      // A liveness bound, not a timing assertion: ten times the sweep's own deadline.
      const outcome = await Promise.race([first.then(() => "ended"), new Promise((resolve) => setTimeout(() => resolve("still running"), 10_000))]);
      const second = fwd.sweep();
      const secondOutcome = await Promise.race([second.then(() => "ended"), new Promise((resolve) => setTimeout(() => resolve("still running"), 10_000))]);

      expect(outcome).to.equal("ended");
      expect(second).to.not.equal(first);
      expect(secondOutcome).to.equal("ended");
    });

    it("ends a delivery by its deadline without writing marks after it, leaving the items pending", async () => {
      const env = { AWS_ENDPOINT_URL_DYNAMODB: endpoint, AWS_REGION: "us-east-1", AWS_ACCESS_KEY_ID: "local", AWS_SECRET_ACCESS_KEY: "local" };
      const doc = createLedgerDocumentClient(env);
      const sent: string[] = [];
      const fwd = new UsageForwarder({ store: new LedgerStore(doc, "usage-ledger"), sinks: [countingSink("moesif", sent)], log: log() });

      const run = fwd.deliver([ledgerItem({ stripe: false })], { deadline: Date.now() + 1000 });
      const outcome = await Promise.race([run.then(() => "ended"), new Promise((resolve) => setTimeout(() => resolve("still running"), 10_000))]);
      doc.destroy();

      expect(outcome).to.equal("ended");
      expect(sent).to.have.length(1);
      expect((await run).pending.moesif).to.equal(1);
    });
  });

  describe("items whose data is corrupt (against dynalite)", () => {
    const ledger = new LedgerFixture();
    let stripe: StripeServer;
    before(() => ledger.start());
    after(() => ledger.stop());
    beforeEach(async () => {
      await ledger.newTable();
      stripe = await new StripeServer({ apiKey: STRIPE_KEY }).start();
    });
    afterEach(() => stripe.stop());

    it("fails only the sink a corrupt field concerns, with the reason, and still delivers every other item and sink", async () => {
      const now = Date.now();
      const good = ledgerItem({ createdAt: now - 5000 });
      // Outside what a Date can hold: toISOString threw a RangeError out of the sweep.
      const farStart = ledgerItem({ createdAt: now - 4000, started_at: 9e15 });
      // Beyond 2^53: the document client reads it back as a BigInt.
      const bigCost = ledgerItem({ createdAt: now - 3000, cost_micros: BigInt(2) ** BigInt(60) as unknown as number });
      const badAttempts = ledgerItem({ createdAt: now - 2000, stripe: false, moesif_attempts: BigInt(2) ** BigInt(60) as unknown as number });
      await ledger.put(good, farStart, bigCost, badAttempts);
      const sent: string[] = [];
      const stripeSink = new StripeSink({ apiKey: async () => ({ value: STRIPE_KEY }), apiBase: stripe.url });
      const fwd = new UsageForwarder({ store: ledger.store(), sinks: [countingSink("moesif", sent), stripeSink], log: log(), sweepGraceMs: 0 });

      let threw: unknown;
      for (let i = 0; i < 3; i++) await fwd.sweep().catch((err: unknown) => (threw = err));

      const stored = Object.fromEntries(await Promise.all([good, farStart, bigCost, badAttempts].map(async (i) => [i.transaction_id, (await ledger.get(i.transaction_id))!] as const)));
      expect(threw).to.equal(undefined);
      expect(stored[good.transaction_id]).to.include({ moesif_state: "delivered", stripe_state: "delivered" });
      expect(stored[farStart.transaction_id]).to.include({ moesif_state: "delivered", stripe_state: "failed" });
      expect(stored[farStart.transaction_id].stripe_error).to.match(/started_at/);
      expect(stored[bigCost.transaction_id]).to.include({ moesif_state: "delivered", stripe_state: "failed" });
      expect(stored[bigCost.transaction_id].stripe_error).to.match(/cost_micros/);
      expect(stored[badAttempts.transaction_id]).to.include({ moesif_state: "failed", moesif_attempts: 1 });
      expect(stored[badAttempts.transaction_id].moesif_error).to.match(/moesif_attempts/);
      for (const id of [farStart, bigCost, badAttempts].map((i) => i.transaction_id)) expect(stored[id].due_at, id).to.be.greaterThan(now);
      expect(sent.filter((id) => id === good.transaction_id)).to.have.length(1);
      expect(stripe.totals()).to.deep.equal({ cus_alice: good.cost_micros });
    });

    it("never throws from deliver for an item handed over with data of the wrong types", async () => {
      const item = ledgerItem({ stripe: false });
      await ledger.put(item);
      const corrupt = { ...item, created_at: "yesterday", moesif_attempts: Number.NaN } as unknown as LedgerItem;
      const fwd = new UsageForwarder({ store: ledger.store(), sinks: [countingSink("moesif", [])], log: log() });

      const report = await fwd.deliver([corrupt]);

      expect(report.failed.moesif).to.equal(1);
      expect((await ledger.get(item.transaction_id))!.moesif_error).to.match(/created_at/);
    });
  });

  describe("delivery marks that keep failing", () => {
    it("sends an acknowledged item once, backs the sweep off, and writes its mark once the ledger takes writes again", async () => {
      let now = 1_800_000_000_000;
      const item = ledgerItem({ createdAt: now - 120_000, stripe: false });
      const sent: string[] = [];
      let marksWork = false;
      let backlogReads = 0;
      const marked: string[] = [];
      const store = {
        backlog: async () => {
          backlogReads += 1;
          return marked.length > 0 ? [] : [{ ...item }];
        },
        markDelivered: async (id: string) => {
          if (!marksWork) throw markDenied();
          marked.push(id);
        },
        markFailed: async () => undefined,
        clearBacklog: async () => undefined,
      };
      const fwd = new UsageForwarder({ store, sinks: [countingSink("moesif", sent)], log: log(), clock: () => now, sweepGraceMs: 0 });

      for (let i = 0; i < 120; i++) {
        await fwd.sweep();
        now += 1000;
      }
      const readsDuringOutage = backlogReads;
      marksWork = true;
      for (let i = 0; i < 400 && marked.length === 0; i++) {
        await fwd.sweep();
        now += 1000;
      }

      expect(sent, "sent once over two minutes of failing marks").to.deep.equal([item.transaction_id]);
      expect(readsDuringOutage, "sweeps backed off (1 s doubling)").to.be.at.most(10);
      expect(marked).to.deep.equal([item.transaction_id]);
      expect(sent).to.have.length(1);
    });

    it("does not bill an item twice past Stripe's de-duplication window while its mark cannot be written (dynalite, local Stripe)", async () => {
      const ledger = new LedgerFixture();
      await ledger.start();
      let now = Date.now();
      const stripe = await new StripeServer({ apiKey: STRIPE_KEY, clock: () => now, dedupWindowMs: 60_000 }).start();
      try {
        await ledger.newTable();
        const item = ledgerItem({ createdAt: now - 120_000, cost: 777 });
        await ledger.put(item);
        const real = ledger.store();
        const store = {
          backlog: real.backlog.bind(real),
          markDelivered: async () => {
            throw markDenied();
          },
          markFailed: real.markFailed.bind(real),
          clearBacklog: real.clearBacklog.bind(real),
        };
        const stripeSink = new StripeSink({ apiKey: async () => ({ value: STRIPE_KEY }), apiBase: stripe.url, clock: () => now });
        const fwd = new UsageForwarder({ store, sinks: [countingSink("moesif", []), stripeSink], log: log(), clock: () => now, sweepGraceMs: 0 });

        // Thirty minutes of sweeps, one every 30 s, thirty times the server's de-duplication window.
        for (let i = 0; i < 60; i++) {
          await fwd.sweep();
          now += 30_000;
        }

        expect(stripe.totals()).to.deep.equal({ cus_alice: 777 });
        expect(stripe.requests.filter((r) => r.path === "/v2/billing/meter_event_stream")).to.have.length(1);
      } finally {
        await stripe.stop();
        await ledger.stop();
      }
    });
  });

  describe("Stripe's duplicate-identifier refusal", () => {
    const duplicate = (identifier: string) =>
      Object.assign(new Error(`An event already exists with identifier ${identifier}.`), { statusCode: 400, type: "StripeInvalidRequestError", rawType: "invalid_request_error" });

    it("means delivered only for the one item it names", () => {
      const [a, b] = [ledgerItem(), ledgerItem()];

      expect(outcomeOfStripeError(duplicate(a.transaction_id), Date.now(), [a]).kind).to.equal("delivered");
      expect(outcomeOfStripeError(duplicate(a.transaction_id), Date.now(), [a, b]).kind, "a batch of two: bisect").to.equal("refused");
      expect(outcomeOfStripeError(duplicate(b.transaction_id), Date.now(), [a]).kind, "names another item").to.equal("refused");
    });
  });

  describe("Stripe's value limit", () => {
    it("fails a cost of 15 digits or more before sending it (Stripe refuses more than 15 significant digits)", () => {
      const sink = new StripeSink({ apiKey: async () => ({ value: STRIPE_KEY }) });
      const now = Date.now();

      expect(sink.check(ledgerItem({ cost: 999_999_999_999_999 }), now)).to.equal(undefined);
      expect(sink.check(ledgerItem({ cost: 1e15 }), now)).to.match(/15 digits/);
    });
  });
});
