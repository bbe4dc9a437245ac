import * as pulumi from "@pulumi/pulumi";
import * as stripe from "pulumi-stripe";

/**
 * Stripe events Moesif's Stripe integration needs: every customer and subscription event (Moesif's guide says
 * "Select all Customer events") plus invoice events, so Moesif sees what was billed and paid. Stripe's API has no
 * group wildcards such as `customer.*` (only `*`, everything), so each name is listed.
 *
 * Only events of the API version the Stripe provider pins: pulumi-stripe 0.0.28 bridges
 * lukasaron/terraform-provider-stripe on stripe-go v78.12.0 (provider/go.mod), whose API version is 2024-04-10
 * (stripe-go api_version.go) and whose EventType list (event.go) holds every name below. `invoice.overdue` and
 * `invoice.will_be_due` are not in it: they first appear in stripe-go v79.5.0 and in stripe-node 16.5.0
 * (2024-07-25, "Add support for new values invoice.overdue and invoice.will_be_due on enums
 * WebhookEndpointCreateParams.enabled_events[]"), after the 2024-06-20 API version.
 */
export const MOESIF_STRIPE_EVENTS: readonly string[] = [
  "customer.created",
  "customer.deleted",
  "customer.updated",
  "customer.discount.created",
  "customer.discount.deleted",
  "customer.discount.updated",
  "customer.source.created",
  "customer.source.deleted",
  "customer.source.expiring",
  "customer.source.updated",
  "customer.subscription.created",
  "customer.subscription.deleted",
  "customer.subscription.paused",
  "customer.subscription.pending_update_applied",
  "customer.subscription.pending_update_expired",
  "customer.subscription.resumed",
  "customer.subscription.trial_will_end",
  "customer.subscription.updated",
  "customer.tax_id.created",
  "customer.tax_id.deleted",
  "customer.tax_id.updated",
  "invoice.created",
  "invoice.deleted",
  "invoice.finalization_failed",
  "invoice.finalized",
  "invoice.marked_uncollectible",
  "invoice.paid",
  "invoice.payment_action_required",
  "invoice.payment_failed",
  "invoice.payment_succeeded",
  "invoice.sent",
  "invoice.upcoming",
  "invoice.updated",
  "invoice.voided",
];

export interface MoesifStripeWebhookArgs {
  /** The webhook URL shown in Moesif's Stripe integration dialog. */
  url: pulumi.Input<string>;
  /** @default MOESIF_STRIPE_EVENTS */
  events?: readonly string[];
}

/** The Stripe → Moesif webhook that keeps Moesif's companies and subscriptions in step with Stripe. */
export class MoesifStripeWebhook extends pulumi.ComponentResource {
  public readonly endpointId: pulumi.Output<string>;
  /** Signing secret (`whsec_…`), secret. */
  public readonly signingSecret: pulumi.Output<string>;

  constructor(name: string, args: MoesifStripeWebhookArgs, opts?: pulumi.ComponentResourceOptions) {
    super("metered-ai-api:index:MoesifStripeWebhook", name, {}, opts);
    const endpoint = new stripe.WebhookEndpoint(
      `${name}-endpoint`,
      { url: args.url, enabledEvents: [...(args.events ?? MOESIF_STRIPE_EVENTS)], description: "Moesif billing (metered-ai-api)" },
      { parent: this },
    );
    this.endpointId = endpoint.id;
    // The provider marks it secret; mocks do not, so make sure.
    this.signingSecret = pulumi.secret(endpoint.secret);
    this.registerOutputs({ endpointId: this.endpointId, signingSecret: this.signingSecret });
  }
}
