/**
 * Who created each stored Responses API response. Every customer calls the upstream with the service's one key, so
 * the upstream would let any customer read, continue, cancel or delete any other customer's stored response: the
 * function records the creator of each response it relays and answers "not found" to everyone else without asking
 * the upstream.
 *
 * One small DynamoDB table (`RESPONSES_TABLE`, provisioned by `infra/responses-table.ts`, created on dynalite by the
 * local stack), hash key `response_id`, one item per stored response, written once by the function when the
 * response's id first reaches it and only read after that. Items expire with DynamoDB TTL on `expires_at` (epoch
 * seconds) 30 days after creation, when OpenAI itself stops keeping a stored response by default
 * (https://platform.openai.com/docs/guides/your-data: "Response objects are saved for 30 days by default"); the
 * function also treats an expired item as absent, since TTL deletion is lazy.
 *
 * This file is the contract (schema and port); `response-owner-store.ts` implements it on DynamoDB and in memory.
 */

/** The table's hash key. */
export const RESPONSE_OWNERS_KEY = "response_id";

/** The TTL attribute (epoch seconds), enabled on the table by the Pulumi program. */
export const RESPONSE_OWNERS_TTL_ATTRIBUTE = "expires_at";

/** How long ownership is kept: OpenAI's default retention of stored responses. */
export const RESPONSE_OWNERSHIP_TTL_MS = 30 * 24 * 60 * 60 * 1000;

/** The table in CreateTable's terms: what the Pulumi program provisions and the local stack creates on dynalite. */
export const RESPONSE_OWNERS_TABLE_SCHEMA = {
  attributeDefinitions: [{ AttributeName: RESPONSE_OWNERS_KEY, AttributeType: "S" }],
  keySchema: [{ AttributeName: RESPONSE_OWNERS_KEY, KeyType: "HASH" }],
} as const;

/** One item of the table. */
export interface ResponseOwnerItem {
  response_id: string;
  customer_id: string;
  /** Epoch milliseconds. */
  created_at: number;
  /** Epoch seconds (DynamoDB TTL). */
  expires_at: number;
  /** The model the response was created with (for support; never billing). */
  model?: string;
  /**
   * Input plus output tokens of this response as billed: a later request continuing it with `previous_response_id`
   * sends all of them to the model again as input, so a prepaid reservation for that request counts them.
   */
  context_tokens?: number;
}

/** A recorded owner, in the function's terms. */
export interface ResponseOwner {
  responseId: string;
  customerId: string;
  createdAt: number;
  model?: string;
  contextTokens?: number;
}

/** Thrown when the store cannot answer in time (the function then answers 503, never "not found"). */
export class ResponseOwnersError extends Error {
  override name = "ResponseOwnersError";
}

/**
 * The port the function uses. Both methods bound their own time and reject with `ResponseOwnersError` on a store
 * failure.
 */
export interface ResponseOwners {
  /**
   * Records `owner` unless the id is already recorded. Resolves to the owner now on record: `owner` itself, the
   * same customer's earlier record (a retry), or another customer's (the caller must then treat the id as not
   * theirs).
   */
  record(owner: ResponseOwner, now: number): Promise<ResponseOwner>;
  /** The owner of `responseId`, or undefined when none is recorded or the record has expired. */
  lookup(responseId: string, now: number): Promise<ResponseOwner | undefined>;
  /**
   * Updates the context tokens of the caller's own response once its usage is known (a streamed response is recorded
   * at its first event, before its usage). A no-op when the id belongs to someone else.
   */
  setContextTokens(responseId: string, customerId: string, contextTokens: number): Promise<void>;
}

/**
 * Response ids the function accepts in a path or `previous_response_id`: OpenAI's are `resp_` + hex; other servers
 * use other shapes, so any short id of URL-safe characters, except `.` and `..`, which the upstream URL would resolve
 * as path segments (`<upstream>/responses/..` is `<upstream>/`). Anything else is "not found" without a lookup.
 */
export const RESPONSE_ID_PATTERN = /^(?!\.{1,2}$)[A-Za-z0-9_.:-]{1,256}$/;

/** The item for `owner`. */
export function responseOwnerItem(owner: ResponseOwner): ResponseOwnerItem {
  return {
    response_id: owner.responseId,
    customer_id: owner.customerId,
    created_at: owner.createdAt,
    expires_at: Math.floor((owner.createdAt + RESPONSE_OWNERSHIP_TTL_MS) / 1000),
    ...(owner.model !== undefined ? { model: owner.model } : {}),
    ...(owner.contextTokens !== undefined ? { context_tokens: owner.contextTokens } : {}),
  };
}
