/**
 * The second Stripe webhook endpoint: Stripe tells the function (`POST <stage>/stripe/webhook`) about paid credit
 * purchases, and the function credits the customer's prepaid balance (functions/ai-chat/stripe-webhook.ts).
 *
 * Its URL is built from the REST API's id, the region and the stage, not from the stage's `invokeUrl`: the stage
 * depends (through the deployment and the Lambda permissions) on the function, and the function's environment names
 * the SSM parameter holding this endpoint's signing secret, so taking `invokeUrl` would be a dependency cycle.
 * API Gateway's invoke URL is exactly `https://{restapi_id}.execute-api.{region}.amazonaws.com/{stage_name}/`
 * (API Gateway developer guide, how-to-call-api) and `amazonaws.com` is the partition's DNS suffix.
 *
 * What the provider does (pulumi-stripe 0.0.28 → lukasaron/terraform-provider-stripe,
 * stripe/resource_stripe_webhook_endpoint.go): `url`, `enabled_events` and `description` update in place; `secret`
 * is "Only returned at creation" and kept in the state (marked secret by the SDK: additionalSecretOutputs), so a new
 * URL (a replaced REST API) keeps the secret, and only a new endpoint brings a new one, which then reaches the
 * function through its SSM parameter and SECRETS_VERSION.
 */
import * as pulumi from "@pulumi/pulumi";
import * as stripe from "pulumi-stripe";

/**
 * The events the function credits on. Each is in the EventType list of the Stripe API version the provider pins
 * (pulumi-stripe 0.0.28 → lukasaron/terraform-provider-stripe → stripe-go v78.12.0, API version 2024-04-10,
 * api_version.go; event.go:49-50 `checkout.session.async_payment_succeeded`, `checkout.session.completed`, :107
 * `invoice.paid`):
 * - `checkout.session.completed`: a Checkout payment (`mode: payment`), credited when `payment_status` is `paid`;
 * - `checkout.session.async_payment_succeeded`: the same session paid later (bank debits and other delayed methods,
 *   which complete with `payment_status: unpaid` first); one credit per session either way (credit id
 *   `stripe:<session id>`);
 * - `invoice.paid`: an invoiced credit pack, credited when the invoice's `metadata.purpose` is `credits`;
 * - `charge.refunded`, `charge.dispute.created` (event.go `EventTypeChargeRefunded`, `EventTypeChargeDisputeCreated`):
 *   never debited, logged as errors (`stripe_credit_refunded` / `stripe_credit_disputed`) so the operator debits by
 *   hand.
 */
export const STRIPE_CREDIT_EVENTS: readonly string[] = [
  "checkout.session.completed",
  "checkout.session.async_payment_succeeded",
  "invoice.paid",
  "charge.refunded",
  "charge.dispute.created",
];

export interface StripeCreditsWebhookArgs {
  /** The REST API's id (`RestApi.id`). */
  restApiId: pulumi.Input<string>;
  /** The region the REST API is in. */
  region: pulumi.Input<string>;
  /** The partition's DNS suffix (`amazonaws.com`; `amazonaws.com.cn` in China). */
  dnsSuffix: pulumi.Input<string>;
  stageName: string;
  /** The webhook route's path (`/stripe/webhook`). */
  path: string;
  /** @default STRIPE_CREDIT_EVENTS */
  events?: readonly string[];
}

/** The webhook URL of a stage's route, as API Gateway serves it. */
export function stageRouteUrl(restApiId: string, region: string, dnsSuffix: string, stageName: string, path: string): string {
  return `https://${restApiId}.execute-api.${region}.${dnsSuffix}/${stageName}${path}`;
}

/** The Stripe → function webhook endpoint for credit purchases, and its signing secret. */
export class StripeCreditsWebhook extends pulumi.ComponentResource {
  public readonly url: pulumi.Output<string>;
  public readonly endpointId: pulumi.Output<string>;
  /** Signing secret (`whsec_…`), secret. */
  public readonly signingSecret: pulumi.Output<string>;

  constructor(name: string, args: StripeCreditsWebhookArgs, opts?: pulumi.ComponentResourceOptions) {
    super("metered-ai-api:index:StripeCreditsWebhook", name, {}, opts);
    this.url = pulumi
      .all([args.restApiId, args.region, args.dnsSuffix])
      .apply(([restApiId, region, dnsSuffix]) => stageRouteUrl(restApiId, region, dnsSuffix, args.stageName, args.path));
    const endpoint = new stripe.WebhookEndpoint(
      `${name}-endpoint`,
      { url: this.url, enabledEvents: [...(args.events ?? STRIPE_CREDIT_EVENTS)], description: "Prepaid credits (metered-ai-api)" },
      { parent: this },
    );
    this.endpointId = endpoint.id;
    // The provider marks it secret; mocks do not, so make sure.
    this.signingSecret = pulumi.secret(endpoint.secret);
    this.registerOutputs({ url: this.url, endpointId: this.endpointId, signingSecret: this.signingSecret });
  }
}
