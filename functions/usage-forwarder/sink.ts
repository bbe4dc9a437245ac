/**
 * The port every billing sink implements, and the one place that decides what an HTTP answer means for delivery.
 *
 * Two kinds of failure are kept strictly apart, because confusing them either loses usage or blocks it:
 * - the sink is unavailable (unreachable, timeout, 5xx, 408, 429, or it refuses our credentials): nothing about
 *   the items is wrong, so none of them is touched; they stay `pending` and the sink is backed off;
 * - the sink refused the batch for its content (any other 4xx): some item in it is wrong, found by bisecting the
 *   batch; that item alone becomes `failed`, and its batch-mates are delivered.
 */
import type { LedgerItem, SinkName } from "../shared/ledger-schema";

export type BatchOutcome =
  /** The sink acknowledged every item of the batch (or already had it). */
  | { kind: "delivered" }
  /** The sink refused the batch because of what is in it; bisect to find the item(s). */
  | { kind: "refused"; reason: string }
  /** The sink cannot take anything right now; `retryAfterMs` when it said how long to wait (429/503 `Retry-After`). */
  | { kind: "unavailable"; reason: string; retryAfterMs?: number };

/** One billing sink: what it owes, how it batches, how it sends. Implementations never throw from `send`. */
export interface Sink {
  readonly name: SinkName;
  /** Batches in flight at once. */
  readonly concurrency: number;
  /**
   * Whether this sink may send at all now (its credentials are known). When false, nothing is sent and owed items
   * stay pending; `reason` says why.
   */
  ready(): Promise<{ ok: true } | { ok: false; reason: string }>;
  /** Why this item can never be accepted as it is (checked before sending; the item becomes `failed`), or undefined. */
  check(item: LedgerItem, now: number): string | undefined;
  /** Splits items (all owed and checked) into batches of at most what one call may carry, oldest first. */
  batches(items: LedgerItem[]): LedgerItem[][];
  /** Sends one batch within `timeoutMs`. Never throws. */
  send(batch: LedgerItem[], timeoutMs: number): Promise<BatchOutcome>;
}

/** Longest `Retry-After` honoured: a misbehaving server must not park a sink for an hour. */
export const MAX_RETRY_AFTER_MS = 60_000;

/**
 * What an HTTP status means for a batch. 2xx delivered. 401/403 (credentials), 404/405 (wrong base URL), 408,
 * 409 (Stripe: a concurrent write, safe to retry), 425, 429 and 5xx: the sink, not the items, is the problem.
 * Every other 4xx: the sink read the batch and refused it.
 */
export function outcomeOfStatus(status: number, reason: string, retryAfter?: string | string[] | null, now = Date.now()): BatchOutcome {
  if (status >= 200 && status < 300) return { kind: "delivered" };
  if (status >= 400 && status < 500 && ![401, 403, 404, 405, 408, 409, 425, 429].includes(status)) return { kind: "refused", reason };
  const retryAfterMs = parseRetryAfter(retryAfter, now);
  return { kind: "unavailable", reason, ...(retryAfterMs !== undefined ? { retryAfterMs } : {}) };
}

/** `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date; capped at `MAX_RETRY_AFTER_MS`. */
export function parseRetryAfter(header: string | string[] | null | undefined, now = Date.now()): number | undefined {
  const value = (Array.isArray(header) ? header[0] : header)?.trim();
  if (!value) return undefined;
  let ms: number;
  if (/^\d+(\.\d+)?$/.test(value)) ms = Number(value) * 1000;
  else {
    const at = Date.parse(value);
    if (Number.isNaN(at)) return undefined;
    ms = at - now;
  }
  return Math.min(MAX_RETRY_AFTER_MS, Math.max(0, Math.ceil(ms)));
}

/** Splits items into consecutive batches of at most `maxItems` items and `maxBytes` (by `size`); an item bigger than `maxBytes` goes alone. */
export function splitBatches<T>(items: T[], maxItems: number, maxBytes: number, size: (item: T) => number): T[][] {
  const batches: T[][] = [];
  let current: T[] = [];
  let bytes = 0;
  for (const item of items) {
    const itemBytes = size(item);
    if (current.length > 0 && (current.length >= maxItems || bytes + itemBytes > maxBytes)) {
      batches.push(current);
      current = [];
      bytes = 0;
    }
    current.push(item);
    bytes += itemBytes;
  }
  if (current.length > 0) batches.push(current);
  return batches;
}
