/**
 * The customers table on DynamoDB (dynalite locally): `CustomerStore`'s one implementation, with every access
 * pattern a named method and its expressions in this one place.
 *
 * Every write is a single-item conditional UpdateItem (no transactions: `dynalite` has none, and one item per
 * customer needs none). What they keep true (see `customer-schema.ts`): the balance never goes below zero,
 * `reserved_micros` is the sum of `holds`, a transaction is charged at most once and a credit applied at most once.
 *
 * Accounts are created with their whole skeleton (`balance_micros: 0`, `reserved_micros: 0`, `holds: {}`,
 * `credits: {}`) before any write to a nested path, because DynamoDB refuses to SET `holds.<tx>` under a map that
 * does not exist ("The document path provided in the update expression is invalid for update"; dynalite answers
 * the same, see tests/credits/customer-store.test.ts). The fast path never pays for that: a reservation or credit
 * is tried as one write, and only when it fails for want of the skeleton is the skeleton written (idempotently,
 * `if_not_exists` on every attribute) and the write tried again.
 *
 * Every method is bounded by the store's timeout as a whole (its read-backs and retries included): an abort signal
 * on each SDK call, a race against the deadline in case a call ignores it, and `throwOnRequestTimeout` on the client
 * (`createLedgerDocumentClient`). Every failure rejects with `CustomerStoreError`, whose message names the operation
 * and DynamoDB's error, never a secret.
 */
import { boundedCall } from "./bounded-call";
import { GetCommand, QueryCommand, ScanCommand, UpdateCommand, type DynamoDBDocumentClient, type QueryCommandOutput, type ScanCommandOutput } from "@aws-sdk/lib-dynamodb";
import {
  ACCOUNT_ITEM_PREFIX,
  accountItemKey,
  CUSTOMERS_KEY,
  KEY_ITEM_PREFIX,
  keyItemKey,
  STRIPE_CUSTOMER_INDEX,
  STRIPE_CUSTOMER_KEY,
  usageCounterName,
  type CreditEntry,
  type CustomerStatus,
  type HoldEntry,
  type UsageCounterName,
} from "./customer-schema";
import {
  CustomerItemInvalidError,
  CustomerStoreError,
  type AccountBalance,
  type CreditArgs,
  type CreditResult,
  type CustomerAccount,
  type CustomerRecord,
  type CustomerStore,
  type ReserveArgs,
  type ReserveResult,
  type SettleArgs,
  type SettleResult,
  type StaleHold,
  type UsageIncrement,
  type UsageTotals,
} from "./customer-port";
import { createLedgerDocumentClient } from "./ledger-store";

export interface DynamoCustomerStoreOptions {
  /** The document client for reads and idempotent writes (SDK retries allowed). */
  doc: DynamoDBDocumentClient;
  /**
   * A client that makes one attempt per call, for `addUsage`: its ADD is not idempotent, so an SDK retry after an
   * answer lost in transit would count the request twice. @default `doc`
   */
  singleAttemptDoc?: DynamoDBDocumentClient;
  /** The customers table. */
  table: string;
  /** Bound on one method call (one page, for the scans), read-backs and retries included. @default 1000 */
  timeoutMs?: number;
  /** Items a Scan page reads at most (`Limit`); DynamoDB also ends a page at 1 MB. @default no limit */
  scanPageSize?: number;
}

/** How many times a write is tried again when its condition failed but the item, read back, says it would pass. */
const MAX_RACES = 8;

/** Attribute names, always through placeholders (`status` is a DynamoDB reserved word; counters contain `@`). */
const N = {
  "#pk": CUSTOMERS_KEY,
  "#cid": "customer_id",
  "#cur": "currency",
  "#bal": "balance_micros",
  "#res": "reserved_micros",
  "#holds": "holds",
  "#credits": "credits",
  "#upd": "updated_at",
} as const;

const COUNTERS: ReadonlyArray<{ name: UsageCounterName; field: keyof Omit<UsageIncrement, "periodStart"> }> = [
  { name: "requests", field: "requests" },
  { name: "prompt_tokens", field: "promptTokens" },
  { name: "completion_tokens", field: "completionTokens" },
  { name: "cost_micros", field: "costMicros" },
];

/** An account as the store reads it back to explain a failed condition. */
interface AccountState {
  /** The skeleton is there (`balance_micros` exists; every writer that creates it creates the maps with it). */
  exists: boolean;
  currency?: string;
  balance: number;
  reserved: number;
  holds: Record<string, HoldEntry>;
  credits: Record<string, CreditEntry>;
}

function isConditionFailure(err: unknown): boolean {
  return (err as { name?: string } | null)?.name === "ConditionalCheckFailedException";
}

/** DynamoDB's answer to a SET under a map that does not exist: the account has no skeleton yet. */
function isMissingPath(err: unknown): boolean {
  const e = err as { name?: string; message?: string } | null;
  return e?.name === "ValidationException" && /document path/i.test(e.message ?? "");
}

/** Whether the SDK sent this call more than once: an earlier attempt may have been applied and its answer lost. */
function wasRetried(err: unknown): boolean {
  return ((err as { $metadata?: { attempts?: number } } | null)?.$metadata?.attempts ?? 1) > 1;
}

function describe(err: unknown): string {
  const e = err as { name?: string; message?: string } | null;
  const name = e?.name ?? "Error";
  const message = String(e?.message ?? err).slice(0, 300);
  // DynamoDB's wording for an item at its 400 KB limit: here, an account with too many requests in flight.
  if (/item size.*exceeded/i.test(message)) return `${name}: the account item reached DynamoDB's 400 KB item limit (too many requests in flight for this customer): ${message}`;
  return `${name}: ${message}`;
}

function storeError(operation: string, err: unknown): CustomerStoreError {
  if (err instanceof CustomerStoreError) return err;
  return new CustomerStoreError(`customer store ${operation} failed: ${describe(err)}`, { cause: err });
}

function requireMicros(operation: string, name: string, value: unknown, allowNegative = false): number {
  if (typeof value !== "number" || !Number.isSafeInteger(value) || (!allowNegative && value < 0)) {
    throw new CustomerStoreError(`customer store ${operation}: ${name} must be a${allowNegative ? "" : " non-negative"} safe integer number of micro-units, got ${String(value)}`);
  }
  return value;
}

function requireText(operation: string, name: string, value: unknown): string {
  if (typeof value !== "string" || value.length === 0) throw new CustomerStoreError(`customer store ${operation}: ${name} must be a non-empty string`);
  return value;
}

/** A stored number the store computes with: a safe integer (the client reads bigger ones as text), else an error. */
function storedInteger(value: unknown, what: string, fallback?: number): number {
  if (value === undefined && fallback !== undefined) return fallback;
  if (typeof value === "number" && Number.isSafeInteger(value)) return value;
  throw new CustomerStoreError(`customer store: ${what} is not a safe integer (got ${typeof value === "string" ? JSON.stringify(value.slice(0, 30)) : typeof value})`);
}

function holdsOf(raw: unknown, customerId: string): Record<string, HoldEntry> {
  const holds: Record<string, HoldEntry> = {};
  if (typeof raw !== "object" || raw === null) return holds;
  for (const [tx, entry] of Object.entries(raw as Record<string, { m?: unknown; t?: unknown }>)) {
    holds[tx] = { m: storedInteger(entry?.m, `hold ${tx} of account ${customerId}`), t: storedInteger(entry?.t, `time of hold ${tx} of account ${customerId}`, 0) };
  }
  return holds;
}

function creditsOf(raw: unknown): Record<string, CreditEntry> {
  const credits: Record<string, CreditEntry> = {};
  if (typeof raw !== "object" || raw === null) return credits;
  for (const [id, entry] of Object.entries(raw as Record<string, { m?: unknown; t?: unknown; s?: unknown }>)) {
    credits[id] = { m: Number(entry?.m), t: Number(entry?.t), s: String(entry?.s ?? "") };
  }
  return credits;
}

function accountState(item: Record<string, unknown> | undefined, customerId: string): AccountState {
  if (!item || item.balance_micros === undefined) {
    return { exists: false, currency: typeof item?.currency === "string" ? item.currency : undefined, balance: 0, reserved: 0, holds: holdsOf(item?.holds, customerId), credits: creditsOf(item?.credits) };
  }
  return {
    exists: true,
    currency: typeof item.currency === "string" ? item.currency : undefined,
    balance: storedInteger(item.balance_micros, `balance_micros of account ${customerId}`),
    reserved: storedInteger(item.reserved_micros, `reserved_micros of account ${customerId}`, 0),
    holds: holdsOf(item.holds, customerId),
    credits: creditsOf(item.credits),
  };
}

function balanceOf(item: Record<string, unknown> | undefined, customerId: string): AccountBalance {
  const state = accountState(item, customerId);
  const holds: AccountBalance["holds"] = {};
  for (const [tx, hold] of Object.entries(state.holds)) holds[tx] = { micros: hold.m, at: hold.t };
  return { customerId, ...(state.currency ? { currency: state.currency } : {}), balanceMicros: state.balance, reservedMicros: state.reserved, holds };
}

/**
 * A key item as the function uses it; an item without the fields it needs is `CustomerItemInvalidError` (that key
 * is refused), neither an unknown key nor an outage.
 */
function customerOf(item: Record<string, unknown>): CustomerRecord {
  const pk = typeof item[CUSTOMERS_KEY] === "string" ? (item[CUSTOMERS_KEY] as string) : "";
  const apiKeyId = typeof item.api_key_id === "string" && item.api_key_id ? item.api_key_id : pk.slice(KEY_ITEM_PREFIX.length);
  const status = item.status ?? "active";
  if (typeof item.customer_id !== "string" || !item.customer_id || typeof item.plan !== "string" || !item.plan || (status !== "active" && status !== "suspended") || !apiKeyId) {
    throw new CustomerItemInvalidError(`customer store: key item ${JSON.stringify(pk)} lacks customer_id, plan or a known status`);
  }
  const stripeCustomerId = typeof item[STRIPE_CUSTOMER_KEY] === "string" && item[STRIPE_CUSTOMER_KEY] ? (item[STRIPE_CUSTOMER_KEY] as string) : undefined;
  return { apiKeyId, customerId: item.customer_id, plan: item.plan, ...(stripeCustomerId ? { stripeCustomerId } : {}), status: status as CustomerStatus };
}

/** `SET` actions that give an account its skeleton where it lacks it (and change nothing where it has it). */
const SKELETON = "#cid = if_not_exists(#cid, :cid), #bal = if_not_exists(#bal, :zero), #res = if_not_exists(#res, :zero), #holds = if_not_exists(#holds, :empty), #credits = if_not_exists(#credits, :empty), #upd = :now";

/** `ADD` actions (and their names and values) for one request's counters in its period. */
function counterUpdate(usage: UsageIncrement | undefined, operation: string): { actions: string[]; names: Record<string, string>; values: Record<string, number> } {
  const out = { actions: [] as string[], names: {} as Record<string, string>, values: {} as Record<string, number> };
  if (!usage) return out;
  requireText(operation, "usage.periodStart", usage.periodStart);
  COUNTERS.forEach(({ name, field }, i) => {
    out.names[`#c${i}`] = usageCounterName(name, usage.periodStart);
    out.values[`:c${i}`] = requireMicros(operation, `usage.${field}`, usage[field]);
    out.actions.push(`#c${i} :c${i}`);
  });
  return out;
}

export class DynamoCustomerStore implements CustomerStore {
  private readonly doc: DynamoDBDocumentClient;
  private readonly singleAttemptDoc: DynamoDBDocumentClient;
  private readonly table: string;
  private readonly timeoutMs: number;
  private readonly scanPageSize?: number;

  constructor(options: DynamoCustomerStoreOptions) {
    this.doc = options.doc;
    this.singleAttemptDoc = options.singleAttemptDoc ?? options.doc;
    this.table = options.table;
    this.timeoutMs = Math.max(1, options.timeoutMs ?? 1000);
    this.scanPageSize = options.scanPageSize;
  }

  /** Closes the clients' connections (the CLI and tests; a Lambda keeps them for the next invocation). */
  destroy(): void {
    this.doc.destroy();
    if (this.singleAttemptDoc !== this.doc) this.singleAttemptDoc.destroy();
  }

  async getCustomer(apiKeyId: string): Promise<CustomerRecord | undefined> {
    requireText("getCustomer", "apiKeyId", apiKeyId);
    return this.bounded("getCustomer", async (signal) => {
      const output = await this.doc.send(new GetCommand({ TableName: this.table, Key: { [CUSTOMERS_KEY]: keyItemKey(apiKeyId) } }), { abortSignal: signal });
      return output.Item ? customerOf(output.Item) : undefined;
    });
  }

  /** The key items naming this Stripe customer, by the `stripe_customer` index; of several (more than one key), the first by key. */
  async findByStripeCustomer(stripeCustomerId: string): Promise<CustomerRecord | undefined> {
    requireText("findByStripeCustomer", "stripeCustomerId", stripeCustomerId);
    return this.bounded("findByStripeCustomer", async (signal) => {
      const items: Record<string, unknown>[] = [];
      let startKey: Record<string, unknown> | undefined;
      do {
        const output: QueryCommandOutput = await this.doc.send(
          new QueryCommand({
            TableName: this.table,
            IndexName: STRIPE_CUSTOMER_INDEX,
            KeyConditionExpression: "#s = :s",
            ExpressionAttributeNames: { "#s": STRIPE_CUSTOMER_KEY },
            ExpressionAttributeValues: { ":s": stripeCustomerId },
            ExclusiveStartKey: startKey,
          }),
          { abortSignal: signal },
        );
        items.push(...(output.Items ?? []));
        startKey = output.LastEvaluatedKey;
      } while (startKey);
      const keys = items.filter((item) => String(item[CUSTOMERS_KEY]).startsWith(KEY_ITEM_PREFIX));
      keys.sort((a, b) => String(a[CUSTOMERS_KEY]).localeCompare(String(b[CUSTOMERS_KEY])));
      return keys.length > 0 ? customerOf(keys[0]) : undefined;
    });
  }

  async getBalance(customerId: string): Promise<AccountBalance> {
    requireText("getBalance", "customerId", customerId);
    return this.bounded("getBalance", async (signal) => {
      const output = await this.doc.send(
        new GetCommand({
          TableName: this.table,
          Key: { [CUSTOMERS_KEY]: accountItemKey(customerId) },
          ConsistentRead: true,
          ProjectionExpression: "#cur, #bal, #res, #holds",
          ExpressionAttributeNames: { "#cur": N["#cur"], "#bal": N["#bal"], "#res": N["#res"], "#holds": N["#holds"] },
        }),
        { abortSignal: signal },
      );
      return balanceOf(output.Item, customerId);
    });
  }

  async getUsage(customerId: string, periodStart: string): Promise<UsageTotals> {
    requireText("getUsage", "customerId", customerId);
    requireText("getUsage", "periodStart", periodStart);
    return this.bounded("getUsage", async (signal) => {
      const names = Object.fromEntries(COUNTERS.map(({ name }, i) => [`#c${i}`, usageCounterName(name, periodStart)]));
      // The balance in the same read: an answer never shows a charge without its counters (or the reverse).
      const balanceNames = { "#cur": N["#cur"], "#bal": N["#bal"], "#res": N["#res"], "#holds": N["#holds"] };
      const output = await this.doc.send(
        new GetCommand({
          TableName: this.table,
          Key: { [CUSTOMERS_KEY]: accountItemKey(customerId) },
          ConsistentRead: true,
          ProjectionExpression: [...Object.keys(names), ...Object.keys(balanceNames)].join(", "),
          ExpressionAttributeNames: { ...names, ...balanceNames },
        }),
        { abortSignal: signal },
      );
      const item = output.Item ?? {};
      const value = (name: UsageCounterName) => storedInteger(item[usageCounterName(name, periodStart)], `${name} of account ${customerId}`, 0);
      return {
        periodStart,
        requests: value("requests"),
        promptTokens: value("prompt_tokens"),
        completionTokens: value("completion_tokens"),
        costMicros: value("cost_micros"),
        balance: balanceOf(output.Item, customerId),
      };
    });
  }

  /**
   * One write: `SET balance -= m, reserved += m, holds.<tx> = {m, t}` if `balance >= m`, the transaction holds
   * nothing yet and the currency is the account's. When it fails, the account is read back to say why. A hold of
   * the same amount already there for this transaction (an SDK retry whose first attempt went through) is this
   * reservation: `ok`. A hold of another amount is a caller's bug: rejected.
   */
  async reserve(args: ReserveArgs): Promise<ReserveResult> {
    const op = "reserve";
    const customerId = requireText(op, "customerId", args.customerId);
    const transactionId = requireText(op, "transactionId", args.transactionId);
    const currency = requireText(op, "currency", args.currency).toLowerCase();
    const micros = requireMicros(op, "micros", args.micros);
    return this.bounded(op, async (signal) => {
      for (let attempt = 0; attempt < MAX_RACES; attempt++) {
        try {
          const output = await this.doc.send(
            new UpdateCommand({
              TableName: this.table,
              Key: { [CUSTOMERS_KEY]: accountItemKey(customerId) },
              UpdateExpression: "SET #bal = #bal - :m, #res = if_not_exists(#res, :zero) + :m, #holds.#tx = :hold, #cur = if_not_exists(#cur, :cur), #upd = :now",
              ConditionExpression: "#bal >= :m AND attribute_exists(#holds) AND attribute_not_exists(#holds.#tx) AND (attribute_not_exists(#cur) OR #cur = :cur)",
              ExpressionAttributeNames: { "#bal": N["#bal"], "#res": N["#res"], "#holds": N["#holds"], "#cur": N["#cur"], "#upd": N["#upd"], "#tx": transactionId },
              ExpressionAttributeValues: { ":m": micros, ":zero": 0, ":hold": { m: micros, t: args.now, ...(args.periodStart ? { p: args.periodStart } : {}) }, ":cur": currency, ":now": args.now },
              ReturnValues: "UPDATED_NEW",
            }),
            { abortSignal: signal },
          );
          return { ok: true, balanceMicros: storedInteger(output.Attributes?.balance_micros, `balance_micros of account ${customerId}`) };
        } catch (err) {
          if (!isConditionFailure(err) && !isMissingPath(err)) throw err;
        }
        const account = await this.readAccount(customerId, signal, { hold: transactionId });
        const held = account.holds[transactionId];
        if (held) {
          if (held.m === micros) return { ok: true, balanceMicros: account.balance };
          throw new CustomerStoreError(`customer store ${op}: transaction ${transactionId} already holds ${held.m} micro-units, not ${micros}`);
        }
        if (account.currency !== undefined && account.currency !== currency) return { ok: false, reason: "currency_mismatch", balanceMicros: account.balance };
        if (account.balance < micros) return { ok: false, reason: "insufficient_balance", balanceMicros: account.balance };
        // The balance covers it now: the account had no skeleton yet (a zero reservation on a new account), or a
        // credit or release landed between the write and the read. Make sure of the skeleton, then try again.
        await this.ensureAccount(customerId, args.now, signal);
      }
      throw new CustomerStoreError(`customer store ${op}: the account of ${customerId} kept changing; gave up after ${MAX_RACES} tries`);
    });
  }

  /**
   * Removes the transaction's hold, charging `costMicros` and releasing the rest, conditional on the hold being
   * there with the amount read (so `reserved_micros` stays the sum of the holds even if the caller's
   * `reservedMicros` is wrong: the stored amount wins). Cost above the hold: first tried as one write taking the
   * difference from the balance if it covers it; if not, a second write takes exactly the balance there is (leaving
   * zero) and reports the rest as shortfall. The hold is gone after whichever write succeeds, so a settlement
   * retried or raced by the stale-hold sweep changes nothing more (`settled: false`).
   */
  async settle(args: SettleArgs): Promise<SettleResult> {
    const op = "settle";
    const customerId = requireText(op, "customerId", args.customerId);
    const transactionId = requireText(op, "transactionId", args.transactionId);
    let hold = requireMicros(op, "reservedMicros", args.reservedMicros);
    const cost = requireMicros(op, "costMicros", args.costMicros);
    const counters = counterUpdate(args.usage, op);
    return this.bounded(op, async (signal) => {
      let retried = false;
      /** The balance seen when it could not cover the cost above the hold: the partial charge takes exactly it. */
      let partial: number | undefined;
      for (let attempt = 0; attempt < MAX_RACES; attempt++) {
        const fromHold = Math.min(cost, hold);
        const extra = cost - fromHold;
        const taken = partial === undefined ? extra : Math.min(partial, extra);
        const charged = fromHold + taken;
        const conditions = ["#holds.#tx.#m = :hold"];
        const values: Record<string, unknown> = { ":hold": hold, ":delta": hold - charged, ":now": args.now, ...counters.values };
        if (extra > 0 && partial === undefined) {
          conditions.push("#bal >= :extra");
          values[":extra"] = extra;
        } else if (extra > 0) {
          conditions.push("#bal = :seen");
          values[":seen"] = partial;
        }
        try {
          const output = await this.doc.send(
            new UpdateCommand({
              TableName: this.table,
              Key: { [CUSTOMERS_KEY]: accountItemKey(customerId) },
              UpdateExpression: `SET #bal = #bal + :delta, #res = #res - :hold, #upd = :now REMOVE #holds.#tx${counters.actions.length > 0 ? ` ADD ${counters.actions.join(", ")}` : ""}`,
              ConditionExpression: conditions.join(" AND "),
              ExpressionAttributeNames: { "#bal": N["#bal"], "#res": N["#res"], "#holds": N["#holds"], "#upd": N["#upd"], "#tx": transactionId, "#m": "m", ...counters.names },
              ExpressionAttributeValues: values,
              ReturnValues: "UPDATED_NEW",
            }),
            { abortSignal: signal },
          );
          const balanceMicros = storedInteger(output.Attributes?.balance_micros, `balance_micros of account ${customerId}`);
          return { settled: true, chargedMicros: charged, shortfallMicros: cost - charged, balanceMicros };
        } catch (err) {
          if (!isConditionFailure(err)) throw err;
          retried = wasRetried(err);
        }
        const account = await this.readAccount(customerId, signal, { hold: transactionId });
        const current = account.holds[transactionId];
        if (!current) {
          // An attempt the SDK sent again may have gone through the first time (its answer lost): then this call
          // settled it, as computed. Otherwise someone else did (an earlier settle, the stale-hold sweep).
          if (retried) return { settled: true, chargedMicros: charged, shortfallMicros: cost - charged, balanceMicros: account.balance };
          return { settled: false, chargedMicros: 0, shortfallMicros: 0, balanceMicros: account.balance };
        }
        hold = current.m;
        const extraNow = cost - Math.min(cost, hold);
        partial = extraNow > 0 && account.balance < extraNow ? account.balance : undefined;
      }
      throw new CustomerStoreError(`customer store ${op}: the account of ${customerId} kept changing; gave up after ${MAX_RACES} tries`);
    });
  }

  /** One ADD of the counters, creating the account's skeleton if it has none; sent once, never retried. */
  async addUsage(customerId: string, usage: UsageIncrement, now: number): Promise<void> {
    const op = "addUsage";
    requireText(op, "customerId", customerId);
    const counters = counterUpdate(usage, op);
    await this.bounded(op, async (signal) => {
      await this.singleAttemptDoc.send(
        new UpdateCommand({
          TableName: this.table,
          Key: { [CUSTOMERS_KEY]: accountItemKey(customerId) },
          UpdateExpression: `SET ${SKELETON} ADD ${counters.actions.join(", ")}`,
          ExpressionAttributeNames: { "#cid": N["#cid"], "#bal": N["#bal"], "#res": N["#res"], "#holds": N["#holds"], "#credits": N["#credits"], "#upd": N["#upd"], ...counters.names },
          ExpressionAttributeValues: { ":cid": customerId, ":zero": 0, ":empty": {}, ":now": now, ...counters.values },
        }),
        { abortSignal: signal },
      );
    });
  }

  /**
   * One write: `SET balance += m, credits.<id> = {m, t, s}` if the credit id was never applied, the currency is the
   * account's (or it has none yet: this fixes it) and, for a debit, the balance covers it. A replay finds the id and
   * answers `duplicate`, except when the SDK itself re-sent this very call after its first attempt went through.
   */
  async credit(args: CreditArgs): Promise<CreditResult> {
    const op = "credit";
    const customerId = requireText(op, "customerId", args.customerId);
    const creditId = requireText(op, "creditId", args.creditId);
    const currency = requireText(op, "currency", args.currency).toLowerCase();
    const source = requireText(op, "source", args.source);
    const micros = requireMicros(op, "micros", args.micros, true);
    return this.bounded(op, async (signal) => {
      let retried = false;
      for (let attempt = 0; attempt < MAX_RACES; attempt++) {
        const conditions = ["attribute_exists(#credits)", "attribute_not_exists(#credits.#id)", "(attribute_not_exists(#cur) OR #cur = :cur)"];
        const values: Record<string, unknown> = { ":m": micros, ":zero": 0, ":entry": { m: micros, t: args.now, s: source }, ":cur": currency, ":now": args.now };
        if (micros < 0) {
          conditions.push("#bal >= :debit");
          values[":debit"] = -micros;
        }
        try {
          const output = await this.doc.send(
            new UpdateCommand({
              TableName: this.table,
              Key: { [CUSTOMERS_KEY]: accountItemKey(customerId) },
              UpdateExpression: "SET #bal = if_not_exists(#bal, :zero) + :m, #credits.#id = :entry, #cur = if_not_exists(#cur, :cur), #upd = :now",
              ConditionExpression: conditions.join(" AND "),
              ExpressionAttributeNames: { "#bal": N["#bal"], "#credits": N["#credits"], "#cur": N["#cur"], "#upd": N["#upd"], "#id": creditId },
              ExpressionAttributeValues: values,
              ReturnValues: "UPDATED_NEW",
            }),
            { abortSignal: signal },
          );
          return { applied: true, balanceMicros: storedInteger(output.Attributes?.balance_micros, `balance_micros of account ${customerId}`) };
        } catch (err) {
          if (!isConditionFailure(err) && !isMissingPath(err)) throw err;
          retried = wasRetried(err);
        }
        const account = await this.readAccount(customerId, signal, { credit: creditId });
        const entry = account.credits[creditId];
        if (entry) {
          const ours = retried && entry.m === micros && entry.t === args.now && entry.s === source;
          return ours ? { applied: true, balanceMicros: account.balance } : { applied: false, reason: "duplicate", balanceMicros: account.balance };
        }
        if (account.currency !== undefined && account.currency !== currency) return { applied: false, reason: "currency_mismatch", balanceMicros: account.balance };
        if (micros < 0 && account.balance < -micros) return { applied: false, reason: "insufficient_balance", balanceMicros: account.balance };
        // First credit of this account (no skeleton yet), or the balance changed in between: skeleton, then again.
        await this.ensureAccount(customerId, args.now, signal);
      }
      throw new CustomerStoreError(`customer store ${op}: the account of ${customerId} kept changing; gave up after ${MAX_RACES} tries`);
    });
  }

  /**
   * Every key item with its account's balance (a customer with several keys appears once per key), sorted by
   * customer then key. A Scan of the whole table, page by page, each page bounded by the timeout.
   */
  async listAccounts(): Promise<CustomerAccount[]> {
    const keys: Record<string, unknown>[] = [];
    const accounts = new Map<string, Record<string, unknown>>();
    const names = { "#pk": N["#pk"], "#key": "api_key_id", "#cid": N["#cid"], "#plan": "plan", "#sc": STRIPE_CUSTOMER_KEY, "#st": "status", "#cur": N["#cur"], "#bal": N["#bal"], "#res": N["#res"], "#holds": N["#holds"] };
    await this.scanPages("listAccounts", { ProjectionExpression: Object.keys(names).join(", "), ExpressionAttributeNames: names }, (items) => {
      for (const item of items) {
        const pk = String(item[CUSTOMERS_KEY]);
        if (pk.startsWith(KEY_ITEM_PREFIX)) keys.push(item);
        else if (pk.startsWith(ACCOUNT_ITEM_PREFIX)) accounts.set(pk.slice(ACCOUNT_ITEM_PREFIX.length), item);
      }
    });
    const listed = keys.map((item) => {
      const customer = customerOf(item);
      return { customer, balance: balanceOf(accounts.get(customer.customerId), customer.customerId) };
    });
    return listed.sort((a, b) => a.customer.customerId.localeCompare(b.customer.customerId) || a.customer.apiKeyId.localeCompare(b.customer.apiKeyId));
  }

  /**
   * Holds made before `olderThan`, on every account that has any: a Scan filtered to accounts with a non-empty
   * `holds` map (DynamoDB cannot filter on the times inside it, so those are compared here), page by page.
   */
  async staleHolds(olderThan: number): Promise<StaleHold[]> {
    const stale: StaleHold[] = [];
    await this.scanPages(
      "staleHolds",
      {
        FilterExpression: "begins_with(#pk, :account) AND size(#holds) > :zero",
        ProjectionExpression: "#pk, #holds",
        ExpressionAttributeNames: { "#pk": N["#pk"], "#holds": N["#holds"] },
        ExpressionAttributeValues: { ":account": ACCOUNT_ITEM_PREFIX, ":zero": 0 },
      },
      (items) => {
        for (const item of items) {
          const customerId = String(item[CUSTOMERS_KEY]).slice(ACCOUNT_ITEM_PREFIX.length);
          for (const [transactionId, entry] of Object.entries((item.holds ?? {}) as Record<string, { m?: unknown; t?: unknown; p?: unknown }>)) {
            // A hold whose amount cannot be read cannot be settled safely either: left for a person to look at.
            if (typeof entry?.m !== "number" || !Number.isSafeInteger(entry.m) || entry.m < 0) continue;
            const at = typeof entry.t === "number" && Number.isFinite(entry.t) ? entry.t : 0;
            const periodStart = typeof entry.p === "string" && /^\d{4}-\d{2}-\d{2}$/.test(entry.p) ? entry.p : undefined;
            if (at < olderThan) stale.push({ customerId, transactionId, micros: entry.m, at, ...(periodStart ? { periodStart } : {}) });
          }
        }
      },
    );
    return stale.sort((a, b) => a.at - b.at);
  }

  /** The account as it is now (strongly consistent), reading only the hold or credit entry asked about. */
  private async readAccount(customerId: string, signal: AbortSignal, entry: { hold?: string; credit?: string }): Promise<AccountState> {
    const names: Record<string, string> = { "#cur": N["#cur"], "#bal": N["#bal"], "#res": N["#res"] };
    const paths = ["#cur", "#bal", "#res"];
    if (entry.hold !== undefined) {
      Object.assign(names, { "#holds": N["#holds"], "#tx": entry.hold });
      paths.push("#holds.#tx");
    }
    if (entry.credit !== undefined) {
      Object.assign(names, { "#credits": N["#credits"], "#id": entry.credit });
      paths.push("#credits.#id");
    }
    const output = await this.doc.send(
      new GetCommand({ TableName: this.table, Key: { [CUSTOMERS_KEY]: accountItemKey(customerId) }, ConsistentRead: true, ProjectionExpression: paths.join(", "), ExpressionAttributeNames: names }),
      { abortSignal: signal },
    );
    return accountState(output.Item, customerId);
  }

  /** Gives the account its skeleton where it lacks it; idempotent, so concurrent callers are harmless. */
  private async ensureAccount(customerId: string, now: number, signal: AbortSignal): Promise<void> {
    await this.doc.send(
      new UpdateCommand({
        TableName: this.table,
        Key: { [CUSTOMERS_KEY]: accountItemKey(customerId) },
        UpdateExpression: `SET ${SKELETON}`,
        ExpressionAttributeNames: { "#cid": N["#cid"], "#bal": N["#bal"], "#res": N["#res"], "#holds": N["#holds"], "#credits": N["#credits"], "#upd": N["#upd"] },
        ExpressionAttributeValues: { ":cid": customerId, ":zero": 0, ":empty": {}, ":now": now },
      }),
      { abortSignal: signal },
    );
  }

  private async scanPages(operation: string, input: Omit<ConstructorParameters<typeof ScanCommand>[0], "TableName">, onPage: (items: Record<string, unknown>[]) => void): Promise<void> {
    let startKey: Record<string, unknown> | undefined;
    do {
      const output: ScanCommandOutput = await this.bounded(operation, (signal) =>
        this.doc.send(new ScanCommand({ ...input, TableName: this.table, ExclusiveStartKey: startKey, ...(this.scanPageSize ? { Limit: this.scanPageSize } : {}) }), { abortSignal: signal }),
      );
      onPage(output.Items ?? []);
      startKey = output.LastEvaluatedKey;
    } while (startKey);
  }

  /**
   * Runs `work` with an abort signal that fires at the timeout, and rejects at the timeout even if the SDK call
   * ignores the signal. Every failure becomes a `CustomerStoreError`.
   */
  private bounded<T>(operation: string, work: (signal: AbortSignal) => Promise<T>): Promise<T> {
    return boundedCall(
      this.timeoutMs,
      work,
      () => new CustomerStoreError(`customer store ${operation} failed: no answer within ${this.timeoutMs} ms`),
      (err) => storeError(operation, err),
    );
  }
}

export interface CustomerStoreFromEnvOptions {
  /** `CUSTOMERS_TIMEOUT_MS`, as the caller's config parsed it: bound on one store call. @default 1000 */
  timeoutMs?: number;
  /** SDK attempts for reads and idempotent writes. @default 3 */
  maxAttempts?: number;
  scanPageSize?: number;
}

/**
 * The store for a function's environment: the table from `CUSTOMERS_TABLE` (throws `CustomerStoreError` when it is
 * not set: callers for whom the table is optional check it first), DynamoDB from `dynamoClientOptions` (region,
 * credentials, `AWS_ENDPOINT_URL_DYNAMODB` for dynalite), each SDK attempt bounded by `timeoutMs` for real
 * (`createLedgerDocumentClient`).
 */
export function createCustomerStoreFromEnv(env: NodeJS.ProcessEnv, options: CustomerStoreFromEnvOptions = {}): DynamoCustomerStore {
  const table = env.CUSTOMERS_TABLE?.trim();
  if (!table) throw new CustomerStoreError("CUSTOMERS_TABLE is not set");
  const timeoutMs = options.timeoutMs ?? 1000;
  return new DynamoCustomerStore({
    doc: createLedgerDocumentClient(env, { timeoutMs, maxAttempts: options.maxAttempts ?? 3 }),
    singleAttemptDoc: createLedgerDocumentClient(env, { timeoutMs, maxAttempts: 1 }),
    table,
    timeoutMs,
    scanPageSize: options.scanPageSize,
  });
}
