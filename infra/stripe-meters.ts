/**
 * Stripe Billing Meters for `stripeBilling: meters`: the meter the usage forwarder reports to, a product, and one
 * metered monthly price per currency the plans charge in, on which one unit of usage is one micro-unit (a millionth of
 * the currency unit), so Stripe's meter total equals the ledger's `cost_micros` sum exactly.
 *
 * What the provider does (pulumi-stripe 0.0.28 bridges lukasaron/terraform-provider-stripe at ea82f92, the version
 * its provider/go.mod pins; file and line below are from that commit):
 * - Meter: only `display_name` updates in place; `event_name`, `default_aggregation`, `customer_mapping`,
 *   `value_settings` and `event_time_window` are ForceNew (stripe/resource_stripe_meter.go:28-106), and delete only
 *   forgets the meter (resourceStripeMeterDelete, :292-296: "Stripe API doesn't support deletion of billing meters",
 *   `d.SetId("")`, no deactivate call): a replaced or destroyed meter stays ACTIVE in Stripe.
 * - Price: `currency`, `product`, `unit_amount(_decimal)`, `recurring` (interval, usage type, meter), `tiers`,
 *   `billing_scheme`, `transform_quantity` and `custom_unit_amount` are ForceNew (resource_stripe_price.go:28-375);
 *   `active`, `nickname`, `metadata`, `lookup_key`, `tax_behavior` and `currency_options` update in place
 *   (:761-854); delete only forgets the price (:856-860, no archive call): a replaced price stays active, and every
 *   subscription on it keeps billing through it.
 * - Product: delete calls Products.Del and, when prices are attached (always, here), swallows Stripe's
 *   invalid_request error and keeps the product (resource_stripe_product.go:325-351).
 * So every Stripe object here is `retainOnDelete`: that is what the provider does anyway, made visible in the
 * program; cleaning up (deactivating the meter, archiving prices) is a deliberate step in Stripe (see the README).
 */
import * as pulumi from "@pulumi/pulumi";
import * as stripe from "pulumi-stripe";
import { minorUnitDigits } from "../functions/shared/currency";
import { STRIPE_METER_EVENT_NAME } from "../functions/shared/ledger-schema";

export { minorUnitDigits, THREE_DECIMAL_CURRENCIES, ZERO_DECIMAL_CURRENCIES } from "../functions/shared/currency";
/** `unit_amount_decimal`: "a decimal value in cents (or local equivalent) with at most 12 decimal places" (Stripe API, prices/create). */
export const MAX_UNIT_AMOUNT_DECIMAL_PLACES = 12;

/**
 * The price of one micro-unit (a millionth of the currency unit) in the currency's minor unit, as Stripe's
 * `unit_amount_decimal` takes it: `"0.0001"` (cents) for USD, `"0.000001"` (yen) for JPY, `"0.001"` (fils) for KWD.
 * Exact decimal text, built from digit counts rather than floating-point division.
 */
export function microUnitAmountDecimal(currency: string): string {
  const places = 6 - minorUnitDigits(currency);
  if (places > MAX_UNIT_AMOUNT_DECIMAL_PLACES) throw new RangeError(`${currency}: ${places} decimal places exceed Stripe's ${MAX_UNIT_AMOUNT_DECIMAL_PLACES}`);
  return `0.${"0".repeat(places - 1)}1`;
}

/** Inputs of the meter that the forwarder's events must match (all ForceNew in the provider). */
export const METER_SETTINGS = {
  eventName: STRIPE_METER_EVENT_NAME,
  // Each event's `value` is the request's cost in micro-units; the meter sums them per customer and period.
  defaultAggregation: { formula: "sum" },
  customerMapping: { eventPayloadKey: "stripe_customer_id", type: "by_id" },
  valueSettings: { eventPayloadKey: "value" },
} as const;

export interface StripeMeteredBillingArgs {
  /** Lower-case ISO codes; one metered price each. */
  currencies: readonly string[];
  /** Invoice line name. @default "AI usage" */
  productName?: string;
}

/** The Stripe meter, product and per-currency metered prices a customer's subscription uses with `stripeBilling: meters`. */
export class StripeMeteredBilling extends pulumi.ComponentResource {
  public readonly meterId: pulumi.Output<string>;
  public readonly productId: pulumi.Output<string>;
  /** Currency → price id: the price a subscription item in that currency uses. */
  public readonly priceIds: pulumi.Output<Record<string, string>>;

  constructor(name: string, args: StripeMeteredBillingArgs, opts?: pulumi.ComponentResourceOptions) {
    super("metered-ai-api:index:StripeMeteredBilling", name, {}, opts);
    // The provider's delete is a no-op for meters and prices and fails quietly for a product with prices; retained,
    // Pulumi says so instead of reporting a deletion that did not happen.
    const retained = { parent: this, retainOnDelete: true };
    const meter = new stripe.Meter(
      `${name}-meter`,
      {
        // The only field Stripe lets change later; not shown to customers.
        displayName: "AI usage cost (micro-units)",
        eventName: METER_SETTINGS.eventName,
        defaultAggregation: { ...METER_SETTINGS.defaultAggregation },
        customerMapping: { ...METER_SETTINGS.customerMapping },
        valueSettings: { ...METER_SETTINGS.valueSettings },
      },
      retained,
    );
    const product = new stripe.Product(
      `${name}-product`,
      {
        name: args.productName ?? "AI usage",
        description: "Metered AI API usage. One unit is one millionth of the invoice currency (1,000,000 units = 1 USD, 1 EUR, 1 JPY…).",
        // Printed after the quantity on invoices ("12,345,678 micro-units"); Stripe allows at most 12 characters.
        unitLabel: "micro-unit",
        metadata: { meter_event_name: STRIPE_METER_EVENT_NAME, unit: "0.000001 of the invoice currency" },
      },
      retained,
    );
    const prices = args.currencies.map((currency) => {
      const code = currency.toLowerCase();
      const decimal = microUnitAmountDecimal(code);
      return {
        currency: code,
        price: new stripe.Price(
          `${name}-price-${code}`,
          {
            product: product.id,
            currency: code,
            billingScheme: "per_unit",
            // The provider sends it with stripe-go's high_precision form encoding (strconv 'f', -1), so 0.0001 goes
            // out as "0.0001" (terraform-provider-stripe vendor/github.com/stripe/stripe-go/v78/price.go:160,
            // form/form.go:244-256); Stripe keeps the decimal text exactly.
            unitAmountDecimal: Number(decimal),
            recurring: {
              interval: "month",
              intervalCount: 1,
              usageType: "metered",
              // Stripe's default and what it returns for a metered price under the provider's API version
              // (2024-04-10); spelled out because the provider reads it back and an omitted value would show as a
              // change on every preview.
              aggregateUsage: "sum",
              meter: meter.id,
            },
            // Internal (not shown to customers): what one unit is.
            nickname: `AI usage, ${code.toUpperCase()}: 1 unit = 0.000001 ${code.toUpperCase()}`,
            metadata: { meter_event_name: STRIPE_METER_EVENT_NAME, unit_amount_decimal: decimal },
          },
          retained,
        ),
      };
    });

    this.meterId = meter.id;
    this.productId = product.id;
    this.priceIds = pulumi.all(prices.map(({ price }) => price.id)).apply((ids) => Object.fromEntries(prices.map(({ currency }, i) => [currency, ids[i]])));
    this.registerOutputs({ meterId: this.meterId, productId: this.productId, priceIds: this.priceIds });
  }
}
