/**
 * The ONLY place the program reads Pulumi config. Returns a validated, typed StackConfig; a bad value fails the
 * program with a message naming the key (see stack-config.ts for the rules and defaults).
 *
 * The defaults live twice on purpose: in `Pulumi.yaml` (`default:`), because the CLI treats every project key
 * without one as required and stops before the program runs (pulumi/pulumi v3.248.0
 * sdk/go/common/workspace/config.go:314, `!foundOnStack && !hasValue && !hasDefault` → "Stack '…' is missing
 * configuration value"), and in stack-config.ts, because unit tests and the local stack never go through the CLI.
 * tests/infra/pulumi-yaml.test.ts keeps the two equal.
 */
import * as pulumi from "@pulumi/pulumi";
import { parseStackConfig, StackConfigError, type StackConfig } from "./stack-config";

export interface DeployConfig extends StackConfig {
  /** Bearer key for the upstream model server (secret). */
  upstreamApiKey: pulumi.Output<string>;
  /** Moesif Collector Application Id (secret). */
  moesifApplicationId: pulumi.Output<string>;
  /**
   * The Stripe key the usage forwarder sends meter events with (secret): `stripeMeterApiKey`, else the Stripe
   * provider's `stripe:apiKey`. Only with `stripeBilling: meters`.
   */
  stripeMeterApiKey?: pulumi.Output<string>;
}

/** Every plain (non-secret, scalar) key the program reads. */
export const PLAIN_KEYS = [
  "stageName",
  "upstreamBaseUrl",
  "moesifBaseUri",
  "moesifStripeWebhookUrl",
  "responseEnvelope",
  "logBodies",
  "upstreamTimeoutMs",
  "upstreamIdleTimeoutMs",
  "meteringTimeoutMs",
  "maxRequestBytes",
  "lambdaMemoryMb",
  "lambdaTimeoutSeconds",
  "lambdaArchitecture",
  "logRetentionDays",
  "reservedConcurrency",
  "stageThrottleRateLimit",
  "stageThrottleBurstLimit",
  "manageApiGatewayAccount",
  "stripeBilling",
  "ledgerDeletionProtection",
  "ledgerTimeoutMs",
  "customersTimeoutMs",
  "customerCacheTtlMs",
  "forwarderReservedConcurrency",
] as const;
/** Structured keys (YAML maps). */
export const OBJECT_KEYS = ["plans", "customers"] as const;
/** Secret keys: no `default:` is possible for them (a default is stored unencrypted and fails the CLI's check). */
export const SECRET_KEYS = ["upstreamApiKey", "moesifApplicationId"] as const;
/**
 * Optional secret keys. Not declared in Pulumi.yaml: a declared secret key without a default is required by the CLI,
 * and one with a default fails its check ("must be encrypted as it's secret", pulumi/pulumi v3.248.0
 * sdk/go/common/workspace/config.go validateStackConfigValue: the default is stored unencrypted; pulumi/pulumi#21865),
 * while keys the project does not declare are passed through unchecked (mergeConfig only walks project.Config).
 * The program itself refuses one stored in plain text.
 */
export const OPTIONAL_SECRET_KEYS = ["stripeMeterApiKey"] as const;

export function loadConfig(): DeployConfig {
  const config = new pulumi.Config();
  const values: Record<string, unknown> = {};
  for (const key of PLAIN_KEYS) values[key] = config.get(key);
  for (const key of OBJECT_KEYS) {
    try {
      values[key] = config.getObject(key);
    } catch {
      throw new StackConfigError(key, "is not valid structured config (YAML map)");
    }
  }
  const parsed = parseStackConfig(values, { forDeploy: true, stack: pulumi.getStack() });
  const secret = (key: (typeof SECRET_KEYS)[number], hint: string) => {
    if (config.get(key) === undefined) throw new StackConfigError(key, `is required: pulumi config set --secret ${key} ${hint}`);
    return config.requireSecret(key);
  };
  return {
    ...parsed,
    upstreamApiKey: secret("upstreamApiKey", "<upstream API key>"),
    moesifApplicationId: secret("moesifApplicationId", "<Moesif Collector Application Id>"),
    ...(parsed.stripeBilling === "meters" ? { stripeMeterApiKey: stripeMeterApiKey(config) } : {}),
  };
}

/**
 * The key the forwarder reports meter events with. Best a restricted key (rk_...) that may only write billing meter
 * events, so the function holding it cannot touch customers, prices or payouts; without one, the key the Stripe
 * provider deploys with (`stripe:apiKey`).
 */
function stripeMeterApiKey(config: pulumi.Config): pulumi.Output<string> {
  const key = "stripeMeterApiKey";
  if (config.get(key) !== undefined) {
    // Undeclared in Pulumi.yaml (see OPTIONAL_SECRET_KEYS), so the CLI does not insist on encryption: the program does.
    const isConfigSecret = (pulumi.runtime as unknown as { isConfigSecret?: (fullKey: string) => boolean }).isConfigSecret;
    if (isConfigSecret && !isConfigSecret(`${pulumi.getProject()}:${key}`)) {
      throw new StackConfigError(key, `is stored in plain text; store it encrypted: pulumi config set --secret ${key} rk_...`);
    }
    return config.requireSecret(key);
  }
  const provider = new pulumi.Config("stripe");
  if (provider.get("apiKey") === undefined) {
    throw new StackConfigError(key, "is required with stripeBilling: meters (or the Stripe provider's stripe:apiKey): pulumi config set --secret stripeMeterApiKey rk_...");
  }
  return provider.requireSecret("apiKey");
}
