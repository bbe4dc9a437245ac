import { expect } from "chai";
import { createLogger } from "../../functions/ai-chat/logger";
import type { LedgerItem, SinkName } from "../../functions/shared/ledger-schema";
import type { BacklogOptions } from "../../functions/shared/ledger-store";
import { UsageForwarder, type UsageForwarderOptions } from "../../functions/usage-forwarder/forwarder";
import { outcomeOfStatus, parseRetryAfter, splitBatches, type BatchOutcome, type Sink } from "../../functions/usage-forwarder/sink";
import { ledgerItem } from "./ledger-fixture";

/** An in-memory ledger that records every write. */
class FakeStore {
  readonly items = new Map<string, LedgerItem>();
  readonly writes: string[] = [];
  backlogReads = 0;
  failMarksFor = new Set<string>();

  constructor(items: LedgerItem[] = []) {
    for (const item of items) this.items.set(item.transaction_id, { ...item });
  }
  async backlog(_options: BacklogOptions): Promise<LedgerItem[]> {
    this.backlogReads += 1;
    return [...this.items.values()].filter((i) => i.undelivered !== undefined).map((i) => ({ ...i }));
  }
  async markDelivered(id: string, sinks: SinkName | readonly SinkName[], at: number): Promise<void> {
    this.writes.push(`delivered ${String(sinks)} ${id}`);
    if (this.failMarksFor.has(id)) throw Object.assign(new Error("Throughput exceeds the current capacity"), { name: "ProvisionedThroughputExceededException" });
    const item = this.items.get(id)!;
    for (const sink of typeof sinks === "string" ? [sinks] : sinks) Object.assign(item, { [`${sink}_state`]: "delivered", [`${sink}_delivered_at`]: at });
    if (item.moesif_state !== "pending" && item.moesif_state !== "failed" && item.stripe_state !== "pending" && item.stripe_state !== "failed") delete item.undelivered;
  }
  async markFailed(id: string, sink: SinkName, error: string, attempts: number, nextAt: number): Promise<void> {
    this.writes.push(`failed ${sink} ${id}`);
    Object.assign(this.items.get(id)!, { [`${sink}_state`]: "failed", [`${sink}_error`]: error, [`${sink}_attempts`]: attempts, [`${sink}_next_at`]: nextAt });
  }
  async clearBacklog(id: string): Promise<void> {
    this.writes.push(`clear ${id}`);
    delete this.items.get(id)!.undelivered;
  }
}

/** A sink whose answers a test scripts; it records every batch it was sent. */
class ScriptedSink implements Sink {
  readonly sent: string[][] = [];
  concurrency = 1;
  answer: (batch: LedgerItem[]) => BatchOutcome = () => ({ kind: "delivered" });
  readiness: { ok: true } | { ok: false; reason: string } = { ok: true };
  constructor(
    readonly name: SinkName,
    private readonly maxBatch = 100,
  ) {}
  async ready() {
    return this.readiness;
  }
  check(item: LedgerItem): string | undefined {
    return item.stripe_customer_id === "" ? "no customer" : undefined;
  }
  batches(items: LedgerItem[]): LedgerItem[][] {
    return splitBatches(items, this.maxBatch, Number.POSITIVE_INFINITY, () => 0);
  }
  async send(batch: LedgerItem[]): Promise<BatchOutcome> {
    this.sent.push(batch.map((i) => i.transaction_id));
    return this.answer(batch);
  }
}

describe("UsageForwarder (core, fake ledger and sinks, fake clock)", () => {
  let now: number;
  let logs: string[];
  const forwarder = (store: FakeStore, sinks: Sink[], extra: Partial<UsageForwarderOptions> = {}) =>
    new UsageForwarder({ store, sinks, clock: () => now, log: createLogger({ level: "debug", write: (l) => logs.push(l) }), ...extra });
  const logged = (message: string) => logs.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.message === message);

  beforeEach(() => {
    now = 1_800_000_000_000;
    logs = [];
  });

  describe("a sink that is unavailable", () => {
    it("leaves every item pending, writes nothing, and backs off 1 s doubling to 30 s", async () => {
      const store = new FakeStore([ledgerItem({ stripe: false })]);
      const moesif = new ScriptedSink("moesif");
      moesif.answer = () => ({ kind: "unavailable", reason: "Moesif answered HTTP 503" });
      const fwd = forwarder(store, [moesif]);

      const first = await fwd.deliver([...store.items.values()]);
      const waits = [1000, 2000, 4000, 8000, 16000, 30000, 30000];
      const observed: Array<[number, number]> = [];
      for (const wait of waits) {
        const before = moesif.sent.length;
        now += wait - 1;
        const early = await fwd.deliver([...store.items.values()]);
        const triedEarly = moesif.sent.length - before;
        now += 1;
        await fwd.deliver([...store.items.values()]);
        observed.push([triedEarly, moesif.sent.length - before - triedEarly]);
        expect(early.pending.moesif).to.equal(1);
      }

      expect(first.pending.moesif).to.equal(1);
      expect(observed, "[sends just before the back-off ends, sends when it ends]").to.deep.equal(waits.map(() => [0, 1]));
      expect(store.writes).to.deep.equal([]);
      expect(logged("sink_unavailable")[0]).to.include({ sink: "moesif", reason: "Moesif answered HTTP 503" });
    });

    it("waits what Retry-After says, and no more than 60 s", async () => {
      const store = new FakeStore([ledgerItem({ stripe: false })]);
      const moesif = new ScriptedSink("moesif");
      let retryAfter = "7";
      moesif.answer = () => outcomeOfStatus(429, "Moesif answered HTTP 429", retryAfter, now);
      const fwd = forwarder(store, [moesif]);

      await fwd.deliver([...store.items.values()]);
      now += 6999;
      await fwd.deliver([...store.items.values()]);
      const triedBefore = moesif.sent.length;
      now += 1;
      retryAfter = "3600";
      await fwd.deliver([...store.items.values()]);
      now += 59_999;
      await fwd.deliver([...store.items.values()]);
      const triedAtCap = moesif.sent.length;
      now += 1;
      await fwd.deliver([...store.items.values()]);

      expect(triedBefore).to.equal(1);
      expect(triedAtCap).to.equal(2);
      expect(moesif.sent.length).to.equal(3);
      expect(store.writes).to.deep.equal([]);
    });

    it("is tried no more once one batch found it down in a run, and the other batches stay pending", async () => {
      const items = Array.from({ length: 5 }, () => ledgerItem({ stripe: false }));
      const store = new FakeStore(items);
      const moesif = new ScriptedSink("moesif", 2);
      moesif.answer = () => ({ kind: "unavailable", reason: "timeout" });

      const report = await forwarder(store, [moesif]).deliver(items);

      expect(moesif.sent.length).to.equal(1);
      expect(report.pending.moesif).to.equal(5);
    });

    it("does not stop the other sink", async () => {
      const items = [ledgerItem(), ledgerItem()];
      const store = new FakeStore(items);
      const moesif = new ScriptedSink("moesif");
      const stripe = new ScriptedSink("stripe");
      stripe.answer = () => ({ kind: "unavailable", reason: "Stripe answered HTTP 500" });

      const report = await forwarder(store, [moesif, stripe]).deliver(items);

      expect(report.delivered).to.deep.equal({ moesif: 2, stripe: 0 });
      expect(report.pending).to.deep.equal({ moesif: 0, stripe: 2 });
      expect([...store.items.values()].every((i) => i.moesif_state === "delivered" && i.stripe_state === "pending" && i.undelivered)).to.equal(true);
    });

    it("counts as unavailable when its credentials cannot be read, and sends nothing", async () => {
      const store = new FakeStore([ledgerItem({ stripe: false })]);
      const moesif = new ScriptedSink("moesif");
      moesif.readiness = { ok: false, reason: "the SSM parameter /x could not be read" };

      const report = await forwarder(store, [moesif]).deliver([...store.items.values()]);

      expect(moesif.sent).to.deep.equal([]);
      expect(report.pending.moesif).to.equal(1);
      expect(store.writes).to.deep.equal([]);
    });
  });

  describe("a sink that refuses a batch", () => {
    it("bisects it: only the refused item fails, its batch-mates are delivered, and the sink is not backed off", async () => {
      const items = Array.from({ length: 10 }, () => ledgerItem({ stripe: false }));
      const poison = items[6].transaction_id;
      const store = new FakeStore(items);
      const moesif = new ScriptedSink("moesif");
      moesif.answer = (batch) => (batch.some((i) => i.transaction_id === poison) ? { kind: "refused", reason: "Moesif answered HTTP 400" } : { kind: "delivered" });
      const fwd = forwarder(store, [moesif]);

      const report = await fwd.deliver(items);

      expect(report.delivered.moesif).to.equal(9);
      expect(report.failed.moesif).to.equal(1);
      expect(store.items.get(poison)).to.include({ moesif_state: "failed", moesif_attempts: 1, moesif_error: "Moesif answered HTTP 400", moesif_next_at: now + 2 * 60_000 });
      expect(store.items.get(poison)!.undelivered).to.be.a("string");
      expect(moesif.sent.length).to.be.at.most(9);
      const fresh = ledgerItem({ stripe: false });
      store.items.set(fresh.transaction_id, fresh);
      expect((await fwd.deliver([fresh])).delivered.moesif, "not backed off").to.equal(1);
    });

    it("re-tries a failed item only when due, on a schedule of 2^attempts minutes capped at 60", async () => {
      const item = ledgerItem({ stripe: false, moesif_state: "failed", moesif_attempts: 5, moesif_next_at: now + 1000 });
      const store = new FakeStore([item]);
      const moesif = new ScriptedSink("moesif");
      moesif.answer = () => ({ kind: "refused", reason: "still bad" });
      const fwd = forwarder(store, [moesif]);

      const early = await fwd.deliver([{ ...store.items.get(item.transaction_id)! }]);
      now += 1000;
      await fwd.deliver([{ ...store.items.get(item.transaction_id)! }]);

      expect(early.pending.moesif).to.equal(1);
      expect(moesif.sent.length).to.equal(1);
      expect(store.items.get(item.transaction_id)).to.include({ moesif_attempts: 6, moesif_next_at: now + 60 * 60_000 });
    });

    it("fails without sending an item the sink's own check refuses", async () => {
      const bad = ledgerItem({ stripe_customer_id: "" });
      const store = new FakeStore([bad]);
      const stripe = new ScriptedSink("stripe");

      const report = await forwarder(store, [stripe]).deliver([bad]);

      expect(stripe.sent).to.deep.equal([]);
      expect(report.failed.stripe).to.equal(1);
      expect(store.items.get(bad.transaction_id)).to.include({ stripe_state: "failed", stripe_error: "no customer" });
    });

    it("writes reasons through the redaction it is given", async () => {
      const item = ledgerItem({ stripe: false });
      const store = new FakeStore([item]);
      const moesif = new ScriptedSink("moesif");
      moesif.answer = () => ({ kind: "refused", reason: "bad app id moesif-secret-value-123" });

      await forwarder(store, [moesif], { redact: (t) => t.replace("moesif-secret-value-123", "[REDACTED]") }).deliver([item]);

      expect(store.items.get(item.transaction_id)!.moesif_error).to.equal("bad app id [REDACTED]");
    });
  });

  describe("delivery marks", () => {
    it("leaves an item pending when its delivered mark cannot be written, and marks it later without sending it again", async () => {
      const items = [ledgerItem({ stripe: false }), ledgerItem({ stripe: false })];
      const store = new FakeStore(items);
      store.failMarksFor.add(items[0].transaction_id);
      const moesif = new ScriptedSink("moesif");
      const fwd = forwarder(store, [moesif]);

      const first = await fwd.deliver(items);
      store.failMarksFor.clear();
      const second = await fwd.sweep();

      expect(first.delivered.moesif).to.equal(1);
      expect(first.pending.moesif).to.equal(1);
      expect(logged("ledger_mark_failed")[0]).to.deep.include({ transaction_id: items[0].transaction_id, sinks: ["moesif"] });
      expect(second.delivered.moesif).to.equal(1);
      expect(moesif.sent.flat().filter((id) => id === items[0].transaction_id)).to.have.length(1);
      expect(store.items.get(items[0].transaction_id)).to.include({ moesif_state: "delivered" });
    });

    it("sends an item whose mark failed again from another process (which cannot know), for the sink to de-duplicate", async () => {
      const item = ledgerItem({ stripe: false });
      const store = new FakeStore([item]);
      store.failMarksFor.add(item.transaction_id);
      const moesif = new ScriptedSink("moesif");

      await forwarder(store, [moesif]).deliver([item]);
      store.failMarksFor.clear();
      const report = await forwarder(store, [moesif]).sweep();

      expect(report.delivered.moesif).to.equal(1);
      expect(moesif.sent.flat()).to.deep.equal([item.transaction_id, item.transaction_id]);
    });

    it("marks an item both sinks took in one run with a single write", async () => {
      const item = ledgerItem();
      const store = new FakeStore([item]);

      const report = await forwarder(store, [new ScriptedSink("moesif"), new ScriptedSink("stripe")]).deliver([item]);

      expect(report.delivered).to.deep.equal({ moesif: 1, stripe: 1 });
      expect(store.writes).to.deep.equal([`delivered moesif,stripe ${item.transaction_id}`]);
    });

    it("takes out of the backlog an item that owes nothing but is still there", async () => {
      const item = ledgerItem({ moesif_state: "delivered", stripe_state: "delivered" });
      const store = new FakeStore([item]);

      await forwarder(store, [new ScriptedSink("moesif")]).deliver([item]);

      expect(store.writes).to.deep.equal([`clear ${item.transaction_id}`]);
    });

    it("counts items owed to a sink it does not run as pending, and sends them nowhere", async () => {
      const item = ledgerItem();
      const store = new FakeStore([item]);

      const report = await forwarder(store, [new ScriptedSink("moesif")]).deliver([item]);

      expect(report.delivered).to.deep.equal({ moesif: 1, stripe: 0 });
      expect(report.pending).to.deep.equal({ moesif: 0, stripe: 1 });
      expect(store.items.get(item.transaction_id)!.undelivered).to.be.a("string");
    });
  });

  describe("sweep", () => {
    it("never overlaps: a second call while one runs gets the first one's promise", async () => {
      const store = new FakeStore([ledgerItem({ stripe: false })]);
      const moesif = new ScriptedSink("moesif");
      const fwd = forwarder(store, [moesif]);

      const first = fwd.sweep();
      const second = fwd.sweep();
      await Promise.all([first, second]);

      expect(second).to.equal(first);
      expect(moesif.sent.length).to.equal(1);
    });

    it("reads nothing while every sink is backing off", async () => {
      const store = new FakeStore([ledgerItem({ stripe: false })]);
      const moesif = new ScriptedSink("moesif");
      moesif.answer = () => ({ kind: "unavailable", reason: "down" });
      const fwd = forwarder(store, [moesif]);

      await fwd.sweep();
      const reads = store.backlogReads;
      await fwd.sweep();

      expect(reads).to.equal(1);
      expect(store.backlogReads).to.equal(1);
    });

    it("starts nothing it could not finish before the deadline", async () => {
      const store = new FakeStore([ledgerItem({ stripe: false })]);
      const moesif = new ScriptedSink("moesif");

      const report = await forwarder(store, [moesif]).sweep({ deadline: now + 100 });

      expect(moesif.sent).to.deep.equal([]);
      expect(report.delivered.moesif).to.equal(0);
    });

    it("never throws when the backlog cannot be read", async () => {
      const store = new FakeStore();
      store.backlog = async () => {
        throw new Error("DynamoDB is down");
      };

      const report = await forwarder(store, [new ScriptedSink("moesif")]).sweep();

      expect(report.considered).to.equal(0);
      expect(logged("ledger_backlog_read_failed")).to.have.length(1);
    });
  });

  describe("what an answer means", () => {
    it("sorts HTTP statuses into delivered, refused (the items) and unavailable (the sink)", () => {
      const kinds = [200, 201, 400, 413, 422, 401, 403, 404, 408, 409, 429, 500, 503].map((s) => [s, outcomeOfStatus(s, "r").kind]);
      expect(kinds).to.deep.equal([
        [200, "delivered"],
        [201, "delivered"],
        [400, "refused"],
        [413, "refused"],
        [422, "refused"],
        [401, "unavailable"],
        [403, "unavailable"],
        [404, "unavailable"],
        [408, "unavailable"],
        [409, "unavailable"],
        [429, "unavailable"],
        [500, "unavailable"],
        [503, "unavailable"],
      ]);
    });

    it("reads Retry-After as seconds or a date, capped at 60 s", () => {
      const now = Date.parse("2030-01-01T00:00:00Z");
      expect(parseRetryAfter("2", now)).to.equal(2000);
      expect(parseRetryAfter("Tue, 01 Jan 2030 00:00:30 GMT", now)).to.equal(30_000);
      expect(parseRetryAfter("86400", now)).to.equal(60_000);
      expect(parseRetryAfter("soon", now)).to.equal(undefined);
    });
  });
});
