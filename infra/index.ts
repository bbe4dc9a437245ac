/**
 * Composition root: config → components → stack outputs. `pulumi up` builds the function bundle itself.
 */
import path from "node:path";
import * as pulumi from "@pulumi/pulumi";
import { bundleFunction } from "./bundle";
import { loadConfig } from "./config";
import { MeteredAiApi } from "./metered-ai-api";
import { MoesifStripeWebhook } from "./moesif-stripe-webhook";

const config = loadConfig();
const root = path.resolve(__dirname, "..");
const bundle = bundleFunction(path.join(root, "functions", "ai-chat", "index.ts"), path.join(root, ".build", "ai-chat"));

const api = new MeteredAiApi("metered-ai-api", {
  code: new pulumi.asset.AssetArchive({ ".": new pulumi.asset.FileArchive(bundle.outdir) }),
  stageName: config.stageName,
  plans: config.plans,
  customers: config.customers,
  environment: {
    UPSTREAM_BASE_URL: config.upstreamBaseUrl,
    UPSTREAM_API_KEY: config.upstreamApiKey,
    UPSTREAM_TIMEOUT_MS: String(config.upstreamTimeoutMs),
    MAX_REQUEST_BYTES: String(config.maxRequestBytes),
    RESPONSE_ENVELOPE: config.responseEnvelope,
    MOESIF_APPLICATION_ID: config.moesifApplicationId,
    ...(config.moesifBaseUri ? { MOESIF_BASE_URI: config.moesifBaseUri } : {}),
    MOESIF_LOG_BODIES: String(config.logBodies),
    METERING_TIMEOUT_MS: String(config.meteringTimeoutMs),
  },
  memoryMb: config.lambdaMemoryMb,
  timeoutSeconds: config.lambdaTimeoutSeconds,
  architecture: config.lambdaArchitecture,
  logRetentionDays: config.logRetentionDays,
});

const webhook = new MoesifStripeWebhook("moesif-stripe", { url: config.moesifStripeWebhookUrl! });

/** Stage base URL. */
export const invokeUrl = api.invokeUrl;
/** The seed tutorial's endpoint. */
export const aiChatUrl = pulumi.interpolate`${api.invokeUrl}/ai-chat`;
/** `baseURL` for the official OpenAI SDKs (send the key in `x-api-key`). */
export const openaiBaseUrl = pulumi.interpolate`${api.invokeUrl}/v1`;
/** Customer id → API key value. `pulumi stack output apiKeys --show-secrets`. */
export const apiKeys = api.apiKeyValues;
export const apiKeyIds = api.apiKeyIds;
export const usagePlanIds = api.usagePlanIds;
export const functionName = api.functionName;
export const stripeWebhookEndpointId = webhook.endpointId;
export const stripeWebhookSecret = webhook.signingSecret;
