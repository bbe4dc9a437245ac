/**
 * The local stack's embedded store (better-sqlite3, one file under .local/): metering events received by the
 * local collector, and the usage-plan quota counters of the API Gateway emulator (so quotas survive a restart).
 */
import fs from "node:fs";
import path from "node:path";
import Database from "better-sqlite3";
import type { EventStore, StoredEvent } from "./moesif-collector";

export interface UsageRow {
  customer: string;
  company: string | null;
  plan: string | null;
  model: string;
  requests: number;
  /** Requests Moesif's meters count: 2xx answers that carried usage (`metadata.billed`). */
  billed_requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  cached_tokens: number;
  reasoning_tokens: number;
  estimated_requests: number;
  /** Sum of the per-event `metadata.cost_micros` (what each request was billed); null when no event had a cost. */
  cost_micros: number | null;
  /** Currency of `cost_micros`; null when no event had a cost. */
  currency: string | null;
}

/** An event as `acknowledged()` returns it. */
export interface AcknowledgedEvent {
  transaction_id: string;
  user_id: string | null;
  prompt_tokens: number;
  completion_tokens: number;
  cost_micros: number | null;
  currency: string | null;
}

/**
 * Columns added after the first release, with their definitions: a `.local/usage.db` written by an older version
 * gets them on open (`ALTER TABLE … ADD COLUMN`), its old rows reading as no cost and zero cached/reasoning tokens.
 */
const ADDED_EVENT_COLUMNS: ReadonlyArray<[string, string]> = [
  ["cached_tokens", "INTEGER NOT NULL DEFAULT 0"],
  ["reasoning_tokens", "INTEGER NOT NULL DEFAULT 0"],
  ["billed", "INTEGER"],
  ["cost_micros", "INTEGER"],
  ["currency", "TEXT"],
  ["stage", "TEXT"],
];

export class SqliteStore implements EventStore {
  readonly db: Database.Database;
  private readonly insert: Database.Statement;
  private readonly takeQuotaStatement: Database.Statement;

  constructor(file: string) {
    if (file !== ":memory:") fs.mkdirSync(path.dirname(file), { recursive: true });
    this.db = new Database(file);
    this.db.pragma("journal_mode = WAL");
    this.db.pragma("synchronous = NORMAL");
    this.db.exec(`
      CREATE TABLE IF NOT EXISTS events (
        transaction_id    TEXT PRIMARY KEY,
        received_at       TEXT NOT NULL,
        request_time      TEXT,
        user_id           TEXT,
        company_id        TEXT,
        plan              TEXT,
        model             TEXT,
        status            INTEGER,
        prompt_tokens     INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        total_tokens      INTEGER NOT NULL DEFAULT 0,
        usage_estimated   INTEGER NOT NULL DEFAULT 0,
        event             TEXT NOT NULL,
        cached_tokens     INTEGER NOT NULL DEFAULT 0,
        reasoning_tokens  INTEGER NOT NULL DEFAULT 0,
        billed            INTEGER,
        cost_micros       INTEGER,
        currency          TEXT,
        stage             TEXT
      );
      CREATE TABLE IF NOT EXISTS quota_usage (
        key_id       TEXT NOT NULL,
        period_start TEXT NOT NULL,
        used         INTEGER NOT NULL,
        PRIMARY KEY (key_id, period_start)
      );`);
    const existing = new Set((this.db.prepare("PRAGMA table_info(events)").all() as Array<{ name: string }>).map((c) => c.name));
    for (const [column, definition] of ADDED_EVENT_COLUMNS) {
      if (!existing.has(column)) this.db.exec(`ALTER TABLE events ADD COLUMN ${column} ${definition}`);
    }
    this.takeQuotaStatement = this.db.prepare(
      `INSERT INTO quota_usage (key_id, period_start, used) VALUES (?, ?, 1)
       ON CONFLICT (key_id, period_start) DO UPDATE SET used = used + 1 WHERE used < ?`,
    );
    // Moesif de-duplicates on transaction_id; so does this store.
    this.insert = this.db.prepare(`INSERT OR IGNORE INTO events
      (transaction_id, received_at, request_time, user_id, company_id, plan, model, status, prompt_tokens, completion_tokens, total_tokens,
       cached_tokens, reasoning_tokens, usage_estimated, billed, cost_micros, currency, stage, event)
      VALUES (@transaction_id, @received_at, @request_time, @user_id, @company_id, @plan, @model, @status, @prompt_tokens, @completion_tokens,
       @total_tokens, @cached_tokens, @reasoning_tokens, @usage_estimated, @billed, @cost_micros, @currency, @stage, @event)`);
  }

  add(events: StoredEvent[]): void {
    const now = new Date().toISOString();
    const insertAll = this.db.transaction((batch: StoredEvent[]) => {
      for (const event of batch) {
        const metadata = (event.metadata ?? {}) as Record<string, unknown>;
        // What a meter may sum: non-negative safe integers; anything else counts as 0 (cost: as unknown).
        const num = (value: unknown) => (typeof value === "number" && Number.isSafeInteger(value) && value > 0 ? value : 0);
        const costMicros = typeof metadata.cost_micros === "number" && Number.isSafeInteger(metadata.cost_micros) && metadata.cost_micros >= 0 ? metadata.cost_micros : null;
        const text = (value: unknown) => (typeof value === "string" ? value : null);
        this.insert.run({
          transaction_id: event.transaction_id ?? `anonymous-${now}-${Math.random()}`,
          received_at: now,
          request_time: typeof event.request?.time === "string" ? event.request.time : null,
          user_id: event.user_id ?? null,
          company_id: event.company_id ?? null,
          plan: typeof metadata.plan === "string" ? metadata.plan : null,
          model: typeof metadata.model === "string" ? metadata.model : null,
          status: typeof event.response?.status === "number" ? event.response.status : null,
          prompt_tokens: num(metadata.prompt_tokens),
          completion_tokens: num(metadata.completion_tokens),
          total_tokens: num(metadata.total_tokens),
          cached_tokens: num(metadata.cached_tokens),
          reasoning_tokens: num(metadata.reasoning_tokens),
          usage_estimated: metadata.usage_estimated === true ? 1 : 0,
          billed: typeof metadata.billed === "boolean" ? Number(metadata.billed) : null,
          cost_micros: costMicros,
          currency: costMicros === null ? null : text(metadata.currency),
          stage: text(metadata.stage),
          event: JSON.stringify(event),
        });
      }
    });
    insertAll(events);
  }

  all(): StoredEvent[] {
    return (this.db.prepare("SELECT event FROM events ORDER BY rowid").all() as Array<{ event: string }>).map((row) => JSON.parse(row.event) as StoredEvent);
  }

  /**
   * Requests, tokens and cost per customer, model and currency (requests without a customer are left out: nobody
   * is billed). Cost is the sum of what each event says it was billed, not a re-pricing: prices may have changed
   * since. Events without a cost (errors, unpriced models) join their customer and model's priced row when there is
   * exactly one, so a customer's model shows as one line.
   */
  usage(): UsageRow[] {
    const rows = this.db
      .prepare(
        `SELECT user_id AS customer, company_id AS company, plan, COALESCE(model, '-') AS model, currency, COUNT(*) AS requests,
                COALESCE(SUM(billed), 0) AS billed_requests,
                SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens, SUM(total_tokens) AS total_tokens,
                SUM(cached_tokens) AS cached_tokens, SUM(reasoning_tokens) AS reasoning_tokens,
                SUM(usage_estimated) AS estimated_requests, SUM(cost_micros) AS cost_micros
           FROM events WHERE user_id IS NOT NULL
          GROUP BY user_id, company_id, plan, model, currency ORDER BY user_id, model, currency`,
      )
      .all() as UsageRow[];
    return mergeUncosted(rows);
  }

  /**
   * One row per event the collector acknowledged (de-duplicated on `transaction_id`, the table's key), with what
   * `npm run reconcile` compares against the ledger.
   */
  acknowledged(): AcknowledgedEvent[] {
    return this.db
      .prepare("SELECT transaction_id, user_id, prompt_tokens, completion_tokens, cost_micros, currency FROM events ORDER BY rowid")
      .all() as AcknowledgedEvent[];
  }

  /** Adds one request to a key's quota period unless that would pass `limit`. Returns whether it was admitted. */
  takeQuota(keyId: string, periodStart: string, limit: number): boolean {
    // One atomic upsert: the row is created at 1, or incremented only while below the limit.
    return this.takeQuotaStatement.run(keyId, periodStart, limit).changes === 1;
  }

  close(): void {
    this.db.close();
  }
}

/**
 * Folds rows without a currency into the single priced row of the same customer, company, plan and model (so a
 * customer's model shows as one line). Shared with the ledger's report (`scripts/usage.ts`).
 */
export function mergeUncosted(rows: UsageRow[]): UsageRow[] {
  const key = (r: UsageRow) => JSON.stringify([r.customer, r.company, r.plan, r.model]);
  const priced = new Map<string, UsageRow[]>();
  for (const row of rows) if (row.currency !== null) priced.set(key(row), [...(priced.get(key(row)) ?? []), row]);
  const out: UsageRow[] = [];
  for (const row of rows) {
    const targets = row.currency === null ? priced.get(key(row)) : undefined;
    if (targets?.length !== 1) {
      out.push(row);
      continue;
    }
    const target = targets[0];
    for (const field of ["requests", "billed_requests", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens", "estimated_requests"] as const) {
      target[field] += row[field];
    }
  }
  return out;
}
