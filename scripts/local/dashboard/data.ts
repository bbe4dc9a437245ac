/**
 * The usage dashboard's data: one JSON summary of the ledger and the customers table (`GET /_dashboard/api/summary`),
 * which the page draws and the tests read.
 *
 * Every figure comes from the functions the command-line reports already use, so the page and `npm run usage` /
 * `npm run reconcile` / `npm run credits` cannot disagree: per-customer totals are `ledgerUsage` (scripts/usage.ts)
 * summed per customer, delivery health is `deliveryMarks` (scripts/reconcile.ts), balances are `creditRows`
 * (scripts/credits.ts). The summary never carries an API key value, a secret, or prompt/completion text: the ledger is
 * read with a projection that leaves out `moesif_event` (the only attribute that may hold bodies, with `logBodies`),
 * and only the API key *id* exists in the tables at all (which the summary does not show either).
 */
import { ScanCommand, type DynamoDBDocumentClient, type ScanCommandOutput } from "@aws-sdk/lib-dynamodb";
import type { CustomerAccount, CustomerStore } from "../../../functions/shared/customer-port";
import { SINKS, UNDELIVERED_INDEX, type LedgerItem, type SinkName } from "../../../functions/shared/ledger-schema";
import { formatMicros } from "../../../functions/shared/pricing";
import type { QuotaPeriod } from "../../../functions/shared/quota-period";
import { usagePeriodOf } from "../../../functions/ai-chat/account";
import type { PlanConfig } from "../../../infra/stack-config";
import { creditRows } from "../../credits";
import { deliveryMarks, type DeliveryMarks } from "../../reconcile";
import { ledgerUsage, usageReport, type UsageReportRow } from "../../usage";

/** Chart buckets: UTC hours or UTC days. */
export type Bucket = "hour" | "day";
export const BUCKETS: readonly Bucket[] = ["hour", "day"];

/** The plan settings the dashboard needs (the stack file's plans). */
export type DashboardPlan = Pick<PlanConfig, "billing" | "currency" | "quota">;

/** How much one refresh may read. */
export interface DashboardLimits {
  /** Only ledger items created in the last `days` days are read. @default 7 */
  days: number;
  /** At most this many ledger items are kept per refresh; past it the summary says it is partial. @default 10000 */
  maxItems: number;
  /** The scan stops after reading this many items (matching or not), bounding the read units one refresh costs. @default 200000 */
  maxScanned: number;
  /** Latest requests listed. @default 25 */
  latest: number;
  /** Hours the hourly chart spans (at most the window): 168 hourly bars over 7 days would be unreadably thin. @default 48 */
  hourlyHours: number;
}

export const DEFAULT_LIMITS: DashboardLimits = { days: 7, maxItems: 10_000, maxScanned: 200_000, latest: 25, hourlyHours: 48 };

/** One customer's row in the page's table. */
export interface DashboardCustomer {
  customer: string;
  /** The key item's plan, else the plan the ledger recorded; null when neither says. */
  plan: string | null;
  /** `prepaid` or `postpaid` (the stack file's plan); null when the stack file does not define the plan. */
  billing: "prepaid" | "postpaid" | null;
  /** Over the window's ledger items (the sums of this customer's `usage` rows). */
  requests: number;
  billed_requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  estimated_requests: number;
  /** Currency → summed `cost_micros` (integer micro-units); empty when no request had a cost. */
  cost_micros: Record<string, number>;
  /** The same as decimals (`"0.001234"`), for reading. */
  cost: Record<string, string>;
  /**
   * The current usage period (the plan's quota period, else the calendar month, UTC) and its request counter from
   * the customers table (`requests@<period_start>`, what the function counts); `limit` is the plan's quota (null:
   * none). `used` is null when the customer has no key item or the counter could not be read.
   */
  quota: { limit: number | null; period: QuotaPeriod; period_start: string; used: number | null };
  /** Prepaid plans only (else null): spendable balance and what requests in flight hold, micro-units of `currency`. */
  balance_micros: number | null;
  reserved_micros: number | null;
  balance: string | null;
  currency: string | null;
}

/** One request in the "latest requests" list: metadata only, never a body, key or secret. */
export interface DashboardRequest {
  /** When the request ended (ISO). */
  time: string;
  customer: string | null;
  method: string;
  route: string;
  model: string | null;
  status: number;
  prompt_tokens: number;
  completion_tokens: number;
  /** `finished_at - started_at`, ms. */
  latency_ms: number;
  /** Token counts estimated locally (the upstream reported none). */
  estimated: boolean;
  streamed: boolean;
  billed: boolean;
  cost_micros: number | null;
  currency: string | null;
}

/** Delivery health of one billing sink. */
export interface SinkHealth extends DeliveryMarks {
  /** Window items this sink acknowledged. */
  delivered: number;
  /** Window items that owe this sink nothing (e.g. Stripe for prepaid or `stripeBilling: moesif`). */
  not_owed: number;
  /** The backlog index held more than `maxItems` items: `pending`/`failed` count only those read. */
  backlog_truncated: boolean;
}

/**
 * `GET /_dashboard/api/summary?bucket=hour|day`. Money is integer micro-units with its currency (plus decimal strings
 * for reading); times are ISO 8601 UTC.
 *
 * ```
 * {
 *   generated_at: string,            // when this summary was computed
 *   source: string,                  // which tables it read (local dynalite, or a deployed stack's tables)
 *   bucket: "hour" | "day",
 *   window: { since, until, days, hourly_hours, max_items, items, scanned, truncated, note },
 *   usage: UsageReportRow[],         // exactly `npm run usage -- --json` over the window's items (per customer and model)
 *   customers: DashboardCustomer[],  // per customer: plan, billing, requests, tokens, cost, quota used, balance
 *   series: {                        // the chart: one entry per bucket start, oldest first; hourly buckets
 *     buckets: string[],             // span the last `hourlyHours` (48) hours, daily ones the whole window
 *     customers: [{ customer, requests: number[], prompt_tokens: number[], completion_tokens: number[],
 *                   cost_micros: { [currency]: number[] } }]
 *   },
 *   latest: DashboardRequest[],      // newest first
 *   delivery: { moesif: SinkHealth, stripe: SinkHealth }
 * }
 * ```
 * `usage` and `customers` cover the window's items only: they equal `npm run usage -- --json` whenever every ledger
 * item is younger than `window.days` and there are at most `window.max_items` of them (`window.truncated` false).
 * Pending, failed and the oldest undelivered item come from the ledger's backlog index, so they cover every age.
 */
export interface DashboardSummary {
  generated_at: string;
  source: string;
  bucket: Bucket;
  window: { since: string; until: string; days: number; hourly_hours: number; max_items: number; items: number; scanned: number; truncated: boolean; note: string };
  usage: UsageReportRow[];
  customers: DashboardCustomer[];
  series: {
    buckets: string[];
    customers: Array<{ customer: string; requests: number[]; prompt_tokens: number[]; completion_tokens: number[]; cost_micros: Record<string, number[]> }>;
  };
  latest: DashboardRequest[];
  delivery: Record<SinkName, SinkHealth>;
}

/** What a summary is built from: ledger items (already windowed), the backlog, the customers table's view. */
export interface SummaryInput {
  bucket: Bucket;
  now: number;
  limits: DashboardLimits;
  source: string;
  items: LedgerItem[];
  /** Items read from the backlog index (pending or failed for some sink, any age). */
  backlog: LedgerItem[];
  scanned: number;
  truncated: boolean;
  backlogTruncated: boolean;
  accounts: CustomerAccount[];
  /** Customer → its current period's request counter (absent when unread). */
  counters: Map<string, number>;
  plans: Record<string, DashboardPlan>;
}

const HOUR = 3_600_000;
const DAY = 24 * HOUR;

/** Start (ms) of the UTC hour or day holding `t`. */
export function bucketStart(t: number, bucket: Bucket): number {
  const size = bucket === "hour" ? HOUR : DAY;
  return Math.floor(t / size) * size;
}

/** Every bucket start from the one holding `since` to the one holding `until`, oldest first. */
export function bucketStarts(since: number, until: number, bucket: Bucket): number[] {
  const size = bucket === "hour" ? HOUR : DAY;
  const out: number[] = [];
  for (let t = bucketStart(since, bucket); t <= until; t += size) out.push(t);
  return out;
}

/** The usage period the function keeps a plan's counters in (its quota period, else the calendar month). */
export function usagePeriodStart(plan: DashboardPlan | undefined, now: number): { period: QuotaPeriod; start: string } {
  const { type, start } = usagePeriodOf(plan, now);
  return { period: type, start };
}

const own = <T>(record: Record<string, T>, key: string | null | undefined): T | undefined =>
  key !== null && key !== undefined && Object.prototype.hasOwnProperty.call(record, key) ? record[key] : undefined;

/** Per customer, the sums of its `ledgerUsage` rows (one row per model / plan / currency). */
function perCustomer(rows: Iterable<UsageReportRow | ReturnType<typeof ledgerUsage>[number]>) {
  const out = new Map<string, { requests: number; billed_requests: number; prompt_tokens: number; completion_tokens: number; total_tokens: number; estimated_requests: number; cost_micros: Record<string, number>; plan: string | null }>();
  for (const row of rows) {
    const into = out.get(row.customer) ?? { requests: 0, billed_requests: 0, prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, estimated_requests: 0, cost_micros: {}, plan: row.plan };
    out.set(row.customer, into);
    into.requests += row.requests;
    into.billed_requests += row.billed_requests;
    into.prompt_tokens += row.prompt_tokens;
    into.completion_tokens += row.completion_tokens;
    into.total_tokens += row.total_tokens;
    into.estimated_requests += row.estimated_requests;
    if (row.cost_micros !== null && row.currency) into.cost_micros[row.currency] = (into.cost_micros[row.currency] ?? 0) + row.cost_micros;
  }
  return out;
}

const countOf = (value: unknown) => (typeof value === "number" && Number.isSafeInteger(value) && value > 0 ? value : 0);

/** The summary, from what was read. Pure: the same input always gives the same JSON. */
export function buildSummary(input: SummaryInput): DashboardSummary {
  const { bucket, now, limits } = input;
  const since = now - limits.days * DAY;
  const usage = usageReport(ledgerUsage(input.items));
  const totals = perCustomer(usage);

  // Customers: every key item's customer (even without usage yet) and every customer the window's ledger names.
  const credits = new Map(creditRows(input.accounts, input.plans).map((row) => [row.customer, row]));
  const names = [...new Set([...credits.keys(), ...totals.keys()])].sort();
  const customers: DashboardCustomer[] = names.map((customer) => {
    const total = totals.get(customer);
    const credit = credits.get(customer);
    const planName = credit?.plan ?? total?.plan ?? null;
    const plan = own(input.plans, planName);
    const period = usagePeriodStart(plan, now);
    const prepaid = plan?.billing === "prepaid";
    return {
      customer,
      plan: planName,
      billing: plan ? plan.billing : null,
      requests: total?.requests ?? 0,
      billed_requests: total?.billed_requests ?? 0,
      prompt_tokens: total?.prompt_tokens ?? 0,
      completion_tokens: total?.completion_tokens ?? 0,
      total_tokens: total?.total_tokens ?? 0,
      estimated_requests: total?.estimated_requests ?? 0,
      cost_micros: total?.cost_micros ?? {},
      cost: Object.fromEntries(Object.entries(total?.cost_micros ?? {}).map(([currency, micros]) => [currency, formatMicros(micros)])),
      quota: { limit: plan?.quota?.limit ?? null, period: period.period, period_start: period.start, used: input.counters.get(customer) ?? null },
      balance_micros: prepaid && credit ? credit.balance_micros : null,
      reserved_micros: prepaid && credit ? credit.reserved_micros : null,
      balance: prepaid && credit ? credit.balance : null,
      currency: credit?.currency ?? plan?.currency ?? null,
    };
  });

  // The chart: each bucket's items through the same aggregation, summed per customer.
  const starts = bucketStarts(bucket === "hour" ? Math.max(since, now - limits.hourlyHours * HOUR) : since, now, bucket);
  const index = new Map(starts.map((t, i) => [t, i]));
  const byBucket: LedgerItem[][] = starts.map(() => []);
  for (const item of input.items) {
    const i = index.get(bucketStart(item.created_at, bucket));
    if (i !== undefined) byBucket[i].push(item);
  }
  const seriesOf = new Map<string, DashboardSummary["series"]["customers"][number]>();
  const zeros = () => starts.map(() => 0);
  byBucket.forEach((items, i) => {
    for (const [customer, sums] of perCustomer(ledgerUsage(items))) {
      const series = seriesOf.get(customer) ?? { customer, requests: zeros(), prompt_tokens: zeros(), completion_tokens: zeros(), cost_micros: {} };
      seriesOf.set(customer, series);
      series.requests[i] += sums.requests;
      series.prompt_tokens[i] += sums.prompt_tokens;
      series.completion_tokens[i] += sums.completion_tokens;
      for (const [currency, micros] of Object.entries(sums.cost_micros)) (series.cost_micros[currency] ??= zeros())[i] += micros;
    }
  });

  const latest = [...input.items]
    .sort((a, b) => b.created_at - a.created_at || (a.transaction_id < b.transaction_id ? -1 : 1))
    .slice(0, limits.latest)
    .map(
      (item): DashboardRequest => ({
        time: new Date(item.created_at).toISOString(),
        customer: item.customer_id ?? null,
        method: item.method,
        route: item.route,
        model: item.model ?? null,
        status: item.status,
        prompt_tokens: countOf(item.prompt_tokens),
        completion_tokens: countOf(item.completion_tokens),
        latency_ms: Math.max(0, item.finished_at - item.started_at),
        estimated: item.usage_estimated === true,
        streamed: item.streamed === true,
        billed: item.billed === true,
        cost_micros: typeof item.cost_micros === "number" ? item.cost_micros : null,
        currency: item.currency ?? null,
      }),
    );

  // Pending / failed / oldest undelivered from the backlog index (every age); delivered from the window.
  const marks = deliveryMarks(input.backlog);
  const delivery = Object.fromEntries(
    SINKS.map((sink) => {
      let delivered = 0;
      let notOwed = 0;
      for (const item of input.items) {
        const state = item[`${sink}_state`];
        if (state === "delivered") delivered += 1;
        else if (state === undefined) notOwed += 1;
      }
      return [sink, { delivered, not_owed: notOwed, ...marks[sink], backlog_truncated: input.backlogTruncated }];
    }),
  ) as Record<SinkName, SinkHealth>;

  const note = input.truncated
    ? `Partial: this refresh stopped at ${limits.maxItems} ledger items (or ${limits.maxScanned} scanned), so the totals cover only the items read; npm run usage reads everything.`
    : `Every ledger item of the last ${limits.days} day(s); npm run usage reads all time.`;
  return {
    generated_at: new Date(now).toISOString(),
    source: input.source,
    bucket,
    window: {
      since: new Date(since).toISOString(),
      until: new Date(now).toISOString(),
      days: limits.days,
      hourly_hours: limits.hourlyHours,
      max_items: limits.maxItems,
      items: input.items.length,
      scanned: input.scanned,
      truncated: input.truncated,
      note,
    },
    usage,
    customers,
    series: { buckets: starts.map((t) => new Date(t).toISOString()), customers: [...seriesOf.values()].sort((a, b) => (a.customer < b.customer ? -1 : 1)) },
    latest,
    delivery,
  };
}

/**
 * The ledger attributes the dashboard reads: everything `ledgerUsage`, `deliveryMarks` and the latest-requests list
 * use, and nothing else. `moesif_event` (which holds request and response bodies when `logBodies` is on) is never
 * read, so no prompt or completion text can reach the page.
 */
export const LEDGER_ATTRIBUTES = [
  "transaction_id",
  "created_at",
  "started_at",
  "finished_at",
  "method",
  "route",
  "status",
  "customer_id",
  "stripe_customer_id",
  "plan",
  "model",
  "prompt_tokens",
  "completion_tokens",
  "total_tokens",
  "cached_tokens",
  "reasoning_tokens",
  "usage_estimated",
  "billed",
  "cost_micros",
  "currency",
  "streamed",
  ...SINKS.flatMap((sink) => [`${sink}_state`, `${sink}_error`]),
] as const;

function projection(): { ProjectionExpression: string; ExpressionAttributeNames: Record<string, string> } {
  // Every name goes through a placeholder: several (`status`, `method`, `plan`…) are DynamoDB reserved words.
  const names = Object.fromEntries(LEDGER_ATTRIBUTES.map((name, i) => [`#a${i}`, name]));
  return { ProjectionExpression: Object.keys(names).join(", "), ExpressionAttributeNames: names };
}

/** Where the dashboard reads from: a ledger table, a customers table (through its store) and the stack file's plans. */
export interface DashboardSource {
  ledger: { doc: DynamoDBDocumentClient; table: string };
  customers: CustomerStore;
  plans: Record<string, DashboardPlan>;
  /** Said on the page, e.g. "local stack (.local/ledger)" or "stack prod: tables … (us-east-1)". */
  description: string;
}

/** Ledger items created since `since`, at most `maxItems` of them, reading at most `maxScanned`. */
export async function scanWindow(ledger: DashboardSource["ledger"], since: number, limits: Pick<DashboardLimits, "maxItems" | "maxScanned">): Promise<{ items: LedgerItem[]; scanned: number; truncated: boolean }> {
  const items: LedgerItem[] = [];
  let scanned = 0;
  let start: Record<string, unknown> | undefined;
  const { ProjectionExpression, ExpressionAttributeNames } = projection();
  do {
    const page: ScanCommandOutput = await ledger.doc.send(
      new ScanCommand({
        TableName: ledger.table,
        ProjectionExpression,
        FilterExpression: "#since >= :since",
        ExpressionAttributeNames: { ...ExpressionAttributeNames, "#since": "created_at" },
        ExpressionAttributeValues: { ":since": since },
        ExclusiveStartKey: start,
        Limit: Math.min(1000, limits.maxScanned - scanned),
      }),
    );
    scanned += page.ScannedCount ?? 0;
    for (const item of page.Items ?? []) items.push(item as LedgerItem);
    start = page.LastEvaluatedKey;
    if (items.length >= limits.maxItems) return { items: items.slice(0, limits.maxItems), scanned, truncated: start !== undefined || items.length > limits.maxItems };
    if (start && scanned >= limits.maxScanned) return { items, scanned, truncated: true };
  } while (start);
  return { items, scanned, truncated: false };
}

/** Every item of the backlog index (the items owing some sink a delivery), at most `maxItems`. */
export async function scanBacklog(ledger: DashboardSource["ledger"], maxItems: number): Promise<{ items: LedgerItem[]; truncated: boolean }> {
  const items: LedgerItem[] = [];
  let start: Record<string, unknown> | undefined;
  do {
    const page: ScanCommandOutput = await ledger.doc.send(new ScanCommand({ TableName: ledger.table, IndexName: UNDELIVERED_INDEX, ...projection(), ExclusiveStartKey: start, Limit: 1000 }));
    for (const item of page.Items ?? []) items.push(item as LedgerItem);
    start = page.LastEvaluatedKey;
    if (items.length >= maxItems) return { items: items.slice(0, maxItems), truncated: start !== undefined || items.length > maxItems };
  } while (start);
  return { items, truncated: false };
}

/** Customers whose period counters are read per refresh (one GetItem each). */
const MAX_COUNTER_READS = 500;

/** Reads the tables and builds the summary (one bounded scan of the ledger, one of its backlog index, the customers). */
export async function readSummary(source: DashboardSource, bucket: Bucket, options: { now?: number; limits?: Partial<DashboardLimits> } = {}): Promise<DashboardSummary> {
  const now = options.now ?? Date.now();
  const limits = { ...DEFAULT_LIMITS, ...options.limits };
  const [window, backlog, accounts] = await Promise.all([scanWindow(source.ledger, now - limits.days * DAY, limits), scanBacklog(source.ledger, limits.maxItems), source.customers.listAccounts()]);
  const counters = new Map<string, number>();
  const seen = new Set<string>();
  for (const { customer } of accounts) {
    if (seen.has(customer.customerId) || seen.size >= MAX_COUNTER_READS) continue;
    seen.add(customer.customerId);
  }
  await Promise.all(
    [...seen].map(async (customerId) => {
      const plan = own(source.plans, accounts.find((a) => a.customer.customerId === customerId)?.customer.plan);
      try {
        counters.set(customerId, (await source.customers.getUsage(customerId, usagePeriodStart(plan, now).start)).requests);
      } catch {
        // Unreadable counter: the page shows "-" for this customer's quota use; the rest of the summary still stands.
      }
    }),
  );
  return buildSummary({
    bucket,
    now,
    limits,
    source: source.description,
    items: window.items,
    backlog: backlog.items,
    scanned: window.scanned,
    truncated: window.truncated,
    backlogTruncated: backlog.truncated,
    accounts,
    counters,
    plans: source.plans,
  });
}
