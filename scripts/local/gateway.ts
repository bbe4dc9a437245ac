/**
 * An API Gateway (REST, Lambda proxy) emulator: what `pulumi up` builds, on loopback.
 *
 * It does what API Gateway does before and after the function runs: matches the route, checks `x-api-key`,
 * applies the key's usage plan (token-bucket throttle, DAY/WEEK/MONTH quota), builds the payload-1.0 proxy event,
 * calls the same handler module Lambda runs and maps its result back. Error bodies are API Gateway's own.
 */
import { randomUUID } from "node:crypto";
import http from "node:http";
import { LoopbackServer, readBody, sendJson } from "./loopback";
import type { APIGatewayProxyEvent, APIGatewayProxyResult, Context } from "aws-lambda";
import type { PlanConfig, QuotaPeriod } from "../../infra/stack-config";

export type LambdaHandler = (event: APIGatewayProxyEvent, context: Context) => Promise<APIGatewayProxyResult>;

export interface GatewayKey {
  id: string;
  value: string;
  customerId: string;
  plan: PlanConfig;
  enabled?: boolean;
}

export interface QuotaCounter {
  takeQuota(keyId: string, periodStart: string, limit: number): boolean;
}

export interface GatewayOptions {
  stage: string;
  routes: ReadonlyArray<{ path: string; method: string }>;
  keys: GatewayKey[];
  handler: LambdaHandler;
  quota: QuotaCounter;
  port?: number;
  host?: string;
  clock?: () => number;
  /** API Gateway's REST integration timeout. */
  integrationTimeoutMs?: number;
}

/** API Gateway's REST payload limit. */
export const MAX_PAYLOAD_BYTES = 10 * 1024 * 1024;

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

/**
 * Start of the quota period holding `now`, in UTC, as API Gateway counts: DAY from midnight, WEEK from Sunday
 * + offset days, MONTH from the 1st + offset days.
 */
export function quotaPeriodStart(period: QuotaPeriod, offset: number, now: number): string {
  const date = new Date(now);
  const day = Date.UTC(date.getUTCFullYear(), date.getUTCMonth(), date.getUTCDate());
  const DAY = 86_400_000;
  if (period === "DAY") return new Date(day).toISOString().slice(0, 10);
  if (period === "WEEK") {
    const sinceStart = (date.getUTCDay() - offset + 7) % 7;
    return new Date(day - sinceStart * DAY).toISOString().slice(0, 10);
  }
  let start = Date.UTC(date.getUTCFullYear(), date.getUTCMonth(), 1) + offset * DAY;
  if (start > now) start = Date.UTC(date.getUTCFullYear(), date.getUTCMonth() - 1, 1) + offset * DAY;
  return new Date(start).toISOString().slice(0, 10);
}

export class GatewayEmulator extends LoopbackServer {
  private readonly byValue: Map<string, GatewayKey>;
  private readonly buckets = new Map<string, TokenBucket>();
  private readonly clock: () => number;

  constructor(private readonly options: GatewayOptions) {
    super(options);
    this.byValue = new Map(options.keys.map((key) => [key.value, key]));
    this.clock = options.clock ?? Date.now;
  }

  get baseUrl(): string {
    return `${this.origin}/${this.options.stage}`;
  }

  protected handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.serve(req, res).catch(() => apiGatewayError(res, 500, "Internal server error"));
  }

  private async serve(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const started = this.clock();
    const url = new URL(req.url ?? "/", "http://localhost");
    const prefix = `/${this.options.stage}`;
    const path = url.pathname.startsWith(`${prefix}/`) ? url.pathname.slice(prefix.length) : undefined;
    const method = (req.method ?? "GET").toUpperCase();

    const body = await readBody(req, MAX_PAYLOAD_BYTES);
    if (body === "too large") return apiGatewayError(res, 413, "Request Too Long");

    // API Gateway answers an unknown resource or method with 403 "Missing Authentication Token".
    const route = path === undefined ? undefined : this.options.routes.find((r) => r.path === path && r.method === method);
    if (!route || path === undefined) return apiGatewayError(res, 403, "Missing Authentication Token");

    const keyValue = headerValue(req.headers["x-api-key"]);
    const key = keyValue ? this.byValue.get(keyValue) : undefined;
    if (!key || key.enabled === false) return apiGatewayError(res, 403, "Forbidden");

    let bucket = this.buckets.get(key.id);
    if (!bucket) this.buckets.set(key.id, (bucket = new TokenBucket(key.plan.rateLimit, key.plan.burstLimit, started)));
    if (!bucket.take(started)) return apiGatewayError(res, 429, "Too Many Requests");
    const quota = key.plan.quota;
    if (quota && !this.options.quota.takeQuota(key.id, `${quota.period}:${quotaPeriodStart(quota.period, quota.offset, started)}`, quota.limit)) {
      return apiGatewayError(res, 429, "Limit Exceeded");
    }

    const event = this.buildEvent(req, url, route.path, method, body, key, keyValue!, started);
    const context = lambdaContext(event.requestContext.requestId, started, this.options.integrationTimeoutMs ?? 29_000);
    let result: APIGatewayProxyResult;
    try {
      result = await withTimeout(this.options.handler(event, context), this.options.integrationTimeoutMs ?? 29_000);
    } catch (err) {
      if (err === TIMED_OUT) return apiGatewayError(res, 504, "Endpoint request timed out");
      return apiGatewayError(res, 502, "Internal server error");
    }
    sendResult(res, result, event.requestContext.requestId);
  }

  private buildEvent(
    req: http.IncomingMessage,
    url: URL,
    resource: string,
    method: string,
    body: Buffer,
    key: GatewayKey,
    keyValue: string,
    now: number,
  ): APIGatewayProxyEvent {
    const headers: Record<string, string> = {};
    const multiValueHeaders: Record<string, string[]> = {};
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      const [name, value] = [req.rawHeaders[i], req.rawHeaders[i + 1]];
      headers[name] = value; // API Gateway keeps the last value in `headers`
      (multiValueHeaders[name] ??= []).push(value);
    }
    const query: Record<string, string> = {};
    const multiQuery: Record<string, string[]> = {};
    for (const [name, value] of url.searchParams) {
      query[name] = value;
      (multiQuery[name] ??= []).push(value);
    }
    const hasQuery = Object.keys(query).length > 0;
    const contentType = (headerValue(req.headers["content-type"]) ?? "").toLowerCase();
    // Text bodies arrive as strings; anything else is base64, as with binary media types configured.
    const isText = body.length === 0 || contentType === "" || /json|text|xml|urlencoded/.test(contentType);
    return {
      resource,
      path: resource,
      httpMethod: method,
      headers,
      multiValueHeaders,
      queryStringParameters: hasQuery ? query : null,
      multiValueQueryStringParameters: hasQuery ? multiQuery : null,
      pathParameters: null,
      stageVariables: null,
      body: body.length === 0 ? null : isText ? body.toString("utf8") : body.toString("base64"),
      isBase64Encoded: body.length > 0 && !isText,
      requestContext: {
        accountId: "000000000000",
        apiId: "local",
        authorizer: undefined,
        protocol: `HTTP/${req.httpVersion}`,
        httpMethod: method,
        path: `/${this.options.stage}${resource}`,
        stage: this.options.stage,
        requestId: randomUUID(),
        requestTimeEpoch: now,
        resourceId: "local",
        resourcePath: resource,
        identity: {
          accessKey: null,
          accountId: null,
          apiKey: keyValue,
          apiKeyId: key.id,
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
    } as APIGatewayProxyEvent;
  }
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

function sendResult(res: http.ServerResponse, result: APIGatewayProxyResult, requestId: string): void {
  if (!result || typeof result.statusCode !== "number") return apiGatewayError(res, 502, "Internal server error");
  const headers: Record<string, string | string[]> = { "x-amzn-RequestId": requestId };
  for (const [name, value] of Object.entries(result.headers ?? {})) headers[name] = String(value);
  for (const [name, values] of Object.entries(result.multiValueHeaders ?? {})) headers[name] = values.map(String);
  const body = result.body ? Buffer.from(result.body, result.isBase64Encoded ? "base64" : "utf8") : Buffer.alloc(0);
  res.writeHead(result.statusCode, { ...headers, "Content-Length": String(body.length) });
  res.end(body);
}

function apiGatewayError(res: http.ServerResponse, status: number, message: string): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  sendJson(res, status, { message }, { "x-amzn-ErrorType": errorType(status) });
}

function errorType(status: number): string {
  return status === 403 ? "ForbiddenException" : status === 429 ? "TooManyRequestsException" : status === 413 ? "RequestTooLongException" : "InternalServerErrorException";
}

function headerValue(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value[value.length - 1] : value;
}
