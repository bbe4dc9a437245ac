/**
 * The Lambda adapter: API Gateway REST proxy event (payload 1.0) → core request → core → proxy result.
 * Everything else lives in the core (`core.ts`) and its ports, which are built once per cold start below.
 */
import type { APIGatewayProxyEvent, APIGatewayProxyResult, Context } from "aws-lambda";
import { loadFunctionConfig } from "./config";
import { handleRequest, type CoreDeps, type ProxyRequest } from "./core";
import { toErrorResponse } from "./errors";
import { createLogger, describeError } from "./logger";
import { NO_METER } from "./metering";
import { MoesifMeter } from "./moesif";
import { AxiosUpstreamClient } from "./upstream";

/** Builds the production ports from the environment. `write` redirects log lines (tests, the local stack). */
export function createDeps(env: NodeJS.ProcessEnv = process.env, options: { write?: (line: string) => void } = {}): CoreDeps {
  const config = loadFunctionConfig(env);
  const log = createLogger({ level: env.LOG_LEVEL, secrets: [config.upstreamApiKey, config.moesif.applicationId], write: options.write });
  const upstream = new AxiosUpstreamClient({ baseUrl: config.upstreamBaseUrl, apiKey: config.upstreamApiKey, timeoutMs: config.upstreamTimeoutMs });
  const meter = config.moesif.applicationId
    ? new MoesifMeter({ ...config.moesif, applicationId: config.moesif.applicationId, log })
    : NO_METER;
  if (!config.moesif.applicationId) log.warn("metering_disabled", { reason: "MOESIF_APPLICATION_ID is not set; usage is only logged" });
  return { config, upstream, meter, log, clock: Date.now };
}

/**
 * Builds a Lambda handler around lazily created dependencies (once per cold start). Tests pass their own.
 * The returned function declares two parameters on purpose: the nodejs24.x runtime refuses handlers with a callback.
 */
export function createHandler(makeDeps: () => CoreDeps = () => createDeps()) {
  let deps: CoreDeps | undefined;
  return async function handler(event: APIGatewayProxyEvent, context: Context): Promise<APIGatewayProxyResult> {
    try {
      deps ??= makeDeps();
      const response = await handleRequest(toProxyRequest(event, context), deps);
      return { statusCode: response.statusCode, headers: response.headers, body: response.body };
    } catch (err) {
      // Unreachable by design (the core never throws); kept so that a bug can never fail the invocation.
      console.error(JSON.stringify({ level: "error", message: "handler_failed", error: describeError(err) }));
      const { status, body } = toErrorResponse(err);
      return { statusCode: status, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    }
  };
}

/** The Lambda entry point (`index.handler`). */
export const handler = createHandler();

/** Converts a REST proxy event. The route is the resource, or the path without the stage for proxy resources. */
export function toProxyRequest(event: APIGatewayProxyEvent, context: Pick<Context, "awsRequestId">): ProxyRequest {
  const headers: Record<string, string> = {};
  for (const [name, value] of Object.entries(event.headers ?? {})) if (typeof value === "string") headers[name.toLowerCase()] = value;
  for (const [name, values] of Object.entries(event.multiValueHeaders ?? {})) {
    if (!(name.toLowerCase() in headers) && Array.isArray(values) && values.length > 0) headers[name.toLowerCase()] = values.join(", ");
  }
  const stage = event.requestContext?.stage;
  let route = event.resource && !event.resource.includes("{") ? event.resource : event.path ?? "/";
  if (route !== event.resource && stage && route.startsWith(`/${stage}/`)) route = route.slice(stage.length + 1);
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(event.queryStringParameters ?? {})) if (typeof value === "string") query.append(name, value);
  const search = query.toString();
  const host = headers.host ?? "localhost";
  const proto = headers["x-forwarded-proto"] ?? "https";
  return {
    method: (event.httpMethod ?? "GET").toUpperCase(),
    route,
    uri: `${proto}://${host}${event.path ?? route}${search ? `?${search}` : ""}`,
    headers,
    body: event.body == null ? Buffer.alloc(0) : Buffer.from(event.body, event.isBase64Encoded ? "base64" : "utf8"),
    requestId: event.requestContext?.requestId ?? context.awsRequestId,
    apiKeyId: event.requestContext?.identity?.apiKeyId ?? undefined,
    sourceIp: event.requestContext?.identity?.sourceIp ?? undefined,
  };
}
