/**
 * The stack config's shape, defaults and validation, as pure functions of plain values.
 *
 * The Pulumi program (`infra/config.ts`) and the local stack (`scripts/start.ts`) both read the same stack file
 * through this module, so a plan or customer means the same thing locally and on AWS.
 */

import { customerEnvironmentBytes, ENVIRONMENT_RESERVE_BYTES, LAMBDA_ENVIRONMENT_LIMIT_BYTES } from "./function-env";

export const PROJECT = "metered-ai-api";
export const QUOTA_PERIODS = ["DAY", "WEEK", "MONTH"] as const;
export type QuotaPeriod = (typeof QUOTA_PERIODS)[number];
/** Retention values CloudWatch Logs accepts. */
export const LOG_RETENTION_DAYS = [1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653];

export interface PlanConfig {
  /** Steady-state requests per second per key (API Gateway throttle). */
  rateLimit: number;
  /** Bucket size: requests allowed at once above the rate. */
  burstLimit: number;
  /** Requests per period per key. Absent: no quota. */
  quota?: { limit: number; period: QuotaPeriod; offset: number };
  /** Models the plan may call. Absent: every model. */
  models?: string[];
  /** Prices per 1,000 tokens, for usage reports and Moesif/Stripe price setup. */
  prices?: { inputPer1k: number; outputPer1k: number; currency: string };
}

export interface CustomerConfig {
  plan: string;
  /** Stripe customer id (`cus_…`): Moesif bills the company with this id. */
  stripeCustomerId?: string;
}

export interface StackConfig {
  stageName: string;
  upstreamBaseUrl: string;
  moesifBaseUri?: string;
  moesifStripeWebhookUrl?: string;
  plans: Record<string, PlanConfig>;
  customers: Record<string, CustomerConfig>;
  responseEnvelope: "none" | "request_payload";
  logBodies: boolean;
  upstreamTimeoutMs: number;
  meteringTimeoutMs: number;
  maxRequestBytes: number;
  lambdaMemoryMb: number;
  lambdaTimeoutSeconds: number;
  lambdaArchitecture: "arm64" | "x86_64";
  logRetentionDays: number;
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
}

/**
 * Validates raw config values (keys without the project prefix; objects already parsed) and applies defaults.
 * Throws `StackConfigError` naming the first bad key.
 */
export function parseStackConfig(values: Record<string, unknown>, options: ParseOptions): StackConfig {
  const plans = parsePlans(values.plans);
  const customers = parseCustomers(values.customers, plans);
  const environmentBytes = customerEnvironmentBytes(customers, plans);
  if (environmentBytes > LAMBDA_ENVIRONMENT_LIMIT_BYTES - ENVIRONMENT_RESERVE_BYTES) {
    throw new StackConfigError(
      "customers",
      `${Object.keys(customers).length} customers need ${environmentBytes} bytes of the function's environment; Lambda allows ${LAMBDA_ENVIRONMENT_LIMIT_BYTES} in all. Shorten ids or split the stack (a customer store outside the environment is planned)`,
    );
  }

  const stageName = optionalString(values, "stageName") ?? "beta";
  if (!/^[A-Za-z0-9_-]{1,128}$/.test(stageName)) throw new StackConfigError("stageName", "use letters, digits, '-' and '_' only");

  const webhook = optionalString(values, "moesifStripeWebhookUrl");
  if (options.forDeploy && !webhook) {
    throw new StackConfigError("moesifStripeWebhookUrl", "is required: copy it from Moesif's Stripe integration dialog");
  }
  if (webhook !== undefined) httpUrl("moesifStripeWebhookUrl", webhook, true);

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

  const moesifBaseUri = optionalString(values, "moesifBaseUri");
  if (moesifBaseUri !== undefined) httpUrl("moesifBaseUri", moesifBaseUri, false);

  return {
    stageName,
    upstreamBaseUrl: httpUrl("upstreamBaseUrl", optionalString(values, "upstreamBaseUrl") ?? "https://api.openai.com/v1", false),
    moesifBaseUri,
    moesifStripeWebhookUrl: webhook,
    plans,
    customers,
    responseEnvelope: envelope,
    logBodies: boolean(values, "logBodies", false),
    upstreamTimeoutMs: integer(values, "upstreamTimeoutMs", 28_000, 1, 900_000),
    meteringTimeoutMs: integer(values, "meteringTimeoutMs", 1000, 1, 10_000),
    maxRequestBytes: integer(values, "maxRequestBytes", 1024 * 1024, 1, 6 * 1024 * 1024),
    lambdaMemoryMb: integer(values, "lambdaMemoryMb", 512, 128, 10_240),
    lambdaTimeoutSeconds: integer(values, "lambdaTimeoutSeconds", 29, 1, 900),
    lambdaArchitecture: architecture,
    logRetentionDays,
  };
}

function parsePlans(raw: unknown): Record<string, PlanConfig> {
  if (!isRecord(raw) || Object.keys(raw).length === 0) {
    throw new StackConfigError("plans", "define at least one plan, e.g. {starter: {rateLimit: 5, burstLimit: 10, quota: {limit: 10000, period: MONTH}}}");
  }
  const plans: Record<string, PlanConfig> = {};
  for (const [name, plan] of Object.entries(raw)) {
    const key = `plans.${name}`;
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(name)) throw new StackConfigError(key, "plan names use letters, digits, '-' and '_' only");
    if (!isRecord(plan)) throw new StackConfigError(key, "must be an object");
    const parsed: PlanConfig = {
      rateLimit: positiveNumber(plan.rateLimit, `${key}.rateLimit`),
      burstLimit: positiveInteger(plan.burstLimit, `${key}.burstLimit`),
    };
    if (plan.quota !== undefined) {
      if (!isRecord(plan.quota)) throw new StackConfigError(`${key}.quota`, "must be {limit, period, offset?}");
      const period = plan.quota.period;
      if (typeof period !== "string" || !(QUOTA_PERIODS as readonly string[]).includes(period)) {
        throw new StackConfigError(`${key}.quota.period`, `must be DAY, WEEK or MONTH (got ${JSON.stringify(period)})`);
      }
      const offset = plan.quota.offset ?? 0;
      if (!Number.isInteger(offset) || (offset as number) < 0) throw new StackConfigError(`${key}.quota.offset`, "must be a non-negative integer");
      parsed.quota = { limit: positiveInteger(plan.quota.limit, `${key}.quota.limit`), period: period as QuotaPeriod, offset: offset as number };
    }
    if (plan.models !== undefined) {
      if (!Array.isArray(plan.models) || plan.models.length === 0 || !plan.models.every((m) => typeof m === "string" && m !== "")) {
        throw new StackConfigError(`${key}.models`, "must be a non-empty list of model names (leave it out to allow every model)");
      }
      parsed.models = plan.models as string[];
    }
    if (plan.prices !== undefined) {
      const prices = plan.prices;
      if (!isRecord(prices)) throw new StackConfigError(`${key}.prices`, "must be {inputPer1k, outputPer1k, currency?}");
      for (const field of ["inputPer1k", "outputPer1k"]) {
        const value = prices[field];
        if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
          throw new StackConfigError(`${key}.prices.${field}`, "must be a non-negative number (price per 1,000 tokens)");
        }
      }
      parsed.prices = { inputPer1k: prices.inputPer1k as number, outputPer1k: prices.outputPer1k as number, currency: typeof prices.currency === "string" ? prices.currency : "usd" };
    }
    plans[name] = parsed;
  }
  return plans;
}

function parseCustomers(raw: unknown, plans: Record<string, PlanConfig>): Record<string, CustomerConfig> {
  if (raw === undefined) return {};
  if (!isRecord(raw)) throw new StackConfigError("customers", "must be a map of customer id → {plan, stripeCustomerId}");
  const customers: Record<string, CustomerConfig> = {};
  for (const [id, customer] of Object.entries(raw)) {
    const key = `customers.${id}`;
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(id)) throw new StackConfigError(key, "customer ids use letters, digits, '-' and '_' only");
    if (!isRecord(customer)) throw new StackConfigError(key, "must be an object {plan, stripeCustomerId}");
    if (typeof customer.plan !== "string" || !plans[customer.plan]) {
      throw new StackConfigError(`${key}.plan`, `unknown plan ${JSON.stringify(customer.plan)}; plans are: ${Object.keys(plans).join(", ")}`);
    }
    if (customer.stripeCustomerId !== undefined && (typeof customer.stripeCustomerId !== "string" || customer.stripeCustomerId === "")) {
      throw new StackConfigError(`${key}.stripeCustomerId`, "must be a Stripe customer id such as cus_123");
    }
    customers[id] = { plan: customer.plan, ...(customer.stripeCustomerId ? { stripeCustomerId: customer.stripeCustomerId as string } : {}) };
  }
  return customers;
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

function httpUrl(key: string, value: string, httpsOnly: boolean): string {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new StackConfigError(key, `is not a URL (got ${JSON.stringify(value)})`);
  }
  if (url.protocol !== "https:" && (httpsOnly || url.protocol !== "http:")) {
    throw new StackConfigError(key, httpsOnly ? "must be an https:// URL" : "must be an http(s):// URL");
  }
  return value.replace(/\/+$/, "");
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
