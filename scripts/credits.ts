/**
 * `npm run credits [-- --json]`: every customer's prepaid balance and open reservations.
 * `npm run credits -- add <customer> <amount> [--json]`: adds `amount` (a decimal in the customer's plan currency,
 * e.g. `5` or `0.25`; negative takes credit away, never below zero) to the customer's balance.
 *
 * - Locally (the default): the customers table of the local stack's data dir (`--data-dir`, LOCAL_DATA_DIR, else
 *   `<project>/.local`), through the running `npm start`'s dynalite, or a private one on the same files when none
 *   runs (as `npm run usage` does). Plans (for each customer's currency) come from `Pulumi.<STACK or dev>.yaml`, the
 *   stack file `npm start` reads.
 * - `--stack <name>`: the deployed stack's customers table (its `customersTableName` output, read with `pulumi stack
 *   output`), with AWS credentials from the usual chain (profile, environment, SSO); plans from `Pulumi.<name>.yaml`.
 *
 * Customers are the table's key items (written by `npm start` / `pulumi up` from the stack file). Each `add` is one
 * conditional write keyed by a fresh credit id (`cli:<uuid>`): retried after a timeout it is applied at most once,
 * and a removal that would take the balance below zero changes nothing. Exit status 0, or 1 with one line on stderr.
 */
import { execFileSync } from "node:child_process";
import { randomUUID } from "node:crypto";
import path from "node:path";
import { CustomerStoreError, type CustomerAccount, type CustomerStore } from "../functions/shared/customer-port";
import { createCustomerStoreFromEnv } from "../functions/shared/customer-store";
import { formatMicros } from "../functions/shared/pricing";
import type { PlanConfig } from "../infra/stack-config";
import { LocalLedgerError, openLocalLedger } from "./local/ledger-db";
import { LocalStackError, readStackFile } from "./local/stack";
import { localDataDir } from "./usage";

/** Something the user can fix, said in one line. */
export class CreditsError extends Error {
  override name = "CreditsError";
}

/** One customer as `npm run credits -- --json` prints it (the first five fields are the documented contract). */
export interface CreditsRow {
  customer: string;
  plan: string;
  /** The account's currency, else its plan's; null for a plan without prices (no currency, no balance). */
  currency: string | null;
  balance_micros: number;
  reserved_micros: number;
  /** `prepaid` or `postpaid`; null when the stack file no longer defines the plan. */
  billing: string | null;
  /** `balance_micros` as a decimal (e.g. `4.990000`), for reading. */
  balance: string;
  reserved: string;
  /** Requests in flight holding a reservation. */
  holds: number;
}

/** A plan as the `credits` command reads it: the stack file's. */
type Plan = Pick<PlanConfig, "currency" | "billing">;

const MAX_AMOUNT_MICROS = Number.MAX_SAFE_INTEGER;

/**
 * An amount as the command takes it: an optional sign, digits, an optional fraction of at most six places (one
 * micro-unit), e.g. `5`, `0.25`, `-1.5`. Exact (no floating point): parsed digit by digit into integer micro-units.
 * Zero, exponents, thousands separators and more than six places are refused.
 */
export function parseAmountMicros(text: string): number {
  const match = /^([+-]?)(\d+)(?:\.(\d+))?$/.exec(text.trim());
  if (!match) throw new CreditsError(`amount must be a decimal number such as 5, 0.25 or -1 (got ${JSON.stringify(text)})`);
  const [, sign, whole, fraction = ""] = match;
  const places = fraction.replace(/0+$/, "");
  if (places.length > 6) throw new CreditsError(`amount ${text} has more than 6 decimal places: balances are kept in millionths of the currency`);
  const micros = Number(whole) * 1_000_000 + Number(places.padEnd(6, "0"));
  if (!Number.isSafeInteger(micros) || micros > MAX_AMOUNT_MICROS) throw new CreditsError(`amount ${text} is too large`);
  if (micros === 0) throw new CreditsError("amount must not be zero");
  return sign === "-" ? -micros : micros;
}

/** One row per customer (the first key item of each), sorted by customer id. */
export function creditRows(accounts: CustomerAccount[], plans: Record<string, Plan>): CreditsRow[] {
  const seen = new Map<string, CustomerAccount>();
  for (const account of accounts) if (!seen.has(account.customer.customerId)) seen.set(account.customer.customerId, account);
  return [...seen.values()]
    .sort((a, b) => (a.customer.customerId < b.customer.customerId ? -1 : a.customer.customerId > b.customer.customerId ? 1 : 0))
    .map(({ customer, balance }) => {
      const plan = Object.prototype.hasOwnProperty.call(plans, customer.plan) ? plans[customer.plan] : undefined;
      return {
        customer: customer.customerId,
        plan: customer.plan,
        currency: balance.currency ?? plan?.currency ?? null,
        balance_micros: balance.balanceMicros,
        reserved_micros: balance.reservedMicros,
        billing: plan ? plan.billing : null,
        balance: formatMicros(balance.balanceMicros),
        reserved: formatMicros(balance.reservedMicros),
        holds: Object.keys(balance.holds).length,
      };
    });
}

/** The rows as a table for a terminal. */
export function creditsTable(rows: CreditsRow[]): string {
  const header = ["customer", "plan", "billing", "currency", "balance", "reserved"];
  const body = rows.map((r) => [r.customer, r.plan, r.billing ?? "(unknown plan)", r.currency ?? "-", r.balance, r.holds > 0 ? `${r.reserved} (${r.holds} in flight)` : r.reserved]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i < 4 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ").trimEnd();
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...body.map(line)].join("\n");
}

export interface AddCreditsResult {
  customer: string;
  plan: string;
  currency: string;
  credit_id: string;
  amount_micros: number;
  balance_micros: number;
}

export interface AddCreditsOptions {
  /** @default `cli:<random uuid>` */
  creditId?: string;
  now?: () => number;
  /** Tries of the one write when the store does not answer (same credit id each time). @default 3 */
  attempts?: number;
  /** Where customers were looked for, for the unknown-customer message. */
  where?: string;
}

/**
 * Adds `amountText` (see `parseAmountMicros`) to `customerId`'s balance in its plan's currency. One credit id for the
 * whole call: when the store does not answer (a timeout may still have written), the same write is tried again, and
 * a `duplicate` answer then means the earlier try was applied: the credit counts once either way.
 */
export async function addCredits(store: CustomerStore, plans: Record<string, Plan>, customerId: string, amountText: string, options: AddCreditsOptions = {}): Promise<AddCreditsResult> {
  const micros = parseAmountMicros(amountText);
  const accounts = await store.listAccounts();
  const account = accounts.find((a) => a.customer.customerId === customerId);
  if (!account) {
    const known = [...new Set(accounts.map((a) => a.customer.customerId))].sort();
    throw new CreditsError(
      `unknown customer "${customerId}": no API key item names it${options.where ? ` in ${options.where}` : ""} (${known.length > 0 ? `customers: ${known.join(", ")}` : "no customers at all yet"})`,
    );
  }
  const planName = account.customer.plan;
  const plan = Object.prototype.hasOwnProperty.call(plans, planName) ? plans[planName] : undefined;
  if (!plan) throw new CreditsError(`customer "${customerId}" is on plan "${planName}", which the stack file does not define: cannot tell its currency`);
  const currency = plan.currency;
  if (!currency) {
    throw new CreditsError(`customer "${customerId}"'s plan "${planName}" has no currency (it sets no prices): a balance is kept in its plan's currency, so give the plan prices (and billing: prepaid) first`);
  }
  const creditId = options.creditId ?? `cli:${randomUUID()}`;
  const now = options.now ?? Date.now;
  const attempts = options.attempts ?? 3;
  for (let attempt = 1; ; attempt += 1) {
    let result: Awaited<ReturnType<CustomerStore["credit"]>>;
    try {
      result = await store.credit({ customerId, currency, creditId, micros, source: "cli", now: now() });
    } catch (err) {
      if (err instanceof CustomerStoreError && attempt < attempts) continue;
      throw err;
    }
    const done = (balanceMicros: number): AddCreditsResult => ({ customer: customerId, plan: planName, currency, credit_id: creditId, amount_micros: micros, balance_micros: balanceMicros });
    if (result.applied) return done(result.balanceMicros);
    // Our id is fresh: only our own earlier try (one that timed out after writing) can have applied it.
    if (result.reason === "duplicate") return done(result.balanceMicros);
    if (result.reason === "insufficient_balance") {
      const reserved = account.balance.reservedMicros > 0 ? ` (${formatMicros(account.balance.reservedMicros)} more is reserved by requests in flight)` : "";
      throw new CreditsError(`cannot take ${formatMicros(-micros)} ${currency} from "${customerId}": the balance is ${formatMicros(result.balanceMicros)} ${currency}${reserved}, and it never goes below zero`);
    }
    throw new CreditsError(`"${customerId}"'s account is kept in ${account.balance.currency ?? "another currency"}, but plan "${planName}" charges ${currency}: nothing changed`);
  }
}

/** Where the command's customers table is, and how to let go of it. */
interface Target {
  store: CustomerStore;
  plans: Record<string, Plan>;
  where: string;
  close(): Promise<void>;
}

/** The outputs of a deployed stack (`pulumi stack output --json`). */
function stackOutputs(stack: string, projectDir: string): Record<string, unknown> {
  try {
    return JSON.parse(execFileSync("pulumi", ["stack", "output", "--json", "--stack", stack], { cwd: projectDir, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] })) as Record<string, unknown>;
  } catch (err) {
    const stderr = String((err as { stderr?: unknown }).stderr || (err as Error).message).trim().split("\n")[0];
    throw new CreditsError(`cannot read the outputs of stack ${stack} (pulumi stack output --json --stack ${stack}): ${stderr}`);
  }
}

function plansOf(stackFile: string): Record<string, Plan> {
  try {
    return readStackFile(stackFile).plans;
  } catch (err) {
    if (err instanceof LocalStackError) throw new CreditsError(err.message);
    throw err;
  }
}

async function openTarget(args: Flags): Promise<Target> {
  const projectDir = args.projectDir ?? path.resolve(__dirname, "..");
  const timeoutMs = 10_000;
  if (args.stack) {
    const outputs = stackOutputs(args.stack, projectDir);
    const table = outputs.customersTableName;
    if (typeof table !== "string" || !table) throw new CreditsError(`stack ${args.stack} has no customersTableName output: run pulumi up with this version first`);
    const plans = plansOf(path.join(projectDir, `Pulumi.${args.stack}.yaml`));
    // The table's region from its ARN (arn:aws:dynamodb:<region>:<account>:table/<name>) unless the environment names one.
    const arn = typeof outputs.customersTableArn === "string" ? outputs.customersTableArn : undefined;
    const region = process.env.AWS_REGION || process.env.AWS_DEFAULT_REGION || arn?.split(":")[3];
    const store = createCustomerStoreFromEnv({ ...process.env, CUSTOMERS_TABLE: table, ...(region ? { AWS_REGION: region } : {}) }, { timeoutMs });
    return { store, plans, where: `table ${table}${region ? ` (${region})` : ""}`, close: async () => store.destroy() };
  }
  const stackName = process.env.STACK?.trim() || "dev";
  const plans = plansOf(path.join(projectDir, `Pulumi.${stackName}.yaml`));
  const dataDir = args.dataDir ?? localDataDir(args.raw);
  let ledger;
  try {
    ledger = await openLocalLedger(dataDir, { missingHint: "run npm start once: it writes the stack file's customers to the local customers table" });
  } catch (err) {
    if (err instanceof LocalLedgerError) throw new CreditsError(err.message);
    throw err;
  }
  const store = createCustomerStoreFromEnv(ledger.customersEnv, { timeoutMs });
  return {
    store,
    plans,
    where: `the local customers table (${ledger.shared ? "running npm start" : "private dynalite"} on ${path.join(dataDir, "ledger")})`,
    close: async () => {
      store.destroy();
      await ledger.close();
    },
  };
}

interface Flags {
  json: boolean;
  stack?: string;
  dataDir?: string;
  projectDir?: string;
  positional: string[];
  raw: string[];
}

const USAGE = "usage: npm run credits [-- --json] | npm run credits -- add <customer> <amount> [--json]   (with --stack <name> for a deployed stack)";

/** The command line: `--json`, `--stack`, `--data-dir`, `--project-dir`, and positional words (`-1` is an amount). */
export function parseArgs(raw: string[]): Flags {
  const flags: Flags = { json: false, positional: [], raw };
  for (let i = 0; i < raw.length; i += 1) {
    const arg = raw[i];
    const value = () => {
      const next = raw[i + 1];
      if (next === undefined || next.startsWith("--")) throw new CreditsError(`${arg} needs a value`);
      i += 1;
      return next;
    };
    if (arg === "--json") flags.json = true;
    else if (arg === "--stack") flags.stack = value();
    else if (arg === "--data-dir") flags.dataDir = value();
    else if (arg === "--project-dir") flags.projectDir = value();
    else if (arg.startsWith("--")) throw new CreditsError(`unknown option ${arg}; ${USAGE}`);
    else flags.positional.push(arg);
  }
  return flags;
}

async function main(raw: string[]): Promise<void> {
  const args = parseArgs(raw);
  const [command, ...rest] = args.positional;
  if (command !== undefined && command !== "add" && command !== "list") throw new CreditsError(`unknown command "${command}"; ${USAGE}`);
  if (command === "add" && rest.length !== 2) throw new CreditsError(USAGE);
  if (command !== "add" && rest.length > 0) throw new CreditsError(USAGE);
  // A bad amount is refused before any table is opened.
  if (command === "add") parseAmountMicros(rest[1]);

  const target = await openTarget(args);
  try {
    if (command === "add") {
      const result = await addCredits(target.store, target.plans, rest[0], rest[1], { where: target.where });
      const sign = result.amount_micros > 0 ? "+" : "-";
      if (target.plans[result.plan]?.billing === "postpaid") {
        process.stderr.write(`note: plan "${result.plan}" is postpaid: its requests are billed afterwards, and this balance is spent only once the plan is billing: prepaid\n`);
      }
      process.stdout.write(
        args.json
          ? JSON.stringify(result, null, 2) + "\n"
          : `${result.customer}: ${sign}${formatMicros(Math.abs(result.amount_micros))} ${result.currency}, balance now ${formatMicros(result.balance_micros)} ${result.currency} (credit ${result.credit_id})\n`,
      );
      return;
    }
    const rows = creditRows(await target.store.listAccounts(), target.plans);
    if (args.json) process.stdout.write(JSON.stringify(rows, null, 2) + "\n");
    else process.stdout.write((rows.length > 0 ? creditsTable(rows) : `no customers in ${target.where} yet (npm start / pulumi up writes the stack file's customers)`) + "\n");
  } finally {
    await target.close();
  }
}

if (require.main === module) {
  // A local CLI on the Node 20 the project supports: the SDK's notice about its future Node 22 floor is noise here.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
  main(process.argv.slice(2)).then(
    () => process.exit(0),
    (err: unknown) => {
      const message = err instanceof CreditsError ? err.message : err instanceof CustomerStoreError ? `the customers table did not answer: ${err.message}` : `unexpected failure: ${(err as Error)?.message ?? String(err)}`;
      process.stderr.write(`npm run credits: ${message}\n`);
      process.exit(1);
    },
  );
}
