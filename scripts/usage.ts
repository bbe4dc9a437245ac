/**
 * `npm run usage [-- --json] [-- --project-dir <dir>] [-- --data-dir <dir>]`: requests, tokens and cost per customer
 * and model from the local stack's store.
 *
 * Cost is what each event says the request was billed (`metadata.cost_micros`, integer micro-units, summed in
 * SQLite), not a re-pricing with today's plan prices: prices may have changed since the requests were served.
 */
import fs from "node:fs";
import path from "node:path";
import { formatMicros } from "../functions/shared/pricing";
import { LocalStackError } from "./local/stack";
import { SqliteStore, type UsageRow } from "./local/sqlite-store";

export interface UsageReportRow extends UsageRow {
  /**
   * `cost_micros` in currency units, for reading (e.g. 0.001234); null when no request had a cost. Exact figures
   * are `cost_micros` (integer micro-units of `currency`).
   */
  cost: number | null;
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

function main(): void {
  const args = process.argv.slice(2);
  const flag = (name: string) => (args.indexOf(name) >= 0 ? args[args.indexOf(name) + 1] : undefined);
  // `--stack` is accepted for compatibility; the store is per project directory, not per stack.
  const root = flag("--project-dir") ?? path.resolve(__dirname, "..");
  const dataDir = flag("--data-dir") ?? process.env.LOCAL_DATA_DIR ?? path.join(root, ".local");
  const dbFile = path.join(dataDir, "usage.db");
  if (!fs.existsSync(dbFile)) throw new LocalStackError(`no usage yet: ${dbFile} does not exist (run npm start and send a request)`);
  const store = new SqliteStore(dbFile);
  try {
    const rows = usageReport(store.usage());
    process.stdout.write((args.includes("--json") ? JSON.stringify(rows, null, 2) : rows.length ? usageTable(rows) : "no metered requests yet") + "\n");
  } finally {
    store.close();
  }
}

if (require.main === module) {
  try {
    main();
  } catch (err) {
    process.stderr.write(`npm run usage: ${err instanceof LocalStackError ? err.message : (err as Error).message}\n`);
    process.exit(1);
  }
}
