/**
 * The stack config's shape, defaults and validation, as pure functions of plain values.
 *
 * The Pulumi program (`infra/config.ts`) and the local stack (`scripts/start.ts`) both read the same stack file
 * through this module, so a plan or customer means the same thing locally and on AWS. Every rule that AWS would
 * only enforce at deploy time (quota offsets, the function's 4 KB environment, timeouts that must fit API Gateway's
 * 29 s) is checked here, so `pulumi preview` fails with a message naming the key instead.
 */

import type { CustomerStatus } from "../functions/shared/customer-schema";
import type { StripeBilling } from "../functions/shared/ledger-schema";
import { parseCurrency, parsePriceTable, PriceError, type ModelPrice } from "../functions/shared/pricing";
import { QUOTA_PERIODS, type QuotaPeriod } from "../functions/shared/quota-period";
import { environmentBytes, LAMBDA_ENVIRONMENT_LIMIT_BYTES, plannedEnvironment } from "./function-env";

export const PROJECT = "metered-ai-api";
export { QUOTA_PERIODS, type QuotaPeriod };
/** Retention values CloudWatch Logs accepts. */
export const LOG_RETENTION_DAYS = [1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653];

/**
 * Highest quota offset API Gateway accepts per period: "0 for DAY, 0-6 for WEEK, 0-27 for MONTH"
 * (API reference, QuotaSettings.offset: https://docs.aws.amazon.com/apigateway/latest/api/API_QuotaSettings.html).
 */
export const MAX_QUOTA_OFFSET: Record<QuotaPeriod, number> = { DAY: 0, WEEK: 6, MONTH: 27 };

/**
 * API Gateway's limits for a streamed (`responseTransferMode: STREAM`) Lambda integration: at most 900,000 ms in all
 * (@pulumi/aws 7.48 apigateway/integration.d.ts: "The maximum value is … 900,000 when `responseTransferMode` is
 * `STREAM`"), and a stream that sends nothing for 5 minutes is cut on Regional endpoints
 * (https://docs.aws.amazon.com/apigateway/latest/developerguide/response-transfer-mode.html). Every route streams, so
 * the old 29 s integration limit no longer applies; a buffered answer sends nothing until it is complete, so its
 * deadline must fit the idle timeout.
 */
export const STREAM_MAX_DURATION_MS = 900_000;
export const STREAM_IDLE_TIMEOUT_MS = 300_000;
/**
 * Time kept free between the upstream deadline plus the metering bound and the 29 s limit: cold start, reading the
 * secrets from SSM on the first request, parsing and answering. Without it, a slow upstream answer ends as API
 * Gateway's own 504 (nothing metered, nothing logged by the function) instead of the function's 504.
 */
export const TIMEOUT_MARGIN_MS = 2_000;
/** Largest request body: 4 MiB, because `binaryMediaTypes: ["*\/*"]` base64-encodes it (x 4/3) into Lambda's 6 MB event. */
export const MAX_REQUEST_BYTES_LIMIT = 4 * 1024 * 1024;

/**
 * The keys a user must set before the first `pulumi up`: every other key of `Pulumi.yaml` has a `default:`, so the
 * CLI's missing-config check passes once these (and the Stripe provider's `stripe:apiKey`) are set.
 */
export const REQUIRED_CONFIG_KEYS = ["upstreamApiKey", "moesifApplicationId", "moesifStripeWebhookUrl", "plans"] as const;

const PLAN_FIELDS = ["rateLimit", "burstLimit", "quota", "models", "prices", "currency", "billing", "maxOutputTokens"];
const CUSTOMER_FIELDS = ["plan", "stripeCustomerId", "status"];
/** How a plan is paid for. `postpaid`: usage is billed afterwards (Moesif or Stripe meters). `prepaid`: from a balance of credits bought up front. */
export const BILLING_MODES = ["postpaid", "prepaid"] as const;
export type BillingMode = (typeof BILLING_MODES)[number];
export const CUSTOMER_STATUSES: readonly CustomerStatus[] = ["active", "suspended"];
/** Highest `maxOutputTokens` a plan may set: above any model's output limit today, low enough to keep a reservation meaningful. */
export const MAX_OUTPUT_TOKENS_LIMIT = 1_000_000;
const QUOTA_FIELDS = ["limit", "period", "offset"];
const PRICE_SHAPE_HINT =
  "prices are per model, per 1,000,000 tokens, as providers publish them: prices: {gpt-4o-mini: {input: 0.15, cachedInput: 0.075, output: 0.60}} (and currency: usd on the plan)";

export interface PlanConfig {
  /** Steady-state requests per second per key (API Gateway throttle). */
  rateLimit: number;
  /** Bucket size: requests allowed at once above the rate. */
  burstLimit: number;
  /** Requests per period per key. Absent: no quota. */
  quota?: { limit: number; period: QuotaPeriod; offset: number };
  /** Models the plan may call. Absent: every model, or exactly the priced models when the plan bills. */
  models?: string[];
  /** ISO 4217 code, lower case; set (default `usd`) exactly when `prices` is. */
  currency?: string;
  /** Model → price in micro-units per 1,000,000 tokens. Present: the plan bills, and only priced models may be called. */
  prices?: Record<string, ModelPrice>;
  /**
   * `postpaid` (the default): served, then billed. `prepaid`: each request first reserves the most it can cost from
   * the customer's balance and is refused (429 insufficient_quota) when the balance cannot cover it. Prepaid needs prices.
   */
  billing: BillingMode;
  /**
   * Most output tokens one choice may produce (the function caps the request's max_tokens to it, and sends it when the
   * caller sent none). Absent: the function's default (4096) for prepaid plans, no cap for postpaid ones.
   */
  maxOutputTokens?: number;
}

export interface CustomerConfig {
  plan: string;
  /** Stripe customer id (`cus_…`): Moesif bills the company with this id; the Stripe webhook credits its payments to this customer. */
  stripeCustomerId?: string;
  /** `suspended` keeps the key (and the customer's history) but answers 403; absent means `active`. */
  status?: CustomerStatus;
}

export interface StackConfig {
  stageName: string;
  upstreamBaseUrl: string;
  moesifBaseUri: string;
  moesifStripeWebhookUrl?: string;
  plans: Record<string, PlanConfig>;
  customers: Record<string, CustomerConfig>;
  responseEnvelope: "none" | "request_payload";
  logBodies: boolean;
  /** Deadline of a buffered answer, and of a stream's first byte. */
  upstreamTimeoutMs: number;
  /** Longest pause allowed between two chunks of a streamed answer. */
  upstreamIdleTimeoutMs: number;
  meteringTimeoutMs: number;
  maxRequestBytes: number;
  lambdaMemoryMb: number;
  lambdaTimeoutSeconds: number;
  lambdaArchitecture: "arm64" | "x86_64";
  /** Retention of the function's, the authorizer's and the stage's access log groups. */
  logRetentionDays: number;
  /** Concurrency reserved for (and capping) the function; -1 leaves it unreserved. */
  reservedConcurrency: number;
  /** Stage-wide default method throttle: a ceiling for all callers together, above every plan's own limit. */
  stageThrottleRateLimit: number;
  stageThrottleBurstLimit: number;
  /** Whether this stack sets the region's API Gateway CloudWatch role (needed for access logs). */
  manageApiGatewayAccount: boolean;
  /**
   * Who reports usage to Stripe: `moesif` (Moesif's billing meter, the tutorial's route) or `meters` (the forwarder
   * sends Stripe Billing Meter events; `pulumi up` creates the meter and a metered price per currency). Never both.
   */
  stripeBilling: StripeBilling;
  /** DynamoDB deletion protection on the usage ledger (the billing record) and the customers table (prepaid balances): on, a destroy or a replacement fails. */
  ledgerDeletionProtection: boolean;
  /** Most time the ledger write may add to a request (then the direct Moesif send is the fallback). */
  ledgerTimeoutMs: number;
  /** Most time one customers-table call (key lookup, reservation, settlement, usage counters) may take. */
  customersTimeoutMs: number;
  /** How long the function caches an API key's customer item: how long a change to a customer takes to apply. */
  customerCacheTtlMs: number;
  /**
   * Concurrency reserved for (and capping) the usage forwarder; -1 (the default) leaves it unreserved. Unreserved by
   * default because reserving any fails `pulumi up` on accounts whose concurrency quota is still 10 or 50 ("decreases
   * account's UnreservedConcurrentExecution below its minimum value of [10]"); delivery does not need it (a throttled
   * forwarder only delays: the sweep delivers the backlog afterwards).
   */
  forwarderReservedConcurrency: number;
}

/** A stack config value that cannot be used. The message names the key, fully qualified. */
export class StackConfigError extends Error {
  constructor(key: string, problem: string) {
    super(`Invalid stack config "${PROJECT}:${key}": ${problem}`);
    this.name = "StackConfigError";
  }
}

export interface ParseOptions {
  /** Keys only a deployment needs (the Stripe webhook URL) are required when true. */
  forDeploy: boolean;
  /** Stack name: part of the SSM parameter names in the function's environment (its size is checked). @default "dev" */
  stack?: string;
}

/**
 * Validates raw config values (keys without the project prefix; objects already parsed) and applies defaults.
 * Throws `StackConfigError` naming the first bad key.
 */
export function parseStackConfig(values: Record<string, unknown>, options: ParseOptions): StackConfig {
  const plans = parsePlans(values.plans);
  const customers = parseCustomers(values.customers, plans);

  const stageName = optionalString(values, "stageName") ?? "beta";
  if (!/^[A-Za-z0-9_-]{1,128}$/.test(stageName)) throw new StackConfigError("stageName", "use letters, digits, '-' and '_' only");

  const webhook = optionalString(values, "moesifStripeWebhookUrl");
  if (options.forDeploy && !webhook) {
    throw new StackConfigError("moesifStripeWebhookUrl", "is required: copy it from Moesif's Stripe integration dialog");
  }
  if (webhook !== undefined) serviceUrl("moesifStripeWebhookUrl", webhook, { loopback: false });

  const envelope = optionalString(values, "responseEnvelope") ?? "none";
  if (envelope !== "none" && envelope !== "request_payload") {
    throw new StackConfigError("responseEnvelope", `must be "none" or "request_payload" (got "${envelope}")`);
  }

  const architecture = optionalString(values, "lambdaArchitecture") ?? "arm64";
  if (architecture !== "arm64" && architecture !== "x86_64") {
    throw new StackConfigError("lambdaArchitecture", `must be "arm64" or "x86_64" (got "${architecture}")`);
  }

  const logRetentionDays = integer(values, "logRetentionDays", 30, 1, 3653);
  if (!LOG_RETENTION_DAYS.includes(logRetentionDays)) {
    throw new StackConfigError("logRetentionDays", `must be one of ${LOG_RETENTION_DAYS.join(", ")}`);
  }

  const reservedConcurrency = integer(values, "reservedConcurrency", -1, -1, 100_000);
  if (reservedConcurrency === 0) {
    throw new StackConfigError("reservedConcurrency", "0 would stop every invocation; use -1 for unreserved or a positive limit");
  }

  const stageThrottleRateLimit = integer(values, "stageThrottleRateLimit", 10_000, 1, 1_000_000);
  const stageThrottleBurstLimit = integer(values, "stageThrottleBurstLimit", 5_000, 1, 1_000_000);
  for (const [name, plan] of Object.entries(plans)) {
    // A stage limit below a plan's would silently cap that plan; the stage limit is meant as a ceiling above all.
    if (plan.rateLimit > stageThrottleRateLimit) {
      throw new StackConfigError("stageThrottleRateLimit", `${stageThrottleRateLimit} is below plan "${name}"'s rateLimit ${plan.rateLimit}`);
    }
    if (plan.burstLimit > stageThrottleBurstLimit) {
      throw new StackConfigError("stageThrottleBurstLimit", `${stageThrottleBurstLimit} is below plan "${name}"'s burstLimit ${plan.burstLimit}`);
    }
  }

  const upstreamTimeoutMs = integer(values, "upstreamTimeoutMs", 120_000, 1, 900_000);
  const upstreamIdleTimeoutMs = integer(values, "upstreamIdleTimeoutMs", 60_000, 1_000, 900_000);
  const meteringTimeoutMs = integer(values, "meteringTimeoutMs", 1000, 1, 10_000);
  const ledgerTimeoutMs = integer(values, "ledgerTimeoutMs", 1000, 1, 10_000);
  const customersTimeoutMs = integer(values, "customersTimeoutMs", 1000, 1, 10_000);
  const customerCacheTtlMs = integer(values, "customerCacheTtlMs", 30_000, 1, 3_600_000);
  const lambdaTimeoutSeconds = integer(values, "lambdaTimeoutSeconds", 300, 1, 900);
  checkTimeouts(upstreamTimeoutMs, upstreamIdleTimeoutMs, ledgerTimeoutMs + meteringTimeoutMs + customersTimeoutMs, lambdaTimeoutSeconds);

  const stripeBilling = optionalString(values, "stripeBilling") ?? "moesif";
  if (stripeBilling !== "moesif" && stripeBilling !== "meters") {
    throw new StackConfigError("stripeBilling", `must be "moesif" (Moesif's billing meter reports to Stripe) or "meters" (Stripe Billing Meters, direct) (got "${stripeBilling}")`);
  }
  if (stripeBilling === "meters") requireStripeCustomers(plans, customers);

  const forwarderReservedConcurrency = integer(values, "forwarderReservedConcurrency", -1, -1, 1_000);
  if (forwarderReservedConcurrency === 0) {
    throw new StackConfigError("forwarderReservedConcurrency", "0 would stop every delivery; use -1 for unreserved or a positive limit");
  }

  const config: StackConfig = {
    stageName,
    upstreamBaseUrl: serviceUrl("upstreamBaseUrl", optionalString(values, "upstreamBaseUrl") ?? "https://api.openai.com/v1", { loopback: true }),
    moesifBaseUri: serviceUrl("moesifBaseUri", optionalString(values, "moesifBaseUri") ?? "https://api.moesif.net", { loopback: true }),
    moesifStripeWebhookUrl: webhook,
    plans,
    customers,
    responseEnvelope: envelope,
    logBodies: boolean(values, "logBodies", false),
    upstreamTimeoutMs,
    upstreamIdleTimeoutMs,
    meteringTimeoutMs,
    maxRequestBytes: integer(values, "maxRequestBytes", 1024 * 1024, 1, MAX_REQUEST_BYTES_LIMIT),
    lambdaMemoryMb: integer(values, "lambdaMemoryMb", 512, 128, 10_240),
    lambdaTimeoutSeconds,
    lambdaArchitecture: architecture,
    logRetentionDays,
    reservedConcurrency,
    stageThrottleRateLimit,
    stageThrottleBurstLimit,
    manageApiGatewayAccount: boolean(values, "manageApiGatewayAccount", true),
    stripeBilling,
    ledgerDeletionProtection: boolean(values, "ledgerDeletionProtection", true),
    ledgerTimeoutMs,
    customersTimeoutMs,
    customerCacheTtlMs,
    forwarderReservedConcurrency,
  };

  // Lambda measures the JSON-serialised variables map, so measure exactly that, on the map this stack will deploy
  // (generated names at their longest). Customers are not in it (they live in the customers table), so only the URLs
  // the stack config sets can make it grow; name the longest of them.
  const environment = plannedEnvironment(config, options.stack ?? "dev");
  const bytes = environmentBytes(environment);
  if (bytes > LAMBDA_ENVIRONMENT_LIMIT_BYTES) {
    const longest = config.upstreamBaseUrl.length >= config.moesifBaseUri.length ? "upstreamBaseUrl" : "moesifBaseUri";
    throw new StackConfigError(longest, `makes the function's environment ${bytes} bytes (JSON, as Lambda measures it); Lambda allows ${LAMBDA_ENVIRONMENT_LIMIT_BYTES}. Use a shorter URL`);
  }
  return config;
}

/**
 * Every deadline must leave the function time to answer and meter before anything cuts it off, or the caller gets a
 * gateway error with nothing metered. The metering bound is what runs after the answer, one after the other: the
 * customers-table write (customersTimeoutMs: a prepaid settlement or a postpaid customer's usage counters), the
 * ledger write (ledgerTimeoutMs) and, when that fails, the direct Moesif send that stands in for it
 * (meteringTimeoutMs). The function keeps back the same sum from its own deadline (functions/ai-chat/core.ts
 * meteringReserveMs). The customers-table calls before the upstream call (a key lookup the cache misses, a prepaid
 * reservation) are, like the first request's SSM read, normally milliseconds and left to the margin; should they take
 * longer, the function shortens the upstream's budget to its remaining time rather than overrun it.
 * - a buffered answer (upstreamTimeoutMs) plus the metering bound plus a margin must fit the function's timeout and
 *   API Gateway's 5-minute idle timeout (a buffered answer sends nothing until it is complete);
 * - the gap allowed between two streamed chunks (upstreamIdleTimeoutMs) must be shorter than that idle timeout;
 * - the function's timeout is also the integration's, at most 900 s for a streamed integration.
 */
function checkTimeouts(upstreamTimeoutMs: number, upstreamIdleTimeoutMs: number, meteringBoundMs: number, lambdaTimeoutSeconds: number): void {
  const needed = upstreamTimeoutMs + meteringBoundMs + TIMEOUT_MARGIN_MS;
  const fits = (limit: number, what: string) => {
    if (needed > limit) {
      throw new StackConfigError(
        "upstreamTimeoutMs",
        `${upstreamTimeoutMs} + customersTimeoutMs + ledgerTimeoutMs + meteringTimeoutMs ${meteringBoundMs} + ${TIMEOUT_MARGIN_MS} ms margin = ${needed} ms exceeds ${what} (${limit} ms); lower upstreamTimeoutMs`,
      );
    }
  };
  fits(STREAM_IDLE_TIMEOUT_MS, "API Gateway's 5-minute idle timeout for a streamed integration");
  fits(lambdaTimeoutSeconds * 1000, "lambdaTimeoutSeconds");
  if (upstreamIdleTimeoutMs + TIMEOUT_MARGIN_MS > STREAM_IDLE_TIMEOUT_MS) {
    throw new StackConfigError("upstreamIdleTimeoutMs", `${upstreamIdleTimeoutMs} ms + ${TIMEOUT_MARGIN_MS} ms margin exceeds API Gateway's 5-minute idle timeout for a stream`);
  }
  if (upstreamIdleTimeoutMs + meteringBoundMs + TIMEOUT_MARGIN_MS > lambdaTimeoutSeconds * 1000) {
    throw new StackConfigError("upstreamIdleTimeoutMs", `${upstreamIdleTimeoutMs} ms + customersTimeoutMs + ledgerTimeoutMs + meteringTimeoutMs + margin exceeds lambdaTimeoutSeconds (${lambdaTimeoutSeconds * 1000} ms)`);
  }
}

/**
 * With `stripeBilling: meters` a meter event is attributed to a Stripe customer by its `stripe_customer_id`; a billed
 * request of a customer without one could never reach an invoice (the ledger would keep it as a Stripe failure
 * forever), so every customer on a postpaid plan with prices needs one before anything is deployed. Prepaid plans
 * owe Stripe's meters nothing (their customers paid up front).
 */
function requireStripeCustomers(plans: Record<string, PlanConfig>, customers: Record<string, CustomerConfig>): void {
  for (const [id, customer] of Object.entries(customers)) {
    const plan = plans[customer.plan];
    if (plan?.prices && plan.billing === "postpaid" && !customer.stripeCustomerId) {
      throw new StackConfigError(
        `customers.${id}.stripeCustomerId`,
        `is required with stripeBilling: meters, because plan "${customer.plan}" bills: Stripe attributes each meter event to a customer by this id (cus_...)`,
      );
    }
  }
}

/**
 * The currencies the stack's postpaid billing plans charge in (lower case, sorted): one Stripe metered price each.
 * Prepaid plans are left out: their usage is paid from credits, never reported to a Stripe meter.
 */
export function billingCurrencies(plans: Record<string, PlanConfig>): string[] {
  return [...new Set(Object.values(plans).flatMap((plan) => (plan.prices && plan.billing === "postpaid" ? [plan.currency ?? "usd"] : [])))].sort();
}

function parsePlans(raw: unknown): Record<string, PlanConfig> {
  if (!isRecord(raw) || Object.keys(raw).length === 0) {
    throw new StackConfigError("plans", "define at least one plan, e.g. {starter: {rateLimit: 5, burstLimit: 10, quota: {limit: 10000, period: MONTH}}}");
  }
  const plans: Record<string, PlanConfig> = {};
  for (const [name, plan] of Object.entries(raw)) {
    const key = `plans.${name}`;
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(name)) throw new StackConfigError(key, "plan names use letters, digits, '-' and '_' only");
    if (isReservedName(name)) throw new StackConfigError(key, `"${name}" is reserved; choose another plan name`);
    if (!isRecord(plan)) throw new StackConfigError(key, "must be an object");
    for (const field of Object.keys(plan)) {
      if (!PLAN_FIELDS.includes(field)) throw new StackConfigError(`${key}.${field}`, `is not a plan field; use ${PLAN_FIELDS.join(", ")}`);
    }
    const parsed: PlanConfig = {
      rateLimit: positiveNumber(plan.rateLimit, `${key}.rateLimit`),
      burstLimit: positiveInteger(plan.burstLimit, `${key}.burstLimit`),
      billing: "postpaid",
    };
    if (plan.quota !== undefined) parsed.quota = parseQuota(plan.quota, `${key}.quota`);
    if (plan.models !== undefined) {
      if (!Array.isArray(plan.models) || plan.models.length === 0 || !plan.models.every((m) => typeof m === "string" && m !== "")) {
        throw new StackConfigError(`${key}.models`, "must be a non-empty list of model names (leave it out to allow every model)");
      }
      parsed.models = plan.models as string[];
    }
    if (plan.prices !== undefined) {
      Object.assign(parsed, parsePricing(plan, key, parsed.models));
    } else if (plan.currency !== undefined) {
      throw new StackConfigError(`${key}.currency`, `applies to prices, and this plan has none; ${PRICE_SHAPE_HINT}`);
    }
    if (plan.billing !== undefined) {
      if (typeof plan.billing !== "string" || !(BILLING_MODES as readonly string[]).includes(plan.billing)) {
        throw new StackConfigError(`${key}.billing`, `must be "postpaid" or "prepaid" (got ${JSON.stringify(plan.billing)})`);
      }
      parsed.billing = plan.billing as BillingMode;
    }
    // A prepaid request reserves its most expensive outcome before it runs: without prices there is nothing to reserve.
    if (parsed.billing === "prepaid" && !parsed.prices) {
      throw new StackConfigError(`${key}.billing`, `prepaid needs prices (credits are spent at the plan's prices); ${PRICE_SHAPE_HINT}`);
    }
    if (plan.maxOutputTokens !== undefined) {
      const cap = plan.maxOutputTokens;
      if (typeof cap !== "number" || !Number.isInteger(cap) || cap < 1 || cap > MAX_OUTPUT_TOKENS_LIMIT) {
        throw new StackConfigError(`${key}.maxOutputTokens`, `must be an integer from 1 to ${MAX_OUTPUT_TOKENS_LIMIT} (got ${JSON.stringify(cap)})`);
      }
      parsed.maxOutputTokens = cap;
    }
    plans[name] = parsed;
  }
  return plans;
}

function parseQuota(raw: unknown, key: string): NonNullable<PlanConfig["quota"]> {
  if (!isRecord(raw)) throw new StackConfigError(key, "must be {limit, period, offset?}");
  for (const field of Object.keys(raw)) {
    if (!QUOTA_FIELDS.includes(field)) throw new StackConfigError(`${key}.${field}`, `is not a quota field; use ${QUOTA_FIELDS.join(", ")}`);
  }
  const period = raw.period;
  if (typeof period !== "string" || !(QUOTA_PERIODS as readonly string[]).includes(period)) {
    throw new StackConfigError(`${key}.period`, `must be DAY, WEEK or MONTH (got ${JSON.stringify(period)})`);
  }
  const max = MAX_QUOTA_OFFSET[period as QuotaPeriod];
  const offset = raw.offset ?? 0;
  if (typeof offset !== "number" || !Number.isInteger(offset) || offset < 0 || offset > max) {
    throw new StackConfigError(`${key}.offset`, `must be ${max === 0 ? "0" : `an integer from 0 to ${max}`} for period ${period} (got ${JSON.stringify(offset)})`);
  }
  return { limit: positiveInteger(raw.limit, `${key}.limit`), period: period as QuotaPeriod, offset };
}

/**
 * A plan's `prices` and `currency`. A billing plan may only serve priced models: every model in `models` needs a
 * price (checked here, so a plan cannot bill a model at zero by accident); without `models`, the priced models are
 * the plan's model list (the function enforces it).
 */
function parsePricing(plan: Record<string, unknown>, key: string, models: string[] | undefined): Pick<PlanConfig, "currency" | "prices"> {
  const raw = plan.prices;
  if (isRecord(raw) && ("inputPer1k" in raw || "outputPer1k" in raw || typeof raw.currency === "string")) {
    throw new StackConfigError(`${key}.prices`, `uses the old {inputPer1k, outputPer1k, currency} shape; ${PRICE_SHAPE_HINT}`);
  }
  try {
    const prices = parsePriceTable(raw, `${key}.prices`);
    if (Object.keys(prices).length === 0) throw new StackConfigError(`${key}.prices`, `names no model; ${PRICE_SHAPE_HINT}`);
    for (const model of models ?? []) {
      if (!Object.prototype.hasOwnProperty.call(prices, model)) {
        throw new StackConfigError(`${key}.prices`, `has no price for "${model}", which the plan's models list allows; a billing plan prices every model it serves`);
      }
    }
    return { currency: parseCurrency(plan.currency, `${key}.currency`), prices: { ...prices } };
  } catch (err) {
    if (err instanceof PriceError) throw new StackConfigError(err.path, err.message.slice(err.path.length + 2));
    throw err;
  }
}

function parseCustomers(raw: unknown, plans: Record<string, PlanConfig>): Record<string, CustomerConfig> {
  if (raw === undefined || raw === null) return {};
  if (!isRecord(raw)) throw new StackConfigError("customers", "must be a map of customer id → {plan, stripeCustomerId}");
  const customers: Record<string, CustomerConfig> = {};
  const byStripeId = new Map<string, string>();
  for (const [id, customer] of Object.entries(raw)) {
    const key = `customers.${id}`;
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(id)) throw new StackConfigError(key, "customer ids use letters, digits, '-' and '_' only");
    if (isReservedName(id)) throw new StackConfigError(key, `"${id}" is reserved; choose another customer id`);
    if (!isRecord(customer)) throw new StackConfigError(key, "must be an object {plan, stripeCustomerId, status}");
    for (const field of Object.keys(customer)) {
      if (!CUSTOMER_FIELDS.includes(field)) throw new StackConfigError(`${key}.${field}`, `is not a customer field; use ${CUSTOMER_FIELDS.join(", ")}`);
    }
    if (typeof customer.plan !== "string" || !Object.prototype.hasOwnProperty.call(plans, customer.plan)) {
      throw new StackConfigError(`${key}.plan`, `unknown plan ${JSON.stringify(customer.plan)}; plans are: ${Object.keys(plans).join(", ")}`);
    }
    if (customer.stripeCustomerId !== undefined && (typeof customer.stripeCustomerId !== "string" || customer.stripeCustomerId === "")) {
      throw new StackConfigError(`${key}.stripeCustomerId`, "must be a Stripe customer id such as cus_123");
    }
    // Stripe's events name a Stripe customer: shared by two customers, a credit purchase (and Moesif's company) could
    // land on either of them.
    if (typeof customer.stripeCustomerId === "string") {
      const other = byStripeId.get(customer.stripeCustomerId);
      if (other !== undefined) throw new StackConfigError(`${key}.stripeCustomerId`, `${customer.stripeCustomerId} is already customer "${other}"'s; each customer needs its own Stripe customer`);
      byStripeId.set(customer.stripeCustomerId, id);
    }
    if (customer.status !== undefined && !(CUSTOMER_STATUSES as readonly unknown[]).includes(customer.status)) {
      throw new StackConfigError(`${key}.status`, `must be "active" or "suspended" (got ${JSON.stringify(customer.status)})`);
    }
    customers[id] = {
      plan: customer.plan,
      ...(customer.stripeCustomerId ? { stripeCustomerId: customer.stripeCustomerId as string } : {}),
      ...(customer.status !== undefined ? { status: customer.status as CustomerStatus } : {}),
    };
  }
  return customers;
}

/**
 * Names that are properties of every JavaScript object (`__proto__`, `constructor`, `toString`…): as map keys they
 * would be dropped or shadowed somewhere between the YAML and the function, so a plan or customer could silently
 * vanish (no API key, no error).
 */
function isReservedName(name: string): boolean {
  return name in Object.prototype || name === "prototype";
}

function optionalString(values: Record<string, unknown>, key: string): string | undefined {
  const value = values[key];
  if (value === undefined || value === null || value === "") return undefined;
  if (typeof value !== "string") throw new StackConfigError(key, "must be a string");
  return value;
}

function integer(values: Record<string, unknown>, key: string, fallback: number, min: number, max: number): number {
  const raw = values[key];
  if (raw === undefined || raw === null || raw === "") return fallback;
  const value = typeof raw === "string" ? Number(raw) : raw;
  if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) {
    throw new StackConfigError(key, `must be an integer from ${min} to ${max} (got ${JSON.stringify(raw)})`);
  }
  return value;
}

function boolean(values: Record<string, unknown>, key: string, fallback: boolean): boolean {
  const raw = values[key];
  if (raw === undefined || raw === null || raw === "") return fallback;
  if (raw === true || raw === "true") return true;
  if (raw === false || raw === "false") return false;
  throw new StackConfigError(key, "must be true or false");
}

function positiveNumber(raw: unknown, key: string): number {
  if (typeof raw !== "number" || !Number.isFinite(raw) || raw <= 0) throw new StackConfigError(key, `must be a positive number (got ${JSON.stringify(raw)})`);
  return raw;
}

function positiveInteger(raw: unknown, key: string): number {
  if (typeof raw !== "number" || !Number.isInteger(raw) || raw <= 0) throw new StackConfigError(key, `must be a positive integer (got ${JSON.stringify(raw)})`);
  return raw;
}

/** True for `localhost`, 127.0.0.0/8 and `[::1]`: plain http there never leaves the machine. */
export function isLoopbackHost(hostname: string): boolean {
  const host = hostname.toLowerCase();
  return host === "localhost" || host === "[::1]" || /^127(\.\d{1,3}){3}$/.test(host);
}

/**
 * A URL the function sends secrets to (the upstream key, the Moesif application id): `https://`, or plain `http://`
 * only on a loopback address (a model server or collector on the same machine, as the local stack runs them).
 */
function serviceUrl(key: string, value: string, options: { loopback: boolean }): string {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new StackConfigError(key, `is not a URL (got ${JSON.stringify(value)})`);
  }
  const allowed = url.protocol === "https:" || (options.loopback && url.protocol === "http:" && isLoopbackHost(url.hostname));
  if (!allowed) {
    throw new StackConfigError(key, options.loopback ? "must be an https:// URL (http:// only for localhost / 127.0.0.1 / [::1])" : "must be an https:// URL");
  }
  return value.replace(/\/+$/, "");
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
