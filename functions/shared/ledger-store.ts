/**
 * The usage ledger's access patterns, each one named method with its conditional expression in this one place:
 * reading the backlog (the sparse `undelivered` index, longest due first), marking an item delivered to or refused
 * by a sink, and reading the whole table for reports; plus `parseLedgerItem`, the check an item read back must pass
 * before anything computes with it.
 *
 * Every write is a single-item conditional UpdateItem (no transactions: DynamoDB's cheapest primitive, and all
 * that `dynalite`, the local stand-in, offers). The invariants the writes keep: an item carries the `undelivered`
 * attribute (and so sits in the backlog index) while any sink still owes it a delivery; and its `due_at` (the
 * index's sort key) is never later than the earliest time a sink is due to be tried again. A write that moves
 * `due_at` later is conditional on the sink states it was computed from, so a concurrent writer can make it fail
 * (the item then stays due early: one wasted read) but never hide a sink that is owed now.
 */
import { DynamoDBClient } from "@aws-sdk/client-dynamodb";
import { DynamoDBDocumentClient, GetCommand, QueryCommand, ScanCommand, UpdateCommand, type QueryCommandOutput } from "@aws-sdk/lib-dynamodb";
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
  /** Only items due at least this long ago (so a sweep does not race the stream trigger for new items). */
  graceMs: number;
  /** Most items returned: each shard's longest-due (up to twice its even share of `limit`), merged by `due_at`. */
  limit: number;
  /**
   * Only items due for one of these sinks (pending, or failed and due again), plus items that owe nothing but are
   * still in the index (see `clearBacklog`). @default every sink
   */
  sinks?: readonly SinkName[];
  /**
   * Time spent paging, all shards together. Items the key condition admits but the filter drops (owed only to a
   * sink not asked about, i.e. one backing off) still cost reads; past this budget, or `maxReadPerShard`, a shard
   * stops after its current page (each shard reads at least one page). @default 5000
   */
  readBudgetMs?: number;
  /** Items a shard reads (before the filter) per call at most. @default 10000 */
  maxReadPerShard?: number;
  /**
   * Resume each shard where this store's previous read of it (for the same sinks) stopped for its budget, so items
   * the filter drops cannot hide the ones behind them for more than a few calls; a shard read to its end starts
   * from its beginning again. Only for a caller that reads round after round (the sweep): a resumed read that comes
   * back empty does not mean the backlog is. @default false
   */
  resume?: boolean;
  /** Aborts the reads in flight (the caller's deadline). */
  signal?: AbortSignal;
  /** Told of a shard whose read failed; the other shards' items are still returned (all failing rejects). */
  onShardError?: (shard: string, err: unknown) => void;
}

export interface WriteOptions {
  /** Aborts the write in flight (the caller's deadline). */
  signal?: AbortSignal;
}

export interface MarkOptions extends WriteOptions {
  /**
   * The item as the caller read it. With it, a mark sets `due_at` in the same write, conditional on the other
   * sinks' states (and schedules) being as read; without it (or when they changed), the mark is written keeping
   * the item due now and its schedule is then settled from the item as written (a second, conditional write).
   */
  held?: LedgerItem;
  /** Now (ms since the epoch): what "due now" is. @default Date.now() */
  now?: number;
}

/** The latest time an item can carry (ECMAScript's Date range, so every reader can format it). */
const MAX_TIME_MS = 8.64e15;

/** The outcome of reading an item back: the item, or why it cannot be used as it is. */
export type ParsedLedgerItem = { ok: true; item: LedgerItem } | { ok: false; id?: string; reason: string };

function describeValue(value: unknown): string {
  if (typeof value === "bigint") return `${value} (a number beyond 2^53)`;
  if (typeof value === "string") return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value);
  if (typeof value === "number") return String(value);
  return value === null ? "null" : typeof value;
}

function isTime(value: unknown): value is number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0 && value <= MAX_TIME_MS;
}

/**
 * Checks the fields every deliverer computes with (the key, the times, the per-sink states, attempts and
 * schedules) on an item read back from the table or a stream. What a sink alone reads (the Moesif event, the Stripe
 * customer, cost and start time) is its own `check`. A field of the wrong type (a string, NaN, a BigInt the document
 * client made of a number beyond 2^53) or out of range is a refusal of that item, never an exception.
 */
export function parseLedgerItem(raw: unknown): ParsedLedgerItem {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) return { ok: false, reason: "the ledger item is not an object" };
  const record = raw as Record<string, unknown>;
  const id = typeof record.transaction_id === "string" && record.transaction_id.length > 0 ? record.transaction_id : undefined;
  const problems: string[] = [];
  if (!id) problems.push(`transaction_id must be a non-empty string, got ${describeValue(record.transaction_id)}`);
  const time = (name: string, required: boolean) => {
    const value = record[name];
    if (value === undefined && !required) return;
    if (!isTime(value)) problems.push(`${name} must be a time in whole ms since the epoch, got ${describeValue(value)}`);
  };
  const optionalString = (name: string) => {
    const value = record[name];
    if (value !== undefined && typeof value !== "string") problems.push(`${name} must be a string, got ${describeValue(value)}`);
  };
  time("created_at", true);
  time(UNDELIVERED_SORT, false);
  optionalString(UNDELIVERED_KEY);
  for (const sink of SINKS) {
    const state = record[`${sink}_state`];
    if (state !== undefined && state !== "pending" && state !== "delivered" && state !== "failed") {
      problems.push(`${sink}_state must be pending, delivered or failed, got ${describeValue(state)}`);
    }
    const attempts = record[`${sink}_attempts`];
    if (attempts !== undefined && !(typeof attempts === "number" && Number.isSafeInteger(attempts) && attempts >= 0)) {
      problems.push(`${sink}_attempts must be a whole number of at least 0, got ${describeValue(attempts)}`);
    }
    time(`${sink}_next_at`, false);
    time(`${sink}_delivered_at`, false);
    optionalString(`${sink}_error`);
  }
  if (problems.length > 0) return { ok: false, ...(id ? { id } : {}), reason: `the ledger item cannot be used as it is: ${problems.join("; ")}` };
  return { ok: true, item: raw as LedgerItem };
}

/** When an item in these states is next due: `owes: false` when no sink owes it anything. */
type Schedule = { owes: false } | { owes: true; pending: boolean; dueAt: number };

/**
 * The schedule of an item: due at `dueNow` while any sink is `pending` (or in a state no one knows: due, so a
 * deliverer sees and refuses it), else at the earliest `<sink>_next_at` of its `failed` sinks (one without a
 * readable `next_at` is due at `dueNow`).
 */
function scheduleOf(item: Record<string, unknown>, dueNow: number): Schedule {
  let pending = false;
  let earliest: number | undefined;
  for (const sink of SINKS) {
    const state = item[`${sink}_state`];
    if (state === undefined || state === "delivered") continue;
    if (state !== "failed") {
      pending = true;
      continue;
    }
    const next = item[`${sink}_next_at`];
    const at = isTime(next) ? next : dueNow;
    earliest = earliest === undefined ? at : Math.min(earliest, at);
  }
  if (pending) return { owes: true, pending: true, dueAt: dueNow };
  return earliest === undefined ? { owes: false } : { owes: true, pending: false, dueAt: earliest };
}

/** "Due now" for an item that stays due: the `due_at` it has when that is already due (keeping its place), else now. */
function dueNowFor(item: { due_at?: unknown }, now: number): number {
  return isTime(item.due_at) && item.due_at <= now ? item.due_at : now;
}

/** Why a DynamoDB write was not made because its condition did not hold (not an outage). */
function isConditionFailure(err: unknown): boolean {
  return (err as { name?: string } | null)?.name === "ConditionalCheckFailedException";
}

/**
 * A condition that `sinks`' states (and, for failed ones, their schedules) are still what `item` says: the guard
 * on every write that computed `due_at` from them.
 */
function statesAsRead(item: Record<string, unknown>, sinks: readonly SinkName[], prefix: string): { clauses: string[]; names: Record<string, string>; values: Record<string, unknown> } {
  const clauses: string[] = [];
  const names: Record<string, string> = {};
  const values: Record<string, unknown> = {};
  sinks.forEach((sink, i) => {
    const state = item[`${sink}_state`];
    names[`#${prefix}s${i}`] = `${sink}_state`;
    if (state === undefined) clauses.push(`attribute_not_exists(#${prefix}s${i})`);
    else {
      clauses.push(`#${prefix}s${i} = :${prefix}s${i}`);
      values[`:${prefix}s${i}`] = state;
    }
    if (state !== "failed") return;
    const next = item[`${sink}_next_at`];
    names[`#${prefix}n${i}`] = `${sink}_next_at`;
    if (next === undefined) clauses.push(`attribute_not_exists(#${prefix}n${i})`);
    else {
      clauses.push(`#${prefix}n${i} = :${prefix}n${i}`);
      values[`:${prefix}n${i}`] = next;
    }
  });
  return { clauses, names, values };
}

/** Where one shard's read stopped. */
interface ShardRead {
  shard: string;
  items: LedgerItem[];
  /** The key the read started after (a resumed read), if any. */
  startKey?: Record<string, unknown>;
  /** DynamoDB's key after the last page read. */
  lastKey?: Record<string, unknown>;
  /** The read reached the shard's end with every item it found kept. */
  complete: boolean;
  /** The read stopped for its budget (time or items) before finding its share. */
  exhausted: boolean;
}

export class LedgerStore {
  /** Per sinks asked about and shard: where the last read that ran out of budget stopped (`resume`). */
  private readonly cursors = new Map<string, Record<string, unknown>>();

  constructor(
    private readonly doc: DynamoDBDocumentClient,
    private readonly table: string,
  ) {}

  /**
   * The items that still owe a delivery and are due now, read from every shard of the sparse `undelivered` index
   * with the key condition `due_at <= now - graceMs` (each shard longest-due first; the shards merged by `due_at`),
   * then filtered to the sinks asked about. Items every owed sink has refused and that wait for their next attempt
   * have a later `due_at`, so they are not read at all. Read straight from the index (projection ALL): no read of
   * the table per item. Eventually consistent, like every GSI read, so a just-delivered item can come back once;
   * the sinks de-duplicate such a repeat. Items are returned as read: check them with `parseLedgerItem`.
   */
  async backlog(options: BacklogOptions): Promise<LedgerItem[]> {
    const limit = Math.max(1, Math.floor(options.limit));
    const cutoff = options.now - Math.max(0, options.graceMs);
    const sinks = options.sinks ?? SINKS;
    const filter = backlogFilter(sinks, options.now);
    const scope = [...sinks].sort().join(",");
    const shards = Array.from({ length: UNDELIVERED_SHARDS }, (_, i) => `u${i}`);
    // Each shard gives its longest-due items, twice its even share (a busy shard gives more next time): the result is
    // the longest-due items of every shard, merged, without reading `limit` items from each of the 16.
    const target = Math.min(limit, Math.max(10, Math.ceil((2 * limit) / UNDELIVERED_SHARDS)));
    const budgetEnds = performance.now() + Math.max(0, options.readBudgetMs ?? 5000);
    const maxRead = Math.max(1, Math.floor(options.maxReadPerShard ?? 10_000));
    const settled = await Promise.allSettled(
      shards.map((shard) => {
        const cursor = options.resume ? this.cursors.get(`${scope}|${shard}`) : undefined;
        // A cursor past the cutoff (a clock that went back) is not a valid start for this key condition.
        const startKey = cursor && typeof cursor[UNDELIVERED_SORT] === "number" && (cursor[UNDELIVERED_SORT] as number) <= cutoff ? cursor : undefined;
        return this.queryShard({ shard, cutoff, target, filter, maxRead, budgetEnds, signal: options.signal, startKey });
      }),
    );
    const reads = settled.flatMap((outcome) => (outcome.status === "fulfilled" ? [outcome.value] : []));
    if (reads.length === 0) throw (settled[0] as PromiseRejectedResult).reason;
    settled.forEach((outcome, i) => outcome.status === "rejected" && options.onShardError?.(shards[i], outcome.reason));

    // Merged by due_at; ties keep each shard's own order, so what a shard keeps is a prefix of what it read. An item
    // whose due_at is unreadable goes first: its deliverer refuses it, and the refusal gives it a readable one.
    const dueKey = (item: LedgerItem) => (isTime(item.due_at) ? item.due_at : Number.MIN_SAFE_INTEGER);
    const tagged = reads.flatMap((read, shardIndex) => read.items.map((item, position) => ({ item, read, shardIndex, position })));
    tagged.sort((a, b) => dueKey(a.item) - dueKey(b.item) || a.shardIndex - b.shardIndex || a.position - b.position);
    const kept = tagged.slice(0, limit);
    if (options.resume) for (const read of reads) this.moveCursor(`${scope}|${read.shard}`, read, kept.filter((t) => t.read === read).length);
    return kept.map((t) => t.item);
  }

  /**
   * Where the next resumed read of a shard starts: after what this one read when it ran out of budget (so the items
   * the filter dropped are not read again until the shard's end is reached), after the last item kept when it
   * resumed and found more than it could give, and from the beginning once it read everything to the end.
   */
  private moveCursor(key: string, read: ShardRead, keptCount: number): void {
    const lastKept = keptCount > 0 ? this.indexKeyOf(read.items[keptCount - 1]) : undefined;
    let cursor: Record<string, unknown> | undefined;
    if (keptCount < read.items.length) cursor = read.startKey ? (lastKept ?? read.startKey) : undefined;
    else if (read.exhausted) cursor = read.lastKey;
    else if (!read.complete) cursor = read.startKey ? (lastKept ?? read.lastKey) : undefined;
    if (cursor) this.cursors.set(key, cursor);
    else this.cursors.delete(key);
  }

  /** The index key of an item, as DynamoDB gives it in `LastEvaluatedKey` (undefined if unreadable). */
  private indexKeyOf(item: LedgerItem): Record<string, unknown> | undefined {
    if (typeof item.undelivered !== "string" || !isTime(item.due_at)) return undefined;
    return { [LEDGER_KEY]: item.transaction_id, [UNDELIVERED_KEY]: item.undelivered, [UNDELIVERED_SORT]: item.due_at };
  }

  private async queryShard(args: {
    shard: string;
    cutoff: number;
    target: number;
    filter: { expression: string; values: Record<string, unknown> };
    maxRead: number;
    budgetEnds: number;
    signal?: AbortSignal;
    startKey?: Record<string, unknown>;
  }): Promise<ShardRead> {
    const items: LedgerItem[] = [];
    let read = 0;
    let exclusiveStart = args.startKey;
    // Limit counts items read before the filter: start a little above the share asked, and double while the filter
    // drops what the pages bring (DynamoDB caps a page at 1 MB whatever the limit).
    let pageLimit = Math.min(1000, Math.max(args.target * 2, 50));
    for (;;) {
      const output: QueryCommandOutput = await this.doc.send(
        new QueryCommand({
          TableName: this.table,
          IndexName: UNDELIVERED_INDEX,
          KeyConditionExpression: "#shard = :shard AND #due <= :cutoff",
          FilterExpression: args.filter.expression,
          ExpressionAttributeNames: { "#shard": UNDELIVERED_KEY, "#due": UNDELIVERED_SORT },
          ExpressionAttributeValues: { ":shard": args.shard, ":cutoff": args.cutoff, ...args.filter.values },
          ScanIndexForward: true,
          Limit: Math.max(1, Math.min(pageLimit, args.maxRead - read)),
          ExclusiveStartKey: exclusiveStart,
        }),
        { abortSignal: args.signal },
      );
      read += output.ScannedCount ?? output.Items?.length ?? 0;
      for (const item of output.Items ?? []) items.push(item as LedgerItem);
      const lastKey = output.LastEvaluatedKey;
      if (items.length >= args.target) return { shard: args.shard, items: items.slice(0, args.target), startKey: args.startKey, lastKey, complete: false, exhausted: false };
      if (!lastKey) return { shard: args.shard, items, startKey: args.startKey, complete: true, exhausted: false };
      if (read >= args.maxRead || performance.now() >= args.budgetEnds) return { shard: args.shard, items, startKey: args.startKey, lastKey, complete: false, exhausted: true };
      exclusiveStart = lastKey;
      pageLimit = Math.min(1000, pageLimit * 2);
    }
  }

  /**
   * Marks an item delivered to `sink` (or to each of several sinks, in one write) and, when no sink owes it anything
   * any more, takes it out of the backlog; otherwise moves its `due_at` to when the sinks still owed are due.
   *
   * Two deliverers (the Moesif and the Stripe leg of different runs, or a stream invocation and a sweep) can mark
   * the same item at once, and neither may leave it out of the backlog, or scheduled later, while the other still
   * owes it. So whatever is computed from the other sinks' states is written under a condition that they are as
   * read: with `held`, the mark and the new `due_at` in one write; without it, or when the item owes nothing
   * afterwards, the mark with the backlog removal under "nothing else owed". When such a condition fails, the mark
   * alone is written, returning the item as it now is, and its schedule is settled from that (again conditionally).
   * DynamoDB serialises writes to one item, so of two concurrent last marks the later one sees both delivered.
   */
  async markDelivered(id: string, sink: SinkName | readonly SinkName[], at: number, options: MarkOptions = {}): Promise<void> {
    const marked = [...new Set(typeof sink === "string" ? [sink] : sink)];
    if (marked.length === 0) return;
    const now = options.now ?? Date.now();
    const send = { abortSignal: options.signal };
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

    const after = options.held ? scheduleOf({ ...options.held, ...Object.fromEntries(marked.map((s) => [`${s}_state`, "delivered"])) }, dueNowFor(options.held, now)) : undefined;
    if (options.held && after?.owes) {
      // The other sinks still owe it (as read): the mark and its new due_at in one write, if they still do.
      const guard = statesAsRead(options.held as unknown as Record<string, unknown>, others, "o");
      try {
        await this.doc.send(
          new UpdateCommand({
            TableName: this.table,
            Key: { [LEDGER_KEY]: id },
            UpdateExpression: `SET ${[...sets, "#due = :due", "#backlog = if_not_exists(#backlog, :shard)"].join(", ")} REMOVE ${removes.join(", ")}`,
            ConditionExpression: ["attribute_exists(#key)", ...guard.clauses].join(" AND "),
            ExpressionAttributeNames: { ...names, ...guard.names, "#due": UNDELIVERED_SORT, "#backlog": UNDELIVERED_KEY },
            ExpressionAttributeValues: { ...values, ...guard.values, ":due": after.dueAt, ":shard": undeliveredShard(id) },
          }),
          send,
        );
        return;
      } catch (err) {
        if (!isConditionFailure(err)) throw err;
      }
    } else {
      const otherNames: Record<string, string> = {};
      others.forEach((other, i) => (otherNames[`#other${i}`] = `${other}_state`));
      const nothingElseOwed = others.map((_, i) => `(attribute_not_exists(#other${i}) OR #other${i} = :delivered)`);
      try {
        await this.doc.send(
          new UpdateCommand({
            TableName: this.table,
            Key: { [LEDGER_KEY]: id },
            UpdateExpression: `SET ${sets.join(", ")} REMOVE ${[...removes, "#backlog", "#due"].join(", ")}`,
            ConditionExpression: ["attribute_exists(#key)", ...nothingElseOwed].join(" AND "),
            ExpressionAttributeNames: { ...names, ...otherNames, "#backlog": UNDELIVERED_KEY, "#due": UNDELIVERED_SORT },
            ExpressionAttributeValues: values,
          }),
          send,
        );
        return;
      } catch (err) {
        if (!isConditionFailure(err)) throw err;
      }
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
        send,
      );
    } catch (err) {
      // No such item (deleted, or a wrong table): nothing to mark.
      if (isConditionFailure(err)) return;
      throw err;
    }
    await this.settle(output.Attributes, now, options.signal);
  }

  /**
   * Marks an item refused by `sink` (`failed`): it stays in the backlog, with the reason and when to try again, and
   * its `due_at` becomes the earliest time some sink is due (now, while another sink is pending). Never overwrites
   * a `delivered` mark (a concurrent deliverer may have got it through meanwhile).
   */
  async markFailed(id: string, sink: SinkName, error: string, attempts: number, nextAt: number, options: MarkOptions = {}): Promise<void> {
    const now = options.now ?? Date.now();
    const send = { abortSignal: options.signal };
    const names = {
      "#key": LEDGER_KEY,
      "#state": `${sink}_state`,
      "#attempts": `${sink}_attempts`,
      "#error": `${sink}_error`,
      "#next": `${sink}_next_at`,
      "#backlog": UNDELIVERED_KEY,
      "#due": UNDELIVERED_SORT,
    };
    const values = { ":failed": "failed", ":delivered": "delivered", ":attempts": attempts, ":error": error.slice(0, 1000), ":next": nextAt, ":shard": undeliveredShard(id) };
    const update = "SET #state = :failed, #attempts = :attempts, #error = :error, #next = :next, #backlog = if_not_exists(#backlog, :shard), #due = :due";
    const notDelivered = "attribute_exists(#key) AND (attribute_not_exists(#state) OR #state <> :delivered)";
    if (options.held) {
      const after = scheduleOf({ ...options.held, [`${sink}_state`]: "failed", [`${sink}_next_at`]: nextAt }, dueNowFor(options.held, now));
      const guard = statesAsRead(options.held as unknown as Record<string, unknown>, SINKS.filter((s) => s !== sink), "o");
      try {
        await this.doc.send(
          new UpdateCommand({
            TableName: this.table,
            Key: { [LEDGER_KEY]: id },
            UpdateExpression: update,
            ConditionExpression: [notDelivered, ...guard.clauses].join(" AND "),
            ExpressionAttributeNames: { ...names, ...guard.names },
            ExpressionAttributeValues: { ...values, ...guard.values, ":due": after.owes ? after.dueAt : nextAt },
          }),
          send,
        );
        return;
      } catch (err) {
        if (!isConditionFailure(err)) throw err;
      }
    }
    // Without the item as read, or when the other sinks changed since: the mark keeping the item due now (never too
    // late), then its schedule from the item as written.
    let output;
    try {
      output = await this.doc.send(
        new UpdateCommand({
          TableName: this.table,
          Key: { [LEDGER_KEY]: id },
          UpdateExpression: update,
          ConditionExpression: notDelivered,
          ExpressionAttributeNames: names,
          ExpressionAttributeValues: { ...values, ":due": now },
          ReturnValues: "ALL_NEW",
        }),
        send,
      );
    } catch (err) {
      if (isConditionFailure(err)) return;
      throw err;
    }
    await this.settle(output.Attributes, now, options.signal);
  }

  /**
   * Sets `item`'s `due_at` to when it is next due, as computed from `item` (as the caller read it), if its sink
   * states and schedules are still as read; takes it out of the backlog if it owes nothing. For an item a deliverer
   * found not due for any sink although the index gave it (an earlier conditional write lost a race).
   */
  async reschedule(item: LedgerItem, options: MarkOptions = {}): Promise<void> {
    await this.settle(item as unknown as Record<string, unknown>, options.now ?? Date.now(), options.signal);
  }

  private async settle(item: Record<string, unknown> | undefined, now: number, signal: AbortSignal | undefined): Promise<void> {
    const id = item?.[LEDGER_KEY];
    if (!item || typeof id !== "string") return;
    const schedule = scheduleOf(item, now);
    if (!schedule.owes) {
      if (item[UNDELIVERED_KEY] !== undefined) await this.clearBacklog(id, { signal });
      return;
    }
    const current = item[UNDELIVERED_SORT];
    if (schedule.pending ? isTime(current) && current <= now : current === schedule.dueAt) return;
    const guard = statesAsRead(item, SINKS, "s");
    try {
      await this.doc.send(
        new UpdateCommand({
          TableName: this.table,
          Key: { [LEDGER_KEY]: id },
          UpdateExpression: "SET #due = :due",
          ConditionExpression: ["attribute_exists(#backlog)", ...guard.clauses].join(" AND "),
          ExpressionAttributeNames: { ...guard.names, "#due": UNDELIVERED_SORT, "#backlog": UNDELIVERED_KEY },
          ExpressionAttributeValues: { ...guard.values, ":due": schedule.pending ? now : schedule.dueAt },
        }),
        { abortSignal: signal },
      );
    } catch (err) {
      // Changed since: whoever changed it wrote a due_at no later than its own states need.
      if (!isConditionFailure(err)) throw err;
    }
  }

  /**
   * Takes an item out of the backlog if, and only if, no sink owes it anything (a crash between a delivery mark and
   * this removal leaves such an item in the index; the sweep finds it and calls this).
   */
  async clearBacklog(id: string, options: WriteOptions = {}): Promise<void> {
    const names: Record<string, string> = { "#backlog": UNDELIVERED_KEY, "#due": UNDELIVERED_SORT };
    SINKS.forEach((sink, i) => (names[`#s${i}`] = `${sink}_state`));
    try {
      await this.doc.send(
        new UpdateCommand({
          TableName: this.table,
          Key: { [LEDGER_KEY]: id },
          UpdateExpression: "REMOVE #backlog, #due",
          ConditionExpression: `attribute_exists(#backlog) AND ${SINKS.map((_, i) => `(attribute_not_exists(#s${i}) OR #s${i} = :delivered)`).join(" AND ")}`,
          ExpressionAttributeNames: names,
          ExpressionAttributeValues: { ":delivered": "delivered" },
        }),
        { abortSignal: options.signal },
      );
    } catch (err) {
      if (!isConditionFailure(err)) throw err;
    }
  }

  /**
   * One item by its transaction id, strongly consistent (the stale-hold sweep's question: was this request billed,
   * and at what cost?); undefined when there is none. Returned as read: check what you compute with.
   */
  async getItem(transactionId: string, options: WriteOptions = {}): Promise<LedgerItem | undefined> {
    const output = await this.doc.send(new GetCommand({ TableName: this.table, Key: { [LEDGER_KEY]: transactionId }, ConsistentRead: true }), { abortSignal: options.signal });
    return output.Item as LedgerItem | undefined;
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
  /** Bound on one DynamoDB attempt (the SDK's request timeout, enforced: `throwOnRequestTimeout`). @default 5000 */
  timeoutMs?: number;
  /** @default 3 */
  maxAttempts?: number;
}

/**
 * How the ledger's client reads a DynamoDB number: as a JS number when it is one exactly (a safe integer, or a
 * fraction), else as its text. By default the document client turns an integer beyond 2^53 into a BigInt (and
 * throws for one BigInt cannot parse, failing the whole page: `@aws-sdk/util-dynamodb` `convertNumber`); as text,
 * such a field is just a wrong type that `parseLedgerItem` refuses for that one item.
 */
export function readDynamoNumber(text: string): number | string {
  const value = Number(text);
  return Number.isFinite(value) && (Number.isSafeInteger(value) || !Number.isInteger(value)) ? value : text;
}

/**
 * A DynamoDB document client for the ledger from a function's environment (`dynamoClientOptions`: region,
 * credentials, `AWS_ENDPOINT_URL_DYNAMODB` for dynalite). `removeUndefinedValues`: optional `LedgerItem` fields
 * are left out of the item rather than failing the write. Each attempt is bounded for real: without
 * `throwOnRequestTimeout`, smithy's `requestTimeout` only logs a warning and lets a request that never gets an
 * answer hang (@smithy/node-http-handler `setRequestTimeout`); callers also pass an abort signal for their deadline.
 */
export function createLedgerDocumentClient(env: NodeJS.ProcessEnv, options: LedgerClientOptions = {}): DynamoDBDocumentClient {
  const timeoutMs = options.timeoutMs ?? 5000;
  const client = new DynamoDBClient({
    ...dynamoClientOptions(env),
    maxAttempts: options.maxAttempts ?? 3,
    requestHandler: { connectionTimeout: Math.min(1000, timeoutMs), requestTimeout: timeoutMs, throwOnRequestTimeout: true },
  });
  return DynamoDBDocumentClient.from(client, { marshallOptions: { removeUndefinedValues: true }, unmarshallOptions: { wrapNumbers: readDynamoNumber } });
}
