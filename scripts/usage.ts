/**
 * `npm run usage [-- --json] [-- --stack <name>]`: requests and tokens per customer and model from the local
 * stack's store, and what each plan's prices (per 1,000 input / output tokens) would bill.
 */
import fs from "node:fs";
import path from "node:path";
import { readStackFile, LocalStackError } from "./local/stack";
import { SqliteStore, type UsageRow } from "./local/sqlite-store";

export interface UsageReportRow extends UsageRow {
  currency: string | null;
  /** Price of the prompt and completion tokens; null when the plan has no prices. */
  cost: number | null;
}

export function usageReport(rows: UsageRow[], plans: ReturnType<typeof readStackFile>["plans"]): UsageReportRow[] {
  return rows.map((row) => {
    const prices = row.plan ? plans[row.plan]?.prices : undefined;
    const cost = prices ? (row.prompt_tokens / 1000) * prices.inputPer1k + (row.completion_tokens / 1000) * prices.outputPer1k : null;
    return { ...row, currency: prices?.currency ?? null, cost: cost === null ? null : Math.round(cost * 1e6) / 1e6 };
  });
}

function table(rows: UsageReportRow[]): string {
  const header = ["customer", "model", "requests", "prompt", "completion", "total", "estimated", "cost"];
  const body = rows.map((r) => [r.customer, r.model, r.requests, r.prompt_tokens, r.completion_tokens, r.total_tokens, r.estimated_requests, r.cost === null ? "-" : `${r.cost.toFixed(6)} ${r.currency}`].map(String));
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...body.map(line)].join("\n");
}

function main(): void {
  const args = process.argv.slice(2);
  const stack = args.indexOf("--stack") >= 0 ? args[args.indexOf("--stack") + 1] : process.env.STACK ?? "dev";
  const flag = (name: string) => (args.indexOf(name) >= 0 ? args[args.indexOf(name) + 1] : undefined);
  const root = flag("--project-dir") ?? path.resolve(__dirname, "..");
  const dataDir = flag("--data-dir") ?? process.env.LOCAL_DATA_DIR ?? path.join(root, ".local");
  const config = readStackFile(path.join(root, `Pulumi.${stack}.yaml`));
  const dbFile = path.join(dataDir, "usage.db");
  if (!fs.existsSync(dbFile)) throw new LocalStackError(`no usage yet: ${dbFile} does not exist (run npm start and send a request)`);
  const store = new SqliteStore(dbFile);
  try {
    const rows = usageReport(store.usage(), config.plans);
    process.stdout.write((args.includes("--json") ? JSON.stringify(rows, null, 2) : rows.length ? table(rows) : "no metered requests yet") + "\n");
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
