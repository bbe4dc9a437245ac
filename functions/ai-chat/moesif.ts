import { gzipSync } from "node:zlib";
import { BoundedBacklog } from "../shared/bounded-backlog";
import { MoesifTransport } from "../shared/moesif-transport";
import { isRecord } from "./config";
import { describeError, type Logger } from "./logger";
import { sanitizeHeaders, type UsageMeter, type UsageRecord } from "./metering";
import type { TokenUsage } from "./usage";

/** Largest serialised event (UTF-8 bytes). Bigger bodies are replaced by a `TruncatedBody` marker, never dropped. */
export const MAX_EVENT_BYTES = 64 * 1024;
/** Deepest body nesting kept. Deeper bodies are truncated, so no later `JSON.stringify` of the event can overflow. */
export const MAX_BODY_DEPTH = 64;
/** Characters of a truncated body's serialisation kept as its preview. */
const PREVIEW_CHARS = 1024;
/** Longest string kept in `metadata` and in billing fields copied from bodies (ids, model names). */
const MAX_FIELD_CHARS = 256;
const MAX_URI_CHARS = 2048;
const MAX_ERROR_MESSAGE_CHARS = 1024;

/** The usage object Moesif sees, in OpenAI's shape, built from the validated counts only. */
export interface MeteredUsage {
  prompt_tokens: number;
  completion_tokens: number;
  /** Always `prompt_tokens + completion_tokens`. */
  total_tokens: number;
  prompt_tokens_details?: { cached_tokens: number };
  completion_tokens_details?: { reasoning_tokens: number };
}

/** What replaces a body that is too big or too deep to send: the event is still sent, with this in its place. */
export interface TruncatedBody {
  _truncated: true;
  _reason: string;
  /** Size of the body's JSON, when it could be serialised at all. */
  _original_bytes: number | null;
  _preview?: string;
}

export interface MoesifMetadata {
  model: string | null;
  /** Validated (or estimated) counts from the usage record; never the upstream's raw `usage`. */
  prompt_tokens: number;
  completion_tokens: number;
  /** `prompt_tokens + completion_tokens`, recomputed: the field a token meter should sum. */
  total_tokens: number;
  cached_tokens: number;
  reasoning_tokens: number;
  usage_estimated: boolean;
  /** A 2xx answer that carries usage (tokens or a cost): the filter a billing meter should use. */
  billed: boolean;
  /** What the request costs in `currency`, in integer micro-units (1 USD = 1,000,000); null on unpriced plans. */
  cost_micros: number | null;
  currency: string | null;
  stage: string | null;
  plan: string | null;
  upstream_status: number | null;
  upstream_ms: number | null;
  request_id: string;
  route: string;
  /** The answer was an SSE stream. */
  streamed: boolean;
  /** Code of the error event that ended a stream early (`upstream_stream_failed`, `upstream_idle_timeout`…). */
  stream_error: string | null;
  /** The caller disconnected mid-stream; the tokens received until then are billed (estimated). */
  client_disconnected: boolean;
  /**
   * `prepaid` (already charged from the customer's balance: a billing meter must not charge it again) or
   * `postpaid`; null when the customer is unknown.
   */
  billing_mode: "prepaid" | "postpaid" | null;
  /** Prepaid: micro-units taken from the balance for this request (null while its settlement is pending). */
  charged_micros: number | null;
  /** Prepaid: the balance right after this request's charge. */
  balance_after_micros: number | null;
}

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
  metadata: MoesifMetadata;
}

/** A non-negative safe integer, or 0: what a meter may sum. */
function count(value: unknown): number {
  return typeof value === "number" && Number.isSafeInteger(value) && value > 0 ? value : 0;
}

function clip(text: string, max: number): string {
  return text.length > max ? text.slice(0, max) : text;
}

/** The record's usage as Moesif sees it, re-checked here so that no meter can ever sum a negative or a string. */
export function meteredUsage(usage: TokenUsage): MeteredUsage {
  const prompt = count(usage.prompt_tokens);
  const completion = count(usage.completion_tokens);
  return {
    prompt_tokens: prompt,
    completion_tokens: completion,
    total_tokens: prompt + completion,
    ...(usage.cached_tokens !== undefined ? { prompt_tokens_details: { cached_tokens: Math.min(count(usage.cached_tokens), prompt) } } : {}),
    ...(usage.reasoning_tokens !== undefined
      ? { completion_tokens_details: { reasoning_tokens: Math.min(count(usage.reasoning_tokens), completion) } }
      : {}),
  };
}

/**
 * Builds the Moesif event for one record. Without `logBodies` the bodies keep only what billing and support need
 * (`id`, `model`, `usage`, the error, scalar request options) and never the prompt or completion text. Either way
 * `response.body.usage` is the validated usage, never the upstream's own object. The session token is the API key
 * *id*; the key itself never appears. Headers pass an allow-list (`sanitizeHeaders`).
 */
export function toMoesifEvent(record: UsageRecord, logBodies: boolean): MoesifEvent {
  const usage = meteredUsage(record.usage);
  const requestBody = logBodies ? record.requestBody : scalarFields(record.requestBody);
  const responseBody = logBodies ? withUsage(record.responseBody, usage) : billingFields(record.responseBody, usage);
  const costMicros = record.cost && Number.isSafeInteger(record.cost.micros) && record.cost.micros >= 0 ? record.cost.micros : null;
  const success = record.status >= 200 && record.status < 300;
  return {
    request: {
      time: new Date(record.startedAt).toISOString(),
      uri: clip(record.uri, MAX_URI_CHARS),
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
      model: typeof record.model === "string" ? clip(record.model, MAX_FIELD_CHARS) : null,
      prompt_tokens: usage.prompt_tokens,
      completion_tokens: usage.completion_tokens,
      total_tokens: usage.total_tokens,
      cached_tokens: usage.prompt_tokens_details?.cached_tokens ?? 0,
      reasoning_tokens: usage.completion_tokens_details?.reasoning_tokens ?? 0,
      usage_estimated: record.usageEstimated === true,
      billed: success && (record.billed ?? (usage.total_tokens > 0 || (costMicros ?? 0) > 0)),
      cost_micros: costMicros,
      currency: costMicros !== null && typeof record.cost?.currency === "string" ? clip(record.cost.currency, MAX_FIELD_CHARS) : null,
      stage: typeof record.stage === "string" ? clip(record.stage, MAX_FIELD_CHARS) : null,
      plan: record.customer?.plan ?? null,
      upstream_status: record.upstreamStatus ?? null,
      upstream_ms: record.upstreamMs ?? null,
      request_id: record.requestId,
      route: record.route,
      streamed: record.streamed === true,
      stream_error: typeof record.streamError === "string" ? clip(record.streamError, MAX_FIELD_CHARS) : null,
      client_disconnected: record.clientDisconnected === true,
      billing_mode: record.billing?.mode ?? null,
      charged_micros: safeMicros(record.billing?.chargedMicros),
      balance_after_micros: safeMicros(record.billing?.balanceAfterMicros),
    },
  };
}

/** A non-negative safe integer amount, or null: what a Moesif metric may sum. */
function safeMicros(value: number | undefined): number | null {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0 ? value : null;
}

/**
 * Request fields that carry the caller's prompt (chat's `messages`; the Responses API's `input` and `instructions`,
 * embeddings' `input`; a legacy completion's `prompt`): a plain string there is prompt text, not an option.
 */
const PROMPT_FIELDS: ReadonlySet<string> = new Set(["messages", "input", "instructions", "prompt"]);

/**
 * Top-level string/number/boolean fields of a request (model, temperature, max_tokens…): never prompt text. Stops
 * collecting once the kept text passes the event size cap (4,000 long fields must not make a megabyte event).
 */
export function scalarFields(body: unknown): Record<string, unknown> | undefined {
  if (!isRecord(body)) return undefined;
  const kept: Record<string, unknown> = {};
  let size = 0;
  for (const key of Object.keys(body)) {
    if (PROMPT_FIELDS.has(key)) continue;
    const value = body[key];
    if (typeof value === "number" || typeof value === "boolean" || (typeof value === "string" && value.length <= MAX_FIELD_CHARS)) {
      size += key.length + (typeof value === "string" ? value.length : 8);
      if (size > MAX_EVENT_BYTES) break;
      kept[key] = value;
    }
  }
  return kept;
}

/** `id`, `object`, `model`, `system_fingerprint` and the validated `usage` of a completion, or the `error` of an error body. */
function billingFields(body: unknown, usage: MeteredUsage): Record<string, unknown> | undefined {
  if (!isRecord(body)) return undefined;
  if (body.error !== undefined) return { error: errorFields(body.error) };
  const kept: Record<string, unknown> = {};
  for (const key of ["id", "object", "model", "system_fingerprint"]) {
    const value = body[key];
    if (typeof value === "string") kept[key] = clip(value, MAX_FIELD_CHARS);
  }
  if (carriesUsage(body)) kept.usage = usage;
  return kept;
}

/** The scalar fields of an OpenAI error object (an upstream may put anything there; only these are kept). */
function errorFields(error: unknown): unknown {
  if (typeof error === "string") return clip(error, MAX_ERROR_MESSAGE_CHARS);
  if (!isRecord(error)) return null;
  const kept: Record<string, unknown> = {};
  for (const key of ["message", "type", "param", "code"]) {
    const value = error[key];
    if (typeof value === "string") kept[key] = clip(value, key === "message" ? MAX_ERROR_MESSAGE_CHARS : MAX_FIELD_CHARS);
    else if (typeof value === "number" || typeof value === "boolean" || value === null) kept[key] = value;
  }
  return kept;
}

/** A completion (it has choices, or reported usage): its `usage` is what the meter sums. */
function carriesUsage(body: Record<string, unknown>): boolean {
  return body.usage !== undefined || Array.isArray(body.choices);
}

/** The whole body with `usage` replaced by the validated one (a shallow copy; the caller's object is untouched). */
function withUsage(body: unknown, usage: MeteredUsage): unknown {
  if (!isRecord(body) || body.error !== undefined || !carriesUsage(body)) return body;
  return { ...body, usage };
}

/** One event, serialised once, exactly as it will travel (alone, or joined into a batch). */
export interface SerializedEvent {
  transactionId: string;
  json: string;
  /** UTF-8 length of `json`. */
  bytes: number;
  /** How many batches holding this event the collector refused outright (4xx other than 408/429). */
  refusals?: number;
}

/**
 * A batch the collector refuses outright (a 4xx other than 408 and 429) is not an outage: retrying it unchanged can
 * never succeed, and re-sending it ahead of every new event would block metering for everyone. So each event of a
 * refused batch counts the refusal, and one refused this many times (alone, or in batches that all failed) is given
 * up with an error line naming it; its full event is in its `metering_deferred` line for replay.
 */
const MAX_REFUSALS = 3;

export interface PreparedEvent extends SerializedEvent {
  /** The event as sent: bodies that did not fit replaced by their `TruncatedBody` marker. Safe to stringify again. */
  event: MoesifEvent;
  /** Which bodies were truncated, and why. */
  truncated: Array<{ body: "request" | "response"; reason: string; originalBytes: number | null }>;
}

interface BodyPiece {
  value: unknown;
  text: string;
  bytes: number;
}

/** A body's JSON, or why it has none. `JSON.stringify` throws RangeError on very deep nesting; that is caught here. */
function serializeBody(value: unknown): BodyPiece | { error: string } | undefined {
  if (value === undefined) return undefined;
  let text: string | undefined;
  try {
    text = JSON.stringify(value);
  } catch (err) {
    return { error: `not serialisable (${err instanceof RangeError ? "nested too deep or too large" : describeError(err).name})` };
  }
  if (text === undefined) return undefined;
  return { value, text, bytes: Buffer.byteLength(text) };
}

function truncatedPiece(reason: string, original?: BodyPiece): BodyPiece {
  const marker: TruncatedBody = {
    _truncated: true,
    _reason: reason,
    _original_bytes: original ? original.bytes : null,
    ...(original ? { _preview: original.text.slice(0, PREVIEW_CHARS) } : {}),
  };
  const text = JSON.stringify(marker);
  return { value: marker, text, bytes: Buffer.byteLength(text) };
}

/** True when JSON text nests arrays/objects deeper than `max`. Linear, no recursion. */
export function nestsDeeperThan(text: string, max: number): boolean {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 92) i++; // backslash: skip the escaped character
      else if (c === 34) inString = false;
    } else if (c === 34) inString = true;
    else if (c === 91 || c === 123) {
      if (++depth > max) return true;
    } else if (c === 93 || c === 125) depth--;
  }
  return false;
}

/** `{"a":1}` + body → `{"a":1,"body":…,"transfer_encoding":"json"}`. */
function withBodyJson(headJson: string, body: BodyPiece | undefined): string {
  if (!body) return headJson;
  return `${headJson.slice(0, -1)}${headJson.length > 2 ? "," : ""}"body":${body.text},"transfer_encoding":"json"}`;
}

/**
 * Serialises an event once, within `maxBytes`: each body is serialised on its own (a body that cannot be, such as
 * 20,000 nested arrays, never takes the event or its neighbours down with it); when the event would be larger than
 * `maxBytes` the larger body, then the other, is replaced by a `TruncatedBody` marker. The rest of the event is
 * small by construction (allow-listed headers, clipped strings).
 */
export function prepareEvent(event: MoesifEvent, maxBytes = MAX_EVENT_BYTES): PreparedEvent {
  const { body: requestBody, transfer_encoding: _requestEncoding, ...requestHead } = event.request;
  const { body: responseBody, transfer_encoding: _responseEncoding, ...responseHead } = event.response;
  const { request: _request, response: _response, ...rest } = event;
  const requestHeadJson = JSON.stringify(requestHead);
  const responseHeadJson = JSON.stringify(responseHead);
  const restJson = JSON.stringify(rest);
  // 96 bytes cover the keys and separators added around the pieces below.
  const fixed = Buffer.byteLength(requestHeadJson) + Buffer.byteLength(responseHeadJson) + Buffer.byteLength(restJson) + 96;

  const truncated: PreparedEvent["truncated"] = [];
  const pieces = { request: serializeBody(requestBody), response: serializeBody(responseBody) };
  const kept: { request?: BodyPiece; response?: BodyPiece } = {};
  for (const name of ["request", "response"] as const) {
    const piece = pieces[name];
    if (piece && "error" in piece) {
      kept[name] = truncatedPiece(piece.error);
      truncated.push({ body: name, reason: piece.error, originalBytes: null });
    } else kept[name] = piece;
  }
  const total = () => fixed + (kept.request?.bytes ?? 0) + (kept.response?.bytes ?? 0);
  while (total() > maxBytes) {
    const candidates = (["request", "response"] as const).filter((name) => kept[name] && !isMarker(kept[name]!));
    if (candidates.length === 0) break;
    const largest = candidates.reduce((a, b) => (kept[a]!.bytes >= kept[b]!.bytes ? a : b));
    const reason = `the event would exceed ${maxBytes} bytes`;
    truncated.push({ body: largest, reason, originalBytes: kept[largest]!.bytes });
    kept[largest] = truncatedPiece(reason, kept[largest]);
  }
  // Only bodies that fit are scanned for depth, so the scan is bounded by maxBytes.
  for (const name of ["request", "response"] as const) {
    const piece = kept[name];
    if (piece && !isMarker(piece) && nestsDeeperThan(piece.text, MAX_BODY_DEPTH)) {
      const reason = `nested deeper than ${MAX_BODY_DEPTH} levels`;
      truncated.push({ body: name, reason, originalBytes: piece.bytes });
      kept[name] = truncatedPiece(reason, piece);
    }
  }

  const json = `{"request":${withBodyJson(requestHeadJson, kept.request)},"response":${withBodyJson(responseHeadJson, kept.response)}${
    restJson.length > 2 ? `,${restJson.slice(1)}` : "}"
  }`;
  const safe: MoesifEvent = {
    ...event,
    request: { ...requestHead, ...(kept.request ? { body: kept.request.value, transfer_encoding: "json" as const } : {}) },
    response: { ...responseHead, ...(kept.response ? { body: kept.response.value, transfer_encoding: "json" as const } : {}) },
  };
  return { transactionId: event.transaction_id, json, bytes: Buffer.byteLength(json), event: safe, truncated };
}

function isMarker(piece: BodyPiece): boolean {
  return isRecord(piece.value) && piece.value._truncated === true;
}

export interface MoesifMeterOptions {
  applicationId: string;
  /** Collector base, e.g. `https://api.moesif.net` or a local collector. */
  baseUri: string;
  logBodies: boolean;
  /** Upper bound on the time one `record` call may add to a request: serialisation, compression and HTTP. */
  timeoutMs: number;
  log: Logger;
  /** Events kept in memory for re-sending while the collector is failing. @default 1000 */
  maxPending?: number;
  /** Bytes of serialised events kept in memory for re-sending. @default 16 MiB */
  maxPendingBytes?: number;
  /** Largest serialised event; bigger bodies are truncated. @default 64 KiB */
  maxEventBytes?: number;
  /** Most events in one send (a request's own event plus re-sent ones). @default 100 */
  maxBatchEvents?: number;
  /** Most uncompressed bytes in one send. @default 1 MiB */
  maxBatchBytes?: number;
  /** First pause after a failed send; doubles per failure up to `maxBackoffMs`. @default 2000 */
  backoffMs?: number;
  /** @default 60000 */
  maxBackoffMs?: number;
  clock?: () => number;
}

/**
 * Sends Moesif's documented wire format (gzip JSON to `/v1/events` or `/v1/events/batch`) through `MoesifTransport`
 * (node:http(s), keep-alive).
 *
 * Why awaited: Lambda freezes the process once the handler returns, so a fire-and-forget send may never leave the
 * machine. Each request therefore waits for its event, but never longer than `timeoutMs` (serialisation and
 * compression included: both are bounded by the event and batch size caps).
 *
 * What happens to an event that could not be sent: it is written to the function's log as a `metering_deferred`
 * line holding the whole (secret-free, size-capped) event, so it can be replayed from CloudWatch, and its
 * serialised form stays in memory to be re-sent with later requests, at most `maxBatchEvents` / `maxBatchBytes` per
 * send (Moesif de-duplicates on `transaction_id`, so a replay is never counted twice). The buffer is only appended
 * to and taken from, so concurrent sends that fail each put back exactly what they took. After a failure the meter
 * stops trying for a back-off period, so a collector that hangs costs at most one timeout per period instead of one
 * per request. Memory holds at most `maxPending` events and `maxPendingBytes`; past that the oldest are dropped with
 * an error log naming their transaction ids (they are still in the log). A durable ledger replaces this later.
 */
export class MoesifMeter implements UsageMeter {
  private readonly pending: BoundedBacklog<SerializedEvent>;
  private failures = 0;
  private nextAttemptAt = 0;
  private readonly clock: () => number;
  private readonly transport: MoesifTransport;
  private readonly maxEventBytes: number;
  private readonly maxBatchEvents: number;
  private readonly maxBatchBytes: number;

  constructor(private readonly options: MoesifMeterOptions) {
    this.clock = options.clock ?? Date.now;
    this.transport = new MoesifTransport(options.baseUri, "metered-ai-api", 16);
    this.maxEventBytes = options.maxEventBytes ?? MAX_EVENT_BYTES;
    this.maxBatchEvents = Math.max(1, options.maxBatchEvents ?? 100);
    this.maxBatchBytes = Math.max(this.maxEventBytes, options.maxBatchBytes ?? 1024 * 1024);
    this.pending = new BoundedBacklog<SerializedEvent>(options.maxPending ?? 1000, options.maxPendingBytes ?? 16 * 1024 * 1024, (dropped) =>
      options.log.error("metering_dropped_from_memory", {
        count: dropped.length,
        reason: "too many events waiting for the collector; replay them from their metering_deferred log lines",
        transaction_ids: dropped.map((e) => e.transactionId),
      }),
    );
  }

  async record(record: UsageRecord): Promise<void> {
    const started = performance.now();
    let prepared: PreparedEvent;
    try {
      prepared = prepareEvent(toMoesifEvent(record, this.options.logBodies), this.maxEventBytes);
    } catch (err) {
      this.options.log.error("metering_event_build_failed", { request_id: record.requestId, error: describeError(err) });
      return;
    }
    if (prepared.truncated.length > 0) {
      this.options.log.warn("metering_event_truncated", { request_id: record.requestId, transaction_id: prepared.transactionId, truncated: prepared.truncated });
    }
    const own: SerializedEvent = { transactionId: prepared.transactionId, json: prepared.json, bytes: prepared.bytes };
    if (this.clock() < this.nextAttemptAt) {
      this.defer(own, prepared.event, "collector backing off after a failure");
      return;
    }
    // While an event the collector refused waits, carry one event at a time, so a refusal names its culprit and
    // never counts against the events that happened to share its batch.
    const suspect = this.pending.some((event) => (event.refusals ?? 0) > 0);
    const carried = this.pending.take(suspect ? 1 : this.maxBatchEvents - 1, this.maxBatchBytes - own.bytes);
    const deadline = started + this.options.timeoutMs;
    const result = await this.send(carried.length > 0 ? [own, ...carried] : [own], deadline);
    if (!result) {
      if (this.failures > 0) this.options.log.info("metering_recovered", { sent: carried.length + 1, still_pending: this.pending.length });
      this.failures = 0;
      return;
    }
    if (!result.refused) {
      this.noteFailure();
      // Earlier events were logged when they were first deferred; only the new one needs its log line.
      this.pending.putBack(carried);
      this.defer(own, prepared.event, result.reason);
      return;
    }
    // Refused outright: no back-off (the collector is up), and no event may block the others for ever. Find out
    // whether the new event is the one refused by sending it alone (within the same time bound).
    const alone = carried.length > 0 ? await this.send([own], deadline) : result;
    if (alone && alone.refused) {
      this.options.log.error("metering_event_refused", { reason: alone.reason, transaction_id: own.transactionId, event: prepared.event });
      this.pending.putBack(carried);
      return;
    }
    if (alone) {
      // The collector failed otherwise meanwhile (timeout, 5xx): an outage after all.
      this.noteFailure();
      this.pending.putBack(carried);
      this.defer(own, prepared.event, alone.reason);
      return;
    }
    // The new event went through alone, so the refusal was about the carried ones.
    this.pending.putBack(carried.filter((event) => this.keepAfterRefusal(event, result.reason)));
  }

  /** Counts a refusal against an event; false (and an error line) once it has been refused too often. */
  private keepAfterRefusal(event: SerializedEvent, reason: string): boolean {
    event.refusals = (event.refusals ?? 0) + 1;
    if (event.refusals < MAX_REFUSALS) return true;
    this.options.log.error("metering_event_refused", {
      reason: `${reason}, in ${event.refusals} batches; replay it from its metering_deferred line once fixed`,
      transaction_id: event.transactionId,
    });
    return false;
  }

  private defer(serialized: SerializedEvent, event: MoesifEvent, reason: string): void {
    this.options.log.warn("metering_deferred", { reason, event });
    this.pending.push(serialized);
  }

  /** One back-off window per outage step: failures of sends that were already in flight do not lengthen it. */
  private noteFailure(): void {
    const now = this.clock();
    if (now < this.nextAttemptAt) return;
    this.failures += 1;
    const backoff = Math.min((this.options.backoffMs ?? 2000) * 2 ** (this.failures - 1), this.options.maxBackoffMs ?? 60_000);
    this.nextAttemptAt = now + backoff;
  }

  /**
   * Returns undefined on success, or why the send failed and whether the collector refused the payload itself
   * (`refused`: a 4xx other than 408/429, which no retry of the same payload can fix). Never throws; never outlives
   * `deadline`.
   */
  private async send(events: SerializedEvent[], deadline: number): Promise<{ reason: string; refused: boolean } | undefined> {
    const single = events.length === 1;
    try {
      const json = single ? events[0].json : `[${events.map((e) => e.json).join(",")}]`;
      // Synchronous gzip: the payload is capped (maxBatchBytes), so this takes at most a few milliseconds, which
      // is less than handing it to the thread pool and back; the time it took comes out of the same budget.
      const body = gzipSync(json);
      const remaining = Math.floor(deadline - performance.now());
      if (remaining <= 0) return { reason: "time budget spent before sending", refused: false };
      const { status } = await this.transport.post(single ? "/v1/events" : "/v1/events/batch", body, this.options.applicationId, remaining);
      if (status >= 200 && status < 300) return undefined;
      const refused = status >= 400 && status < 500 && status !== 408 && status !== 429;
      return { reason: `collector answered HTTP ${status}`, refused };
    } catch (err) {
      const { name, message, code } = describeError(err);
      return { reason: `collector unreachable: ${code ?? name}: ${message}`, refused: false };
    }
  }
}
