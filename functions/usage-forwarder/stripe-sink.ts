/**
 * Stripe Billing Meters, through the official `stripe` SDK: one meter event per billed request, `event_name`
 * `ai_usage_cost`, `payload { stripe_customer_id, value: String(cost_micros) }`, `identifier` = the transaction id
 * (Stripe de-duplicates on it), `timestamp` = when the request started.
 *
 * Why the v2 meter event stream by default (`STRIPE_METER_API=v2`): it takes up to 100 events per call and
 * 10,000 calls per second (https://docs.stripe.com/api/v2/billing/meter-event-stream/create), against one event per
 * call and 1,000 calls per second on v1 (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api
 * "Rate limits"); and the SDK can be pointed at a Stripe-compatible server for it: a custom `host` replaces every
 * base address, the stream's `meter-events.stripe.com` included (stripe-node 23.1.0 `cjs/stripe.core.js`
 * `resolveBaseAddress`, "can override host globally"; `cjs/resources/V2/Billing/MeterEventStream.js` asks for
 * `apiBase: 'meter_events'`), and `port`/`protocol` are global (`cjs/RequestSender.js` `_request`).
 *
 * What v2 gives up: the stream validates asynchronously ("Events are processed asynchronously, including
 * validation"), so a 2xx means accepted, not valid. An event Stripe later rejects (an unknown customer, code
 * `meter_event_customer_not_found`: `cjs/resources/V2/Core/Events.d.ts`) arrives as a
 * `v1.billing.meter.error_report_triggered` event, not as an answer to this call; `npm run reconcile` (ledger totals
 * against Stripe's meter event summaries) is what finds such a gap. The checks Stripe documents and that can be made
 * here (timestamp within the past 35 days and at most 5 minutes ahead, a customer id, a whole-number value) are made
 * before sending, so such an item is `failed`, visibly, instead of silently dropped. `STRIPE_METER_API=v1` sends
 * one synchronous call per event instead (bounded concurrency), where Stripe refuses a bad event in its answer.
 *
 * Values: since API version 2026-04-22.dahlia Stripe refuses a value of more than 15 significant digits (400 on v1;
 * on the stream an asynchronous `meter_event_value_too_many_digits` error report):
 * https://docs.stripe.com/changelog/dahlia/2026-04-22/billing-meter-event-values-validation. A cost of 10^15
 * micro-units or more is therefore `failed` before sending (whole numbers only, so at most 15 digits).
 *
 * Duplicates: v1 refuses an identifier it already has with HTTP 400 `invalid_request_error` "An event already exists
 * with identifier …" (observed with and without `code: duplicate_meter_event`: langfuse/langfuse PR #16292; Stripe's
 * OpenAPI `v2.error.duplicate_meter_event`); that means "already delivered" for the one event it is about: a call
 * carrying one event (v1 always) whose error names that event's identifier, or none. A duplicate error for a call
 * of several events is treated as a refusal, so the batch is bisected down to that event. The v2 stream
 * de-duplicates silently.
 */
import Stripe from "stripe";
import { describeError } from "../ai-chat/logger";
import { STRIPE_METER_EVENT_NAME, type LedgerItem } from "../shared/ledger-schema";
import type { StripeMeterApi } from "./config";
import { outcomeOfStatus, splitBatches, type BatchOutcome, type Sink } from "./sink";

type StreamEvent = Parameters<Stripe["v2"]["billing"]["meterEventStream"]["create"]>[0]["events"][number];

/** Most events per meter event stream call (Stripe: "Supports up to 100 events per request"). */
export const STRIPE_STREAM_MAX_EVENTS = 100;
/** Stripe takes timestamps "within the past 35 calendar days" and "up to 5 minutes in the future". */
export const STRIPE_MAX_EVENT_AGE_MS = 35 * 24 * 3600_000;
export const STRIPE_MAX_EVENT_LEAD_MS = 5 * 60_000;
/** Values of this many micro-units or more have more than the 15 digits Stripe accepts (see above). */
export const STRIPE_MAX_VALUE_EXCLUSIVE = 1e15;
/** Margin kept from the 35-day edge: an event sent at the very edge could age past it before Stripe processes it. */
const AGE_MARGIN_MS = 10 * 60_000;
/** A session token is replaced this long before its `expires_at` (tokens live 15 minutes). */
const SESSION_REFRESH_MARGIN_MS = 60_000;

export interface StripeSinkOptions {
  /** The secret key, or why it is unknown right now (it may come from SSM). */
  apiKey: () => Promise<{ value: string } | { reason: string }>;
  /** A Stripe-compatible server, e.g. `http://127.0.0.1:12111`; default: Stripe. */
  apiBase?: string;
  /** @default v2 */
  api?: StripeMeterApi;
  /** Events per stream call. @default 100 */
  maxBatchEvents?: number;
  /** Calls in flight at once. @default 2 for v2, 4 for v1 */
  concurrency?: number;
  clock?: () => number;
}

/** The meter event for an item, in the v2 stream's shape (ISO timestamp) or v1's (seconds). */
export function meterEventFor(item: LedgerItem, api: StripeMeterApi) {
  return {
    event_name: STRIPE_METER_EVENT_NAME,
    identifier: item.transaction_id,
    payload: { stripe_customer_id: item.stripe_customer_id ?? "", value: String(item.cost_micros ?? 0) },
    ...(api === "v2" ? { timestamp: new Date(item.started_at).toISOString() } : { timestamp: Math.floor(item.started_at / 1000) }),
  };
}

export class StripeSink implements Sink {
  readonly name = "stripe" as const;
  readonly concurrency: number;
  private readonly api: StripeMeterApi;
  private readonly clock: () => number;
  private client?: { key: string; stripe: Stripe };
  private session?: { token: string; refreshAt: number };

  constructor(private readonly options: StripeSinkOptions) {
    this.api = options.api ?? "v2";
    this.clock = options.clock ?? Date.now;
    this.concurrency = Math.max(1, options.concurrency ?? (this.api === "v2" ? 2 : 4));
  }

  /** The current session token: a secret, for the logger's redaction. */
  knownSecrets(): string[] {
    return this.session ? [this.session.token] : [];
  }

  async ready(): Promise<{ ok: true } | { ok: false; reason: string }> {
    const key = await this.options.apiKey();
    if ("reason" in key) return { ok: false, reason: key.reason };
    if (this.client?.key !== key.value) {
      this.client = { key: key.value, stripe: createStripeClient(key.value, this.options.apiBase) };
      this.session = undefined;
    }
    return { ok: true };
  }

  /** What Stripe would refuse, checked without trusting the item's types (a corrupt item is refused, not thrown on). */
  check(item: LedgerItem, now: number): string | undefined {
    const customer: unknown = item.stripe_customer_id;
    if (typeof customer !== "string" || customer.length === 0) return "the item has no stripe_customer_id (the customer has no Stripe customer to bill)";
    const cost: unknown = item.cost_micros;
    if (typeof cost !== "number" || !Number.isSafeInteger(cost) || cost <= 0) return `cost_micros must be a positive whole number, got ${describeValue(cost)}`;
    if (cost >= STRIPE_MAX_VALUE_EXCLUSIVE) {
      return `cost_micros ${cost} has more than the 15 digits Stripe accepts in a meter event value (API 2026-04-22.dahlia); bill it by hand (an invoice item) and mark it delivered`;
    }
    const started: unknown = item.started_at;
    if (typeof started !== "number" || !Number.isSafeInteger(started) || Number.isNaN(new Date(started).getTime())) return `started_at must be a time in whole ms since the epoch, got ${describeValue(started)}`;
    if (started < now - STRIPE_MAX_EVENT_AGE_MS + AGE_MARGIN_MS) {
      return `started_at ${new Date(started).toISOString()} is older than the 35 days Stripe accepts meter events for; bill it by hand (an invoice item) and mark it delivered`;
    }
    if (started > now + STRIPE_MAX_EVENT_LEAD_MS) return `started_at ${new Date(started).toISOString()} is more than 5 minutes in the future`;
    if (typeof item.transaction_id !== "string" || item.transaction_id.length > 100) return "the transaction id is longer than the 100 characters Stripe takes as an identifier";
    return undefined;
  }

  batches(items: LedgerItem[]): LedgerItem[][] {
    // v1 takes one event per call; the forwarder runs those calls `concurrency` at a time.
    const max = this.api === "v1" ? 1 : Math.min(STRIPE_STREAM_MAX_EVENTS, Math.max(1, this.options.maxBatchEvents ?? STRIPE_STREAM_MAX_EVENTS));
    return splitBatches(items, max, Number.POSITIVE_INFINITY, () => 0);
  }

  async send(batch: LedgerItem[], timeoutMs: number): Promise<BatchOutcome> {
    const stripe = this.client?.stripe;
    if (!stripe) return { kind: "unavailable", reason: "the Stripe API key is not known yet" };
    // The SDK bounds each attempt, but re-tries a reset connection once even with retries off (cjs/RequestSender.js
    // `_shouldRetry`, stripe-node#1040): the whole call is bounded here. A call still running past the bound may
    // yet reach Stripe; the item stays pending and its identifier makes the re-send harmless.
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<BatchOutcome>((resolve) => {
      timer = setTimeout(() => resolve({ kind: "unavailable", reason: `Stripe: no answer within ${timeoutMs} ms` }), timeoutMs);
    });
    try {
      return await Promise.race([this.sendNow(stripe, batch, timeoutMs), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  private async sendNow(stripe: Stripe, batch: LedgerItem[], timeoutMs: number): Promise<BatchOutcome> {
    const deadline = this.clock() + timeoutMs;
    try {
      if (this.api === "v1") {
        const item = batch[0];
        await stripe.billing.meterEvents.create(meterEventFor(item, "v1") as Stripe.Billing.MeterEventCreateParams, { timeout: timeoutMs });
        return { kind: "delivered" };
      }
      const events = batch.map((item) => meterEventFor(item, "v2") as StreamEvent);
      for (let attempt = 0; ; attempt++) {
        const token = await this.sessionToken(stripe, deadline);
        const remaining = deadline - this.clock();
        if (remaining <= 0) return { kind: "unavailable", reason: "Stripe: no time left to send after creating a meter event session" };
        try {
          await stripe.v2.billing.meterEventStream.create({ events }, { apiKey: token, timeout: remaining });
          return { kind: "delivered" };
        } catch (err) {
          // An expired (or revoked) session token: get a new session once, then try again.
          if (statusOf(err) === 401 && attempt === 0) {
            this.session = undefined;
            continue;
          }
          throw err;
        }
      }
    } catch (err) {
      return outcomeOfStripeError(err, this.clock(), batch);
    }
  }

  /** A cached meter event session token, created (with the secret key) when none is valid for another minute. */
  private async sessionToken(stripe: Stripe, deadline: number): Promise<string> {
    const now = this.clock();
    if (this.session && now < this.session.refreshAt) return this.session.token;
    const session = await stripe.v2.billing.meterEventSession.create({}, { timeout: Math.max(1, deadline - now) });
    const expiresAt = Date.parse(session.expires_at);
    // Tokens are valid for 15 minutes (MeterEventSession.d.ts); an unreadable expiry is taken as that.
    const refreshAt = (Number.isNaN(expiresAt) ? now + 15 * 60_000 : expiresAt) - SESSION_REFRESH_MARGIN_MS;
    this.session = { token: session.authentication_token, refreshAt };
    return session.authentication_token;
  }
}

/**
 * The SDK client: no SDK-level retries (the forwarder retries with its own back-off, and the identifier makes a
 * retry harmless), no telemetry header, and `host`/`port`/`protocol` from `apiBase` when given.
 */
export function createStripeClient(apiKey: string, apiBase?: string): Stripe {
  const config: Stripe.StripeConfig = { maxNetworkRetries: 0, telemetry: false, appInfo: { name: "metered-ai-api-usage-forwarder" } };
  if (apiBase) {
    const base = new URL(apiBase);
    const protocol = base.protocol === "http:" ? "http" : "https";
    config.host = base.hostname;
    config.port = base.port || (protocol === "http" ? "80" : "443");
    config.protocol = protocol;
  }
  return new Stripe(apiKey, config);
}

function statusOf(err: unknown): number | undefined {
  const status = (err as { statusCode?: unknown } | null)?.statusCode;
  return typeof status === "number" ? status : undefined;
}

/** Whether Stripe refused an event because it already has its identifier. */
export function isDuplicateIdentifier(err: unknown): boolean {
  const e = err as { statusCode?: number; code?: string; message?: string } | null;
  if (!e || e.statusCode !== 400) return false;
  return e.code === "duplicate_meter_event" || /already exists with identifier/i.test(e.message ?? "");
}

/** The identifier a duplicate refusal names ("An event already exists with identifier X."), if it names one. */
export function duplicateIdentifierOf(err: unknown): string | undefined {
  const match = /already exists with identifier\s+['"`]?([^\s'"`]+?)['"`]?\.?\s*$/i.exec((err as { message?: string } | null)?.message ?? "");
  return match?.[1];
}

/**
 * What a Stripe SDK error means for `batch` (see `outcomeOfStatus`); never echoes a request body. A duplicate
 * identifier means delivered only for a batch of one whose identifier it names (or that it names none for).
 */
export function outcomeOfStripeError(err: unknown, now: number, batch: readonly LedgerItem[]): BatchOutcome {
  if (isDuplicateIdentifier(err)) {
    const named = duplicateIdentifierOf(err);
    if (batch.length === 1 && (named === undefined || named === batch[0].transaction_id)) return { kind: "delivered" };
    return { kind: "refused", reason: `Stripe answered HTTP 400: an event already exists with identifier ${named ?? "(not named)"}` };
  }
  const status = statusOf(err);
  if (status === undefined) {
    const { name, message } = describeError(err);
    return { kind: "unavailable", reason: `Stripe unreachable: ${name}: ${message}` };
  }
  const e = err as { code?: string; rawType?: string; type?: string; message?: string; headers?: Record<string, string | string[]> };
  const reason = `Stripe answered HTTP ${status}${e.code ? ` ${e.code}` : e.rawType ? ` ${e.rawType}` : ""}: ${(e.message ?? "").slice(0, 300)}`;
  return outcomeOfStatus(status, reason, e.headers?.["retry-after"], now);
}

function describeValue(value: unknown): string {
  if (typeof value === "bigint") return `${value} (a number beyond 2^53)`;
  if (typeof value === "string") return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value);
  return value === null ? "null" : typeof value === "number" ? String(value) : typeof value;
}
