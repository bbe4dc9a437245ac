/**
 * What the function is told about routes, customers and plans: pure helpers shared by the Pulumi program and the
 * local stack, so both configure the function identically. (No Pulumi imports: the local stack loads this.)
 */
import type { CustomerConfig, PlanConfig } from "./stack-config";

/** One API Gateway route served by the function. */
export interface RouteSpec {
  /** Resource path without the stage, e.g. `/v1/chat/completions`. */
  path: string;
  method: "GET" | "POST";
}

/** The function's routes: the seed's `/ai-chat` and the OpenAI SDK paths below `<invoke URL>/v1`. */
export const ROUTES: readonly RouteSpec[] = [
  { path: "/ai-chat", method: "POST" },
  { path: "/v1/chat/completions", method: "POST" },
  { path: "/v1/models", method: "GET" },
];

/** The function's CUSTOMERS variable: API key id → customer. */
export function customersByKeyId(
  keys: Array<{ keyId: string; customerId: string; customer: CustomerConfig }>,
): Record<string, { customerId: string; plan: string; stripeCustomerId?: string }> {
  return Object.fromEntries(
    keys.map(({ keyId, customerId, customer }) => [
      keyId,
      { customerId, plan: customer.plan, ...(customer.stripeCustomerId ? { stripeCustomerId: customer.stripeCustomerId } : {}) },
    ]),
  );
}

/** The function's PLANS variable: only what the function enforces (the model list). */
export function functionPlans(plans: Record<string, PlanConfig>): Record<string, { models?: string[] }> {
  return Object.fromEntries(Object.entries(plans).map(([name, plan]) => [name, plan.models ? { models: plan.models } : {}]));
}


/** Lambda's limit on the total size of a function's environment variables. */
export const LAMBDA_ENVIRONMENT_LIMIT_BYTES = 4096;
/** Room kept for the other variables (upstream URL and key, Moesif settings, timeouts). */
export const ENVIRONMENT_RESERVE_BYTES = 1024;

/**
 * Bytes CUSTOMERS and PLANS will take in the function's environment. API Gateway key ids are 10 characters, so the
 * size is known before the keys exist, and a stack with too many customers fails at preview, naming the key, instead
 * of at deploy time with an AWS error.
 */
export function customerEnvironmentBytes(customers: Record<string, CustomerConfig>, plans: Record<string, PlanConfig>): number {
  const keys = Object.entries(customers).map(([customerId, customer], i) => ({ keyId: String(i).padStart(10, "k"), customerId, customer }));
  return "CUSTOMERS".length + JSON.stringify(customersByKeyId(keys)).length + "PLANS".length + JSON.stringify(functionPlans(plans)).length;
}
