/**
 * The customers table: who an API key belongs to, and each customer's account (prepaid balance, open reservations,
 * applied credits, usage counters per quota period). It replaces the function's `CUSTOMERS` variable, whose 4 KB
 * capped a stack at about 30 customers.
 *
 * One table, hash key `pk` only, two kinds of item:
 * - `key#<apiKeyId>` (`KeyItem`): written by `pulumi up` (one `aws.dynamodb.TableItem` per customer) and by the
 *   local stack; the function only reads it (GetItem, cached briefly).
 * - `account#<customerId>` (`AccountItem`): never written by Pulumi (so a `pulumi up` can never reset a balance);
 *   created on first use by the function, the `credits` command or the Stripe webhook with `if_not_exists`, and only
 *   ever changed by single-item conditional UpdateItems (no transactions: `dynalite`, the local stand-in, has none).
 *
 * The invariants the writes keep (see `functions/shared/customer-store.ts`, where each expression lives):
 * - `balance_micros >= 0` always: a reservation is conditional on `balance_micros >= :reservation`, a charge above its
 *   reservation on `balance_micros >= :extra` (else it charges only what is left and records the shortfall).
 * - `reserved_micros` = the sum of `holds`: every write that adds or removes a hold changes both.
 * - A transaction id is charged at most once: its hold is created `attribute_not_exists(holds.<tx>)` and removed by
 *   the one settlement conditional on `attribute_exists(holds.<tx>)`; a retried settlement finds no hold and changes
 *   nothing. A credit is applied at most once: `credits.<creditId>` is set by the same conditional write.
 *
 * No AWS SDK imports here: infra and the local stack load this file.
 */
import type { QuotaPeriod } from "./quota-period";

export { quotaPeriodStart, type QuotaPeriod } from "./quota-period";

/** The table's only key attribute (string). */
export const CUSTOMERS_KEY = "pk";

/** Local table name (dynalite); on AWS the name is Pulumi's auto-name, given to the functions as `CUSTOMERS_TABLE`. */
export const LOCAL_CUSTOMERS_TABLE = "customers";

/**
 * Sparse global secondary index over key items that name a Stripe customer: the Stripe webhook finds the customer
 * a payment belongs to with one Query. Hash key `stripe_customer_id`; projection ALL (key items are small).
 */
export const STRIPE_CUSTOMER_INDEX = "stripe_customer";
export const STRIPE_CUSTOMER_KEY = "stripe_customer_id";

export const KEY_ITEM_PREFIX = "key#";
export const ACCOUNT_ITEM_PREFIX = "account#";

/** `key#<apiKeyId>` */
export function keyItemKey(apiKeyId: string): string {
  return `${KEY_ITEM_PREFIX}${apiKeyId}`;
}

/** `account#<customerId>` */
export function accountItemKey(customerId: string): string {
  return `${ACCOUNT_ITEM_PREFIX}${customerId}`;
}

/** `active` serves; `suspended` answers 403 (the key still exists, so the customer's history stays attributed). */
export type CustomerStatus = "active" | "suspended";

/** Which API key belongs to which customer, on which plan. Written by `pulumi up` / the local stack, read by the function. */
export interface KeyItem {
  pk: string;
  /** API Gateway key id (never the key's value). */
  api_key_id: string;
  customer_id: string;
  plan: string;
  /** Stripe customer id (`cus_…`); absent when the customer has none. Keys the `stripe_customer` index. */
  stripe_customer_id?: string;
  status: CustomerStatus;
}

/** One open reservation: the most a request in flight may cost, held back from the balance until it settles. */
export interface HoldEntry {
  /** Micro-units held. */
  m: number;
  /** When it was made (ms since the epoch): a hold older than the function can live was left by a crash. */
  t: number;
  /**
   * Start of the usage period the request counts in (`YYYY-MM-DD`): lets the stale-hold sweep add the request to its
   * period's counters when it settles the hold in the request's place (absent on holds made before it existed).
   */
  p?: string;
}

/** One applied credit (a top-up): its id is the idempotency key (`stripe:<checkout session id>`, `cli:<uuid>`…). */
export interface CreditEntry {
  /** Micro-units credited (negative for a debit made with the `credits` command). */
  m: number;
  t: number;
  /** Where it came from: `stripe_checkout`, `stripe_invoice`, `cli`. */
  s: string;
}

/**
 * A customer's account. Money is integer micro-units of `currency` (the plan's), never floating point.
 * Usage counters are flat attributes per quota period (`usage_counter_name`), created by `ADD` on first use.
 */
export interface AccountItem {
  pk: string;
  customer_id: string;
  /** ISO 4217, lower case: the currency of `balance_micros` (fixed when the account is first written). */
  currency?: string;
  /** Spendable balance: credits minus charges minus open holds. Never negative. */
  balance_micros: number;
  /** Sum of `holds`. */
  reserved_micros: number;
  /** Transaction id → open hold. */
  holds?: Record<string, HoldEntry>;
  /** Credit id → applied credit. */
  credits?: Record<string, CreditEntry>;
  updated_at?: number;
  /** Usage counters: `requests@<period start>`, `prompt_tokens@…`, `completion_tokens@…`, `cost_micros@…`. */
  [counter: string]: unknown;
}

/** The counters kept per customer and quota period. */
export const USAGE_COUNTERS = ["requests", "prompt_tokens", "completion_tokens", "cost_micros"] as const;
export type UsageCounterName = (typeof USAGE_COUNTERS)[number];

/** The account attribute holding one counter for the period starting at `periodStart` (`YYYY-MM-DD`, UTC). */
export function usageCounterName(counter: UsageCounterName, periodStart: string): string {
  return `${counter}@${periodStart}`;
}

/** A quota period as the usage counters key it: the plan's quota period, or the calendar month (UTC) without one. */
export interface UsagePeriod {
  period: QuotaPeriod;
  offset: number;
}
export const DEFAULT_USAGE_PERIOD: UsagePeriod = { period: "MONTH", offset: 0 };

/**
 * The table, in CreateTable's terms: what the Pulumi program provisions and what the local stack creates on
 * dynalite. On-demand capacity; point-in-time recovery and deletion protection are AWS-only and set by infra.
 */
export const CUSTOMERS_TABLE_SCHEMA = {
  attributeDefinitions: [
    { AttributeName: CUSTOMERS_KEY, AttributeType: "S" },
    { AttributeName: STRIPE_CUSTOMER_KEY, AttributeType: "S" },
  ],
  keySchema: [{ AttributeName: CUSTOMERS_KEY, KeyType: "HASH" }],
  globalSecondaryIndexes: [
    {
      IndexName: STRIPE_CUSTOMER_INDEX,
      KeySchema: [{ AttributeName: STRIPE_CUSTOMER_KEY, KeyType: "HASH" }],
      Projection: { ProjectionType: "ALL" },
    },
  ],
} as const;

/** The key item `pulumi up` and the local stack write for a customer (the exact attributes, nothing else). */
export function keyItem(apiKeyId: string, customerId: string, customer: { plan: string; stripeCustomerId?: string; status?: CustomerStatus }): KeyItem {
  return {
    pk: keyItemKey(apiKeyId),
    api_key_id: apiKeyId,
    customer_id: customerId,
    plan: customer.plan,
    ...(customer.stripeCustomerId ? { stripe_customer_id: customer.stripeCustomerId } : {}),
    status: customer.status ?? "active",
  };
}

export { microsPerMinorUnit } from "./currency";
