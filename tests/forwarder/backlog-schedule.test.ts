import { expect } from "chai";
import { randomUUID } from "node:crypto";
import { createLogger } from "../../functions/ai-chat/logger";
import { undeliveredShard, type LedgerItem } from "../../functions/shared/ledger-schema";
import { UsageForwarder } from "../../functions/usage-forwarder/forwarder";
import type { Sink } from "../../functions/usage-forwarder/sink";
import { LedgerFixture, ledgerItem } from "./ledger-fixture";

/** A transaction id whose backlog shard is `shard` (so a test can crowd one shard). */
function idInShard(shard: string): string {
  for (;;) {
    const id = randomUUID();
    if (undeliveredShard(id) === shard) return id;
  }
}

/** A Moesif sink that takes everything and records what it was sent. */
function recordingMoesif(sent: string[]): Sink {
  return {
    name: "moesif",
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

const silent = () => createLogger({ level: "error", write: () => undefined });

describe("the backlog's schedule (due_at) and read budget (against dynalite)", function () {
  this.timeout(60_000);
  const ledger = new LedgerFixture();
  before(() => ledger.start());
  after(() => ledger.stop());
  beforeEach(() => ledger.newTable());

  it("delivers a pending item that sits behind hundreds of not-yet-due failed items in its shard", async () => {
    const now = Date.now();
    const base = now - 3_600_000;
    // Stripe refused these (e.g. no Stripe customer) and tries again in up to an hour; Moesif has them. Before the
    // index was sorted by when an item is due, they stayed at the head of their shard and hid what came after.
    const blockers = Array.from({ length: 520 }, (_, i) =>
      ledgerItem({ transaction_id: idInShard("u3"), createdAt: base + i, moesif_state: "delivered", stripe_state: "failed", stripe_next_at: now + 3_000_000, stripe_attempts: 6 }),
    );
    await ledger.putMany(blockers);
    const victim = ledgerItem({ transaction_id: idInShard("u3"), createdAt: base + 5000, stripe: false });
    await ledger.put(victim);
    const sent: string[] = [];

    await new UsageForwarder({ store: ledger.store(), sinks: [recordingMoesif(sent)], log: silent(), sweepGraceMs: 0, sweepLimit: 10 }).sweep();

    expect(sent).to.deep.equal([victim.transaction_id]);
    expect(await ledger.get(victim.transaction_id)).to.include({ moesif_state: "delivered" });
  });

  describe("items owed only to a sink the sweep is not asking about", () => {
    let victim: LedgerItem;
    beforeEach(async () => {
      const now = Date.now();
      // Moesif has them, Stripe is down (backing off): a sweep asking Moesif alone reads and filters them out.
      const stripeOnly = Array.from({ length: 520 }, (_, i) =>
        ledgerItem({ transaction_id: idInShard("u5"), createdAt: now - 600_000 + i, moesif_state: "delivered", stripe_state: "pending" }),
      );
      await ledger.putMany(stripeOnly);
      victim = ledgerItem({ transaction_id: idInShard("u5"), createdAt: now - 1000, stripe: false });
      await ledger.put(victim);
    });

    it("are read past, within the read budget, to the item due for the sink asked about", async () => {
      const backlog = await ledger.store().backlog({ now: Date.now(), graceMs: 0, limit: 10, sinks: ["moesif"] });

      expect(backlog.map((i) => i.transaction_id)).to.deep.equal([victim.transaction_id]);
    });

    it("are read past a budget at a time when the budget is smaller than they are, resuming where the last read stopped", async () => {
      const store = ledger.store();
      const found: number[] = [];
      for (let call = 1; call <= 8 && found.length === 0; call++) {
        const backlog = await store.backlog({ now: Date.now(), graceMs: 0, limit: 10, sinks: ["moesif"], maxReadPerShard: 100, resume: true });
        if (backlog.some((i) => i.transaction_id === victim.transaction_id)) found.push(call);
      }
      const unresumed = await ledger.store().backlog({ now: Date.now(), graceMs: 0, limit: 10, sinks: ["moesif"], maxReadPerShard: 100 });

      expect(found, "the call that reached it").to.have.length(1);
      expect(found[0]).to.be.within(2, 7);
      expect(unresumed, "without resuming, each read stops at its budget").to.deep.equal([]);
    });
  });

  describe("due_at, as the marks keep it", () => {
    it("keeps an item due while a sink is pending, then waits for the failed sink's next attempt", async () => {
      const now = Date.now();
      const item = ledgerItem({ createdAt: now - 10_000 });
      await ledger.put(item);
      const store = ledger.store();
      const nextAt = now + 3_600_000;

      await store.markFailed(item.transaction_id, "stripe", "No such customer", 1, nextAt, { held: item, now });
      const afterFail = (await ledger.get(item.transaction_id))!;
      await store.markDelivered(item.transaction_id, "moesif", now, { held: afterFail, now });
      const afterDeliver = (await ledger.get(item.transaction_id))!;

      expect(afterFail.due_at).to.be.at.most(now);
      expect(afterDeliver).to.include({ due_at: nextAt, stripe_state: "failed", moesif_state: "delivered", undelivered: item.undelivered });
      expect(await store.backlog({ now, graceMs: 0, limit: 10 })).to.deep.equal([]);
      expect((await store.backlog({ now: nextAt, graceMs: 0, limit: 10 })).map((i) => i.transaction_id)).to.deep.equal([item.transaction_id]);
    });

    it("is the earliest next attempt of the failed sinks", async () => {
      const now = Date.now();
      const item = ledgerItem({ createdAt: now - 10_000, moesif_state: "failed", moesif_next_at: now + 50_000, moesif_attempts: 1 });
      await ledger.put(item);

      await ledger.store().markFailed(item.transaction_id, "stripe", "refused", 1, now + 20_000, { held: item, now });
      const stored = (await ledger.get(item.transaction_id))!;
      await ledger.store().markFailed(item.transaction_id, "stripe", "refused", 2, now + 90_000, { held: stored, now });

      expect(stored.due_at).to.equal(now + 20_000);
      expect((await ledger.get(item.transaction_id))!.due_at).to.equal(now + 50_000);
    });

    it("never hides a pending sink behind a failed one's schedule when the item changed since it was read", async () => {
      const now = Date.now();
      const item = ledgerItem({ createdAt: now - 10_000 });
      await ledger.put(item);
      // What the deliverer holds says Moesif has it; the table says Moesif is still owed (another writer, a stale read).
      const stale: LedgerItem = { ...item, moesif_state: "delivered" };

      await ledger.store().markFailed(item.transaction_id, "stripe", "refused", 1, now + 3_600_000, { held: stale, now });

      const stored = (await ledger.get(item.transaction_id))!;
      expect(stored).to.include({ stripe_state: "failed", moesif_state: "pending" });
      expect(stored.due_at).to.be.at.most(now);
      expect((await ledger.store().backlog({ now, graceMs: 0, limit: 10, sinks: ["moesif"] })).map((i) => i.transaction_id)).to.deep.equal([item.transaction_id]);
    });

    it("leaves the backlog, due_at and all, once no sink owes anything", async () => {
      const item = ledgerItem();
      await ledger.put(item);

      await ledger.store().markDelivered(item.transaction_id, ["moesif", "stripe"], 5, { held: item });

      expect(await ledger.get(item.transaction_id)).to.not.have.any.keys("undelivered", "due_at");
    });
  });
});
