/**
 * How Stripe's API writes amounts: integers in the currency's minor unit. Shared by the Stripe meters' prices
 * (`infra/stripe-meters.ts`) and the Stripe webhook that turns a payment's `amount_total` into prepaid credit.
 */

/**
 * Currencies whose API amounts are in whole units ("Zero-decimal currencies", https://docs.stripe.com/currencies#zero-decimal).
 * ISK is not here: Stripe treats it as zero-decimal but takes its amounts in two-decimal form for backwards
 * compatibility (same page, "Special cases"), so in the API its minor unit is still a hundredth.
 */
export const ZERO_DECIMAL_CURRENCIES: readonly string[] = ["bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"];
/** Currencies whose API amounts are in thousandths (https://docs.stripe.com/currencies#three-decimal). */
export const THREE_DECIMAL_CURRENCIES: readonly string[] = ["bhd", "jod", "kwd", "omr", "tnd"];

/** Digits of the currency's minor unit as Stripe's API counts amounts: 0 (JPY), 3 (KWD) or 2 (everything else). */
export function minorUnitDigits(currency: string): 0 | 2 | 3 {
  const code = currency.toLowerCase();
  if (ZERO_DECIMAL_CURRENCIES.includes(code)) return 0;
  if (THREE_DECIMAL_CURRENCIES.includes(code)) return 3;
  return 2;
}

/** Micro-units (millionths of the currency unit) in one Stripe minor unit: 10,000 for USD cents, 1,000,000 for JPY. */
export function microsPerMinorUnit(currency: string): number {
  return 10 ** (6 - minorUnitDigits(currency));
}
