/**
 * The customer store as its users see it (the function, the Stripe webhook, the `credits` command, the forwarder's
 * stale-hold sweep): plain values in, plain values out, no AWS types. `customer-store.ts` implements it on DynamoDB
 * (dynalite locally); tests may use an in-memory implementation that keeps the same rules.
 *
 * Money is integer micro-units everywhere. Every method bounds its own time (the implementation's timeout) and
 * rejects with `CustomerStoreError` when the store cannot answer; none of them ever leaves the balance negative.
 */
import type { CustomerStatus, UsagePeriod } from "./customer-schema";

/** A key item, in the function's terms. */
export interface CustomerRecord {
  apiKeyId: string;
  customerId: string;
  plan: string;
  stripeCustomerId?: string;
  status: CustomerStatus;
}

/** A customer's balance as the account item holds it. An account never written reads as zero, no currency. */
export interface AccountBalance {
  customerId: string;
  currency?: string;
  balanceMicros: number;
  reservedMicros: number;
  /** Open holds: transaction id → {micros, at}. */
  holds: Record<string, { micros: number; at: number }>;
}

/** The counters of one quota period (zero when nothing was counted yet). */
export interface UsageTotals {
  periodStart: string;
  requests: number;
  promptTokens: number;
  completionTokens: number;
  costMicros: number;
  /** The account's balance, from the same read as the counters (so the two always agree). */
  balance: AccountBalance;
}

/** What one request adds to its customer's counters for the current period. */
export interface UsageIncrement {
  periodStart: string;
  requests: number;
  promptTokens: number;
  completionTokens: number;
  costMicros: number;
}

export interface ReserveArgs {
  customerId: string;
  /** The plan's currency: set on the account when it is first written; a reservation in another currency is refused. */
  currency: string;
  transactionId: string;
  micros: number;
  now: number;
  /** Start of the usage period the request counts in: kept on the hold for the stale-hold sweep. */
  periodStart?: string;
}

export type ReserveResult =
  /** Held: `balanceMicros` is what is left to spend after it. */
  | { ok: true; balanceMicros: number }
  /** Not enough: nothing changed; `balanceMicros` is the balance seen (0 for an account never credited). */
  | { ok: false; reason: "insufficient_balance" | "currency_mismatch"; balanceMicros: number };

export interface SettleArgs {
  customerId: string;
  transactionId: string;
  /** The amount held by `reserve` for this transaction. */
  reservedMicros: number;
  /** What the request actually cost (0 releases the whole hold). */
  costMicros: number;
  now: number;
  /** Counters added in the same write, so they too are counted exactly once. */
  usage?: UsageIncrement;
}

export interface SettleResult {
  /** False when the hold was already gone (settled before, or released by the stale-hold sweep): nothing changed. */
  settled: boolean;
  /** Charged this time: `costMicros`, or less when the cost exceeded the hold and the balance could not cover it. */
  chargedMicros: number;
  /** Cost that could not be charged because the balance would have gone negative (logged by the caller). */
  shortfallMicros: number;
  /** Balance after the charge (after this write; other requests may have changed it since). */
  balanceMicros: number;
}

export interface CreditArgs {
  customerId: string;
  currency: string;
  /** Idempotency key: a credit id applied once is never applied again (`stripe:cs_…`, `cli:<uuid>`). */
  creditId: string;
  /** Positive adds; negative removes, and is refused (`insufficient_balance`) if it would make the balance negative. */
  micros: number;
  /** `stripe_checkout`, `stripe_invoice`, `cli`. */
  source: string;
  now: number;
}

export type CreditResult =
  | { applied: true; balanceMicros: number }
  | { applied: false; reason: "duplicate" | "insufficient_balance" | "currency_mismatch"; balanceMicros: number };

/** One hold older than the sweep's limit, found on some account. */
export interface StaleHold {
  customerId: string;
  transactionId: string;
  micros: number;
  at: number;
  /** The hold's usage period, when it recorded one: the sweep then counts the request there. */
  periodStart?: string;
}

/** One customer as the `credits` command lists it. */
export interface CustomerAccount {
  customer: CustomerRecord;
  balance: AccountBalance;
}

export interface CustomerStore {
  /** The key item for an API key id; undefined when none. */
  getCustomer(apiKeyId: string): Promise<CustomerRecord | undefined>;
  /** The key item naming this Stripe customer (the `stripe_customer` index); undefined when none. */
  findByStripeCustomer(stripeCustomerId: string): Promise<CustomerRecord | undefined>;
  /** Balance and holds of a customer; an account never written reads as zero. */
  getBalance(customerId: string): Promise<AccountBalance>;
  /** Counters of the period starting `periodStart` (zeros when none) and the balance, in one consistent read. */
  getUsage(customerId: string, periodStart: string): Promise<UsageTotals>;
  /** One conditional write: hold `micros` if `balance_micros >= micros`. */
  reserve(args: ReserveArgs): Promise<ReserveResult>;
  /** One conditional write (two when the cost exceeds the hold and the balance cannot cover all of it). Idempotent. */
  settle(args: SettleArgs): Promise<SettleResult>;
  /** Adds usage counters to a postpaid customer's account (one unconditional ADD; not idempotent, never retried). */
  addUsage(customerId: string, usage: UsageIncrement, now: number): Promise<void>;
  /** One conditional write, idempotent on `creditId`. */
  credit(args: CreditArgs): Promise<CreditResult>;
  /** Every key item with its account (a Scan; for the `credits` command and reports, not the request path). */
  listAccounts(): Promise<CustomerAccount[]>;
  /** Holds made before `olderThan` (a Scan over accounts with holds; for the stale-hold sweep). */
  staleHolds(olderThan: number): Promise<StaleHold[]>;
}

/** The store could not answer in time or at all (network, throttling, timeout). Never carries a secret. */
export class CustomerStoreError extends Error {
  override name = "CustomerStoreError";
}

/**
 * The store answered, but the key item it returned cannot be read (an unknown `status` such as a hand-typed
 * `"Suspended"`, no `customer_id` or no `plan`). A fact about that one key, not an outage: the function refuses
 * that key (403 `customer_invalid`) and keeps serving every other one. A `CustomerStoreError`, so code that only
 * knows the base class still fails closed.
 */
export class CustomerItemInvalidError extends CustomerStoreError {
  override name = "CustomerItemInvalidError";
}

export type { UsagePeriod };
