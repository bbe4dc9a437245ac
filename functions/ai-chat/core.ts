import type { Readable } from "node:stream";
import type { Customer, FunctionConfig, Plan } from "./config";
import { billingOf, isRecord, outputCapOf } from "./config";
import {
  capOutputTokens,
  CHAT_OUTPUT_LIMIT_ALIASES,
  choicesOf,
  dearestPrice,
  predictionTokensOf,
  RESPONSES_OUTPUT_FIELDS,
  RESPONSES_OUTPUT_LIMIT_ALIASES,
  reservationFor,
  reserveCredit,
  settleAndCount,
  usageAnswer,
  usagePeriodOf,
  withoutOutputLimitAliases,
  type Hold,
} from "./account";
import { StaticCustomerDirectory, type CustomerDirectory } from "./customers";
import {
  ApiError,
  BadRequestError,
  ConfigurationError,
  DeadlineExceededError,
  ForbiddenError,
  ModelNotFoundError,
  ModelNotPricedError,
  NotFoundError,
  PreviousResponseNotFoundError,
  RateLimitedError,
  ResponseNotFoundError,
  ResponseStoreUnavailableError,
  ResponseTooLargeError,
  UpstreamError,
  isOpenAiErrorBody,
  toErrorResponse,
} from "./errors";
import { relayChatStream } from "./chat-stream";
import { estimateEmbeddingsInputTokens, extractEmbeddingsUsage, isPlausibleEmbeddingsUsage, parseEmbeddingsRequest } from "./embeddings";
import {
  estimateResponsesInputTokens,
  estimateResponsesUsage,
  extractResponsesUsage,
  parseResponsesRequest,
  responsesOutputTextBytes,
  unknowableInput,
  type ResponsesRequest,
} from "./responses";
import { relayResponsesStream } from "./responses-stream";
import { describeError, type Logger } from "./logger";
import { transactionIdFor, type BillingOutcome, type UsageMeter } from "./metering";
import { StaticSecrets, type SecretsPort, type ServiceSecrets } from "./secrets";
import { CollectingResponder, type ProxyResponse, type Responder } from "./responder";
import type { UpstreamClient, UpstreamRequest } from "./upstream";
import {
  NO_USAGE,
  TokenTally,
  completionTextBytes,
  encodingForModel,
  estimateRequestTokens,
  estimateUsage,
  extractUsage,
  isPlausibleUsage,
  type EstimatedRequest,
  type TokenUsage,
} from "./usage";
import { handleStripeWebhook } from "./stripe-webhook";
import { modelOf, parseChatCompletionRequest, type ChatCompletionRequest, type RequestFacts } from "./validate";
import type { CustomerStore } from "../shared/customer-port";
import { stringifyJson } from "../shared/json";
import { costOf, priceFor, type Cost, type ModelPrice, type PlanPricing } from "../shared/pricing";
import { RESPONSE_ID_PATTERN, type ResponseOwner, type ResponseOwners } from "../shared/response-owners";
import { SecretRedactor } from "../shared/secret-redactor";

/** A request in the core's terms: already decoded from whatever transport carried it. */
export interface ProxyRequest {
  method: string;
  /** The matched route (API Gateway's resource template) without the stage, e.g. `/v1/responses/{id}`. */
  route: string;
  /** The URL metered for the request (the actual path, no query), built from trusted request context only (never from client headers). */
  uri: string;
  /** The values of the route's `{…}` segments, decoded (`{ id: "resp_123" }`). */
  pathParameters?: Record<string, string>;
  /** The query string's parameters, every value of a repeated one. */
  query?: Record<string, string[]>;
  /** Header names in lower case. */
  headers: Record<string, string>;
  body: Buffer;
  requestId: string;
  apiKeyId?: string;
  sourceIp?: string;
  /** API Gateway stage. */
  stage?: string;
  /** Milliseconds the platform still gives this invocation when it starts (Lambda's remaining time). */
  remainingMs?: number;
}

export type { ProxyResponse, Responder, StreamWriter } from "./responder";

export interface CoreDeps {
  config: FunctionConfig;
  upstream: UpstreamClient;
  meter: UsageMeter;
  log: Logger;
  clock: () => number;
  /** Where the service's secrets come from; absent means the direct values in `config`. */
  secrets?: SecretsPort;
  /** Who each API key belongs to; absent means the `CUSTOMERS` variable (`config.customers`). */
  customers?: CustomerDirectory;
  /**
   * The customers table's accounts: prepaid balances (required by prepaid plans), the usage counters behind
   * `GET /v1/usage`, and the Stripe webhook's credits.
   */
  store?: CustomerStore;
  /**
   * Who created each stored Responses API response (the responses table, or memory): the stored-response routes and
   * `previous_response_id` are served only to that customer. Absent: those routes answer 503.
   */
  responseOwners?: ResponseOwners;
}

/** Routes served by the function; API Gateway only forwards these, the local stack too. */
export const ROUTES = [
  { method: "POST", route: "/ai-chat" },
  { method: "POST", route: "/v1/chat/completions" },
  { method: "GET", route: "/v1/models" },
  { method: "GET", route: "/v1/usage" },
  { method: "POST", route: "/v1/responses" },
  { method: "GET", route: "/v1/responses/{id}" },
  { method: "DELETE", route: "/v1/responses/{id}" },
  { method: "GET", route: "/v1/responses/{id}/input_items" },
  { method: "POST", route: "/v1/responses/{id}/cancel" },
  { method: "POST", route: "/v1/embeddings" },
  { method: "GET", route: "/v1/models/{model}" },
  // No API key: Stripe signs its events instead (the route's authorization is NONE).
  { method: "POST", route: "/stripe/webhook" },
] as const;

const STRIPE_WEBHOOK_ROUTE = "/stripe/webhook";

/**
 * Lambda's limit on a synchronous response: 6 MiB of serialised JSON (`{statusCode, headers, body}`); the runtime
 * fails anything larger with "Exceeded maximum allowed payload size (6291556 bytes)" and API Gateway answers 502.
 * Since every route became a STREAM integration a buffered answer travels as streamed bytes (up to 200 MB), so this
 * bound is now conservative; it is kept so the function behaves the same whichever integration mode it runs behind.
 */
export const LAMBDA_RESPONSE_LIMIT_BYTES = 6 * 1024 * 1024;

/**
 * Time kept back from the upstream call when the invocation has a deadline: the token estimate, serialising the
 * answer and the margin before the platform's own limit. The metering timeout is kept back on top of it.
 */
export const DEADLINE_RESERVE_MS = 2000;

/**
 * The most the work after the answer can take: the settlement or usage count in the customers table (when there is
 * one), the ledger write (when there is a ledger) and, if it fails, the direct Moesif send that stands in for it,
 * one after the other (`infra/stack-config.ts` checks the same sum). A streamed response's context tokens are
 * written to the responses table alongside them (not after), so that write only counts when it is the longer one.
 */
export function meteringReserveMs(config: FunctionConfig): number {
  const sequential = (config.customerStore.table ? config.customerStore.timeoutMs : 0) + (config.ledger.table ? config.ledger.timeoutMs : 0) + config.moesif.timeoutMs;
  return Math.max(sequential, config.responseOwners.table ? config.responseOwners.timeoutMs : 0);
}

/** What one request contributes to its metering record. Filled in as the request progresses. */
interface Metering {
  customer?: Customer;
  plan?: Plan;
  /** The prepaid reservation, once asked for: settled after the answer, whatever the answer was. */
  hold?: Hold;
  /** The request counts towards its customer's period counters (chat and models; not `/v1/usage`). */
  counted?: boolean;
  /** Not a customer's request (the Stripe webhook): no usage record, no counters. */
  unmetered?: boolean;
  model?: string;
  requestBody?: unknown;
  responseBody?: unknown;
  usage: TokenUsage;
  usageEstimated: boolean;
  cost?: Cost;
  /** Set only when a completion is being returned; the final checks may still take it back. */
  billed: boolean;
  upstreamStatus?: number;
  upstreamMs?: number;
  /** Validation has looked at the body (and taken its model, if it names one). */
  inspected?: boolean;
  /** The answer was streamed: it has been sent and ended already. */
  streamed?: boolean;
  streamError?: string;
  clientDisconnected?: boolean;
  /** Work started once the answer is over that runs alongside settlement and metering (a stored response's context tokens). */
  afterAnswer?: Promise<void>;
}

/** An upstream answer after redaction: nothing reads the raw one. */
interface UpstreamAnswer {
  status: number;
  headers: Record<string, string>;
  text: string;
  json: unknown;
}

const JSON_HEADERS = { "Content-Type": "application/json" } as const;
const SSE_HEADERS = { "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache" } as const;

/**
 * Serves one request: identifies the customer, validates, reserves a prepaid request's credit, calls the upstream,
 * settles the credit and meters the outcome. Never throws: every failure becomes an OpenAI-shaped error response,
 * and every request (errors included; the Stripe webhook excepted) produces exactly one usage record, whose status
 * is the status the caller gets.
 *
 * Billing rule: a request is billed when, and only when, the caller receives a 2xx answer carrying the completion.
 * When the upstream did the work but the caller gets an error instead — the answer is over Lambda's response limit,
 * or the invocation ran out of time — the record says that error and bills nothing. A streamed answer (`stream:
 * true`) is billed once its first event reached the caller, for what the upstream sent until the stream ended,
 * failed or the caller left (see `chat-stream.ts`; `responses-stream.ts` for the Responses API's typed events). The
 * routes that deliver no new work (models, stored responses) are counted and metered at 0 tokens, never billed.
 *
 * Stored responses: every customer reaches the upstream with the service's one key, so the function records who
 * created each response (`deps.responseOwners`) and serves `GET|DELETE /v1/responses/{id}`, its `input_items`, its
 * `cancel` and `previous_response_id` only to that customer; anyone else gets what OpenAI answers for an unknown id,
 * and the upstream is never asked.
 *
 * Prepaid: the most the request can cost is held before the upstream call (429 `insufficient_quota` when the
 * balance does not cover it) and settled at the billed cost (0 when nothing was billed) after the answer.
 *
 * The answer goes to `responder` (whole, or streamed), and is settled and metered only after its last byte was
 * handed over, so neither delays it. Without a responder the answer is collected and returned (a stream as its SSE text).
 */
export async function handleRequest(request: ProxyRequest, deps: CoreDeps, responder?: Responder): Promise<ProxyResponse> {
  const startedAt = deps.clock();
  const deadline = request.remainingMs !== undefined ? startedAt + request.remainingMs : undefined;
  const metering: Metering = { usage: NO_USAGE, usageEstimated: false, billed: false };
  const collector = responder ? undefined : new CollectingResponder();
  const out = responder ?? collector!;
  let response: ProxyResponse;
  try {
    response = await route(request, deps, metering, deadline, out);
  } catch (err) {
    metering.billed = false;
    response = errorResponse(err, request, deps, metering);
  }
  response.headers["x-request-id"] = request.requestId;

  // The caller must get what the record says: check what Lambda can still deliver before metering it.
  const undeliverable = metering.streamed ? undefined : deliveryProblem(response, deps, deadline);
  if (undeliverable) {
    if (metering.billed) {
      deps.log.warn("answer_not_delivered", {
        request_id: request.requestId,
        reason: undeliverable.code,
        upstream_status: metering.upstreamStatus,
        unbilled_prompt_tokens: metering.usage.prompt_tokens,
        unbilled_completion_tokens: metering.usage.completion_tokens,
      });
    }
    metering.billed = false;
    response = errorResponse(undeliverable, request, deps, metering);
    response.headers["x-request-id"] = request.requestId;
  }
  if (!metering.streamed) {
    try {
      await out.send(response);
    } catch (err) {
      deps.log.warn("response_not_sent", { request_id: request.requestId, error: describeError(err) });
    }
  }
  // A request refused before validation (403, 500…) still names its model in the record; one validation saw is not parsed again.
  if (!metering.inspected && !metering.unmetered && request.method === "POST") metering.model = peekModel(request.body, deps.config.maxRequestBytes);
  const usage = metering.billed ? metering.usage : NO_USAGE;
  const cost = metering.billed ? metering.cost : undefined;
  const usageEstimated = metering.billed && metering.usageEstimated;
  const finishedAt = deps.clock();

  // The account is settled after the answer (never delaying it) and before the record, which carries the outcome.
  const billing = metering.unmetered ? undefined : await settleAccount(request, deps, metering, usage, cost, finishedAt);

  // Metering must not change the caller's answer: the meter bounds its own time and never rejects, and this catch
  // is the belt to those braces. The Stripe webhook is not a customer's request: it has no usage record.
  try {
    if (!metering.unmetered) await deps.meter.record({
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
      stage: request.stage,
      model: metering.model,
      usage,
      usageEstimated,
      cost,
      billed: metering.billed,
      upstreamStatus: metering.upstreamStatus,
      upstreamMs: metering.upstreamMs,
      streamed: metering.streamed,
      streamError: metering.streamError,
      clientDisconnected: metering.clientDisconnected,
      status: response.statusCode,
      requestHeaders: request.headers,
      responseHeaders: response.headers,
      requestBody: metering.requestBody,
      responseBody: metering.responseBody,
      billing,
    });
  } catch (err) {
    deps.log.error("metering_failed", { request_id: request.requestId, error: describeError(err) });
  }
  // Never rejects (its failures are logged where it is made).
  if (metering.afterAnswer) await metering.afterAnswer;

  deps.log.info("request", {
    request_id: request.requestId,
    method: request.method,
    route: request.route,
    stage: request.stage,
    status: response.statusCode,
    customer_id: metering.customer?.customerId,
    model: metering.model,
    prompt_tokens: usage.prompt_tokens,
    completion_tokens: usage.completion_tokens,
    usage_estimated: usageEstimated,
    billed: metering.billed,
    cost_micros: cost?.micros,
    currency: cost?.currency,
    billing_mode: billing?.mode,
    charged_micros: billing?.chargedMicros,
    balance_after_micros: billing?.balanceAfterMicros,
    settlement: billing?.settlement,
    upstream_status: metering.upstreamStatus,
    upstream_ms: metering.upstreamMs,
    streamed: metering.streamed,
    stream_error: metering.streamError,
    client_disconnected: metering.clientDisconnected,
    duration_ms: finishedAt - startedAt,
  });
  return collector?.response ?? response;
}

function errorResponse(err: unknown, request: ProxyRequest, deps: CoreDeps, metering: Metering): ProxyResponse {
  const { status, body, headers } = toErrorResponse(err);
  if (status >= 500) deps.log.error("request_failed", { request_id: request.requestId, status, error: describeError(err) });
  metering.responseBody = body;
  return { statusCode: status, headers: { ...JSON_HEADERS, ...headers }, body: JSON.stringify(body) };
}

/**
 * Why a finished response cannot reach the caller as it is: larger than Lambda can return once serialised (the
 * `{statusCode, headers, body}` object the adapter returns, JSON escapes and the request_payload envelope
 * included), or too late to be metered before the invocation's deadline.
 */
function deliveryProblem(response: ProxyResponse, deps: CoreDeps, deadline: number | undefined): ApiError | undefined {
  // JSON escaping turns one character into at most six bytes (`\u0000`), so a body under an eighth of the limit
  // (every ordinary answer; the rest is room for the headers) cannot exceed it: only larger ones pay for serialising
  // the whole result again.
  if (response.body.length > LAMBDA_RESPONSE_LIMIT_BYTES / 8 && serialisedSize(response) > LAMBDA_RESPONSE_LIMIT_BYTES) {
    return new ResponseTooLargeError(LAMBDA_RESPONSE_LIMIT_BYTES);
  }
  if (deadline !== undefined && response.statusCode < 300 && deadline - deps.clock() < meteringReserveMs(deps.config)) return new DeadlineExceededError();
  return undefined;
}

/** Bytes of the proxy result as the Lambda runtime serialises it. */
export function serialisedSize(response: ProxyResponse): number {
  return Buffer.byteLength(JSON.stringify({ statusCode: response.statusCode, headers: response.headers, body: response.body }), "utf8");
}

async function route(request: ProxyRequest, deps: CoreDeps, metering: Metering, deadline: number | undefined, responder: Responder): Promise<ProxyResponse> {
  const { config } = deps;
  const known = ROUTES.find((r) => r.route === request.route && r.method === request.method);
  if (!known) throw new NotFoundError(`Invalid URL (${request.method} ${request.route})`, "unknown_url");

  if (config.problems.length > 0) {
    deps.log.error("configuration_invalid", { problems: config.problems });
    throw new ConfigurationError("The service is misconfigured and cannot serve requests; its operator can see why in the function's logs.");
  }

  // Stripe's events carry no API key and no customer: the webhook is routed before either is looked for.
  if (known.route === STRIPE_WEBHOOK_ROUTE) {
    metering.unmetered = true;
    const secrets = await resolveSecrets(deps);
    return handleStripeWebhook(request.body, request.headers, { store: deps.store, plans: config.plans, secret: secrets.stripeWebhookSecret, log: deps.log, clock: deps.clock });
  }

  // Usage that cannot be billed is not served.
  const customer = request.apiKeyId ? await (deps.customers ?? new StaticCustomerDirectory(config.customers)).lookup(request.apiKeyId) : undefined;
  if (!customer) throw new ForbiddenError("This API key is not assigned to a customer.");
  metering.customer = customer;
  if (customer.status === "suspended") throw new ForbiddenError("This API key's customer is suspended; ask the service's operator.", "customer_suspended");
  const plans = Object.keys(config.plans).length > 0 ? config.plans : undefined;
  if (plans && !Object.prototype.hasOwnProperty.call(plans, customer.plan)) {
    // The table names a plan this deployment does not know (a stack config edited without `pulumi up`, or a typo).
    deps.log.error("customer_plan_unknown", { customer_id: customer.customerId, plan: customer.plan, api_key_id: request.apiKeyId });
    throw new ForbiddenError("This API key's customer is on a plan this service does not offer; ask the service's operator.", "plan_unknown");
  }
  metering.plan = plans?.[customer.plan];

  if (known.route === "/v1/usage") return usageReport(customer, deps, metering);
  metering.counted = true;

  const secrets = await resolveSecrets(deps);
  if (!secrets.upstreamApiKey) {
    deps.log.error("configuration_invalid", { problems: ["no upstream API key: set UPSTREAM_API_KEY_PARAMETER or UPSTREAM_API_KEY (or Authorization=Bearer …)"] });
    throw new ConfigurationError("The service has no upstream API key configured.");
  }
  const call: UpstreamCall = { deps, metering, redactor: redactorFor(secrets), deadline, responder, requestId: request.requestId };

  switch (known.route) {
    case "/v1/models":
      return listModels(call);
    case "/v1/models/{model}":
      return retrieveModel(request, call);
    case "/v1/embeddings":
      return createEmbeddings(request, customer, call);
    case "/v1/responses":
      return createResponse(request, customer, call);
    case "/v1/responses/{id}":
    case "/v1/responses/{id}/input_items":
    case "/v1/responses/{id}/cancel":
      return storedResponse(request, known.route, customer, call);
    default:
      return chatCompletion(request, customer, call, known.route === "/ai-chat");
  }
}

function resolveSecrets(deps: CoreDeps): Promise<ServiceSecrets> {
  return (deps.secrets ?? new StaticSecrets(directSecrets(deps.config))).resolve();
}

/** `GET /v1/usage`: the caller's own plan, balance and counters for the current period. */
async function usageReport(customer: Customer, deps: CoreDeps, metering: Metering): Promise<ProxyResponse> {
  if (!deps.store) throw new NotFoundError("Usage is not available on this deployment (it has no customers table).", "usage_unavailable");
  const body = await usageAnswer(deps.store, customer, metering.plan, deps.clock(), deps.log);
  metering.responseBody = body;
  return { statusCode: 200, headers: { ...JSON_HEADERS }, body: JSON.stringify(body) };
}

/** Settles the prepaid hold or counts the request, after the answer (see `settleAndCount`). Never throws. */
async function settleAccount(request: ProxyRequest, deps: CoreDeps, metering: Metering, usage: TokenUsage, cost: Cost | undefined, now: number): Promise<BillingOutcome | undefined> {
  try {
    return await settleAndCount({
      store: deps.store,
      customer: metering.customer,
      plan: metering.plan,
      hold: metering.hold,
      counted: metering.counted === true,
      billed: metering.billed,
      usage,
      cost,
      now,
      log: deps.log,
      requestId: request.requestId,
    });
  } catch (err) {
    // Unreachable by design (settleAndCount catches the store's failures); a bug here must not fail the request.
    deps.log.error("settlement_failed", { request_id: request.requestId, error: describeError(err) });
    return undefined;
  }
}

/** What a request needs to call the upstream. */
interface UpstreamCall {
  deps: CoreDeps;
  metering: Metering;
  redactor: SecretRedactor;
  deadline: number | undefined;
  responder: Responder;
  requestId: string;
  /** Time kept back from the upstream call for work between its answer and the caller's (a response's owner record). */
  keepBackMs?: number;
}

async function chatCompletion(request: ProxyRequest, customer: Customer, call: UpstreamCall, isSeedRoute: boolean): Promise<ProxyResponse> {
  const { deps, metering } = call;
  const parsed = inspectBody(metering, (facts) => parseChatCompletionRequest(request.body, deps.config.maxRequestBytes, request.headers["content-type"], facts));
  const { request: chat } = parsed;
  let forwarded = withoutMockDirectives(deps, chat);
  metering.requestBody = forwarded;

  const plan = metering.plan;
  const price = allowedPrice(plan, chat.model);
  const dearest = routedPrice(plan, price, forwarded);
  const prepaid = billingOf(plan) === "prepaid" && !!price;
  if (prepaid) forwarded = withoutLimitAliases(call, forwarded, CHAT_OUTPUT_LIMIT_ALIASES);

  // The plan's output cap goes upstream, so the upstream cannot produce more than a prepaid request reserved.
  const capped = capOutputTokens(forwarded, outputCapOf(plan));
  if (capped.changed) forwarded = capped.request;
  metering.requestBody = forwarded;
  if (prepaid) {
    const estimated: EstimatedRequest = { ...forwarded, messages: chat.messages };
    await reserve(request, customer, plan!, dearest!, {
      promptTokens: estimateRequestTokens(estimated, chat.model),
      choices: choicesOf(estimated),
      maxOutputTokens: capped.maxOutputTokens!,
      predictionTokens: predictionTokensOf(forwarded.prediction, chat.model),
    }, call);
  }

  if (chat.stream === true) return streamChatCompletion(call, forwarded, chat.messages, chat.model, price ? plan?.pricing : undefined);

  // Always what was parsed, never the caller's text: `JSON.parse` keeps the last of duplicate keys and an upstream
  // parser may keep the first, so the text could name another model, limit or response id than the one checked,
  // priced and reserved for. Fields this proxy does not know still pass through (re-serialised).
  const body = stringifyJson(forwarded);

  const upstream = await callUpstream(call, { method: "POST", path: "/chat/completions", body });
  if (upstream.status >= 200 && upstream.status < 300) {
    const json = upstream.json;
    // A 2xx without `choices` (some servers answer errors with 200) delivered nothing, so it is not billed.
    if (!isRecord(json) || !Array.isArray(json.choices)) {
      throw new UpstreamError("The upstream model server returned a response that is not a chat completion.", "upstream_bad_response");
    }
    // Usage that cannot be true of the answer (0 completion tokens for a long one, 0 prompt tokens) is estimated.
    const extracted = extractUsage(json);
    const reported = extracted && isPlausibleUsage(extracted, completionTextBytes(json)) ? extracted : undefined;
    billAnswer(call, reported ?? estimateUsage({ ...forwarded, messages: chat.messages }, json, chat.model), !reported, json, price ? plan?.pricing : undefined, chat.model);
    const text = isSeedRoute && deps.config.responseEnvelope === "request_payload" ? `{"request_payload":${upstream.text}}` : upstream.text;
    // Any 2xx carrying a completion is billed, whichever 2xx an OpenAI-compatible server chose; the caller gets that
    // status unchanged, and the meter keys on the record's usage and status class, not on "200".
    return { statusCode: upstream.status, headers: { ...JSON_HEADERS }, body: text };
  }
  return upstreamFailure(upstream, call);
}

/** Parses a request body with its route's parser; whatever happens, the record has the model it named. */
function inspectBody<T>(metering: Metering, parse: (facts: RequestFacts) => T): T {
  const facts: RequestFacts = {};
  try {
    return parse(facts);
  } finally {
    metering.inspected = true;
    metering.model = facts.model;
  }
}

/**
 * The request without the built-in model server's `mock` directives, which would make a real upstream answer 400
 * (unknown field). The body sent upstream is always serialised from this (never the caller's text).
 */
function withoutMockDirectives<T extends Record<string, unknown>>(deps: CoreDeps, parsed: T): Record<string, unknown> {
  if (!Object.prototype.hasOwnProperty.call(parsed, "mock") || deps.config.forwardMockDirectives) return parsed;
  const { mock: _mock, ...rest } = parsed;
  return rest;
}

/**
 * The plan's rules for a model: one its list does not name is "not found" (404 `model_not_found`), one its prices do
 * not cover is refused (400 `model_not_priced`: a plan that bills per model never serves a model at a wrong or zero
 * price). Returns the model's price, when the plan has one.
 */
function allowedPrice(plan: Plan | undefined, model: string): ModelPrice | undefined {
  if (plan?.models && !plan.models.includes(model)) throw new ModelNotFoundError(model);
  const price = priceFor(plan?.pricing, model);
  if (plan?.pricing && !price) throw new ModelNotPricedError(model);
  return price;
}

/**
 * The price a prepaid request must be reserved at: the requested model's, or, when the request carries a router's
 * fallback list — OpenRouter's top-level `models` (https://openrouter.ai/docs/features/model-routing: "the `models`
 * parameter … if the primary model's providers are down, rate-limited, or refuse to reply … the next model in the
 * list") — the dearest of it and every model listed, since the upstream may answer with any of them and
 * `servedCost` then charges the dearer price. On a plan with a model list or prices, every model listed must be
 * one the plan allows and prices (400 `model_not_found`, param `models`, otherwise), prepaid or not: the list is
 * the plan's, whichever model answers.
 */
function routedPrice(plan: Plan | undefined, price: ModelPrice | undefined, request: Record<string, unknown>): ModelPrice | undefined {
  if (!Object.prototype.hasOwnProperty.call(request, "models") || request.models === null || (!plan?.models && !plan?.pricing)) return price;
  const listed = request.models;
  if (!Array.isArray(listed) || listed.some((model) => typeof model !== "string")) {
    throw new BadRequestError("`models` must be an array of model names.", "models", "invalid_type");
  }
  const prices = price ? [price] : [];
  for (const model of listed as string[]) {
    const listedPrice = priceFor(plan.pricing, model);
    if ((plan.models && !plan.models.includes(model)) || (plan.pricing && !listedPrice)) {
      const name = model.length > 100 ? `${model.slice(0, 100)}…` : model;
      throw new BadRequestError(`The model \`${name}\` named in \`models\` does not exist or you do not have access to it.`, "models", "model_not_found");
    }
    if (listedPrice) prices.push(listedPrice);
  }
  return prices.length > 0 ? dearestPrice(prices) : undefined;
}

/** A prepaid request without the upstream-specific output-limit fields that could override the cap (`account.ts`). */
function withoutLimitAliases({ deps, requestId }: UpstreamCall, request: Record<string, unknown>, aliases: readonly string[]): Record<string, unknown> {
  const { request: rest, dropped } = withoutOutputLimitAliases(request, aliases);
  if (dropped.length > 0) deps.log.info("output_limit_aliases_dropped", { request_id: requestId, fields: dropped });
  return rest;
}

/**
 * Bills a delivered 2xx answer: its usage (reported, or `estimated`), its body for the record and, on a priced plan,
 * its cost (`servedCost`). Any 2xx carrying the work is billed, whichever 2xx an OpenAI-compatible server chose.
 */
function billAnswer({ metering }: UpstreamCall, usage: TokenUsage, estimated: boolean, json: Record<string, unknown>, pricing: PlanPricing | undefined, model: string): void {
  metering.usage = usage;
  metering.usageEstimated = estimated;
  metering.responseBody = json;
  if (pricing) metering.cost = servedCost(usage, pricing, model, json.model);
  metering.billed = true;
}

/** What a prepaid reservation covers: the input (tokenizer count) and `choices` × the output cap. */
interface ReservationSize {
  promptTokens: number;
  choices: number;
  maxOutputTokens: number;
  /** Tokens of the request's `prediction`, reserved per choice on top of the cap. */
  predictionTokens?: number;
  /** The request's output-token field, named when the balance does not cover it. */
  outputField?: string;
}

/**
 * Holds the most this prepaid request can cost before the upstream is called (see `account.ts`), at `price`: the
 * dearest model the request may be answered with (`routedPrice`). The hold is on `metering` from the moment it is
 * asked for, so the request settles it whatever happens next.
 */
async function reserve(request: ProxyRequest, customer: Customer, plan: Plan, price: ModelPrice, size: ReservationSize, { deps, metering }: UpstreamCall): Promise<void> {
  const hold: Hold = {
    customerId: customer.customerId,
    currency: plan.pricing!.currency,
    transactionId: transactionIdFor(request.requestId),
    micros: reservationFor(size.promptTokens, size.choices, size.maxOutputTokens, price, size.predictionTokens ?? 0),
    periodStart: usagePeriodOf(plan, deps.clock()).start,
    state: "requested",
  };
  metering.hold = hold;
  await reserveCredit({
    store: deps.store,
    hold,
    now: deps.clock(),
    log: deps.log,
    requestId: request.requestId,
    choices: size.choices,
    maxOutputTokens: size.maxOutputTokens,
    ...(size.predictionTokens ? { predictionTokens: size.predictionTokens } : {}),
    ...(size.outputField ? { outputField: size.outputField } : {}),
  });
}

/**
 * The cost of what was served. Priced at the requested model; but when the upstream says it answered with another
 * model that the plan also prices (a router honouring an unknown field such as OpenRouter's `models` fallback list),
 * at the higher of the two prices, so naming a cheap model never buys an expensive one. Dated variants
 * (`gpt-4o-mini-2024-07-18`) have no price of their own and keep the requested model's.
 */
export function servedCost(usage: TokenUsage, pricing: PlanPricing, requested: string, answered: unknown): Cost {
  const requestedPrice = priceFor(pricing, requested);
  let micros = requestedPrice ? costOf(usage, requestedPrice) : 0;
  const answeredPrice = typeof answered === "string" && answered !== requested ? priceFor(pricing, answered) : undefined;
  if (answeredPrice) micros = Math.max(micros, costOf(usage, answeredPrice));
  return { currency: pricing.currency, micros };
}

/** When a stream must have ended to be metered before the invocation's deadline (undefined without a deadline). */
function streamDeadlineOf({ deps, deadline }: UpstreamCall): number | undefined {
  return deadline !== undefined ? deadline - meteringReserveMs(deps.config) - DEADLINE_RESERVE_MS : undefined;
}

/**
 * Opens a streamed upstream call within the time left. The caller may leave while the upstream thinks: it is
 * aborted then too. A non-2xx answer comes back read and redacted (`answer`); a 2xx one as its stream.
 */
/**
 * What both stream relays (chat completions, the Responses API) are given alike: the upstream's body, the redactor,
 * the caller's 200 once the first event arrives (from then on the record says 200 and what arrives is billed), the
 * caller's going away, the idle timeout, the deadline by which the stream must end to be metered, and the tokenizer.
 */
function relayOptions(call: UpstreamCall, opened: { stream: Readable; status: number }, model: string) {
  const { deps, metering, redactor, responder } = call;
  const headers = { ...SSE_HEADERS, "x-request-id": call.requestId };
  return {
    upstream: opened.stream,
    redactor,
    start: () => {
      metering.streamed = true;
      return responder.startStream(200, headers);
    },
    clientGone: responder.clientGone,
    idleTimeoutMs: deps.config.upstreamIdleTimeoutMs,
    // The whole stream must end in time to meter it before the invocation's deadline.
    deadline: streamDeadlineOf(call),
    clock: deps.clock,
    newTally: () => new TokenTally(encodingForModel(model)),
    onEchoedSecret: () => deps.log.warn("upstream_echoed_secret", { upstream_status: opened.status, in_body: true, in_headers: false }),
  };
}

async function openUpstreamStream(call: UpstreamCall, path: string, body: string): Promise<{ stream: Readable; status: number; answer?: undefined } | { answer: UpstreamAnswer; stream?: undefined }> {
  const { deps, metering, responder } = call;
  const started = deps.clock();
  const timeoutMs = upstreamBudget(call, started);
  const abort = new AbortController();
  const onGone = () => abort.abort();
  responder.clientGone.addEventListener("abort", onGone, { once: true });
  let opened;
  try {
    opened = await deps.upstream.openStream({ method: "POST", path, body, ...(timeoutMs !== undefined ? { timeoutMs } : {}) }, abort.signal);
  } catch (err) {
    if (responder.clientGone.aborted) metering.clientDisconnected = true;
    throw err;
  } finally {
    responder.clientGone.removeEventListener("abort", onGone);
    metering.upstreamMs = deps.clock() - started;
  }
  metering.upstreamStatus = opened.status;
  if (!opened.stream) return { answer: redactAnswer(call, opened.status, opened.headers, opened.body) };
  return { stream: opened.stream, status: opened.status };
}

/** Bills a stream once its relay is over (it started: the caller has a 200 and whatever arrived). */
function billStream(call: UpstreamCall, outcome: { usage: TokenUsage; usageEstimated: boolean; streamError?: string; clientDisconnected: boolean; model?: string }, pricing: PlanPricing | undefined, model: string): void {
  const { deps, metering } = call;
  metering.usage = outcome.usage;
  metering.usageEstimated = outcome.usageEstimated;
  if (pricing) metering.cost = servedCost(outcome.usage, pricing, model, outcome.model);
  metering.billed = true;
  metering.streamError = outcome.streamError;
  metering.clientDisconnected = outcome.clientDisconnected || undefined;
  if (outcome.streamError || outcome.clientDisconnected) {
    deps.log.warn("stream_ended_early", { request_id: call.requestId, stream_error: outcome.streamError, client_disconnected: outcome.clientDisconnected });
  }
}

/**
 * A `stream: true` chat completion. The request is re-serialised (only here) to ask the upstream for
 * `stream_options.include_usage`, whatever the caller sent, so the usage billed is the upstream's own count. Errors
 * before the first event are thrown (ordinary JSON errors); after it, `relayChatStream` reports them in-band.
 */
async function streamChatCompletion(
  call: UpstreamCall,
  forwarded: Record<string, unknown>,
  messages: ChatCompletionRequest["messages"],
  model: string,
  pricing: PlanPricing | undefined,
): Promise<ProxyResponse> {
  const { deps, metering } = call;
  const callerOptions = isRecord(forwarded.stream_options) ? forwarded.stream_options : {};
  const callerWantsUsage = callerOptions.include_usage === true;
  const body = stringifyJson({ ...forwarded, stream: true, stream_options: { ...callerOptions, include_usage: true } });
  const started = deps.clock();
  const opened = await openUpstreamStream(call, "/chat/completions", body);
  if (!opened.stream) return upstreamFailure(opened.answer, call);

  const request = { ...forwarded, messages };
  const outcome = await relayChatStream({
    ...relayOptions(call, opened, model),
    callerWantsUsage,
    estimatePrompt: (tally) => estimateRequestTokens(request, model, tally),
  });
  metering.upstreamMs = deps.clock() - started;
  if (!outcome.started) metering.clientDisconnected = outcome.clientDisconnected || undefined;
  if (!outcome.started) throw outcome.failure ?? new UpstreamError("The upstream model server's stream ended before it started.", "upstream_bad_response");

  billStream(call, outcome, pricing, model);
  // A summary, not the events: what billing and support need (the meter keeps the content only with logBodies).
  metering.responseBody = {
    ...(outcome.id !== undefined ? { id: outcome.id } : {}),
    object: "chat.completion",
    ...(outcome.model !== undefined ? { model: outcome.model } : {}),
    choices: [{ index: 0, message: { role: "assistant", content: outcome.content } }],
    usage: outcome.usage,
  };
  return { statusCode: 200, headers: { ...SSE_HEADERS, "x-request-id": call.requestId }, body: "" };
}

/** A model object as OpenAI's `GET /v1/models` lists it, for a model the plan names. */
function planModel(id: string): Record<string, unknown> {
  return { id, object: "model", created: 0, owned_by: "metered-ai-api" };
}

async function listModels(call: UpstreamCall): Promise<ProxyResponse> {
  const { metering } = call;
  const allowed = metering.plan?.models;
  if (allowed) {
    const body = { object: "list", data: allowed.map(planModel) };
    metering.responseBody = body;
    return { statusCode: 200, headers: { ...JSON_HEADERS }, body: JSON.stringify(body) };
  }
  // No list on the plan: every model is allowed, so the upstream's own list is the answer.
  return passThrough(call, await callUpstream(call, { method: "GET", path: "/models" }));
}

/**
 * `GET /v1/models/{model}`: a model the plan's list names (its object as `GET /v1/models` lists it), else 404
 * `model_not_found` without asking the upstream; on a plan without a list, the upstream's own object (or its 404).
 * Counted, not billed.
 */
async function retrieveModel(request: ProxyRequest, call: UpstreamCall): Promise<ProxyResponse> {
  const { metering } = call;
  const model = request.pathParameters?.model ?? "";
  metering.model = model || undefined;
  const allowed = metering.plan?.models;
  if (allowed) {
    if (!allowed.includes(model)) throw new ModelNotFoundError(model);
    const body = planModel(model);
    metering.responseBody = body;
    return { statusCode: 200, headers: { ...JSON_HEADERS }, body: JSON.stringify(body) };
  }
  if (!model) throw new ModelNotFoundError(model);
  return passThrough(call, await callUpstream(call, { method: "GET", path: `/models/${encodeURIComponent(model)}` }));
}

/** An unbilled upstream answer: a 2xx JSON object as it came (redacted), anything else as `upstreamFailure` maps it. */
function passThrough(call: UpstreamCall, upstream: UpstreamAnswer): ProxyResponse {
  if (upstream.status >= 200 && upstream.status < 300) {
    if (!isRecord(upstream.json)) throw new UpstreamError("The upstream model server returned a response that is not a JSON object.", "upstream_bad_response");
    call.metering.responseBody = upstream.json;
    return { statusCode: upstream.status, headers: { ...JSON_HEADERS }, body: upstream.text };
  }
  return upstreamFailure(upstream, call);
}

/**
 * `POST /v1/embeddings`: validated, the plan's model list and prices apply, a prepaid request reserves its input
 * (there is no output), and the answer is billed at the upstream's `usage.prompt_tokens` (estimated when absent or
 * implausible), with 0 completion tokens.
 */
async function createEmbeddings(request: ProxyRequest, customer: Customer, call: UpstreamCall): Promise<ProxyResponse> {
  const { deps, metering } = call;
  const parsed = inspectBody(metering, (facts) => parseEmbeddingsRequest(request.body, deps.config.maxRequestBytes, request.headers["content-type"], facts));
  const embeddings = parsed.request;
  const forwarded = withoutMockDirectives(deps, embeddings);
  metering.requestBody = forwarded;
  const plan = metering.plan;
  const price = allowedPrice(plan, embeddings.model);
  const dearest = routedPrice(plan, price, forwarded);
  // What was parsed (and checked, priced, reserved for), never the caller's text (duplicate keys: see `chatCompletion`).
  const body = stringifyJson(forwarded);
  const estimateInput = () => estimateEmbeddingsInputTokens(embeddings, embeddings.model);
  if (billingOf(plan) === "prepaid" && price) await reserve(request, customer, plan!, dearest!, { promptTokens: estimateInput(), choices: 1, maxOutputTokens: 0 }, call);

  const upstream = await callUpstream(call, { method: "POST", path: "/embeddings", body });
  if (upstream.status >= 200 && upstream.status < 300) {
    const json = upstream.json;
    // A 2xx without `data` delivered no embeddings, so it is not billed.
    if (!isRecord(json) || !Array.isArray(json.data)) throw new UpstreamError("The upstream model server returned a response that is not an embeddings list.", "upstream_bad_response");
    const extracted = extractEmbeddingsUsage(json);
    // A count below one token per input, or per 128 bytes of input, cannot be true: estimated instead.
    const reported = extracted && isPlausibleEmbeddingsUsage(extracted, embeddings) ? extracted : undefined;
    const usage = reported ?? { prompt_tokens: estimateInput(), completion_tokens: 0, total_tokens: estimateInput() };
    billAnswer(call, usage, !reported, json, price ? plan?.pricing : undefined, embeddings.model);
    return { statusCode: upstream.status, headers: { ...JSON_HEADERS }, body: upstream.text };
  }
  return upstreamFailure(upstream, call);
}

/** The responses store, or 503 when the function has none (a broken deployment: see `index.ts`). */
function responseOwnersOf(deps: CoreDeps): ResponseOwners {
  if (!deps.responseOwners) {
    deps.log.error("response_owners_unavailable", { reason: "the function has no response owners store" });
    throw new ResponseStoreUnavailableError();
  }
  return deps.responseOwners;
}

/**
 * The caller's own stored response `id`, or undefined when it is not theirs: an id of an unexpected shape, one
 * nobody recorded (or whose record expired) and another customer's all look the same. A store that cannot answer
 * is a 503, never "not found".
 */
async function ownResponse(id: string, customer: Customer, { deps, requestId }: UpstreamCall): Promise<ResponseOwner | undefined> {
  if (!RESPONSE_ID_PATTERN.test(id)) return undefined;
  const owners = responseOwnersOf(deps);
  let owner: ResponseOwner | undefined;
  try {
    owner = await owners.lookup(id, deps.clock());
  } catch (err) {
    deps.log.error("response_owner_lookup_failed", { request_id: requestId, customer_id: customer.customerId, error: describeError(err) });
    throw new ResponseStoreUnavailableError();
  }
  if (owner && owner.customerId !== customer.customerId) {
    // Someone else's: answered exactly as an unknown id, and the upstream is never asked.
    deps.log.warn("response_owner_mismatch", { request_id: requestId, customer_id: customer.customerId });
    return undefined;
  }
  return owner;
}

/** The query parameters each stored-response route passes on (anything else is dropped: the upstream never sees it). */
const STORED_RESPONSE_QUERY: Record<string, readonly string[]> = {
  "/v1/responses/{id}": ["include", "include[]"],
  "/v1/responses/{id}/input_items": ["limit", "order", "after", "before", "include", "include[]"],
  "/v1/responses/{id}/cancel": [],
};

/**
 * The stored-response routes (retrieve, delete, list input items, cancel): served only to the customer that
 * created the response (404 otherwise, without asking the upstream), proxied with the route's known query
 * parameters. Counted, metered with 0 tokens, never billed: the work was billed when the response was created.
 */
async function storedResponse(request: ProxyRequest, route: string, customer: Customer, call: UpstreamCall): Promise<ProxyResponse> {
  const { metering } = call;
  // No body to read (a cancel's is ignored): the record's model is the stored response's.
  metering.inspected = true;
  const id = request.pathParameters?.id ?? "";
  const owner = await ownResponse(id, customer, call);
  if (!owner) throw new ResponseNotFoundError(id);
  metering.model = owner.model;
  const allowed = request.method === "DELETE" ? [] : STORED_RESPONSE_QUERY[route] ?? [];
  if (route === "/v1/responses/{id}" && request.method === "GET" && request.query?.stream?.some((value) => value === "true")) {
    // A replayed stream would need the typed-SSE relay for an answer that bills nothing; not offered.
    throw new BadRequestError("Streaming a stored response (stream=true) is not supported by this service; retrieve it without stream.", "stream");
  }
  const search = new URLSearchParams();
  for (const name of allowed) for (const value of request.query?.[name] ?? []) search.append(name, value);
  const suffix = route.endsWith("/input_items") ? "/input_items" : route.endsWith("/cancel") ? "/cancel" : "";
  const query = search.toString();
  // `UpstreamRequest.method` names GET and POST; the client sends any method it is given (axios), DELETE included.
  const method = request.method as UpstreamRequest["method"];
  return passThrough(call, await callUpstream(call, { method, path: `/responses/${encodeURIComponent(id)}${suffix}${query ? `?${query}` : ""}` }));
}

/** Input plus output tokens billed for a response: what continuing it sends to the model again as input. */
function contextTokensOf(usage: TokenUsage): number {
  return usage.prompt_tokens + usage.completion_tokens;
}

/**
 * `POST /v1/responses`, buffered or streamed. Validated like chat; `previous_response_id` must be the caller's own
 * response (400 `previous_response_not_found` otherwise, without asking the upstream); the plan's output cap goes
 * upstream as `max_output_tokens`; a prepaid request reserves its input (the previous response's context
 * included) and the capped output. The created response's owner is recorded before its id reaches the caller.
 */
async function createResponse(request: ProxyRequest, customer: Customer, call: UpstreamCall): Promise<ProxyResponse> {
  const { deps, metering } = call;
  const parsed = inspectBody(metering, (facts) => parseResponsesRequest(request.body, deps.config.maxRequestBytes, request.headers["content-type"], facts));
  const input = parsed.request;
  let forwarded = withoutMockDirectives(deps, input);
  metering.requestBody = forwarded;

  const plan = metering.plan;
  const price = allowedPrice(plan, input.model);
  const dearest = routedPrice(plan, price, forwarded);
  const prepaid = billingOf(plan) === "prepaid" && !!price;
  if (prepaid) {
    // The hold must cover the whole input before the upstream reads it: a file fetched by URL is sized only then.
    const unknowable = unknowableInput(input);
    if (unknowable !== undefined) {
      throw new BadRequestError(
        `Prepaid plans cannot reserve for an input whose size is only known after the answer (${unknowable}: a file by URL); send the file inline as file_data.`,
        unknowable,
        "unsupported_parameter",
      );
    }
    forwarded = withoutLimitAliases(call, forwarded, RESPONSES_OUTPUT_LIMIT_ALIASES);
  }

  let previousContext = 0;
  if (typeof input.previous_response_id === "string") {
    const previous = await ownResponse(input.previous_response_id, customer, call);
    if (!previous) throw new PreviousResponseNotFoundError(input.previous_response_id);
    previousContext = previous.contextTokens ?? 0;
  }

  const capped = capOutputTokens(forwarded, outputCapOf(plan), RESPONSES_OUTPUT_FIELDS);
  if (capped.changed) forwarded = capped.request;
  // What was parsed, never the caller's text: with duplicate keys an upstream that keeps the first could continue
  // another customer's `previous_response_id` or ignore the cap (see `chatCompletion`).
  const body = stringifyJson(forwarded);
  metering.requestBody = forwarded;
  const estimated = forwarded as ResponsesRequest;
  // The previous response's input and output go to the model again as this request's input.
  const estimateInput = (tally?: TokenTally) => estimateResponsesInputTokens(estimated, input.model, tally) + previousContext;
  // A streamed response is recorded at its first event, before its usage is known: until the stream ends, its
  // context is recorded as the most it can be (this input plus the cap), so a continuation started meanwhile is
  // held for enough (it would otherwise find no context and hold for its own input only).
  let provisionalContext: number | undefined;
  if (prepaid) {
    const promptTokens = estimateInput();
    provisionalContext = promptTokens + capped.maxOutputTokens!;
    await reserve(request, customer, plan!, dearest!, { promptTokens, choices: 1, maxOutputTokens: capped.maxOutputTokens!, outputField: "max_output_tokens" }, call);
  }
  const pricing = price ? plan?.pricing : undefined;
  const stored = input.store !== false;
  const owners = stored ? deps.responseOwners : undefined;

  if (input.stream === true) return streamResponse(call, customer, body, input.model, pricing, estimateInput, stored, provisionalContext);

  // The owner is recorded after the upstream answers and before the caller has the answer: its time is kept back.
  const upstream = await callUpstream({ ...call, keepBackMs: owners ? deps.config.responseOwners.timeoutMs : 0 }, { method: "POST", path: "/responses", body });
  if (upstream.status >= 200 && upstream.status < 300) {
    const json = upstream.json;
    // A 2xx that is not a response object delivered nothing, so it is not billed.
    if (!isRecord(json) || json.object !== "response") throw new UpstreamError("The upstream model server returned a response that is not a Responses API response.", "upstream_bad_response");
    const extracted = extractResponsesUsage(json);
    const reported = extracted && isPlausibleUsage(extracted, responsesOutputTextBytes(json)) ? extracted : undefined;
    let usage = reported;
    if (!usage) {
      const guess = estimateResponsesUsage(estimated, json, input.model);
      usage = { ...guess, prompt_tokens: guess.prompt_tokens + previousContext, total_tokens: guess.total_tokens + previousContext };
    }
    billAnswer(call, usage, !reported, json, pricing, input.model);
    if (stored && typeof json.id === "string") await recordOwnerAfterAnswer(call, customer, json.id, input.model, contextTokensOf(usage));
    return { statusCode: upstream.status, headers: { ...JSON_HEADERS }, body: upstream.text };
  }
  return upstreamFailure(upstream, call);
}

/**
 * Records a buffered response's owner before the caller gets it. A failed write does not take the answer back (the
 * work was done and is billed): it is logged, and the caller then gets 404 for that id, which is safe.
 */
async function recordOwnerAfterAnswer(call: UpstreamCall, customer: Customer, id: string, model: string, contextTokens: number): Promise<void> {
  const { deps, requestId } = call;
  try {
    await recordOwner(call, customer, id, model, contextTokens);
  } catch (err) {
    deps.log.error("response_owner_not_recorded", { request_id: requestId, customer_id: customer.customerId, error: describeError(err) });
  }
}

/**
 * Records `customer` as the owner of response `id` (a no-op for an id of an unexpected shape: nobody can ever use
 * it). Rejects with `ResponseStoreUnavailableError` when the store cannot answer. An id already recorded for another
 * customer stays theirs (logged: an upstream reusing ids); the caller then cannot use it, which is safe.
 */
async function recordOwner({ deps, requestId }: UpstreamCall, customer: Customer, id: string, model: string, contextTokens?: number): Promise<void> {
  if (!RESPONSE_ID_PATTERN.test(id)) {
    deps.log.warn("response_id_unusable", { request_id: requestId, customer_id: customer.customerId, id_length: id.length });
    return;
  }
  const owners = responseOwnersOf(deps);
  const now = deps.clock();
  let recorded: ResponseOwner;
  try {
    recorded = await owners.record({ responseId: id, customerId: customer.customerId, createdAt: now, model, ...(contextTokens !== undefined ? { contextTokens } : {}) }, now);
  } catch (err) {
    deps.log.error("response_owner_record_failed", { request_id: requestId, customer_id: customer.customerId, error: describeError(err) });
    throw new ResponseStoreUnavailableError();
  }
  if (recorded.customerId !== customer.customerId) deps.log.error("response_owner_conflict", { request_id: requestId, customer_id: customer.customerId, owner_customer_id: recorded.customerId });
}

/**
 * A `stream: true` response: the Responses API's typed events relayed as they come (`responses-stream.ts`). The
 * owner is recorded when the first event carrying the response's id arrives, before that event is forwarded (the
 * caller never learns an id that is not recorded as theirs); a failed record before the stream started is a 503 and
 * nothing is billed. Once the usage is known, the response's context tokens are written alongside the metering.
 */
async function streamResponse(
  call: UpstreamCall,
  customer: Customer,
  body: string,
  model: string,
  pricing: PlanPricing | undefined,
  estimateInput: (tally: TokenTally) => number,
  stored: boolean,
  provisionalContext: number | undefined,
): Promise<ProxyResponse> {
  const { deps, metering } = call;
  const started = deps.clock();
  const opened = await openUpstreamStream(call, "/responses", body);
  if (!opened.stream) return upstreamFailure(opened.answer, call);

  let recordedId: string | undefined;
  const outcome = await relayResponsesStream({
    ...relayOptions(call, opened, model),
    estimateInput,
    ...(stored
      ? {
          onResponseId: async (id: string) => {
            await recordOwner(call, customer, id, model, provisionalContext);
            recordedId = id;
          },
        }
      : {}),
  });
  metering.upstreamMs = deps.clock() - started;
  if (!outcome.started) metering.clientDisconnected = outcome.clientDisconnected || undefined;
  if (!outcome.started) throw outcome.failure ?? new UpstreamError("The upstream model server's stream ended before it started.", "upstream_bad_response");

  billStream(call, outcome, pricing, model);
  // A summary, not the events: what billing and support need (the meter keeps the content only with logBodies).
  metering.responseBody = {
    ...(outcome.id !== undefined ? { id: outcome.id } : {}),
    object: "response",
    ...(outcome.model !== undefined ? { model: outcome.model } : {}),
    ...(outcome.status !== undefined ? { status: outcome.status } : {}),
    output: [{ type: "message", role: "assistant", content: [{ type: "output_text", text: outcome.content }] }],
    usage: outcome.usage,
  };
  if (recordedId !== undefined && RESPONSE_ID_PATTERN.test(recordedId)) {
    const id = recordedId;
    const owners = deps.responseOwners!;
    // Alongside settlement and metering (see `meteringReserveMs`); a failure leaves the reservation of a later
    // continuation without this context, which only makes that reservation smaller.
    metering.afterAnswer = owners.setContextTokens(id, customer.customerId, contextTokensOf(outcome.usage)).catch((err: unknown) => {
      deps.log.warn("response_context_not_recorded", { request_id: call.requestId, customer_id: customer.customerId, error: describeError(err) });
    });
  }
  return { statusCode: 200, headers: { ...SSE_HEADERS, "x-request-id": call.requestId }, body: "" };
}

/**
 * Calls the upstream within the time the invocation has left, and redacts the answer (body of every status and
 * headers) before anything else reads it: an upstream that echoes the service's key must not leak it to the caller,
 * a log line or a metering event.
 */
async function callUpstream(call: UpstreamCall, request: UpstreamRequest): Promise<UpstreamAnswer> {
  const { deps, metering } = call;
  const started = deps.clock();
  const timeoutMs = upstreamBudget(call, started);
  let response;
  try {
    response = await deps.upstream.send(timeoutMs !== undefined ? { ...request, timeoutMs } : request);
  } finally {
    metering.upstreamMs = deps.clock() - started;
  }
  metering.upstreamStatus = response.status;
  return redactAnswer(call, response.status, response.headers, response.body);
}

/**
 * The time the upstream may take: what is left before the invocation's deadline once metering and the reserve are
 * kept back (undefined without a deadline). Too little left to be worth asking → 504 `deadline_exceeded`.
 */
function upstreamBudget({ deps, deadline, keepBackMs = 0 }: UpstreamCall, now: number): number | undefined {
  if (deadline === undefined) return undefined;
  const budget = deadline - now - meteringReserveMs(deps.config) - DEADLINE_RESERVE_MS - keepBackMs;
  if (budget < 100) throw new DeadlineExceededError();
  return budget;
}

/** An upstream answer with the service's secrets redacted from its body and headers: nothing reads the raw one. */
function redactAnswer({ deps, redactor }: UpstreamCall, status: number, rawHeaders: Record<string, string>, rawBody: Buffer): UpstreamAnswer {
  const body = redactor.redactBody(rawBody.toString("utf8"));
  const headers = redactor.redactHeaders(rawHeaders);
  if (body.changed || headers.changed) deps.log.warn("upstream_echoed_secret", { upstream_status: status, in_body: body.changed, in_headers: headers.changed });
  return { status, headers: headers.headers, text: body.text, json: body.json };
}

/**
 * Maps a non-2xx upstream answer. Client errors the caller can fix pass through; the service's own credential and
 * server problems become 502, because the caller cannot fix them. No completion was delivered, so usage stays zero.
 */
function upstreamFailure(upstream: UpstreamAnswer, { deps, metering }: UpstreamCall): ProxyResponse {
  const status = upstream.status;
  if (status === 401 || status === 403 || status === 407) {
    deps.log.error("upstream_rejected_credentials", { upstream_status: status });
    throw new UpstreamError("The upstream model server rejected this service's credentials.", "upstream_auth_failed");
  }
  if (status === 429) {
    if (isOpenAiErrorBody(upstream.json) && upstream.json.error.code === "insufficient_quota") deps.log.error("upstream_insufficient_quota", { upstream_status: status });
    throw new RateLimitedError("The upstream model server is rate limiting requests; retry later.", retryAfter(upstream.headers["retry-after"]));
  }
  if (status >= 400 && status < 500) {
    if (!isOpenAiErrorBody(upstream.json)) {
      throw new ApiError(status, `The upstream model server refused the request (HTTP ${status}).`, "invalid_request_error", "upstream_error");
    }
    metering.responseBody = upstream.json;
    return { statusCode: status, headers: { ...JSON_HEADERS }, body: upstream.text };
  }
  throw new UpstreamError(`The upstream model server failed (HTTP ${status}).`, "upstream_failed");
}

/** `Retry-After` is passed on only when it is what RFC 9110 allows: delay seconds or an HTTP date. */
function retryAfter(value: string | undefined): string | undefined {
  if (value === undefined) return undefined;
  const trimmed = value.trim();
  if (/^\d{1,10}$/.test(trimmed)) return trimmed;
  if (trimmed.length <= 40 && /^[A-Za-z]{3}, \d{2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} GMT$/.test(trimmed)) return trimmed;
  return undefined;
}

function directSecrets(config: FunctionConfig): ServiceSecrets {
  return { upstreamApiKey: config.upstreamApiKey, moesifApplicationId: config.moesif.applicationId, stripeWebhookSecret: config.stripeWebhookSecret };
}

let cachedRedactor: { key: string; redactor: SecretRedactor } | undefined;

/** The redactor for the current secrets (built once per set of values). */
function redactorFor(secrets: ServiceSecrets): SecretRedactor {
  const values = [secrets.upstreamApiKey, secrets.moesifApplicationId, secrets.stripeWebhookSecret].filter((v): v is string => !!v);
  const key = values.join("\u0000");
  if (cachedRedactor?.key !== key) cachedRedactor = { key, redactor: new SecretRedactor(values) };
  return cachedRedactor.redactor;
}

/** The model a request body names, for metering a request refused before validation (403, 500…). */
function peekModel(body: Buffer, maxBytes: number): string | undefined {
  if (body.length === 0 || body.length > maxBytes) return undefined;
  try {
    return modelOf(JSON.parse(body.toString("utf8")));
  } catch {
    return undefined;
  }
}
