/**
 * `POST /stripe/webhook`: Stripe's signed events → prepaid credit. A paid Checkout Session in payment mode (or a paid
 * invoice marked `metadata.purpose = "credits"`) adds its amount to the balance of the customer whose Stripe
 * customer id it names, once.
 *
 * What Stripe expects of an endpoint (https://docs.stripe.com/webhooks): a 2xx for every event it accepted,
 * including events it chooses to ignore; any other answer is retried, in live mode for up to three days. So a bad
 * signature answers 400 (no retry could succeed, and a forger learns nothing), a fault on our side answers 500
 * (Stripe retries; the credit id makes the retry safe), and everything else answers 200 with why it was or was not
 * credited.
 */
import type { CustomerStore } from "../shared/customer-port";
import { microsPerMinorUnit } from "../shared/currency";
import type { Plan } from "./config";
import { ApiError, toErrorResponse } from "./errors";
import { describeError, type Logger } from "./logger";
import type { ProxyResponse } from "./responder";

type StripeModule = typeof import("stripe");

/**
 * Stripe's own default age limit for a signature's timestamp, in seconds: `DEFAULT_TOLERANCE: 300`
 * (node_modules/stripe/cjs/Webhooks.js line 15, stripe-node 23.1.0; https://docs.stripe.com/webhooks/signature).
 * Only age is checked, as the SDK does: a timestamp ahead of our clock passes.
 */
export const DEFAULT_WEBHOOK_TOLERANCE_SECONDS = 300;

export interface StripeWebhookDeps {
  /** Where credits go. Absent (no customers table): crediting events answer 500, others 200 as usual. */
  store?: Pick<CustomerStore, "findByStripeCustomer" | "credit">;
  /** The plans, for the currency a customer's balance is kept in (`plan.pricing.currency`). */
  plans: Record<string, Plan>;
  /** The endpoint's signing secret (`whsec_…`). Absent: every event answers 500 until it is configured. */
  secret?: string;
  log: Logger;
  /** Milliseconds since the epoch; the signature's timestamp is checked against it. */
  clock: () => number;
  /** How old a signature may be, in seconds. @default 300 */
  toleranceSeconds?: number;
}

/** Why an event was not credited (the `reason` of a 200 answer), or `credited` when it was. */
export type WebhookOutcome =
  | "credited"
  | "ignored_event_type"
  | "not_payment_mode"
  | "not_paid"
  | "not_credit_invoice"
  | "no_customer"
  | "unknown_customer"
  | "currency_mismatch"
  | "invalid_amount"
  | "missing_object_id"
  | "duplicate";

/** The `Stripe-Signature` header is missing, does not match the body under our secret, or is too old. */
export class InvalidSignatureError extends ApiError {
  constructor() {
    // One message for every cause: telling a forger which check failed helps only the forger.
    super(400, "The Stripe-Signature header is missing, invalid or too old for this body.", "invalid_request_error", "invalid_signature");
  }
}

/** Signed by our secret but not a JSON Stripe event: nothing to credit, and a retry would not change that. */
export class InvalidWebhookPayloadError extends ApiError {
  constructor() {
    super(400, "The webhook body is not a Stripe event.", "invalid_request_error", "invalid_payload");
  }
}

/** The deployment has no signing secret or no customers table: Stripe keeps retrying until the operator fixes it. */
export class WebhookNotConfiguredError extends ApiError {
  constructor(missing: "signing secret" | "customers table") {
    super(500, `The Stripe webhook is not configured on this deployment (no ${missing}).`, "server_error", "webhook_not_configured");
  }
}

/** The customers table did not answer: Stripe retries the event, and the credit id keeps the retry from crediting twice. */
export class CreditStoreFailedError extends ApiError {
  constructor() {
    super(500, "The credit could not be recorded; Stripe will retry this event.", "server_error", "credit_store_unavailable");
  }
}

/** The fields of a crediting event this handler reads, as it found them. */
interface Purchase {
  /** Checkout Session id (`cs_…`) or invoice id (`in_…`): the credit's idempotency key. */
  objectId: string;
  source: "stripe_checkout" | "stripe_invoice";
  stripeCustomerId?: string;
  currency?: string;
  /** In the currency's minor unit, as Stripe's API writes amounts. */
  amount: unknown;
}

interface LogFields {
  event_id?: string;
  event_type?: string;
  object_id?: string;
  stripe_customer_id?: string;
  customer_id?: string;
  currency?: string;
  amount?: unknown;
  credited_micros: number;
  reason: string;
  status?: number;
  balance_micros?: number;
  plan_currency?: string;
  error?: ReturnType<typeof describeError>;
}

/**
 * Verifies a Stripe webhook delivery and credits the purchase it reports.
 *
 * @param body the request body exactly as received: Stripe signs the bytes, so a re-encoded body never verifies.
 * @param headers request headers with lower-case names (`stripe-signature`).
 * @returns 200 `{"received": true, "credited": boolean, "reason"?: string}`; 400 `invalid_signature` /
 *   `invalid_payload`; 500 `webhook_not_configured` / `credit_store_unavailable` (Stripe retries non-2xx).
 */
export async function handleStripeWebhook(body: Buffer, headers: Record<string, string>, deps: StripeWebhookDeps): Promise<ProxyResponse> {
  // One `stripe_webhook` line per call, whatever happens. Never the body, the signature header or the secret.
  const fields: LogFields = { credited_micros: 0, reason: "" };
  const finish = (response: ProxyResponse, level: "info" | "warn" | "error" = "info"): ProxyResponse => {
    deps.log[level]("stripe_webhook", { ...fields, status: response.statusCode });
    return response;
  };
  const fail = (err: unknown, reason: string, level: "warn" | "error"): ProxyResponse => {
    fields.reason = reason;
    return finish(errorResponse(err), level);
  };

  if (!deps.secret) return fail(new WebhookNotConfiguredError("signing secret"), "no_signing_secret", "error");
  const signature = headerValue(headers, "stripe-signature");
  if (!signature) return fail(new InvalidSignatureError(), "missing_signature", "warn");

  let webhooks: StripeModule["webhooks"];
  try {
    // Stripe's SDK, required here and not at module scope: the chat path's cold start never loads it.
    ({ webhooks } = require("stripe") as StripeModule);
  } catch (err) {
    fields.error = describeError(err);
    return fail(err, "sdk_unavailable", "error");
  }
  let event: unknown;
  try {
    // The raw bytes, our clock (`receivedAt`, ms) and the tolerance; no API key and no network call are involved.
    event = webhooks.constructEvent(body, signature, deps.secret, deps.toleranceSeconds ?? DEFAULT_WEBHOOK_TOLERANCE_SECONDS, undefined, deps.clock());
  } catch (err) {
    if (isSignatureError(err)) return fail(new InvalidSignatureError(), signatureFailure(err), "warn");
    // Verified, so the bytes are ours to trust, but they are not JSON (or are a "thin" v2 notification).
    return fail(new InvalidWebhookPayloadError(), "invalid_payload", "warn");
  }
  if (!isRecord(event) || typeof event.id !== "string" || typeof event.type !== "string") {
    return fail(new InvalidWebhookPayloadError(), "invalid_payload", "warn");
  }
  fields.event_id = event.id;
  fields.event_type = event.type;

  const data = isRecord(event.data) ? event.data : {};
  const object = isRecord(data.object) ? data.object : {};
  const found = readPurchase(event.type, object);
  if (typeof found === "string") return finish(received(fields, found), found === "missing_object_id" ? "warn" : "info");
  fields.object_id = found.objectId;
  fields.stripe_customer_id = found.stripeCustomerId;
  fields.currency = found.currency;
  fields.amount = found.amount;
  if (!found.stripeCustomerId) return finish(received(fields, "no_customer"));

  if (!deps.store) return fail(new WebhookNotConfiguredError("customers table"), "no_customers_table", "error");
  try {
    const customer = await deps.store.findByStripeCustomer(found.stripeCustomerId);
    if (!customer) return finish(received(fields, "unknown_customer"), "warn");
    fields.customer_id = customer.customerId;

    // The balance is kept in the plan's currency; a payment in any other currency has no exact conversion here.
    const planCurrency = deps.plans[customer.plan]?.pricing?.currency?.toLowerCase();
    fields.plan_currency = planCurrency;
    if (!planCurrency || !found.currency || found.currency.toLowerCase() !== planCurrency) {
      return finish(received(fields, "currency_mismatch"), "error");
    }
    const micros = creditMicros(found.amount, planCurrency);
    if (micros === undefined) return finish(received(fields, "invalid_amount"), "warn");

    const result = await deps.store.credit({
      customerId: customer.customerId,
      currency: planCurrency,
      // The Session (or invoice), not the event: `completed` and `async_payment_succeeded` of one Session, and
      // every redelivery of either, are one credit.
      creditId: `stripe:${found.objectId}`,
      micros,
      source: found.source,
      now: deps.clock(),
    });
    fields.balance_micros = result.balanceMicros;
    if (!result.applied) {
      // `currency_mismatch` here: the account was first written in another currency (the plan's changed since).
      return finish(received(fields, result.reason === "duplicate" ? "duplicate" : "currency_mismatch"), result.reason === "duplicate" ? "info" : "error");
    }
    fields.credited_micros = micros;
    return finish(received(fields, "credited"));
  } catch (err) {
    fields.error = describeError(err);
    return fail(new CreditStoreFailedError(), "store_failed", "error");
  }
}

/** What a crediting event bought, or why the event credits nothing. */
function readPurchase(type: string, object: Record<string, unknown>): Purchase | WebhookOutcome {
  switch (type) {
    // `async_payment_succeeded` follows a `completed` that was still `unpaid` (bank debits, vouchers), see
    // https://docs.stripe.com/checkout/fulfillment.
    case "checkout.session.completed":
    case "checkout.session.async_payment_succeeded":
      // `subscription` and `setup` Sessions sell something else; `payment` is a one-time purchase.
      if (object.mode !== "payment") return "not_payment_mode";
      if (object.payment_status !== "paid") return "not_paid";
      if (typeof object.id !== "string" || !object.id) return "missing_object_id";
      return { objectId: object.id, source: "stripe_checkout", stripeCustomerId: customerId(object.customer), currency: stringOrUndefined(object.currency), amount: object.amount_total };
    case "invoice.paid": {
      // Subscription and metered invoices are paid too: only the ones the operator marked as credit packs count.
      const metadata = isRecord(object.metadata) ? object.metadata : {};
      if (metadata.purpose !== "credits") return "not_credit_invoice";
      if (typeof object.id !== "string" || !object.id) return "missing_object_id";
      return { objectId: object.id, source: "stripe_invoice", stripeCustomerId: customerId(object.customer), currency: stringOrUndefined(object.currency), amount: object.amount_paid };
    }
    default:
      return "ignored_event_type";
  }
}

/** `amount` Stripe minor units in micro-units, or undefined when it is not a positive integer that stays exact. */
function creditMicros(amount: unknown, currency: string): number | undefined {
  if (typeof amount !== "number" || !Number.isSafeInteger(amount) || amount <= 0) return undefined;
  const micros = amount * microsPerMinorUnit(currency);
  return Number.isSafeInteger(micros) ? micros : undefined;
}

/** `customer` is an id, or the Customer object when the event was built with it expanded. */
function customerId(value: unknown): string | undefined {
  if (typeof value === "string" && value) return value;
  if (isRecord(value) && typeof value.id === "string" && value.id) return value.id;
  return undefined;
}

function received(fields: LogFields, outcome: WebhookOutcome): ProxyResponse {
  fields.reason = outcome;
  const credited = outcome === "credited";
  return json(200, credited ? { received: true, credited: true } : { received: true, credited: false, reason: outcome });
}

/** An `ApiError` in OpenAI's shape; anything else as the 500 that reveals nothing (`toErrorResponse`). */
function errorResponse(err: unknown): ProxyResponse {
  const { status, body, headers } = toErrorResponse(err);
  return { statusCode: status, headers: { "Content-Type": "application/json", ...headers }, body: JSON.stringify(body) };
}

function json(status: number, body: unknown): ProxyResponse {
  return { statusCode: status, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
}

/** The SDK's verification failures (bad or missing signature, stale timestamp, empty body). */
function isSignatureError(err: unknown): err is Error {
  return err instanceof Error && (err as { type?: unknown }).type === "StripeSignatureVerificationError";
}

/** The log's reason for a verification failure, from the SDK's message (never logged itself: it may quote the header). */
function signatureFailure(err: Error): string {
  return /tolerance/i.test(err.message) ? "stale_timestamp" : "bad_signature";
}

/** Header lookup that also accepts a name in any case, for callers that did not lower-case them. */
function headerValue(headers: Record<string, string>, name: string): string | undefined {
  const direct = headers[name];
  if (direct !== undefined) return direct;
  for (const [key, value] of Object.entries(headers)) if (key.toLowerCase() === name) return value;
  return undefined;
}

function stringOrUndefined(value: unknown): string | undefined {
  return typeof value === "string" && value ? value : undefined;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return !!value && typeof value === "object" && !Array.isArray(value);
}
