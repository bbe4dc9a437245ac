/**
 * The two implementations of the `ResponseOwners` port (`response-owners.ts`): the responses table on DynamoDB
 * (dynalite locally) and an in-memory map for a function without the table (ownership then holds only within one
 * warm instance: a stored response created through another instance is "not found" here, which is safe, never
 * leaky).
 *
 * Every call is bounded by the store's timeout (an abort signal on the SDK call, a race against the deadline in case
 * the call ignores it, and `throwOnRequestTimeout` on the client) and every failure rejects with
 * `ResponseOwnersError`: the function then answers 503, never "not found" (a store outage must not look like an
 * answer).
 *
 * The DynamoDB SDK is required only when the table is used, so a function that keeps owners in memory never loads it
 * (as `index.ts` keeps the customers table's SDK off the cold start of a function without that table).
 */
import type { DynamoDBDocumentClient } from "@aws-sdk/lib-dynamodb";
import { boundedCall } from "./bounded-call";
import {
  RESPONSE_OWNERS_KEY,
  RESPONSE_OWNERS_TTL_ATTRIBUTE,
  ResponseOwnersError,
  responseOwnerItem,
  type ResponseOwner,
  type ResponseOwners,
} from "./response-owners";

export interface DynamoResponseOwnersOptions {
  doc: DynamoDBDocumentClient;
  /** The responses table (`RESPONSES_TABLE`). */
  table: string;
  /** Bound on one method call, its read-back included. @default 1000 */
  timeoutMs?: number;
}

function isConditionFailure(err: unknown): boolean {
  return (err as { name?: string } | null)?.name === "ConditionalCheckFailedException";
}

function describe(err: unknown): string {
  const e = err as { name?: string; message?: string } | null;
  return `${e?.name ?? "Error"}: ${String(e?.message ?? err).slice(0, 300)}`;
}

/** An item as the function uses it; one without the fields it needs is a store error, not an absent owner. */
function ownerOf(item: Record<string, unknown>, operation: string): ResponseOwner {
  const { response_id: responseId, customer_id: customerId, created_at: createdAt, model, context_tokens: contextTokens } = item;
  if (typeof responseId !== "string" || typeof customerId !== "string" || !customerId || typeof createdAt !== "number") {
    throw new ResponseOwnersError(`response owners ${operation}: item ${String(responseId).slice(0, 64)} lacks response_id, customer_id or created_at`);
  }
  return {
    responseId,
    customerId,
    createdAt,
    ...(typeof model === "string" ? { model } : {}),
    ...(typeof contextTokens === "number" && Number.isSafeInteger(contextTokens) && contextTokens >= 0 ? { contextTokens } : {}),
  };
}

/** Whether the item's TTL has passed: DynamoDB deletes expired items lazily (up to days later), so reads check it. */
function expired(item: Record<string, unknown>, now: number): boolean {
  const expiresAt = item[RESPONSE_OWNERS_TTL_ATTRIBUTE];
  return typeof expiresAt === "number" && expiresAt * 1000 <= now;
}

/** The document client's commands, loaded on first use. */
function sdk(): typeof import("@aws-sdk/lib-dynamodb") {
  return require("@aws-sdk/lib-dynamodb") as typeof import("@aws-sdk/lib-dynamodb");
}

/** The responses table on DynamoDB. */
export class DynamoResponseOwners implements ResponseOwners {
  private readonly doc: DynamoDBDocumentClient;
  private readonly table: string;
  private readonly timeoutMs: number;

  constructor(options: DynamoResponseOwnersOptions) {
    this.doc = options.doc;
    this.table = options.table;
    this.timeoutMs = Math.max(1, options.timeoutMs ?? 1000);
  }

  /** Closes the client's sockets (tests, scripts). */
  destroy(): void {
    this.doc.destroy();
  }

  /**
   * One conditional PutItem (`attribute_not_exists`): the first record of an id wins for good, so a later write can
   * never hand someone else's response to its writer. When the id is already recorded (a retry, or a collision),
   * the item on record is read back and returned: the caller compares its customer. An expired item counts as
   * absent and is replaced.
   */
  async record(owner: ResponseOwner, now: number): Promise<ResponseOwner> {
    return this.bounded("record", async (signal) => {
      try {
        await this.doc.send(
          new (sdk().PutCommand)({
            TableName: this.table,
            Item: responseOwnerItem(owner),
            ConditionExpression: "attribute_not_exists(#id) OR #exp <= :nowSeconds",
            ExpressionAttributeNames: { "#id": RESPONSE_OWNERS_KEY, "#exp": RESPONSE_OWNERS_TTL_ATTRIBUTE },
            ExpressionAttributeValues: { ":nowSeconds": Math.floor(now / 1000) },
          }),
          { abortSignal: signal },
        );
        return owner;
      } catch (err) {
        if (!isConditionFailure(err)) throw err;
      }
      const existing = await this.read(owner.responseId, signal);
      // Gone between the write and the read (expired, deleted by hand): nothing is on record, so nobody owns it.
      if (!existing) throw new ResponseOwnersError(`response owners record: ${owner.responseId.slice(0, 64)} was refused as recorded but cannot be read back`);
      return ownerOf(existing, "record");
    });
  }

  async lookup(responseId: string, now: number): Promise<ResponseOwner | undefined> {
    return this.bounded("lookup", async (signal) => {
      const item = await this.read(responseId, signal);
      if (!item || expired(item, now)) return undefined;
      return ownerOf(item, "lookup");
    });
  }

  /** UpdateItem with `customer_id = :c`: only the owner's own item changes; someone else's id is a silent no-op. */
  async setContextTokens(responseId: string, customerId: string, contextTokens: number): Promise<void> {
    if (!Number.isSafeInteger(contextTokens) || contextTokens < 0) throw new ResponseOwnersError(`response owners setContextTokens: ${String(contextTokens)} is not a token count`);
    await this.bounded("setContextTokens", async (signal) => {
      try {
        await this.doc.send(
          new (sdk().UpdateCommand)({
            TableName: this.table,
            Key: { [RESPONSE_OWNERS_KEY]: responseId },
            UpdateExpression: "SET #ctx = :tokens",
            ConditionExpression: "#cid = :customer",
            ExpressionAttributeNames: { "#ctx": "context_tokens", "#cid": "customer_id" },
            ExpressionAttributeValues: { ":tokens": contextTokens, ":customer": customerId },
          }),
          { abortSignal: signal },
        );
      } catch (err) {
        if (!isConditionFailure(err)) throw err;
      }
    });
  }

  private async read(responseId: string, signal: AbortSignal): Promise<Record<string, unknown> | undefined> {
    const output = await this.doc.send(new (sdk().GetCommand)({ TableName: this.table, Key: { [RESPONSE_OWNERS_KEY]: responseId }, ConsistentRead: true }), { abortSignal: signal });
    return output.Item;
  }

  /**
   * Runs `work` with an abort signal that fires at the timeout, and rejects at the timeout even if the SDK call
   * ignores the signal. Every failure becomes a `ResponseOwnersError` naming the operation and DynamoDB's error.
   */
  private bounded<T>(operation: string, work: (signal: AbortSignal) => Promise<T>): Promise<T> {
    return boundedCall(
      this.timeoutMs,
      work,
      () => new ResponseOwnersError(`response owners ${operation} failed: no answer within ${this.timeoutMs} ms`),
      (err) => (err instanceof ResponseOwnersError ? err : new ResponseOwnersError(`response owners ${operation} failed: ${describe(err)}`, { cause: err })),
    );
  }
}

/**
 * Owners kept in this process only: what a function without `RESPONSES_TABLE` uses, and the fake for unit tests.
 * The same rules as the table (first record wins, expired records are absent, context tokens only by the owner).
 * `fail` makes chosen methods reject with `ResponseOwnersError`, as the table does when DynamoDB cannot answer.
 */
export class MemoryResponseOwners implements ResponseOwners {
  private readonly owners = new Map<string, ResponseOwner>();
  /** Methods that reject until removed. */
  readonly fail = new Set<keyof ResponseOwners>();
  /** Calls per method, failed ones included. */
  readonly calls: Partial<Record<keyof ResponseOwners, number>> = {};

  /** Most records kept: the oldest goes first (an instance must not grow without bound). */
  constructor(private readonly maxEntries = 100_000) {}

  async record(owner: ResponseOwner, now: number): Promise<ResponseOwner> {
    this.enter("record");
    const existing = this.owners.get(owner.responseId);
    if (existing && !this.isExpired(existing, now)) return { ...existing };
    this.owners.delete(owner.responseId);
    this.owners.set(owner.responseId, { ...owner });
    if (this.owners.size > this.maxEntries) this.owners.delete(this.owners.keys().next().value as string);
    return { ...owner };
  }

  async lookup(responseId: string, now: number): Promise<ResponseOwner | undefined> {
    this.enter("lookup");
    const existing = this.owners.get(responseId);
    return existing && !this.isExpired(existing, now) ? { ...existing } : undefined;
  }

  async setContextTokens(responseId: string, customerId: string, contextTokens: number): Promise<void> {
    this.enter("setContextTokens");
    const existing = this.owners.get(responseId);
    if (existing && existing.customerId === customerId) existing.contextTokens = contextTokens;
  }

  private isExpired(owner: ResponseOwner, now: number): boolean {
    return responseOwnerItem(owner).expires_at * 1000 <= now;
  }

  private enter(method: keyof ResponseOwners): void {
    this.calls[method] = (this.calls[method] ?? 0) + 1;
    if (this.fail.has(method)) throw new ResponseOwnersError(`response owners ${method} failed: the responses table did not answer (simulated)`);
  }
}

export interface ResponseOwnersFromEnvOptions {
  /** `RESPONSES_TIMEOUT_MS` as the function's config parsed it. @default 1000 */
  timeoutMs?: number;
}

/**
 * The store for a function's environment: the table from `RESPONSES_TABLE` (throws `ResponseOwnersError` when it is
 * not set: callers check it first), DynamoDB from `awsClientOptions` (region, credentials,
 * `AWS_ENDPOINT_URL_DYNAMODB` for dynalite), each SDK attempt bounded by `timeoutMs`.
 */
export function createResponseOwnersFromEnv(env: NodeJS.ProcessEnv, options: ResponseOwnersFromEnvOptions = {}): DynamoResponseOwners {
  const table = env.RESPONSES_TABLE?.trim();
  if (!table) throw new ResponseOwnersError("RESPONSES_TABLE is not set");
  const timeoutMs = options.timeoutMs ?? 1000;
  const { createLedgerDocumentClient } = require("./ledger-store") as typeof import("./ledger-store");
  return new DynamoResponseOwners({ doc: createLedgerDocumentClient(env, { timeoutMs, maxAttempts: 3 }), table, timeoutMs });
}
