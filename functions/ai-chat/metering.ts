import { createHash } from "node:crypto";
import type { Customer } from "./config";
import type { Cost } from "../shared/pricing";
import type { TokenUsage } from "./usage";

/**
 * How a request was paid for, once it is over. Postpaid: billed later from the meter (Moesif's billing meter or
 * Stripe meter events). Prepaid: charged from the customer's balance when the request settled, so no later
 * billing may charge it again. Money in integer micro-units of the plan's currency.
 */
export interface BillingOutcome {
  mode: "prepaid" | "postpaid";
  /** Prepaid: held before the upstream call. */
  reservedMicros?: number;
  /** Prepaid: taken from the balance at settlement (absent while the settlement is pending). */
  chargedMicros?: number;
  /** Prepaid: cost above the hold the balance could not cover (it never goes negative). */
  shortfallMicros?: number;
  /** Prepaid: the balance right after this request's settlement. */
  balanceAfterMicros?: number;
  /**
   * Prepaid: `settled` once the store confirmed the charge; `pending` when it could not (the stale-hold sweep then
   * settles the hold from the ledger item's cost).
   */
  settlement?: "settled" | "pending";
}

/**
 * One metered request, in the proxy's own terms. The usage meter port turns it into whatever its backend wants
 * (a Moesif event today; a durable ledger row in a later issue).
 */
export interface UsageRecord {
  /** Deterministic per API Gateway request, so a re-sent record is de-duplicated downstream. */
  transactionId: string;
  requestId: string;
  method: string;
  route: string;
  uri: string;
  startedAt: number;
  finishedAt: number;
  apiKeyId?: string;
  customer?: Customer;
  sourceIp?: string;
  /** API Gateway stage (from the request context, never from client headers). */
  stage?: string;
  /** The model the request named, whenever it named one (also on early 4xx answers). */
  model?: string;
  /** The validated (or estimated) usage billed for this request: the only usage a meter may sum. */
  usage: TokenUsage;
  usageEstimated: boolean;
  /** What this request costs in the plan's currency (integer micro-units); absent on plans without prices. */
  cost?: Cost;
  /**
   * Whether the core billed this request (it delivered a completion). Meters report `billed` only for a 2xx status
   * as well; when absent, a 2xx answer with tokens or a cost counts as billed.
   */
  billed?: boolean;
  upstreamStatus?: number;
  upstreamMs?: number;
  /** The answer was streamed (`stream: true`): `status` is the prelude's, whatever happened after it. */
  streamed?: boolean;
  /** A streamed answer that ended with an in-band error event: that event's code (`upstream_idle_timeout`…). */
  streamError?: string;
  /**
   * The caller went away before the stream ended: the upstream was aborted and what it had sent by then is billed.
   * Only ever set where the platform reports a disconnect (the local stack; never Lambda, see `index.ts`).
   */
  clientDisconnected?: boolean;
  status: number;
  requestHeaders: Record<string, string>;
  responseHeaders: Record<string, string>;
  /** The parsed request body, when it was JSON. The meter decides how much of it to keep. */
  requestBody?: unknown;
  /** The parsed body returned to the caller (upstream answer or OpenAI-shaped error). */
  responseBody?: unknown;
  /** How the request was paid for; absent when the customer (or its plan) is unknown. */
  billing?: BillingOutcome;
}

/** Narrow port for metering. Implementations must never reject and must bound their own time. */
export interface UsageMeter {
  record(record: UsageRecord): Promise<void>;
}

/** A meter that keeps nothing: used when no metering backend is configured. */
export const NO_METER: UsageMeter = { record: async () => undefined };

/**
 * A UUID (version-5 layout) derived from the API Gateway request id. Moesif de-duplicates on `transaction_id`, so a
 * record that is re-sent after a failure, or replayed from the logs, is counted once.
 */
export function transactionIdFor(requestId: string): string {
  const hash = createHash("sha1").update("metered-ai-api:").update(requestId).digest();
  hash[6] = (hash[6] & 0x0f) | 0x50;
  hash[8] = (hash[8] & 0x3f) | 0x80;
  const hex = hash.subarray(0, 16).toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`;
}

/**
 * Headers known to be harmless, the only ones a metering backend may see (an allow-list: a deny-list misses the next
 * credential header someone invents, such as `X-Auth`, `X-OpenAI-Key`, `Authentication` or `X-Access-Key`).
 * Request side: content negotiation, the client's user agent, OpenAI's documented request headers and the
 * telemetry headers the official SDKs send (`X-Stainless-*`, exact names from openai-node 6.x `internal/detect-platform.js`
 * and `client.js`; openai-python sends the same family plus `-Async`, `-Read-Timeout`, `-Raw-Response`).
 * Response side: what this function sets itself.
 */
export const METERED_HEADERS: ReadonlySet<string> = new Set([
  "content-type",
  "content-length",
  "content-encoding",
  "accept",
  "accept-encoding",
  "user-agent",
  "openai-organization",
  "openai-project",
  "openai-beta",
  "idempotency-key",
  "x-request-id",
  "x-amzn-trace-id",
  "retry-after",
  "x-should-retry",
  "x-stainless-lang",
  "x-stainless-package-version",
  "x-stainless-os",
  "x-stainless-arch",
  "x-stainless-runtime",
  "x-stainless-runtime-version",
  "x-stainless-retry-count",
  "x-stainless-timeout",
  "x-stainless-read-timeout",
  "x-stainless-async",
  "x-stainless-raw-response",
  "x-stainless-helper-method",
  "x-stainless-poll-helper",
  "x-stainless-custom-poll-interval",
]);

/** Longest header value kept; the allowed headers are short, so a long one is noise (or abuse) and is cut. */
const MAX_HEADER_VALUE = 512;

/** Keeps only the allow-listed headers (names compared case-insensitively), each value at most 512 characters. */
export function sanitizeHeaders(headers: Record<string, string>): Record<string, string> {
  const clean: Record<string, string> = {};
  for (const name of Object.keys(headers)) {
    if (!METERED_HEADERS.has(name.toLowerCase())) continue;
    const value = headers[name];
    if (typeof value === "string") clean[name] = value.length > MAX_HEADER_VALUE ? value.slice(0, MAX_HEADER_VALUE) : value;
  }
  return clean;
}
