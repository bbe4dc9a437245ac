/**
 * The request path's side of the usage ledger: each metered request becomes one `LedgerItem`, written once to the
 * DynamoDB table with a conditional put, instead of being sent to Moesif inside the request. The forwarder
 * (`functions/usage-forwarder`) then delivers the item to Moesif and, with `STRIPE_BILLING=meters`, to Stripe.
 *
 * The put is bounded by `LEDGER_TIMEOUT_MS`. When the ledger cannot take an item, the record goes to the fallback
 * meter (today's direct Moesif send, which logs `metering_deferred` when it fails too), the item is logged whole in a
 * `ledger_deferred` line and kept in memory to be put again with later requests: no single fault loses usage.
 */
import type { DynamoDBDocumentClient } from "@aws-sdk/lib-dynamodb";
import { BoundedBacklog } from "../shared/bounded-backlog";
import { dynamoClientOptions, owesDelivery, undeliveredShard, type LedgerItem, type StripeBilling } from "../shared/ledger-schema";
import { describeError, type Logger } from "./logger";
import type { UsageMeter, UsageRecord } from "./metering";
import { prepareEvent, toMoesifEvent, type PreparedEvent } from "./moesif";

/** Longest id kept in an item (request id, method, customer and plan names): as the Moesif event clips its fields. */
const MAX_FIELD_CHARS = 256;
/** Longest route kept: as the Moesif event clips its URI. */
const MAX_ROUTE_CHARS = 2048;

export interface LedgerItemOptions {
  /** Keep prompt and completion text in the item's Moesif event (`MOESIF_LOG_BODIES=true`); otherwise none. */
  logBodies: boolean;
  stripeBilling: StripeBilling;
}

function clip(text: string, max: number): string {
  return text.length > max ? text.slice(0, max) : text;
}

/** A string worth keeping (clipped), or undefined. */
function text(value: unknown, max = MAX_FIELD_CHARS): string | undefined {
  return typeof value === "string" && value.length > 0 ? clip(value, max) : undefined;
}

/**
 * A whole number DynamoDB can store and every reader can sum: NaN, infinities and unsafe integers would make the
 * put fail for ever (the SDK refuses NaN; DynamoDB refuses the rest), so they become undefined (or `fallback`).
 */
function wholeNumber(value: unknown): number | undefined {
  if (typeof value !== "number" || !Number.isFinite(value)) return undefined;
  const rounded = Math.round(value);
  return Number.isSafeInteger(rounded) ? rounded : undefined;
}

/** A non-negative whole amount of micro-units, or undefined. */
function micros(value: unknown): number | undefined {
  const whole = wholeNumber(value);
  return whole !== undefined && whole >= 0 ? whole : undefined;
}

/** The item and the Moesif event it carries (with what `prepareEvent` truncated, for the caller to log). */
function buildLedgerItem(record: UsageRecord, options: LedgerItemOptions): { item: LedgerItem; prepared: PreparedEvent } {
  // One Moesif event is both the source of the item's numbers and the event the forwarder sends: the ledger and
  // Moesif can never disagree about a request (validated counts, cost only when a safe non-negative integer, billed).
  const prepared = prepareEvent(toMoesifEvent(record, options.logBodies));
  const { metadata } = prepared.event;
  const finishedAt = wholeNumber(record.finishedAt) ?? 0;
  const costMicros = metadata.cost_micros ?? undefined;
  const stripeCustomerId = text(record.customer?.stripeCustomerId);
  const item: LedgerItem = {
    transaction_id: record.transactionId,
    created_at: finishedAt,
    request_id: clip(metadata.request_id, MAX_FIELD_CHARS),
    method: clip(record.method, MAX_FIELD_CHARS),
    route: clip(metadata.route, MAX_ROUTE_CHARS),
    status: wholeNumber(record.status) ?? 0,
    stage: metadata.stage ?? undefined,
    started_at: wholeNumber(record.startedAt) ?? finishedAt,
    finished_at: finishedAt,
    api_key_id: text(record.apiKeyId),
    customer_id: text(record.customer?.customerId),
    stripe_customer_id: stripeCustomerId,
    plan: text(record.customer?.plan),
    model: metadata.model ?? undefined,
    prompt_tokens: metadata.prompt_tokens,
    completion_tokens: metadata.completion_tokens,
    total_tokens: metadata.total_tokens,
    cached_tokens: metadata.cached_tokens,
    reasoning_tokens: metadata.reasoning_tokens,
    usage_estimated: metadata.usage_estimated,
    billed: metadata.billed,
    cost_micros: costMicros,
    currency: costMicros !== undefined ? (metadata.currency ?? undefined) : undefined,
    upstream_status: wholeNumber(metadata.upstream_status),
    upstream_ms: wholeNumber(metadata.upstream_ms),
    streamed: metadata.streamed,
    stream_error: metadata.stream_error ?? undefined,
    client_disconnected: metadata.client_disconnected,
    moesif_event: prepared.json,
    // Every request, errors included, reaches Moesif (analytics, and its billing meter with STRIPE_BILLING=moesif).
    moesif_state: "pending",
    moesif_attempts: 0,
  };
  const billing = record.billing;
  if (billing) {
    item.billing_mode = billing.mode;
    if (billing.mode === "prepaid") {
      item.reserved_micros = micros(billing.reservedMicros);
      item.charged_micros = micros(billing.chargedMicros);
      item.shortfall_micros = micros(billing.shortfallMicros);
      item.balance_after_micros = micros(billing.balanceAfterMicros);
      item.settlement = billing.settlement;
    }
  }
  // Stripe gets a meter event only when it bills directly, and only for a charge: a billed request that costs
  // something, on a postpaid plan (a prepaid customer paid up front; the charge came out of the balance). Never
  // both routes, so a customer is never billed twice.
  if (options.stripeBilling === "meters" && billing?.mode !== "prepaid" && item.billed && (costMicros ?? 0) > 0) {
    item.stripe_attempts = 0;
    if (stripeCustomerId) item.stripe_state = "pending";
    else {
      // Kept visible in the backlog, not dropped: once the customer's Stripe id is set on the item, the
      // forwarder's retries deliver it (`stripe_next_at` is due at once; the forwarder backs off from there).
      item.stripe_state = "failed";
      item.stripe_error = `customer ${item.customer_id ?? "(unknown)"} has no stripeCustomerId, so this charge cannot be reported to Stripe`;
      item.stripe_next_at = finishedAt;
    }
  }
  if (owesDelivery(item)) {
    item.undelivered = undeliveredShard(item.transaction_id);
    // The backlog index's sort key: due at once (Moesif is pending), the longest-waiting first.
    item.due_at = item.created_at;
  }
  return { item, prepared };
}

/**
 * The ledger item for one usage record (pure). Its numbers are the Moesif event's (`meteredUsage`, a cost only
 * when it is a safe non-negative integer, `billed` as `toMoesifEvent` decides) and `moesif_event` is that event as
 * `prepareEvent` serialises it, so the forwarder sends exactly what the direct send would have. Sink states: Moesif
 * `pending`; Stripe `pending` only with `stripeBilling: "meters"` for a billed postpaid request with a cost (`failed`,
 * with `stripe_error`, when the customer has no Stripe id; never for a prepaid one, charged from its balance);
 * the prepaid settlement (`billing_mode`, `reserved_micros`, `charged_micros`, `shortfall_micros`,
 * `balance_after_micros`, `settlement`) from `record.billing`; `undelivered` (the backlog shard) and `due_at` (= `created_at`,
 * the backlog's sort key) set while any sink is owed. No key, no secret
 * and, unless `logBodies`, no prompt or completion text: the item holds nothing the Moesif event does not.
 */
export function toLedgerItem(record: UsageRecord, options: LedgerItemOptions): LedgerItem {
  return buildLedgerItem(record, options).item;
}

/** Narrow port: writes an item only if its transaction id is new. */
export interface LedgerWriter {
  /**
   * `created`, or `exists` when an item with this transaction id is already there (it is left as it is). Rejects
   * on any other failure; gives up when `signal` aborts.
   */
  putNew(item: LedgerItem, signal: AbortSignal): Promise<"created" | "exists">;
}

/** `PutItem` with `attribute_not_exists(transaction_id)`: a retry or a replay never creates a second item, nor overwrites one the forwarder has updated. */
export class DynamoLedgerWriter implements LedgerWriter {
  private readonly PutCommand: typeof import("@aws-sdk/lib-dynamodb").PutCommand;

  constructor(
    private readonly doc: DynamoDBDocumentClient,
    private readonly table: string,
  ) {
    // Required here, not imported at the top: a function without LEDGER_TABLE never loads the SDK at cold start.
    ({ PutCommand: this.PutCommand } = require("@aws-sdk/lib-dynamodb") as typeof import("@aws-sdk/lib-dynamodb"));
  }

  async putNew(item: LedgerItem, signal: AbortSignal): Promise<"created" | "exists"> {
    try {
      await this.doc.send(new this.PutCommand({ TableName: this.table, Item: item, ConditionExpression: "attribute_not_exists(transaction_id)" }), { abortSignal: signal });
      return "created";
    } catch (err) {
      if ((err as { name?: unknown })?.name === "ConditionalCheckFailedException") return "exists";
      throw err;
    }
  }
}

/**
 * The DynamoDB client for the request path, once per container: settings from `dynamoClientOptions(env)` and
 * timeouts inside the write budget. Two attempts at most (a throttled or 5xx put is tried once more if time is
 * left); the connection and request timeouts keep each attempt inside `timeoutMs`, and `LedgerMeter` aborts
 * whatever is still running when the budget ends (the SDK's pause between attempts included).
 */
export function createLedgerWriter(env: NodeJS.ProcessEnv, table: string, timeoutMs: number): DynamoLedgerWriter {
  const { DynamoDBClient } = require("@aws-sdk/client-dynamodb") as typeof import("@aws-sdk/client-dynamodb");
  const { DynamoDBDocumentClient } = require("@aws-sdk/lib-dynamodb") as typeof import("@aws-sdk/lib-dynamodb");
  const { region, endpoint, credentials } = dynamoClientOptions(env);
  const client = new DynamoDBClient({
    ...(region ? { region } : {}),
    ...(endpoint ? { endpoint } : {}),
    ...(credentials ? { credentials } : {}),
    maxAttempts: 2,
    // throwOnRequestTimeout: without it, smithy's requestTimeout only logs a warning and lets the request run on
    // (@smithy/node-http-handler 4.14, dist-cjs/index.js `setRequestTimeout`).
    requestHandler: { connectionTimeout: timeoutMs, requestTimeout: timeoutMs, throwOnRequestTimeout: true },
  });
  // removeUndefinedValues: optional item fields are left undefined rather than written as NULL.
  return new DynamoLedgerWriter(DynamoDBDocumentClient.from(client, { marshallOptions: { removeUndefinedValues: true } }), table);
}

export interface LedgerMeterOptions {
  writer: LedgerWriter;
  /** Upper bound on the time one `record` call waits for the ledger (its own put and the re-puts it carries). */
  timeoutMs: number;
  logBodies: boolean;
  stripeBilling: StripeBilling;
  /** Gets every record the ledger could not take (the direct Moesif send). Must never reject, as any meter. */
  fallback: UsageMeter;
  log: Logger;
  /** Items kept in memory to be put again while the ledger is failing. @default 1000 */
  maxPending?: number;
  /** Bytes (JSON) of items kept in memory. @default 16 MiB */
  maxPendingBytes?: number;
  /** Most waiting items put again after one request's own item. @default 10 */
  maxReplay?: number;
  /** First pause after a failed write; doubles per failure up to `maxBackoffMs`. @default 1000 */
  backoffMs?: number;
  /** @default 30000 */
  maxBackoffMs?: number;
  clock?: () => number;
}

interface PendingItem {
  item: LedgerItem;
  bytes: number;
}

type PutOutcome = { ok: true } | { ok: false; refused: boolean; reason: string };

/**
 * Errors about the item itself: putting it again can never succeed, so it is not kept for re-puts (its record
 * still goes to the fallback). Everything else (unreachable, timeout, throttling, 5xx, a missing table or
 * permission) is treated as an outage that later requests may outlive.
 */
const ITEM_REFUSALS = new Set(["ValidationException", "SerializationException"]);

/**
 * Usage meter for the request path when `LEDGER_TABLE` is set: one conditional put per request, awaited (Lambda
 * freezes the process once the handler returns, so an un-awaited write might never leave the machine), never for
 * longer than `timeoutMs`.
 *
 * A write that fails or runs out of time is an outage: a `ledger_write_failed` warning, the whole item in a
 * `ledger_deferred` line (to put it from the logs if the container dies first), the item kept in memory (at most
 * `maxPending` items and `maxPendingBytes`; past that the oldest go, with an error line naming them) and put again
 * by later requests once their own item went in, up to `maxReplay` each and inside the same time bound (the
 * conditional put makes a re-put of an item that did land harmless), and the record handed to `fallback`, so
 * Moesif still gets it at once.
 * After a failure the meter skips the ledger for a back-off period, so a hanging endpoint costs one timeout per
 * period, not one per request. `record` never rejects.
 */
export class LedgerMeter implements UsageMeter {
  private readonly pending: BoundedBacklog<PendingItem>;
  private failures = 0;
  private nextAttemptAt = 0;
  private readonly clock: () => number;
  private readonly maxReplay: number;

  constructor(private readonly options: LedgerMeterOptions) {
    this.clock = options.clock ?? Date.now;
    this.pending = new BoundedBacklog<PendingItem>(options.maxPending ?? 1000, options.maxPendingBytes ?? 16 * 1024 * 1024, (dropped) =>
      options.log.error("ledger_dropped_from_memory", {
        count: dropped.length,
        reason: "too many items waiting for the ledger; put them from their ledger_deferred log lines",
        transaction_ids: dropped.map((p) => p.item.transaction_id),
      }),
    );
    this.maxReplay = Math.max(0, options.maxReplay ?? 10);
  }

  /** The meter that takes the records the ledger cannot. */
  get fallback(): UsageMeter {
    return this.options.fallback;
  }

  /** Items waiting in memory for the ledger to come back. */
  get pendingCount(): number {
    return this.pending.length;
  }

  async record(record: UsageRecord): Promise<void> {
    try {
      if (!(await this.write(record))) await this.options.fallback.record(record);
    } catch (err) {
      // Unreachable by design (write and the fallback never throw); a bug here must not fail the request.
      this.options.log.error("metering_failed", { request_id: record.requestId, error: describeError(err) });
    }
  }

  /** True when the ledger has the record's item (now or before); false when the fallback must take the record. */
  private async write(record: UsageRecord): Promise<boolean> {
    const started = performance.now();
    const { log } = this.options;
    let own: PendingItem;
    try {
      const { item, prepared } = buildLedgerItem(record, this.options);
      if (prepared.truncated.length > 0) {
        log.warn("metering_event_truncated", { request_id: record.requestId, transaction_id: item.transaction_id, truncated: prepared.truncated });
      }
      own = { item, bytes: Buffer.byteLength(JSON.stringify(item)) };
    } catch (err) {
      log.error("ledger_item_build_failed", { request_id: record.requestId, error: describeError(err) });
      return false;
    }
    if (this.clock() < this.nextAttemptAt) {
      this.defer(own, "ledger backing off after a failure");
      return false;
    }
    const deadline = started + this.options.timeoutMs;
    const [mine] = await this.putAll([own], deadline);
    if (mine.ok) {
      const recovering = this.failures > 0;
      this.failures = 0;
      const putAgain = await this.replay(deadline);
      if (recovering) log.info("ledger_recovered", { put_again: putAgain, still_pending: this.pending.length });
      return true;
    }
    if (mine.refused) {
      log.error("ledger_item_refused", { reason: mine.reason, transaction_id: own.item.transaction_id, item: own.item });
      return false;
    }
    this.noteFailure();
    log.warn("ledger_write_failed", { request_id: record.requestId, transaction_id: own.item.transaction_id, reason: mine.reason, fallback: "direct Moesif send" });
    this.defer(own, mine.reason);
    return false;
  }

  /**
   * Puts up to `maxReplay` waiting items again, in what is left of the request's time budget. Only called once the
   * ledger took the request's own item: a ledger that is still failing is not loaded with re-puts (each is a
   * PutItem of its own; conditional writes cannot be batched). Returns how many are now in the ledger.
   */
  private async replay(deadline: number): Promise<number> {
    const carried = this.pending.take(this.maxReplay);
    if (carried.length === 0) return 0;
    const outcomes = await this.putAll(carried, deadline);
    // Done (put now, or already there), refused (dropped: it has its ledger_deferred line), or back to the buffer.
    const back: PendingItem[] = [];
    outcomes.forEach((outcome, i) => {
      if (outcome.ok) return;
      if (outcome.refused) this.options.log.error("ledger_item_refused", { reason: outcome.reason, transaction_id: carried[i].item.transaction_id, note: "replay it from its ledger_deferred line once fixed" });
      else back.push(carried[i]);
    });
    this.pending.putBack(back);
    return outcomes.filter((outcome) => outcome.ok).length;
  }

  /**
   * Puts every item at once, all bounded by `deadline`: the abort signals stop whatever the SDK is still doing
   * (an attempt, or its pause before the next one), and the race with the same deadline returns even if an
   * attempt ignored the signal. Never rejects.
   */
  private async putAll(items: PendingItem[], deadline: number): Promise<PutOutcome[]> {
    const remaining = Math.floor(deadline - performance.now());
    if (remaining <= 0) return items.map(() => ({ ok: false, refused: false, reason: "time budget spent before writing" }));
    // One controller per put: the SDK adds a listener per call, and one signal shared by more than 10 puts draws a
    // MaxListenersExceededWarning.
    const controllers = items.map(() => new AbortController());
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<PutOutcome>((resolve) => {
      timer = setTimeout(() => {
        for (const controller of controllers) controller.abort();
        resolve({ ok: false, refused: false, reason: `no answer within ${this.options.timeoutMs} ms` });
      }, remaining);
    });
    try {
      return await Promise.all(
        items.map((pending, i) =>
          Promise.race([
            this.options.writer.putNew(pending.item, controllers[i].signal).then(
              (): PutOutcome => ({ ok: true }),
              (err): PutOutcome => describeFailure(err, controllers[i].signal.aborted, this.options.timeoutMs),
            ),
            expired,
          ]),
        ),
      );
    } finally {
      clearTimeout(timer);
    }
  }

  private defer(pending: PendingItem, reason: string): void {
    this.options.log.warn("ledger_deferred", { reason, transaction_id: pending.item.transaction_id, item: pending.item });
    this.pending.push(pending);
  }

  /** One back-off window per outage step: failures of writes that were already in flight do not lengthen it. */
  private noteFailure(): void {
    const now = this.clock();
    if (now < this.nextAttemptAt) return;
    this.failures += 1;
    const backoff = Math.min((this.options.backoffMs ?? 1000) * 2 ** (this.failures - 1), this.options.maxBackoffMs ?? 30_000);
    this.nextAttemptAt = now + backoff;
  }
}

function describeFailure(err: unknown, aborted: boolean, timeoutMs: number): PutOutcome {
  if (aborted) return { ok: false, refused: false, reason: `no answer within ${timeoutMs} ms` };
  const { name, message, code } = describeError(err);
  const status = (err as { $metadata?: { httpStatusCode?: unknown } })?.$metadata?.httpStatusCode;
  const refused = ITEM_REFUSALS.has(name);
  return { ok: false, refused, reason: `${refused ? "ledger refused the item" : "ledger unavailable"}: ${code ?? name}${typeof status === "number" ? ` (HTTP ${status})` : ""}: ${message}` };
}
