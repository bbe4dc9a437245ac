import { loadFunctionConfig, type FunctionConfig } from "../../functions/ai-chat/config";
import type { CoreDeps, ProxyRequest } from "../../functions/ai-chat/core";
import { createLogger } from "../../functions/ai-chat/logger";
import type { UsageMeter, UsageRecord } from "../../functions/ai-chat/metering";
import { Readable } from "node:stream";
import type { UpstreamClient, UpstreamRequest, UpstreamResponse, UpstreamStreamResponse } from "../../functions/ai-chat/upstream";
import { recordForScan, registerSecret } from "./secret-scan";

export const UPSTREAM_KEY = "sk-test-upstream-secret-0123456789";
registerSecret(UPSTREAM_KEY);

export const CUSTOMERS = {
  "key-id-alice": { customerId: "alice", plan: "starter", stripeCustomerId: "cus_alice" },
  "key-id-bob": { customerId: "bob", plan: "pro", stripeCustomerId: "cus_bob" },
};
export const PLANS = { starter: { models: ["gpt-4o-mini"] }, pro: {} };

export function testEnv(overrides: Record<string, string | undefined> = {}): NodeJS.ProcessEnv {
  return {
    UPSTREAM_API_KEY: UPSTREAM_KEY,
    CUSTOMERS: JSON.stringify(CUSTOMERS),
    PLANS: JSON.stringify(PLANS),
    ...overrides,
  };
}

export class RecordingMeter implements UsageMeter {
  readonly records: UsageRecord[] = [];
  async record(record: UsageRecord): Promise<void> {
    this.records.push(record);
  }
}

export class FakeUpstream implements UpstreamClient {
  readonly requests: UpstreamRequest[] = [];
  constructor(private readonly answer: (request: UpstreamRequest) => UpstreamResponse | Promise<UpstreamResponse>) {}
  async send(request: UpstreamRequest): Promise<UpstreamResponse> {
    this.requests.push(request);
    return this.answer(request);
  }
  /** The same answer, its body streamed in one piece when the status is 2xx (an SSE text, for a stream test). */
  async openStream(request: UpstreamRequest): Promise<UpstreamStreamResponse> {
    const response = await this.send(request);
    if (response.status >= 200 && response.status < 300) return { status: response.status, headers: response.headers, stream: Readable.from([response.body]) };
    return response;
  }
}

export const jsonResponse = (status: number, body: unknown, headers: Record<string, string> = {}): UpstreamResponse => ({
  status,
  headers: { "content-type": "application/json", ...headers },
  body: Buffer.from(typeof body === "string" ? body : JSON.stringify(body)),
});

export function fakeDeps(options: { config?: FunctionConfig; upstream?: UpstreamClient; meter?: UsageMeter; logs?: string[] } = {}): CoreDeps {
  const logs = options.logs ?? [];
  return {
    config: options.config ?? loadFunctionConfig(testEnv()),
    upstream: options.upstream ?? new FakeUpstream(() => jsonResponse(500, { error: { message: "no upstream in this test" } })),
    meter: options.meter ?? new RecordingMeter(),
    log: createLogger({ level: "debug", secrets: [UPSTREAM_KEY], write: (line) => { logs.push(line); recordForScan("core logs", [line]); } }),
    clock: Date.now,
  };
}

let counter = 0;
export function proxyRequest(overrides: Partial<ProxyRequest> & { json?: unknown } = {}): ProxyRequest {
  counter += 1;
  const { json, ...rest } = overrides;
  return {
    method: "POST",
    route: "/v1/chat/completions",
    uri: "https://example.test/v1/chat/completions",
    headers: { "content-type": "application/json" },
    body: Buffer.from(json === undefined ? "" : typeof json === "string" ? json : JSON.stringify(json)),
    requestId: `core-req-${counter}`,
    apiKeyId: "key-id-alice",
    sourceIp: "203.0.113.7",
    ...rest,
  };
}
