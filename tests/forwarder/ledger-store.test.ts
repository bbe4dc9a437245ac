import { expect } from "chai";
import { UNDELIVERED_SHARDS, undeliveredShard, type LedgerItem } from "../../functions/shared/ledger-schema";
import { LedgerFixture, ledgerItem } from "./ledger-fixture";

describe("LedgerStore (against dynalite)", () => {
  const ledger = new LedgerFixture();
  before(() => ledger.start());
  after(() => ledger.stop());
  beforeEach(() => ledger.newTable());

  describe("backlog", () => {
    it("returns the items that still owe a delivery, longest due first across shards, and none that owe nothing", async () => {
      const now = Date.now();
      const owing = Array.from({ length: 40 }, (_, i) => ledgerItem({ createdAt: now - 100_000 + i * 7 }));
      const settled = ledgerItem({ createdAt: now - 200_000, moesif_state: "delivered", stripe_state: "delivered", undelivered: undefined });
      await ledger.put(...owing.slice().reverse(), settled);

      const backlog = await ledger.store().backlog({ now, graceMs: 0, limit: 1000 });

      expect(new Set(owing.map((i) => i.undelivered)).size, "items spread over several shards").to.be.greaterThan(4);
      expect(backlog.map((i) => i.transaction_id)).to.deep.equal(owing.map((i) => i.transaction_id));
    });

    it("leaves out items younger than the grace period and keeps the oldest `limit` ones", async () => {
      const now = Date.now();
      const old = Array.from({ length: 5 }, (_, i) => ledgerItem({ createdAt: now - 120_000 + i }));
      const young = ledgerItem({ createdAt: now - 1000 });
      await ledger.put(young, ...old);

      const graced = await ledger.store().backlog({ now, graceMs: 60_000, limit: 100 });
      const limited = await ledger.store().backlog({ now, graceMs: 0, limit: 3 });

      expect(graced.map((i) => i.transaction_id)).to.deep.equal(old.map((i) => i.transaction_id));
      expect(limited.map((i) => i.transaction_id)).to.deep.equal(old.slice(0, 3).map((i) => i.transaction_id));
    });

    it("returns a failed item only once its next attempt is due, and only for the sinks asked about", async () => {
      const now = Date.now();
      const notDue = ledgerItem({ createdAt: now - 50_000, moesif_state: "delivered", stripe_state: "failed", stripe_next_at: now + 60_000, stripe_attempts: 1 });
      const dueAgain = ledgerItem({ createdAt: now - 40_000, moesif_state: "delivered", stripe_state: "failed", stripe_next_at: now - 1, stripe_attempts: 1 });
      const moesifOnly = ledgerItem({ createdAt: now - 30_000, stripe: false });
      await ledger.put(notDue, dueAgain, moesifOnly);

      const all = await ledger.store().backlog({ now, graceMs: 0, limit: 100 });
      const stripeOnly = await ledger.store().backlog({ now, graceMs: 0, limit: 100, sinks: ["stripe"] });

      // Longest due first: the failed item became due (its next attempt) after the pending one was written.
      expect(all.map((i) => i.transaction_id)).to.deep.equal([moesifOnly.transaction_id, dueAgain.transaction_id]);
      expect(stripeOnly.map((i) => i.transaction_id)).to.deep.equal([dueAgain.transaction_id]);
    });

    it("reads past a shard full of not-yet-due failed items to the due ones behind them", async () => {
      const now = Date.now();
      const shard = "u3";
      const blocked: LedgerItem[] = [];
      for (let n = 0; blocked.length < 150; n++) {
        const item = ledgerItem({ createdAt: now - 500_000 + n, moesif_state: "failed", moesif_next_at: now + 3_600_000, stripe_state: "delivered" });
        if (item.undelivered === shard) blocked.push(item);
      }
      let behind: LedgerItem;
      do behind = ledgerItem({ createdAt: now - 1000 });
      while (behind.undelivered !== shard);
      await ledger.put(...blocked, behind);

      const backlog = await ledger.store().backlog({ now, graceMs: 0, limit: 10 });

      expect(backlog.map((i) => i.transaction_id)).to.deep.equal([behind.transaction_id]);
    });
  });

  describe("markDelivered", () => {
    it("takes the item out of the backlog once the last sink that owed it has it, and not before", async () => {
      const item = ledgerItem();
      await ledger.put(item);
      const store = ledger.store();

      await store.markDelivered(item.transaction_id, "moesif", 111);
      const afterMoesif = await ledger.get(item.transaction_id);
      await store.markDelivered(item.transaction_id, "stripe", 222);
      const afterStripe = await ledger.get(item.transaction_id);

      expect(afterMoesif).to.include({ moesif_state: "delivered", moesif_delivered_at: 111, stripe_state: "pending", undelivered: item.undelivered });
      expect(afterStripe).to.include({ stripe_state: "delivered", stripe_delivered_at: 222 });
      expect(afterStripe).to.not.have.property("undelivered");
    });

    it("marks several sinks delivered in one write and takes the item out of the backlog", async () => {
      const item = ledgerItem();
      await ledger.put(item);

      await ledger.store().markDelivered(item.transaction_id, ["moesif", "stripe"], 7);

      const stored = await ledger.get(item.transaction_id);
      expect(stored).to.include({ moesif_state: "delivered", moesif_delivered_at: 7, stripe_state: "delivered", stripe_delivered_at: 7 });
      expect(stored).to.not.have.property("undelivered");
    });

    it("takes an item owed to Moesif alone out of the backlog with the Moesif mark", async () => {
      const item = ledgerItem({ stripe: false });
      await ledger.put(item);

      await ledger.store().markDelivered(item.transaction_id, "moesif", 5);

      const stored = await ledger.get(item.transaction_id);
      expect(stored).to.include({ moesif_state: "delivered" });
      expect(stored).to.not.have.property("undelivered");
    });

    it("clears the error and schedule of an item that had failed", async () => {
      const item = ledgerItem({ stripe_state: "failed", stripe_error: "refused", stripe_next_at: 1, stripe_attempts: 2, moesif_state: "delivered" });
      await ledger.put(item);

      await ledger.store().markDelivered(item.transaction_id, "stripe", 9);

      const stored = await ledger.get(item.transaction_id);
      expect(stored).to.include({ stripe_state: "delivered", stripe_attempts: 2 });
      expect(stored).to.not.have.any.keys("stripe_error", "stripe_next_at", "undelivered");
    });

    it("never leaves an item out of the backlog while a sink owes it, nor in it once none does, when both sinks mark at once", async () => {
      const items = Array.from({ length: 30 }, () => ledgerItem());
      await ledger.put(...items);
      const store = ledger.store();

      await Promise.all(items.flatMap((item) => [store.markDelivered(item.transaction_id, "moesif", 1), store.markDelivered(item.transaction_id, "stripe", 2)]));

      for (const item of items) {
        const stored = await ledger.get(item.transaction_id);
        expect(stored).to.include({ moesif_state: "delivered", stripe_state: "delivered" });
        expect(stored, item.transaction_id).to.not.have.property("undelivered");
      }
    });

    it("writes nothing for an id the table does not hold", async () => {
      await ledger.store().markDelivered("no-such-item", "moesif", 1);

      expect(await ledger.all()).to.deep.equal([]);
    });
  });

  describe("markFailed", () => {
    it("keeps the item in the backlog with its reason, attempts and next attempt time", async () => {
      const item = ledgerItem();
      await ledger.put(item);

      await ledger.store().markFailed(item.transaction_id, "stripe", "No such customer", 1, 999);

      const stored = await ledger.get(item.transaction_id);
      expect(stored).to.include({ stripe_state: "failed", stripe_error: "No such customer", stripe_attempts: 1, stripe_next_at: 999, undelivered: item.undelivered });
    });

    it("never overwrites a delivered mark", async () => {
      const item = ledgerItem({ stripe_state: "delivered" });
      await ledger.put(item);

      await ledger.store().markFailed(item.transaction_id, "stripe", "late refusal", 1, 999);

      const stored = await ledger.get(item.transaction_id);
      expect(stored).to.include({ stripe_state: "delivered" });
      expect(stored).to.not.have.property("stripe_error");
    });

    it("puts back in the backlog an item that had lost its shard", async () => {
      const item = ledgerItem({ undelivered: undefined });
      await ledger.put(item);

      await ledger.store().markFailed(item.transaction_id, "moesif", "refused", 1, 5);

      expect(await ledger.get(item.transaction_id)).to.include({ undelivered: undeliveredShard(item.transaction_id) });
    });
  });

  describe("clearBacklog", () => {
    it("removes the backlog attribute only from an item no sink owes", async () => {
      const settled = ledgerItem({ moesif_state: "delivered", stripe_state: "delivered" });
      const owing = ledgerItem({ moesif_state: "delivered", stripe_state: "failed" });
      await ledger.put(settled, owing);

      await ledger.store().clearBacklog(settled.transaction_id);
      await ledger.store().clearBacklog(owing.transaction_id);

      expect(await ledger.get(settled.transaction_id)).to.not.have.property("undelivered");
      expect(await ledger.get(owing.transaction_id)).to.include({ undelivered: owing.undelivered });
    });
  });

  describe("scanAll", () => {
    it("yields every item of the table", async () => {
      const items = Array.from({ length: 25 }, () => ledgerItem());
      await ledger.put(...items);

      const seen: string[] = [];
      for await (const item of ledger.store().scanAll()) seen.push(item.transaction_id);

      expect(seen.sort()).to.deep.equal(items.map((i) => i.transaction_id).sort());
    });
  });

  it("spreads the backlog over all of its shards", () => {
    const shards = new Set(Array.from({ length: 2000 }, (_, i) => undeliveredShard(`id-${i}`)));
    expect(shards.size).to.equal(UNDELIVERED_SHARDS);
  });
});
