/**
 * The usage forwarder's core: delivers ledger items to each billing sink that owes them and records the outcome
 * on each item. One module for both triggers: `deliver(items)` for items handed over by the DynamoDB stream, and
 * `sweep()` for the backlog (the sparse `undelivered` index), run on a schedule.
 *
 * Exactly once = at-least-once delivery + the sinks' idempotency keys (Moesif `transaction_id`, Stripe
 * `identifier`) + delivery marks. An item is only marked after its sink acknowledged it; a crash between the two
 * leaves it pending, to be sent again and de-duplicated by the sink. A mark that fails is remembered in memory
 * (the sink has the item) and written again by later runs without sending the item again, since the sinks only
 * de-duplicate for a while (Stripe: a rolling 24 hours).
 *
 * Per sink and batch:
 * - acknowledged: each item is marked delivered, once every sink has answered, in one write for all the sinks
 *   that took it (and leaves the backlog once no sink owes it);
 * - sink unavailable (unreachable, timeout, 5xx, 408, 429, bad credentials): no item is written, the rest of this
 *   run skips the sink, and the sink is backed off (1 s doubling to 30 s, or the sink's `Retry-After` up to 60 s);
 * - refused (another 4xx): the batch is bisected until the refused item(s) are alone; those become `failed`
 *   (attempts + 1, the reason, `next_at` = now + min(2^attempts minutes, 60 minutes)) and everything else is
 *   delivered. A `failed` item is never dropped: it stays in the backlog and is tried again when due.
 * An item whose own data is unusable (`parseLedgerItem`, or a sink's `check`) is refused the same way, never thrown.
 *
 * Every run has a deadline (the Lambda's, or `sweepTimeoutMs`): each ledger call carries an abort signal for it and
 * is abandoned at it even if the SDK ignores the signal, sends stop before it, and marks are not started after it.
 * When the ledger keeps failing (reads, or every mark of a run), sweeps back off (1 s doubling to 5 min).
 *
 * Nothing here throws for a sink, a DynamoDB failure or an item's data: each is logged and leaves the item pending
 * (or failed, with the reason).
 *
 * With a customers table (`holds`), each sweep (never a stream delivery) also settles the prepaid holds a crash left
 * behind (`settleStaleHolds`), alongside the backlog and by the same deadline; its failures are logged and never
 * affect the ledger's delivery.
 */
import { setMaxListeners } from "node:events";
import { SecretRedactor } from "../shared/secret-redactor";
import { owesDelivery, SINKS, type LedgerItem, type SinkName } from "../shared/ledger-schema";
import { createLedgerDocumentClient, LedgerStore, parseLedgerItem } from "../shared/ledger-store";
import { createLogger, describeError, type Logger } from "../ai-chat/logger";
import { SsmParameterReader, type ParameterReader } from "../ai-chat/secrets";
import { loadForwarderConfig } from "./config";
import { MoesifSink } from "./moesif-sink";
import { SecretSource } from "./secrets";
import type { BatchOutcome, Sink } from "./sink";
import { StripeSink } from "./stripe-sink";
import { awsClientOptions } from "../shared/aws-client-options";
import type { CustomerStore } from "../shared/customer-port";
import { createCustomerStoreFromEnv } from "../shared/customer-store";
import { settleStaleHolds, type StaleHoldsReport } from "../shared/stale-holds";

/** What one `deliver` or `sweep` did, per sink. */
export interface DeliveryReport {
  /** Items looked at. */
  considered: number;
  /** Items acknowledged by the sink and marked delivered. */
  delivered: Record<SinkName, number>;
  /** Items the sink refused (or that can never be sent as they are), marked failed. */
  failed: Record<SinkName, number>;
  /** Items the sink still owes after this run (sink down or backing off, out of time, or a mark that failed). */
  pending: Record<SinkName, number>;
  /** Stale prepaid holds this sweep settled, released or could not settle (only when the sweep looks at holds). */
  holds?: StaleHoldsReport;
}

export interface RunOptions {
  /**
   * Epoch ms (on the forwarder's clock) by which the run must be over (a Lambda's deadline less a margin): no send
   * starts that could outlast it, ledger calls still running at it are abandoned, no mark starts after it.
   * @default now + `sweepTimeoutMs`
   */
  deadline?: number;
}

export interface BackoffOptions {
  /** First pause after a sink-level failure. @default 1000 */
  initialMs?: number;
  /** @default 30000 */
  maxMs?: number;
  /** Longest `Retry-After` honoured. @default 60000 */
  maxRetryAfterMs?: number;
}

export interface LedgerBackoffOptions {
  /** First pause of the sweep after the ledger failed (a backlog read, or every mark of a run). @default 1000 */
  initialMs?: number;
  /** @default 300000 */
  maxMs?: number;
}

/** The stale-hold part of a sweep (prepaid reservations a crash left behind). */
export interface HoldSweepOptions {
  store: Pick<CustomerStore, "staleHolds" | "settle">;
  /** The ledger read that says whether a hold's request was billed, and at what cost. */
  ledger: { getItem(transactionId: string, options?: { signal?: AbortSignal }): Promise<LedgerItem | undefined> };
  /** A hold older than this belongs to a request that can no longer be running (`HOLD_STALE_AFTER_MS`). */
  staleAfterMs: number;
  /**
   * Holds made before this time (ms since the epoch) are stale whatever their age: the local stack passes its start,
   * since a hold made before it belongs to a process that is gone (LevelDB's lock makes the stack the only writer).
   */
  orphansBefore?: number;
}

export interface UsageForwarderOptions {
  store: Pick<LedgerStore, "backlog" | "markDelivered" | "markFailed" | "clearBacklog"> & Partial<Pick<LedgerStore, "reschedule">>;
  /** The sinks in use. A sink not listed is never sent to; items owing it stay pending and are counted so. */
  sinks: Sink[];
  log: Logger;
  clock?: () => number;
  /** Bound on one sink call. @default 10000 */
  sinkTimeoutMs?: number;
  /** The sweep leaves items due more recently than this to the stream trigger. @default 60000 */
  sweepGraceMs?: number;
  /** Items read from the backlog per sweep round. @default 1000 */
  sweepLimit?: number;
  /** Backlog rounds per sweep at most. @default 20 */
  maxSweepRounds?: number;
  /**
   * A run's deadline when the caller gives none (the local stack's sweep loop): a sweep or delivery never runs
   * longer, whatever DynamoDB or a sink does. @default 30000
   */
  sweepTimeoutMs?: number;
  /** Time one backlog read may spend paging (at most half the run's time left). @default 5000 */
  backlogReadBudgetMs?: number;
  /** Items one backlog read examines per shard at most. @default 10000 */
  backlogMaxReadPerShard?: number;
  backoff?: BackoffOptions;
  ledgerBackoff?: LedgerBackoffOptions;
  /** Base of a refused item's retry schedule: 2^attempts times this, at most `failedRetryMaxMs`. @default 60000 */
  failedRetryBaseMs?: number;
  /** @default 3600000 */
  failedRetryMaxMs?: number;
  /** Ledger writes in flight at once per batch. @default 16 */
  markConcurrency?: number;
  /** Acknowledged items whose mark failed, remembered so they are marked later rather than sent again. @default 10000 */
  maxUnmarked?: number;
  /** Replaces secrets in the reasons written to items; logs are redacted by the logger itself. */
  redact?: (text: string) => string;
  /** Settle stale prepaid holds in each sweep. @default none */
  holds?: HoldSweepOptions;
}

/** A run's deadline, and the signal that aborts the ledger calls still running at it. */
interface Run {
  deadline: number;
  signal: AbortSignal;
}

/** One `deliver` pass: its run, what it reports, what its ledger writes did, what the sinks acknowledged. */
interface Pass {
  run: Run;
  report: DeliveryReport;
  writes: { ok: number; failed: number };
  acknowledged: Map<string, { item: LedgerItem; sinks: SinkName[] }>;
  /** What this pass's failed marks changed on each item, so its delivered mark computes from the item as it is. */
  refusedHere: Map<string, Partial<LedgerItem>>;
}

interface SinkHealth {
  failures: number;
  nextAttemptAt: number;
  lastReason?: string;
}

/** A ledger call abandoned at the run's deadline (`started`: it had been sent, so DynamoDB did not answer in time). */
class RunDeadlineError extends Error {
  override name = "RunDeadlineError";
  constructor(readonly started: boolean) {
    super(started ? "no answer from the ledger before the run's deadline" : "the run's deadline has passed");
  }
}

/** The least time worth starting a sink call with; below it the run stops and leaves items pending. */
const MIN_SEND_MS = 250;

function emptyReport(considered = 0): DeliveryReport {
  const zero = () => Object.fromEntries(SINKS.map((s) => [s, 0])) as Record<SinkName, number>;
  return { considered, delivered: zero(), failed: zero(), pending: zero() };
}

function addReport(into: DeliveryReport, from: DeliveryReport): void {
  into.considered += from.considered;
  for (const sink of SINKS) {
    into.delivered[sink] += from.delivered[sink];
    into.failed[sink] += from.failed[sink];
    into.pending[sink] += from.pending[sink];
  }
}

/** Whether `sink` owes `item` a delivery at all (pending or failed). */
function owes(item: LedgerItem, sink: SinkName): boolean {
  const state = item[`${sink}_state`];
  return state === "pending" || state === "failed";
}

/** Whether `sink` should try `item` now: pending, or failed and due again. */
function due(item: LedgerItem, sink: SinkName, now: number): boolean {
  const state = item[`${sink}_state`];
  return state === "pending" || (state === "failed" && (item[`${sink}_next_at`] ?? 0) <= now);
}

/** For an item whose data is unusable: the sinks it may owe (any state but absent or delivered). */
function mayOwe(raw: Record<string, unknown>, sink: SinkName): boolean {
  const state = raw[`${sink}_state`];
  return state !== undefined && state !== "delivered";
}

/** A previous attempt count that is usable, else 0. */
function attemptsOf(raw: Record<string, unknown>, sink: SinkName): number {
  const attempts = raw[`${sink}_attempts`];
  return typeof attempts === "number" && Number.isSafeInteger(attempts) && attempts >= 0 ? attempts : 0;
}

function isoTime(ms: number): string {
  const date = new Date(ms);
  return Number.isNaN(date.getTime()) ? String(ms) : date.toISOString();
}

/** Runs `work` over `items`, at most `limit` at a time. `work` must not reject (each caller catches its own). */
async function eachLimited<T>(items: T[], limit: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const item = items[next++];
      await work(item).catch(() => undefined);
    }
  });
  await Promise.allSettled(workers);
}

export class UsageForwarder {
  private readonly clock: () => number;
  private readonly health = new Map<SinkName, SinkHealth>();
  private running?: Promise<DeliveryReport>;
  /** Sink-level failures seen so far (a sweep stops its rounds at the first). */
  private outages = 0;
  /** Per transaction id, the sinks that acknowledged it while its delivered mark could not be written. */
  private readonly unmarked = new Map<string, Set<SinkName>>();
  /** Consecutive ledger failures (backlog reads, or runs whose every write failed) and the sweep pause they set. */
  private ledgerFailures = 0;
  private ledgerPausedUntil = 0;

  constructor(private readonly options: UsageForwarderOptions) {
    this.clock = options.clock ?? Date.now;
  }

  /** The forwarder's logger (secret-redacting), for its adapters. */
  get log(): Logger {
    return this.options.log;
  }

  /**
   * Delivers `items` (as handed over by the stream, or read from the backlog) to every sink that owes them and is
   * not backing off. Never throws; what could not be delivered stays pending in the table.
   */
  async deliver(items: LedgerItem[], options: RunOptions = {}): Promise<DeliveryReport> {
    const { run, end } = this.startRun(options.deadline);
    const report = emptyReport(items.length);
    try {
      await this.deliverIn(run, items, report, false);
    } catch (err) {
      // Unreachable by design (every step catches its own failures); a bug must not fail the invocation.
      this.options.log.error("forwarder_run_failed", { error: describeError(err) });
    } finally {
      end();
    }
    return report;
  }

  /**
   * Delivers the backlog: reads the longest-due items (due before the sweep grace) and delivers them, round after
   * round while rounds make progress, until the backlog is empty, every sink is backing off, or the deadline nears.
   * A sweep called while one runs in this forwarder returns the running one's promise; every run ends by its
   * deadline, so that promise always settles. (Other processes or containers may sweep at the same time: harmless,
   * since marks are conditional and the sinks de-duplicate.) Never throws.
   */
  sweep(options: RunOptions = {}): Promise<DeliveryReport> {
    this.running ??= this.sweepAll(options).finally(() => (this.running = undefined));
    return this.running;
  }

  /** The backlog and, with a customers table, the stale holds: side by side, neither able to fail the other. */
  private async sweepAll(options: RunOptions): Promise<DeliveryReport> {
    const deadline = options.deadline ?? this.clock() + (this.options.sweepTimeoutMs ?? 30_000);
    const [report, holds] = await Promise.all([this.runSweep({ ...options, deadline }), this.sweepHolds(deadline)]);
    if (holds) report.holds = holds;
    return report;
  }

  /**
   * Settles the holds made before `max(orphansBefore, now - staleAfterMs)`. Never rejects and always settles by the
   * deadline: a failure is logged (and counted in `failed` when it concerns one hold); holds not reached are left
   * for the next sweep.
   */
  private async sweepHolds(deadline: number): Promise<StaleHoldsReport | undefined> {
    const holds = this.options.holds;
    if (!holds) return undefined;
    const log = this.options.log;
    const { run, end } = this.startRun(deadline);
    const now = this.clock();
    const olderThan = Math.max(holds.orphansBefore ?? Number.NEGATIVE_INFINITY, now - holds.staleAfterMs);
    try {
      const report = await this.ledger(run, () =>
        settleStaleHolds({
          store: holds.store,
          ledger: { getItem: (id) => this.ledger(run, (signal) => holds.ledger.getItem(id, { signal })) },
          olderThan,
          now,
          log,
          // Leave time to finish the holds already started (each bounded by the store's own timeout).
          deadline: run.deadline - MIN_SEND_MS,
          clock: this.clock,
        }),
      );
      if (report.settled + report.released + report.failed > 0) log.info("stale_holds_sweep", { ...report, older_than: new Date(olderThan).toISOString() });
      return report;
    } catch (err) {
      log.error("stale_holds_sweep_failed", { error: describeError(err) });
      return { settled: 0, released: 0, failed: 0 };
    } finally {
      end();
    }
  }

  private startRun(deadline: number | undefined): { run: Run; end: () => void } {
    const now = this.clock();
    const at = deadline ?? now + (this.options.sweepTimeoutMs ?? 30_000);
    const controller = new AbortController();
    // Every ledger call of the run listens to this one signal (the SDK adds a listener per call).
    setMaxListeners(0, controller.signal);
    const timer = setTimeout(() => controller.abort(new RunDeadlineError(true)), Math.max(0, at - now));
    timer.unref?.();
    return { run: { deadline: at, signal: controller.signal }, end: () => clearTimeout(timer) };
  }

  /**
   * A ledger call bounded by the run's deadline: the signal aborts the SDK's request, and the race returns at the
   * deadline even if a call ignored it. Rejects with `RunDeadlineError` (not `started` when it was never made).
   */
  private async ledger<T>(run: Run, call: (signal: AbortSignal) => Promise<T>): Promise<T> {
    if (run.signal.aborted || this.clock() >= run.deadline) throw new RunDeadlineError(false);
    let onAbort: (() => void) | undefined;
    const aborted = new Promise<never>((_, reject) => {
      onAbort = () => reject(new RunDeadlineError(true));
      run.signal.addEventListener("abort", onAbort, { once: true });
    });
    try {
      return await Promise.race([call(run.signal), aborted]);
    } finally {
      run.signal.removeEventListener("abort", onAbort!);
    }
  }

  private async runSweep(options: RunOptions): Promise<DeliveryReport> {
    const total = emptyReport();
    const started = this.clock();
    if (started < this.ledgerPausedUntil) {
      this.options.log.debug("forwarder_sweep_skipped", { reason: "the ledger is failing; backing off", retry_in_ms: this.ledgerPausedUntil - started });
      return total;
    }
    const { run, end } = this.startRun(options.deadline);
    try {
      const limit = this.options.sweepLimit ?? 1000;
      const rounds = this.options.maxSweepRounds ?? 20;
      for (let round = 0; round < rounds; round++) {
        const now = this.clock();
        if (run.deadline - now < MIN_SEND_MS) break;
        // Sinks backing off are not asked about: a long outage costs no backlog reads beyond one per back-off.
        const sinks = this.options.sinks.filter((sink) => now >= (this.health.get(sink.name)?.nextAttemptAt ?? 0)).map((s) => s.name);
        if (sinks.length === 0) break;
        let items: LedgerItem[];
        try {
          const readBudgetMs = Math.max(0, Math.min(this.options.backlogReadBudgetMs ?? 5000, (run.deadline - now) / 2));
          items = await this.ledger(run, (signal) =>
            this.options.store.backlog({
              now,
              graceMs: this.options.sweepGraceMs ?? 60_000,
              limit,
              sinks,
              readBudgetMs,
              maxReadPerShard: this.options.backlogMaxReadPerShard,
              resume: true,
              signal,
              onShardError: (shard, err) => this.options.log.warn("ledger_backlog_shard_failed", { shard, error: describeError(err) }),
            }),
          );
        } catch (err) {
          this.options.log.error("ledger_backlog_read_failed", { error: describeError(err) });
          this.noteLedger(0, 1);
          break;
        }
        if (items.length === 0) break;
        const outagesBefore = this.outages;
        const report = emptyReport(items.length);
        const writes = await this.deliverIn(run, items, report, true);
        addReport(total, report);
        const progress = SINKS.reduce((n, s) => n + report.delivered[s] + report.failed[s], 0);
        // Another round while this one got somewhere and neither a sink nor the ledger failed: a busy shard may hold
        // more than it gave this time. A failure waits for the next sweep, so one sweep reports each item once.
        if (progress === 0 || this.outages !== outagesBefore || writes.failed > 0) break;
      }
    } catch (err) {
      this.options.log.error("forwarder_run_failed", { error: describeError(err) });
    } finally {
      end();
    }
    if (total.considered > 0) this.options.log.info("forwarder_sweep", { ...total });
    return total;
  }

  /** One pass over `items`; returns what its ledger writes did. Never rejects. */
  private async deliverIn(run: Run, items: LedgerItem[], report: DeliveryReport, fromBacklog: boolean): Promise<{ ok: number; failed: number }> {
    const pass: Pass = { run, report, writes: { ok: 0, failed: 0 }, acknowledged: new Map(), refusedHere: new Map() };
    const log = this.options.log;
    const concurrency = this.options.markConcurrency ?? 16;
    const active = new Set(this.options.sinks.map((s) => s.name));
    // One entry per transaction id (a stream batch can carry an item twice); an item whose data is unusable is
    // refused (failed, with the reason, for each sink it may owe), never computed with.
    const valid = new Map<string, LedgerItem>();
    const unusable: Array<{ id: string; raw: Record<string, unknown>; reason: string }> = [];
    for (const raw of items) {
      const parsed = parseLedgerItem(raw);
      if (parsed.ok) valid.set(parsed.item.transaction_id, parsed.item);
      else if (parsed.id) unusable.push({ id: parsed.id, raw: raw as unknown as Record<string, unknown>, reason: parsed.reason });
      else log.error("ledger_item_unreadable", { reason: parsed.reason });
    }
    const unique = [...valid.values()];
    for (const item of unique) for (const sink of SINKS) if (item[`${sink}_state`] === "delivered") this.forgetUnmarked(item.transaction_id, [sink]);
    for (const sink of SINKS) if (!active.has(sink)) report.pending[sink] += unique.filter((i) => owes(i, sink)).length;

    const refusals = unusable.flatMap(({ id, raw, reason }) => SINKS.filter((sink) => mayOwe(raw, sink)).map((sink) => ({ id, raw, reason, sink })));
    for (const { sink } of refusals) if (!active.has(sink)) report.pending[sink] += 1;
    await Promise.allSettled([
      ...this.options.sinks.map((sink) =>
        this.deliverTo(sink, unique, pass).catch((err: unknown) => {
          // Unreachable by design; the items stay as they are (pending) in the table.
          log.error("sink_run_failed", { sink: sink.name, error: describeError(err) });
        }),
      ),
      eachLimited(
        refusals.filter(({ sink }) => active.has(sink)),
        concurrency,
        ({ id, raw, reason, sink }) => this.markFailed(pass, sink, id, attemptsOf(raw, sink), undefined, reason),
      ),
    ]);

    // Marks are written once every sink has answered: an item two sinks took in this run gets one write, not
    // three. None starts once the deadline has passed: the sinks have the items, this process remembers them.
    const at = this.clock();
    const acknowledged = [...pass.acknowledged.values()];
    if (acknowledged.length > 0 && (run.signal.aborted || at >= run.deadline)) {
      for (const { item, sinks } of acknowledged) {
        this.rememberUnmarked(item.transaction_id, sinks);
        for (const sink of sinks) report.pending[sink] += 1;
      }
      log.warn("ledger_marks_skipped", { count: acknowledged.length, reason: "the run's deadline passed; marked by a later run without sending again" });
    } else {
      await eachLimited(acknowledged, concurrency, ({ item, sinks }) => this.markDelivered(pass, item, sinks, at));
    }
    // Items in the backlog that owe no sink anything (an interrupted mark left them there): take them out. Items
    // the index gave as due that no sink is due for (a conditional write lost a race): give them their schedule.
    const now = this.clock();
    const settled = unique.filter((item) => item.undelivered !== undefined && !owesDelivery(item));
    const early = fromBacklog ? unique.filter((item) => owesDelivery(item) && !SINKS.some((sink) => due(item, sink, now))) : [];
    await eachLimited([...settled, ...early], concurrency, async (item) => {
      const store = this.options.store;
      try {
        if (owesDelivery(item)) {
          if (store.reschedule) await this.ledger(run, (signal) => store.reschedule!(item, { now, signal }));
        } else await this.ledger(run, (signal) => store.clearBacklog(item.transaction_id, { signal }));
      } catch (err) {
        log.warn("ledger_backlog_update_failed", { transaction_id: item.transaction_id, error: describeError(err) });
      }
    });
    this.noteLedger(pass.writes.ok, pass.writes.failed);
    return pass.writes;
  }

  private backingOff(sink: SinkName, now: number): boolean {
    return now < (this.health.get(sink)?.nextAttemptAt ?? 0);
  }

  private async deliverTo(sink: Sink, items: LedgerItem[], pass: Pass): Promise<void> {
    const { report, run } = pass;
    const name = sink.name;
    const now = this.clock();
    const owed = items.filter((item) => owes(item, name));
    const dueNow = owed.filter((item) => due(item, name, now));
    report.pending[name] += owed.length - dueNow.length;
    if (dueNow.length === 0) return;
    // Acknowledged by this sink in an earlier run whose mark failed: mark it again, never send it again.
    const toSend: LedgerItem[] = [];
    for (const item of dueNow) {
      if (this.unmarked.get(item.transaction_id)?.has(name)) this.acknowledge(pass, item, name);
      else toSend.push(item);
    }
    if (toSend.length === 0) return;
    if (this.backingOff(name, now)) {
      report.pending[name] += toSend.length;
      return;
    }
    let ready: Awaited<ReturnType<Sink["ready"]>>;
    try {
      // Bounded by the run's deadline like a ledger call (an SSM read of the credentials has its own 3 s bound).
      ready = await this.ledger(run, () => sink.ready());
    } catch (err) {
      if (err instanceof RunDeadlineError) {
        // Out of time, not a sink outage: no back-off.
        report.pending[name] += toSend.length;
        return;
      }
      ready = { ok: false, reason: `${describeError(err).name}: ${describeError(err).message}` };
    }
    if (!ready.ok) {
      this.sinkFailed(name, { kind: "unavailable", reason: ready.reason });
      report.pending[name] += toSend.length;
      return;
    }
    const sendable: LedgerItem[] = [];
    const rejected: Array<{ item: LedgerItem; reason: string }> = [];
    for (const item of toSend) {
      let problem: string | undefined;
      try {
        problem = sink.check(item, now);
      } catch (err) {
        problem = `the item cannot be read for ${name}: ${describeError(err).name}: ${describeError(err).message}`;
      }
      if (problem) rejected.push({ item, reason: problem });
      else sendable.push(item);
    }
    const marking = eachLimited(rejected, this.options.markConcurrency ?? 16, ({ item, reason }) => this.markFailed(pass, name, item.transaction_id, item[`${name}_attempts`] ?? 0, item, reason));

    const batches = sink.batches(sendable);
    // Once the sink is found unavailable, the batches not yet started stay pending: one outage, one failure.
    const stop = { stopped: false };
    let next = 0;
    const worker = async () => {
      while (next < batches.length) {
        const batch = batches[next++];
        if (stop.stopped) {
          report.pending[name] += batch.length;
          continue;
        }
        await this.sendBatch(sink, batch, pass, stop);
      }
    };
    await Promise.all([marking, ...Array.from({ length: Math.min(sink.concurrency, batches.length) }, worker)]);
  }

  private acknowledge(pass: Pass, item: LedgerItem, sink: SinkName): void {
    const entry = pass.acknowledged.get(item.transaction_id) ?? { item, sinks: [] };
    entry.sinks.push(sink);
    pass.acknowledged.set(item.transaction_id, entry);
  }

  /** Sends one batch; on a refusal, bisects it. Leaves every item it did not get acknowledged or refused pending. */
  private async sendBatch(sink: Sink, batch: LedgerItem[], pass: Pass, stop: { stopped: boolean }): Promise<void> {
    const { report, run } = pass;
    const name = sink.name;
    const budget = Math.min(this.options.sinkTimeoutMs ?? 10_000, run.deadline - this.clock());
    if (stop.stopped || budget < MIN_SEND_MS) {
      stop.stopped = true;
      report.pending[name] += batch.length;
      return;
    }
    let outcome: BatchOutcome;
    try {
      outcome = await sink.send(batch, Math.floor(budget));
    } catch (err) {
      // Sinks do not throw; should one, it is an outage of that sink, not a verdict on the items.
      outcome = { kind: "unavailable", reason: `${describeError(err).name}: ${describeError(err).message}` };
    }
    if (outcome.kind === "delivered") {
      this.sinkRecovered(name);
      for (const item of batch) this.acknowledge(pass, item, name);
      return;
    }
    if (outcome.kind === "unavailable") {
      stop.stopped = true;
      this.sinkFailed(name, outcome);
      report.pending[name] += batch.length;
      return;
    }
    // Refused: the sink is up (it read the batch), so this is no outage.
    this.sinkRecovered(name);
    if (batch.length === 1) {
      await this.markFailed(pass, name, batch[0].transaction_id, batch[0][`${name}_attempts`] ?? 0, batch[0], outcome.reason);
      return;
    }
    const half = Math.ceil(batch.length / 2);
    await this.sendBatch(sink, batch.slice(0, half), pass, stop);
    await this.sendBatch(sink, batch.slice(half), pass, stop);
  }

  private async markDelivered(pass: Pass, item: LedgerItem, sinks: SinkName[], at: number): Promise<void> {
    const id = item.transaction_id;
    try {
      const held = { ...item, ...pass.refusedHere.get(id) };
      await this.ledger(pass.run, (signal) => this.options.store.markDelivered(id, sinks, at, { held, now: at, signal }));
      for (const sink of sinks) pass.report.delivered[sink] += 1;
      this.forgetUnmarked(id, sinks);
      pass.writes.ok += 1;
    } catch (err) {
      // The sinks have it, the ledger does not know: remembered here, marked by a later run without sending again
      // (and, should this process end first, sent again and de-duplicated by the sinks).
      for (const sink of sinks) pass.report.pending[sink] += 1;
      this.rememberUnmarked(id, sinks);
      if (!(err instanceof RunDeadlineError && !err.started)) pass.writes.failed += 1;
      this.options.log.error("ledger_mark_failed", { transaction_id: id, sinks, state: "delivered", error: describeError(err) });
    }
  }

  /** Marks an item refused by `sink`; `held` is the item as read (absent when its data is unusable). Never rejects. */
  private async markFailed(pass: Pass, sink: SinkName, id: string, previousAttempts: number, held: LedgerItem | undefined, reason: string): Promise<void> {
    const safeReason = (this.options.redact ?? ((t: string) => t))(reason);
    try {
      const attempts = previousAttempts + 1;
      const delay = Math.min((this.options.failedRetryBaseMs ?? 60_000) * 2 ** attempts, this.options.failedRetryMaxMs ?? 3_600_000);
      const now = this.clock();
      const nextAt = now + delay;
      await this.ledger(pass.run, (signal) => this.options.store.markFailed(id, sink, safeReason, attempts, nextAt, { held, now, signal }));
      pass.report.failed[sink] += 1;
      pass.writes.ok += 1;
      pass.refusedHere.set(id, { ...pass.refusedHere.get(id), [`${sink}_state`]: "failed", [`${sink}_next_at`]: nextAt, [`${sink}_attempts`]: attempts });
      this.options.log.warn("delivery_refused", { sink, transaction_id: id, attempts, reason: safeReason, next_attempt_at: isoTime(nextAt) });
    } catch (err) {
      pass.report.pending[sink] += 1;
      if (!(err instanceof RunDeadlineError && !err.started)) pass.writes.failed += 1;
      this.options.log.error("ledger_mark_failed", { transaction_id: id, sink, state: "failed", reason: safeReason, error: describeError(err) });
    }
  }

  private rememberUnmarked(id: string, sinks: SinkName[]): void {
    const known = this.unmarked.get(id) ?? new Set<SinkName>();
    for (const sink of sinks) known.add(sink);
    this.unmarked.delete(id);
    this.unmarked.set(id, known);
    // Past the bound the oldest are forgotten: such an item is sent again, and the sink de-duplicates it.
    const max = this.options.maxUnmarked ?? 10_000;
    for (const oldest of this.unmarked.keys()) {
      if (this.unmarked.size <= max) break;
      this.unmarked.delete(oldest);
    }
  }

  private forgetUnmarked(id: string, sinks: SinkName[]): void {
    const known = this.unmarked.get(id);
    if (!known) return;
    for (const sink of sinks) known.delete(sink);
    if (known.size === 0) this.unmarked.delete(id);
  }

  /**
   * Ledger health after a backlog read or a pass: any write that went through resets it; a pass whose every write
   * failed (or a read that failed) pauses the sweep, 1 s doubling to 5 min, so a ledger that refuses writes
   * (throttling, a missing permission) is not hammered, and the items it could not mark are not re-driven.
   */
  private noteLedger(ok: number, failed: number): void {
    if (ok > 0) {
      if (this.ledgerFailures > 0) this.options.log.info("ledger_recovered", { after_failures: this.ledgerFailures });
      this.ledgerFailures = 0;
      this.ledgerPausedUntil = 0;
      return;
    }
    if (failed === 0) return;
    this.ledgerFailures += 1;
    const backoff = this.options.ledgerBackoff ?? {};
    const delay = Math.min((backoff.initialMs ?? 1000) * 2 ** Math.min(this.ledgerFailures - 1, 30), backoff.maxMs ?? 300_000);
    this.ledgerPausedUntil = this.clock() + delay;
    this.options.log.warn("ledger_backing_off", { failures: this.ledgerFailures, retry_in_ms: delay, remembered_unmarked: this.unmarked.size });
  }

  private sinkFailed(sink: SinkName, outcome: Extract<BatchOutcome, { kind: "unavailable" }>): void {
    this.outages += 1;
    const now = this.clock();
    const health = this.health.get(sink) ?? { failures: 0, nextAttemptAt: 0 };
    // Failures of calls that were already in flight when the first one failed do not lengthen the back-off.
    if (now < health.nextAttemptAt) return;
    health.failures += 1;
    const backoff = this.options.backoff ?? {};
    const exponential = Math.min((backoff.initialMs ?? 1000) * 2 ** (health.failures - 1), backoff.maxMs ?? 30_000);
    const delay = outcome.retryAfterMs !== undefined ? Math.min(outcome.retryAfterMs, backoff.maxRetryAfterMs ?? 60_000) : exponential;
    health.nextAttemptAt = now + delay;
    health.lastReason = outcome.reason;
    this.health.set(sink, health);
    this.options.log.warn("sink_unavailable", { sink, reason: outcome.reason, failures: health.failures, retry_in_ms: delay });
  }

  private sinkRecovered(sink: SinkName): void {
    const health = this.health.get(sink);
    if (!health || health.failures === 0) return;
    this.options.log.info("sink_recovered", { sink, after_failures: health.failures });
    this.health.set(sink, { failures: 0, nextAttemptAt: 0 });
  }
}

export interface CreateForwarderOptions {
  /** Where log lines go. @default stdout */
  write?: (line: string) => void;
  clock?: () => number;
  /** Test seams: tighter back-off and retry schedules, another parameter reader. */
  backoff?: BackoffOptions;
  failedRetryBaseMs?: number;
  sweepLimit?: number;
  parameterReader?: ParameterReader;
  /** Pause before an SSM read that failed is tried again. @default 5000 */
  secretsRetryAfterMs?: number;
  /** Ledger writes in flight at once (DynamoDB likes many; dynalite, one process on LevelDB, few). @default 16 */
  markConcurrency?: number;
  /** A sweep's (or delivery's) deadline when its caller gives none, as the local stack's loop does. @default 30000 */
  sweepTimeoutMs?: number;
  /** The sweep's pause after ledger failures. @default 1 s doubling to 5 min */
  ledgerBackoff?: LedgerBackoffOptions;
  /**
   * With `CUSTOMERS_TABLE`: holds made before this time (ms since the epoch) are stale whatever their age. The local
   * stack passes its start time, so a reservation left by a killed predecessor is settled at the first sweep.
   */
  orphanHoldsBefore?: number;
}

/**
 * Builds the forwarder from a function's environment (the contract in the README: `LEDGER_TABLE`,
 * `MOESIF_BASE_URI`, `MOESIF_APPLICATION_ID[_PARAMETER]`, `STRIPE_BILLING`, `STRIPE_API_KEY[_PARAMETER]`,
 * `STRIPE_API_BASE`, `STRIPE_METER_API`, `FORWARDER_SWEEP_GRACE_MS`, `FORWARDER_BATCH_SIZE`, `SINK_TIMEOUT_MS`,
 * `LOG_LEVEL`, `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_SSM`; with `CUSTOMERS_TABLE`, the stale-hold sweep
 * with `HOLD_STALE_AFTER_MS` and `CUSTOMERS_TIMEOUT_MS`). Throws `ForwarderConfigError` when the
 * environment is unusable. Secrets are registered with the logger's redaction as soon as they are known.
 */
export function createForwarderFromEnv(env: NodeJS.ProcessEnv, options: CreateForwarderOptions = {}): UsageForwarder {
  const config = loadForwarderConfig(env);
  const clock = options.clock ?? Date.now;
  let secrets: SecretSource | undefined;
  let stripe: StripeSink | undefined;
  const knownSecrets = () => [config.moesif.applicationId, config.stripe.apiKey, ...(secrets?.known() ?? []), ...(stripe?.knownSecrets() ?? [])];
  const log = createLogger({ level: config.logLevel, secrets: knownSecrets, write: options.write });
  secrets = new SecretSource({
    direct: { moesifApplicationId: config.moesif.applicationId, stripeApiKey: config.stripe.apiKey },
    parameters: { moesifApplicationId: config.moesif.applicationIdParameter, stripeApiKey: config.stripe.apiKeyParameter },
    reader: options.parameterReader ?? new SsmParameterReader(awsClientOptions(env, "SSM")),
    log,
    clock,
    retryAfterMs: options.secretsRetryAfterMs,
  });
  const source = secrets;

  const sinks: Sink[] = [];
  if (source.configured("moesifApplicationId")) {
    sinks.push(new MoesifSink({ baseUri: config.moesif.baseUri, applicationId: () => source.get("moesifApplicationId"), maxBatchEvents: config.batchSize }));
  } else {
    log.warn("sink_disabled", { sink: "moesif", reason: "neither MOESIF_APPLICATION_ID_PARAMETER nor MOESIF_APPLICATION_ID is set; items stay pending for Moesif" });
  }
  if (config.stripeBilling === "meters") {
    // Without a key the sink stays in the list: its items stay pending (and it says why) until a key is configured.
    stripe = new StripeSink({ apiKey: () => source.get("stripeApiKey"), apiBase: config.stripe.apiBase, api: config.stripe.api, maxBatchEvents: config.batchSize, clock });
    sinks.push(stripe);
    if (!source.configured("stripeApiKey")) log.error("sink_misconfigured", { sink: "stripe", reason: "STRIPE_BILLING=meters but neither STRIPE_API_KEY_PARAMETER nor STRIPE_API_KEY is set" });
  }

  const doc = createLedgerDocumentClient(env);
  const ledger = new LedgerStore(doc, config.ledgerTable);
  const holds: HoldSweepOptions | undefined = config.customersTable
    ? {
        store: createCustomerStoreFromEnv({ ...env, CUSTOMERS_TABLE: config.customersTable }, { timeoutMs: config.customersTimeoutMs }),
        ledger,
        staleAfterMs: config.holdStaleAfterMs,
        orphansBefore: options.orphanHoldsBefore,
      }
    : undefined;
  return new UsageForwarder({
    store: ledger,
    holds,
    sinks,
    log,
    clock,
    sinkTimeoutMs: config.sinkTimeoutMs,
    sweepGraceMs: config.sweepGraceMs,
    sweepLimit: options.sweepLimit,
    backoff: options.backoff,
    failedRetryBaseMs: options.failedRetryBaseMs,
    markConcurrency: options.markConcurrency,
    sweepTimeoutMs: options.sweepTimeoutMs,
    ledgerBackoff: options.ledgerBackoff,
    redact: (text) => new SecretRedactor(knownSecrets()).redactText(text),
  });
}

