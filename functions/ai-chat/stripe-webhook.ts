/**
 * `POST /stripe/webhook`: Stripe's signed events → prepaid credit. A paid Checkout Session in payment mode or a paid
 * invoice, either marked `metadata.purpose = "credits"`, adds its amount to the balance of the customer whose Stripe
 * customer id it names, once. Refunds and disputes (`charge.refunded`, `charge.dispute.created`) are not debited:
 * they are logged as errors (`stripe_credit_refunded` / `stripe_credit_disputed`) for the operator to debit by hand
 * (`npm run credits -- add <customer> -<amount>`).
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
  | "not_credit_session"
  | "refund_not_debited"
  | "dispute_not_debited"
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

/**
 * The payment's currency is not the one the customer's balance is kept in (and no conversion Stripe reported
 * applies). The money was taken, so this must not look like an accepted event: a 500 keeps the delivery failing —
 * Stripe "automatically resends the undelivered events to your endpoint for up to three days"
 * (https://docs.stripe.com/webhooks/process-undelivered-events; https://docs.stripe.com/webhooks#automatic-retries)
 * and the Dashboard lists it as failed — until the operator fixes the plan or account and the retry credits it, or
 * credits it by hand.
 */
export class CreditCurrencyMismatchError extends ApiError {
  constructor() {
    super(500, "The payment's currency is not the currency of this customer's prepaid balance; the service's operator has to resolve it.", "server_error", "currency_mismatch");
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
  /**
   * Adaptive Pricing on Checkout Sessions created before 2025-03-31 (and under API versions before 2025-09-30, such as
   * the 2024-04-10 the webhook endpoint pins): `currency`/`amount_total` are what the customer paid in their own
   * currency, and `currency_conversion.{source_currency, amount_total}` the same total in the currency the Session
   * was created in (https://docs.stripe.com/changelog/basil/2025-03-31/add_presentment_details;
   * https://docs.stripe.com/api/checkout/sessions/object#checkout_session_object-currency_conversion).
   */
  conversion?: { currency?: string; amount: unknown };
}

/** A refund or dispute of a charge: logged for the operator, never debited here. */
interface Reversal {
  kind: "refund" | "dispute";
  /** `ch_…` (refund) or `dp_…` (dispute). */
  objectId?: string;
  chargeId?: string;
  paymentIntentId?: string;
  stripeCustomerId?: string;
  currency?: string;
  /** Minor units: the charge's total refunded so far (refund), or the disputed amount. */
  amount: unknown;
  /** `metadata.purpose` of the charge, when it carries one (`payment_intent_data[metadata][purpose]=credits`). */
  purpose?: string;
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
  /** The Session's `currency_conversion` applied (Adaptive Pricing): its source currency and amount were credited. */
  converted_from?: string;
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
  const reversal = readReversal(event.type, object);
  if (reversal) return finish(await reportReversal(reversal, fields, deps));
  const found = readPurchase(event.type, object);
  if (typeof found === "string") return finish(received(fields, found), found === "missing_object_id" ? "warn" : "info");
  fields.object_id = found.objectId;
  fields.stripe_customer_id = found.stripeCustomerId;
  fields.currency = found.currency;
  fields.amount = found.amount;
  if (!found.stripeCustomerId) return finish(received(fields, "no_customer"));

  if (!deps.store) return fail(new WebhookNotConfiguredError("customers table"), "no_customers_table", "error");
  // A payment that cannot be credited in the balance's currency: an error line of its own (alarmable), and a 500.
  const currencyMismatch = (): ProxyResponse => {
    deps.log.error("stripe_credit_currency_mismatch", {
      event_id: fields.event_id,
      object_id: fields.object_id,
      stripe_customer_id: fields.stripe_customer_id,
      customer_id: fields.customer_id,
      currency: fields.currency,
      amount: fields.amount,
      plan_currency: fields.plan_currency,
    });
    return fail(new CreditCurrencyMismatchError(), "currency_mismatch", "error");
  };
  try {
    const customer = await deps.store.findByStripeCustomer(found.stripeCustomerId);
    if (!customer) return finish(received(fields, "unknown_customer"), "warn");
    fields.customer_id = customer.customerId;

    // The balance is kept in the plan's currency; a payment in any other currency has no exact conversion here,
    // except the one Stripe itself made and reported (Adaptive Pricing's `currency_conversion`).
    const planCurrency = deps.plans[customer.plan]?.pricing?.currency?.toLowerCase();
    fields.plan_currency = planCurrency;
    let amount = found.amount;
    if (planCurrency && found.currency?.toLowerCase() !== planCurrency && found.conversion?.currency?.toLowerCase() === planCurrency) {
      fields.converted_from = found.currency;
      amount = found.conversion.amount;
      fields.amount = amount;
    } else if (!planCurrency || !found.currency || found.currency.toLowerCase() !== planCurrency) {
      return currencyMismatch();
    }
    const micros = creditMicros(amount, planCurrency);
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
      return result.reason === "duplicate" ? finish(received(fields, "duplicate")) : currencyMismatch();
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
      // A payment-mode Session may sell anything else the operator sells through Checkout (a support pack, a setup
      // fee, a postpaid bill settled by hand): only the ones marked as credit purchases count, as for invoices.
      if (!isRecord(object.metadata) || object.metadata.purpose !== "credits") return "not_credit_session";
      if (object.payment_status !== "paid") return "not_paid";
      if (typeof object.id !== "string" || !object.id) return "missing_object_id";
      const conversion = isRecord(object.currency_conversion)
        ? { currency: stringOrUndefined(object.currency_conversion.source_currency), amount: object.currency_conversion.amount_total }
        : undefined;
      return {
        objectId: object.id,
        source: "stripe_checkout",
        stripeCustomerId: customerId(object.customer),
        currency: stringOrUndefined(object.currency),
        amount: object.amount_total,
        ...(conversion ? { conversion } : {}),
      };
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

/** A refund or a dispute of a charge (the two events subscribed for them), or undefined for any other event. */
function readReversal(type: string, object: Record<string, unknown>): Reversal | undefined {
  const metadata = isRecord(object.metadata) ? object.metadata : {};
  const purpose = stringOrUndefined(metadata.purpose);
  switch (type) {
    case "charge.refunded":
      // `amount_refunded` is the charge's total refunded so far: each partial refund sends the event again.
      return {
        kind: "refund",
        objectId: stringOrUndefined(object.id),
        chargeId: stringOrUndefined(object.id),
        paymentIntentId: customerId(object.payment_intent),
        stripeCustomerId: customerId(object.customer),
        currency: stringOrUndefined(object.currency),
        amount: object.amount_refunded,
        ...(purpose ? { purpose } : {}),
      };
    case "charge.dispute.created": {
      // A Dispute names its charge, not the customer (unless the event was built with `charge` expanded).
      const charge = isRecord(object.charge) ? object.charge : undefined;
      return {
        kind: "dispute",
        objectId: stringOrUndefined(object.id),
        chargeId: customerId(object.charge),
        paymentIntentId: customerId(object.payment_intent),
        stripeCustomerId: charge ? customerId(charge.customer) : undefined,
        currency: stringOrUndefined(object.currency),
        amount: object.amount,
        ...(purpose ? { purpose } : {}),
      };
    }
    default:
      return undefined;
  }
}

/**
 * Logs a refund or dispute as an error line (`stripe_credit_refunded` / `stripe_credit_disputed`) with what the
 * operator needs to debit by hand: the Stripe customer, our customer when the table knows it, the charge and the
 * amount. Credit may already be spent, and a debit cannot make a balance negative, so this service does not guess
 * what to take back. Always 200: a retry would change nothing.
 */
async function reportReversal(reversal: Reversal, fields: LogFields, deps: StripeWebhookDeps): Promise<ProxyResponse> {
  fields.object_id = reversal.objectId;
  fields.stripe_customer_id = reversal.stripeCustomerId;
  fields.currency = reversal.currency;
  fields.amount = reversal.amount;
  let customer: string | undefined;
  if (reversal.stripeCustomerId && deps.store) {
    try {
      customer = (await deps.store.findByStripeCustomer(reversal.stripeCustomerId))?.customerId;
    } catch (err) {
      // Only for the log line: the operator can still find the customer from the Stripe customer id.
      fields.error = describeError(err);
    }
  }
  fields.customer_id = customer;
  const minorUnits = typeof reversal.amount === "number" && reversal.currency ? reversal.amount : undefined;
  deps.log.error(reversal.kind === "refund" ? "stripe_credit_refunded" : "stripe_credit_disputed", {
    event_id: fields.event_id,
    object_id: reversal.objectId,
    charge_id: reversal.chargeId,
    payment_intent_id: reversal.paymentIntentId,
    stripe_customer_id: reversal.stripeCustomerId,
    customer_id: customer,
    currency: reversal.currency,
    amount: reversal.amount,
    ...(minorUnits !== undefined && Number.isSafeInteger(minorUnits) ? { amount_micros: minorUnits * microsPerMinorUnit(reversal.currency!) } : {}),
    purpose: reversal.purpose,
    action: "not debited: debit it by hand with `npm run credits -- add <customer> -<amount>` if it was a credit purchase",
  });
  return received(fields, reversal.kind === "refund" ? "refund_not_debited" : "dispute_not_debited");
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
