/**
 * `npm run dashboard [-- --stack <name>] [-- --port <port>] [-- --days <n>] [-- --max-items <n>]`: the usage
 * dashboard (tokens and cost per customer over time, customers with quota use and balance, latest requests, delivery
 * health per sink) on http://127.0.0.1:<port, default 8788>/_dashboard/, loopback only.
 *
 * - `--stack <name>`: a deployed stack's tables (its `ledgerTableName` and `customersTableName` outputs, read with
 *   `pulumi stack output`), AWS credentials from the usual chain (profile, environment, SSO); plans from
 *   `Pulumi.<name>.yaml`. Every refresh is one bounded Scan of the ledger (`--days`, default 7; `--max-items`,
 *   default 10,000), one of its backlog index, one of the customers table, and one GetItem per customer.
 * - Without it: the local stack's tables (`--data-dir`, LOCAL_DATA_DIR, else `.local`), like `npm run usage`. While
 *   `npm start` runs it already serves this page at `http://127.0.0.1:<PORT>/_dashboard`; without it, this command
 *   opens the data dir's ledger itself (and holds it until stopped, so stop it before `npm start`).
 */
import { execFileSync } from "node:child_process";
import path from "node:path";
import { createCustomerStoreFromEnv } from "../functions/shared/customer-store";
import { createLedgerDocumentClient } from "../functions/shared/ledger-store";
import { LocalLedgerError, openLocalLedger } from "./local/ledger-db";
import { LocalStackError, readStackFile } from "./local/stack";
import { DEFAULT_LIMITS, type DashboardLimits, type DashboardSource } from "./local/dashboard/data";
import { createDashboardHandler, startDashboardServer } from "./local/dashboard/server";
import { localDataDir } from "./usage";

/** Something the user can fix, said in one line. */
export class DashboardError extends Error {
  override name = "DashboardError";
}

export const DEFAULT_DASHBOARD_PORT = 8788;

interface Flags {
  stack?: string;
  port: number;
  projectDir: string;
  limits: Partial<DashboardLimits>;
  raw: string[];
}

const USAGE = "usage: npm run dashboard [-- --stack <name>] [-- --port <port>] [-- --days <n>] [-- --max-items <n>] [-- --data-dir <dir>]";

/** The command line. Numbers must be whole and positive (a port may be 0: any free one). */
export function parseDashboardArgs(raw: string[]): Flags {
  const flags: Flags = { port: DEFAULT_DASHBOARD_PORT, projectDir: path.resolve(__dirname, ".."), limits: {}, raw };
  const whole = (name: string, text: string, min: number) => {
    const value = Number(text);
    if (!Number.isInteger(value) || value < min) throw new DashboardError(`${name} must be a whole number of at least ${min}, got "${text}"`);
    return value;
  };
  for (let i = 0; i < raw.length; i += 1) {
    const arg = raw[i];
    const next = raw[i + 1];
    const value = () => {
      if (next === undefined || next.startsWith("--")) throw new DashboardError(`${arg} needs a value; ${USAGE}`);
      i += 1;
      return next;
    };
    if (arg === "--stack") flags.stack = value();
    else if (arg === "--port") flags.port = whole("--port", value(), 0);
    else if (arg === "--days") flags.limits.days = whole("--days", value(), 1);
    else if (arg === "--max-items") flags.limits.maxItems = whole("--max-items", value(), 1);
    else if (arg === "--project-dir") flags.projectDir = value();
    else if (arg === "--data-dir") value();
    else throw new DashboardError(`unknown argument ${arg}; ${USAGE}`);
  }
  if (flags.port > 65535) throw new DashboardError(`--port must be at most 65535, got ${flags.port}`);
  return flags;
}

function plansOf(file: string): DashboardSource["plans"] {
  try {
    return readStackFile(file).plans;
  } catch (err) {
    if (err instanceof LocalStackError) throw new DashboardError(err.message);
    throw err;
  }
}

/** A deployed stack's tables, as `npm run credits -- --stack` and `npm run reconcile -- --stack` find them. */
function awsSource(stack: string, projectDir: string): { source: DashboardSource; close(): void } {
  let outputs: Record<string, unknown>;
  try {
    outputs = JSON.parse(execFileSync("pulumi", ["stack", "output", "--json", "--stack", stack], { cwd: projectDir, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] })) as Record<string, unknown>;
  } catch (err) {
    const stderr = String((err as { stderr?: unknown }).stderr || (err as Error).message).trim().split("\n")[0];
    throw new DashboardError(`cannot read the outputs of stack ${stack} (pulumi stack output --json --stack ${stack}): ${stderr}`);
  }
  const ledgerTable = outputs.ledgerTableName;
  const customersTable = outputs.customersTableName;
  if (typeof ledgerTable !== "string" || !ledgerTable || typeof customersTable !== "string" || !customersTable) {
    throw new DashboardError(`stack ${stack} lacks the ledgerTableName or customersTableName output: run pulumi up with this version first`);
  }
  const plans = plansOf(path.join(projectDir, `Pulumi.${stack}.yaml`));
  // The tables' region from an ARN (arn:aws:dynamodb:<region>:<account>:table/<name>) unless the environment names one.
  const arn = [outputs.ledgerTableArn, outputs.customersTableArn].find((a): a is string => typeof a === "string");
  const region = process.env.AWS_REGION || process.env.AWS_DEFAULT_REGION || arn?.split(":")[3];
  const env = { ...process.env, CUSTOMERS_TABLE: customersTable, ...(region ? { AWS_REGION: region } : {}) };
  const doc = createLedgerDocumentClient(env, { timeoutMs: 30_000 });
  const customers = createCustomerStoreFromEnv(env, { timeoutMs: 10_000 });
  return {
    source: { ledger: { doc, table: ledgerTable }, customers, plans, description: `stack ${stack}: tables ${ledgerTable} and ${customersTable}${region ? ` (${region})` : ""}` },
    close: () => {
      doc.destroy();
      customers.destroy();
    },
  };
}

async function main(raw: string[]): Promise<void> {
  const flags = parseDashboardArgs(raw);
  let source: DashboardSource;
  let close: () => Promise<void> | void;
  if (flags.stack) ({ source, close } = awsSource(flags.stack, flags.projectDir));
  else {
    const dataDir = localDataDir(raw);
    const stackName = process.env.STACK?.trim() || "dev";
    const plans = plansOf(path.join(flags.projectDir, `Pulumi.${stackName}.yaml`));
    let ledger;
    try {
      ledger = await openLocalLedger(dataDir);
    } catch (err) {
      if (err instanceof LocalLedgerError) throw new DashboardError(err.message);
      throw err;
    }
    const customers = createCustomerStoreFromEnv(ledger.customersEnv, { timeoutMs: 10_000 });
    const where = `${ledger.shared ? "the running npm start's" : "a private dynalite on"} ${path.join(dataDir, "ledger")}`;
    source = { ledger: { doc: ledger.doc, table: ledger.table }, customers, plans, description: `local stack "${stackName}": ${where}` };
    close = async () => {
      customers.destroy();
      await ledger.close();
    };
  }
  const limits = { ...DEFAULT_LIMITS, ...flags.limits };
  // Against AWS every summary is a Scan: cache it longer than the page's 5 s refresh, bounding read costs per minute.
  const handler = createDashboardHandler(source, { limits, minRefreshMs: flags.stack ? 15_000 : 2_000 });
  let server;
  try {
    server = await startDashboardServer(handler, flags.port);
  } catch (err) {
    await close();
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "EADDRINUSE") throw new DashboardError(`port ${flags.port} is in use: pass --port <free port>`);
    throw err;
  }
  process.stdout.write(
    [
      `usage dashboard  ${server.url}`,
      `  reading        ${source.description}`,
      `  per refresh    ledger items of the last ${limits.days} day(s), at most ${limits.maxItems}; JSON at ${server.url}api/summary?bucket=hour|day`,
      "  Ctrl-C stops.",
      "",
    ].join("\n"),
  );
  const stop = async () => {
    await server.stop();
    await close();
    process.exit(0);
  };
  process.on("SIGINT", () => void stop());
  process.on("SIGTERM", () => void stop());
}

if (require.main === module) {
  // A local CLI on the Node 20 the project supports: the SDK's notice about its future Node 22 floor is noise here.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
  main(process.argv.slice(2)).catch((err: unknown) => {
    process.stderr.write(`npm run dashboard: ${err instanceof DashboardError ? err.message : `unexpected failure: ${(err as Error)?.message ?? String(err)}`}\n`);
    process.exit(1);
  });
}
