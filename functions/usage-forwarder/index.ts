/**
 * The forwarder's Lambda adapter. Two triggers, one module:
 * - a DynamoDB stream event (NEW_IMAGE, filtered to INSERT): the new items are delivered at once;
 * - anything else (the EventBridge schedule, the local stack's interval): a sweep of the backlog and, when
 *   `CUSTOMERS_TABLE` is set, of the prepaid holds a crash left behind (older than `HOLD_STALE_AFTER_MS`). Only the
 *   sweep looks at holds: a stream batch is about new ledger items, and must not wait on the customers table.
 *
 * A sink outage never fails an invocation: the items stay `pending` in the table (durable) and the sweep re-drives
 * them, so an outage never blocks the stream's shard. `batchItemFailures` names only records that could not even
 * be read (no image, not a ledger item), which retrying cannot fix either, so they end in the trigger's on-failure
 * destination; the item itself, if it is in the table, is still swept.
 */
import type { DynamoDBBatchResponse, DynamoDBRecord, DynamoDBStreamEvent } from "aws-lambda";
import { unmarshall } from "@aws-sdk/util-dynamodb";
import type { LedgerItem } from "../shared/ledger-schema";
import { readDynamoNumber } from "../shared/ledger-store";
import { describeError } from "../ai-chat/logger";
import { createForwarderFromEnv, type DeliveryReport, type UsageForwarder } from "./forwarder";

/** Time kept back from the Lambda deadline for marking what was sent and returning. */
const DEADLINE_MARGIN_MS = 2000;

export interface ForwarderContext {
  getRemainingTimeInMillis?: () => number;
}

export function isStreamEvent(event: unknown): event is DynamoDBStreamEvent {
  return typeof event === "object" && event !== null && Array.isArray((event as { Records?: unknown }).Records);
}

/** The ledger item in a stream record's NewImage (DynamoDB JSON); throws when there is none or it is not one. */
export function itemFromRecord(record: DynamoDBRecord): LedgerItem {
  const image = record.dynamodb?.NewImage;
  if (!image) throw new Error("the record has no NewImage (is the stream's view type NEW_IMAGE?)");
  // Numbers as the ledger's client reads them: a number beyond 2^53 stays text (refused by the forwarder for that
  // item) instead of a BigInt, or an exception for the whole batch.
  const item = unmarshall(image as Parameters<typeof unmarshall>[0], { wrapNumbers: readDynamoNumber }) as Partial<LedgerItem>;
  if (typeof item.transaction_id !== "string" || typeof item.created_at !== "number" || typeof item.moesif_event !== "string") {
    throw new Error("the NewImage is not a ledger item (transaction_id, created_at, moesif_event)");
  }
  return item as LedgerItem;
}

/** Builds the handler around a lazily created forwarder (once per cold start). Tests pass their own. */
export function createHandler(makeForwarder: () => UsageForwarder = () => createForwarderFromEnv(process.env)) {
  let forwarder: UsageForwarder | undefined;
  return async function handler(event: unknown, context?: ForwarderContext): Promise<DynamoDBBatchResponse | DeliveryReport> {
    forwarder ??= makeForwarder();
    const remaining = context?.getRemainingTimeInMillis?.();
    const deadline = typeof remaining === "number" ? Date.now() + remaining - DEADLINE_MARGIN_MS : undefined;
    if (!isStreamEvent(event)) return forwarder.sweep({ deadline });

    const items: LedgerItem[] = [];
    const batchItemFailures: DynamoDBBatchResponse["batchItemFailures"] = [];
    for (const record of event.Records) {
      // The trigger's filter passes INSERTs only; the forwarder's own updates (MODIFY) are not news.
      if (record.eventName !== "INSERT") continue;
      try {
        items.push(itemFromRecord(record));
      } catch (err) {
        const itemIdentifier = record.dynamodb?.SequenceNumber ?? record.eventID ?? "";
        forwarder.log.error("stream_record_unreadable", { event_id: record.eventID, sequence_number: itemIdentifier, error: describeError(err) });
        batchItemFailures.push({ itemIdentifier });
      }
    }
    if (items.length > 0) {
      const report = await forwarder.deliver(items, { deadline });
      forwarder.log.info("forwarder_stream_batch", { ...report });
    }
    return { batchItemFailures };
  };
}

export const handler = createHandler();
