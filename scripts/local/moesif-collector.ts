/**
 * A Moesif-compatible collector for the local stack and the tests: accepts what Moesif's collector API accepts
 * (gzip or plain JSON on `POST /v1/events` and `/v1/events/batch`, app id in `X-Moesif-Application-Id`) and answers
 * `GET /v1/config` and `GET /v1/rules` as Moesif does. Events go to an `EventStore`.
 *
 * `mode` lets tests make it misbehave: refuse (socket destroyed), hang, answer 500, answer 429 with `Retry-After:
 * retryAfterSeconds` (`rate_limited`: throttling, which any HTTP API may answer) or answer garbage.
 * `answerDelayMs` stores accepted events at once but answers that much later: the window in which the sink has the
 * events and the sender does not know it yet (what a crash of the sender must not double-count).
 *
 * What it keeps in memory besides the store is bounded (the most recent payloads and request heads), so `npm start`
 * can run for days; tests that must see every payload ask for `keepRawPayloads: "all"`.
 */
import http from "node:http";
import { LoopbackServer, readBody, sendJson as json } from "./loopback";
import { gunzipSync } from "node:zlib";

export interface StoredEvent {
  transaction_id?: string;
  user_id?: string;
  company_id?: string;
  session_token?: string;
  metadata?: Record<string, unknown>;
  request?: Record<string, unknown>;
  response?: Record<string, unknown>;
  [field: string]: unknown;
}

/** Where accepted events go. Duplicate transaction ids are ignored, as Moesif de-duplicates on them. */
export interface EventStore {
  add(events: StoredEvent[]): void;
  all(): StoredEvent[];
}

export class MemoryEventStore implements EventStore {
  private readonly events = new Map<string, StoredEvent>();
  private anonymous = 0;
  add(events: StoredEvent[]): void {
    for (const event of events) {
      const key = event.transaction_id ?? `anonymous-${(this.anonymous += 1)}`;
      if (!this.events.has(key)) this.events.set(key, event);
    }
  }
  all(): StoredEvent[] {
    return [...this.events.values()];
  }
}

export type CollectorMode = "ok" | "refuse" | "hang" | "error" | "rate_limited" | "garbage";

export interface CollectorOptions {
  applicationId?: string;
  port?: number;
  host?: string;
  store?: EventStore;
  /**
   * How many decoded payloads `rawPayloads` (and request heads `requests`) keep: the most recent ones, by count and
   * by total characters, or `"all"`. @default { count: 2000, chars: 8 MiB }
   */
  keepRawPayloads?: "all" | { count: number; chars: number };
  /** See `MoesifCollector.answerDelayMs`. @default 0 */
  answerDelayMs?: number;
}

/** Enough for every test in this repository to see all of its payloads, small enough for a long `npm start`. */
export const DEFAULT_RAW_PAYLOAD_LIMIT = { count: 2000, chars: 8 * 1024 * 1024 } as const;

export class MoesifCollector extends LoopbackServer {
  mode: CollectorMode = "ok";
  /** Seconds in the `Retry-After` header of `rate_limited` answers. */
  retryAfterSeconds = 1;
  /** Accepted events are stored at once and answered this much later (201 then). */
  answerDelayMs: number;
  readonly store: EventStore;
  /** The decoded event payloads, exactly as they arrived (the most recent ones; see `keepRawPayloads`). */
  readonly rawPayloads: string[] = [];
  /** Method, URL and headers of the most recent requests (same limit as `rawPayloads`). */
  readonly requests: Array<{ method: string; url: string; headers: http.IncomingHttpHeaders }> = [];
  /** Payloads no longer in `rawPayloads` because of the limit: a secret scan of `rawPayloads` is complete when 0. */
  rawPayloadsDropped = 0;
  private rawChars = 0;
  private readonly limit: { count: number; chars: number };

  constructor(private readonly options: CollectorOptions = {}) {
    super(options);
    this.store = options.store ?? new MemoryEventStore();
    this.answerDelayMs = options.answerDelayMs ?? 0;
    const keep = options.keepRawPayloads ?? DEFAULT_RAW_PAYLOAD_LIMIT;
    this.limit = keep === "all" ? { count: Number.POSITIVE_INFINITY, chars: Number.POSITIVE_INFINITY } : keep;
  }

  private keepPayload(text: string): void {
    this.rawPayloads.push(text);
    this.rawChars += text.length;
    while (this.rawPayloads.length > 0 && (this.rawPayloads.length > this.limit.count || this.rawChars > this.limit.chars)) {
      this.rawChars -= this.rawPayloads.shift()!.length;
      this.rawPayloadsDropped += 1;
    }
  }

  private keepRequest(req: http.IncomingMessage): void {
    this.requests.push({ method: req.method ?? "", url: req.url ?? "", headers: req.headers });
    while (this.requests.length > this.limit.count) this.requests.shift();
  }

  get url(): string {
    return this.origin;
  }

  events(): StoredEvent[] {
    return this.store.all();
  }

  protected handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    if (this.mode === "refuse") {
      req.socket.destroy();
      return;
    }
    readBody(req).then((body) => {
      this.keepRequest(req);
      if (this.mode === "hang") return; // never answers; the client must give up on its own
      if (this.mode === "error") return json(res, 500, { message: "collector failure" });
      if (this.mode === "rate_limited") return json(res, 429, { message: "Too Many Requests" }, { "Retry-After": String(this.retryAfterSeconds) });
      if (this.mode === "garbage") {
        res.writeHead(200, { "Content-Type": "application/json" });
        res.end("{not json<<");
        return;
      }
      const appId = req.headers["x-moesif-application-id"];
      if (this.options.applicationId && appId !== this.options.applicationId) {
        return json(res, 401, { message: "Unauthorized: bad X-Moesif-Application-Id" });
      }
      const path = (req.url ?? "").split("?")[0];
      if (req.method === "GET" && path === "/v1/config") {
        res.setHeader("x-moesif-config-etag", "local");
        return json(res, 200, { sample_rate: 100, user_sample_rate: {}, company_sample_rate: {}, user_rules: {}, company_rules: {}, regex_config: [] });
      }
      if (req.method === "GET" && path === "/v1/rules") return json(res, 200, []);
      if (req.method === "POST" && (path === "/v1/events" || path === "/v1/events/batch")) {
        let payload: unknown;
        try {
          const text = (req.headers["content-encoding"] === "gzip" ? gunzipSync(body) : body).toString("utf8");
          this.keepPayload(text);
          payload = JSON.parse(text);
        } catch {
          return json(res, 400, { message: "Body is not (gzip) JSON" });
        }
        const events = path === "/v1/events" ? [payload] : payload;
        if (!Array.isArray(events) || events.some((e) => typeof e !== "object" || e === null)) {
          return json(res, 400, { message: "Expected an event object (or an array of them for /batch)" });
        }
        this.store.add(events as StoredEvent[]);
        const answer = () => {
          res.writeHead(201);
          res.end();
        };
        if (this.answerDelayMs > 0) setTimeout(answer, this.answerDelayMs).unref();
        else answer();
        return;
      }
      json(res, 404, { message: "Not found" });
    }).catch(() => (res.headersSent ? res.destroy() : json(res, 500, { message: "collector failure" })));
  }
}
