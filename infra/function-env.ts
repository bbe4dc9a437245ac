/**
 * What the function is told about routes, customers, plans and its settings: pure helpers shared by the Pulumi
 * program and the local stack, so both configure the function identically. (No Pulumi imports: the local stack
 * loads this.)
 */
import type { ModelPrice } from "../functions/shared/pricing";
import type { CustomerConfig, PlanConfig, StackConfig } from "./stack-config";

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

/** The plans file the program writes next to the bundled `index.js` (the function resolves it against /var/task). */
export const PLANS_FILE = "plans.json";

/** Lambda's limit on the total size of a function's environment variables. */
export const LAMBDA_ENVIRONMENT_LIMIT_BYTES = 4096;

/** API Gateway API key ids are 10 characters (e.g. `9n1exu7mz8`): the size of CUSTOMERS is known before the keys exist. */
export const API_KEY_ID_LENGTH = 10;

/** What the function knows about a plan: the models it may call and, when it bills, its prices (micro-units). */
export interface FunctionPlan {
  models?: string[];
  pricing?: { currency: string; prices: Record<string, ModelPrice> };
}

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

/**
 * The function's plans (`plans.json` on AWS, the `PLANS` variable locally): what the function enforces and prices.
 * A billing plan without a `models` list may call exactly its priced models.
 */
export function functionPlans(plans: Record<string, PlanConfig>): Record<string, FunctionPlan> {
  return Object.fromEntries(
    Object.entries(plans).map(([name, plan]) => {
      const entry: FunctionPlan = {};
      const models = plan.models ?? (plan.prices ? Object.keys(plan.prices) : undefined);
      if (models) entry.models = models;
      if (plan.prices) entry.pricing = { currency: plan.currency ?? "usd", prices: plan.prices };
      return [name, entry];
    }),
  );
}

/**
 * The stack name as it may appear in resource names: Lambda, IAM and SSM names reject some characters Pulumi
 * allows in stack names (`.` for Lambda and IAM), so anything but letters, digits, `-` and `_` becomes `-`.
 */
export function sanitizeStackName(stack: string): string {
  return stack.replace(/[^A-Za-z0-9_-]/g, "-").slice(0, 64) || "stack";
}

/**
 * The SSM SecureString parameters holding the function's secrets: the variable that names each one for the function,
 * and the slug of its logical name. Pulumi auto-names them (`metered-ai-api-param-<slug>-<7 random characters>`), so
 * two stacks of the same name (another backend, another project copy, `a.b` and `a-b`) never collide in one account
 * and region: SSM refuses to create a parameter that exists (@pulumi/aws ssm/parameter.d.ts: `overwrite` "defaults to
 * false during create").
 */
export const SECRET_PARAMETERS = [
  { envVar: "UPSTREAM_API_KEY_PARAMETER", slug: "upstream-api-key", description: "metered-ai-api: the upstream's API key" },
  { envVar: "MOESIF_APPLICATION_ID_PARAMETER", slug: "moesif-application-id", description: "metered-ai-api: Moesif Collector Application Id" },
] as const;

/** The longest name Pulumi's auto-naming gives a parameter (logical name, a dash, 7 random characters). */
export function plannedParameterName(slug: string): string {
  return `metered-ai-api-param-${slug}-xxxxxxx`;
}

/** Logical name of the usage ledger component (`infra/usage-ledger.ts`); its table is `<this>-table`. */
export const LEDGER_COMPONENT_NAME = "usage-ledger";

/** The ledger table's name as Pulumi auto-names it (logical name, a dash, 7 random characters): LEDGER_TABLE's size. */
export function plannedLedgerTableName(): string {
  return `${LEDGER_COMPONENT_NAME}-table-xxxxxxx`;
}

/**
 * How long the forwarder's sweep leaves a new ledger item to the table's stream before delivering it itself (ms):
 * long enough that the stream, which normally delivers within seconds, wins; the sweep then only picks up what the
 * stream missed (records skipped at LATEST, failed batches, sink outages).
 */
export const FORWARDER_SWEEP_GRACE_MS = 60_000;

/**
 * The usage forwarder's own SSM SecureString parameters (auto-named like the function's): the Moesif application id
 * always, the Stripe key only with `stripeBilling: meters`. Its own copies, so its role reads nothing of ai-chat's.
 */
export const FORWARDER_SECRET_PARAMETERS = [
  { envVar: "MOESIF_APPLICATION_ID_PARAMETER", slug: "moesif-application-id", description: "metered-ai-api usage forwarder: Moesif Collector Application Id" },
  { envVar: "STRIPE_API_KEY_PARAMETER", slug: "stripe-api-key", description: "metered-ai-api usage forwarder: Stripe key for billing meter events" },
] as const;

/**
 * The usage forwarder's environment on AWS besides the names only the deployment knows (the table and the SSM
 * parameters holding the Moesif application id and, with `stripeBilling: meters`, the Stripe key), which the ledger
 * component adds. No secret is in it.
 */
export function forwarderEnvironment(config: StackConfig): Record<string, string> {
  return {
    MOESIF_BASE_URI: config.moesifBaseUri,
    STRIPE_BILLING: config.stripeBilling,
    FORWARDER_SWEEP_GRACE_MS: String(FORWARDER_SWEEP_GRACE_MS),
    LOG_LEVEL: "info",
  };
}

/**
 * The function's environment on AWS, except CUSTOMERS (keyed by the API key ids API Gateway assigns) and LEDGER_TABLE
 * (the ledger table's generated name, which the component adds). No secret is in it: the upstream key and the Moesif application id are SSM parameters, named (by the component, which creates
 * them) in UPSTREAM_API_KEY_PARAMETER / MOESIF_APPLICATION_ID_PARAMETER and read at the first
 * request; anyone with `lambda:GetFunctionConfiguration` sees only their names.
 */
export function functionEnvironment(config: StackConfig, stack: string): Record<string, string> {
  return {
    UPSTREAM_BASE_URL: config.upstreamBaseUrl,
    UPSTREAM_TIMEOUT_MS: String(config.upstreamTimeoutMs),
    UPSTREAM_IDLE_TIMEOUT_MS: String(config.upstreamIdleTimeoutMs),
    MAX_REQUEST_BYTES: String(config.maxRequestBytes),
    RESPONSE_ENVELOPE: config.responseEnvelope,
    MOESIF_BASE_URI: config.moesifBaseUri,
    MOESIF_LOG_BODIES: String(config.logBodies),
    METERING_TIMEOUT_MS: String(config.meteringTimeoutMs),
    LEDGER_TIMEOUT_MS: String(config.ledgerTimeoutMs),
    STRIPE_BILLING: config.stripeBilling,
    PLANS_FILE,
  };
}

/** The CUSTOMERS variable's value. */
export function customersVariable(keyIds: Record<string, string>, customers: Record<string, CustomerConfig>): string {
  return JSON.stringify(customersByKeyId(Object.entries(customers).map(([customerId, customer]) => ({ keyId: keyIds[customerId], customerId, customer }))));
}

/** The environment the stack will deploy, with placeholder key ids of API Gateway's length. */
export function plannedEnvironment(config: StackConfig, stack: string): Record<string, string> {
  const keyIds = Object.fromEntries(Object.keys(config.customers).map((id, i) => [id, String(i).padStart(API_KEY_ID_LENGTH, "k")]));
  // SECRETS_VERSION: the two parameters' versions, e.g. "12.3"; room for five digits each.
  const parameters = Object.fromEntries(SECRET_PARAMETERS.map(({ envVar, slug }) => [envVar, plannedParameterName(slug)]));
  return {
    ...functionEnvironment(config, stack),
    ...parameters,
    LEDGER_TABLE: plannedLedgerTableName(),
    CUSTOMERS: customersVariable(keyIds, config.customers),
    SECRETS_VERSION: "99999.99999",
  };
}

/**
 * Bytes of an environment as Lambda counts them against its 4 KB: the JSON-serialised variables map, UTF-8, with
 * every quote inside a JSON-valued variable escaped (LocalStack's size check, validated against AWS, does the same:
 * `json.dumps(variables)` in localstack/localstack#6862).
 */
export function environmentBytes(variables: Record<string, string>): number {
  return Buffer.byteLength(JSON.stringify(variables), "utf8");
}
