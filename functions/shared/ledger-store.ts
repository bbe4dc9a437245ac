/**
 * The usage ledger's access patterns, each one named method with its conditional expression in this one place:
 * reading the backlog (the sparse `undelivered` index, oldest first), marking an item delivered to or refused by a
 * sink, and reading the whole table for reports.
 *
 * Every write is a single-item conditional UpdateItem (no transactions: DynamoDB's cheapest primitive, and all
 * that `dynalite`, the local stand-in, offers). The one invariant the writes keep: an item carries the `undelivered`
 * attribute (and so sits in the backlog index) while any sink still owes it a delivery.
 */
import { DynamoDBClient } from "@aws-sdk/client-dynamodb";
import { DynamoDBDocumentClient, QueryCommand, ScanCommand, UpdateCommand, type QueryCommandOutput } from "@aws-sdk/lib-dynamodb";
import {
  dynamoClientOptions,
  LEDGER_KEY,
  SINKS,
  UNDELIVERED_INDEX,
  UNDELIVERED_KEY,
  UNDELIVERED_SHARDS,
  UNDELIVERED_SORT,
  undeliveredShard,
  type LedgerItem,
  type SinkName,
} from "./ledger-schema";

export interface BacklogOptions {
  /** Now (ms since the epoch): `failed` items are due once their `<sink>_next_at` has passed it. */
  now: number;
  /** Only items created at least this long ago (so a sweep does not race the stream trigger for new items). */
  graceMs: number;
  /** Most items returned: each shard's oldest (up to twice its even share of `limit`), merged by age. */
  limit: number;
  /**
   * Only items due for one of these sinks (pending, or failed and due again), plus items that owe nothing but are
   * still in the index (see `clearBacklog`). @default every sink
   */
  sinks?: readonly SinkName[];
  /** Pages read per shard at most, so a shard full of not-yet-due `failed` items bounds a sweep's reads. @default 10 */
  maxPagesPerShard?: number;
}

/** Why a DynamoDB write was not made because its condition did not hold (not an outage). */
function isConditionFailure(err: unknown): boolean {
  return (err as { name?: string } | null)?.name === "ConditionalCheckFailedException";
}

export class LedgerStore {
  constructor(
    private readonly doc: DynamoDBDocumentClient,
    private readonly table: string,
  ) {}

  /**
   * The oldest items that still owe a delivery and are due now, read from every shard of the sparse `undelivered`
   * index (sorted by `created_at`, so each shard is read oldest first; the shards are merged by age). Read straight
   * from the index (projection ALL): no read of the table per item. Eventually consistent, like every GSI read, so a
   * just-delivered item can come back once; the sinks de-duplicate such a repeat.
   */
  async backlog(options: BacklogOptions): Promise<LedgerItem[]> {
    const limit = Math.max(1, Math.floor(options.limit));
    const cutoff = options.now - Math.max(0, options.graceMs);
    const filter = backlogFilter(options.sinks ?? SINKS, options.now);
    const shards = Array.from({ length: UNDELIVERED_SHARDS }, (_, i) => `u${i}`);
    // Each shard gives its oldest items, twice its even share (a busy shard gives more next time): the result is the
    // oldest items of every shard, merged by age, without reading `limit` items from each of the 16.
    const perShardTarget = Math.min(limit, Math.max(10, Math.ceil((2 * limit) / UNDELIVERED_SHARDS)));
    const perShard = await Promise.all(shards.map((shard) => this.queryShard(shard, cutoff, perShardTarget, filter, options.maxPagesPerShard ?? 10)));
    return perShard
      .flat()
      .sort((a, b) => a.created_at - b.created_at || (a.transaction_id < b.transaction_id ? -1 : 1))
      .slice(0, limit);
  }

  private async queryShard(
    shard: string,
    cutoff: number,
    limit: number,
    filter: { expression: string; values: Record<string, unknown> },
    maxPages: number,
  ): Promise<LedgerItem[]> {
    const items: LedgerItem[] = [];
    let startKey: Record<string, unknown> | undefined;
    for (let page = 0; page < maxPages && items.length < limit; page++) {
      const output: QueryCommandOutput = await this.doc.send(
        new QueryCommand({
          TableName: this.table,
          IndexName: UNDELIVERED_INDEX,
          KeyConditionExpression: "#shard = :shard AND #created <= :cutoff",
          FilterExpression: filter.expression,
          ExpressionAttributeNames: { "#shard": UNDELIVERED_KEY, "#created": UNDELIVERED_SORT },
          ExpressionAttributeValues: { ":shard": shard, ":cutoff": cutoff, ...filter.values },
          ScanIndexForward: true,
          // Limit counts items read before the filter; reading a little more than asked keeps pages few.
          Limit: Math.min(1000, Math.max(limit * 2, 50)),
          ExclusiveStartKey: startKey,
        }),
      );
      for (const item of output.Items ?? []) items.push(item as LedgerItem);
      startKey = output.LastEvaluatedKey;
      if (!startKey) break;
    }
    return items.slice(0, limit);
  }

  /**
   * Marks an item delivered to `sink` (or to each of several sinks, in one write) and, when no sink owes it anything
   * any more, takes it out of the backlog.
   *
   * Two deliverers (the Moesif and the Stripe leg of different runs, or a stream invocation and a sweep) can mark
   * the same item at once, and neither may leave it out of the backlog while the other still owes it. So the backlog
   * attribute is only removed under a condition on the other sinks' states: first tried together with the mark (one
   * write in the common case); when that condition fails, the mark alone is written, returning the item as it now
   * is, and if the other sinks turned out delivered meanwhile the removal follows, again conditionally. DynamoDB
   * serialises writes to one item, so of two concurrent last marks the later one sees both delivered and removes it.
   */
  async markDelivered(id: string, sink: SinkName | readonly SinkName[], at: number): Promise<void> {
    const marked = [...new Set(typeof sink === "string" ? [sink] : sink)];
    if (marked.length === 0) return;
    const others = SINKS.filter((s) => !marked.includes(s));
    const names: Record<string, string> = { "#key": LEDGER_KEY };
    const sets: string[] = [];
    const removes: string[] = [];
    marked.forEach((s, i) => {
      Object.assign(names, { [`#state${i}`]: `${s}_state`, [`#at${i}`]: `${s}_delivered_at`, [`#error${i}`]: `${s}_error`, [`#next${i}`]: `${s}_next_at` });
      sets.push(`#state${i} = :delivered`, `#at${i} = :at`);
      removes.push(`#error${i}`, `#next${i}`);
    });
    const values = { ":delivered": "delivered", ":at": at };
    const otherNames: Record<string, string> = {};
    others.forEach((other, i) => (otherNames[`#other${i}`] = `${other}_state`));
    const nothingElseOwed = others.map((_, i) => `(attribute_not_exists(#other${i}) OR #other${i} = :delivered)`);
    try {
      await this.doc.send(
        new UpdateCommand({
          TableName: this.table,
          Key: { [LEDGER_KEY]: id },
          UpdateExpression: `SET ${sets.join(", ")} REMOVE ${[...removes, "#backlog"].join(", ")}`,
          ConditionExpression: ["attribute_exists(#key)", ...nothingElseOwed].join(" AND "),
          ExpressionAttributeNames: { ...names, ...otherNames, "#backlog": UNDELIVERED_KEY },
          ExpressionAttributeValues: values,
        }),
      );
      return;
    } catch (err) {
      if (!isConditionFailure(err)) throw err;
    }
    let output;
    try {
      output = await this.doc.send(
        new UpdateCommand({
          TableName: this.table,
          Key: { [LEDGER_KEY]: id },
          UpdateExpression: `SET ${sets.join(", ")} REMOVE ${removes.join(", ")}`,
          ConditionExpression: "attribute_exists(#key)",
          ExpressionAttributeNames: names,
          ExpressionAttributeValues: values,
          ReturnValues: "ALL_NEW",
        }),
      );
    } catch (err) {
      // No such item (deleted, or a wrong table): nothing to mark.
      if (isConditionFailure(err)) return;
      throw err;
    }
    const item = output.Attributes as LedgerItem | undefined;
    if (item && item.undelivered !== undefined && others.every((other) => item[`${other}_state`] === undefined || item[`${other}_state`] === "delivered")) {
      await this.clearBacklog(id);
    }
  }

  /**
   * Marks an item refused by `sink` (`failed`): it stays in the backlog, with the reason and when to try again.
   * Never overwrites a `delivered` mark (a concurrent deliverer may have got it through meanwhile).
   */
  async markFailed(id: string, sink: SinkName, error: string, attempts: number, nextAt: number): Promise<void> {
    try {
      await this.doc.send(
        new UpdateCommand({
          TableName: this.table,
          Key: { [LEDGER_KEY]: id },
          UpdateExpression: "SET #state = :failed, #attempts = :attempts, #error = :error, #next = :next, #backlog = if_not_exists(#backlog, :shard)",
          ConditionExpression: "attribute_exists(#key) AND (attribute_not_exists(#state) OR #state <> :delivered)",
          ExpressionAttributeNames: {
            "#key": LEDGER_KEY,
            "#state": `${sink}_state`,
            "#attempts": `${sink}_attempts`,
            "#error": `${sink}_error`,
            "#next": `${sink}_next_at`,
            "#backlog": UNDELIVERED_KEY,
          },
          ExpressionAttributeValues: { ":failed": "failed", ":delivered": "delivered", ":attempts": attempts, ":error": error.slice(0, 1000), ":next": nextAt, ":shard": undeliveredShard(id) },
        }),
      );
    } catch (err) {
      if (!isConditionFailure(err)) throw err;
    }
  }

  /**
   * Takes an item out of the backlog if, and only if, no sink owes it anything (a crash between a delivery mark and
   * this removal leaves such an item in the index; the sweep finds it and calls this).
   */
  async clearBacklog(id: string): Promise<void> {
    const names: Record<string, string> = { "#backlog": UNDELIVERED_KEY };
    SINKS.forEach((sink, i) => (names[`#s${i}`] = `${sink}_state`));
    try {
      await this.doc.send(
        new UpdateCommand({
          TableName: this.table,
          Key: { [LEDGER_KEY]: id },
          UpdateExpression: "REMOVE #backlog",
          ConditionExpression: `attribute_exists(#backlog) AND ${SINKS.map((_, i) => `(attribute_not_exists(#s${i}) OR #s${i} = :delivered)`).join(" AND ")}`,
          ExpressionAttributeNames: names,
          ExpressionAttributeValues: { ":delivered": "delivered" },
        }),
      );
    } catch (err) {
      if (!isConditionFailure(err)) throw err;
    }
  }

  /** Every item of the table, page by page (reports and reconciliation; not for the request path). */
  async *scanAll(): AsyncIterable<LedgerItem> {
    let startKey: Record<string, unknown> | undefined;
    do {
      const output = await this.doc.send(new ScanCommand({ TableName: this.table, ExclusiveStartKey: startKey }));
      for (const item of output.Items ?? []) yield item as LedgerItem;
      startKey = output.LastEvaluatedKey;
    } while (startKey);
  }
}

/**
 * The backlog's filter: due for one of `sinks` (pending, or failed with `<sink>_next_at <= :now`), or owing nothing
 * at all (left in the index by an interrupted mark, to be cleared).
 */
function backlogFilter(sinks: readonly SinkName[], now: number): { expression: string; values: Record<string, unknown> } {
  const due = sinks.map((sink) => `${sink}_state = :pending OR (${sink}_state = :failed AND ${sink}_next_at <= :now)`);
  const owesNothing = SINKS.map((sink) => `(attribute_not_exists(${sink}_state) OR ${sink}_state = :delivered)`).join(" AND ");
  // DynamoDB refuses a value the expression does not use, so the due-clause values only come with due clauses.
  return {
    expression: [...due, owesNothing].map((clause) => `(${clause})`).join(" OR "),
    values: { ":delivered": "delivered", ...(due.length > 0 ? { ":pending": "pending", ":failed": "failed", ":now": now } : {}) },
  };
}

export interface LedgerClientOptions {
  /** Bound on one DynamoDB call, retries included (the SDK's socket and request timeouts). @default 5000 */
  timeoutMs?: number;
  /** @default 3 */
  maxAttempts?: number;
}

/**
 * A DynamoDB document client for the ledger from a function's environment (`dynamoClientOptions`: region,
 * credentials, `AWS_ENDPOINT_URL_DYNAMODB` for dynalite). `removeUndefinedValues`: optional `LedgerItem` fields
 * are left out of the item rather than failing the write.
 */
export function createLedgerDocumentClient(env: NodeJS.ProcessEnv, options: LedgerClientOptions = {}): DynamoDBDocumentClient {
  const timeoutMs = options.timeoutMs ?? 5000;
  const client = new DynamoDBClient({
    ...dynamoClientOptions(env),
    maxAttempts: options.maxAttempts ?? 3,
    requestHandler: { connectionTimeout: Math.min(1000, timeoutMs), requestTimeout: timeoutMs },
  });
  return DynamoDBDocumentClient.from(client, { marshallOptions: { removeUndefinedValues: true } });
}
