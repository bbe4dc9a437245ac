/**
 * The API key authorizer: lets OpenAI clients send their key the way they always do (`Authorization: Bearer <key>`,
 * the SDKs' `apiKey` option) while API Gateway's usage plans keep enforcing throttle and quota.
 *
 * The REST API's `apiKeySource` is `AUTHORIZER`: API Gateway takes the key this function returns as
 * `usageIdentifierKey`, checks that it exists and belongs to a usage plan of the stage, and answers 403
 * (INVALID_API_KEY) otherwise. So this function does no lookup and no I/O: it only finds the key in the request.
 * `x-api-key` (the seed tutorial's header) wins over `Authorization`, so clients that send a placeholder `apiKey`
 * plus `x-api-key` keep working.
 *
 * It is a REQUEST authorizer without identity sources and without result caching: a cached authorizer needs every
 * identity source present in every request, which would break whichever of the two headers a client does not send.
 */
import type { APIGatewayAuthorizerResult, APIGatewayRequestAuthorizerEvent } from "aws-lambda";

/** Finds the API key: `x-api-key`, else `Authorization: Bearer <key>`. Header names are case-insensitive. */
export function apiKeyFromHeaders(headers: Record<string, string | undefined> | null | undefined): string | undefined {
  let apiKeyHeader: string | undefined;
  let authorization: string | undefined;
  for (const [name, value] of Object.entries(headers ?? {})) {
    if (typeof value !== "string") continue;
    const lower = name.toLowerCase();
    if (lower === "x-api-key") apiKeyHeader = value.trim();
    else if (lower === "authorization") authorization = value.trim();
  }
  if (apiKeyHeader) return apiKeyHeader;
  const bearer = authorization ? /^Bearer\s+(\S+)$/i.exec(authorization) : null;
  return bearer ? bearer[1] : undefined;
}

/** An IAM policy for this one method: Allow with the key as usage identifier, or Deny (API Gateway answers 403). */
export function authorize(event: Pick<APIGatewayRequestAuthorizerEvent, "headers" | "methodArn">): APIGatewayAuthorizerResult {
  const key = apiKeyFromHeaders(event.headers);
  const policy = (effect: "Allow" | "Deny"): APIGatewayAuthorizerResult["policyDocument"] => ({
    Version: "2012-10-17",
    Statement: [{ Action: "execute-api:Invoke", Effect: effect, Resource: event.methodArn }],
  });
  // API key values are 20-128 characters; anything else cannot be a key, so do not hand it to the usage plan.
  if (!key || key.length < 20 || key.length > 128) return { principalId: "anonymous", policyDocument: policy("Deny") };
  return { principalId: "api-key", policyDocument: policy("Allow"), usageIdentifierKey: key };
}

/** The Lambda entry point (`index.handler`). Two parameters, no callback: the nodejs runtimes' async style. */
export async function handler(event: APIGatewayRequestAuthorizerEvent, _context?: unknown): Promise<APIGatewayAuthorizerResult> {
  return authorize(event);
}
