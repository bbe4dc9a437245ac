import { expect } from "chai";
import { createLogger, type Logger } from "../../functions/ai-chat/logger";
import type { CustomerStore } from "../../functions/shared/customer-port";
import { DynamoCustomerStore } from "../../functions/shared/customer-store";
import type { LedgerItem, SinkName } from "../../functions/shared/ledger-schema";
import { settleStaleHolds } from "../../functions/shared/stale-holds";
import { createForwarderFromEnv, UsageForwarder } from "../../functions/usage-forwarder/forwarder";
import type { Sink } from "../../functions/usage-forwarder/sink";
import { ledgerItem } from "../forwarder/ledger-fixture";
import { recordForScan } from "../helpers/secret-scan";
import { CreditsFixture, HungServer } from "./dynalite-fixture";
import { createLedgerDocumentClient } from "../../functions/shared/ledger-store";
import { DynamoDBDocumentClient } from "@aws-sdk/lib-dynamodb";

const HOLD = 40_000;
const MINUTE = 60_000;

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

describe("stale prepaid holds", function () {
  this.timeout(30_000);
  const db = new CreditsFixture();
  let store: DynamoCustomerStore;
  let logs: string[];
  let log: Logger;
  const now = Date.now();

  before(() => db.start());
  after(() => db.stop());
  beforeEach(async () => {
    await db.newTables();
    store = db.store();
    logs = [];
    log = createLogger({ level: "debug", write: (line) => logs.push(line) });
  });
  afterEach(() => recordForScan("stale-hold logs", logs));

  const events = (message: string) => logs.map((line) => JSON.parse(line) as Record<string, unknown>).filter((line) => line.message === message);
  const fund = (customerId: string, micros: number) => store.credit({ customerId, currency: "usd", creditId: `cli:${customerId}`, micros, source: "cli", now });
  const hold = async (customerId: string, transactionId: string, at: number, micros = HOLD) => {
    const result = await store.reserve({ customerId, currency: "usd", transactionId, micros, now: at });
    expect(result.ok, `reserve ${transactionId}`).to.equal(true);
  };
  /** The ledger item a request writes after its answer (prepaid: owed to Moesif only; `settlement` pending). */
  const billed = (transactionId: string, cost: number, overrides: Partial<LedgerItem> = {}): LedgerItem =>
    ledgerItem({ transaction_id: transactionId, customer: "acme", cost, stripe: false, billing_mode: "prepaid", reserved_micros: HOLD, settlement: "pending", ...overrides });

  describe("settleStaleHolds", () => {
    it("settles old holds from their billed ledger items, releases the rest, and leaves young holds alone", async () => {
      await fund("acme", 1_000_000);
      await hold("acme", "tx-billed", now - 10 * MINUTE);
      await hold("acme", "tx-unbilled", now - 10 * MINUTE);
      await hold("acme", "tx-none", now - 9 * MINUTE);
      await hold("acme", "tx-young", now);
      await db.putLedgerItem(billed("tx-billed", 7_000));
      await db.putLedgerItem(billed("tx-unbilled", 5_000, { billed: false }));

      const report = await settleStaleHolds({ store, ledger: db.ledger(), olderThan: now - 6 * MINUTE, now, log });

      expect(report).to.deep.equal({ settled: 1, released: 2, failed: 0 });
      const account = await db.account("acme");
      expect(account).to.deep.include({ balance_micros: 1_000_000 - 7_000 - HOLD, reserved_micros: HOLD });
      expect(Object.keys(account!.holds!)).to.deep.equal(["tx-young"]);
      expect(events("stale_hold_settled").map((e) => [e.transaction_id, e.charged_micros])).to.deep.equal([["tx-billed", 7_000]]);
      expect(events("stale_hold_released").map((e) => e.transaction_id).sort()).to.deep.equal(["tx-none", "tx-unbilled"]);
    });

    it("counts a request it settles in the usage period its hold recorded (tokens and cost only when billed)", async () => {
      await fund("acme", 1_000_000);
      for (const tx of ["tx-billed", "tx-none"]) {
        expect((await store.reserve({ customerId: "acme", currency: "usd", transactionId: tx, micros: HOLD, now: now - 10 * MINUTE, periodStart: "2026-11-01" })).ok).to.equal(true);
      }
      await hold("acme", "tx-old-style", now - 10 * MINUTE); // a hold without a period: settled, not counted
      const item = billed("tx-billed", 7_000);
      await db.putLedgerItem(item);

      await settleStaleHolds({ store, ledger: db.ledger(), olderThan: now - 6 * MINUTE, now, log });

      expect(await store.getUsage("acme", "2026-11-01")).to.deep.include({
        periodStart: "2026-11-01",
        requests: 2,
        promptTokens: item.prompt_tokens,
        completionTokens: item.completion_tokens,
        costMicros: 7_000,
      });
      expect((await db.account("acme"))!.reserved_micros).to.equal(0);
    });

    it("charges at most the balance when a billed cost exceeds the hold, and logs the shortfall", async () => {
      await fund("acme", HOLD + 1_000);
      await hold("acme", "tx-big", now - 10 * MINUTE);
      await db.putLedgerItem(billed("tx-big", HOLD + 5_000));

      expect(await settleStaleHolds({ store, ledger: db.ledger(), olderThan: now - 6 * MINUTE, now, log })).to.deep.equal({ settled: 1, released: 0, failed: 0 });
      expect(await db.account("acme")).to.deep.include({ balance_micros: 0, reserved_micros: 0, holds: {} });
      expect(events("stale_hold_shortfall").map((e) => [e.charged_micros, e.shortfall_micros])).to.deep.equal([[HOLD + 1_000, 4_000]]);
    });

    it("keeps a hold whose ledger item cannot be read, and settles it once the ledger answers", async () => {
      await fund("acme", 1_000_000);
      await hold("acme", "tx-1", now - 10 * MINUTE);
      await db.putLedgerItem(billed("tx-1", 9_000));
      const failing = { getItem: async () => Promise.reject(Object.assign(new Error("Rate exceeded"), { name: "ThrottlingException" })) };

      expect(await settleStaleHolds({ store, ledger: failing, olderThan: now - 6 * MINUTE, now, log })).to.deep.equal({ settled: 0, released: 0, failed: 1 });
      expect(await db.account("acme")).to.deep.include({ balance_micros: 1_000_000 - HOLD, reserved_micros: HOLD });
      expect(events("stale_hold_failed")).to.have.length(1);

      expect(await settleStaleHolds({ store, ledger: db.ledger(), olderThan: now - 6 * MINUTE, now, log })).to.deep.equal({ settled: 1, released: 0, failed: 0 });
      expect(await db.account("acme")).to.deep.include({ balance_micros: 1_000_000 - 9_000, reserved_micros: 0 });
    });

    it("charges each hold once when sweeps race and run again", async () => {
      await fund("acme", 1_000_000);
      for (let i = 0; i < 10; i++) await hold("acme", `tx-${i}`, now - 10 * MINUTE);
      for (let i = 0; i < 10; i += 2) await db.putLedgerItem(billed(`tx-${i}`, 1_000 + i));

      const run = () => settleStaleHolds({ store, ledger: db.ledger(), olderThan: now - 6 * MINUTE, now, log });
      const reports = [...(await Promise.all([run(), run(), run()])), await run()];

      const total = reports.reduce((sum, r) => ({ settled: sum.settled + r.settled, released: sum.released + r.released, failed: sum.failed + r.failed }));
      expect(total).to.deep.equal({ settled: 5, released: 5, failed: 0 });
      expect(await db.account("acme")).to.deep.include({ balance_micros: 1_000_000 - (1_000 + 1_002 + 1_004 + 1_006 + 1_008), reserved_micros: 0, holds: {} });
    });
  });

  describe("in the usage forwarder", () => {
    it("settles stale and orphaned holds in a scheduled sweep, never in a stream delivery", async () => {
      const startedAt = now - 1_000;
      await fund("acme", 1_000_000);
      await hold("acme", "tx-stale", now - 10 * MINUTE);
      await hold("acme", "tx-orphan", now - 5_000);
      await hold("acme", "tx-live", now);
      const item = billed("tx-stale", 3_000);
      await db.putLedgerItem(item);
      const forwarder = createForwarderFromEnv(db.env({ HOLD_STALE_AFTER_MS: String(6 * MINUTE), FORWARDER_SWEEP_GRACE_MS: "0" }), {
        write: (line) => logs.push(line),
        orphanHoldsBefore: startedAt,
      });

      const delivered = await forwarder.deliver([item]);
      expect(delivered.holds).to.equal(undefined);
      expect((await db.account("acme"))!.reserved_micros).to.equal(3 * HOLD);

      const report = await forwarder.sweep();
      expect(report.holds).to.deep.equal({ settled: 1, released: 1, failed: 0 });
      const account = await db.account("acme");
      expect(account).to.deep.include({ balance_micros: 1_000_000 - 3_000 - HOLD, reserved_micros: HOLD });
      expect(Object.keys(account!.holds!)).to.deep.equal(["tx-live"]);
      expect(events("stale_holds_sweep")).to.have.length(1);
    });

    it("does not look at holds without CUSTOMERS_TABLE", async () => {
      await fund("acme", 1_000_000);
      await hold("acme", "tx-stale", now - 10 * MINUTE);
      const forwarder = createForwarderFromEnv(db.env({ CUSTOMERS_TABLE: undefined, FORWARDER_SWEEP_GRACE_MS: "0" }), { write: (line) => logs.push(line), orphanHoldsBefore: now });
      const report = await forwarder.sweep();
      expect(report.holds).to.equal(undefined);
      expect((await db.account("acme"))!.reserved_micros).to.equal(HOLD);
    });

    for (const failure of ["rejects", "never answers"] as const) {
      it(`delivers the ledger's backlog when the customers table ${failure}, and logs the holds' failure`, async () => {
        const items = Array.from({ length: 5 }, (_, i) => ledgerItem({ transaction_id: `led-${i}`, stripe: false, createdAt: now - MINUTE }));
        for (const item of items) await db.putLedgerItem(item);
        const hung = await new HungServer().start();
        const doc: DynamoDBDocumentClient = createLedgerDocumentClient({ AWS_ENDPOINT_URL_DYNAMODB: hung.endpoint, AWS_REGION: "us-east-1", AWS_ACCESS_KEY_ID: "local", AWS_SECRET_ACCESS_KEY: "local" }, { timeoutMs: 150 });
        const broken: Pick<CustomerStore, "staleHolds" | "settle"> =
          failure === "rejects"
            ? { staleHolds: async () => Promise.reject(new Error("AccessDeniedException: not authorized to perform dynamodb:Scan")), settle: async () => Promise.reject(new Error("unreachable")) }
            : new DynamoCustomerStore({ doc, table: "customers", timeoutMs: 150 });
        const sent: string[] = [];
        const forwarder = new UsageForwarder({
          store: db.ledger(),
          sinks: [countingSink("moesif", sent)],
          log,
          sweepGraceMs: 0,
          holds: { store: broken, ledger: db.ledger(), staleAfterMs: 6 * MINUTE },
        });
        try {
          const report = await forwarder.sweep();
          expect(report.delivered.moesif).to.equal(5);
          expect(report.holds).to.deep.equal({ settled: 0, released: 0, failed: 0 });
          expect(sent.sort()).to.deep.equal(items.map((i) => i.transaction_id).sort());
          expect(events("stale_holds_sweep_failed")).to.have.length(1);
        } finally {
          doc.destroy();
          await hung.stop();
        }
      });
    }
  });
});
