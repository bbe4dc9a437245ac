/**
 * The function's configuration, read from the environment once per cold start.
 *
 * Reading never throws: a broken variable is kept as a `problem` so that every request answers a clear 500
 * (and logs it) instead of the whole function failing to initialise.
 */
import fs from "node:fs";
import path from "node:path";
import type { CustomerStatus } from "../shared/customer-schema";
import type { StripeBilling } from "../shared/ledger-schema";
import { parsePlanPricing, PriceError, type PlanPricing } from "../shared/pricing";
import { QUOTA_PERIODS, type QuotaPeriod } from "../shared/quota-period";

export interface Customer {
  customerId: string;
  plan: string;
  stripeCustomerId?: string;
  /** `suspended` answers 403. @default "active" */
  status?: CustomerStatus;
}

/** `postpaid`: billed afterwards from the meter. `prepaid`: each request is paid from a balance bought up front. */
export type BillingMode = "postpaid" | "prepaid";

/** A plan's request quota, as API Gateway's usage plan counts it; also the period `GET /v1/usage` reports. */
export interface PlanQuota {
  limit: number;
  period: QuotaPeriod;
  /** Days after the period's natural start (API Gateway's `offset`). @default 0 */
  offset: number;
}

export interface Plan {
  /** Models the plan may call; absent means every model. */
  models?: string[];
  /**
   * Per-model prices. A plan with pricing refuses (400 `model_not_priced`) a model it has no price for; a plan
   * without pricing is served and metered in tokens only, with no cost.
   */
  pricing?: PlanPricing;
  /** @default "postpaid" */
  billing?: BillingMode;
  /**
   * Most output tokens per choice a request may ask for (`max_completion_tokens` / `max_tokens` are capped at it,
   * and sent as it when the caller sent neither). @default 4096 on prepaid plans; no cap on postpaid ones
   */
  maxOutputTokens?: number;
  quota?: PlanQuota;
}

/** The output cap of prepaid plans that do not set `maxOutputTokens`. */
export const DEFAULT_MAX_OUTPUT_TOKENS = 4096;
/** The largest `maxOutputTokens` accepted (as the stack config does). */
export const MAX_OUTPUT_TOKENS_LIMIT = 1_000_000;

/** A plan's billing mode (postpaid unless it says prepaid). */
export function billingOf(plan: Plan | undefined): BillingMode {
  return plan?.billing === "prepaid" ? "prepaid" : "postpaid";
}

/** The output-token cap of a plan: its `maxOutputTokens`, else 4096 on a prepaid plan, else none. */
export function outputCapOf(plan: Plan | undefined): number | undefined {
  if (plan?.maxOutputTokens !== undefined) return plan.maxOutputTokens;
  return billingOf(plan) === "prepaid" ? DEFAULT_MAX_OUTPUT_TOKENS : undefined;
}

/** SSM parameter names (SecureString) that hold secrets; set, they win over the direct variables. */
export interface SecretParameters {
  upstreamApiKey?: string;
  moesifApplicationId?: string;
  stripeWebhookSecret?: string;
}

export interface FunctionConfig {
  upstreamBaseUrl: string;
  /** Bearer token for the upstream given directly; absent when not configured (requests then answer 500). */
  upstreamApiKey?: string;
  /** Secrets to read from SSM Parameter Store instead (`*_PARAMETER`). */
  secretParameters: SecretParameters;
  /** Bound on a non-streaming upstream call, and on a streaming one until the upstream's headers arrive. */
  upstreamTimeoutMs: number;
  /** Longest silence allowed between two chunks of a streamed upstream answer (`UPSTREAM_IDLE_TIMEOUT_MS`). */
  upstreamIdleTimeoutMs: number;
  maxRequestBytes: number;
  /** `request_payload` wraps `/ai-chat` answers as the seed tutorial does. */
  responseEnvelope: "none" | "request_payload";
  /** API Gateway key id → customer, from `CUSTOMERS` (read only when there is no customers table). */
  customers: Record<string, Customer>;
  /**
   * The customers table (`CUSTOMERS_TABLE`): key lookups (cached `cacheTtlMs`, `CUSTOMER_CACHE_TTL_MS`), prepaid
   * balances and usage counters. Each call is bounded by `timeoutMs` (`CUSTOMERS_TIMEOUT_MS`).
   */
  customerStore: { table?: string; timeoutMs: number; cacheTtlMs: number };
  /**
   * Who created each stored Responses API response (`RESPONSES_TABLE`; see `shared/response-owners.ts`). Each call
   * is bounded by `timeoutMs` (`RESPONSES_TIMEOUT_MS`, else `CUSTOMERS_TIMEOUT_MS`'s value). Without the table the
   * owners are kept in the function's memory: per instance, so a response is then "not found" on other instances.
   */
  responseOwners: { table?: string; timeoutMs: number };
  /** Signing secret of the Stripe credits webhook given directly (`STRIPE_WEBHOOK_SECRET`; the local stack). */
  stripeWebhookSecret?: string;
  plans: Record<string, Plan>;
  moesif: { applicationId?: string; baseUri: string; timeoutMs: number; logBodies: boolean };
  /**
   * The usage ledger (`LEDGER_TABLE`, a DynamoDB table): when set, each request's usage is written there (bounded by
   * `timeoutMs`, `LEDGER_TIMEOUT_MS`) and the forwarder delivers it; the direct Moesif send is only the fallback.
   */
  ledger: { table?: string; timeoutMs: number };
  /** Who reports usage to Stripe (`STRIPE_BILLING`): Moesif's billing meter, or the forwarder's Stripe meter events. */
  stripeBilling: StripeBilling;
  /**
   * Forward the local model server's `mock` request field upstream. Off (the field is stripped) except where the
   * upstream is the built-in model server: a real OpenAI answers 400 to unknown fields.
   */
  forwardMockDirectives: boolean;
  /** Problems found while reading the environment; non-empty means the function cannot serve. */
  problems: string[];
}

export const DEFAULT_UPSTREAM_BASE_URL = "https://api.openai.com/v1";
export const DEFAULT_MOESIF_BASE_URI = "https://api.moesif.net";

export function loadFunctionConfig(env: NodeJS.ProcessEnv = process.env): FunctionConfig {
  const problems: string[] = [];

  const positiveInt = (name: string, fallback: number): number => {
    const raw = env[name];
    if (raw === undefined || raw === "") return fallback;
    const value = Number(raw);
    if (!Number.isInteger(value) || value <= 0) {
      problems.push(`${name} must be a positive integer, got "${raw}"`);
      return fallback;
    }
    return value;
  };

  const json = <T>(name: string, check: (value: unknown) => string | undefined): T | undefined => {
    const raw = env[name];
    if (raw === undefined || raw === "") return undefined;
    try {
      const value = JSON.parse(raw) as unknown;
      const problem = check(value);
      if (problem) problems.push(`${name}: ${problem}`);
      return problem ? undefined : (value as T);
    } catch {
      problems.push(`${name} is not valid JSON`);
      return undefined;
    }
  };

  const customersTable = env.CUSTOMERS_TABLE?.trim() || undefined;
  const customersTimeoutMs = positiveInt("CUSTOMERS_TIMEOUT_MS", 1000);
  // The table replaces the variable; with both set, the table is the one truth (a stale CUSTOMERS is ignored).
  const customers = (customersTable ? undefined : json<Record<string, Customer>>("CUSTOMERS", checkCustomers)) ?? {};
  const plans = readPlans(env, problems);
  for (const [keyId, customer] of Object.entries(customers)) {
    if (Object.keys(plans).length > 0 && !plans[customer.plan]) {
      problems.push(`CUSTOMERS: key ${keyId} (customer ${customer.customerId}) is on plan "${customer.plan}", which PLANS does not define`);
    }
  }
  const prepaid = Object.keys(plans).filter((name) => billingOf(plans[name]) === "prepaid");
  if (prepaid.length > 0 && !customersTable) {
    problems.push(`plan ${prepaid.join(", ")} is prepaid, which needs CUSTOMERS_TABLE (the balances live in the customers table)`);
  }

  const envelope = env.RESPONSE_ENVELOPE ?? "none";
  if (envelope !== "none" && envelope !== "request_payload" && envelope !== "") {
    problems.push(`RESPONSE_ENVELOPE must be "none" or "request_payload", got "${envelope}"`);
  }

  const stripeBilling = env.STRIPE_BILLING || "moesif";
  if (stripeBilling !== "moesif" && stripeBilling !== "meters") {
    problems.push(`STRIPE_BILLING must be "moesif" or "meters", got "${stripeBilling}"`);
  }

  return {
    upstreamBaseUrl: (env.UPSTREAM_BASE_URL || DEFAULT_UPSTREAM_BASE_URL).replace(/\/+$/, ""),
    upstreamApiKey: readUpstreamKey(env),
    secretParameters: {
      upstreamApiKey: env.UPSTREAM_API_KEY_PARAMETER?.trim() || undefined,
      moesifApplicationId: env.MOESIF_APPLICATION_ID_PARAMETER?.trim() || undefined,
      stripeWebhookSecret: env.STRIPE_WEBHOOK_SECRET_PARAMETER?.trim() || undefined,
    },
    upstreamTimeoutMs: positiveInt("UPSTREAM_TIMEOUT_MS", 120_000),
    upstreamIdleTimeoutMs: positiveInt("UPSTREAM_IDLE_TIMEOUT_MS", 60_000),
    maxRequestBytes: positiveInt("MAX_REQUEST_BYTES", 1024 * 1024),
    responseEnvelope: envelope === "request_payload" ? "request_payload" : "none",
    customers,
    customerStore: { table: customersTable, timeoutMs: customersTimeoutMs, cacheTtlMs: positiveInt("CUSTOMER_CACHE_TTL_MS", 30_000) },
    responseOwners: { table: env.RESPONSES_TABLE?.trim() || undefined, timeoutMs: positiveInt("RESPONSES_TIMEOUT_MS", customersTimeoutMs) },
    stripeWebhookSecret: env.STRIPE_WEBHOOK_SECRET?.trim() || undefined,
    plans,
    moesif: {
      applicationId: env.MOESIF_APPLICATION_ID || undefined,
      baseUri: (env.MOESIF_BASE_URI || DEFAULT_MOESIF_BASE_URI).replace(/\/+$/, ""),
      timeoutMs: positiveInt("METERING_TIMEOUT_MS", 1000),
      logBodies: env.MOESIF_LOG_BODIES === "true",
    },
    ledger: { table: env.LEDGER_TABLE?.trim() || undefined, timeoutMs: positiveInt("LEDGER_TIMEOUT_MS", 1000) },
    // An unknown value is a problem above; "moesif" then, since it never sends anything to Stripe itself.
    stripeBilling: stripeBilling === "meters" ? "meters" : "moesif",
    forwardMockDirectives: env.FORWARD_MOCK_DIRECTIVES === "true",
    problems,
  };
}

/** `UPSTREAM_API_KEY`, or the seed tutorial's `Authorization` variable holding `Bearer …`. */
function readUpstreamKey(env: NodeJS.ProcessEnv): string | undefined {
  const direct = env.UPSTREAM_API_KEY?.trim();
  if (direct) return direct;
  const seed = env.Authorization?.trim();
  if (!seed) return undefined;
  const match = /^Bearer\s+(.+)$/i.exec(seed);
  return (match ? match[1] : seed).trim() || undefined;
}

function checkCustomers(value: unknown): string | undefined {
  if (!isRecord(value)) return "must be a JSON object of key id → {customerId, plan, stripeCustomerId}";
  for (const [keyId, customer] of Object.entries(value)) {
    if (!isRecord(customer)) return `entry ${keyId} must be an object`;
    if (typeof customer.customerId !== "string" || !customer.customerId) return `entry ${keyId} needs a customerId`;
    if (typeof customer.plan !== "string" || !customer.plan) return `entry ${keyId} needs a plan`;
    if (customer.stripeCustomerId !== undefined && typeof customer.stripeCustomerId !== "string") {
      return `entry ${keyId}: stripeCustomerId must be a string`;
    }
    if (customer.status !== undefined && customer.status !== "active" && customer.status !== "suspended") {
      return `entry ${keyId}: status must be "active" or "suspended"`;
    }
  }
  return undefined;
}

/**
 * Plans from `PLANS` (JSON), or else from the JSON file `PLANS_FILE` names (relative to the working directory, which
 * is /var/task on Lambda: the deployment writes plans.json beside the handler, because per-model prices outgrow
 * Lambda's 4 KB of environment). Neither set means no plans: every model, no prices.
 */
function readPlans(env: NodeJS.ProcessEnv, problems: string[]): Record<string, Plan> {
  let source = "PLANS";
  let raw = env.PLANS;
  if (raw === undefined || raw === "") {
    const file = env.PLANS_FILE?.trim();
    if (!file) return {};
    const resolved = path.resolve(process.cwd(), file);
    source = `PLANS_FILE (${resolved})`;
    try {
      raw = fs.readFileSync(resolved, "utf8");
    } catch (err) {
      problems.push(`${source} cannot be read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
      return {};
    }
  }
  let value: unknown;
  try {
    value = JSON.parse(raw) as unknown;
  } catch {
    problems.push(`${source} is not valid JSON`);
    return {};
  }
  try {
    return parsePlans(value);
  } catch (err) {
    problems.push(`${source}: ${(err as Error).message}`);
    return {};
  }
}

const PLAN_FIELDS = ["models", "pricing", "billing", "maxOutputTokens", "quota"];

/**
 * Checks and copies the plans: `{ <plan>: { models?: string[], pricing?: {currency, prices}, billing?: "postpaid" |
 * "prepaid", maxOutputTokens?: integer, quota?: {limit, period, offset?} } }`, nothing else.
 */
function parsePlans(value: unknown): Record<string, Plan> {
  if (!isRecord(value)) throw new PriceError("plans", "must be a JSON object of plan → {models?, pricing?, billing?, maxOutputTokens?, quota?}");
  const plans: Record<string, Plan> = Object.create(null) as Record<string, Plan>;
  for (const [name, plan] of Object.entries(value)) {
    if (!isRecord(plan)) throw new PriceError(`plan ${name}`, "must be an object");
    // A misspelt key ("pricng", "biling") must not quietly serve a plan for free.
    for (const key of Object.keys(plan)) if (!PLAN_FIELDS.includes(key)) throw new PriceError(`plan ${name}`, `unknown field "${key}" (use ${PLAN_FIELDS.join(", ")})`);
    const parsed: Plan = {};
    const models = plan.models;
    if (models !== undefined) {
      if (!Array.isArray(models) || !models.every((m) => typeof m === "string")) throw new PriceError(`plan ${name}`, "models must be an array of strings");
      parsed.models = models;
    }
    if (plan.pricing !== undefined) parsed.pricing = parsePlanPricing(plan.pricing, `plan ${name}: pricing`);
    if (plan.billing !== undefined) {
      if (plan.billing !== "postpaid" && plan.billing !== "prepaid") throw new PriceError(`plan ${name}: billing`, `must be "postpaid" or "prepaid" (got ${JSON.stringify(plan.billing)})`);
      parsed.billing = plan.billing;
    }
    // A balance is money: a prepaid plan without prices could never charge it.
    if (parsed.billing === "prepaid" && !parsed.pricing) throw new PriceError(`plan ${name}`, "is prepaid, so it needs pricing (a balance is charged at the plan's prices)");
    if (plan.maxOutputTokens !== undefined) {
      const cap = plan.maxOutputTokens;
      if (typeof cap !== "number" || !Number.isInteger(cap) || cap < 1 || cap > MAX_OUTPUT_TOKENS_LIMIT) {
        throw new PriceError(`plan ${name}: maxOutputTokens`, `must be an integer from 1 to ${MAX_OUTPUT_TOKENS_LIMIT} (got ${JSON.stringify(cap)})`);
      }
      parsed.maxOutputTokens = cap;
    }
    if (plan.quota !== undefined) parsed.quota = parseQuota(plan.quota, `plan ${name}: quota`);
    plans[name] = parsed;
  }
  return plans;
}

/** `{limit, period, offset?}` with API Gateway's ranges (offset: 0 for DAY, 0–6 for WEEK, 0–27 for MONTH). */
function parseQuota(raw: unknown, path: string): PlanQuota {
  if (!isRecord(raw)) throw new PriceError(path, "must be {limit, period, offset?}");
  for (const key of Object.keys(raw)) if (!["limit", "period", "offset"].includes(key)) throw new PriceError(path, `unknown field "${key}" (use limit, period, offset)`);
  const { limit, period, offset = 0 } = raw;
  if (typeof limit !== "number" || !Number.isSafeInteger(limit) || limit < 1) throw new PriceError(`${path}.limit`, `must be a positive integer (got ${JSON.stringify(limit)})`);
  if (typeof period !== "string" || !(QUOTA_PERIODS as readonly string[]).includes(period)) throw new PriceError(`${path}.period`, `must be one of ${QUOTA_PERIODS.join(", ")} (got ${JSON.stringify(period)})`);
  const maxOffset = period === "DAY" ? 0 : period === "WEEK" ? 6 : 27;
  if (typeof offset !== "number" || !Number.isInteger(offset) || offset < 0 || offset > maxOffset) {
    throw new PriceError(`${path}.offset`, `must be an integer from 0 to ${maxOffset} for ${period} (got ${JSON.stringify(offset)})`);
  }
  return { limit, period: period as QuotaPeriod, offset };
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
