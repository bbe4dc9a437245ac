/**
 * Typed errors that carry an HTTP status, and the ONE place that turns them into OpenAI-shaped bodies:
 * `{"error": {"message", "type", "param", "code"}}`.
 */

export type OpenAiErrorType =
  | "invalid_request_error"
  | "authentication_error"
  | "permission_error"
  | "not_found_error"
  | "rate_limit_error"
  | "insufficient_quota"
  | "api_error"
  | "server_error";

export interface OpenAiErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

/** Base class: every error the core raises on purpose is an `ApiError`. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: OpenAiErrorType,
    readonly code: string | null = null,
    readonly param: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = new.target.name;
  }
}

export class BadRequestError extends ApiError {
  constructor(message: string, param: string | null = null, code: string | null = null) {
    super(400, message, "invalid_request_error", code, param);
  }
}

export class PayloadTooLargeError extends ApiError {
  constructor(limit: number) {
    super(413, `Request body exceeds the ${limit}-byte limit.`, "invalid_request_error", "request_too_large");
  }
}

export class UnsupportedMediaTypeError extends ApiError {
  constructor(contentType: string) {
    super(415, `Unsupported Content-Type "${contentType.slice(0, 100)}"; send the request as application/json.`, "invalid_request_error", "unsupported_media_type");
  }
}

export class ForbiddenError extends ApiError {
  constructor(message: string, code = "forbidden") {
    super(403, message, "permission_error", code);
  }
}

export class NotFoundError extends ApiError {
  constructor(message: string, code = "not_found", param: string | null = null) {
    super(404, message, "invalid_request_error", code, param);
  }
}

export class ModelNotFoundError extends NotFoundError {
  constructor(model: string) {
    super(`The model \`${shortName(model)}\` does not exist or you do not have access to it.`, "model_not_found", "model");
  }
}

/** The caller's plan bills per model and has no price for this one: refused rather than served at a wrong price. */
export class ModelNotPricedError extends BadRequestError {
  constructor(model: string) {
    super(`The model \`${shortName(model)}\` has no price on your plan, so it cannot be billed and is not served; ask the operator to add a price or use a priced model.`, "model", "model_not_priced");
  }
}

/** Model names are echoed in messages; a megabyte-long one is cut so the error stays an error message. */
function shortName(model: string): string {
  return model.length > 100 ? `${model.slice(0, 100)}…` : model;
}

/** The service itself is misconfigured (missing upstream key, unreadable CUSTOMERS…): the caller cannot fix it. */
export class ConfigurationError extends ApiError {
  constructor(message: string) {
    super(500, message, "server_error", "service_misconfigured");
  }
}

/** The upstream could not be reached, answered garbage or rejected our credentials. */
export class UpstreamError extends ApiError {
  constructor(message: string, code = "upstream_error") {
    super(502, message, "api_error", code);
  }
}

export class UpstreamTimeoutError extends ApiError {
  constructor(timeoutMs: number) {
    super(504, `The upstream model server did not answer within ${timeoutMs} ms.`, "api_error", "upstream_timeout");
  }
}

/**
 * The finished answer would not fit in Lambda's response payload limit once serialised, so the caller gets this
 * instead of the platform's own failure (which would leave the metering record claiming a success).
 */
export class ResponseTooLargeError extends ApiError {
  constructor(limitBytes: number) {
    super(502, `The answer is larger than the ${limitBytes}-byte limit this service can return; ask for a shorter completion (max_completion_tokens) or fewer choices (n).`, "api_error", "response_too_large");
  }
}

/** The function ran out of its own time before it could answer (Lambda's deadline, kept before API Gateway's). */
export class DeadlineExceededError extends ApiError {
  constructor() {
    super(504, "The request could not be completed in time.", "api_error", "deadline_exceeded");
  }
}

/**
 * Why a stream that had started failed: reported in-band as the stream's last event (`streamErrorEvent`), since the
 * status (200) and headers are already on their way.
 */
export class StreamFailedError extends ApiError {
  /**
   * @param beforeStart the ordinary error to answer instead when the caller has had nothing yet (no event sent).
   */
  constructor(
    message: string,
    code: "upstream_stream_failed" | "upstream_echoed_secret" | "upstream_idle_timeout" | "deadline_exceeded" | "internal_error",
    type: OpenAiErrorType = "server_error",
    readonly beforeStart?: ApiError,
  ) {
    super(200, message, type, code);
  }
}

export class RateLimitedError extends ApiError {
  constructor(message: string, retryAfter?: string) {
    super(429, message, "rate_limit_error", "rate_limit_exceeded", null, retryAfter ? { "Retry-After": retryAfter } : {});
  }
}

/**
 * A prepaid customer's balance does not cover the most this request can cost. OpenAI's own shape for an exhausted
 * quota (type and code `insufficient_quota`, 429), with `x-should-retry: false`: the OpenAI SDKs obey that header
 * before their default of retrying every 429 (openai-node 6.x `client.js` `shouldRetry`; openai-python
 * `_base_client.py` `_should_retry`), so a customer at zero gets one fast error, not several delayed ones.
 */
export class InsufficientQuotaError extends ApiError {
  constructor(message: string) {
    super(429, message, "insufficient_quota", "insufficient_quota", null, { "x-should-retry": "false" });
  }
}

/**
 * A store the request cannot be served without did not answer (the customers table: `customer_store_unavailable`
 * for the key lookup, `credit_store_unavailable` for a prepaid reservation). Fails closed: nothing is served that
 * could not be attributed or paid for. The SDKs retry a 503, which is right for a passing outage.
 */
export class ServiceUnavailableError extends ApiError {
  constructor(message: string, code: "customer_store_unavailable" | "credit_store_unavailable" | "response_store_unavailable") {
    super(503, message, "server_error", code);
  }
}

/**
 * The responses table (who created each stored response) did not answer. Never "not found": an outage must not
 * look like an answer, and nothing is asked of the upstream without knowing whose response it is.
 */
export class ResponseStoreUnavailableError extends ServiceUnavailableError {
  constructor() {
    super("The service cannot check who owns stored responses right now; retry shortly.", "response_store_unavailable");
  }
}

/** Longest response id echoed in a message (ids come from the caller's path or body). */
const MAX_ECHOED_ID_CHARS = 256;

/**
 * A stored response that does not exist for this caller: none was recorded, or another customer created it. What
 * OpenAI answers for an unknown id (`param` and `code` null), so the two cases cannot be told apart.
 */
export class ResponseNotFoundError extends ApiError {
  constructor(id: string) {
    super(404, `Response with id '${id.slice(0, MAX_ECHOED_ID_CHARS)}' not found.`, "invalid_request_error", null, null);
  }
}

/** `previous_response_id` names a response that does not exist for this caller (OpenAI's 400 for that case). */
export class PreviousResponseNotFoundError extends BadRequestError {
  constructor(id: string) {
    super(`Previous response with id '${id.slice(0, MAX_ECHOED_ID_CHARS)}' not found.`, "previous_response_id", "previous_response_not_found");
  }
}

/** Maps any error to an OpenAI-shaped body. Unknown errors become a 500 that reveals nothing about the fault. */
export function toErrorResponse(err: unknown): { status: number; body: OpenAiErrorBody; headers: Record<string, string> } {
  if (err instanceof ApiError) {
    return {
      status: err.status,
      headers: err.headers,
      body: { error: { message: err.message, type: err.type, param: err.param, code: err.code } },
    };
  }
  return {
    status: 500,
    headers: {},
    body: { error: { message: "The server had an error while processing your request.", type: "server_error", param: null, code: "internal_error" } },
  };
}

/** True when `value` already has OpenAI's error shape, so an upstream error body can be passed through as is. */
export function isOpenAiErrorBody(value: unknown): value is OpenAiErrorBody {
  if (!value || typeof value !== "object") return false;
  const error = (value as { error?: unknown }).error;
  return !!error && typeof error === "object" && typeof (error as { message?: unknown }).message === "string";
}

/**
 * The one SSE event that ends a failed stream: `data: {"error": {...}}`, which the OpenAI SDKs raise as `APIError`
 * and the AI SDK reports as an error part (research note §6-7).
 */
export function streamErrorEvent(err: unknown): string {
  return `data: ${JSON.stringify(toErrorResponse(err).body)}\n\n`;
}
