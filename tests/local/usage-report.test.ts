import { expect } from "chai";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import Database from "better-sqlite3";
import type { StoredEvent } from "../../scripts/local/moesif-collector";
import { SqliteStore } from "../../scripts/local/sqlite-store";
import type { LedgerItem } from "../../functions/shared/ledger-schema";
import { ledgerUsage, usageReport, usageTable } from "../../scripts/usage";

let counter = 0;
/** An event as the function sends it (only the fields the store reads). */
function storedEvent(customer: string, metadata: Record<string, unknown>, status = 200): StoredEvent {
  counter += 1;
  return {
    transaction_id: `tx-${counter}`,
    user_id: customer,
    company_id: `cus_${customer}`,
    request: { time: "2026-01-01T00:00:00.000Z" },
    response: { status },
    metadata: { model: "gpt-4o-mini", plan: "pro", usage_estimated: false, ...metadata },
  };
}

const billed = (prompt: number, completion: number, costMicros: number | null, currency = "usd") => ({
  prompt_tokens: prompt,
  completion_tokens: completion,
  total_tokens: prompt + completion,
  billed: true,
  cost_micros: costMicros,
  currency: costMicros === null ? null : currency,
});

describe("usage report (SQLite store + npm run usage)", () => {
  let store: SqliteStore;
  beforeEach(() => {
    store = new SqliteStore(":memory:");
  });
  afterEach(() => store.close());

  it("sums the cost each event was billed, in integer micro-units, per customer, model and currency", () => {
    store.add([
      storedEvent("acme", billed(100, 20, 1_234)),
      storedEvent("acme", billed(50, 10, 617)),
      storedEvent("acme", { model: "gpt-4o", ...billed(10, 10, 125) }),
      storedEvent("globex", billed(7, 3, null)),
    ]);

    const rows = usageReport(store.usage());

    const line = (customer: string, model: string) => rows.find((r) => r.customer === customer && r.model === model)!;
    expect(line("acme", "gpt-4o-mini")).to.include({ requests: 2, billed_requests: 2, prompt_tokens: 150, completion_tokens: 30, total_tokens: 180, cost_micros: 1_851, currency: "usd", cost: 0.001851 });
    expect(line("acme", "gpt-4o")).to.include({ cost_micros: 125, currency: "usd" });
    expect(line("globex", "gpt-4o-mini")).to.include({ requests: 1, total_tokens: 10, cost_micros: null, currency: null, cost: null });
    expect(usageTable(rows)).to.include("0.001851 usd");
  });

  it("keeps an unbilled error of a priced plan on its customer's model line", () => {
    store.add([
      storedEvent("acme", billed(100, 20, 1_000)),
      storedEvent("acme", { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, billed: false, cost_micros: null, currency: null }, 502),
    ]);
    const rows = store.usage();
    expect(rows).to.have.length(1);
    expect(rows[0]).to.include({ requests: 2, billed_requests: 1, cost_micros: 1_000, currency: "usd" });
  });

  it("keeps currencies apart instead of adding them up", () => {
    store.add([storedEvent("acme", billed(1, 1, 10, "usd")), storedEvent("acme", billed(1, 1, 20, "eur"))]);
    const rows = store.usage();
    expect(rows.map((r) => [r.currency, r.cost_micros])).to.have.deep.members([
      ["eur", 20],
      ["usd", 10],
    ]);
  });

  it("never sums negative, fractional or string counts and costs", () => {
    store.add([storedEvent("acme", { prompt_tokens: -50, completion_tokens: 2.5, total_tokens: "9", cost_micros: -3, currency: "usd" })]);
    expect(store.usage()[0]).to.include({ prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, cost_micros: null, currency: null });
  });

  it("opens a usage.db written by the previous schema, its old rows reading as without cost", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "usage-db-"));
    const file = path.join(dir, "usage.db");
    try {
      // The events table exactly as the first release created it.
      const old = new Database(file);
      old.exec(`CREATE TABLE events (
        transaction_id TEXT PRIMARY KEY, received_at TEXT NOT NULL, request_time TEXT, user_id TEXT, company_id TEXT, plan TEXT,
        model TEXT, status INTEGER, prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
        total_tokens INTEGER NOT NULL DEFAULT 0, usage_estimated INTEGER NOT NULL DEFAULT 0, event TEXT NOT NULL)`);
      old.prepare(`INSERT INTO events (transaction_id, received_at, user_id, plan, model, status, prompt_tokens, completion_tokens, total_tokens, event)
                   VALUES ('old-1', '2025-01-01', 'acme', 'pro', 'gpt-4o', 200, 5, 5, 10, '{}')`).run();
      old.close();

      const reopened = new SqliteStore(file);
      try {
        reopened.add([storedEvent("acme", billed(1, 1, 42))]);
        const rows = reopened.usage();
        expect(rows.find((r) => r.model === "gpt-4o")).to.include({ requests: 1, total_tokens: 10, cost_micros: null, currency: null });
        expect(rows.find((r) => r.model === "gpt-4o-mini")).to.include({ cost_micros: 42, currency: "usd" });
      } finally {
        reopened.close();
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

/** The ledger item of the same request as `storedEvent` describes (the fields the report reads). */
function ledgerItemOf(event: StoredEvent): LedgerItem {
  const m = event.metadata as Record<string, unknown>;
  const cost = typeof m.cost_micros === "number" && Number.isSafeInteger(m.cost_micros) && m.cost_micros >= 0 ? m.cost_micros : undefined;
  return {
    transaction_id: event.transaction_id!,
    created_at: 0,
    request_id: event.transaction_id!,
    method: "POST",
    route: "/v1/chat/completions",
    status: (event.response?.status as number) ?? 200,
    started_at: 0,
    finished_at: 0,
    customer_id: event.user_id,
    stripe_customer_id: event.company_id,
    plan: m.plan as string,
    model: (m.model as string | null) ?? undefined,
    prompt_tokens: m.prompt_tokens as number,
    completion_tokens: m.completion_tokens as number,
    total_tokens: m.total_tokens as number,
    cached_tokens: (m.cached_tokens as number) ?? 0,
    reasoning_tokens: 0,
    usage_estimated: m.usage_estimated === true,
    billed: m.billed === true,
    cost_micros: cost,
    currency: cost === undefined ? undefined : (m.currency as string),
    streamed: false,
    client_disconnected: false,
    moesif_event: JSON.stringify(event),
  };
}

describe("usage report from the ledger (npm run usage)", () => {
  it("makes the same rows from ledger items as the collector's store makes from the same requests' events", () => {
    const events = [
      storedEvent("acme", billed(100, 20, 1_234)),
      storedEvent("acme", { ...billed(50, 10, 617), usage_estimated: true, cached_tokens: 8 }),
      storedEvent("acme", { model: "gpt-4o", ...billed(10, 10, 125) }),
      storedEvent("acme", { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, billed: false, cost_micros: null, currency: null }, 502),
      storedEvent("acme", { model: null, prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, billed: false, cost_micros: null, currency: null }, 400),
      storedEvent("globex", billed(7, 3, null)),
      storedEvent("globex", billed(1, 1, 20, "eur")),
      storedEvent("globex", billed(1, 1, 10, "usd")),
    ];
    const store = new SqliteStore(":memory:");
    try {
      store.add(events);
      const fromLedger = ledgerUsage(events.map(ledgerItemOf));
      expect(fromLedger).to.deep.equal(store.usage());
      expect(fromLedger.find((r) => r.customer === "acme" && r.model === "gpt-4o-mini")).to.include({ requests: 3, billed_requests: 2, estimated_requests: 1, cached_tokens: 8, cost_micros: 1_851 });
    } finally {
      store.close();
    }
  });

  it("leaves out items without a customer and never sums a cost that is not a safe whole number", () => {
    const item = ledgerItemOf(storedEvent("acme", billed(5, 5, 100)));
    const rows = ledgerUsage([{ ...item, customer_id: undefined }, { ...item, transaction_id: "x", cost_micros: 1.5 }, { ...item, transaction_id: "y", cost_micros: Number.MAX_SAFE_INTEGER + 2 }]);
    expect(rows).to.have.length(1);
    expect(rows[0]).to.include({ customer: "acme", requests: 2, cost_micros: null, currency: null });
  });
});
