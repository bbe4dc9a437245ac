/**
 * The local Stripe stand-in's store (better-sqlite3, `<dataDir>/stripe.db`): meter events keyed by `identifier`
 * (so a repeat is never counted twice, across restarts too), the meters, and the asynchronous error reports Stripe
 * would send as `v1.billing.meter.error_report_triggered` events.
 */
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import Database from "better-sqlite3";

/** One accepted meter event, as the store keeps it. */
export interface StoredMeterEvent {
  identifier: string;
  event_name: string;
  stripe_customer_id: string;
  /** The payload's `value`, a whole number. */
  value: number;
  /** Seconds since the epoch. */
  timestamp: number;
  /** Which API brought it: `v1` (`/v1/billing/meter_events`) or `v2` (the meter event stream). */
  api: "v1" | "v2";
}

/** An event Stripe would accept and then reject while processing it (not counted in any meter). */
export interface MeterErrorReport {
  identifier: string;
  event_name: string;
  /** Stripe's error code, e.g. `meter_event_customer_not_found`, `timestamp_too_far_in_past`. */
  code: string;
  message: string;
  received_at: number;
}

export interface StoredMeter {
  id: string;
  event_name: string;
  display_name: string;
  created: number;
}

export class StripeStore {
  readonly db: Database.Database;
  private readonly insertEvent: Database.Statement;

  constructor(file = ":memory:") {
    if (file !== ":memory:") fs.mkdirSync(path.dirname(file), { recursive: true });
    this.db = new Database(file);
    // WAL: a committed event survives the process being killed (kill -9) mid-run.
    this.db.pragma("journal_mode = WAL");
    this.db.pragma("synchronous = NORMAL");
    this.db.exec(`
      CREATE TABLE IF NOT EXISTS meter_events (
        identifier         TEXT PRIMARY KEY,
        event_name         TEXT NOT NULL,
        stripe_customer_id TEXT NOT NULL,
        value              INTEGER NOT NULL,
        timestamp          INTEGER NOT NULL,
        api                TEXT NOT NULL,
        received_at        INTEGER NOT NULL
      );
      CREATE INDEX IF NOT EXISTS meter_events_by_customer ON meter_events (event_name, stripe_customer_id, timestamp);
      CREATE TABLE IF NOT EXISTS meters (
        id           TEXT PRIMARY KEY,
        event_name   TEXT NOT NULL UNIQUE,
        display_name TEXT NOT NULL,
        created      INTEGER NOT NULL
      );
      CREATE TABLE IF NOT EXISTS error_reports (
        identifier  TEXT NOT NULL,
        event_name  TEXT NOT NULL,
        code        TEXT NOT NULL,
        message     TEXT NOT NULL,
        received_at INTEGER NOT NULL
      );`);
    this.insertEvent = this.db.prepare(
      "INSERT OR IGNORE INTO meter_events (identifier, event_name, stripe_customer_id, value, timestamp, api, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
    );
  }

  /** Stores an event unless its identifier is known: `"duplicate"` then, and nothing changes. */
  add(event: StoredMeterEvent): "created" | "duplicate" {
    const result = this.insertEvent.run(event.identifier, event.event_name, event.stripe_customer_id, event.value, event.timestamp, event.api, Date.now());
    return result.changes === 1 ? "created" : "duplicate";
  }

  has(identifier: string): boolean {
    return this.db.prepare("SELECT 1 FROM meter_events WHERE identifier = ?").get(identifier) !== undefined;
  }

  events(): StoredMeterEvent[] {
    return this.db.prepare("SELECT identifier, event_name, stripe_customer_id, value, timestamp, api FROM meter_events ORDER BY rowid").all() as StoredMeterEvent[];
  }

  /** Sum of `value` per Stripe customer for one event name. */
  totals(eventName: string): Record<string, number> {
    const rows = this.db
      .prepare("SELECT stripe_customer_id AS customer, SUM(value) AS total FROM meter_events WHERE event_name = ? GROUP BY stripe_customer_id")
      .all(eventName) as Array<{ customer: string; total: number }>;
    return Object.fromEntries(rows.map((r) => [r.customer, r.total]));
  }

  /** Sum of `value` for a customer's events of `eventName` with `start <= timestamp < end` (seconds). */
  sum(eventName: string, customer: string, start: number, end: number): number {
    const row = this.db
      .prepare("SELECT COALESCE(SUM(value), 0) AS total FROM meter_events WHERE event_name = ? AND stripe_customer_id = ? AND timestamp >= ? AND timestamp < ?")
      .get(eventName, customer, start, end) as { total: number };
    return row.total;
  }

  /** The meter for `eventName`, created (with a stable `mtr_local_…` id) on first use. */
  ensureMeter(eventName: string, displayName: string): StoredMeter {
    const existing = this.db.prepare("SELECT id, event_name, display_name, created FROM meters WHERE event_name = ?").get(eventName) as StoredMeter | undefined;
    if (existing) return existing;
    const meter: StoredMeter = { id: `mtr_local_${randomBytes(8).toString("hex")}`, event_name: eventName, display_name: displayName, created: Math.floor(Date.now() / 1000) };
    this.db.prepare("INSERT INTO meters (id, event_name, display_name, created) VALUES (?, ?, ?, ?)").run(meter.id, meter.event_name, meter.display_name, meter.created);
    return meter;
  }

  meters(): StoredMeter[] {
    return this.db.prepare("SELECT id, event_name, display_name, created FROM meters ORDER BY created, id").all() as StoredMeter[];
  }

  addErrorReport(report: Omit<MeterErrorReport, "received_at">): void {
    this.db.prepare("INSERT INTO error_reports (identifier, event_name, code, message, received_at) VALUES (?, ?, ?, ?, ?)").run(report.identifier, report.event_name, report.code, report.message, Date.now());
  }

  errorReports(): MeterErrorReport[] {
    return this.db.prepare("SELECT identifier, event_name, code, message, received_at FROM error_reports ORDER BY rowid").all() as MeterErrorReport[];
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
