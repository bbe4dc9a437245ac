import type { Customer, FunctionConfig, Plan } from "./config";
import { billingOf, isRecord, outputCapOf } from "./config";
import { capOutputTokens, choicesOf, reservationFor, reserveCredit, settleAndCount, usageAnswer, usagePeriodOf, type Hold } from "./account";
import { StaticCustomerDirectory, type CustomerDirectory } from "./customers";
import {
  ApiError,
  ConfigurationError,
  DeadlineExceededError,
  ForbiddenError,
  ModelNotFoundError,
  ModelNotPricedError,
  NotFoundError,
  RateLimitedError,
  ResponseTooLargeError,
  UpstreamError,
  isOpenAiErrorBody,
  toErrorResponse,
} from "./errors";
import { relayChatStream } from "./chat-stream";
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
import { SecretRedactor } from "../shared/secret-redactor";

/** A request in the core's terms: already decoded from whatever transport carried it. */
export interface ProxyRequest {
  method: string;
  /** Route without the stage, e.g. `/v1/chat/completions`. */
  route: string;
  /** The URL metered for the request, built from trusted request context only (never from client headers). */
  uri: string;
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
 * one after the other (`infra/stack-config.ts` checks the same sum).
 */
export function meteringReserveMs(config: FunctionConfig): number {
  return (config.customerStore.table ? config.customerStore.timeoutMs : 0) + (config.ledger.table ? config.ledger.timeoutMs : 0) + config.moesif.timeoutMs;
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
 * failed or the caller left (see `chat-stream.ts`).
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

  if (known.route === "/v1/models") return listModels(call);
  return chatCompletion(request, customer, call, known.route === "/ai-chat");
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
}

async function chatCompletion(request: ProxyRequest, customer: Customer, call: UpstreamCall, isSeedRoute: boolean): Promise<ProxyResponse> {
  const { deps, metering } = call;
  const facts: RequestFacts = {};
  let parsed: ReturnType<typeof parseChatCompletionRequest>;
  try {
    parsed = parseChatCompletionRequest(request.body, deps.config.maxRequestBytes, request.headers["content-type"], facts);
  } finally {
    metering.inspected = true;
    metering.model = facts.model;
  }
  const { request: chat } = parsed;
  let forwarded: Record<string, unknown> = chat;
  let body = parsed.text;
  // The built-in model server's directives would make a real upstream answer 400 (unknown field).
  if (Object.prototype.hasOwnProperty.call(chat, "mock") && !deps.config.forwardMockDirectives) {
    const { mock: _mock, ...rest } = chat;
    forwarded = rest;
    body = stringifyJson(rest);
  }
  metering.requestBody = forwarded;

  const plan = metering.plan;
  if (plan?.models && !plan.models.includes(chat.model)) throw new ModelNotFoundError(chat.model);
  const price = priceFor(plan?.pricing, chat.model);
  // A plan that bills per model never serves a model at a wrong or zero price.
  if (plan?.pricing && !price) throw new ModelNotPricedError(chat.model);

  // The plan's output cap goes upstream, so the upstream cannot produce more than a prepaid request reserved.
  const capped = capOutputTokens(forwarded, outputCapOf(plan));
  if (capped.changed) {
    forwarded = capped.request;
    body = stringifyJson(forwarded);
    metering.requestBody = forwarded;
  }
  if (billingOf(plan) === "prepaid" && price) await reserve(request, customer, plan!, price, { ...forwarded, messages: chat.messages }, chat.model, capped.maxOutputTokens!, call);

  if (chat.stream === true) return streamChatCompletion(call, forwarded, chat.messages, chat.model, price ? plan?.pricing : undefined);

  // Otherwise the caller's text goes upstream unchanged (unless the cap rewrote it), so fields this proxy does not
  // know pass through untouched.
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
    metering.usage = reported ?? estimateUsage({ ...forwarded, messages: chat.messages }, json, chat.model);
    metering.usageEstimated = !reported;
    metering.responseBody = json;
    if (price && plan?.pricing) metering.cost = servedCost(metering.usage, plan.pricing, chat.model, json.model);
    metering.billed = true;
    const text = isSeedRoute && deps.config.responseEnvelope === "request_payload" ? `{"request_payload":${upstream.text}}` : upstream.text;
    // Any 2xx carrying a completion is billed, whichever 2xx an OpenAI-compatible server chose; the caller gets that
    // status unchanged, and the meter keys on the record's usage and status class, not on "200".
    return { statusCode: upstream.status, headers: { ...JSON_HEADERS }, body: text };
  }
  return upstreamFailure(upstream, call);
}

/**
 * Holds the most this prepaid request can cost before the upstream is called (see `account.ts`). The hold is on
 * `metering` from the moment it is asked for, so the request settles it whatever happens next.
 */
async function reserve(
  request: ProxyRequest,
  customer: Customer,
  plan: Plan,
  price: ModelPrice,
  chat: EstimatedRequest,
  model: string,
  maxOutputTokens: number,
  { deps, metering }: UpstreamCall,
): Promise<void> {
  const promptTokens = estimateRequestTokens(chat, model);
  const choices = choicesOf(chat);
  const hold: Hold = {
    customerId: customer.customerId,
    currency: plan.pricing!.currency,
    transactionId: transactionIdFor(request.requestId),
    micros: reservationFor(promptTokens, choices, maxOutputTokens, price),
    periodStart: usagePeriodOf(plan, deps.clock()).start,
    state: "requested",
  };
  metering.hold = hold;
  await reserveCredit({ store: deps.store, hold, now: deps.clock(), log: deps.log, requestId: request.requestId, choices, maxOutputTokens });
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
  const { deps, metering, redactor, deadline, responder } = call;
  const callerOptions = isRecord(forwarded.stream_options) ? forwarded.stream_options : {};
  const callerWantsUsage = callerOptions.include_usage === true;
  const body = stringifyJson({ ...forwarded, stream: true, stream_options: { ...callerOptions, include_usage: true } });
  // The whole stream must end in time to meter it before the invocation's deadline.
  const streamDeadline = deadline !== undefined ? deadline - meteringReserveMs(deps.config) - DEADLINE_RESERVE_MS : undefined;

  const started = deps.clock();
  const timeoutMs = upstreamBudget(call, started);
  // The caller may leave while the upstream thinks: abort it then too.
  const abort = new AbortController();
  const onGone = () => abort.abort();
  responder.clientGone.addEventListener("abort", onGone, { once: true });
  let opened;
  try {
    opened = await deps.upstream.openStream({ method: "POST", path: "/chat/completions", body, ...(timeoutMs !== undefined ? { timeoutMs } : {}) }, abort.signal);
  } catch (err) {
    if (responder.clientGone.aborted) metering.clientDisconnected = true;
    throw err;
  } finally {
    responder.clientGone.removeEventListener("abort", onGone);
    metering.upstreamMs = deps.clock() - started;
  }
  metering.upstreamStatus = opened.status;
  if (!opened.stream) return upstreamFailure(redactAnswer(call, opened.status, opened.headers, opened.body), call);

  const request = { ...forwarded, messages };
  const headers = { ...SSE_HEADERS, "x-request-id": call.requestId };
  const outcome = await relayChatStream({
    upstream: opened.stream,
    redactor,
    start: () => {
      // From here the caller has a 200: the record says so, and what arrives is billed.
      metering.streamed = true;
      return responder.startStream(200, headers);
    },
    clientGone: responder.clientGone,
    idleTimeoutMs: deps.config.upstreamIdleTimeoutMs,
    deadline: streamDeadline,
    clock: deps.clock,
    callerWantsUsage,
    newTally: () => new TokenTally(encodingForModel(model)),
    estimatePrompt: (tally) => estimateRequestTokens(request, model, tally),
    onEchoedSecret: () => deps.log.warn("upstream_echoed_secret", { upstream_status: opened.status, in_body: true, in_headers: false }),
  });
  metering.upstreamMs = deps.clock() - started;
  if (!outcome.started) metering.clientDisconnected = outcome.clientDisconnected || undefined;
  if (!outcome.started) throw outcome.failure ?? new UpstreamError("The upstream model server's stream ended before it started.", "upstream_bad_response");

  metering.usage = outcome.usage;
  metering.usageEstimated = outcome.usageEstimated;
  if (pricing) metering.cost = servedCost(outcome.usage, pricing, model, outcome.model);
  metering.billed = true;
  metering.streamError = outcome.streamError;
  metering.clientDisconnected = outcome.clientDisconnected || undefined;
  // A summary, not the events: what billing and support need (the meter keeps the content only with logBodies).
  metering.responseBody = {
    ...(outcome.id !== undefined ? { id: outcome.id } : {}),
    object: "chat.completion",
    ...(outcome.model !== undefined ? { model: outcome.model } : {}),
    choices: [{ index: 0, message: { role: "assistant", content: outcome.content } }],
    usage: outcome.usage,
  };
  if (outcome.streamError || outcome.clientDisconnected) {
    deps.log.warn("stream_ended_early", { request_id: call.requestId, stream_error: outcome.streamError, client_disconnected: outcome.clientDisconnected });
  }
  return { statusCode: 200, headers, body: "" };
}

async function listModels(call: UpstreamCall): Promise<ProxyResponse> {
  const { metering } = call;
  const allowed = metering.plan?.models;
  if (allowed) {
    const body = { object: "list", data: allowed.map((id) => ({ id, object: "model", created: 0, owned_by: "metered-ai-api" })) };
    metering.responseBody = body;
    return { statusCode: 200, headers: { ...JSON_HEADERS }, body: JSON.stringify(body) };
  }
  // No list on the plan: every model is allowed, so the upstream's own list is the answer.
  const upstream = await callUpstream(call, { method: "GET", path: "/models" });
  if (upstream.status >= 200 && upstream.status < 300) {
    if (!isRecord(upstream.json)) throw new UpstreamError("The upstream model server returned a response that is not a JSON object.", "upstream_bad_response");
    metering.responseBody = upstream.json;
    return { statusCode: 200, headers: { ...JSON_HEADERS }, body: upstream.text };
  }
  return upstreamFailure(upstream, call);
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
function upstreamBudget({ deps, deadline }: UpstreamCall, now: number): number | undefined {
  if (deadline === undefined) return undefined;
  const budget = deadline - now - meteringReserveMs(deps.config) - DEADLINE_RESERVE_MS;
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
