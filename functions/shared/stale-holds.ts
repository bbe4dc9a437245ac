/**
 * Crash recovery for prepaid reservations. A request holds the most it can cost before calling the upstream and
 * settles after its answer; if the process dies in between (a Lambda killed at its timeout, `kill -9` of the local
 * stack) or the settlement could not be confirmed (`settlement: "pending"` on its ledger item), the hold stays on the
 * account and keeps that money from being spent. This settles such holds once they are older than any request can
 * live: from the request's ledger item when there is one that was billed (charged at its `cost_micros`, exactly as
 * the request would have), else released (charged nothing: no ledger item means no answer was recorded, so none is
 * billed).
 *
 * Safe to run anywhere, any number of times, concurrently with requests and other sweeps: a settlement removes the
 * hold conditionally (`CustomerStore.settle`), so whoever comes second changes nothing.
 */
import type { Logger } from "../ai-chat/logger";
import { describeError } from "../ai-chat/logger";
import type { CustomerStore, StaleHold, UsageIncrement } from "./customer-port";
import type { LedgerItem } from "./ledger-schema";

/** The one ledger read the sweep needs. */
export interface StaleHoldsLedger {
  getItem(transactionId: string): Promise<LedgerItem | undefined>;
}

export interface SettleStaleHoldsArgs {
  store: Pick<CustomerStore, "staleHolds" | "settle">;
  ledger: StaleHoldsLedger;
  /** Holds made before this (ms since the epoch) are settled; younger ones may belong to a request still running. */
  olderThan: number;
  /** The settlement time written on the accounts. */
  now: number;
  log: Logger;
  /** No hold is started after this (ms, on `clock`): the caller's own deadline. @default none */
  deadline?: number;
  /** @default Date.now */
  clock?: () => number;
  /** Holds worked on at once. @default 4 */
  concurrency?: number;
}

export interface StaleHoldsReport {
  /** Holds charged from their billed ledger item's `cost_micros`. */
  settled: number;
  /** Holds released (charged nothing): no ledger item, or one that was not billed. */
  released: number;
  /** Holds left as they were because the ledger or the store failed (tried again by the next sweep). */
  failed: number;
}

/** What a stale hold should be charged: the billed ledger item's cost, or nothing (and why). */
function chargeFor(item: LedgerItem | undefined): { cost: number; from: "ledger" } | { cost: 0; from: "release"; reason: string } {
  if (!item) return { cost: 0, from: "release", reason: "no ledger item: no answer was recorded" };
  if (item.billed !== true) return { cost: 0, from: "release", reason: "the ledger item is not billed" };
  const cost = item.cost_micros;
  if (typeof cost !== "number" || !Number.isSafeInteger(cost) || cost < 0) return { cost: 0, from: "release", reason: "the billed ledger item has no usable cost_micros" };
  return { cost, from: "ledger" };
}

/** The counters a settled-in-its-place request adds: one request, and its tokens and cost when it was billed. */
function usageOf(periodStart: string, billed: LedgerItem | undefined): UsageIncrement {
  return {
    periodStart,
    requests: 1,
    promptTokens: billed ? safeCount(billed.prompt_tokens) : 0,
    completionTokens: billed ? safeCount(billed.completion_tokens) : 0,
    costMicros: billed ? safeCount(billed.cost_micros) : 0,
  };
}

function safeCount(value: unknown): number {
  return typeof value === "number" && Number.isSafeInteger(value) && value > 0 ? value : 0;
}

/**
 * Settles every hold made before `olderThan`. Rejects only when the holds cannot be listed at all; a hold whose
 * ledger read or settlement fails is counted in `failed`, logged, and left for the next sweep (never released on a
 * guess: a hold released while its billed ledger item was unreadable would give the answer away).
 */
export async function settleStaleHolds(args: SettleStaleHoldsArgs): Promise<StaleHoldsReport> {
  const { store, ledger, log } = args;
  const clock = args.clock ?? Date.now;
  const report: StaleHoldsReport = { settled: 0, released: 0, failed: 0 };
  const holds = await store.staleHolds(args.olderThan);
  if (holds.length === 0) return report;

  const settleOne = async (hold: StaleHold): Promise<void> => {
    const fields = { customer_id: hold.customerId, transaction_id: hold.transactionId, held_micros: hold.micros, held_at: new Date(hold.at).toISOString() };
    try {
      const item = await ledger.getItem(hold.transactionId);
      const charge = chargeFor(item);
      const result = await store.settle({
        customerId: hold.customerId,
        transactionId: hold.transactionId,
        reservedMicros: hold.micros,
        costMicros: charge.cost,
        now: args.now,
        // The request's own settlement would have counted it in the same write; this one counts it in its place.
        ...(hold.periodStart ? { usage: usageOf(hold.periodStart, charge.from === "ledger" ? item : undefined) } : {}),
      });
      if (!result.settled) {
        log.debug("stale_hold_gone", { ...fields, reason: "settled meanwhile by its request or another sweep" });
        return;
      }
      const outcome = { ...fields, charged_micros: result.chargedMicros, shortfall_micros: result.shortfallMicros, balance_after_micros: result.balanceMicros };
      if (charge.from === "ledger") {
        report.settled += 1;
        log.info("stale_hold_settled", { ...outcome, cost_micros: charge.cost });
        if (result.shortfallMicros > 0) log.warn("stale_hold_shortfall", { ...outcome, reason: "the cost exceeded the hold and the balance could not cover the rest" });
      } else {
        report.released += 1;
        log.info("stale_hold_released", { ...outcome, reason: charge.reason });
      }
    } catch (err) {
      report.failed += 1;
      log.warn("stale_hold_failed", { ...fields, error: describeError(err) });
    }
  };

  let next = 0;
  let skipped = 0;
  const worker = async (): Promise<void> => {
    while (next < holds.length) {
      if (args.deadline !== undefined && clock() >= args.deadline) {
        skipped = holds.length - next;
        next = holds.length;
        return;
      }
      await settleOne(holds[next++]);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(args.concurrency ?? 4, holds.length)) }, worker));
  if (skipped > 0) log.warn("stale_holds_deferred", { count: skipped, reason: "the sweep's deadline came first; the next sweep takes them" });
  return report;
}
