/**
 * Composition root: config → components → stack outputs. `pulumi up` builds every function bundle itself.
 */
import path from "node:path";
import * as pulumi from "@pulumi/pulumi";
import { bundleFunction } from "./bundle";
import { loadConfig } from "./config";
import { CustomersTable } from "./customers-table";
import {
  CUSTOMERS_COMPONENT_NAME,
  FORWARDER_SECRET_PARAMETERS,
  forwarderEnvironment,
  functionEnvironment,
  functionPlans,
  LEDGER_COMPONENT_NAME,
  PLANS_FILE,
  RESPONSES_COMPONENT_NAME,
  sanitizeStackName,
  SECRET_PARAMETERS,
} from "./function-env";
import { MeteredAiApi } from "./metered-ai-api";
import { MoesifStripeWebhook } from "./moesif-stripe-webhook";
import { ResponsesTable } from "./responses-table";
import { billingCurrencies } from "./stack-config";
import { StripeMeteredBilling } from "./stripe-meters";
import { UsageLedger } from "./usage-ledger";

const config = loadConfig();
const stack = pulumi.getStack();
const root = path.resolve(__dirname, "..");
// One build directory per stack: plans.json differs between stacks.
const buildDir = path.join(root, ".build", "stacks", sanitizeStackName(stack));
const archive = (dir: string) => new pulumi.asset.AssetArchive({ ".": new pulumi.asset.FileArchive(dir) });

// The plans (with prices) ship as a file beside index.js: as a variable they would eat into Lambda's 4 KB environment.
const chat = bundleFunction(path.join(root, "functions", "ai-chat", "index.ts"), path.join(buildDir, "ai-chat"), {
  files: { [PLANS_FILE]: JSON.stringify(functionPlans(config.plans)) },
});
const authorizer = bundleFunction(path.join(root, "functions", "authorizer", "index.ts"), path.join(buildDir, "authorizer"), { tokenizerRanks: false });
const forwarder = bundleFunction(path.join(root, "functions", "usage-forwarder", "index.ts"), path.join(buildDir, "usage-forwarder"), { tokenizerRanks: false });

// The customers table: who each API key belongs to (key items, written below by the API component) and each
// customer's account (balance, reservations, usage counters), which only the functions and the `credits` command write.
const customers = new CustomersTable(CUSTOMERS_COMPONENT_NAME, { deletionProtection: config.ledgerDeletionProtection });
const customersTable = { tableName: customers.tableName, tableArn: customers.tableArn };

// Who created each stored Responses API response: only its creator may read, continue, cancel or delete it.
const responses = new ResponsesTable(RESPONSES_COMPONENT_NAME);

// The ledger first: the chat function is told its table and may only PutItem there.
const forwarderSecrets: Record<string, pulumi.Output<string> | undefined> = {
  MOESIF_APPLICATION_ID_PARAMETER: config.moesifApplicationId,
  STRIPE_API_KEY_PARAMETER: config.stripeMeterApiKey,
};
const ledger = new UsageLedger(LEDGER_COMPONENT_NAME, {
  forwarderCode: archive(forwarder.outdir),
  environment: forwarderEnvironment(config),
  // The Stripe key only with stripeBilling: meters (config.stripeMeterApiKey is undefined otherwise).
  secretParameters: FORWARDER_SECRET_PARAMETERS.filter((p) => forwarderSecrets[p.envVar] !== undefined).map((p) => ({ ...p, value: forwarderSecrets[p.envVar]! })),
  deletionProtection: config.ledgerDeletionProtection,
  architecture: config.lambdaArchitecture,
  logRetentionDays: config.logRetentionDays,
  reservedConcurrency: config.forwarderReservedConcurrency,
  // Its sweep settles the reservations a crash left behind.
  customers: customersTable,
});

const secretValues = { UPSTREAM_API_KEY_PARAMETER: config.upstreamApiKey, MOESIF_APPLICATION_ID_PARAMETER: config.moesifApplicationId };
const api = new MeteredAiApi("metered-ai-api", {
  code: archive(chat.outdir),
  authorizerCode: archive(authorizer.outdir),
  stageName: config.stageName,
  plans: config.plans,
  customers: config.customers,
  environment: functionEnvironment(config, stack),
  // The same list the preview's environment-size check measures (SECRET_PARAMETERS).
  secretParameters: SECRET_PARAMETERS.map((p) => ({ ...p, value: secretValues[p.envVar] })),
  memoryMb: config.lambdaMemoryMb,
  timeoutSeconds: config.lambdaTimeoutSeconds,
  architecture: config.lambdaArchitecture,
  logRetentionDays: config.logRetentionDays,
  reservedConcurrency: config.reservedConcurrency,
  stageThrottle: { rateLimit: config.stageThrottleRateLimit, burstLimit: config.stageThrottleBurstLimit },
  manageApiGatewayAccount: config.manageApiGatewayAccount,
  ledger: { tableName: ledger.tableName, tableArn: ledger.tableArn },
  customersTable,
  responsesTable: { tableName: responses.tableName, tableArn: responses.tableArn },
  // The second Stripe webhook endpoint: paid credit purchases → the function, which credits the balance.
  stripeCreditsWebhook: {},
});

const webhook = new MoesifStripeWebhook("moesif-stripe", { url: config.moesifStripeWebhookUrl! });
// Direct Stripe Billing Meters only when chosen: with `moesif`, Moesif's billing meter reports usage to Stripe, and a
// second path would bill every customer twice.
const meters = config.stripeBilling === "meters" ? new StripeMeteredBilling("stripe-meters", { currencies: billingCurrencies(config.plans) }) : undefined;

/** Stage base URL. */
export const invokeUrl = api.invokeUrl;
/** The seed tutorial's endpoint. */
export const aiChatUrl = pulumi.interpolate`${api.invokeUrl}/ai-chat`;
/** `baseURL` for the official OpenAI SDKs (the key as their `apiKey`, or in `x-api-key`). */
export const openaiBaseUrl = pulumi.interpolate`${api.invokeUrl}/v1`;
/** Customer id → API key value. `pulumi stack output apiKeys --show-secrets`. */
export const apiKeys = api.apiKeyValues;
export const apiKeyIds = api.apiKeyIds;
export const usagePlanIds = api.usagePlanIds;
export const functionName = api.functionName;
/** `aws logs tail <functionLogGroupName>`: the function's log group (auto-named, so stacks never collide). */
export const functionLogGroupName = api.functionLogGroupName;
export const authorizerFunctionName = api.authorizerFunctionName;
/** The stage's JSON access log. */
export const accessLogGroupName = api.accessLogGroupName;
/** Where the secrets live (names only). */
export const upstreamApiKeyParameter = api.parameterNames.apply((names) => names.UPSTREAM_API_KEY_PARAMETER);
export const moesifApplicationIdParameter = api.parameterNames.apply((names) => names.MOESIF_APPLICATION_ID_PARAMETER);
export const stripeWebhookEndpointId = webhook.endpointId;
export const stripeWebhookSecret = webhook.signingSecret;
/** The usage ledger (DynamoDB): one item per metered request. */
export const ledgerTableName = ledger.tableName;
export const ledgerTableArn = ledger.tableArn;
export const forwarderFunctionName = ledger.forwarderFunctionName;
export const forwarderLogGroupName = ledger.forwarderLogGroupName;
/** The customers table (DynamoDB): key items (API key id → customer, plan) and accounts (prepaid balances, usage). */
export const customersTableName = customers.tableName;
export const customersTableArn = customers.tableArn;
/** The responses table (DynamoDB, TTL 30 days): the creator of each stored Responses API response. */
export const responsesTableName = responses.tableName;
export const responsesTableArn = responses.tableArn;
/** Where Stripe posts paid credit purchases (the second webhook endpoint), and that endpoint's id. */
export const stripeCreditsWebhookUrl = api.stripeCreditsWebhookUrl!;
export const stripeCreditsWebhookEndpointId = api.stripeCreditsWebhookEndpointId!;
/** The SSM parameter holding that endpoint's signing secret (name only). */
export const stripeCreditsWebhookSecretParameter = api.parameterNames.apply((names) => names.STRIPE_WEBHOOK_SECRET_PARAMETER);
/** Stream batches the forwarder gave up on (their items stay in the ledger's backlog); alarm on its depth. */
export const forwarderDeadLetterQueueUrl = ledger.deadLetterQueueUrl;
/** With stripeBilling: meters, the Stripe meter, product and currency → metered price a subscription item uses. */
export const stripeMeterId = meters?.meterId;
export const stripeProductId = meters?.productId;
export const stripePriceIds = meters?.priceIds;
