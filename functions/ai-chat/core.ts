import type { Customer, FunctionConfig } from "./config";
import { isRecord } from "./config";
import {
  ApiError,
  ConfigurationError,
  ForbiddenError,
  ModelNotFoundError,
  NotFoundError,
  RateLimitedError,
  UpstreamError,
  isOpenAiErrorBody,
  toErrorResponse,
} from "./errors";
import { describeError, redact, type Logger } from "./logger";
import { transactionIdFor, type UsageMeter } from "./metering";
import type { UpstreamClient, UpstreamResponse } from "./upstream";
import { NO_USAGE, estimateUsage, extractUsage, type TokenUsage } from "./usage";
import { parseChatCompletionRequest } from "./validate";

/** A request in the core's terms: already decoded from whatever transport carried it. */
export interface ProxyRequest {
  method: string;
  /** Route without the stage, e.g. `/v1/chat/completions`. */
  route: string;
  /** Full URL as the caller used it (for metering). */
  uri: string;
  /** Header names in lower case. */
  headers: Record<string, string>;
  body: Buffer;
  requestId: string;
  apiKeyId?: string;
  sourceIp?: string;
}

export interface ProxyResponse {
  statusCode: number;
  headers: Record<string, string>;
  body: string;
}

export interface CoreDeps {
  config: FunctionConfig;
  upstream: UpstreamClient;
  meter: UsageMeter;
  log: Logger;
  clock: () => number;
}

/** Routes served by the function; API Gateway only forwards these, the local stack too. */
export const ROUTES = [
  { method: "POST", route: "/ai-chat" },
  { method: "POST", route: "/v1/chat/completions" },
  { method: "GET", route: "/v1/models" },
] as const;

/** What one request contributes to its metering record. Filled in as the request progresses. */
interface Metering {
  customer?: Customer;
  model?: string;
  requestBody?: unknown;
  responseBody?: unknown;
  usage: TokenUsage;
  usageEstimated: boolean;
  upstreamStatus?: number;
  upstreamMs?: number;
}

const JSON_HEADERS = { "Content-Type": "application/json" } as const;

/**
 * Serves one request: identifies the customer, validates, calls the upstream, and meters the outcome. Never throws:
 * every failure becomes an OpenAI-shaped error response, and every request (errors included) produces exactly one
 * usage record.
 */
export async function handleRequest(request: ProxyRequest, deps: CoreDeps): Promise<ProxyResponse> {
  const startedAt = deps.clock();
  const metering: Metering = { usage: NO_USAGE, usageEstimated: false };
  let response: ProxyResponse;
  try {
    response = await route(request, deps, metering);
  } catch (err) {
    const { status, body, headers } = toErrorResponse(err);
    if (status >= 500) deps.log.error("request_failed", { request_id: request.requestId, status, error: describeError(err) });
    metering.responseBody = body;
    response = { statusCode: status, headers: { ...JSON_HEADERS, ...headers }, body: JSON.stringify(body) };
  }
  response.headers["x-request-id"] = request.requestId;
  const finishedAt = deps.clock();

  // Metering must not change the caller's answer: the meter bounds its own time and never rejects, and this catch
  // is the belt to those braces.
  try {
    await deps.meter.record({
      transactionId: transactionIdFor(request.requestId),
      requestId: request.requestId,
      method: request.method,
      route: request.route,
      uri: request.uri,
      startedAt,
      finishedAt,
      apiKeyId: request.apiKeyId,
      customer: metering.customer,
      sourceIp: request.sourceIp,
      model: metering.model,
      usage: metering.usage,
      usageEstimated: metering.usageEstimated,
      upstreamStatus: metering.upstreamStatus,
      upstreamMs: metering.upstreamMs,
      status: response.statusCode,
      requestHeaders: request.headers,
      responseHeaders: response.headers,
      requestBody: metering.requestBody,
      responseBody: metering.responseBody,
    });
  } catch (err) {
    deps.log.error("metering_failed", { request_id: request.requestId, error: describeError(err) });
  }

  deps.log.info("request", {
    request_id: request.requestId,
    method: request.method,
    route: request.route,
    status: response.statusCode,
    customer_id: metering.customer?.customerId,
    model: metering.model,
    prompt_tokens: metering.usage.prompt_tokens,
    completion_tokens: metering.usage.completion_tokens,
    usage_estimated: metering.usageEstimated,
    upstream_status: metering.upstreamStatus,
    upstream_ms: metering.upstreamMs,
    duration_ms: finishedAt - startedAt,
  });
  return response;
}

async function route(request: ProxyRequest, deps: CoreDeps, metering: Metering): Promise<ProxyResponse> {
  const { config } = deps;
  const known = ROUTES.find((r) => r.route === request.route && r.method === request.method);
  if (!known) throw new NotFoundError(`Invalid URL (${request.method} ${request.route})`, "unknown_url");

  if (config.problems.length > 0) {
    deps.log.error("configuration_invalid", { problems: config.problems });
    throw new ConfigurationError("The service is misconfigured and cannot serve requests; its operator can see why in the function's logs.");
  }

  // Usage that cannot be billed is not served.
  const customer = request.apiKeyId ? config.customers[request.apiKeyId] : undefined;
  if (!customer) throw new ForbiddenError("This API key is not assigned to a customer.");
  metering.customer = customer;

  if (!config.upstreamApiKey) {
    deps.log.error("configuration_invalid", { problems: ["no upstream API key: set UPSTREAM_API_KEY (or Authorization=Bearer …)"] });
    throw new ConfigurationError("The service has no upstream API key configured.");
  }

  if (known.route === "/v1/models") return listModels(customer, deps, metering);
  return chatCompletion(request, customer, deps, metering, known.route === "/ai-chat");
}

async function chatCompletion(
  request: ProxyRequest,
  customer: Customer,
  deps: CoreDeps,
  metering: Metering,
  isSeedRoute: boolean,
): Promise<ProxyResponse> {
  const { request: chat, text: requestText } = parseChatCompletionRequest(request.body, deps.config.maxRequestBytes, request.headers["content-type"]);
  metering.model = chat.model;
  metering.requestBody = chat;
  const allowed = deps.config.plans[customer.plan]?.models;
  if (allowed && !allowed.includes(chat.model)) throw new ModelNotFoundError(chat.model);

  // The caller's text goes upstream unchanged, so fields this proxy does not know pass through untouched.
  const upstream = await callUpstream(deps, metering, { method: "POST", path: "/chat/completions", body: requestText });
  const { text, json } = decodeJson(upstream.body);
  if (upstream.status >= 200 && upstream.status < 300) {
    // A 2xx without `choices` (some servers answer errors with 200) delivered nothing, so it is not billed.
    if (!isRecord(json) || !Array.isArray(json.choices)) {
      throw new UpstreamError("The upstream model server returned a response that is not a chat completion.", "upstream_bad_response");
    }
    const reported = extractUsage(json);
    metering.usage = reported ?? estimateUsage(chat.messages, json, chat.model);
    metering.usageEstimated = !reported;
    metering.responseBody = json;
    const body = isSeedRoute && deps.config.responseEnvelope === "request_payload" ? `{"request_payload":${text}}` : text;
    return { statusCode: upstream.status, headers: { ...JSON_HEADERS }, body };
  }
  return upstreamFailure(upstream, text, json, deps, metering);
}

async function listModels(customer: Customer, deps: CoreDeps, metering: Metering): Promise<ProxyResponse> {
  const allowed = deps.config.plans[customer.plan]?.models;
  if (allowed) {
    const body = { object: "list", data: allowed.map((id) => ({ id, object: "model", created: 0, owned_by: "metered-ai-api" })) };
    metering.responseBody = body;
    return { statusCode: 200, headers: { ...JSON_HEADERS }, body: JSON.stringify(body) };
  }
  // No list on the plan: every model is allowed, so the upstream's own list is the answer.
  const upstream = await callUpstream(deps, metering, { method: "GET", path: "/models" });
  const { text, json } = decodeJson(upstream.body);
  if (upstream.status >= 200 && upstream.status < 300) {
    if (!isRecord(json)) throw new UpstreamError("The upstream model server returned a response that is not a JSON object.", "upstream_bad_response");
    metering.responseBody = json;
    return { statusCode: 200, headers: { ...JSON_HEADERS }, body: text };
  }
  return upstreamFailure(upstream, text, json, deps, metering);
}

async function callUpstream(deps: CoreDeps, metering: Metering, request: Parameters<UpstreamClient["send"]>[0]): Promise<UpstreamResponse> {
  const started = deps.clock();
  try {
    const response = await deps.upstream.send(request);
    metering.upstreamStatus = response.status;
    return response;
  } finally {
    metering.upstreamMs = deps.clock() - started;
  }
}

/**
 * Maps a non-2xx upstream answer. Client errors the caller can fix pass through; the service's own credential and
 * server problems become 502, because the caller cannot fix them. No completion was delivered, so usage stays zero.
 */
function upstreamFailure(upstream: UpstreamResponse, text: string, json: unknown, deps: CoreDeps, metering: Metering): ProxyResponse {
  const status = upstream.status;
  if (status === 401 || status === 403 || status === 407) {
    deps.log.error("upstream_rejected_credentials", { upstream_status: status });
    throw new UpstreamError("The upstream model server rejected this service's credentials.", "upstream_auth_failed");
  }
  if (status === 429) {
    if (isOpenAiErrorBody(json) && json.error.code === "insufficient_quota") deps.log.error("upstream_insufficient_quota", { upstream_status: status });
    throw new RateLimitedError("The upstream model server is rate limiting requests; retry later.", upstream.headers["retry-after"]);
  }
  if (status >= 400 && status < 500) {
    if (!isOpenAiErrorBody(json)) {
      throw new ApiError(status, `The upstream model server refused the request (HTTP ${status}).`, "invalid_request_error", "upstream_error");
    }
    // Defensive: an upstream that echoes the credential it was given must not leak it.
    const body = redact(text, deps.config.upstreamApiKey ? [deps.config.upstreamApiKey] : []);
    metering.responseBody = JSON.parse(body) as unknown;
    return { statusCode: status, headers: { ...JSON_HEADERS }, body };
  }
  throw new UpstreamError(`The upstream model server failed (HTTP ${status}).`, "upstream_failed");
}

function decodeJson(body: Buffer): { text: string; json: unknown } {
  const text = body.toString("utf8");
  try {
    return { text, json: JSON.parse(text) as unknown };
  } catch {
    return { text, json: undefined };
  }
}
