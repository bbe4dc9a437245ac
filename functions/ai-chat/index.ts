/**
 * The Lambda adapter: API Gateway REST proxy event (payload 1.0) → core request → core → response stream.
 * Every route is a STREAM integration (`responseTransferMode: "STREAM"`), so the one handler is a streaming handler
 * that answers buffered requests too (a prelude with Content-Length, one write, end). Everything else lives in the
 * core (`core.ts`) and its ports, which are built once per cold start below.
 */
import type { APIGatewayProxyEvent, Context } from "aws-lambda";
import { loadFunctionConfig, type FunctionConfig } from "./config";
import { handleRequest, type CoreDeps, type ProxyRequest } from "./core";
import { CachedCustomerDirectory, type CustomerDirectory } from "./customers";
import { toErrorResponse } from "./errors";
import { streamifyResponse, type LambdaResponseStream, type StreamingHandler } from "./lambda-stream";
import { createLedgerWriter, LedgerMeter } from "./ledger";
import { createLogger, describeError, type Logger } from "./logger";
import { NO_METER, type UsageMeter } from "./metering";
import { MoesifMeter } from "./moesif";
import { LambdaResponder } from "./responder";
import { DeferredMeter, ParameterStoreSecrets, SsmParameterReader, StaticSecrets, type SecretsPort } from "./secrets";
import { AxiosUpstreamClient } from "./upstream";
import { awsClientOptions } from "../shared/aws-client-options";
import type { CustomerStore } from "../shared/customer-port";
import type { ResponseOwners } from "../shared/response-owners";

/**
 * Builds the production ports from the environment. `write` redirects log lines (tests, the local stack).
 *
 * Secrets named by `UPSTREAM_API_KEY_PARAMETER` / `MOESIF_APPLICATION_ID_PARAMETER` /
 * `STRIPE_WEBHOOK_SECRET_PARAMETER` are read from SSM by the core on the first request (see `secrets.ts`); the logger, the upstream client and the meter read them from the secrets
 * port once known, so nothing here waits for the network.
 */
export function createDeps(env: NodeJS.ProcessEnv = process.env, options: { write?: (line: string) => void } = {}): CoreDeps {
  const config = loadFunctionConfig(env);
  const direct = { upstreamApiKey: config.upstreamApiKey, moesifApplicationId: config.moesif.applicationId, stripeWebhookSecret: config.stripeWebhookSecret };
  const parameters = config.secretParameters;
  const usesParameters = !!(parameters.upstreamApiKey || parameters.moesifApplicationId || parameters.stripeWebhookSecret);
  // The logger exists before the secrets port (which logs), so it asks for the secrets through this indirection.
  let secrets: SecretsPort | undefined;
  const log = createLogger({ level: env.LOG_LEVEL, secrets: () => [...Object.values(direct), ...Object.values(secrets?.current() ?? {})], write: options.write });
  secrets = usesParameters
    ? new ParameterStoreSecrets({ direct, parameters, log, reader: new SsmParameterReader(awsClientOptions(env, "SSM")) })
    : new StaticSecrets(direct);
  const port = secrets;

  const upstream = new AxiosUpstreamClient({ baseUrl: config.upstreamBaseUrl, apiKey: () => port.current().upstreamApiKey, timeoutMs: config.upstreamTimeoutMs });
  const moesif = (applicationId: string): UsageMeter => new MoesifMeter({ ...config.moesif, applicationId, log });
  let moesifMeter: UsageMeter | undefined;
  if (parameters.moesifApplicationId) moesifMeter = new DeferredMeter(port, moesif, log);
  else if (direct.moesifApplicationId) moesifMeter = moesif(direct.moesifApplicationId);
  const meter = config.ledger.table ? ledgerMeter(env, config, config.ledger.table, moesifMeter, log) : moesifMeter;
  if (!meter) log.warn("metering_disabled", { reason: "neither LEDGER_TABLE nor MOESIF_APPLICATION_ID_PARAMETER nor MOESIF_APPLICATION_ID is set; usage is only logged" });
  const accounts = config.customerStore.table ? customerStore(env, config, log) : undefined;
  const responseOwners = responseOwnerStore(env, config, log);
  return { config, upstream, meter: meter ?? NO_METER, log, clock: Date.now, secrets: port, ...accounts, ...(responseOwners ? { responseOwners } : {}) };
}

/**
 * Who created each stored response: the responses table with `RESPONSES_TABLE` (the SDK required here, as for the
 * customers table), else this instance's memory, which the log says once: a response created through another
 * instance (or before a cold start) is then "not found", which is safe but surprising.
 */
function responseOwnerStore(env: NodeJS.ProcessEnv, config: FunctionConfig, log: Logger): ResponseOwners | undefined {
  const { MemoryResponseOwners, createResponseOwnersFromEnv } = require("../shared/response-owner-store") as typeof import("../shared/response-owner-store");
  if (!config.responseOwners.table) {
    log.warn("response_owners_in_memory", { reason: "RESPONSES_TABLE is not set: stored responses are known only to the instance that created them" });
    return new MemoryResponseOwners();
  }
  try {
    return createResponseOwnersFromEnv(env, { timeoutMs: config.responseOwners.timeoutMs });
  } catch (err) {
    // Only a broken deployment gets here. Without the table no ownership can be checked: the Responses routes
    // answer 503 (`response_store_unavailable`), chat is unaffected.
    log.error("response_owners_unavailable", { table: config.responseOwners.table, error: describeError(err) });
    return undefined;
  }
}

/**
 * With `CUSTOMERS_TABLE`, customers come from the table (cached, see `customers.ts`) and prepaid balances and usage
 * counters live there. The store module (and with it the DynamoDB SDK) is required here, not imported at the top,
 * so a function without the table never loads it; it is made once per container, before the first request.
 */
function customerStore(env: NodeJS.ProcessEnv, config: FunctionConfig, log: Logger): { store: CustomerStore; customers: CustomerDirectory } | undefined {
  try {
    const { createCustomerStoreFromEnv } = require("../shared/customer-store") as typeof import("../shared/customer-store");
    const store = createCustomerStoreFromEnv(env, { timeoutMs: config.customerStore.timeoutMs });
    return { store, customers: new CachedCustomerDirectory({ store, ttlMs: config.customerStore.cacheTtlMs, log }) };
  } catch (err) {
    // Only a broken deployment gets here (the SDK missing from the runtime). Nothing can be attributed without the
    // table, so every request answers 500 and says why in the log.
    log.error("customer_store_unavailable", { table: config.customerStore.table, error: describeError(err) });
    config.problems.push(`the customers table (CUSTOMERS_TABLE) cannot be used: ${describeError(err).message}`);
    return undefined;
  }
}

/**
 * With `LEDGER_TABLE`, the request path writes the ledger and the direct Moesif send (today's meter) becomes its
 * fallback. The DynamoDB client is made here, once per container (with the other ports, before the first request
 * is served), so loading the SDK never eats into a write's time budget.
 */
function ledgerMeter(env: NodeJS.ProcessEnv, config: FunctionConfig, table: string, fallback: UsageMeter | undefined, log: Logger): UsageMeter | undefined {
  if (!fallback) {
    log.warn("ledger_fallback_disabled", {
      reason: "no Moesif application id is set: an item the ledger cannot take is kept only in memory and in its ledger_deferred log line",
    });
  }
  try {
    const writer = createLedgerWriter(env, table, config.ledger.timeoutMs);
    return new LedgerMeter({ writer, timeoutMs: config.ledger.timeoutMs, logBodies: config.moesif.logBodies, stripeBilling: config.stripeBilling, fallback: fallback ?? NO_METER, log });
  } catch (err) {
    // Only a broken deployment gets here (the SDK missing from the runtime); serve and meter through Moesif.
    log.error("ledger_unavailable", { table, error: describeError(err), fallback: fallback ? "direct Moesif send" : "none" });
    return fallback;
  }
}

/** The Lambda context the handler reads; on the streaming runtime it has no `succeed`/`fail`/`done`. */
export type HandlerContext = Pick<Context, "awsRequestId"> & Partial<Pick<Context, "getRemainingTimeInMillis" | "callbackWaitsForEmptyEventLoop">>;

/**
 * Builds the streaming Lambda handler around lazily created dependencies (once per cold start). Tests pass their
 * own. The handler is `(event, responseStream, context)`, tagged by `streamifyResponse`; it always writes a prelude
 * (even when it fails) and ends the stream, and meters after the end (the runtime lets a handler work after `end()`
 * until it resolves: research note §4, runtime-interface-client src/Runtime.js L136-154).
 */
export function createHandler(makeDeps: () => CoreDeps = () => createDeps()): StreamingHandler<APIGatewayProxyEvent, HandlerContext> {
  let deps: CoreDeps | undefined;
  return streamifyResponse(async function handler(event: APIGatewayProxyEvent, responseStream: LambdaResponseStream, context: HandlerContext): Promise<void> {
    // Keep-alive sockets (upstream, Moesif) must not hold the invocation open until its timeout once the handler
    // resolved (opennextjs-aws PR #487; runtime-interface-client src/StreamingContext.js L31-42).
    if (context && "callbackWaitsForEmptyEventLoop" in context) context.callbackWaitsForEmptyEventLoop = false;
    const responder = new LambdaResponder(responseStream);
    try {
      deps ??= makeDeps();
      await handleRequest(toProxyRequest(event, context), deps, responder);
    } catch (err) {
      // Unreachable by design (the core never throws); kept so that a bug can never fail the invocation.
      console.error(JSON.stringify({ level: "error", message: "handler_failed", error: describeError(err) }));
      if (!responder.started) {
        const { status, body } = toErrorResponse(err);
        await responder.send({ statusCode: status, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }).catch(() => undefined);
      }
    } finally {
      // Whatever happened, the runtime gets a prelude and an ended stream (otherwise API Gateway answers 500 late).
      responder.close();
    }
  });
}

/** The Lambda entry point (`index.handler`): a streaming handler. */
export const handler = createHandler();

/**
 * Converts a REST proxy event. The route is the matched resource template (`/v1/responses/{id}`), so the meter
 * groups requests by route; behind a greedy proxy resource (`{proxy+}`) it is the path without the stage. The
 * metered URI is built from what API Gateway asserts (domain name, stage, the matched route's path), never from the
 * client's `Host` or `X-Forwarded-Proto`, so a caller cannot make its events look like another path.
 */
export function toProxyRequest(event: APIGatewayProxyEvent, context: HandlerContext): ProxyRequest {
  const headers: Record<string, string> = {};
  for (const [name, value] of Object.entries(event.headers ?? {})) if (typeof value === "string") headers[name.toLowerCase()] = value;
  for (const [name, values] of Object.entries(event.multiValueHeaders ?? {})) {
    if (!(name.toLowerCase() in headers) && Array.isArray(values) && values.length > 0) headers[name.toLowerCase()] = values.join(", ");
  }
  const stage = event.requestContext?.stage;
  const withoutStage = (path: string) => (stage && path.startsWith(`/${stage}/`) ? path.slice(stage.length + 1) : path);
  const resource = event.resource;
  const templated = !!resource && resource.includes("{");
  const route = resource && !resource.includes("+}") ? resource : withoutStage(event.path ?? "/");
  // A templated route's URI is the path actually asked for (the template's values filled in by API Gateway's match).
  const path = templated ? withoutStage(event.path ?? resource) : route;
  const domain = event.requestContext?.domainName || "localhost";
  const remaining = typeof context.getRemainingTimeInMillis === "function" ? context.getRemainingTimeInMillis() : undefined;
  const pathParameters = stringValues(event.pathParameters);
  const query = queryOf(event);
  return {
    method: (event.httpMethod ?? "GET").toUpperCase(),
    route,
    uri: `https://${domain}${stage ? `/${stage}` : ""}${path}`,
    headers,
    body: event.body == null ? Buffer.alloc(0) : Buffer.from(event.body, event.isBase64Encoded ? "base64" : "utf8"),
    requestId: event.requestContext?.requestId ?? context.awsRequestId,
    apiKeyId: event.requestContext?.identity?.apiKeyId ?? undefined,
    sourceIp: event.requestContext?.identity?.sourceIp ?? undefined,
    stage: stage || undefined,
    remainingMs: typeof remaining === "number" && Number.isFinite(remaining) && remaining > 0 ? remaining : undefined,
    ...(pathParameters ? { pathParameters } : {}),
    ...(query ? { query } : {}),
  };
}

/** The string entries of an API Gateway map (`null` when it has none, as API Gateway sends it). */
function stringValues(map: Record<string, string | undefined> | null | undefined): Record<string, string> | undefined {
  if (!map) return undefined;
  const values: Record<string, string> = {};
  for (const [name, value] of Object.entries(map)) if (typeof value === "string") values[name] = value;
  return Object.keys(values).length > 0 ? values : undefined;
}

/** The query string's parameters, every value of a repeated one (`multiValueQueryStringParameters`, else the single-value map). */
function queryOf(event: APIGatewayProxyEvent): Record<string, string[]> | undefined {
  const query: Record<string, string[]> = {};
  for (const [name, values] of Object.entries(event.multiValueQueryStringParameters ?? {})) {
    if (Array.isArray(values)) query[name] = values.filter((v): v is string => typeof v === "string");
  }
  if (Object.keys(query).length === 0) for (const [name, value] of Object.entries(event.queryStringParameters ?? {})) if (typeof value === "string") query[name] = [value];
  return Object.keys(query).length > 0 ? query : undefined;
}
