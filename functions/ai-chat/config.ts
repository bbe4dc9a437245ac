/**
 * The function's configuration, read from the environment once per cold start.
 *
 * Reading never throws: a broken variable is kept as a `problem` so that every request answers a clear 500
 * (and logs it) instead of the whole function failing to initialise.
 */
import fs from "node:fs";
import path from "node:path";
import type { StripeBilling } from "../shared/ledger-schema";
import { parsePlanPricing, PriceError, type PlanPricing } from "../shared/pricing";

export interface Customer {
  customerId: string;
  plan: string;
  stripeCustomerId?: string;
}

export interface Plan {
  /** Models the plan may call; absent means every model. */
  models?: string[];
  /**
   * Per-model prices. A plan with pricing refuses (400 `model_not_priced`) a model it has no price for; a plan
   * without pricing is served and metered in tokens only, with no cost.
   */
  pricing?: PlanPricing;
}

/** SSM parameter names (SecureString) that hold secrets; set, they win over the direct variables. */
export interface SecretParameters {
  upstreamApiKey?: string;
  moesifApplicationId?: string;
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
  /** API Gateway key id → customer. */
  customers: Record<string, Customer>;
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

  const customers = json<Record<string, Customer>>("CUSTOMERS", checkCustomers) ?? {};
  const plans = readPlans(env, problems);
  for (const [keyId, customer] of Object.entries(customers)) {
    if (Object.keys(plans).length > 0 && !plans[customer.plan]) {
      problems.push(`CUSTOMERS: key ${keyId} (customer ${customer.customerId}) is on plan "${customer.plan}", which PLANS does not define`);
    }
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
    },
    upstreamTimeoutMs: positiveInt("UPSTREAM_TIMEOUT_MS", 120_000),
    upstreamIdleTimeoutMs: positiveInt("UPSTREAM_IDLE_TIMEOUT_MS", 60_000),
    maxRequestBytes: positiveInt("MAX_REQUEST_BYTES", 1024 * 1024),
    responseEnvelope: envelope === "request_payload" ? "request_payload" : "none",
    customers,
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

/** Checks and copies the plans: `{ <plan>: { models?: string[], pricing?: {currency, prices} } }`, nothing else. */
function parsePlans(value: unknown): Record<string, Plan> {
  if (!isRecord(value)) throw new PriceError("plans", "must be a JSON object of plan → {models?, pricing?}");
  const plans: Record<string, Plan> = Object.create(null) as Record<string, Plan>;
  for (const [name, plan] of Object.entries(value)) {
    if (!isRecord(plan)) throw new PriceError(`plan ${name}`, "must be an object");
    // A misspelt key ("pricng") must not quietly serve a plan for free.
    for (const key of Object.keys(plan)) if (key !== "models" && key !== "pricing") throw new PriceError(`plan ${name}`, `unknown field "${key}" (use models, pricing)`);
    const parsed: Plan = {};
    const models = plan.models;
    if (models !== undefined) {
      if (!Array.isArray(models) || !models.every((m) => typeof m === "string")) throw new PriceError(`plan ${name}`, "models must be an array of strings");
      parsed.models = models;
    }
    if (plan.pricing !== undefined) parsed.pricing = parsePlanPricing(plan.pricing, `plan ${name}: pricing`);
    plans[name] = parsed;
  }
  return plans;
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
