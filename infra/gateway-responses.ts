/**
 * API Gateway's own answers (bad key, unknown route, throttle, quota, payload too large, timeouts) in OpenAI's error
 * shape, so the OpenAI SDKs raise a readable, typed error instead of "403 status code (no body)".
 *
 * One table, two users: the Pulumi program turns each entry into an `aws.apigateway.Response` (status codes stay
 * API Gateway's), and the local gateway emulator answers with exactly the same status, body and headers. Pure data:
 * no Pulumi imports (the local stack loads this file).
 */

export interface OpenAiErrorShape {
  error: { message: string; type: string; param: null; code: string | null };
}

export interface GatewayResponseSpec {
  /** API Gateway's gateway response type, e.g. `INVALID_API_KEY`. */
  responseType: string;
  /** The status API Gateway answers with for this type (kept as is). */
  statusCode: number;
  /** The body; `{method}` and `{path}` in the message are filled in (see `renderGatewayMessage`). */
  body: OpenAiErrorShape;
  /** Extra response headers, literal values. */
  headers: Record<string, string>;
}

const KEY_HINT =
  "Send your API key as `Authorization: Bearer <key>` (the OpenAI SDKs' `apiKey` option) or in the `x-api-key` header.";

const error = (message: string, type: string, code: string | null): OpenAiErrorShape => ({ error: { message, type, param: null, code } });

/**
 * Every gateway response this API customises. `DEFAULT_4XX` / `DEFAULT_5XX` catch the types not listed, so no
 * answer of the API is ever API Gateway's bare `{"message": …}`.
 */
export const GATEWAY_RESPONSES: readonly GatewayResponseSpec[] = [
  {
    responseType: "INVALID_API_KEY",
    statusCode: 403,
    body: error(`Invalid API key. ${KEY_HINT}`, "invalid_request_error", "invalid_api_key"),
    headers: {},
  },
  {
    responseType: "ACCESS_DENIED",
    statusCode: 403,
    body: error(`Missing or invalid API key. ${KEY_HINT}`, "invalid_request_error", "invalid_api_key"),
    headers: {},
  },
  {
    responseType: "UNAUTHORIZED",
    statusCode: 401,
    body: error(`Missing API key. ${KEY_HINT}`, "invalid_request_error", "invalid_api_key"),
    headers: {},
  },
  {
    // API Gateway answers an unknown path or method with 403 "Missing Authentication Token".
    responseType: "MISSING_AUTHENTICATION_TOKEN",
    statusCode: 403,
    body: error(
      "Invalid URL ({method} {path}): no such route. The OpenAI SDKs' baseURL is the invoke URL followed by /v1.",
      "invalid_request_error",
      "unknown_url",
    ),
    headers: {},
  },
  {
    responseType: "RESOURCE_NOT_FOUND",
    statusCode: 404,
    body: error("Invalid URL ({method} {path}): no such route.", "invalid_request_error", "unknown_url"),
    headers: {},
  },
  {
    responseType: "THROTTLED",
    statusCode: 429,
    body: error("Rate limit reached for your plan's requests per second; retry after a short wait.", "rate_limit_error", "rate_limit_exceeded"),
    headers: { "Retry-After": "1" },
  },
  {
    // The SDKs retry 429 unless told not to: a spent quota does not come back by retrying.
    responseType: "QUOTA_EXCEEDED",
    statusCode: 429,
    body: error("You exceeded your plan's request quota for this period. It resets at the start of the next period.", "insufficient_quota", "insufficient_quota"),
    headers: { "x-should-retry": "false" },
  },
  {
    responseType: "REQUEST_TOO_LARGE",
    statusCode: 413,
    body: error("Request body exceeds API Gateway's 10 MB limit.", "invalid_request_error", "request_too_large"),
    headers: {},
  },
  {
    responseType: "INTEGRATION_TIMEOUT",
    statusCode: 504,
    body: error("The request timed out before the model answered. Retry, or stream the answer (`stream: true`).", "api_error", "timeout"),
    headers: {},
  },
  {
    // A function error. AWS documents 504 as this type's default, but access logs show Lambda errors answered 502
    // with this type (DataBiosphere/azul#8192), so the status is left to API Gateway (see KEEPS_STATUS).
    responseType: "INTEGRATION_FAILURE",
    statusCode: 502,
    body: error("The service failed to process the request. Retry later.", "api_error", "integration_failure"),
    headers: {},
  },
  {
    responseType: "AUTHORIZER_FAILURE",
    statusCode: 500,
    body: error("The service could not check the API key. Retry later.", "server_error", "authorizer_failure"),
    headers: {},
  },
  {
    responseType: "DEFAULT_4XX",
    statusCode: 400,
    body: error("The request was rejected by the API gateway.", "invalid_request_error", null),
    headers: {},
  },
  {
    responseType: "DEFAULT_5XX",
    statusCode: 500,
    body: error("The server had an error while processing your request.", "server_error", null),
    headers: {},
  },
];

/** These entries keep API Gateway's actual status; the others set their own. */
export const KEEPS_STATUS = new Set(["DEFAULT_4XX", "DEFAULT_5XX", "INTEGRATION_FAILURE"]);

export function gatewayResponse(responseType: string): GatewayResponseSpec {
  const spec = GATEWAY_RESPONSES.find((r) => r.responseType === responseType);
  if (!spec) throw new Error(`no gateway response ${responseType}`);
  return spec;
}

/** JSON-escapes a value for the inside of a JSON string literal. */
function escapeJsonString(value: string): string {
  return JSON.stringify(value).slice(1, -1);
}

/** The body the emulator sends: the template with the request's method and path filled in (JSON-escaped). */
export function renderGatewayBody(spec: GatewayResponseSpec, request: { method: string; path: string }): string {
  return JSON.stringify(spec.body)
    .split("{method}")
    .join(escapeJsonString(request.method))
    .split("{path}")
    .join(escapeJsonString(request.path));
}

/**
 * The `application/json` response template for API Gateway: the same JSON with `{method}` / `{path}` as
 * `$context.httpMethod` / `$context.path`. Gateway response templates are not VTL: "a non-VTL mapping template
 * supporting only simple variable substitutions", which "can access `$context` variable values" (API Gateway
 * developer guide, api-gateway-gatewayResponse-definition). Substitution is verbatim, not JSON-escaped: a path with
 * a raw `"` or `\` would make that one body invalid JSON (clients percent-encode both; `$context.path` is the
 * path as received, with the stage, e.g. `/beta/v1/chat/completion`).
 */
export function gatewayResponseTemplate(spec: GatewayResponseSpec): string {
  return JSON.stringify(spec.body).split("{method}").join("$context.httpMethod").split("{path}").join("$context.path");
}

/** `responseParameters` for API Gateway: each header as a static value (single-quoted, as the API requires). */
export function gatewayResponseParameters(spec: GatewayResponseSpec): Record<string, string> {
  return Object.fromEntries(Object.entries(spec.headers).map(([name, value]) => [`gatewayresponse.header.${name}`, `'${value}'`]));
}
