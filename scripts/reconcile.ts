/**
 * `npm run reconcile [-- --json] [-- --data-dir <dir>] [-- --project-dir <dir>] [-- --stack <name>]`: per customer and
 * meter, the usage ledger's totals against what each billing sink acknowledged, and the ledger's delivery marks.
 *
 * - Locally (no `--stack`): the ledger of the local stack (running or not), the built-in collector's events
 *   (`<dataDir>/usage.db`, de-duplicated on `transaction_id` as Moesif does) and the Stripe meter's event summaries,
 *   read with the official `stripe` SDK from the built-in endpoint (over `<dataDir>/stripe.db`) or from
 *   `STRIPE_API_BASE` with `STRIPE_API_KEY`.
 * - On AWS (`--stack <name>`): the table named by the stack's `ledgerTableName` output, its delivery marks, and
 *   Stripe's meter event summaries when `STRIPE_API_KEY` is set. Moesif's own totals are not read (that takes a
 *   Moesif management key); its delivery marks are.
 *
 * Meters compared: Moesif, per customer: `requests`, `prompt_tokens`, `completion_tokens` and `cost_micros:<currency>`
 * over every ledger item (every request, errors included, gets a Moesif event). Stripe, per Stripe customer:
 * `ai_usage_cost`, the sum of `cost_micros` over the items that bill through Stripe meters (billed, cost > 0, with a
 * `stripe_state`). Any difference (a total that disagrees, an item a sink has not acknowledged, an event the ledger
 * does not know, an item pending or failed) makes the exit status 1; 0 means none; 2 means it could not reconcile.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import Stripe from "stripe";
import { STRIPE_METER_EVENT_NAME, SINKS, type LedgerItem, type SinkName } from "../functions/shared/ledger-schema";
import { createLedgerDocumentClient, LedgerStore } from "../functions/shared/ledger-store";
import { LocalLedgerError, openLocalLedger } from "./local/ledger-db";
import { SqliteStore, type AcknowledgedEvent } from "./local/sqlite-store";
import { LOCAL_STRIPE_API_KEY, StripeServer } from "./local/stripe-server";
import { localDataDir } from "./usage";

/** A reconciliation that cannot be made (no ledger, no stack output, an unreachable sink): exit status 2. */
export class ReconcileError extends Error {
  override name = "ReconcileError";
}

/** Customer (or Stripe customer) → meter → total. */
export type Totals = Record<string, Record<string, number>>;

/** Where a customer without a customer id is counted (the ledger's items and the sink's events alike). */
export const NO_CUSTOMER = "(none)";

export interface TotalRow {
  /** The customer id (Moesif) or the Stripe customer id (Stripe). */
  customer: string;
  meter: string;
  ledger: number;
  sink: number;
  /** `sink - ledger`: negative when the sink is missing usage, positive when it has usage the ledger does not. */
  difference: number;
}

export interface DeliveryMarks {
  /** Items owing this sink a delivery it has not attempted successfully yet. */
  pending: number;
  /** Items the sink refused (retried on a slow schedule; see `<sink>_error`). */
  failed: number;
  /** The oldest undelivered item (pending or failed): its id and creation time (ISO). */
  oldest_undelivered?: { transaction_id: string; created_at: string; state: string; error?: string };
}

export type Difference =
  | { sink: SinkName; kind: "total"; customer: string; meter: string; ledger: number; sink_total: number; difference: number; message: string }
  | { sink: SinkName; kind: "pending" | "failed"; count: number; oldest?: DeliveryMarks["oldest_undelivered"]; message: string }
  | { sink: SinkName; kind: "missing" | "unexpected"; count: number; transaction_ids: string[]; message: string };

export interface SinkReport {
  /** Whether the sink's own totals were read and compared (else only delivery marks). */
  compared: boolean;
  /** Where the totals came from, or why they were not read. */
  source: string;
  rows: TotalRow[];
  delivery: DeliveryMarks;
}

export interface ReconcileReport {
  ok: boolean;
  mode: "local" | "aws";
  ledger: { table: string; where: string; items: number };
  moesif: SinkReport;
  stripe: SinkReport;
  differences: Difference[];
  notes: string[];
}

const add = (totals: Totals, customer: string, meter: string, value: number) => {
  const row = (totals[customer] ??= {});
  row[meter] = (row[meter] ?? 0) + value;
};

const wholeNonNegative = (value: unknown): number => (typeof value === "number" && Number.isSafeInteger(value) && value > 0 ? value : 0);

/** The ledger's Moesif meters per customer: every item counts (every request gets a Moesif event). */
export function ledgerMoesifTotals(items: Iterable<LedgerItem>): Totals {
  const totals: Totals = {};
  for (const item of items) {
    const customer = item.customer_id ?? NO_CUSTOMER;
    add(totals, customer, "requests", 1);
    add(totals, customer, "prompt_tokens", wholeNonNegative(item.prompt_tokens));
    add(totals, customer, "completion_tokens", wholeNonNegative(item.completion_tokens));
    if (typeof item.cost_micros === "number" && item.currency) add(totals, customer, `cost_micros:${item.currency}`, wholeNonNegative(item.cost_micros));
  }
  return totals;
}

/** The same meters from the events the collector acknowledged (one row per transaction id). */
export function collectorTotals(events: Iterable<AcknowledgedEvent>): Totals {
  const totals: Totals = {};
  for (const event of events) {
    const customer = event.user_id ?? NO_CUSTOMER;
    add(totals, customer, "requests", 1);
    add(totals, customer, "prompt_tokens", wholeNonNegative(event.prompt_tokens));
    add(totals, customer, "completion_tokens", wholeNonNegative(event.completion_tokens));
    if (event.cost_micros !== null && event.currency) add(totals, customer, `cost_micros:${event.currency}`, wholeNonNegative(event.cost_micros));
  }
  return totals;
}

/** Whether an item bills through Stripe meters: billed, a positive cost, and a Stripe state (set only with `meters`). */
export function billsThroughStripe(item: LedgerItem): boolean {
  return item.stripe_state !== undefined && item.billed && typeof item.cost_micros === "number" && item.cost_micros > 0;
}

/** The ledger's `ai_usage_cost` per Stripe customer (items without one are counted under `(none)`). */
export function ledgerStripeTotals(items: Iterable<LedgerItem>): Totals {
  const totals: Totals = {};
  for (const item of items) if (billsThroughStripe(item)) add(totals, item.stripe_customer_id ?? NO_CUSTOMER, STRIPE_METER_EVENT_NAME, item.cost_micros!);
  return totals;
}

/** Every (customer, meter) of either side, sorted, with both totals. */
export function compareTotals(ledger: Totals, sink: Totals): TotalRow[] {
  const rows: TotalRow[] = [];
  for (const customer of [...new Set([...Object.keys(ledger), ...Object.keys(sink)])].sort()) {
    const meters = new Set([...Object.keys(ledger[customer] ?? {}), ...Object.keys(sink[customer] ?? {})]);
    for (const meter of [...meters].sort()) {
      const l = ledger[customer]?.[meter] ?? 0;
      const s = sink[customer]?.[meter] ?? 0;
      rows.push({ customer, meter, ledger: l, sink: s, difference: s - l });
    }
  }
  return rows;
}

/** Pending and failed counts per sink, and the oldest undelivered item. */
export function deliveryMarks(items: Iterable<LedgerItem>): Record<SinkName, DeliveryMarks> {
  const marks = Object.fromEntries(SINKS.map((s) => [s, { pending: 0, failed: 0 }])) as Record<SinkName, DeliveryMarks>;
  const oldest: Partial<Record<SinkName, LedgerItem>> = {};
  for (const item of items) {
    for (const sink of SINKS) {
      const state = item[`${sink}_state`];
      if (state !== "pending" && state !== "failed") continue;
      marks[sink][state] += 1;
      const current = oldest[sink];
      if (!current || item.created_at < current.created_at) oldest[sink] = item;
    }
  }
  for (const sink of SINKS) {
    const item = oldest[sink];
    if (!item) continue;
    const error = item[`${sink}_error`];
    marks[sink].oldest_undelivered = {
      transaction_id: item.transaction_id,
      created_at: new Date(item.created_at).toISOString(),
      state: item[`${sink}_state`]!,
      ...(error ? { error } : {}),
    };
  }
  return marks;
}

const SAMPLE_IDS = 10;

/** Every difference a sink report shows: disagreeing totals, then pending and failed items. */
export function differencesOf(sink: SinkName, report: SinkReport): Difference[] {
  const label = sink === "moesif" ? "Moesif" : "Stripe";
  const out: Difference[] = [];
  if (report.compared) {
    for (const row of report.rows.filter((r) => r.difference !== 0)) {
      out.push({
        sink,
        kind: "total",
        customer: row.customer,
        meter: row.meter,
        ledger: row.ledger,
        sink_total: row.sink,
        difference: row.difference,
        message: `${label} ${row.customer} ${row.meter}: ledger ${row.ledger}, ${label} ${row.sink} (${row.difference > 0 ? "+" : ""}${row.difference})`,
      });
    }
  }
  const { pending, failed, oldest_undelivered: oldest } = report.delivery;
  if (pending > 0) {
    out.push({ sink, kind: "pending", count: pending, oldest, message: `${label}: ${pending} item(s) pending, not yet delivered${oldest ? ` (oldest ${oldest.created_at}, ${oldest.transaction_id})` : ""}` });
  }
  if (failed > 0) {
    out.push({ sink, kind: "failed", count: failed, oldest, message: `${label}: ${failed} item(s) refused (failed), retried on a slow schedule${oldest?.error ? `; e.g. ${oldest.error}` : ""}` });
  }
  return out;
}

/** Transaction ids the ledger has that the sink has not acknowledged, and the reverse. */
export function idDifferences(sink: SinkName, ledgerIds: Iterable<string>, sinkIds: Iterable<string>): Difference[] {
  const label = sink === "moesif" ? "Moesif" : "Stripe";
  const inLedger = new Set(ledgerIds);
  const inSink = new Set(sinkIds);
  const missing = [...inLedger].filter((id) => !inSink.has(id));
  const unexpected = [...inSink].filter((id) => !inLedger.has(id));
  const out: Difference[] = [];
  if (missing.length > 0) out.push({ sink, kind: "missing", count: missing.length, transaction_ids: missing.slice(0, SAMPLE_IDS), message: `${label}: ${missing.length} ledger item(s) not acknowledged by ${label}` });
  if (unexpected.length > 0) {
    out.push({ sink, kind: "unexpected", count: unexpected.length, transaction_ids: unexpected.slice(0, SAMPLE_IDS), message: `${label}: ${unexpected.length} event(s) ${label} has that the ledger does not` });
  }
  return out;
}

/** The Stripe meter event summaries of `ai_usage_cost` for these Stripe customers, between two minute-aligned times (s). */
export async function stripeTotals(stripe: Stripe, customers: string[], window: { start: number; end: number }): Promise<{ meterId?: string; totals: Totals }> {
  const totals: Totals = {};
  let meterId: string | undefined;
  for await (const meter of stripe.billing.meters.list({ limit: 100 })) {
    if (meter.event_name === STRIPE_METER_EVENT_NAME && meter.status === "active") {
      meterId = meter.id;
      break;
    }
  }
  if (!meterId) return { totals };
  for (const customer of customers) {
    if (customer === NO_CUSTOMER) continue;
    let sum = 0;
    for await (const summary of stripe.billing.meters.listEventSummaries(meterId, { customer, start_time: window.start, end_time: window.end, limit: 100 })) {
      sum += summary.aggregated_value;
    }
    add(totals, customer, STRIPE_METER_EVENT_NAME, sum);
  }
  return { meterId, totals };
}

/** Stripe wants minute-aligned bounds: from the minute of the oldest item to the minute after the newest (or `endAt`). */
export function summaryWindow(items: LedgerItem[], endAt?: number): { start: number; end: number } | undefined {
  if (items.length === 0) return undefined;
  const starts = items.map((i) => Math.floor(i.started_at / 1000));
  const start = Math.floor(Math.min(...starts) / 60) * 60;
  const end = endAt ?? (Math.floor(Math.max(...starts) / 60) + 1) * 60;
  return end > start ? { start, end } : undefined;
}

/** A Stripe SDK client for `apiBase` (a Stripe-compatible server) or Stripe itself. */
function stripeClient(apiKey: string, apiBase?: string): Stripe {
  const config: Stripe.StripeConfig = { maxNetworkRetries: 2, telemetry: false, appInfo: { name: "metered-ai-api-reconcile" }, timeout: 30_000 };
  if (apiBase) {
    const base = new URL(apiBase);
    config.protocol = base.protocol === "http:" ? "http" : "https";
    config.host = base.hostname;
    config.port = base.port || (config.protocol === "http" ? "80" : "443");
  }
  return new Stripe(apiKey, config);
}

/** Reads Stripe totals for the items that bill through it, via `apiBase` or a private built-in endpoint. */
async function stripeReport(items: LedgerItem[], stripe: { apiKey?: string; apiBase?: string; localDb?: string }, marks: DeliveryMarks, notes: string[], endAt?: number): Promise<SinkReport> {
  const all = items.filter(billsThroughStripe);
  const billed = all.filter((i) => endAt === undefined || Math.floor(i.started_at / 1000) < endAt);
  const ledger = ledgerStripeTotals(billed);
  const window = summaryWindow(billed, endAt);
  const notCompared = (source: string): SinkReport => ({ compared: false, source, rows: compareTotals(ledger, {}), delivery: marks });
  if (!window) {
    const source = all.length === 0 ? "no ledger item bills through Stripe meters" : `all ${all.length} item(s) billed through Stripe meters are too recent for Stripe's summaries; compared on a later run`;
    return { compared: true, source, rows: [], delivery: marks };
  }
  let server: StripeServer | undefined;
  let apiBase = stripe.apiBase;
  let apiKey = stripe.apiKey;
  if (!apiBase && stripe.localDb !== undefined) {
    if (!fs.existsSync(stripe.localDb)) {
      notes.push(`${stripe.localDb} does not exist: the built-in Stripe endpoint never ran on this data dir (if npm start used STRIPE_API_BASE, run reconcile with the same STRIPE_API_BASE and STRIPE_API_KEY)`);
      return { compared: true, source: `built-in Stripe endpoint (${stripe.localDb}: absent)`, rows: compareTotals(ledger, {}), delivery: marks };
    }
    // SQLite (WAL) lets this private server read while npm start's writes; it reads the same events through the API.
    server = await new StripeServer({ apiKey: LOCAL_STRIPE_API_KEY, dbFile: stripe.localDb }).start();
    apiBase = server.url;
    apiKey = LOCAL_STRIPE_API_KEY;
  }
  if (!apiKey) return notCompared("not read: STRIPE_API_KEY is not set (delivery marks only)");
  try {
    const { meterId, totals } = await stripeTotals(stripeClient(apiKey, apiBase), Object.keys(ledger), window);
    const where = server ? `built-in Stripe endpoint over ${stripe.localDb}` : (apiBase ?? "Stripe");
    if (!meterId) notes.push(`no active Stripe meter with event name ${STRIPE_METER_EVENT_NAME} at ${where}`);
    return { compared: true, source: `meter ${meterId ?? "(none)"} event summaries, ${new Date(window.start * 1000).toISOString()} to ${new Date(window.end * 1000).toISOString()}, at ${where}`, rows: compareTotals(ledger, totals), delivery: marks };
  } catch (err) {
    const e = err as { statusCode?: number; message?: string };
    throw new ReconcileError(`cannot read Stripe's meter event summaries${apiBase ? ` at ${apiBase}` : ""}: ${e.statusCode ? `HTTP ${e.statusCode}: ` : ""}${e.message ?? String(err)}`);
  } finally {
    await server?.stop();
  }
}

function finish(report: Omit<ReconcileReport, "ok" | "differences"> & { extra: Difference[] }): ReconcileReport {
  const { extra, ...rest } = report;
  const differences = [...differencesOf("moesif", rest.moesif), ...extra.filter((d) => d.sink === "moesif"), ...differencesOf("stripe", rest.stripe), ...extra.filter((d) => d.sink === "stripe")];
  return { ok: differences.length === 0, ...rest, differences };
}

async function scan(store: LedgerStore): Promise<LedgerItem[]> {
  const items: LedgerItem[] = [];
  for await (const item of store.scanAll()) items.push(item);
  return items;
}

/** Reconciles the local stack's ledger (`dataDir`) with its sinks. */
export async function reconcileLocal(dataDir: string, env: NodeJS.ProcessEnv = process.env): Promise<ReconcileReport> {
  let ledger;
  try {
    ledger = await openLocalLedger(dataDir);
  } catch (err) {
    if (err instanceof LocalLedgerError) throw new ReconcileError(err.message);
    throw err;
  }
  let items: LedgerItem[];
  try {
    items = await scan(ledger.store);
  } finally {
    await ledger.close();
  }
  const notes: string[] = [];
  const marks = deliveryMarks(items);

  let moesif: SinkReport;
  const extra: Difference[] = [];
  const usageDb = path.join(dataDir, "usage.db");
  if (env.MOESIF_APPLICATION_ID) {
    moesif = { compared: false, source: "not read: MOESIF_APPLICATION_ID is set, so events go to Moesif, whose totals need a management key (delivery marks only)", rows: compareTotals(ledgerMoesifTotals(items), {}), delivery: marks.moesif };
  } else {
    let events: AcknowledgedEvent[] = [];
    if (fs.existsSync(usageDb)) {
      const store = new SqliteStore(usageDb);
      try {
        events = store.acknowledged();
      } finally {
        store.close();
      }
    } else notes.push(`${usageDb} does not exist: the built-in collector never ran on this data dir`);
    moesif = { compared: true, source: `built-in collector, ${usageDb} (${events.length} events)`, rows: compareTotals(ledgerMoesifTotals(items), collectorTotals(events)), delivery: marks.moesif };
    extra.push(...idDifferences("moesif", items.map((i) => i.transaction_id), events.map((e) => e.transaction_id)));
  }

  const external = env.STRIPE_API_BASE?.trim();
  const stripe = await stripeReport(items, external ? { apiBase: external, apiKey: env.STRIPE_API_KEY } : { localDb: path.join(dataDir, "stripe.db") }, marks.stripe, notes);
  return finish({ mode: "local", ledger: { table: ledger.table, where: `${ledger.shared ? "running npm start" : "private dynalite"} on ${path.join(dataDir, "ledger")}`, items: items.length }, moesif, stripe, notes, extra });
}

/** How long Stripe may take to show a meter event in its summaries; newer items are left out of the AWS comparison. */
export const STRIPE_SETTLE_MS = 5 * 60_000;

/** Reconciles a deployed stack: its ledger table (from `pulumi stack output`), delivery marks and Stripe's summaries. */
export async function reconcileAws(stack: string, projectDir: string, env: NodeJS.ProcessEnv = process.env, now = Date.now()): Promise<ReconcileReport> {
  let outputs: { ledgerTableName?: string; ledgerTableArn?: string };
  try {
    outputs = JSON.parse(execFileSync("pulumi", ["stack", "output", "--json", "-s", stack], { cwd: projectDir, env, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] })) as typeof outputs;
  } catch (err) {
    const stderr = String((err as { stderr?: unknown }).stderr ?? (err as Error).message).trim().split("\n")[0];
    throw new ReconcileError(`cannot read the outputs of stack ${stack} (pulumi stack output --json -s ${stack}): ${stderr}`);
  }
  const table = outputs.ledgerTableName;
  if (!table) throw new ReconcileError(`stack ${stack} has no ledgerTableName output: run pulumi up with this version first`);
  // The table's region, from its ARN, unless the environment names one (arn:aws:dynamodb:<region>:<account>:table/<name>).
  const region = env.AWS_REGION || env.AWS_DEFAULT_REGION || outputs.ledgerTableArn?.split(":")[3];
  const doc = createLedgerDocumentClient({ ...env, ...(region ? { AWS_REGION: region } : {}) }, { timeoutMs: 30_000 });
  let items: LedgerItem[];
  try {
    items = await scan(new LedgerStore(doc, table));
  } catch (err) {
    throw new ReconcileError(`cannot scan the ledger table ${table}: ${(err as Error).name}: ${(err as Error).message}`);
  } finally {
    doc.destroy();
  }
  const notes: string[] = [];
  const marks = deliveryMarks(items);
  const moesif: SinkReport = {
    compared: false,
    source: "not read: Moesif's totals need a Moesif management key (delivery marks only)",
    rows: compareTotals(ledgerMoesifTotals(items), {}),
    delivery: marks.moesif,
  };
  const endAt = Math.floor((now - STRIPE_SETTLE_MS) / 60_000) * 60;
  let stripe: SinkReport;
  if (!env.STRIPE_API_KEY) {
    stripe = { compared: false, source: "not read: STRIPE_API_KEY is not set (delivery marks only)", rows: compareTotals(ledgerStripeTotals(items), {}), delivery: marks.stripe };
  } else {
    stripe = await stripeReport(items, { apiKey: env.STRIPE_API_KEY, apiBase: env.STRIPE_API_BASE?.trim() || undefined }, marks.stripe, notes, endAt);
    notes.push(`Stripe totals cover requests started before ${new Date(endAt * 1000).toISOString()}: Stripe's summaries can lag a few minutes`);
  }
  return finish({ mode: "aws", ledger: { table, where: `DynamoDB${region ? ` ${region}` : ""}`, items: items.length }, moesif, stripe, notes, extra: [] });
}

function table(header: string[], rows: string[][]): string[] {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => "  " + cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  return [line(header), "  " + widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)];
}

export function formatReport(report: ReconcileReport): string {
  const lines = [`ledger ${report.ledger.table} (${report.ledger.where}): ${report.ledger.items} item(s)`, ""];
  for (const sink of SINKS) {
    const part = report[sink];
    const name = sink === "moesif" ? "Moesif" : "Stripe";
    lines.push(`${name}: ${part.source}`);
    if (part.rows.length > 0) {
      lines.push(
        ...table(
          [sink === "moesif" ? "customer" : "stripe customer", "meter", "ledger", part.compared ? name.toLowerCase() : "(not read)", "difference"],
          part.rows.map((r) => [r.customer, r.meter, String(r.ledger), part.compared ? String(r.sink) : "-", part.compared ? (r.difference === 0 ? "0" : `${r.difference > 0 ? "+" : ""}${r.difference}`) : "-"]),
        ),
      );
    }
    const oldest = part.delivery.oldest_undelivered;
    lines.push(`  delivery marks: ${part.delivery.pending} pending, ${part.delivery.failed} failed${oldest ? `; oldest undelivered ${oldest.created_at} (${oldest.transaction_id}, ${oldest.state})` : ""}`, "");
  }
  for (const note of report.notes) lines.push(`note: ${note}`);
  if (report.notes.length > 0) lines.push("");
  if (report.ok) lines.push("no differences");
  else {
    lines.push(`${report.differences.length} difference(s):`);
    for (const d of report.differences) lines.push(`  - ${d.message}${"transaction_ids" in d ? `: ${d.transaction_ids.join(", ")}${d.count > d.transaction_ids.length ? ", …" : ""}` : ""}`);
  }
  return lines.join("\n");
}

async function main(): Promise<number> {
  const args = process.argv.slice(2);
  const flag = (name: string) => (args.indexOf(name) >= 0 ? args[args.indexOf(name) + 1] : undefined);
  const stack = flag("--stack");
  const report = stack ? await reconcileAws(stack, flag("--project-dir") ?? path.resolve(__dirname, "..")) : await reconcileLocal(localDataDir(args));
  process.stdout.write((args.includes("--json") ? JSON.stringify(report, null, 2) : formatReport(report)) + "\n");
  return report.ok ? 0 : 1;
}

if (require.main === module) {
  // A local CLI on the Node 20 the project supports: the SDK's notice about its future Node 22 floor is noise here.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`npm run reconcile: ${err instanceof ReconcileError ? err.message : `unexpected failure: ${(err as Error)?.message ?? String(err)}`}\n`);
      process.exit(2);
    },
  );
}
