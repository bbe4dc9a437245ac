/**
 * What the function is told about routes, plans and its settings: pure helpers shared by the Pulumi
 * program and the local stack, so both configure the function identically. (No Pulumi imports: the local stack
 * loads this.)
 */
import type { ModelPrice } from "../functions/shared/pricing";
import type { QuotaPeriod } from "../functions/shared/quota-period";
import type { BillingMode, PlanConfig, StackConfig } from "./stack-config";

/** One API Gateway route served by the function. */
export interface RouteSpec {
  /** Resource path without the stage, e.g. `/v1/chat/completions`. */
  path: string;
  method: "GET" | "POST" | "DELETE";
  /**
   * true: the REQUEST authorizer finds the caller's API key and API Gateway checks it against the usage plans.
   * false: no authorizer and no key (authorization NONE): only for Stripe's webhook, whose requests carry Stripe's
   * signature instead, which the function verifies against the raw body.
   */
  apiKeyRequired: boolean;
}

/** Where Stripe posts the credit purchases it has been paid for (the second Stripe webhook endpoint). */
export const STRIPE_WEBHOOK_PATH = "/stripe/webhook";

/**
 * The function's routes: the seed's `/ai-chat`, the OpenAI SDK paths below `<invoke URL>/v1`, the caller's own
 * standing (`GET /v1/usage`) and Stripe's webhook.
 */
export const ROUTES: readonly RouteSpec[] = [
  { path: "/ai-chat", method: "POST", apiKeyRequired: true },
  { path: "/v1/chat/completions", method: "POST", apiKeyRequired: true },
  { path: "/v1/models", method: "GET", apiKeyRequired: true },
  { path: "/v1/usage", method: "GET", apiKeyRequired: true },
  // The Responses API and its stored responses (each id only for the customer that created it: see
  // functions/shared/response-owners.ts), embeddings, and one model by id.
  { path: "/v1/responses", method: "POST", apiKeyRequired: true },
  { path: "/v1/responses/{id}", method: "GET", apiKeyRequired: true },
  { path: "/v1/responses/{id}", method: "DELETE", apiKeyRequired: true },
  { path: "/v1/responses/{id}/input_items", method: "GET", apiKeyRequired: true },
  { path: "/v1/responses/{id}/cancel", method: "POST", apiKeyRequired: true },
  { path: "/v1/embeddings", method: "POST", apiKeyRequired: true },
  { path: "/v1/models/{model}", method: "GET", apiKeyRequired: true },
  { path: STRIPE_WEBHOOK_PATH, method: "POST", apiKeyRequired: false },
];

/** The plans file the program writes next to the bundled `index.js` (the function resolves it against /var/task). */
export const PLANS_FILE = "plans.json";

/** Lambda's limit on the total size of a function's environment variables. */
export const LAMBDA_ENVIRONMENT_LIMIT_BYTES = 4096;

/**
 * What the function knows about a plan (one entry of `plans.json` / `PLANS`): the models it may call; when it bills,
 * its prices (micro-units); how it is paid for; the output cap; and the quota whose period `GET /v1/usage` reports.
 */
export interface FunctionPlan {
  models?: string[];
  pricing?: { currency: string; prices: Record<string, ModelPrice> };
  billing: BillingMode;
  /** Only when the stack config sets one: the function applies its own default (4096) to prepaid plans. */
  maxOutputTokens?: number;
  quota?: { limit: number; period: QuotaPeriod; offset: number };
}

/**
 * The function's plans (`plans.json` on AWS, the `PLANS` variable locally): what the function enforces and prices.
 * A billing plan without a `models` list may call exactly its priced models.
 */
export function functionPlans(plans: Record<string, PlanConfig>): Record<string, FunctionPlan> {
  return Object.fromEntries(
    Object.entries(plans).map(([name, plan]) => {
      const entry: Partial<FunctionPlan> = {};
      const models = plan.models ?? (plan.prices ? Object.keys(plan.prices) : undefined);
      if (models) entry.models = models;
      if (plan.prices) entry.pricing = { currency: plan.currency ?? "usd", prices: plan.prices };
      entry.billing = plan.billing;
      if (plan.maxOutputTokens !== undefined) entry.maxOutputTokens = plan.maxOutputTokens;
      if (plan.quota) entry.quota = { ...plan.quota };
      return [name, entry as FunctionPlan];
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

/**
 * The SSM SecureString holding the credits webhook's signing secret (`whsec_…`), which the component creates from
 * the Stripe endpoint it creates (no stack config value): its name reaches the function as
 * STRIPE_WEBHOOK_SECRET_PARAMETER, its version is part of SECRETS_VERSION.
 */
export const STRIPE_WEBHOOK_SECRET_PARAMETER = {
  envVar: "STRIPE_WEBHOOK_SECRET_PARAMETER",
  slug: "stripe-webhook-secret",
  description: "metered-ai-api: signing secret of the Stripe credits webhook",
} as const;

/** Every SSM parameter the function reads, in SECRETS_VERSION's order. */
export const FUNCTION_SECRET_PARAMETERS = [...SECRET_PARAMETERS, STRIPE_WEBHOOK_SECRET_PARAMETER] as const;

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

/** Logical name of the customers table component (`infra/customers-table.ts`); its table is `<this>-table`. */
export const CUSTOMERS_COMPONENT_NAME = "customers";

/** The customers table's name as Pulumi auto-names it: CUSTOMERS_TABLE's size. */
export function plannedCustomersTableName(): string {
  return `${CUSTOMERS_COMPONENT_NAME}-table-xxxxxxx`;
}

/** Logical name of the responses table component (`infra/responses-table.ts`); its table is `<this>-table`. */
export const RESPONSES_COMPONENT_NAME = "responses";

/** The responses table's name as Pulumi auto-names it: RESPONSES_TABLE's size. */
export function plannedResponsesTableName(): string {
  return `${RESPONSES_COMPONENT_NAME}-table-xxxxxxx`;
}

/**
 * How old a prepaid reservation must be before the forwarder's sweep treats it as left behind by a crash and settles
 * it from the ledger (or releases it): the longest a function invocation can live, plus a minute for the ledger item
 * it writes at the very end to land. A hold younger than that may belong to a request still running.
 */
export function holdStaleAfterMs(config: Pick<StackConfig, "lambdaTimeoutSeconds">): number {
  return config.lambdaTimeoutSeconds * 1000 + 60_000;
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
 * The usage forwarder's environment on AWS besides the names only the deployment knows (the ledger and customers
 * tables, the SSM parameters holding the Moesif application id and, with `stripeBilling: meters`, the Stripe key),
 * which the ledger component adds. No secret is in it. HOLD_STALE_AFTER_MS and CUSTOMERS_TIMEOUT_MS drive its sweep
 * of reservations left behind by a crash.
 */
export function forwarderEnvironment(config: StackConfig): Record<string, string> {
  return {
    MOESIF_BASE_URI: config.moesifBaseUri,
    STRIPE_BILLING: config.stripeBilling,
    FORWARDER_SWEEP_GRACE_MS: String(FORWARDER_SWEEP_GRACE_MS),
    HOLD_STALE_AFTER_MS: String(holdStaleAfterMs(config)),
    CUSTOMERS_TIMEOUT_MS: String(config.customersTimeoutMs),
    LOG_LEVEL: "info",
  };
}

/**
 * The function's environment on AWS, except the generated names the component adds: LEDGER_TABLE, CUSTOMERS_TABLE,
 * RESPONSES_TABLE and
 * the SSM parameters'. No secret is in it: the upstream key, the Moesif application id and the Stripe webhook's
 * signing secret are SSM parameters, named (by the component, which creates them) in UPSTREAM_API_KEY_PARAMETER /
 * MOESIF_APPLICATION_ID_PARAMETER / STRIPE_WEBHOOK_SECRET_PARAMETER and read at the first request that needs them;
 * anyone with `lambda:GetFunctionConfiguration` sees only their names. No customer is in it either (they are items of
 * the customers table), so its size does not grow with the number of customers.
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
    CUSTOMERS_TIMEOUT_MS: String(config.customersTimeoutMs),
    CUSTOMER_CACHE_TTL_MS: String(config.customerCacheTtlMs),
    PLANS_FILE,
  };
}

/**
 * The environment the stack will deploy, with every generated name at its longest. It depends on the stack config's
 * settings and URLs only, never on the customers.
 */
export function plannedEnvironment(config: StackConfig, stack: string): Record<string, string> {
  const parameters = Object.fromEntries(FUNCTION_SECRET_PARAMETERS.map(({ envVar, slug }) => [envVar, plannedParameterName(slug)]));
  return {
    ...functionEnvironment(config, stack),
    ...parameters,
    LEDGER_TABLE: plannedLedgerTableName(),
    CUSTOMERS_TABLE: plannedCustomersTableName(),
    RESPONSES_TABLE: plannedResponsesTableName(),
    // The parameters' versions, e.g. "12.3.1"; room for five digits each.
    SECRETS_VERSION: FUNCTION_SECRET_PARAMETERS.map(() => "99999").join("."),
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
