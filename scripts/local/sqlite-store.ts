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
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  estimated_requests: number;
}

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
        event             TEXT NOT NULL
      );
      CREATE TABLE IF NOT EXISTS quota_usage (
        key_id       TEXT NOT NULL,
        period_start TEXT NOT NULL,
        used         INTEGER NOT NULL,
        PRIMARY KEY (key_id, period_start)
      );`);
    this.takeQuotaStatement = this.db.prepare(
      `INSERT INTO quota_usage (key_id, period_start, used) VALUES (?, ?, 1)
       ON CONFLICT (key_id, period_start) DO UPDATE SET used = used + 1 WHERE used < ?`,
    );
    // Moesif de-duplicates on transaction_id; so does this store.
    this.insert = this.db.prepare(`INSERT OR IGNORE INTO events
      (transaction_id, received_at, request_time, user_id, company_id, plan, model, status, prompt_tokens, completion_tokens, total_tokens, usage_estimated, event)
      VALUES (@transaction_id, @received_at, @request_time, @user_id, @company_id, @plan, @model, @status, @prompt_tokens, @completion_tokens, @total_tokens, @usage_estimated, @event)`);
  }

  add(events: StoredEvent[]): void {
    const now = new Date().toISOString();
    const insertAll = this.db.transaction((batch: StoredEvent[]) => {
      for (const event of batch) {
        const metadata = (event.metadata ?? {}) as Record<string, unknown>;
        const num = (value: unknown) => (typeof value === "number" && Number.isFinite(value) ? value : 0);
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
          usage_estimated: metadata.usage_estimated === true ? 1 : 0,
          event: JSON.stringify(event),
        });
      }
    });
    insertAll(events);
  }

  all(): StoredEvent[] {
    return (this.db.prepare("SELECT event FROM events ORDER BY rowid").all() as Array<{ event: string }>).map((row) => JSON.parse(row.event) as StoredEvent);
  }

  /** Requests and tokens per customer and model (requests without a customer are left out: nobody is billed). */
  usage(): UsageRow[] {
    return this.db
      .prepare(
        `SELECT user_id AS customer, company_id AS company, plan, COALESCE(model, '-') AS model, COUNT(*) AS requests,
                SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens, SUM(total_tokens) AS total_tokens,
                SUM(usage_estimated) AS estimated_requests
           FROM events WHERE user_id IS NOT NULL
          GROUP BY user_id, company_id, plan, model ORDER BY user_id, model`,
      )
      .all() as UsageRow[];
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
