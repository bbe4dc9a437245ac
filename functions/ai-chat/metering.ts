import { createHash } from "node:crypto";
import type { Customer } from "./config";
import type { Cost } from "../shared/pricing";
import type { TokenUsage } from "./usage";

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
  upstreamStatus?: number;
  upstreamMs?: number;
  status: number;
  requestHeaders: Record<string, string>;
  responseHeaders: Record<string, string>;
  /** The parsed request body, when it was JSON. The meter decides how much of it to keep. */
  requestBody?: unknown;
  /** The parsed body returned to the caller (upstream answer or OpenAI-shaped error). */
  responseBody?: unknown;
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

/** Header names never sent to a metering backend or written to a log. */
const SENSITIVE_HEADER = /^(x-api-key|authorization|proxy-authorization|cookie|set-cookie|x-amz-security-token)$|(api[-_]?key|secret|token|session|password)/i;

/** Drops credentials and cookies from a header map. */
export function sanitizeHeaders(headers: Record<string, string>): Record<string, string> {
  const clean: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) if (!SENSITIVE_HEADER.test(name)) clean[name] = value;
  return clean;
}
