/**
 * Runs the Pulumi program (infra/index.ts) under recording mocks with a given stack config: shared by the program's
 * test files so each can re-run it with its own config (the module cache is cleared on every run).
 */
import { expect } from "chai";
import * as pulumi from "@pulumi/pulumi";
import { mockApiKeyValue, MOCK_CREDITS_WEBHOOK_SECRET, MOCK_WEBHOOK_SECRET, promiseOf, setRecordingMocks, type Recorded } from "../helpers/pulumi-mocks";
import { registerSecret } from "../helpers/secret-scan";

export const PROJECT = "metered-ai-api";
// Realistic lengths: OpenAI project keys are ~164 characters, Moesif application ids ~150, Stripe keys ~107.
export const UPSTREAM_SECRET = `sk-proj-${"Ab3".repeat(52)}`;
export const MOESIF_APP_ID = `eyJhcHAiOiI${"mOeSiF9".repeat(20)}`;
export const STRIPE_KEY = `sk_test_${"51Stripe".repeat(12)}`;
/** A restricted key for meter events only (`stripeMeterApiKey`). */
export const STRIPE_METER_KEY = `rk_test_${"51Meters".repeat(12)}`;
export const WEBHOOK_URL = "https://api.moesif.net/example/stripe/webhook";
registerSecret(UPSTREAM_SECRET, MOESIF_APP_ID, STRIPE_KEY, STRIPE_METER_KEY, MOCK_WEBHOOK_SECRET, MOCK_CREDITS_WEBHOOK_SECRET);

export const PLANS = {
  starter: {
    rateLimit: 2,
    burstLimit: 5,
    quota: { limit: 1000, period: "MONTH" },
    models: ["gpt-4o-mini"],
    prices: { "gpt-4o-mini": { input: 0.15, cachedInput: 0.075, output: 0.6 } },
  },
  pro: { rateLimit: 20, burstLimit: 40, quota: { limit: 100000, period: "WEEK", offset: 1 }, currency: "usd", prices: { "gpt-4o": { input: "2.50", output: "10.00" } } },
  free: { rateLimit: 1, burstLimit: 1 },
};
export const CUSTOMERS = { acme: { plan: "starter", stripeCustomerId: "cus_acme" }, globex: { plan: "pro", stripeCustomerId: "cus_globex" } };

export const baseConfig: Record<string, string> = {
  [`${PROJECT}:upstreamApiKey`]: UPSTREAM_SECRET,
  [`${PROJECT}:moesifApplicationId`]: MOESIF_APP_ID,
  [`${PROJECT}:moesifStripeWebhookUrl`]: WEBHOOK_URL,
  [`${PROJECT}:stageName`]: "beta",
  "stripe:apiKey": STRIPE_KEY,
  [`${PROJECT}:logRetentionDays`]: "14",
  [`${PROJECT}:plans`]: JSON.stringify(PLANS),
  [`${PROJECT}:customers`]: JSON.stringify(CUSTOMERS),
};
export const SECRET_KEYS = [`${PROJECT}:upstreamApiKey`, `${PROJECT}:moesifApplicationId`, "stripe:apiKey", `${PROJECT}:stripeMeterApiKey`];

export type Program = typeof import("../../infra/index");
// eslint-disable-next-line @typescript-eslint/no-require-imports
const { waitForRPCs } = require("@pulumi/pulumi/runtime/settings") as { waitForRPCs(): Promise<void> };

/**
 * Runs the program under mocks with the given config; returns its module and every resource it registered.
 * `secretKeys` are the keys stored encrypted (as `pulumi config set --secret` would).
 */
export async function runProgram(config: Record<string, string>, stack = "dev", secretKeys: string[] = SECRET_KEYS): Promise<{ program: Program; created: Recorded[] }> {
  const created: Recorded[] = [];
  await setRecordingMocks(created, PROJECT, stack);
  pulumi.runtime.setAllConfig(config, secretKeys);
  delete require.cache[require.resolve("../../infra/index")];
  const program = (await import("../../infra/index")) as Program;
  await promiseOf(program.invokeUrl);
  await promiseOf(program.stripeWebhookEndpointId);
  await promiseOf(program.ledgerTableArn);
  await promiseOf(program.customersTableArn);
  await promiseOf(program.stripeCreditsWebhookEndpointId);
  if (program.stripePriceIds) await promiseOf(program.stripePriceIds);
  await waitForRPCs();
  for (const resource of created) {
    if (resource.type === "aws:apigateway/apiKey:ApiKey") registerSecret(mockApiKeyValue(resource.name));
    if (resource.type === "stripe:index/webhookEndpoint:WebhookEndpoint") registerSecret(resource.state.secret as string);
  }
  return { program, created };
}

export const withConfig = (change: Record<string, string | undefined>): Record<string, string> => {
  const config: Record<string, string> = { ...baseConfig };
  for (const [key, value] of Object.entries(change)) {
    if (value === undefined) delete config[key];
    else config[key] = value;
  }
  return config;
};

/** Look-ups over the recorded resources that fail the test when a resource is missing or not unique. */
export const finder = (created: Recorded[]) => {
  const ofType = (type: string) => created.filter((r) => r.type === type);
  const named = (type: string, name: string) => {
    const found = ofType(type).find((r) => r.name === name);
    expect(found, `${type} ${name}`).to.not.equal(undefined);
    return found!;
  };
  const one = (type: string) => {
    const found = ofType(type);
    expect(found, type).to.have.length(1);
    return found[0];
  };
  return { ofType, named, one };
};

/** All exported stack outputs of the program module. */
export function stackOutputs(program: Program): Array<[string, pulumi.Output<unknown>]> {
  return Object.entries(program).filter(([, value]) => pulumi.Output.isInstance(value)) as Array<[string, pulumi.Output<unknown>]>;
}

/** Runs the program and returns the message it failed with (the test fails if it accepted the config). */
export async function programFailure(config: Record<string, string>, secretKeys?: string[]): Promise<string> {
  let failure: unknown;
  try {
    await runProgram(config, "dev", secretKeys);
  } catch (err) {
    failure = err;
  }
  expect(failure, "the program accepted bad config").to.be.instanceOf(Error);
  return (failure as Error).message;
}
