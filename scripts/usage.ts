/**
 * `npm run usage [-- --json] [-- --project-dir <dir>] [-- --data-dir <dir>]`: requests, tokens and cost per customer
 * and model from the local stack's usage ledger (dynalite under `<dataDir>/ledger`), whether `npm start` is
 * running (its ledger is read through its endpoint) or not (a private dynalite is started on the same files).
 *
 * Cost is what each ledger item says the request was billed (`cost_micros`, integer micro-units), summed, not a
 * re-pricing with today's plan prices: prices may have changed since the requests were served. The ledger is the
 * record every sink is fed from, so this report does not depend on any sink having caught up.
 */
import fs from "node:fs";
import path from "node:path";
import type { LedgerItem } from "../functions/shared/ledger-schema";
import { formatMicros } from "../functions/shared/pricing";
import { LocalLedgerError, openLocalLedger } from "./local/ledger-db";
import { mergeUncosted, SqliteStore, type UsageRow } from "./local/sqlite-store";

export interface UsageReportRow extends UsageRow {
  /**
   * `cost_micros` in currency units, for reading (e.g. 0.001234); null when no request had a cost. Exact figures
   * are `cost_micros` (integer micro-units of `currency`).
   */
  cost: number | null;
}

/** Orders as SQLite's `ORDER BY` does (BINARY collation, NULL first): the collector's report and this one agree. */
function compareNullable(a: string | null, b: string | null): number {
  if (a === b) return 0;
  if (a === null) return -1;
  if (b === null) return 1;
  return a < b ? -1 : 1;
}

/**
 * Requests, tokens and cost per customer, Stripe customer, plan, model and currency from ledger items: the same
 * rows, in the same order, as the collector's `SqliteStore.usage()` makes from the same requests' Moesif events.
 * Items without a customer are left out (nobody is billed); an item's cost counts only when it is a safe
 * non-negative integer.
 */
export function ledgerUsage(items: Iterable<LedgerItem>): UsageRow[] {
  const rows = new Map<string, UsageRow>();
  const count = (value: unknown) => (typeof value === "number" && Number.isSafeInteger(value) && value > 0 ? value : 0);
  for (const item of items) {
    if (!item.customer_id) continue;
    const cost = typeof item.cost_micros === "number" && Number.isSafeInteger(item.cost_micros) && item.cost_micros >= 0 ? item.cost_micros : null;
    const currency = cost === null ? null : (item.currency ?? null);
    const row: UsageRow = {
      customer: item.customer_id,
      company: item.stripe_customer_id ?? null,
      plan: item.plan ?? null,
      model: item.model ?? "-",
      requests: 0,
      billed_requests: 0,
      prompt_tokens: 0,
      completion_tokens: 0,
      total_tokens: 0,
      cached_tokens: 0,
      reasoning_tokens: 0,
      estimated_requests: 0,
      cost_micros: null,
      currency,
    };
    const key = JSON.stringify([row.customer, row.company, row.plan, row.model, row.currency]);
    const into = rows.get(key) ?? (rows.set(key, row), row);
    into.requests += 1;
    into.billed_requests += item.billed ? 1 : 0;
    into.prompt_tokens += count(item.prompt_tokens);
    into.completion_tokens += count(item.completion_tokens);
    into.total_tokens += count(item.total_tokens);
    into.cached_tokens += count(item.cached_tokens);
    into.reasoning_tokens += count(item.reasoning_tokens);
    into.estimated_requests += item.usage_estimated ? 1 : 0;
    if (cost !== null) into.cost_micros = (into.cost_micros ?? 0) + cost;
  }
  const sorted = [...rows.values()].sort(
    (a, b) =>
      compareNullable(a.customer, b.customer) ||
      compareNullable(a.model, b.model) ||
      compareNullable(a.currency, b.currency) ||
      compareNullable(a.company, b.company) ||
      compareNullable(a.plan, b.plan),
  );
  return mergeUncosted(sorted);
}

export function usageReport(rows: UsageRow[]): UsageReportRow[] {
  return rows.map((row) => ({ ...row, cost: row.cost_micros === null ? null : Number(formatMicros(row.cost_micros)) }));
}

export function usageTable(rows: UsageReportRow[]): string {
  const header = ["customer", "model", "requests", "billed", "prompt", "completion", "total", "estimated", "cost"];
  const body = rows.map((r) =>
    [
      r.customer,
      r.model,
      r.requests,
      r.billed_requests,
      r.prompt_tokens,
      r.completion_tokens,
      r.total_tokens,
      r.estimated_requests,
      r.cost_micros === null ? "-" : `${formatMicros(r.cost_micros)} ${r.currency ?? ""}`.trim(),
    ].map(String),
  );
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...body.map(line)].join("\n");
}

/** The data dir the scripts read: `--data-dir`, else LOCAL_DATA_DIR, else `<--project-dir or the repository>/.local`. */
export function localDataDir(args: string[]): string {
  const flag = (name: string) => (args.indexOf(name) >= 0 ? args[args.indexOf(name) + 1] : undefined);
  const root = flag("--project-dir") ?? path.resolve(__dirname, "..");
  return flag("--data-dir") ?? process.env.LOCAL_DATA_DIR ?? path.join(root, ".local");
}

/** The ledger's rows; a data dir from before the ledger (only a collector's usage.db) is read from that, said on stderr. */
async function readUsage(dataDir: string): Promise<UsageRow[]> {
  let ledger;
  try {
    ledger = await openLocalLedger(dataDir);
  } catch (err) {
    const dbFile = path.join(dataDir, "usage.db");
    if (!(err instanceof LocalLedgerError) || !/^no ledger yet/.test(err.message) || !fs.existsSync(dbFile)) throw err;
    process.stderr.write(`npm run usage: ${dataDir} has no ledger (written before it existed); reporting the collector's events in ${dbFile}\n`);
    const store = new SqliteStore(dbFile);
    try {
      return store.usage();
    } finally {
      store.close();
    }
  }
  try {
    const items: LedgerItem[] = [];
    for await (const item of ledger.store.scanAll()) items.push(item);
    return ledgerUsage(items);
  } finally {
    await ledger.close();
  }
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  // `--stack` is accepted for compatibility; the ledger is per data dir, not per stack.
  const rows = usageReport(await readUsage(localDataDir(args)));
  process.stdout.write((args.includes("--json") ? JSON.stringify(rows, null, 2) : rows.length ? usageTable(rows) : "no metered requests yet") + "\n");
}

if (require.main === module) {
  // A local CLI on the Node 20 the project supports: the SDK's notice about its future Node 22 floor is noise here.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
  main().catch((err: unknown) => {
    process.stderr.write(`npm run usage: ${err instanceof LocalLedgerError ? err.message : (err as Error).message}\n`);
    process.exit(1);
  });
}
