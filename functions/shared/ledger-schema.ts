/**
 * The usage ledger's table: its keys, its one index and the item every part of the project reads and writes.
 *
 * One item per metered request, keyed by the transaction id (deterministic per API Gateway request), written once
 * with a conditional put by the request path (`functions/ai-chat/ledger.ts`) and then only updated by the forwarder
 * (`functions/usage-forwarder`) as it delivers the item to each billing sink. Every write is a single-item
 * conditional write: DynamoDB's cheapest, most scalable primitive, and the only one `dynalite` (the local stand-in)
 * offers besides plain reads (it has no transactions and no streams).
 *
 * Shared by the function, the forwarder, the Pulumi program (`infra/`) and the local stack (`scripts/local/`), so the
 * table they create and the items they exchange cannot drift apart. No AWS SDK imports here: infra loads this file.
 */
import { createHash } from "node:crypto";
import { awsClientOptions, type AwsClientOptions } from "./aws-client-options";

/** Partition key: the request's transaction id (a UUID, see `functions/ai-chat/metering.ts` `transactionIdFor`). */
export const LEDGER_KEY = "transaction_id";

/**
 * Sparse global secondary index over the items that still owe a delivery to some sink. An item carries the
 * `undelivered` attribute (its shard) while any sink's state is `pending` or `failed`, and loses it once every sink
 * it needs has it; so the index holds only the backlog, whatever the table's size, and a sweep never scans the table.
 */
export const UNDELIVERED_INDEX = "undelivered";
/** The index's partition key: `u0` … `u15`, from the transaction id (16 shards spread a busy backlog's writes). */
export const UNDELIVERED_KEY = "undelivered";
/**
 * The index's sort key: when the item is next due for a delivery attempt (ms since the epoch). A sweep reads each
 * shard's items due by now, the longest-due first, with a key condition (`due_at <= now - grace`): an item whose
 * sinks all refused it and are waiting for their next attempt (up to an hour) is not even read until then, so such
 * items can never crowd out the ones behind them. The writer sets it to `created_at`; the forwarder's marks keep it
 * at or before the earliest time some sink is due again (see `LedgerItem.due_at`).
 */
export const UNDELIVERED_SORT = "due_at";
export const UNDELIVERED_SHARDS = 16;

/** The event name of the Stripe Billing Meter the forwarder reports to (a contract with the Stripe meter `pulumi up` creates). */
export const STRIPE_METER_EVENT_NAME = "ai_usage_cost";

/** Local table name (dynalite); on AWS the name is Pulumi's auto-name, given to the functions as `LEDGER_TABLE`. */
export const LOCAL_LEDGER_TABLE = "usage-ledger";

/** The billing sinks an item can owe a delivery to. */
export type SinkName = "moesif" | "stripe";
export const SINKS: readonly SinkName[] = ["moesif", "stripe"];

/**
 * `pending`: not yet acknowledged by the sink (new, or the sink is down: retried on every sweep once the sink's
 * back-off has passed). `delivered`: acknowledged (or the sink already had it: Stripe's duplicate identifier).
 * `failed`: the sink refused this item itself (a 4xx about it, such as an unknown Stripe customer); kept visible and
 * re-tried on a slow schedule (`<sink>_next_at`), never dropped.
 */
export type SinkState = "pending" | "delivered" | "failed";

/** `stripeBilling`: who reports usage to Stripe. Never both, so a customer is never billed twice. */
export type StripeBilling = "moesif" | "meters";

/**
 * One metered request. Attribute names are snake_case, as in the Moesif event metadata and `npm run usage --json`.
 * Money is integer micro-units of `currency` (1 USD = 1,000,000). Holds no key, secret or (unless `logBodies`)
 * prompt or completion text: `moesif_event` is the same secret-free, size-capped event the direct Moesif send uses.
 */
export interface LedgerItem {
  transaction_id: string;
  /** When the item was made (the request's end), ms since the epoch. */
  created_at: number;
  /**
   * The backlog index's sort key (ms since the epoch), present with `undelivered`: `created_at` when written; while
   * any sink is `pending`, some time at or before now; once every sink still owed has `failed`, the earliest of their
   * `<sink>_next_at`. Never later than the item is next due (a mark that would move it later is conditional on the
   * states it was computed from); it may be earlier, which costs a read and nothing else.
   */
  due_at?: number;
  request_id: string;
  method: string;
  route: string;
  status: number;
  stage?: string;
  started_at: number;
  finished_at: number;
  /** API Gateway key id (not the key): what Moesif gets as `session_token`. */
  api_key_id?: string;
  customer_id?: string;
  stripe_customer_id?: string;
  plan?: string;
  model?: string;
  prompt_tokens: number;
  completion_tokens: number;
  /** Always `prompt_tokens + completion_tokens`. */
  total_tokens: number;
  cached_tokens: number;
  reasoning_tokens: number;
  usage_estimated: boolean;
  /** The caller got a 2xx answer with a completion: only billed items have tokens and cost. */
  billed: boolean;
  /** Absent on plans without prices. */
  cost_micros?: number;
  currency?: string;
  /** `prepaid` (charged from a balance; never sent to Stripe meters: the customer paid up front) or `postpaid`. */
  billing_mode?: "prepaid" | "postpaid";
  /** Prepaid: the amount held before the upstream call. */
  reserved_micros?: number;
  /** Prepaid: what was taken from the balance (the cost, or less when the balance could not cover an overrun). */
  charged_micros?: number;
  /** Prepaid: cost the balance could not cover (it never goes negative); 0 normally. */
  shortfall_micros?: number;
  /** Prepaid: the balance right after this request's charge. */
  balance_after_micros?: number;
  /**
   * Prepaid: `settled` when the charge was made before this item was written; `pending` when the settlement could
   * not be confirmed (store timeout): the stale-hold sweep settles the hold from this item's `cost_micros` later.
   */
  settlement?: "settled" | "pending";
  upstream_status?: number;
  upstream_ms?: number;
  streamed: boolean;
  stream_error?: string;
  client_disconnected: boolean;
  /** The Moesif event (JSON text, at most 64 KiB) exactly as the forwarder sends it. */
  moesif_event: string;

  moesif_state?: SinkState;
  moesif_attempts?: number;
  /** Earliest time (ms) a `failed` item is tried again. */
  moesif_next_at?: number;
  moesif_error?: string;
  moesif_delivered_at?: number;

  /** Absent when the item owes Stripe nothing (`stripeBilling: moesif`, or no cost). */
  stripe_state?: SinkState;
  stripe_attempts?: number;
  stripe_next_at?: number;
  stripe_error?: string;
  stripe_delivered_at?: number;

  /** The backlog index's shard; present while any sink is `pending` or `failed`. */
  undelivered?: string;
}

/** The backlog shard of a transaction id: stable, evenly spread. */
export function undeliveredShard(transactionId: string): string {
  const digest = createHash("sha1").update(transactionId).digest();
  return `u${digest[0] % UNDELIVERED_SHARDS}`;
}

/** Whether an item still owes some sink a delivery (and so belongs in the backlog index). */
export function owesDelivery(item: Pick<LedgerItem, "moesif_state" | "stripe_state">): boolean {
  return SINKS.some((sink) => {
    const state = item[`${sink}_state`];
    return state === "pending" || state === "failed";
  });
}

/**
 * The table, in CreateTable's terms: what the Pulumi program provisions and what the local stack creates on
 * dynalite. On-demand capacity; the stream (NEW_IMAGE) and point-in-time recovery are AWS-only and set by infra.
 */
export const LEDGER_TABLE_SCHEMA = {
  attributeDefinitions: [
    { AttributeName: LEDGER_KEY, AttributeType: "S" },
    { AttributeName: UNDELIVERED_KEY, AttributeType: "S" },
    { AttributeName: UNDELIVERED_SORT, AttributeType: "N" },
  ],
  keySchema: [{ AttributeName: LEDGER_KEY, KeyType: "HASH" }],
  globalSecondaryIndexes: [
    {
      IndexName: UNDELIVERED_INDEX,
      KeySchema: [
        { AttributeName: UNDELIVERED_KEY, KeyType: "HASH" },
        { AttributeName: UNDELIVERED_SORT, KeyType: "RANGE" },
      ],
      // ALL: the forwarder delivers straight from the index, with no read of the table per item.
      Projection: { ProjectionType: "ALL" },
    },
  ],
} as const;

/** DynamoDB client settings from a function's environment (`AWS_ENDPOINT_URL_DYNAMODB` points the local stack at dynalite). */
export function dynamoClientOptions(env: NodeJS.ProcessEnv): AwsClientOptions {
  return awsClientOptions(env, "DYNAMODB");
}
