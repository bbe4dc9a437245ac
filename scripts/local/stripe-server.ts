/**
 * A Stripe-compatible stand-in for the meter event endpoints, for the local stack and the tests. It speaks what the
 * official `stripe` SDK (23.1.0) sends, verified by driving it with that SDK (tests/local/stripe-server.test.ts):
 *
 * - `POST /v1/billing/meter_events`: form-encoded (`payload[value]=…`), secret key as Bearer. Validated at once as
 *   Stripe does: a duplicate `identifier` (within `dedupWindowMs`, Stripe's rolling 24 hours, on this server's
 *   clock) is refused with HTTP 400 `invalid_request_error` "An event already exists with identifier …" and
 *   `Stripe-Should-Retry: false` (langfuse/langfuse PR #16292), a timestamp outside the past 35 days / next 5
 *   minutes with HTTP 400, a value of more than 15 digits with HTTP 400 (API 2026-04-22.dahlia:
 *   https://docs.stripe.com/changelog/dahlia/2026-04-22/billing-meter-event-values-validation; the error code of
 *   the synchronous refusal is not documented, so none is given).
 * - `POST /v2/billing/meter_event_session`: JSON, secret key as Bearer; returns a 15-minute `authentication_token`.
 * - `POST /v2/billing/meter_event_stream`: JSON `{ events: [...] }` (at most 100), the session token as Bearer;
 *   answers `{}`. Like Stripe, it validates events asynchronously: a duplicate is dropped silently, and an event
 *   Stripe would reject later (out-of-range timestamp, unknown customer, a value of more than 15 digits:
 *   `meter_event_value_too_many_digits`) is not counted but kept as an error report (`errorReports()`, what Stripe
 *   sends as `v1.billing.meter.error_report_triggered`). An expired token gets 401
 *   `temporary_session_expired` / `billing_meter_event_session_expired`.
 * - `GET /v1/billing/meters`, `GET /v1/billing/meters/:id`, `GET /v1/billing/meters/:id/event_summaries`: the one
 *   meter `ai_usage_cost` (created on first start, id `mtr_local_…`, kept in the database) and its sums, for
 *   `npm run reconcile`.
 *
 * Events persist in SQLite (`dbFile`), so a restart (or `kill -9`) keeps them and their de-duplication. Values are
 * whole numbers of at most 15 digits, so the JS numbers they become are exact; they are stored as 64-bit integers.
 *
 * Fault modes for tests: `mode` (`refuse` destroys the socket, `hang` never answers, `error` answers 500,
 * `rate_limited` answers 429 with `Retry-After: retryAfterSeconds`), and `refuseCustomers`: a synchronous 400 for any
 * request carrying an event for one of those customers (Stripe itself reports unknown customers asynchronously; this
 * stands for any event Stripe refuses in its answer).
 */
import { randomBytes, randomUUID } from "node:crypto";
import type http from "node:http";
import { STRIPE_METER_EVENT_NAME } from "../../functions/shared/ledger-schema";
import { LoopbackServer, readBody, sendJson } from "./loopback";
import { STRIPE_DEDUP_WINDOW_MS, StripeStore, type MeterErrorReport, type StoredMeter, type StoredMeterEvent } from "./stripe-store";

/** The key the local stack gives the forwarder and this server when no other is configured. */
export const LOCAL_STRIPE_API_KEY = "sk_test_metered_ai_api_local_0000";

export type StripeServerMode = "ok" | "refuse" | "hang" | "error" | "rate_limited";

export interface StripeServerOptions {
  /** The secret key callers must present. @default LOCAL_STRIPE_API_KEY */
  apiKey?: string;
  /** SQLite file; `:memory:` keeps nothing across restarts. @default ":memory:" */
  dbFile?: string;
  port?: number;
  host?: string;
  /** When given, events for other customers are accepted but not counted (an async `meter_event_customer_not_found`). */
  knownCustomers?: string[];
  /** Lifetime of a meter event session token. @default 15 minutes (Stripe's) */
  sessionTtlMs?: number;
  /**
   * How long an identifier is remembered, on `clock`: a repeat within it is a duplicate, one after it is counted
   * again (Stripe: "We'll enforce uniqueness within a rolling 24 hour period"). @default 24 hours
   */
  dedupWindowMs?: number;
  clock?: () => number;
}

/** Stripe's error body: `{ error: { type, code?, message, param? } }`. */
function stripeError(res: http.ServerResponse, status: number, error: { type: string; message: string; code?: string; param?: string }, headers: Record<string, string> = {}): void {
  sendJson(res, status, { error }, { "Request-Id": requestId(), ...headers });
}

function requestId(): string {
  return `req_local_${randomBytes(7).toString("hex")}`;
}

/** Parses Stripe's form encoding (`a=1&payload[b]=2`) into nested objects. */
export function parseStripeForm(text: string): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of new URLSearchParams(text)) {
    const parts = key.split(/\[|\]\[|\]/).filter((p, i) => i === 0 || p !== "");
    let node = out;
    for (let i = 0; i < parts.length - 1; i++) {
      const next = node[parts[i]];
      node = (typeof next === "object" && next !== null ? next : (node[parts[i]] = {})) as Record<string, unknown>;
    }
    node[parts[parts.length - 1]] = value;
  }
  return out;
}

const MAX_AGE_S = 35 * 24 * 3600;
const MAX_LEAD_S = 5 * 60;
const MAX_STREAM_EVENTS = 100;
/** Most digits in a meter event value (API 2026-04-22.dahlia). */
const MAX_VALUE_DIGITS = 15;

/** Why Stripe would refuse this whole-number value text for its size, or undefined. */
function valueTooLong(value: string): string | undefined {
  const digits = value.replace(/^-/, "").replace(/^0+(?=\d)/, "");
  return digits.length > MAX_VALUE_DIGITS ? `The value in the event payload can have at most ${MAX_VALUE_DIGITS} digits. Received ${value}.` : undefined;
}

export class StripeServer extends LoopbackServer {
  mode: StripeServerMode = "ok";
  /** Seconds in the `Retry-After` of `rate_limited` answers. */
  retryAfterSeconds = 1;
  /** Customers whose events are refused synchronously (HTTP 400), whole request: a test fault. */
  readonly refuseCustomers = new Set<string>();
  /** Method and path of every request, with which credential it carried (never the credential itself). */
  readonly requests: Array<{ method: string; path: string; contentType?: string; auth: "secret_key" | "session" | "other" | "none"; status?: number }> = [];
  readonly store: StripeStore;
  private readonly apiKey: string;
  private readonly sessions = new Map<string, number>();
  private readonly clock: () => number;
  private readonly meter: StoredMeter;

  constructor(private readonly options: StripeServerOptions = {}) {
    super(options);
    this.apiKey = options.apiKey ?? LOCAL_STRIPE_API_KEY;
    this.clock = options.clock ?? Date.now;
    this.store = new StripeStore(options.dbFile ?? ":memory:");
    this.meter = this.store.ensureMeter(STRIPE_METER_EVENT_NAME, "AI usage cost (micro-units of the plan's currency)");
  }

  get url(): string {
    return this.origin;
  }

  /** The `ai_usage_cost` meter's id. */
  get meterId(): string {
    return this.meter.id;
  }

  /** Every counted meter event (duplicates and asynchronously rejected events are not). */
  events(): StoredMeterEvent[] {
    return this.store.events();
  }

  /** Sum of `value` per Stripe customer for `ai_usage_cost`. */
  totals(): Record<string, number> {
    return this.store.totals(STRIPE_METER_EVENT_NAME);
  }

  /** Events accepted and then rejected, as Stripe reports them asynchronously. */
  errorReports(): MeterErrorReport[] {
    return this.store.errorReports();
  }

  override async stop(): Promise<void> {
    await super.stop();
    this.store.close();
  }

  protected handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const url = new URL(req.url ?? "/", "http://localhost");
    const entry: StripeServer["requests"][number] = { method: req.method ?? "", path: url.pathname, contentType: req.headers["content-type"], auth: this.authKind(req) };
    this.requests.push(entry);
    if (this.requests.length > 5000) this.requests.shift();
    res.on("finish", () => (entry.status = res.statusCode));
    if (this.mode === "refuse") {
      req.socket.destroy();
      return;
    }
    readBody(req, 1024 * 1024)
      .then((body) => {
        if (this.mode === "hang") return;
        if (this.mode === "error") return stripeError(res, 500, { type: "api_error", message: "An unknown error occurred (local fault mode)." });
        if (this.mode === "rate_limited") {
          return stripeError(res, 429, { type: "invalid_request_error", code: "rate_limit", message: "Too many requests hit the API too quickly (local fault mode)." }, { "Retry-After": String(this.retryAfterSeconds) });
        }
        if (body === "too large") return stripeError(res, 413, { type: "invalid_request_error", message: "Request body too large." });
        this.route(req, res, url, body.toString("utf8"));
      })
      .catch(() => (res.headersSent ? res.destroy() : stripeError(res, 500, { type: "api_error", message: "local server failure" })));
  }

  private bearer(req: http.IncomingMessage): string | undefined {
    const match = /^Bearer (.+)$/.exec(req.headers.authorization ?? "");
    return match?.[1];
  }

  private authKind(req: http.IncomingMessage): "secret_key" | "session" | "other" | "none" {
    const token = this.bearer(req);
    if (!token) return "none";
    if (token === this.apiKey) return "secret_key";
    return this.sessions.has(token) ? "session" : "other";
  }

  /** The secret key check of every endpoint but the stream; false (and a 401 sent) when it fails. */
  private checkSecretKey(req: http.IncomingMessage, res: http.ServerResponse): boolean {
    if (this.bearer(req) === this.apiKey) return true;
    // Never echo the presented key (Stripe shows a masked one; nothing is safer).
    stripeError(res, 401, { type: "invalid_request_error", message: "Invalid API Key provided." });
    return false;
  }

  private route(req: http.IncomingMessage, res: http.ServerResponse, url: URL, body: string): void {
    const method = req.method ?? "";
    const path = url.pathname;
    if (method === "POST" && path === "/v1/billing/meter_events") return this.createV1(req, res, body);
    if (method === "POST" && path === "/v2/billing/meter_event_session") return this.createSession(req, res);
    if (method === "POST" && path === "/v2/billing/meter_event_stream") return this.stream(req, res, body);
    if (method === "GET" && path === "/v1/billing/meters") {
      if (!this.checkSecretKey(req, res)) return;
      const data = this.store.meters().map((m) => this.meterObject(m));
      return sendJson(res, 200, { object: "list", url: "/v1/billing/meters", has_more: false, data }, { "Request-Id": requestId() });
    }
    const meterPath = /^\/v1\/billing\/meters\/([^/]+)(\/event_summaries)?$/.exec(path);
    if (method === "GET" && meterPath) {
      if (!this.checkSecretKey(req, res)) return;
      const meter = this.store.meters().find((m) => m.id === decodeURIComponent(meterPath[1]));
      if (!meter) return stripeError(res, 404, { type: "invalid_request_error", code: "resource_missing", param: "id", message: `No such billing meter: '${meterPath[1]}'` });
      if (!meterPath[2]) return sendJson(res, 200, this.meterObject(meter), { "Request-Id": requestId() });
      return this.summaries(res, meter, url.searchParams);
    }
    stripeError(res, 404, { type: "invalid_request_error", message: `Unrecognized request URL (${method}: ${path}).` });
  }

  private meterObject(meter: StoredMeter) {
    return {
      id: meter.id,
      object: "billing.meter",
      created: meter.created,
      customer_mapping: { event_payload_key: "stripe_customer_id", type: "by_id" },
      default_aggregation: { formula: "sum" },
      display_name: meter.display_name,
      event_name: meter.event_name,
      event_time_window: null,
      livemode: false,
      status: "active",
      status_transitions: { deactivated_at: null },
      updated: meter.created,
      value_settings: { event_payload_key: "value" },
    };
  }

  /** Why an event's parts are unacceptable (`param` names the field as Stripe would), or undefined. */
  private invalid(event: Record<string, unknown>, prefix: string): { param: string; message: string } | undefined {
    if (typeof event.event_name !== "string" || event.event_name === "") return { param: `${prefix}event_name`, message: "Missing required param: event_name." };
    const payload = event.payload as Record<string, unknown> | undefined;
    if (typeof payload !== "object" || payload === null) return { param: `${prefix}payload`, message: "Missing required param: payload." };
    if (typeof payload.stripe_customer_id !== "string" || payload.stripe_customer_id === "") return { param: `${prefix}payload[stripe_customer_id]`, message: "Missing required param: payload[stripe_customer_id]." };
    if (typeof payload.value !== "string" || !/^-?\d+$/.test(payload.value)) return { param: `${prefix}payload[value]`, message: "payload[value] must be a whole number sent as a string." };
    if (event.identifier !== undefined && (typeof event.identifier !== "string" || event.identifier.length === 0 || event.identifier.length > 100)) {
      return { param: `${prefix}identifier`, message: "identifier must be a string of 1 to 100 characters." };
    }
    return undefined;
  }

  /** Why Stripe would not count this timestamp (seconds), or undefined. */
  private timestampProblem(seconds: number): { code: string; message: string } | undefined {
    const now = Math.floor(this.clock() / 1000);
    if (seconds < now - MAX_AGE_S) return { code: "timestamp_too_far_in_past", message: "Timestamp must be no more than 35 days in the past." };
    if (seconds > now + MAX_LEAD_S) return { code: "timestamp_in_future", message: "Timestamp must be no more than 5 minutes in the future." };
    return undefined;
  }

  private createV1(req: http.IncomingMessage, res: http.ServerResponse, body: string): void {
    if (!this.checkSecretKey(req, res)) return;
    const params = parseStripeForm(body);
    const problem = this.invalid(params, "");
    if (problem) return stripeError(res, 400, { type: "invalid_request_error", code: "parameter_invalid", ...problem });
    const payload = params.payload as { stripe_customer_id: string; value: string };
    const tooLong = valueTooLong(payload.value);
    if (tooLong) return stripeError(res, 400, { type: "invalid_request_error", param: "payload[value]", message: tooLong });
    if (this.refuseCustomers.has(payload.stripe_customer_id)) {
      return stripeError(res, 400, { type: "invalid_request_error", code: "resource_missing", param: "payload[stripe_customer_id]", message: `No such customer: '${payload.stripe_customer_id}'` });
    }
    let timestamp = Math.floor(this.clock() / 1000);
    if (params.timestamp !== undefined) {
      if (typeof params.timestamp !== "string" || !/^\d+$/.test(params.timestamp)) {
        return stripeError(res, 400, { type: "invalid_request_error", code: "parameter_invalid_integer", param: "timestamp", message: "Invalid integer: timestamp" });
      }
      timestamp = Number(params.timestamp);
      const late = this.timestampProblem(timestamp);
      if (late) return stripeError(res, 400, { type: "invalid_request_error", param: "timestamp", message: late.message });
    }
    const identifier = (params.identifier as string | undefined) ?? randomUUID();
    const event: StoredMeterEvent = { identifier, event_name: params.event_name as string, stripe_customer_id: payload.stripe_customer_id, value: Number(payload.value), timestamp, api: "v1" };
    if (this.addEvent(event) === "duplicate") {
      return stripeError(res, 400, { type: "invalid_request_error", message: `An event already exists with identifier ${identifier}.` }, { "Stripe-Should-Retry": "false" });
    }
    this.noteUnknownCustomer(event);
    sendJson(
      res,
      200,
      { object: "billing.meter_event", created: Math.floor(this.clock() / 1000), event_name: event.event_name, identifier, livemode: false, payload: params.payload, timestamp },
      { "Request-Id": requestId() },
    );
  }

  private addEvent(event: StoredMeterEvent): "created" | "duplicate" {
    return this.store.add(event, { receivedAt: this.clock(), dedupWindowMs: this.options.dedupWindowMs ?? STRIPE_DEDUP_WINDOW_MS });
  }

  /** Stripe accepts an event for an unknown customer and rejects it while processing: counted nowhere, reported. */
  private noteUnknownCustomer(event: StoredMeterEvent): boolean {
    const known = this.options.knownCustomers;
    if (!known || known.includes(event.stripe_customer_id)) return false;
    this.store.removeLatest(event.identifier);
    this.store.addErrorReport({ identifier: event.identifier, event_name: event.event_name, code: "meter_event_customer_not_found", message: `No customer ${event.stripe_customer_id}` });
    return true;
  }

  private createSession(req: http.IncomingMessage, res: http.ServerResponse): void {
    if (!this.checkSecretKey(req, res)) return;
    const now = this.clock();
    const token = `mes_token_local_${randomBytes(16).toString("hex")}`;
    const expiresAt = now + (this.options.sessionTtlMs ?? 15 * 60_000);
    this.sessions.set(token, expiresAt);
    for (const [t, at] of this.sessions) if (at < now) this.sessions.delete(t);
    sendJson(
      res,
      200,
      {
        id: `mes_local_${randomBytes(8).toString("hex")}`,
        object: "v2.billing.meter_event_session",
        authentication_token: token,
        created: new Date(now).toISOString(),
        expires_at: new Date(expiresAt).toISOString(),
        livemode: false,
      },
      { "Request-Id": requestId() },
    );
  }

  private stream(req: http.IncomingMessage, res: http.ServerResponse, body: string): void {
    const token = this.bearer(req);
    const expiresAt = token ? this.sessions.get(token) : undefined;
    if (expiresAt === undefined) return stripeError(res, 401, { type: "invalid_request_error", message: "Invalid or missing meter event session token." });
    if (expiresAt <= this.clock()) {
      return stripeError(res, 401, { type: "temporary_session_expired", code: "billing_meter_event_session_expired", message: "The temporary session token has expired." });
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(body);
    } catch {
      return stripeError(res, 400, { type: "invalid_request_error", code: "invalid_fields", message: "The request body is not JSON." });
    }
    const events = (parsed as { events?: unknown } | null)?.events;
    if (!Array.isArray(events) || events.length === 0 || events.length > MAX_STREAM_EVENTS) {
      return stripeError(res, 400, { type: "invalid_request_error", code: "invalid_fields", param: "events", message: `events must be a list of 1 to ${MAX_STREAM_EVENTS} meter events.` });
    }
    for (const [i, event] of events.entries()) {
      const problem = typeof event === "object" && event !== null ? this.invalid(event as Record<string, unknown>, `events[${i}].`) : { param: `events[${i}]`, message: "Each event must be an object." };
      if (problem) return stripeError(res, 400, { type: "invalid_request_error", code: "invalid_fields", ...problem });
      const e = event as { timestamp?: unknown; payload: { stripe_customer_id: string } };
      if (e.timestamp !== undefined && (typeof e.timestamp !== "string" || Number.isNaN(Date.parse(e.timestamp)))) {
        return stripeError(res, 400, { type: "invalid_request_error", code: "invalid_fields", param: `events[${i}].timestamp`, message: "timestamp must be an RFC 3339 date-time." });
      }
      if (this.refuseCustomers.has(e.payload.stripe_customer_id)) {
        return stripeError(res, 400, { type: "invalid_request_error", code: "invalid_fields", param: `events[${i}].payload.stripe_customer_id`, message: `No such customer: '${e.payload.stripe_customer_id}'` });
      }
    }
    // Accepted: what follows is Stripe's asynchronous processing, done here before answering.
    for (const raw of events as Array<{ event_name: string; identifier?: string; timestamp?: string; payload: { stripe_customer_id: string; value: string } }>) {
      const identifier = raw.identifier ?? randomUUID();
      const timestamp = raw.timestamp ? Math.floor(Date.parse(raw.timestamp) / 1000) : Math.floor(this.clock() / 1000);
      const late = this.timestampProblem(timestamp);
      if (late) {
        this.store.addErrorReport({ identifier, event_name: raw.event_name, code: late.code, message: late.message });
        continue;
      }
      const tooLong = valueTooLong(raw.payload.value);
      if (tooLong) {
        this.store.addErrorReport({ identifier, event_name: raw.event_name, code: "meter_event_value_too_many_digits", message: tooLong });
        continue;
      }
      const event: StoredMeterEvent = { identifier, event_name: raw.event_name, stripe_customer_id: raw.payload.stripe_customer_id, value: Number(raw.payload.value), timestamp, api: "v2" };
      if (this.addEvent(event) === "created") this.noteUnknownCustomer(event);
    }
    sendJson(res, 200, {}, { "Request-Id": requestId() });
  }

  private summaries(res: http.ServerResponse, meter: StoredMeter, query: URLSearchParams): void {
    const customer = query.get("customer");
    if (!customer) return stripeError(res, 400, { type: "invalid_request_error", code: "parameter_missing", param: "customer", message: "Missing required param: customer." });
    const times: Record<string, number> = {};
    for (const name of ["start_time", "end_time"]) {
      const raw = query.get(name);
      if (!raw || !/^\d+$/.test(raw)) return stripeError(res, 400, { type: "invalid_request_error", code: "parameter_missing", param: name, message: `Missing or invalid required param: ${name}.` });
      times[name] = Number(raw);
      if (times[name] % 60 !== 0) return stripeError(res, 400, { type: "invalid_request_error", param: name, message: `${name} must be aligned with minute boundaries.` });
    }
    const { start_time: start, end_time: end } = times;
    if (end <= start) return stripeError(res, 400, { type: "invalid_request_error", param: "end_time", message: "end_time must be after start_time." });
    const grouping = query.get("value_grouping_window");
    const step = grouping === "hour" ? 3600 : grouping === "day" ? 86400 : end - start;
    if (grouping && (start % step !== 0 || end % step !== 0)) {
      return stripeError(res, 400, { type: "invalid_request_error", param: "value_grouping_window", message: `start_time and end_time must align with ${grouping} boundaries.` });
    }
    if ((end - start) / step > 10_000) return stripeError(res, 400, { type: "invalid_request_error", param: "value_grouping_window", message: "Too many summary windows; narrow the time range." });
    const data = [];
    for (let from = start; from < end; from += step) {
      const to = Math.min(end, from + step);
      data.push({
        id: `mtrusg_local_${randomBytes(6).toString("hex")}`,
        object: "billing.meter_event_summary",
        aggregated_value: this.store.sum(meter.event_name, customer, from, to),
        end_time: to,
        livemode: false,
        meter: meter.id,
        start_time: from,
      });
    }
    sendJson(res, 200, { object: "list", url: `/v1/billing/meters/${meter.id}/event_summaries`, has_more: false, data }, { "Request-Id": requestId() });
  }
}
