import type { APIGatewayProxyEvent, Context } from "aws-lambda";
import { lambdaContext } from "../../scripts/local/gateway";

let counter = 0;

export interface EventOptions {
  method?: string;
  resource?: string;
  path?: string;
  body?: unknown;
  /** Send `body` base64-encoded, as the deployed API does for every body (its binary media type is every type). @default true */
  base64?: boolean;
  headers?: Record<string, string>;
  apiKeyId?: string | null;
  apiKey?: string;
  stage?: string;
  requestId?: string;
  sourceIp?: string;
}

/** A REST API (payload 1.0) Lambda proxy event as the deployed API builds it (bodies base64-encoded). */
export function createApiGatewayEvent(options: EventOptions = {}): APIGatewayProxyEvent {
  counter += 1;
  const resource = options.resource ?? "/v1/chat/completions";
  const stage = options.stage ?? "beta";
  const rawBody = options.body === undefined ? null : typeof options.body === "string" ? options.body : JSON.stringify(options.body);
  const base64 = rawBody !== null && options.base64 !== false;
  const body = base64 ? Buffer.from(rawBody).toString("base64") : rawBody;
  const headers = {
    Host: "abc123.execute-api.us-east-1.amazonaws.com",
    "Content-Type": "application/json",
    "X-Forwarded-Proto": "https",
    ...(options.apiKey ? { "x-api-key": options.apiKey } : {}),
    ...options.headers,
  };
  return {
    resource,
    path: options.path ?? resource,
    httpMethod: options.method ?? (resource === "/v1/models" ? "GET" : "POST"),
    headers,
    multiValueHeaders: Object.fromEntries(Object.entries(headers).map(([k, v]) => [k, [v]])),
    queryStringParameters: null,
    multiValueQueryStringParameters: null,
    pathParameters: null,
    stageVariables: null,
    body,
    isBase64Encoded: base64,
    requestContext: {
      accountId: "123456789012",
      apiId: "abc123",
      // What API Gateway passes on from the Lambda authorizer's result.
      authorizer: options.apiKey ? { principalId: "api-key" } : undefined,
      protocol: "HTTP/1.1",
      httpMethod: options.method ?? "POST",
      path: `/${stage}${options.path ?? resource}`,
      stage,
      requestId: options.requestId ?? `req-${process.pid}-${counter}-${Date.now()}`,
      requestTimeEpoch: Date.now(),
      resourceId: "res1",
      resourcePath: resource,
      identity: {
        accessKey: null,
        accountId: null,
        apiKey: options.apiKey ?? null,
        apiKeyId: options.apiKeyId === undefined ? "key-id-alice" : options.apiKeyId,
        caller: null,
        clientCert: null,
        cognitoAuthenticationProvider: null,
        cognitoAuthenticationType: null,
        cognitoIdentityId: null,
        cognitoIdentityPoolId: null,
        principalOrgId: null,
        sourceIp: options.sourceIp ?? "203.0.113.7",
        user: null,
        userAgent: "test",
        userArn: null,
      },
    },
  } as APIGatewayProxyEvent;
}

/** The context the local stack's emulator gives the handler, with a fresh request id. */
export function createContext(overrides: Partial<Context> = {}): Context {
  return { ...lambdaContext(`aws-${Date.now()}`, Date.now(), 29_000), ...overrides };
}

export const chatBody = (overrides: Record<string, unknown> = {}) => ({
  model: "gpt-4o-mini",
  messages: [
    { role: "system", content: "You are a helpful assistant." },
    { role: "user", content: "Hello!" },
  ],
  ...overrides,
});
