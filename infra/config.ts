/**
 * The ONLY place the program reads Pulumi config. Returns a validated, typed StackConfig; a bad value fails the
 * program with a message naming the key (see stack-config.ts for the rules and defaults).
 */
import * as pulumi from "@pulumi/pulumi";
import { parseStackConfig, StackConfigError, type StackConfig } from "./stack-config";

export interface DeployConfig extends StackConfig {
  /** Bearer key for the upstream model server. */
  upstreamApiKey: pulumi.Output<string>;
  /** Moesif Collector Application Id. */
  moesifApplicationId: pulumi.Output<string>;
}

const PLAIN_KEYS = [
  "stageName",
  "upstreamBaseUrl",
  "moesifBaseUri",
  "moesifStripeWebhookUrl",
  "responseEnvelope",
  "logBodies",
  "upstreamTimeoutMs",
  "meteringTimeoutMs",
  "maxRequestBytes",
  "lambdaMemoryMb",
  "lambdaTimeoutSeconds",
  "lambdaArchitecture",
  "logRetentionDays",
] as const;

export function loadConfig(): DeployConfig {
  const config = new pulumi.Config();
  const values: Record<string, unknown> = {};
  for (const key of PLAIN_KEYS) values[key] = config.get(key);
  for (const key of ["plans", "customers"]) {
    try {
      values[key] = config.getObject(key);
    } catch {
      throw new StackConfigError(key, "is not valid structured config (YAML map)");
    }
  }
  const parsed = parseStackConfig(values, { forDeploy: true });
  const secret = (key: string, hint: string) => {
    if (config.get(key) === undefined) throw new StackConfigError(key, `is required: pulumi config set --secret ${key} ${hint}`);
    return config.requireSecret(key);
  };
  return {
    ...parsed,
    upstreamApiKey: secret("upstreamApiKey", "<upstream API key>"),
    moesifApplicationId: secret("moesifApplicationId", "<Moesif Collector Application Id>"),
  };
}
