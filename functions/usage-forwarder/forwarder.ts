/**
 * The usage forwarder's core: delivers ledger items to each billing sink that owes them and records the outcome
 * on each item. One module for both triggers: `deliver(items)` for items handed over by the DynamoDB stream, and
 * `sweep()` for the backlog (the sparse `undelivered` index), run on a schedule.
 *
 * Exactly once = at-least-once delivery + the sinks' idempotency keys (Moesif `transaction_id`, Stripe
 * `identifier`) + delivery marks. An item is only marked after its sink acknowledged it; a crash or a failed mark in
 * between leaves it pending, to be sent again and de-duplicated by the sink.
 *
 * Per sink and batch:
 * - acknowledged: each item is marked delivered, once every sink has answered, in one write for all the sinks
 *   that took it (and leaves the backlog once no sink owes it);
 * - sink unavailable (unreachable, timeout, 5xx, 408, 429, bad credentials): no item is written, the rest of this
 *   run skips the sink, and the sink is backed off (1 s doubling to 30 s, or the sink's `Retry-After` up to 60 s);
 * - refused (another 4xx): the batch is bisected until the refused item(s) are alone; those become `failed`
 *   (attempts + 1, the reason, `next_at` = now + min(2^attempts minutes, 60 minutes)) and everything else is
 *   delivered. A `failed` item is never dropped: it stays in the backlog and is tried again when due.
 *
 * Nothing here throws for a sink or a DynamoDB failure: each is logged and leaves the item pending.
 */
import { SecretRedactor } from "../shared/secret-redactor";
import { owesDelivery, SINKS, type LedgerItem, type SinkName } from "../shared/ledger-schema";
import { createLedgerDocumentClient, LedgerStore } from "../shared/ledger-store";
import { createLogger, describeError, type Logger } from "../ai-chat/logger";
import { SsmParameterReader, type ParameterReader } from "../ai-chat/secrets";
import { loadForwarderConfig } from "./config";
import { MoesifSink } from "./moesif-sink";
import { SecretSource } from "./secrets";
import type { BatchOutcome, Sink } from "./sink";
import { StripeSink } from "./stripe-sink";

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
}

export interface RunOptions {
  /** Epoch ms by which the run must be over (a Lambda's deadline less a margin): no send starts that could outlast it. */
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

export interface UsageForwarderOptions {
  store: Pick<LedgerStore, "backlog" | "markDelivered" | "markFailed" | "clearBacklog">;
  /** The sinks in use. A sink not listed is never sent to; items owing it stay pending and are counted so. */
  sinks: Sink[];
  log: Logger;
  clock?: () => number;
  /** Bound on one sink call. @default 10000 */
  sinkTimeoutMs?: number;
  /** The sweep leaves items younger than this to the stream trigger. @default 60000 */
  sweepGraceMs?: number;
  /** Items read from the backlog per sweep round. @default 1000 */
  sweepLimit?: number;
  /** Backlog rounds per sweep at most. @default 20 */
  maxSweepRounds?: number;
  backoff?: BackoffOptions;
  /** Base of a refused item's retry schedule: 2^attempts times this, at most `failedRetryMaxMs`. @default 60000 */
  failedRetryBaseMs?: number;
  /** @default 3600000 */
  failedRetryMaxMs?: number;
  /** Ledger writes in flight at once per batch. @default 16 */
  markConcurrency?: number;
  /** Replaces secrets in the reasons written to items; logs are redacted by the logger itself. */
  redact?: (text: string) => string;
}

/** Records that `sink` acknowledged `item` (its mark is written once every sink has answered). */
type Acknowledge = (item: LedgerItem, sink: SinkName) => void;

interface SinkHealth {
  failures: number;
  nextAttemptAt: number;
  lastReason?: string;
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

/** Runs `work` over `items`, at most `limit` at a time. */
async function eachLimited<T>(items: T[], limit: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) await work(items[next++]);
  });
  await Promise.all(workers);
}

export class UsageForwarder {
  private readonly clock: () => number;
  private readonly health = new Map<SinkName, SinkHealth>();
  private running?: Promise<DeliveryReport>;
  /** Sink-level failures seen so far (a sweep stops its rounds at the first). */
  private outages = 0;

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
    const report = emptyReport(items.length);
    // One entry per transaction id: a stream batch can carry an item twice.
    const unique = [...new Map(items.map((item) => [item.transaction_id, item])).values()];
    const active = new Set(this.options.sinks.map((s) => s.name));
    for (const sink of SINKS) if (!active.has(sink)) report.pending[sink] += unique.filter((i) => owes(i, sink)).length;
    // Marks are written once every sink has answered: an item two sinks took in this run gets one write, not three.
    const acknowledged = new Map<string, SinkName[]>();
    const acknowledge = (item: LedgerItem, sink: SinkName) => acknowledged.set(item.transaction_id, [...(acknowledged.get(item.transaction_id) ?? []), sink]);
    await Promise.all(this.options.sinks.map((sink) => this.deliverTo(sink, unique, report, options.deadline, acknowledge)));
    const at = this.clock();
    await eachLimited([...acknowledged], this.options.markConcurrency ?? 16, ([id, sinks]) => this.markDelivered(id, sinks, at, report));
    // Items in the backlog that owe no sink anything (an interrupted mark left them there): take them out.
    const settled = unique.filter((item) => item.undelivered !== undefined && !owesDelivery(item));
    await eachLimited(settled, this.options.markConcurrency ?? 16, async (item) => {
      try {
        await this.options.store.clearBacklog(item.transaction_id);
      } catch (err) {
        this.options.log.warn("ledger_backlog_clear_failed", { transaction_id: item.transaction_id, error: describeError(err) });
      }
    });
    return report;
  }

  /**
   * Delivers the backlog: reads the oldest due items (older than the sweep grace) and delivers them, round after
   * round while rounds make progress, until the backlog is empty, every sink is backing off, or `deadline` nears.
   * A sweep called while one runs returns the running one's promise (sweeps never overlap). Never throws.
   */
  sweep(options: RunOptions = {}): Promise<DeliveryReport> {
    this.running ??= this.runSweep(options).finally(() => (this.running = undefined));
    return this.running;
  }

  private async runSweep(options: RunOptions): Promise<DeliveryReport> {
    const total = emptyReport();
    const limit = this.options.sweepLimit ?? 1000;
    const rounds = this.options.maxSweepRounds ?? 20;
    for (let round = 0; round < rounds; round++) {
      const now = this.clock();
      if (options.deadline !== undefined && options.deadline - now < MIN_SEND_MS) break;
      // Sinks backing off are not asked about: a long outage costs no backlog reads beyond one per back-off.
      const sinks = this.options.sinks.filter((sink) => now >= (this.health.get(sink.name)?.nextAttemptAt ?? 0)).map((s) => s.name);
      if (sinks.length === 0) break;
      let items: LedgerItem[];
      try {
        items = await this.options.store.backlog({ now, graceMs: this.options.sweepGraceMs ?? 60_000, limit, sinks });
      } catch (err) {
        this.options.log.error("ledger_backlog_read_failed", { error: describeError(err) });
        break;
      }
      if (items.length === 0) break;
      const outagesBefore = this.outages;
      const report = await this.deliver(items, options);
      addReport(total, report);
      const progress = SINKS.reduce((n, s) => n + report.delivered[s] + report.failed[s], 0);
      // Another round while this one got somewhere and no sink failed: a busy shard may hold more than it gave
      // this time. A sink that failed waits for the next sweep, so one sweep reports each pending item once.
      if (progress === 0 || this.outages !== outagesBefore) break;
    }
    if (total.considered > 0) this.options.log.info("forwarder_sweep", { ...total });
    return total;
  }

  private backingOff(sink: SinkName, now: number): boolean {
    return now < (this.health.get(sink)?.nextAttemptAt ?? 0);
  }

  private async deliverTo(sink: Sink, items: LedgerItem[], report: DeliveryReport, deadline: number | undefined, acknowledge: Acknowledge): Promise<void> {
    const name = sink.name;
    const now = this.clock();
    const owed = items.filter((item) => owes(item, name));
    const dueNow = owed.filter((item) => due(item, name, now));
    report.pending[name] += owed.length - dueNow.length;
    if (dueNow.length === 0) return;
    if (this.backingOff(name, now)) {
      report.pending[name] += dueNow.length;
      return;
    }
    const ready = await sink.ready();
    if (!ready.ok) {
      this.sinkFailed(name, { kind: "unavailable", reason: ready.reason });
      report.pending[name] += dueNow.length;
      return;
    }
    const sendable: LedgerItem[] = [];
    const rejected: Array<{ item: LedgerItem; reason: string }> = [];
    for (const item of dueNow) {
      const problem = sink.check(item, now);
      if (problem) rejected.push({ item, reason: problem });
      else sendable.push(item);
    }
    await eachLimited(rejected, this.options.markConcurrency ?? 16, ({ item, reason }) => this.markFailed(sink.name, item, reason, report));

    const batches = sink.batches(sendable);
    // Once the sink is found unavailable, the batches not yet started stay pending: one outage, one failure.
    const run = { stopped: false };
    let next = 0;
    const worker = async () => {
      while (next < batches.length) {
        const batch = batches[next++];
        if (run.stopped) {
          report.pending[name] += batch.length;
          continue;
        }
        await this.sendBatch(sink, batch, report, deadline, run, acknowledge);
      }
    };
    await Promise.all(Array.from({ length: Math.min(sink.concurrency, batches.length) }, worker));
  }

  /** Sends one batch; on a refusal, bisects it. Leaves every item it did not get acknowledged or refused pending. */
  private async sendBatch(sink: Sink, batch: LedgerItem[], report: DeliveryReport, deadline: number | undefined, run: { stopped: boolean }, acknowledge: Acknowledge): Promise<void> {
    const name = sink.name;
    const budget = Math.min(this.options.sinkTimeoutMs ?? 10_000, deadline === undefined ? Number.POSITIVE_INFINITY : deadline - this.clock());
    if (run.stopped || budget < MIN_SEND_MS) {
      run.stopped = true;
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
      for (const item of batch) acknowledge(item, name);
      return;
    }
    if (outcome.kind === "unavailable") {
      run.stopped = true;
      this.sinkFailed(name, outcome);
      report.pending[name] += batch.length;
      return;
    }
    // Refused: the sink is up (it read the batch), so this is no outage.
    this.sinkRecovered(name);
    if (batch.length === 1) {
      await this.markFailed(name, batch[0], outcome.reason, report);
      return;
    }
    const half = Math.ceil(batch.length / 2);
    await this.sendBatch(sink, batch.slice(0, half), report, deadline, run, acknowledge);
    await this.sendBatch(sink, batch.slice(half), report, deadline, run, acknowledge);
  }

  private async markDelivered(id: string, sinks: SinkName[], at: number, report: DeliveryReport): Promise<void> {
    try {
      await this.options.store.markDelivered(id, sinks, at);
      for (const sink of sinks) report.delivered[sink] += 1;
    } catch (err) {
      // The sinks have it, the ledger does not know: it stays pending and is sent again; the sinks de-duplicate.
      for (const sink of sinks) report.pending[sink] += 1;
      this.options.log.error("ledger_mark_failed", { transaction_id: id, sinks, state: "delivered", error: describeError(err) });
    }
  }

  private async markFailed(sink: SinkName, item: LedgerItem, reason: string, report: DeliveryReport): Promise<void> {
    const attempts = (item[`${sink}_attempts`] ?? 0) + 1;
    const delay = Math.min((this.options.failedRetryBaseMs ?? 60_000) * 2 ** attempts, this.options.failedRetryMaxMs ?? 3_600_000);
    const safeReason = (this.options.redact ?? ((t: string) => t))(reason);
    const nextAt = this.clock() + delay;
    try {
      await this.options.store.markFailed(item.transaction_id, sink, safeReason, attempts, nextAt);
      report.failed[sink] += 1;
      this.options.log.warn("delivery_refused", { sink, transaction_id: item.transaction_id, attempts, reason: safeReason, next_attempt_at: new Date(nextAt).toISOString() });
    } catch (err) {
      report.pending[sink] += 1;
      this.options.log.error("ledger_mark_failed", { transaction_id: item.transaction_id, sink, state: "failed", error: describeError(err) });
    }
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
}

/**
 * Builds the forwarder from a function's environment (the contract in the README: `LEDGER_TABLE`,
 * `MOESIF_BASE_URI`, `MOESIF_APPLICATION_ID[_PARAMETER]`, `STRIPE_BILLING`, `STRIPE_API_KEY[_PARAMETER]`,
 * `STRIPE_API_BASE`, `STRIPE_METER_API`, `FORWARDER_SWEEP_GRACE_MS`, `FORWARDER_BATCH_SIZE`, `SINK_TIMEOUT_MS`,
 * `LOG_LEVEL`, `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_SSM`). Throws `ForwarderConfigError` when the
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
    reader: options.parameterReader ?? new SsmParameterReader(ssmOptions(env)),
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
  return new UsageForwarder({
    store: new LedgerStore(doc, config.ledgerTable),
    sinks,
    log,
    clock,
    sinkTimeoutMs: config.sinkTimeoutMs,
    sweepGraceMs: config.sweepGraceMs,
    sweepLimit: options.sweepLimit,
    backoff: options.backoff,
    failedRetryBaseMs: options.failedRetryBaseMs,
    markConcurrency: options.markConcurrency,
    redact: (text) => new SecretRedactor(knownSecrets()).redactText(text),
  });
}

/** Where the SDK finds SSM (as ai-chat's): the region, an endpoint override and the credentials Lambda sets. */
function ssmOptions(env: NodeJS.ProcessEnv) {
  const { AWS_ACCESS_KEY_ID: accessKeyId, AWS_SECRET_ACCESS_KEY: secretAccessKey, AWS_SESSION_TOKEN: sessionToken } = env;
  return {
    region: env.AWS_REGION || env.AWS_DEFAULT_REGION || undefined,
    endpoint: env.AWS_ENDPOINT_URL_SSM || env.AWS_ENDPOINT_URL || undefined,
    credentials: accessKeyId && secretAccessKey ? { accessKeyId, secretAccessKey, ...(sessionToken ? { sessionToken } : {}) } : undefined,
  };
}
