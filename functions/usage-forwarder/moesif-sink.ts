/**
 * Moesif: the ledger items' `moesif_event` texts (each the same secret-free, size-capped event the direct send
 * builds, serialised once by the request path) joined into a JSON array, gzip-compressed, POSTed to
 * `/v1/events/batch` with the `X-Moesif-Application-Id` header (https://www.moesif.com/docs/api#log-events-in-batch).
 * At most 100 events and 1 MiB of uncompressed JSON per call (Moesif allows 50 MB per batch; the smaller bound
 * keeps a timed-out call cheap to repeat). Moesif de-duplicates on `transaction_id` ("used for dedup/idempotency":
 * Moesif/apidocs `source/includes/collector-api/_events-api.md`), so an event sent again (after a crash between
 * sending and marking) is not counted twice.
 */
import { gzipSync } from "node:zlib";
import { describeError } from "../ai-chat/logger";
import type { LedgerItem } from "../shared/ledger-schema";
import { MoesifTransport } from "../shared/moesif-transport";
import { outcomeOfStatus, splitBatches, type BatchOutcome, type Sink } from "./sink";

/** Moesif's documented batch limits. */
export const MOESIF_MAX_BATCH_EVENTS = 100;
export const MOESIF_MAX_BATCH_BYTES = 1024 * 1024;

export interface MoesifSinkOptions {
  /** Collector base, e.g. `https://api.moesif.net` or the local collector. */
  baseUri: string;
  /** The application id, or why it is unknown right now (it may come from SSM). */
  applicationId: () => Promise<{ value: string } | { reason: string }>;
  /** @default 100 */
  maxBatchEvents?: number;
  /** @default 1 MiB */
  maxBatchBytes?: number;
  /** @default 2 */
  concurrency?: number;
}

export class MoesifSink implements Sink {
  readonly name = "moesif" as const;
  readonly concurrency: number;
  private readonly transport: MoesifTransport;
  private readonly maxBatchEvents: number;
  private readonly maxBatchBytes: number;
  private applicationId?: string;

  constructor(private readonly options: MoesifSinkOptions) {
    this.transport = new MoesifTransport(options.baseUri, "metered-ai-api-usage-forwarder", 8);
    this.maxBatchEvents = Math.min(MOESIF_MAX_BATCH_EVENTS, Math.max(1, options.maxBatchEvents ?? MOESIF_MAX_BATCH_EVENTS));
    this.maxBatchBytes = Math.min(MOESIF_MAX_BATCH_BYTES, Math.max(1, options.maxBatchBytes ?? MOESIF_MAX_BATCH_BYTES));
    this.concurrency = Math.max(1, options.concurrency ?? 2);
  }

  async ready(): Promise<{ ok: true } | { ok: false; reason: string }> {
    const id = await this.options.applicationId();
    if ("reason" in id) return { ok: false, reason: id.reason };
    this.applicationId = id.value;
    return { ok: true };
  }

  /** The event must be a JSON object: one that is not would make Moesif refuse every batch it travels in. */
  check(item: LedgerItem): string | undefined {
    if (typeof item.moesif_event !== "string" || item.moesif_event.length === 0) return "the item has no moesif_event";
    try {
      const event = JSON.parse(item.moesif_event) as unknown;
      if (typeof event !== "object" || event === null || Array.isArray(event)) return "moesif_event is not a JSON object";
    } catch {
      return "moesif_event is not valid JSON";
    }
    return undefined;
  }

  batches(items: LedgerItem[]): LedgerItem[][] {
    // +1 per event for the comma (or bracket) joining it into the array.
    return splitBatches(items, this.maxBatchEvents, this.maxBatchBytes - 2, (item) => Buffer.byteLength(item.moesif_event) + 1);
  }

  async send(batch: LedgerItem[], timeoutMs: number): Promise<BatchOutcome> {
    const applicationId = this.applicationId;
    if (!applicationId) return { kind: "unavailable", reason: "the Moesif application id is not known yet" };
    try {
      // The texts are already JSON: joining them is the whole serialisation. gzip is synchronous: at most 1 MiB.
      const body = gzipSync(`[${batch.map((item) => item.moesif_event).join(",")}]`);
      const { status, retryAfter } = await this.transport.post("/v1/events/batch", body, applicationId, timeoutMs);
      return outcomeOfStatus(status, `Moesif answered HTTP ${status}`, retryAfter);
    } catch (err) {
      const { name, message, code } = describeError(err);
      return { kind: "unavailable", reason: `Moesif unreachable: ${code ?? name}: ${message}` };
    }
  }
}

