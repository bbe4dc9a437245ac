/**
 * Money, as integers: prices and costs in micro-units (millionths) of a plan's currency. No floating point touches
 * money anywhere: prices are parsed from their decimal text, costs are computed with BigInt and rounded once.
 *
 * Shared by the Pulumi program (validates the stack config at preview), the function (prices each request) and the
 * scripts (usage reports). No Pulumi or AWS imports.
 */

/** Micro-units of a currency: 1 USD = 1,000,000 micros. Always a safe integer. */
export type Micros = number;

/** One model's prices, in micro-units of the plan's currency per 1,000,000 tokens. */
export interface ModelPrice {
  /** Uncached input (prompt) tokens. */
  input: Micros;
  /** Output (completion) tokens. */
  output: Micros;
  /** Cached input tokens (`prompt_tokens_details.cached_tokens`). @default input */
  cachedInput?: Micros;
  /** Reasoning tokens (`completion_tokens_details.reasoning_tokens`, part of the output). @default output */
  reasoning?: Micros;
}

/** A plan's prices as the function receives them (the `PLANS` variable): integers only. */
export interface PlanPricing {
  /** ISO 4217 code, lower case (Stripe's convention), e.g. `usd`. */
  currency: string;
  /** Model name (exactly as the caller sends it) → price. */
  prices: Record<string, ModelPrice>;
}

/** The token counts a price applies to. `cached` ⊆ `prompt`, `reasoning` ⊆ `completion`. */
export interface PricedUsage {
  prompt_tokens: number;
  completion_tokens: number;
  cached_tokens?: number;
  reasoning_tokens?: number;
}

export interface Cost {
  currency: string;
  micros: Micros;
}

/** A price text that cannot be used; `path` names the config key. */
export class PriceError extends Error {
  constructor(readonly path: string, problem: string) {
    super(`${path}: ${problem}`);
    this.name = "PriceError";
  }
}

/** The four price fields of the stack config, per 1M tokens, in the plan's currency. */
export const PRICE_FIELDS = ["input", "output", "cachedInput", "reasoning"] as const;
const MAX_PRICE_MICROS = 1_000_000_000_000; // 1,000,000 currency units per 1M tokens: far above any real price

/**
 * Parses a decimal price (a YAML number or a string such as `"0.075"`) into micro-units, exactly. At most six
 * decimal places (one micro-unit); exponents, negatives and non-numbers are refused.
 */
export function parseDecimalMicros(raw: unknown, path: string): Micros {
  const text = typeof raw === "number" ? (Number.isFinite(raw) ? String(raw) : "") : typeof raw === "string" ? raw.trim() : "";
  const match = /^(\d+)(?:\.(\d+))?$/.exec(text);
  if (!match) throw new PriceError(path, `must be a non-negative decimal number such as 0.15 (got ${JSON.stringify(raw)})`);
  const [, whole, fraction = ""] = match;
  const trimmed = fraction.replace(/0+$/, "");
  if (trimmed.length > 6) throw new PriceError(path, `has more than 6 decimal places (got ${text}); prices are kept in millionths of the currency`);
  const micros = Number(whole) * 1_000_000 + Number(trimmed.padEnd(6, "0"));
  if (!Number.isSafeInteger(micros) || micros > MAX_PRICE_MICROS) throw new PriceError(path, `is implausibly large (got ${text})`);
  return micros;
}

/**
 * Parses a plan's `prices` map from the stack config: `{ <model>: { input, output, cachedInput?, reasoning? } }`,
 * each per 1,000,000 tokens in the plan's currency, the way providers publish them. Unknown fields are refused so
 * that a typo (`ouput`) cannot silently price tokens at zero.
 */
export function parsePriceTable(raw: unknown, path: string): Record<string, ModelPrice> {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    throw new PriceError(path, "must be a map of model name → {input, output, cachedInput?, reasoning?} per 1M tokens");
  }
  const table: Record<string, ModelPrice> = Object.create(null) as Record<string, ModelPrice>;
  for (const [model, entry] of Object.entries(raw as Record<string, unknown>)) {
    const at = `${path}.${model}`;
    if (model.trim() === "") throw new PriceError(path, "model names must not be empty");
    if (typeof entry !== "object" || entry === null || Array.isArray(entry)) {
      throw new PriceError(at, "must be {input, output, cachedInput?, reasoning?} per 1M tokens");
    }
    const fields = entry as Record<string, unknown>;
    for (const key of Object.keys(fields)) {
      if (!(PRICE_FIELDS as readonly string[]).includes(key)) throw new PriceError(`${at}.${key}`, `is not a price field; use ${PRICE_FIELDS.join(", ")}`);
    }
    if (fields.input === undefined || fields.output === undefined) throw new PriceError(at, "needs both input and output (per 1M tokens)");
    const price: ModelPrice = { input: parseDecimalMicros(fields.input, `${at}.input`), output: parseDecimalMicros(fields.output, `${at}.output`) };
    if (fields.cachedInput !== undefined) price.cachedInput = parseDecimalMicros(fields.cachedInput, `${at}.cachedInput`);
    if (fields.reasoning !== undefined) price.reasoning = parseDecimalMicros(fields.reasoning, `${at}.reasoning`);
    table[model] = price;
  }
  return table;
}

/** A currency code as Stripe takes it: three ASCII letters, lower case. */
export function parseCurrency(raw: unknown, path: string): string {
  if (raw === undefined) return "usd";
  if (typeof raw !== "string" || !/^[A-Za-z]{3}$/.test(raw)) throw new PriceError(path, `must be a three-letter ISO 4217 code such as usd (got ${JSON.stringify(raw)})`);
  return raw.toLowerCase();
}

/** Looks up a model's price; own properties only, so `__proto__` or `constructor` never resolve to a price. */
export function priceFor(pricing: PlanPricing | undefined, model: string): ModelPrice | undefined {
  if (!pricing) return undefined;
  return Object.prototype.hasOwnProperty.call(pricing.prices, model) ? pricing.prices[model] : undefined;
}

/**
 * The cost of one request, in micro-units, rounded up once at the end (so a request is never billed less than its
 * tokens are worth, and at most one micro-unit more). Cached tokens are billed at `cachedInput` and the rest of the
 * prompt at `input`; reasoning tokens at `reasoning` and the rest of the completion at `output`. Counts are clamped
 * so that a part can never exceed its whole.
 */
export function costOf(usage: PricedUsage, price: ModelPrice): Micros {
  const prompt = BigInt(nonNegative(usage.prompt_tokens));
  const completion = BigInt(nonNegative(usage.completion_tokens));
  const cached = minBig(BigInt(nonNegative(usage.cached_tokens ?? 0)), prompt);
  const reasoning = minBig(BigInt(nonNegative(usage.reasoning_tokens ?? 0)), completion);
  const perMillion =
    (prompt - cached) * BigInt(price.input) +
    cached * BigInt(price.cachedInput ?? price.input) +
    (completion - reasoning) * BigInt(price.output) +
    reasoning * BigInt(price.reasoning ?? price.output);
  const micros = (perMillion + 999_999n) / 1_000_000n;
  if (micros > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError("cost exceeds the safe integer range");
  return Number(micros);
}

/**
 * The most `promptTokens` in and `completionTokens` out can cost at this price, whatever share of them turns out
 * cached or reasoning: each side at the higher of its two prices (a cached-input price above the input price, or a
 * reasoning price above the output price, is odd but configurable). Rounded up once, as `costOf`; so `costOf` of any
 * usage within these counts is never more than this. What a prepaid request reserves before the upstream call.
 */
export function maxCostOf(promptTokens: number, completionTokens: number, price: ModelPrice): Micros {
  const input = Math.max(price.input, price.cachedInput ?? price.input);
  const output = Math.max(price.output, price.reasoning ?? price.output);
  return costOf({ prompt_tokens: promptTokens, completion_tokens: completionTokens }, { input, output });
}

/** Formats micro-units as a decimal amount, e.g. 1234567 → "1.234567". Exact (no floating point). */
export function formatMicros(micros: Micros): string {
  const sign = micros < 0 ? "-" : "";
  const abs = Math.abs(micros);
  return `${sign}${Math.floor(abs / 1_000_000)}.${String(abs % 1_000_000).padStart(6, "0")}`;
}

function nonNegative(value: number): number {
  return Number.isSafeInteger(value) && value > 0 ? value : 0;
}

function minBig(a: bigint, b: bigint): bigint {
  return a < b ? a : b;
}

/**
 * Parses a plan's pricing in the form the function receives it (the `PLANS` variable or `PLANS_FILE`):
 * `{ currency, prices: { <model>: { input, output, cachedInput?, reasoning? } } }`, every price an integer number of
 * micro-units per 1,000,000 tokens (what `parsePriceTable` produces). Unknown fields are refused, as there.
 */
export function parsePlanPricing(raw: unknown, path: string): PlanPricing {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) throw new PriceError(path, "must be {currency, prices}");
  const fields = raw as Record<string, unknown>;
  for (const key of Object.keys(fields)) if (key !== "currency" && key !== "prices") throw new PriceError(`${path}.${key}`, "is not a pricing field; use currency, prices");
  if (typeof fields.currency !== "string" || !/^[a-z]{3}$/.test(fields.currency)) {
    throw new PriceError(`${path}.currency`, `must be a lower-case three-letter ISO 4217 code such as usd (got ${JSON.stringify(fields.currency)})`);
  }
  const table = fields.prices;
  if (typeof table !== "object" || table === null || Array.isArray(table)) throw new PriceError(`${path}.prices`, "must be a map of model name → price");
  const prices: Record<string, ModelPrice> = Object.create(null) as Record<string, ModelPrice>;
  for (const [model, entry] of Object.entries(table as Record<string, unknown>)) {
    const at = `${path}.prices.${model}`;
    if (model.trim() === "") throw new PriceError(`${path}.prices`, "model names must not be empty");
    if (typeof entry !== "object" || entry === null || Array.isArray(entry)) throw new PriceError(at, "must be {input, output, cachedInput?, reasoning?} in micro-units per 1M tokens");
    const price = entry as Record<string, unknown>;
    for (const key of Object.keys(price)) {
      if (!(PRICE_FIELDS as readonly string[]).includes(key)) throw new PriceError(`${at}.${key}`, `is not a price field; use ${PRICE_FIELDS.join(", ")}`);
    }
    const micros = (key: (typeof PRICE_FIELDS)[number]): Micros | undefined => {
      const value = price[key];
      if (value === undefined) return undefined;
      if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0 || value > MAX_PRICE_MICROS) {
        throw new PriceError(`${at}.${key}`, `must be an integer number of micro-units from 0 to ${MAX_PRICE_MICROS} (got ${JSON.stringify(value)})`);
      }
      return value;
    };
    const input = micros("input");
    const output = micros("output");
    if (input === undefined || output === undefined) throw new PriceError(at, "needs both input and output");
    const parsed: ModelPrice = { input, output };
    const cachedInput = micros("cachedInput");
    const reasoning = micros("reasoning");
    if (cachedInput !== undefined) parsed.cachedInput = cachedInput;
    if (reasoning !== undefined) parsed.reasoning = reasoning;
    prices[model] = parsed;
  }
  return { currency: fields.currency, prices };
}
