import { expect } from "chai";
import { MOESIF_STRIPE_EVENTS } from "../../infra/moesif-stripe-webhook";

/**
 * Every `customer.*` and `invoice.*` event type of Stripe API version 2024-04-10, the version the Stripe provider
 * pins: pulumi-stripe 0.0.28 → lukasaron/terraform-provider-stripe → stripe-go v78.12.0 (provider/go.mod), whose
 * api_version.go:10 says "2024-04-10"; the list is its event.go:65-114 (EventType constants), copied verbatim.
 */
const STRIPE_2024_04_10_EVENTS = [
  "customer.created", "customer.deleted", "customer.discount.created", "customer.discount.deleted", "customer.discount.updated",
  "customer.source.created", "customer.source.deleted", "customer.source.expiring", "customer.source.updated",
  "customer.subscription.created", "customer.subscription.deleted", "customer.subscription.paused",
  "customer.subscription.pending_update_applied", "customer.subscription.pending_update_expired", "customer.subscription.resumed",
  "customer.subscription.trial_will_end", "customer.subscription.updated", "customer.tax_id.created", "customer.tax_id.deleted",
  "customer.tax_id.updated", "customer.updated", "invoice.created", "invoice.deleted", "invoice.finalization_failed",
  "invoice.finalized", "invoice.marked_uncollectible", "invoice.paid", "invoice.payment_action_required", "invoice.payment_failed",
  "invoice.payment_succeeded", "invoice.sent", "invoice.upcoming", "invoice.updated", "invoice.voided",
];

describe("Stripe events of the webhook (infra/moesif-stripe-webhook.ts)", () => {
  it("enables only events that Stripe API version 2024-04-10 knows", () => {
    for (const event of MOESIF_STRIPE_EVENTS) expect(STRIPE_2024_04_10_EVENTS, event).to.include(event);
  });

  it("leaves out invoice.overdue and invoice.will_be_due, which Stripe added after that version", () => {
    expect(MOESIF_STRIPE_EVENTS).to.not.include("invoice.overdue");
    expect(MOESIF_STRIPE_EVENTS).to.not.include("invoice.will_be_due");
  });

  it("still covers every customer, subscription and invoice event of that version", () => {
    expect([...MOESIF_STRIPE_EVENTS].sort()).to.deep.equal([...STRIPE_2024_04_10_EVENTS].sort());
  });
});
