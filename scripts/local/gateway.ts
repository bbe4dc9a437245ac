/**
 * An API Gateway (REST, Lambda proxy) emulator: what `pulumi up` builds, on loopback.
 *
 * It does what API Gateway does before and after the function runs: matches the route, runs the API key authorizer
 * (the same module the Lambda authorizer runs: `x-api-key`, else `Authorization: Bearer`), checks the key it returns,
 * applies the key's usage plan (token-bucket throttle, DAY/WEEK/MONTH quota), builds the payload-1.0 proxy event,
 * calls the same handler module Lambda runs and maps its result back. A route with `apiKeyRequired: false` (the Stripe
 * webhook) skips the authorizer, the key and its usage plan, as a method with authorization NONE and no API key
 * does; only the stage's throttle applies to it. Every answer of its own is the matching entry of
 * `infra/gateway-responses.ts` (OpenAI's error shape), as the deployed API's gateway responses are.
 *
 * The deployed routes are STREAM integrations (`responseTransferMode: STREAM`): a handler tagged by
 * `streamifyResponse` gets a `LocalResponseStream` (functions/ai-chat/lambda-stream.ts, the runtime's contract) whose
 * bytes reach the client as they are written, after the prelude (status, headers). An untagged handler is invoked the
 * buffered way, `handler(event, context)` → proxy result, which some tests' small fakes still use.
 *
 * Routes are API Gateway resource templates: a `{name}` segment matches exactly one non-empty path segment, and a
 * literal resource wins over a template one (`matchRoute`). The event carries the template as `resource`, the path as
 * sent as `path`, and the decoded segment values as `pathParameters`, as API Gateway's REST proxy event does.
 */
import { randomUUID } from "node:crypto";
import http from "node:http";
import { LoopbackServer, readBody } from "./loopback";
import { isStreamingHandler, LocalResponseStream, PreludeParser, type HttpResponsePrelude, type StreamingHandler } from "../../functions/ai-chat/lambda-stream";
import { authorize } from "../../functions/authorizer/index";
import { gatewayResponse, KEEPS_STATUS, renderGatewayBody } from "../../infra/gateway-responses";
import type { APIGatewayAuthorizerResult, APIGatewayProxyEvent, APIGatewayProxyResult, APIGatewayRequestAuthorizerEvent, Context } from "aws-lambda";
import { quotaPeriodStart } from "../../functions/shared/quota-period";
import { STREAM_IDLE_TIMEOUT_MS, STREAM_MAX_DURATION_MS, type PlanConfig, type QuotaPeriod } from "../../infra/stack-config";

export type LambdaHandler = (event: APIGatewayProxyEvent, context: Context) => Promise<APIGatewayProxyResult>;
/** A handler tagged by `streamifyResponse`: API Gateway's STREAM integration (`responseTransferMode: STREAM`). */
export type StreamingLambdaHandler = StreamingHandler<APIGatewayProxyEvent, Context>;
export type Authorizer = (event: APIGatewayRequestAuthorizerEvent) => APIGatewayAuthorizerResult | Promise<APIGatewayAuthorizerResult>;

export interface GatewayKey {
  id: string;
  value: string;
  customerId: string;
  /** The usage plan's limits (what API Gateway enforces; prices and models are the function's business). */
  plan: Pick<PlanConfig, "rateLimit" | "burstLimit" | "quota">;
  enabled?: boolean;
}

export interface QuotaCounter {
  takeQuota(keyId: string, periodStart: string, limit: number): boolean;
}

/** A route as the gateway serves it: `apiKeyRequired: false` serves it to anyone (default: a key is required). */
export interface GatewayRoute {
  path: string;
  method: string;
  apiKeyRequired?: boolean;
}

/**
 * A page the emulator serves itself, before any route matching, without API key, authorizer, throttle or quota: for
 * pages meant for the person at this machine only (the local dashboard), which exist because the emulator listens on
 * loopback. API Gateway has no such thing; nothing deployed serves them.
 */
export interface LocalPage {
  /**
   * A path prefix as the client sends it (stage not implied), e.g. `/_local/dashboard`: the page gets the exact path
   * and every path below it (`<prefix>/…`, `<prefix>?…`).
   */
  prefix: string;
  /** Answers the request itself (reads the body if it wants it). A rejection or throw before any header: 500. */
  handler: (req: http.IncomingMessage, res: http.ServerResponse) => void | Promise<void>;
}

export interface GatewayOptions {
  stage: string;
  routes: ReadonlyArray<GatewayRoute>;
  keys: GatewayKey[];
  /**
   * The function. A handler tagged by `streamifyResponse` is invoked as `handler(event, responseStream, context)`
   * and its bytes reach the client as they are written (STREAM integration); an untagged one is invoked as
   * `handler(event, context)` and its proxy result is sent whole (BUFFERED).
   */
  handler: LambdaHandler | StreamingLambdaHandler;
  quota: QuotaCounter;
  /** The stage's default method throttle: one bucket for all callers together. @default none */
  stageThrottle?: { rateLimit: number; burstLimit: number };
  /** The REQUEST authorizer. @default the project's `functions/authorizer` */
  authorizer?: Authorizer;
  port?: number;
  host?: string;
  clock?: () => number;
  /**
   * API Gateway's integration timeout: for a buffered handler until its result, for a streaming one for the whole
   * stream. @default 29000 buffered, 900000 streaming (the maxima: integration.d.ts of @pulumi/aws 7.48, L355)
   */
  integrationTimeoutMs?: number;
  /**
   * A stream's idle timeout: the longest gap between two chunks of a streamed answer. API Gateway's is 5 minutes for
   * Regional endpoints (https://docs.aws.amazon.com/apigateway/latest/developerguide/response-transfer-mode.html).
   * @default 300000
   */
  streamIdleTimeoutMs?: number;
  /** Loopback-only pages served before route matching, without an API key (see `LocalPage`). @default none */
  localPages?: ReadonlyArray<LocalPage>;
}

/** API Gateway's REST payload limit. */
export const MAX_PAYLOAD_BYTES = 10 * 1024 * 1024;

/**
 * Lambda's synchronous invocation limit on the event JSON, in bytes ("Request must be smaller than 6291456 bytes for
 * the InvokeFunction operation": https://zaccharles.medium.com/deep-dive-lambdas-request-payload-size-limit-2-2-6350c1ae5577).
 * Every body reaches the function base64-encoded, so bodies above roughly 4.5 MB never reach it.
 */
export const MAX_INVOKE_PAYLOAD_BYTES = 6_291_456;

/** Lambda's limit on the JSON result of a synchronous invocation (6 MiB + 100 bytes, the same source). */
export const MAX_RESULT_PAYLOAD_BYTES = 6_291_556;

/**
 * The `x-amzn-ErrorType` header API Gateway adds to its own answers, as captured from deployed APIs (gateway
 * responses change status, body and headers, not this header). Sources for the less obvious ones: 502 →
 * InternalServerErrorException (https://github.com/DataBiosphere/azul/issues/7466); the 413 for Lambda's payload
 * limit → BadRequestException (https://github.com/koki-develop/lgtm-generator/issues/10). Types not listed get
 * InternalServerErrorException (5xx) or BadRequestException (4xx).
 */
const ERROR_TYPES: Record<string, string> = {
  MISSING_AUTHENTICATION_TOKEN: "MissingAuthenticationTokenException",
  ACCESS_DENIED: "AccessDeniedException",
  INVALID_API_KEY: "ForbiddenException",
  THROTTLED: "TooManyRequestsException",
  QUOTA_EXCEEDED: "LimitExceededException",
  REQUEST_TOO_LARGE: "BadRequestException",
};

/** A token bucket: `rate` tokens per second, at most `burst` held. Starts full. */
export class TokenBucket {
  private tokens: number;
  private last: number;
  constructor(private readonly rate: number, private readonly burst: number, now: number) {
    this.tokens = burst;
    this.last = now;
  }
  take(now: number): boolean {
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.rate);
    this.last = now;
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }
}

export { quotaPeriodStart } from "../../functions/shared/quota-period";

/** What one request looks like to the gateway's own answers. */
interface Exchange {
  res: http.ServerResponse;
  method: string;
  /** The path as the client sent it, stage included (API Gateway's `$context.path`). */
  path: string;
  requestId: string;
}

export class GatewayEmulator extends LoopbackServer {
  /** Requests received, whatever became of them (tests count SDK retries with it). */
  received = 0;
  private readonly byValue: Map<string, GatewayKey>;
  private readonly buckets = new Map<string, TokenBucket>();
  private stageBucket?: TokenBucket;
  private readonly clock: () => number;
  private readonly authorizer: Authorizer;

  constructor(private readonly options: GatewayOptions) {
    super(options);
    this.byValue = new Map(options.keys.map((key) => [key.value, key]));
    this.clock = options.clock ?? Date.now;
    this.authorizer = options.authorizer ?? authorize;
  }

  get baseUrl(): string {
    return `${this.origin}/${this.options.stage}`;
  }

  protected handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.received += 1;
    const exchange: Exchange = {
      res,
      method: (req.method ?? "GET").toUpperCase(),
      path: (req.url ?? "/").split("?")[0],
      requestId: randomUUID(),
    };
    const page = this.options.localPages?.find((p) => isBelow(exchange.path, p.prefix));
    if (page) {
      new Promise<void>((resolve) => resolve(page.handler(req, res))).catch(() => sendGatewayResponse(exchange, "DEFAULT_5XX", 500));
      return;
    }
    this.serve(req, exchange).catch(() => sendGatewayResponse(exchange, "DEFAULT_5XX", 500));
  }

  private async serve(req: http.IncomingMessage, exchange: Exchange): Promise<void> {
    const started = this.clock();
    const { method } = exchange;
    const url = new URL(req.url ?? "/", "http://localhost");
    const prefix = `/${this.options.stage}`;
    // The path as sent (`exchange.path`), not `url.pathname`: WHATWG URL parsing resolves `..` and `%2E%2E` segments,
    // which would let `/v1/x/%2E%2E/models` reach another resource than the one its segments name.
    const path = exchange.path.startsWith(`${prefix}/`) ? exchange.path.slice(prefix.length) : undefined;

    let body: Buffer | "too large";
    try {
      body = await readBody(req, MAX_PAYLOAD_BYTES);
    } catch {
      exchange.res.destroy(); // the client went away mid-body
      return;
    }
    if (body === "too large") return sendGatewayResponse(exchange, "REQUEST_TOO_LARGE");

    // API Gateway answers an unknown resource or method with 403 "Missing Authentication Token".
    const matched = path === undefined ? undefined : matchRoute(this.options.routes, method, path);
    if (!matched) return sendGatewayResponse(exchange, "MISSING_AUTHENTICATION_TOKEN");
    const { route, pathParameters } = matched;

    const event = this.buildEvent(req, url, { resource: route.path, path: path!, pathParameters }, method, body, exchange.requestId, started);
    const stage = this.options.stageThrottle;
    if (stage) this.stageBucket ??= new TokenBucket(stage.rateLimit, stage.burstLimit, started);

    // Authorization NONE and apiKeyRequired false: API Gateway runs no authorizer and identifies no key, so no usage
    // plan throttles or counts the call; the stage's method throttle (`*/*`) still applies.
    if (route.apiKeyRequired === false) {
      if (this.stageBucket && !this.stageBucket.take(started)) return sendGatewayResponse(exchange, "THROTTLED");
      return this.invoke(exchange, event, started);
    }

    // apiKeySource AUTHORIZER: the authorizer finds the key; API Gateway then checks it exists, is enabled and is in
    // a usage plan of the stage (INVALID_API_KEY otherwise), and only then throttles and counts the quota.
    let decision: APIGatewayAuthorizerResult;
    try {
      decision = await this.authorizer(roundTrip(authorizerEvent(event, this.options.stage)));
    } catch {
      return sendGatewayResponse(exchange, "AUTHORIZER_FAILURE");
    }
    const allowed = decision.policyDocument?.Statement?.some((s) => s.Effect === "Allow") === true;
    if (!allowed) return sendGatewayResponse(exchange, "ACCESS_DENIED");
    const keyValue = decision.usageIdentifierKey;
    const key = keyValue ? this.byValue.get(keyValue) : undefined;
    if (!key || key.enabled === false) return sendGatewayResponse(exchange, "INVALID_API_KEY");

    if (this.stageBucket && !this.stageBucket.take(started)) return sendGatewayResponse(exchange, "THROTTLED");
    let bucket = this.buckets.get(key.id);
    if (!bucket) this.buckets.set(key.id, (bucket = new TokenBucket(key.plan.rateLimit, key.plan.burstLimit, started)));
    if (!bucket.take(started)) return sendGatewayResponse(exchange, "THROTTLED");
    const quota = key.plan.quota;
    if (quota && !this.options.quota.takeQuota(key.id, `${quota.period}:${quotaPeriodStart(quota.period, quota.offset, started)}`, quota.limit)) {
      return sendGatewayResponse(exchange, "QUOTA_EXCEEDED");
    }

    event.requestContext.identity.apiKey = keyValue!;
    event.requestContext.identity.apiKeyId = key.id;
    event.requestContext.authorizer = { principalId: decision.principalId };
    return this.invoke(exchange, event, started);
  }

  /** Calls the function with `event` as Lambda's invoke would and sends its answer (or the gateway's). */
  private async invoke(exchange: Exchange, event: APIGatewayProxyEvent, started: number): Promise<void> {
    // Lambda receives the event as JSON: serialize it as the invoke does (which also gives its size).
    const payload = JSON.stringify(event);
    if (Buffer.byteLength(payload) > MAX_INVOKE_PAYLOAD_BYTES) return sendGatewayResponse(exchange, "REQUEST_TOO_LARGE");

    const handler = this.options.handler;
    const invokeEvent = JSON.parse(payload) as APIGatewayProxyEvent;
    if (isStreamingHandler(handler)) {
      const timeoutMs = this.options.integrationTimeoutMs ?? STREAM_MAX_DURATION_MS;
      const context = lambdaContext(exchange.requestId, started, timeoutMs);
      return streamInvocation(exchange, (stream) => (handler as StreamingLambdaHandler)(invokeEvent, stream, context), {
        timeoutMs,
        idleMs: this.options.streamIdleTimeoutMs ?? STREAM_IDLE_TIMEOUT_MS,
      });
    }
    const timeoutMs = this.options.integrationTimeoutMs ?? 29_000;
    const context = lambdaContext(exchange.requestId, started, timeoutMs);
    let result: unknown;
    try {
      result = await withTimeout((handler as LambdaHandler)(invokeEvent, context), timeoutMs);
    } catch (err) {
      if (err === TIMED_OUT) return sendGatewayResponse(exchange, "INTEGRATION_TIMEOUT");
      // A function error: API Gateway answers 502 with INTEGRATION_FAILURE (which keeps that status).
      return sendGatewayResponse(exchange, "INTEGRATION_FAILURE", 502);
    }
    sendResult(exchange, result);
  }

  private buildEvent(
    req: http.IncomingMessage,
    url: URL,
    target: { resource: string; path: string; pathParameters: Record<string, string> | null },
    method: string,
    body: Buffer,
    requestId: string,
    now: number,
  ): APIGatewayProxyEvent {
    const { resource, path, pathParameters } = target;
    // Null-prototype maps: a header or parameter named `__proto__`, `constructor` or `toString` is data, not a
    // property lookup. (JSON.stringify keeps such keys, so the function receives them as own properties, as on AWS.)
    const headers: Record<string, string> = Object.create(null);
    const multiValueHeaders: Record<string, string[]> = Object.create(null);
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      const [name, value] = [req.rawHeaders[i], req.rawHeaders[i + 1]];
      headers[name] = value; // API Gateway keeps the last value in `headers`
      (multiValueHeaders[name] ??= []).push(value);
    }
    const query: Record<string, string> = Object.create(null);
    const multiQuery: Record<string, string[]> = Object.create(null);
    let hasQuery = false;
    for (const [name, value] of url.searchParams) {
      hasQuery = true;
      query[name] = value;
      (multiQuery[name] ??= []).push(value);
    }
    return {
      resource,
      // The path as sent, percent-encoding kept, without the stage (REST APIs deliver it still encoded, unlike HTTP
      // APIs: https://github.com/middleapi/standard-server/pull/93, from live captures in hotsock/voker#8).
      path,
      httpMethod: method,
      headers,
      multiValueHeaders,
      queryStringParameters: hasQuery ? query : null,
      multiValueQueryStringParameters: hasQuery ? multiQuery : null,
      pathParameters,
      stageVariables: null,
      // The REST API has binaryMediaTypes ["*/*"]: API Gateway hands every body over base64-encoded, byte-exact,
      // whatever its Content-Type (invalid UTF-8 included), and the function decodes it.
      body: body.length === 0 ? null : body.toString("base64"),
      isBase64Encoded: body.length > 0,
      requestContext: {
        accountId: "000000000000",
        apiId: "local",
        authorizer: undefined,
        protocol: `HTTP/${req.httpVersion}`,
        httpMethod: method,
        path: `/${this.options.stage}${path}`,
        stage: this.options.stage,
        requestId,
        requestTimeEpoch: now,
        resourceId: "local",
        resourcePath: resource,
        identity: {
          accessKey: null,
          accountId: null,
          apiKey: null,
          apiKeyId: null,
          caller: null,
          clientCert: null,
          cognitoAuthenticationProvider: null,
          cognitoAuthenticationType: null,
          cognitoIdentityId: null,
          cognitoIdentityPoolId: null,
          principalOrgId: null,
          sourceIp: req.socket.remoteAddress ?? "127.0.0.1",
          user: null,
          userAgent: headerValue(req.headers["user-agent"]) ?? null,
          userArn: null,
        },
      },
    } as unknown as APIGatewayProxyEvent;
  }
}

/** Whether `path` is `prefix` or below it (`<prefix>/…`). */
function isBelow(path: string, prefix: string): boolean {
  if (path === prefix) return true;
  return path.startsWith(prefix.endsWith("/") ? prefix : `${prefix}/`);
}

/** One segment of a resource template: a literal, or a `{name}` variable. */
type TemplateSegment = { literal: string } | { variable: string };

function templateSegments(resource: string): TemplateSegment[] {
  return resource
    .split("/")
    .slice(1)
    .map((segment) => {
      const variable = /^\{([A-Za-z0-9_.-]+)\}$/.exec(segment);
      return variable ? { variable: variable[1] } : { literal: segment };
    });
}

/** A percent-decoded path segment; a malformed escape (`%E0%A4%A`) stays as sent rather than failing the request. */
function decodeSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
}

/**
 * The route serving `method` on `path` (the path as sent, without the stage), as API Gateway REST selects it: the
 * resource whose template matches the path's segments (a `{name}` segment matches exactly one non-empty segment, a
 * literal segment only itself), the most specific one when several match (at the first segment where they differ, a
 * literal beats a variable), then that resource's method. A method missing on the selected resource is no match: the
 * emulator does not fall back to a less specific resource (our reading of API Gateway's resource-then-method
 * selection; no route of this API has a literal and a template sibling, so nothing here depends on it).
 * `pathParameters` holds the decoded values of the template's variables, null when it has none (as in API Gateway's
 * proxy event).
 */
export function matchRoute<R extends GatewayRoute>(routes: ReadonlyArray<R>, method: string, path: string): { route: R; pathParameters: Record<string, string> | null } | undefined {
  if (!path.startsWith("/")) return undefined;
  const segments = path.split("/").slice(1);
  let best: { resource: string; template: TemplateSegment[] } | undefined;
  for (const resource of new Set(routes.map((r) => r.path))) {
    const template = templateSegments(resource);
    if (template.length !== segments.length) continue;
    const matches = template.every((part, i) => ("literal" in part ? part.literal === segments[i] : segments[i].length > 0));
    if (!matches) continue;
    if (!best || moreSpecific(template, best.template)) best = { resource, template };
  }
  if (!best) return undefined;
  const route = routes.find((r) => r.path === best!.resource && r.method.toUpperCase() === method);
  if (!route) return undefined;
  let pathParameters: Record<string, string> | null = null;
  best.template.forEach((part, i) => {
    if ("variable" in part) (pathParameters ??= Object.create(null) as Record<string, string>)[part.variable] = decodeSegment(segments[i]);
  });
  return { route, pathParameters };
}

/** Whether template `a` is more specific than `b` (same length): a literal where `b` has a variable, first. */
function moreSpecific(a: TemplateSegment[], b: TemplateSegment[]): boolean {
  for (let i = 0; i < a.length; i++) {
    const aLiteral = "literal" in a[i];
    const bLiteral = "literal" in b[i];
    if (aLiteral !== bLiteral) return aLiteral;
  }
  return false;
}

/** The REQUEST authorizer's event: the request's headers, query and context, plus the method ARN. */
function authorizerEvent(event: APIGatewayProxyEvent, stage: string): APIGatewayRequestAuthorizerEvent {
  return {
    type: "REQUEST",
    // The method ARN names the path requested, not the resource template.
    methodArn: `arn:aws:execute-api:local:000000000000:local/${stage}/${event.httpMethod}${event.path}`,
    resource: event.resource,
    path: event.path,
    httpMethod: event.httpMethod,
    headers: event.headers,
    multiValueHeaders: event.multiValueHeaders,
    pathParameters: event.pathParameters,
    queryStringParameters: event.queryStringParameters,
    multiValueQueryStringParameters: event.multiValueQueryStringParameters,
    stageVariables: null,
    requestContext: event.requestContext,
  } as unknown as APIGatewayRequestAuthorizerEvent;
}

/** A value as a Lambda function receives it: through JSON. */
function roundTrip<T>(value: T): T {
  return JSON.parse(JSON.stringify(value)) as T;
}

const TIMED_OUT = Symbol("timed out");

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(TIMED_OUT), ms);
    }),
  ]);
}

/** A Lambda-like invocation context: the request id and a deadline `timeoutMs` after `started`. */
export function lambdaContext(requestId: string, started: number, timeoutMs: number): Context {
  return {
    callbackWaitsForEmptyEventLoop: true,
    functionName: "ai-chat-local",
    functionVersion: "$LATEST",
    invokedFunctionArn: "arn:aws:lambda:local:000000000000:function:ai-chat-local",
    memoryLimitInMB: "512",
    awsRequestId: requestId,
    logGroupName: "/aws/lambda/ai-chat-local",
    logStreamName: "local",
    getRemainingTimeInMillis: () => Math.max(0, started + timeoutMs - Date.now()),
    done: () => undefined,
    fail: () => undefined,
    succeed: () => undefined,
  };
}

/**
 * Whether a handler's result is a Lambda proxy result API Gateway accepts; anything else is its
 * "Malformed Lambda proxy response" (502).
 */
export function isProxyResult(value: unknown): value is APIGatewayProxyResult {
  if (typeof value !== "object" || value === null) return false;
  const result = value as Record<string, unknown>;
  const scalar = (v: unknown) => typeof v === "string" || typeof v === "number" || typeof v === "boolean";
  const isMap = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);
  if (typeof result.statusCode !== "number" || !Number.isInteger(result.statusCode) || result.statusCode < 100 || result.statusCode > 599) return false;
  if (result.body != null && typeof result.body !== "string") return false;
  if (result.isBase64Encoded != null && typeof result.isBase64Encoded !== "boolean") return false;
  if (result.headers != null && (!isMap(result.headers) || !Object.values(result.headers).every(scalar))) return false;
  if (result.multiValueHeaders != null) {
    if (!isMap(result.multiValueHeaders)) return false;
    if (!Object.values(result.multiValueHeaders).every((v) => Array.isArray(v) && v.every(scalar))) return false;
  }
  return true;
}

/**
 * Runs a streaming handler as API Gateway's STREAM integration does: the bytes pass a prelude parser until the
 * prelude and its 8-NUL delimiter arrive (status and headers), then go to the client as they come, chunked unless
 * the prelude declares a Content-Length. Resolves when the client's response is over, whichever way.
 *
 * - No prelude (the handler ended without writing, or wrote something that is not one), or a rejection before it:
 *   500 INTEGRATION_FAILURE ("API Gateway invokes your Lambda function and return a 500 error response", the
 *   compatibility table of response-transfer-mode-lambda.html).
 * - A rejection, the integration timeout or the idle timeout after the prelude: the status is gone, so the client's
 *   connection is cut without the final chunk, as API Gateway does ("curl: (18) transfer closed with outstanding
 *   read data remaining", response-streaming-troubleshoot.html). Before the prelude a timeout is INTEGRATION_TIMEOUT.
 * - The client going away: `stream.clientGone()`, so the function can stop paying for upstream tokens. Lambda never
 *   tells the function (runtime-interface-client issue #145); the stand-in does, and so does this emulator.
 */
function streamInvocation(exchange: Exchange, invoke: (stream: LocalResponseStream) => Promise<void>, limits: { timeoutMs: number; idleMs: number }): Promise<void> {
  const { res } = exchange;
  return new Promise<void>((resolve) => {
    const parser = new PreludeParser();
    let started = false; // the prelude went out as the status line and headers
    let over = false; // the client's response is finished, cut or answered by the gateway
    let declaredLength: number | undefined;
    let sentBytes = 0;
    let idleTimer: NodeJS.Timeout | undefined;
    const totalTimer = setTimeout(() => fail("INTEGRATION_TIMEOUT"), limits.timeoutMs);
    const armIdle = () => {
      clearTimeout(idleTimer);
      idleTimer = setTimeout(() => fail("INTEGRATION_TIMEOUT"), limits.idleMs);
    };
    /** Ends the client's connection without the final chunk, after the bytes already written (a truncated body). */
    const cut = () => {
      if (res.socket) res.socket.destroySoon();
      else res.destroy();
    };
    const settle = () => {
      over = true;
      clearTimeout(totalTimer);
      clearTimeout(idleTimer);
      resolve();
    };
    /** Ends the exchange abnormally: a gateway response before the prelude, a cut connection after it. */
    const fail = (responseType: "INTEGRATION_FAILURE" | "INTEGRATION_TIMEOUT") => {
      if (over) return;
      settle();
      // The gateway hung up on the function: the local function learns it, as it would of a client disconnect.
      stream.clientGone();
      if (started) cut();
      else sendGatewayResponse(exchange, responseType, responseType === "INTEGRATION_FAILURE" ? 500 : undefined);
    };
    const send = (bytes: Buffer): boolean => {
      if (bytes.length === 0) return true;
      sentBytes += bytes.length;
      return res.write(bytes);
    };
    const stream = new LocalResponseStream({
      write(chunk) {
        if (over) return true;
        armIdle();
        if (started) return send(chunk);
        let parsed: ReturnType<PreludeParser["push"]>;
        try {
          parsed = parser.push(chunk);
        } catch {
          fail("INTEGRATION_FAILURE"); // not API Gateway's format: no JSON prelude and delimiter within 16 KB
          return true;
        }
        if (!parsed) return true;
        const head = preludeHeaders(parsed.prelude, exchange.requestId);
        declaredLength = head.contentLength;
        try {
          res.writeHead(parsed.prelude.statusCode, head.headers);
        } catch {
          fail("INTEGRATION_FAILURE"); // a status or header Node refuses to send
          return true;
        }
        started = true;
        // Send the status line and headers now: a client sees the status before the first token, not with it.
        res.flushHeaders();
        return send(parsed.rest);
      },
      end() {
        if (over) return;
        if (!started) return fail("INTEGRATION_FAILURE"); // ended without a prelude: API Gateway's 500
        // A body shorter or longer than its declared Content-Length cannot be framed: cut it, as a proxy would.
        if (declaredLength !== undefined && sentBytes !== declaredLength) {
          settle();
          cut();
          return;
        }
        settle();
        res.end();
      },
    });
    res.on("drain", () => stream.drained());
    res.on("close", () => {
      if (over) return;
      settle();
      stream.clientGone();
    });
    armIdle();
    let invocation: Promise<void>;
    try {
      invocation = Promise.resolve(invoke(stream));
    } catch (err) {
      invocation = Promise.reject(err);
    }
    // A handler that resolves without ending its stream leaves the invocation open until a timeout, as on Lambda
    // (the runtime waits for the response to finish: Runtime.js L136-154 of the runtime interface client).
    invocation.catch(() => fail("INTEGRATION_FAILURE"));
  });
}

/**
 * The client's headers from a prelude, as API Gateway merges them: `headers`, then `multiValueHeaders` replacing a
 * header of the same name ("only the values from multiValueHeaders will appear"), `cookies` as Set-Cookie, the
 * request id; framing is the gateway's own except a declared Content-Length.
 */
export function preludeHeaders(prelude: HttpResponsePrelude, requestId: string): { headers: Record<string, string | string[]>; contentLength?: number } {
  const merged = new Map<string, [string, string | string[]]>();
  const isMap = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);
  if (isMap(prelude.headers)) for (const [name, value] of Object.entries(prelude.headers)) merged.set(name.toLowerCase(), [name, String(value)]);
  if (isMap(prelude.multiValueHeaders)) {
    for (const [name, values] of Object.entries(prelude.multiValueHeaders)) {
      if (Array.isArray(values)) merged.set(name.toLowerCase(), [name, values.map(String)]);
    }
  }
  if (Array.isArray(prelude.cookies) && prelude.cookies.length > 0) {
    const existing = merged.get("set-cookie")?.[1] ?? [];
    merged.set("set-cookie", ["Set-Cookie", [...(Array.isArray(existing) ? existing : [existing]), ...prelude.cookies.map(String)]]);
  }
  const headers: Record<string, string | string[]> = Object.create(null);
  let contentLength: number | undefined;
  for (const [lower, [name, value]] of merged) {
    if (lower === "content-length") {
      const n = Number(Array.isArray(value) ? value[value.length - 1] : value);
      if (Number.isSafeInteger(n) && n >= 0) {
        contentLength = n;
        headers["Content-Length"] = String(n);
      }
      continue;
    }
    if (FRAMING.has(lower)) continue;
    headers[name] = value;
  }
  headers["x-amzn-RequestId"] = requestId;
  return { headers, contentLength };
}

/** Framing headers the gateway sets itself from the body it sends. */
const FRAMING = new Set(["content-length", "transfer-encoding", "connection"]);

function sendResult(exchange: Exchange, result: unknown): void {
  if (!isProxyResult(result) || Buffer.byteLength(JSON.stringify(result)) > MAX_RESULT_PAYLOAD_BYTES) {
    return sendGatewayResponse(exchange, "DEFAULT_5XX", 502);
  }
  const headers: Record<string, string | string[]> = Object.create(null);
  headers["x-amzn-RequestId"] = exchange.requestId;
  for (const [name, value] of Object.entries(result.headers ?? {})) if (!FRAMING.has(name.toLowerCase())) headers[name] = String(value);
  for (const [name, values] of Object.entries(result.multiValueHeaders ?? {})) if (!FRAMING.has(name.toLowerCase())) headers[name] = values.map(String);
  const body = result.body ? Buffer.from(result.body, result.isBase64Encoded ? "base64" : "utf8") : Buffer.alloc(0);
  headers["Content-Length"] = String(body.length);
  try {
    exchange.res.writeHead(result.statusCode, headers);
  } catch {
    // A header name or value Node refuses to send (control characters): API Gateway would not send it either.
    return sendGatewayResponse(exchange, "DEFAULT_5XX", 502);
  }
  exchange.res.end(body);
}

/**
 * Answers with one of API Gateway's gateway responses as this API customises them: the table's status (or `status`
 * for the DEFAULT_* types, which keep API Gateway's), body and headers, plus `x-amzn-ErrorType` and the request id.
 */
function sendGatewayResponse(exchange: Exchange, responseType: string, status?: number): void {
  const { res } = exchange;
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const spec = gatewayResponse(responseType);
  const statusCode = KEEPS_STATUS.has(responseType) && status !== undefined ? status : spec.statusCode;
  const text = renderGatewayBody(spec, { method: exchange.method, path: exchange.path });
  const errorType = ERROR_TYPES[responseType] ?? (statusCode >= 500 ? "InternalServerErrorException" : "BadRequestException");
  res.writeHead(statusCode, {
    ...spec.headers,
    "Content-Type": "application/json",
    "Content-Length": String(Buffer.byteLength(text)),
    "x-amzn-ErrorType": errorType,
    "x-amzn-RequestId": exchange.requestId,
  });
  res.end(text);
}

function headerValue(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value[value.length - 1] : value;
}
