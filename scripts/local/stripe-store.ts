/**
 * The local Stripe stand-in's store (better-sqlite3, `<dataDir>/stripe.db`): meter events with their `identifier`
 * and when they arrived (a repeat inside the de-duplication window is never counted twice, across restarts too; one
 * past it is counted again, as Stripe, which "will enforce uniqueness within a rolling period of at least 24
 * hours", may), the meters, and the asynchronous error reports Stripe would send as
 * `v1.billing.meter.error_report_triggered` events. Values are whole numbers stored as SQLite integers (64-bit).
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
  /** The payload's `value`, a whole number (a safe integer: Stripe takes at most 15 digits). */
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

/** Stripe's de-duplication window for meter event identifiers (a rolling 24 hours). */
export const STRIPE_DEDUP_WINDOW_MS = 24 * 3600_000;

export interface AddEventOptions {
  /** When the event arrived (ms, the server's clock). @default Date.now() */
  receivedAt?: number;
  /** A repeat of an identifier that arrived less than this long ago is a duplicate. @default 24 h */
  dedupWindowMs?: number;
}

export class StripeStore {
  readonly db: Database.Database;
  private readonly insertEvent: Database.Statement;
  private readonly recentIdentifier: Database.Statement;

  constructor(file = ":memory:") {
    if (file !== ":memory:") fs.mkdirSync(path.dirname(file), { recursive: true });
    this.db = new Database(file);
    // WAL: a committed event survives the process being killed (kill -9) mid-run.
    this.db.pragma("journal_mode = WAL");
    this.db.pragma("synchronous = NORMAL");
    this.migrate();
    this.db.exec(`
      CREATE TABLE IF NOT EXISTS meter_events (
        identifier         TEXT NOT NULL,
        event_name         TEXT NOT NULL,
        stripe_customer_id TEXT NOT NULL,
        value              INTEGER NOT NULL,
        timestamp          INTEGER NOT NULL,
        api                TEXT NOT NULL,
        received_at        INTEGER NOT NULL
      );
      CREATE INDEX IF NOT EXISTS meter_events_by_identifier ON meter_events (identifier, received_at);
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
      "INSERT INTO meter_events (identifier, event_name, stripe_customer_id, value, timestamp, api, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
    );
    this.recentIdentifier = this.db.prepare("SELECT 1 FROM meter_events WHERE identifier = ? AND received_at > ? LIMIT 1");
  }

  /**
   * Databases written before events could repeat (identifier as PRIMARY KEY) get the current table, their events
   * kept in order: once, in one transaction.
   */
  private migrate(): void {
    const columns = this.db.prepare("PRAGMA table_info(meter_events)").all() as Array<{ name: string; pk: number }>;
    if (!columns.some((c) => c.name === "identifier" && c.pk > 0)) return;
    this.db.transaction(() => {
      this.db.exec(`
        DROP INDEX IF EXISTS meter_events_by_customer;
        ALTER TABLE meter_events RENAME TO meter_events_before_repeats;
        CREATE TABLE meter_events (
          identifier TEXT NOT NULL, event_name TEXT NOT NULL, stripe_customer_id TEXT NOT NULL, value INTEGER NOT NULL,
          timestamp INTEGER NOT NULL, api TEXT NOT NULL, received_at INTEGER NOT NULL
        );
        INSERT INTO meter_events (identifier, event_name, stripe_customer_id, value, timestamp, api, received_at)
          SELECT identifier, event_name, stripe_customer_id, value, timestamp, api, received_at FROM meter_events_before_repeats ORDER BY rowid;
        DROP TABLE meter_events_before_repeats;`);
    })();
  }

  /**
   * Stores an event unless its identifier arrived within the de-duplication window: `"duplicate"` then, and nothing
   * changes. The value must be a safe integer (stored exactly, as a 64-bit integer).
   */
  add(event: StoredMeterEvent, options: AddEventOptions = {}): "created" | "duplicate" {
    if (!Number.isSafeInteger(event.value)) throw new RangeError(`a meter event value must be a safe integer, got ${event.value}`);
    const receivedAt = options.receivedAt ?? Date.now();
    const windowMs = options.dedupWindowMs ?? STRIPE_DEDUP_WINDOW_MS;
    return this.db.transaction((): "created" | "duplicate" => {
      if (this.recentIdentifier.get(event.identifier, receivedAt - windowMs) !== undefined) return "duplicate";
      this.insertEvent.run(event.identifier, event.event_name, event.stripe_customer_id, BigInt(event.value), event.timestamp, event.api, receivedAt);
      return "created";
    })();
  }

  /** Takes back the latest event with this identifier (one Stripe rejected while processing it). */
  removeLatest(identifier: string): void {
    this.db.prepare("DELETE FROM meter_events WHERE rowid = (SELECT MAX(rowid) FROM meter_events WHERE identifier = ?)").run(identifier);
  }

  has(identifier: string): boolean {
    return this.db.prepare("SELECT 1 FROM meter_events WHERE identifier = ?").get(identifier) !== undefined;
  }

  events(): StoredMeterEvent[] {
    return this.db.prepare("SELECT identifier, event_name, stripe_customer_id, value, timestamp, api FROM meter_events ORDER BY rowid").all() as StoredMeterEvent[];
  }

  /** Sum of `value` per Stripe customer for one event name (exact in SQLite; a JS number, as Stripe's summaries are). */
  totals(eventName: string): Record<string, number> {
    const rows = this.db
      .prepare("SELECT stripe_customer_id AS customer, SUM(value) AS total FROM meter_events WHERE event_name = ? GROUP BY stripe_customer_id")
      .safeIntegers(true)
      .all(eventName) as Array<{ customer: string; total: bigint }>;
    return Object.fromEntries(rows.map((r) => [r.customer, Number(r.total)]));
  }

  /** Sum of `value` for a customer's events of `eventName` with `start <= timestamp < end` (seconds). */
  sum(eventName: string, customer: string, start: number, end: number): number {
    const row = this.db
      .prepare("SELECT COALESCE(SUM(value), 0) AS total FROM meter_events WHERE event_name = ? AND stripe_customer_id = ? AND timestamp >= ? AND timestamp < ?")
      .safeIntegers(true)
      .get(eventName, customer, start, end) as { total: bigint };
    return Number(row.total);
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
