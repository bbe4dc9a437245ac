import { marshall } from "@aws-sdk/util-dynamodb";
import type { DynamoDBRecord, DynamoDBStreamEvent } from "aws-lambda";
import { expect } from "chai";
import type { LedgerItem } from "../../functions/shared/ledger-schema";
import { createForwarderFromEnv, type DeliveryReport } from "../../functions/usage-forwarder/forwarder";
import { createHandler, itemFromRecord } from "../../functions/usage-forwarder/index";
import { MoesifCollector } from "../../scripts/local/moesif-collector";
import { StripeServer } from "../../scripts/local/stripe-server";
import { recordForScan, registerSecret } from "../helpers/secret-scan";
import { LedgerFixture, ledgerItem } from "./ledger-fixture";

const APP_ID = "moesif-app-id-forwarder-handler-0003";
const STRIPE_KEY = "sk_test_forwarder_handler_key_6666666";
registerSecret(APP_ID, STRIPE_KEY);

let sequence = 1000;

/** A DynamoDB stream record as Lambda delivers it (NEW_IMAGE view): the item in DynamoDB JSON. */
function streamRecord(item: LedgerItem | undefined, eventName: DynamoDBRecord["eventName"] = "INSERT"): DynamoDBRecord {
  const seq = String(++sequence);
  return {
    eventID: `event-${seq}`,
    eventName,
    eventVersion: "1.1",
    eventSource: "aws:dynamodb",
    awsRegion: "us-east-1",
    eventSourceARN: "arn:aws:dynamodb:us-east-1:123456789012:table/usage-ledger/stream/2030-01-01T00:00:00.000",
    dynamodb: {
      ApproximateCreationDateTime: Math.floor(Date.now() / 1000),
      Keys: item ? { transaction_id: { S: item.transaction_id } } : undefined,
      ...(item ? { NewImage: marshall(item, { removeUndefinedValues: true }) as NonNullable<DynamoDBRecord["dynamodb"]>["NewImage"] } : {}),
      SequenceNumber: seq,
      SizeBytes: 1024,
      StreamViewType: "NEW_IMAGE",
    },
  };
}

describe("usage forwarder Lambda handler", () => {
  const ledger = new LedgerFixture();
  let collector: MoesifCollector;
  let stripe: StripeServer;
  let logs: string[];

  const handler = () =>
    createHandler(() =>
      createForwarderFromEnv(
        ledger.env({ MOESIF_BASE_URI: collector.url, MOESIF_APPLICATION_ID: APP_ID, STRIPE_BILLING: "meters", STRIPE_API_KEY: STRIPE_KEY, STRIPE_API_BASE: stripe.url, SINK_TIMEOUT_MS: "400", FORWARDER_SWEEP_GRACE_MS: "60000" }),
        { write: (line) => logs.push(line), backoff: { initialMs: 5, maxMs: 20 } },
      ),
    );

  before(() => ledger.start());
  after(() => ledger.stop());
  beforeEach(async () => {
    await ledger.newTable();
    collector = await new MoesifCollector({ applicationId: APP_ID, keepRawPayloads: "all" }).start();
    stripe = await new StripeServer({ apiKey: STRIPE_KEY }).start();
    logs = [];
  });
  afterEach(async () => {
    await stripe.stop();
    await collector.stop();
    recordForScan("forwarder handler logs", logs);
    recordForScan("forwarder handler Moesif payloads", collector.rawPayloads);
  });

  it("delivers the items of a stream event's INSERT records at once and marks them", async () => {
    const items = [ledgerItem({ customer: "cus_alice", cost: 40 }), ledgerItem({ customer: "cus_bob", cost: 2 })];
    await ledger.put(...items);
    const event: DynamoDBStreamEvent = { Records: items.map((item) => streamRecord(item)) };

    const result = await handler()(event, { getRemainingTimeInMillis: () => 60_000 });

    expect(result).to.deep.equal({ batchItemFailures: [] });
    expect(collector.events().map((e) => e.transaction_id).sort()).to.deep.equal(items.map((i) => i.transaction_id).sort());
    expect(stripe.totals()).to.deep.equal({ cus_alice: 40, cus_bob: 2 });
    for (const item of items) {
      const stored = await ledger.get(item.transaction_id);
      expect(stored).to.include({ moesif_state: "delivered", stripe_state: "delivered" });
      expect(stored).to.not.have.property("undelivered");
    }
  });

  it("reports only the records it cannot read as batch item failures, and still delivers the others", async () => {
    const item = ledgerItem();
    await ledger.put(item);
    const noImage = streamRecord(undefined);
    const notAnItem = streamRecord(item);
    notAnItem.dynamodb!.NewImage = { transaction_id: { S: "x" } };

    const result = await handler()({ Records: [noImage, streamRecord(item), notAnItem] });

    expect(result).to.deep.equal({ batchItemFailures: [{ itemIdentifier: noImage.dynamodb!.SequenceNumber }, { itemIdentifier: notAnItem.dynamodb!.SequenceNumber }] });
    expect(collector.events().map((e) => e.transaction_id)).to.deep.equal([item.transaction_id]);
  });

  it("ignores MODIFY records (the forwarder's own marks)", async () => {
    const item = ledgerItem();

    const result = await handler()({ Records: [streamRecord(item, "MODIFY")] });

    expect(result).to.deep.equal({ batchItemFailures: [] });
    expect(collector.requests).to.deep.equal([]);
  });

  it("succeeds while a sink is down, leaving the items pending in the table for the sweep", async () => {
    const item = ledgerItem();
    await ledger.put(item);
    stripe.mode = "error";

    const result = await handler()({ Records: [streamRecord(item)] });

    expect(result).to.deep.equal({ batchItemFailures: [] });
    expect(await ledger.get(item.transaction_id)).to.include({ moesif_state: "delivered", stripe_state: "pending", undelivered: item.undelivered });
  });

  it("sweeps the backlog on a scheduled event, leaving items younger than the grace period to the stream", async () => {
    const old = ledgerItem({ createdAt: Date.now() - 120_000 });
    const young = ledgerItem({ createdAt: Date.now() - 1000 });
    await ledger.put(old, young);
    const scheduled = { version: "0", id: "e1", "detail-type": "Scheduled Event", source: "aws.events", time: new Date().toISOString(), resources: [], detail: {} };

    const report = (await handler()(scheduled, { getRemainingTimeInMillis: () => 60_000 })) as DeliveryReport;

    expect(report.delivered).to.deep.equal({ moesif: 1, stripe: 1 });
    expect(collector.events().map((e) => e.transaction_id)).to.deep.equal([old.transaction_id]);
    expect(await ledger.get(young.transaction_id)).to.include({ moesif_state: "pending" });
  });

  it("sends nothing when the invocation is about to time out, and leaves the items pending", async () => {
    const item = ledgerItem();
    await ledger.put(item);

    const result = await handler()({ Records: [streamRecord(item)] }, { getRemainingTimeInMillis: () => 1500 });

    expect(result).to.deep.equal({ batchItemFailures: [] });
    expect(collector.requests).to.deep.equal([]);
    expect(stripe.requests).to.deep.equal([]);
    expect(await ledger.get(item.transaction_id)).to.include({ moesif_state: "pending", stripe_state: "pending" });
  });

  it("reads a stream image back into the ledger item it was written from", () => {
    const item = ledgerItem({ stripe: false });

    expect(itemFromRecord(streamRecord(item))).to.deep.equal(item);
  });
});
