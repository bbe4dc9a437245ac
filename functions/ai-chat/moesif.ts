import http from "node:http";
import https from "node:https";
import { promisify } from "node:util";
import { gzip as gzipCallback } from "node:zlib";
import axios, { type AxiosInstance } from "axios";
import { isRecord } from "./config";
import { describeError, type Logger } from "./logger";
import { sanitizeHeaders, type UsageMeter, type UsageRecord } from "./metering";

const gzip = promisify(gzipCallback);

/** Moesif's collector event (https://www.moesif.com/docs/api#create-an-event). */
export interface MoesifEvent {
  request: {
    time: string;
    uri: string;
    verb: string;
    headers: Record<string, string>;
    ip_address?: string;
    body?: unknown;
    transfer_encoding?: "json";
  };
  response: { time: string; status: number; headers: Record<string, string>; body?: unknown; transfer_encoding?: "json" };
  transaction_id: string;
  session_token?: string;
  user_id?: string;
  company_id?: string;
  direction: "Incoming";
  weight: 1;
  metadata: {
    model: string | null;
    prompt_tokens: number;
    completion_tokens: number;
    total_tokens: number;
    plan: string | null;
    upstream_status: number | null;
    upstream_ms: number | null;
    usage_estimated: boolean;
    request_id: string;
    route: string;
  };
}

/**
 * Builds the Moesif event for one record. Without `logBodies` the bodies keep only what billing and support need
 * (`id`, `model`, `usage`, the error object, scalar request options) and never the prompt or completion text.
 * The session token is the API key *id*; the key itself never appears.
 */
export function toMoesifEvent(record: UsageRecord, logBodies: boolean): MoesifEvent {
  const requestBody = logBodies ? record.requestBody : scalarFields(record.requestBody);
  const responseBody = logBodies ? record.responseBody : billingFields(record.responseBody);
  return {
    request: {
      time: new Date(record.startedAt).toISOString(),
      uri: record.uri,
      verb: record.method,
      headers: sanitizeHeaders(record.requestHeaders),
      ...(record.sourceIp ? { ip_address: record.sourceIp } : {}),
      ...(requestBody !== undefined ? { body: requestBody, transfer_encoding: "json" as const } : {}),
    },
    response: {
      time: new Date(record.finishedAt).toISOString(),
      status: record.status,
      headers: sanitizeHeaders(record.responseHeaders),
      ...(responseBody !== undefined ? { body: responseBody, transfer_encoding: "json" as const } : {}),
    },
    transaction_id: record.transactionId,
    ...(record.apiKeyId ? { session_token: record.apiKeyId } : {}),
    ...(record.customer ? { user_id: record.customer.customerId } : {}),
    ...(record.customer?.stripeCustomerId ? { company_id: record.customer.stripeCustomerId } : {}),
    direction: "Incoming",
    weight: 1,
    metadata: {
      model: record.model ?? null,
      prompt_tokens: record.usage.prompt_tokens,
      completion_tokens: record.usage.completion_tokens,
      total_tokens: record.usage.total_tokens,
      plan: record.customer?.plan ?? null,
      upstream_status: record.upstreamStatus ?? null,
      upstream_ms: record.upstreamMs ?? null,
      usage_estimated: record.usageEstimated,
      request_id: record.requestId,
      route: record.route,
    },
  };
}

/** Top-level string/number/boolean fields of a request (model, temperature, max_tokens…): no message text. */
function scalarFields(body: unknown): Record<string, unknown> | undefined {
  if (!isRecord(body)) return undefined;
  const kept: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(body)) {
    if (key === "messages") continue;
    if (typeof value === "number" || typeof value === "boolean" || (typeof value === "string" && value.length <= 256)) kept[key] = value;
  }
  return kept;
}

/** `id`, `object`, `model`, `usage` of a completion, or the `error` of an error body. */
function billingFields(body: unknown): Record<string, unknown> | undefined {
  if (!isRecord(body)) return undefined;
  if (body.error !== undefined) return { error: body.error };
  const kept: Record<string, unknown> = {};
  for (const key of ["id", "object", "model", "usage", "system_fingerprint"]) if (body[key] !== undefined) kept[key] = body[key];
  return kept;
}

export interface MoesifMeterOptions {
  applicationId: string;
  /** Collector base, e.g. `https://api.moesif.net` or a local collector. */
  baseUri: string;
  logBodies: boolean;
  /** Upper bound on the time one `record` call may add to a request. */
  timeoutMs: number;
  log: Logger;
  /** Events kept in memory for re-sending while the collector is failing. */
  maxPending?: number;
  /** First pause after a failed send; doubles per failure up to `maxBackoffMs`. */
  backoffMs?: number;
  maxBackoffMs?: number;
  clock?: () => number;
  http?: AxiosInstance;
}

/**
 * Sends Moesif's documented wire format (gzip JSON to `/v1/events` or `/v1/events/batch`) with axios.
 *
 * Why awaited: Lambda freezes the process once the handler returns, so a fire-and-forget send may never leave the
 * machine. Each request therefore waits for its event, but never longer than `timeoutMs`.
 *
 * What happens to an event that could not be sent: it is written to the function's log as a `metering_deferred`
 * line holding the whole (secret-free) event, so it can be replayed from CloudWatch, and it stays in memory to be
 * re-sent with the next request's batch (Moesif de-duplicates on `transaction_id`, so a replay is never counted
 * twice). After a failure the meter stops trying for a back-off period, so a collector that hangs costs at most one
 * timeout per period instead of one per request. Memory holds at most `maxPending` events; the oldest are dropped
 * first (they are still in the log). A durable ledger replaces this in a later issue.
 */
export class MoesifMeter implements UsageMeter {
  private pending: MoesifEvent[] = [];
  private failures = 0;
  private nextAttemptAt = 0;
  private readonly http: AxiosInstance;
  private readonly clock: () => number;

  constructor(private readonly options: MoesifMeterOptions) {
    this.clock = options.clock ?? Date.now;
    this.http =
      options.http ??
      axios.create({
        httpAgent: new http.Agent({ keepAlive: true, maxSockets: 16 }),
        httpsAgent: new https.Agent({ keepAlive: true, maxSockets: 16 }),
        maxRedirects: 0,
        proxy: false,
        validateStatus: () => true,
        responseType: "text",
        transformResponse: [(data: unknown) => data],
      });
  }

  async record(record: UsageRecord): Promise<void> {
    let event: MoesifEvent;
    try {
      event = toMoesifEvent(record, this.options.logBodies);
    } catch (err) {
      this.options.log.error("metering_event_build_failed", { request_id: record.requestId, error: describeError(err) });
      return;
    }
    if (this.clock() < this.nextAttemptAt) {
      this.defer([event], "collector backing off after a failure");
      return;
    }
    const batch = [...this.pending, event];
    this.pending = [];
    const failure = await this.send(batch);
    if (!failure) {
      if (this.failures > 0) this.options.log.info("metering_recovered", { sent: batch.length });
      this.failures = 0;
      return;
    }
    this.failures += 1;
    const backoff = Math.min((this.options.backoffMs ?? 2000) * 2 ** (this.failures - 1), this.options.maxBackoffMs ?? 60_000);
    this.nextAttemptAt = this.clock() + backoff;
    // Earlier events were logged when they were first deferred; only the new one needs its log line.
    this.pending = batch.slice(0, -1);
    this.defer([event], failure);
  }

  private defer(events: MoesifEvent[], reason: string): void {
    for (const event of events) this.options.log.warn("metering_deferred", { reason, event });
    this.pending.push(...events);
    const max = this.options.maxPending ?? 1000;
    if (this.pending.length > max) {
      const dropped = this.pending.splice(0, this.pending.length - max);
      this.options.log.error("metering_dropped_from_memory", {
        count: dropped.length,
        transaction_ids: dropped.map((e) => e.transaction_id),
      });
    }
  }

  /** Returns undefined on success, or why the send failed. Never throws. */
  private async send(events: MoesifEvent[]): Promise<string | undefined> {
    const single = events.length === 1;
    const url = `${this.options.baseUri}/v1/events${single ? "" : "/batch"}`;
    try {
      const body = await gzip(Buffer.from(JSON.stringify(single ? events[0] : events)));
      const response = await this.http.post(url, body, {
        headers: {
          "Content-Type": "application/json; charset=utf-8",
          "Content-Encoding": "gzip",
          "X-Moesif-Application-Id": this.options.applicationId,
          "User-Agent": "metered-ai-api",
        },
        timeout: this.options.timeoutMs,
        // axios' timeout is an idle timeout; the signal bounds the whole exchange.
        signal: AbortSignal.timeout(this.options.timeoutMs),
      });
      if (response.status >= 200 && response.status < 300) return undefined;
      return `collector answered HTTP ${response.status}`;
    } catch (err) {
      const { name, message, code } = describeError(err);
      return `collector unreachable: ${code ?? name}: ${message}`;
    }
  }
}
