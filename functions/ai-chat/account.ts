/**
 * A customer's account on the request path: the output cap, the prepaid reservation before the upstream call, the
 * settlement (and the usage counters) after the answer, and the `GET /v1/usage` answer. The core calls these; the
 * store's conditional writes (what keeps a balance from ever going negative) live behind the `CustomerStore` port.
 *
 * Prepaid, in order:
 * 1. `capOutputTokens`: the request may produce at most `cap` tokens per choice; the upstream is told so.
 * 2. `reserveCredit`: one conditional write holds the most the request can cost (`maxCostOf` the tokenizer's prompt
 *    count and `n` × the output cap). Refused → 429 `insufficient_quota`, and nothing is called.
 * 3. The answer is sent.
 * 4. `settleAndCount`: one write charges the actual cost (0 when nothing was delivered), releases the rest and adds
 *    the period's counters. A settlement the store cannot confirm is `pending`: the stale-hold sweep settles it
 *    later from the ledger item.
 */
import type { AccountBalance, CustomerStore, UsageIncrement, UsageTotals } from "../shared/customer-port";
import { DEFAULT_USAGE_PERIOD } from "../shared/customer-schema";
import { stringifyJson } from "../shared/json";
import { formatMicros, maxCostOf, type Cost, type ModelPrice } from "../shared/pricing";
import { quotaPeriodStart, type QuotaPeriod } from "../shared/quota-period";
import { billingOf, type Customer, type Plan } from "./config";
import { ConfigurationError, InsufficientQuotaError, ServiceUnavailableError } from "./errors";
import { describeError, type Logger } from "./logger";
import type { BillingOutcome } from "./metering";
import { encodingForModel, TokenTally, type TokenUsage } from "./usage";

/**
 * A chat completion's output-token fields. The first is the one added when the caller sent none (OpenAI's current
 * field; `max_tokens` is deprecated and refused by reasoning models).
 */
export const CHAT_OUTPUT_FIELDS = ["max_completion_tokens", "max_tokens"] as const;
/** The Responses API's one output-token field (it covers reasoning tokens too). */
export const RESPONSES_OUTPUT_FIELDS = ["max_output_tokens"] as const;

export interface CappedRequest {
  /** The request to send upstream (the same object when nothing changed). */
  request: Record<string, unknown>;
  /** The request was rewritten, so its text must be serialised again. */
  changed: boolean;
  /** Most output tokens per choice the upstream may produce (undefined: no cap and the caller set none). */
  maxOutputTokens?: number;
}

/**
 * Applies a plan's output cap to the request's output-token `fields` (chat's by default). A caller's value above the
 * cap is rewritten to it; when the caller sent none, `fields[0]: cap` is added, so the upstream can never produce
 * more than was reserved. A caller that sent several has each capped; the larger one counts, whichever the upstream
 * honours.
 */
export function capOutputTokens(request: Record<string, unknown>, cap: number | undefined, fields: readonly string[] = CHAT_OUTPUT_FIELDS): CappedRequest {
  const asked = fields.map((field) => request[field]).filter((value): value is number => typeof value === "number");
  const largest = asked.length > 0 ? Math.max(...asked) : undefined;
  if (cap === undefined) return { request, changed: false, maxOutputTokens: largest };
  if (largest === undefined) {
    // A `null` field means "the upstream's default", which is not bounded: it goes, and the cap takes its place.
    const rest: Record<string, unknown> = { ...request };
    for (const field of fields) delete rest[field];
    return { request: { ...rest, [fields[0]]: cap }, changed: true, maxOutputTokens: cap };
  }
  if (largest <= cap) return { request, changed: false, maxOutputTokens: largest };
  const capped: Record<string, unknown> = { ...request };
  for (const field of fields) if (typeof capped[field] === "number" && (capped[field] as number) > cap) capped[field] = cap;
  return { request: capped, changed: true, maxOutputTokens: cap };
}

/**
 * Output-limit fields that some OpenAI-compatible servers read *instead of* (or before) `max_tokens` /
 * `max_completion_tokens`, so a caller's value there would override the plan's cap upstream:
 * - `n_predict`: llama.cpp's server, which reads it first and falls back to `max_tokens`
 *   (`params.n_predict = json_value(data, "n_predict", json_value(data, "max_tokens", …))`, ggml-org/llama.cpp
 *   tools/server/server.cpp; tools/server/README.md: "`n_predict`: … -1 = infinity");
 * - `num_predict`: Ollama (top level here, and in its `options` object as its native API takes it; docs/modelfile.md:
 *   "num_predict: Maximum number of tokens to predict … (Default: -1, infinite generation)");
 * - `max_new_tokens`: Hugging Face TGI (`parameters.max_new_tokens` of `/generate`, and top-level on some
 *   OpenAI-style wrappers; https://huggingface.github.io/text-generation-inference/ GenerateParameters);
 * - `max_output_tokens` (chat only): the Responses API's and Gemini-style servers' name for the same limit; on a
 *   chat request no OpenAI field has that name, so it can only be read as a limit by a server that is not OpenAI.
 * Dropped from prepaid requests before anything is forwarded: the reservation covers the cap, nothing more.
 */
export const CHAT_OUTPUT_LIMIT_ALIASES = ["n_predict", "num_predict", "max_new_tokens", "max_output_tokens"] as const;
/** The same for the Responses API, whose own output field is `max_output_tokens` (kept, and capped). */
export const RESPONSES_OUTPUT_LIMIT_ALIASES = ["n_predict", "num_predict", "max_new_tokens"] as const;

/**
 * The request without `aliases` (top level, and `num_predict` inside an `options` object): the same object when it
 * names none of them. See `CHAT_OUTPUT_LIMIT_ALIASES` for why.
 */
export function withoutOutputLimitAliases(request: Record<string, unknown>, aliases: readonly string[]): { request: Record<string, unknown>; dropped: string[] } {
  const dropped = aliases.filter((field) => Object.prototype.hasOwnProperty.call(request, field));
  const options = request.options;
  const optionsAlias = !!options && typeof options === "object" && !Array.isArray(options) && Object.prototype.hasOwnProperty.call(options, "num_predict");
  if (dropped.length === 0 && !optionsAlias) return { request, dropped };
  const rest: Record<string, unknown> = { ...request };
  for (const field of dropped) delete rest[field];
  if (optionsAlias) {
    const { num_predict: _numPredict, ...otherOptions } = options as Record<string, unknown>;
    rest.options = otherOptions;
    dropped.push("options.num_predict");
  }
  return { request: rest, dropped };
}

/**
 * The dearest of several prices, field by field (each field at its highest among them): what a request that the
 * upstream may answer with any of these models (a router's fallback list) can cost at most per token.
 */
export function dearestPrice(prices: readonly ModelPrice[]): ModelPrice {
  const [first, ...rest] = prices;
  const out: ModelPrice = { input: first.input, output: first.output, cachedInput: first.cachedInput ?? first.input, reasoning: first.reasoning ?? first.output };
  for (const price of rest) {
    out.input = Math.max(out.input, price.input);
    out.output = Math.max(out.output, price.output);
    out.cachedInput = Math.max(out.cachedInput!, price.cachedInput ?? price.input);
    out.reasoning = Math.max(out.reasoning!, price.reasoning ?? price.output);
  }
  return out;
}

/**
 * Tokens of a chat request's `prediction` (OpenAI Predicted Outputs: `{type: "content", content: string | text
 * parts}`), by the model's tokenizer; 0 without one. OpenAI bills the prediction's rejected tokens as completion
 * tokens ("still counted in the total completion tokens for purposes of billing",
 * https://platform.openai.com/docs/guides/predicted-outputs), on top of what the model generates, so every choice
 * may cost this many output tokens more than the cap. A part that is not text is counted as its JSON text (more
 * than it can be worth, never less; written without recursion, `stringifyJson`).
 */
export function predictionTokensOf(prediction: unknown, model: string): number {
  if (prediction === undefined || prediction === null) return 0;
  const tally = new TokenTally(encodingForModel(model));
  const content = typeof prediction === "object" && !Array.isArray(prediction) ? (prediction as Record<string, unknown>).content : prediction;
  if (content === undefined || content === null) return 0;
  if (typeof content === "string") return tally.count(content);
  if (Array.isArray(content)) {
    let tokens = 0;
    for (const part of content) {
      const text = part && typeof part === "object" ? (part as Record<string, unknown>).text : undefined;
      tokens += tally.count(typeof text === "string" ? text : stringifyJson(part));
    }
    return tokens;
  }
  return tally.count(stringifyJson(content));
}

/** `n`: how many choices the request asks for (validated 1..128; 1 when absent). */
export function choicesOf(request: Record<string, unknown>): number {
  return typeof request.n === "number" ? request.n : 1;
}

/** One prepaid reservation, from the moment it is asked for until it is settled. */
export interface Hold {
  customerId: string;
  currency: string;
  transactionId: string;
  micros: number;
  /** The usage period the request counts in (kept on the hold, for the stale-hold sweep). */
  periodStart: string;
  /**
   * `requested`: the write was sent but not confirmed (the store failed or timed out; it may have landed, so the
   * request still settles it, at 0). `held`: confirmed. `refused`: the balance did not cover it; nothing is held.
   */
  state: "requested" | "held" | "refused";
}

/**
 * What a reservation covers: the prompt (tokenizer count) and `choices` × (the output cap + the prediction's tokens,
 * see `predictionTokensOf`), at the price given (the dearest the request can be answered at).
 */
export function reservationFor(promptTokens: number, choices: number, maxOutputTokens: number, price: ModelPrice, predictionTokens = 0): number {
  return maxCostOf(promptTokens, choices * (maxOutputTokens + predictionTokens), price);
}

export interface ReserveArgs {
  store?: CustomerStore;
  hold: Hold;
  now: number;
  log: Logger;
  requestId: string;
  /** For the refusal's message: what the reservation covers. */
  choices: number;
  maxOutputTokens: number;
  /** Tokens of the request's `prediction`, reserved per choice on top of the cap (named in the refusal). */
  predictionTokens?: number;
  /** The request field that asks for fewer output tokens, named in the refusal. @default "max_completion_tokens" */
  outputField?: string;
}

/**
 * Holds `hold.micros` of the customer's balance with one conditional write. Throws `InsufficientQuotaError` (429)
 * when the balance does not cover it, `ServiceUnavailableError` (503 `credit_store_unavailable`) when the store
 * cannot answer: a request that might not be paid for is not served.
 */
export async function reserveCredit({ store, hold, now, log, requestId, choices, maxOutputTokens, predictionTokens = 0, outputField = "max_completion_tokens" }: ReserveArgs): Promise<void> {
  if (!store) {
    log.error("configuration_invalid", { problems: ["a prepaid plan is served without a customers table (CUSTOMERS_TABLE)"] });
    throw new ConfigurationError("The service is misconfigured and cannot serve prepaid requests; its operator can see why in the function's logs.");
  }
  let result;
  try {
    result = await store.reserve({ customerId: hold.customerId, currency: hold.currency, transactionId: hold.transactionId, micros: hold.micros, now, periodStart: hold.periodStart });
  } catch (err) {
    // The write may have landed: the hold stays `requested`, and the request settles it at 0 after answering.
    log.error("credit_reserve_failed", { request_id: requestId, customer_id: hold.customerId, reserved_micros: hold.micros, error: describeError(err) });
    throw new ServiceUnavailableError("The service cannot check your prepaid balance right now; retry shortly.", "credit_store_unavailable");
  }
  if (result.ok) {
    hold.state = "held";
    return;
  }
  hold.state = "refused";
  const currency = hold.currency.toUpperCase();
  if (result.reason === "currency_mismatch") {
    log.error("credit_currency_mismatch", { request_id: requestId, customer_id: hold.customerId, plan_currency: hold.currency });
    throw new InsufficientQuotaError(`Your prepaid balance is kept in another currency than your plan's (${currency}), so it cannot pay for this request; ask the service's operator.`);
  }
  log.info("insufficient_quota", { request_id: requestId, customer_id: hold.customerId, balance_micros: result.balanceMicros, reserved_micros: hold.micros });
  // An embeddings request has no output tokens: only its input is reserved.
  const perChoice = predictionTokens > 0 ? `(${maxOutputTokens} output + ${predictionTokens} prediction) tokens` : `${maxOutputTokens} output tokens`;
  const covers = maxOutputTokens > 0 ? `its prompt and ${choices === 1 ? "" : `${choices} × `}${perChoice}` : "its input";
  const remedy = maxOutputTokens > 0 ? `Top up your credits, or ask for fewer output tokens (${outputField}).` : "Top up your credits, or send a shorter input.";
  throw new InsufficientQuotaError(
    `Your prepaid balance (${formatMicros(result.balanceMicros)} ${currency}) does not cover the most this request can cost ` +
      `(${formatMicros(hold.micros)} ${currency}: ${covers}). ` +
      remedy,
  );
}

/** What a finished request settles and counts. */
export interface SettleAndCountArgs {
  store?: CustomerStore;
  customer?: Customer;
  plan?: Plan;
  /** The prepaid reservation, when one was asked for. */
  hold?: Hold;
  /** The request counts towards the customer's period counters (chat and model routes; not `GET /v1/usage`). */
  counted: boolean;
  billed: boolean;
  usage: TokenUsage;
  cost?: Cost;
  now: number;
  log: Logger;
  requestId: string;
}

/**
 * After the answer: settles the prepaid hold (charge the cost when billed, else 0, and release the rest; the period
 * counters go in the same write) or, without a hold, adds the counters on their own. Returns how the request was
 * paid for (undefined when the customer is unknown). Never throws: a store that fails leaves the settlement
 * `pending` (the stale-hold sweep settles it from the ledger) or the counters uncounted, with a log line.
 */
export async function settleAndCount(args: SettleAndCountArgs): Promise<BillingOutcome | undefined> {
  const { store, customer, plan, hold, log, requestId } = args;
  if (!customer) return undefined;
  const mode = billingOf(plan);
  const increment = usageIncrement(args);
  if (hold && hold.state !== "refused" && store) {
    const costMicros = args.billed ? (args.cost?.micros ?? 0) : 0;
    try {
      const result = await store.settle({ customerId: hold.customerId, transactionId: hold.transactionId, reservedMicros: hold.micros, costMicros, now: args.now, usage: increment });
      if (!result.settled && hold.state === "held") {
        // Only the stale-hold sweep removes a hold it did not see settled, and only long after the function's
        // timeout: this request outlived that, and what it cost was released, not charged.
        log.error("credit_hold_missing", { request_id: requestId, customer_id: hold.customerId, transaction_id: hold.transactionId, cost_micros: costMicros });
      }
      if (result.shortfallMicros > 0) {
        log.warn("credit_shortfall", { request_id: requestId, customer_id: hold.customerId, reserved_micros: hold.micros, cost_micros: costMicros, shortfall_micros: result.shortfallMicros });
      }
      return {
        mode: "prepaid",
        reservedMicros: hold.micros,
        chargedMicros: result.chargedMicros,
        shortfallMicros: result.shortfallMicros,
        balanceAfterMicros: result.balanceMicros,
        settlement: "settled",
      };
    } catch (err) {
      log.warn("credit_settlement_pending", { request_id: requestId, customer_id: hold.customerId, transaction_id: hold.transactionId, cost_micros: costMicros, error: describeError(err) });
      return { mode: "prepaid", reservedMicros: hold.micros, settlement: "pending" };
    }
  }
  if (store && args.counted) {
    try {
      await store.addUsage(customer.customerId, increment, args.now);
    } catch (err) {
      log.warn("usage_count_failed", { request_id: requestId, customer_id: customer.customerId, error: describeError(err) });
    }
  }
  // A prepaid request that held nothing (refused, or answered before its reservation) was charged nothing.
  return mode === "prepaid" ? { mode, reservedMicros: 0, chargedMicros: 0, shortfallMicros: 0 } : { mode };
}

/** One request's contribution to its period's counters: always a request; tokens and cost only when billed. */
function usageIncrement({ plan, billed, usage, cost, now }: SettleAndCountArgs): UsageIncrement {
  return {
    periodStart: usagePeriodOf(plan, now).start,
    requests: 1,
    promptTokens: billed ? usage.prompt_tokens : 0,
    completionTokens: billed ? usage.completion_tokens : 0,
    costMicros: billed ? (cost?.micros ?? 0) : 0,
  };
}

/** A usage period as `GET /v1/usage` shows it: `[start, end)`, UTC dates. */
export interface UsagePeriodBounds {
  type: QuotaPeriod;
  start: string;
  end: string;
}

/** The period the counters are kept in: the plan's quota period, or the calendar month (UTC) without one. */
export function usagePeriodOf(plan: { quota?: { limit?: number; period: QuotaPeriod; offset: number } } | undefined, now: number): UsagePeriodBounds {
  const { period, offset } = plan?.quota ?? DEFAULT_USAGE_PERIOD;
  const start = quotaPeriodStart(period, offset, now);
  const [year, month, day] = start.split("-").map(Number);
  const DAY = 86_400_000;
  const startMs = Date.UTC(year, month - 1, day);
  // A MONTH period starts on day 1 + offset (offset ≤ 27, so always in the month it belongs to).
  const endMs = period === "DAY" ? startMs + DAY : period === "WEEK" ? startMs + 7 * DAY : Date.UTC(year, month, 1) + offset * DAY;
  return { type: period, start, end: new Date(endMs).toISOString().slice(0, 10) };
}

/** The `GET /v1/usage` answer (a JSON object; balance fields null on postpaid plans). */
export interface UsageAnswer {
  object: "usage";
  customer: string;
  plan: string;
  billing: "prepaid" | "postpaid";
  currency: string | null;
  balance_micros: number | null;
  reserved_micros: number | null;
  balance: string | null;
  period: UsagePeriodBounds;
  quota: { limit: number } | null;
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  cost_micros: number;
  cost: string | null;
}

/**
 * The caller's own standing: its plan and billing mode, its balance (prepaid) and the current period's counters.
 * Two reads (balance and counters, at once). Throws `ServiceUnavailableError` when the store cannot answer.
 */
export async function usageAnswer(store: CustomerStore, customer: Customer, plan: Plan | undefined, now: number, log: Logger): Promise<UsageAnswer> {
  const mode = billingOf(plan);
  const period = usagePeriodOf(plan, now);
  let totals: UsageTotals;
  let balance: AccountBalance | undefined;
  try {
    // One read: the balance and the counters always agree (a settlement writes both at once).
    totals = await store.getUsage(customer.customerId, period.start);
    balance = mode === "prepaid" ? totals.balance : undefined;
  } catch (err) {
    log.error("usage_read_failed", { customer_id: customer.customerId, error: describeError(err) });
    throw new ServiceUnavailableError("The service cannot read your usage right now; retry shortly.", "customer_store_unavailable");
  }
  const currency = (balance?.currency ?? plan?.pricing?.currency) || null;
  return {
    object: "usage",
    customer: customer.customerId,
    plan: customer.plan,
    billing: mode,
    currency,
    balance_micros: balance ? balance.balanceMicros : null,
    reserved_micros: balance ? balance.reservedMicros : null,
    balance: balance ? formatMicros(balance.balanceMicros) : null,
    period,
    quota: plan?.quota ? { limit: plan.quota.limit } : null,
    requests: totals.requests,
    prompt_tokens: totals.promptTokens,
    completion_tokens: totals.completionTokens,
    total_tokens: totals.promptTokens + totals.completionTokens,
    cost_micros: totals.costMicros,
    cost: currency ? formatMicros(totals.costMicros) : null,
  };
}
