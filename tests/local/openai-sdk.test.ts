import { expect } from "chai";
import { execFile } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import OpenAI from "openai";
import type { LocalStack } from "../../scripts/local/stack";
import { useLocalStack } from "../helpers/local-project";
import { pythonSdkAvailable } from "./streaming-helpers";

/** Three customers: one roomy, one throttled at 1 request/second, one with a quota of a single request a day. */
const SDK_STACK_YAML = `
config:
  metered-ai-api:stageName: beta
  metered-ai-api:plans:
    open:
      rateLimit: 10000
      burstLimit: 5000
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
    tight:
      rateLimit: 1
      burstLimit: 1
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
    daily:
      rateLimit: 10000
      burstLimit: 5000
      quota: { limit: 1, period: DAY }
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
  metered-ai-api:customers:
    open: { plan: open, stripeCustomerId: cus_open }
    tight: { plan: tight, stripeCustomerId: cus_tight }
    spent: { plan: daily, stripeCustomerId: cus_spent }
    spentpy: { plan: daily, stripeCustomerId: cus_spentpy }
`;

const run = promisify(execFile);


const hello = { model: "gpt-4o-mini", messages: [{ role: "user" as const, content: "Hello from the SDK" }] };

/** Runs `call`, returns what it threw and how many requests reached the gateway meanwhile. */
async function failure(stack: LocalStack, call: () => Promise<unknown>): Promise<{ error: unknown; requests: number }> {
  const before = stack.gateway.received;
  try {
    await call();
  } catch (error) {
    return { error, requests: stack.gateway.received - before };
  }
  throw new Error("the call succeeded");
}

describe("the official OpenAI JS SDK against the local stack", () => {
  // Its logs and every metering payload join the suite's secret scan (useLocalStack).
  const local = useLocalStack("openai-sdk", {}, SDK_STACK_YAML);
  let stack: LocalStack;
  const client = (options: ConstructorParameters<typeof OpenAI>[0] = {}) => new OpenAI({ baseURL: `${stack.baseUrl}/v1`, ...options });

  before(() => {
    stack = local.stack;
  });

  it("works end to end with the SDK's own apiKey option (Authorization: Bearer)", async () => {
    const sdk = client({ apiKey: stack.apiKeys.open });
    const completion = await sdk.chat.completions.create(hello);
    expect(completion.choices[0].message.content).to.equal("Hello! You said: Hello from the SDK");
    expect((await sdk.models.list()).data.map((m) => m.id)).to.include("gpt-4o-mini");
  });

  it("still works with a placeholder apiKey and the key in an x-api-key default header", async () => {
    const sdk = client({ apiKey: "unused", defaultHeaders: { "x-api-key": stack.apiKeys.open } });
    const completion = await sdk.chat.completions.create(hello);
    expect(completion.object).to.equal("chat.completion");
  });

  it("raises PermissionDeniedError, once, with a message that says where the key goes, for a wrong key", async () => {
    const { error, requests } = await failure(stack, () => client({ apiKey: "w".repeat(40) }).chat.completions.create(hello));
    expect(error).to.be.instanceOf(OpenAI.PermissionDeniedError);
    const denied = error as InstanceType<typeof OpenAI.PermissionDeniedError>;
    expect(denied.status).to.equal(403);
    expect(denied.code).to.equal("invalid_api_key");
    expect(denied.message).to.match(/^403 Invalid API key\. Send your API key as `Authorization: Bearer <key>`/);
    expect(requests).to.equal(1);
  });

  it("raises PermissionDeniedError with the same hint when the key is missing or a placeholder", async () => {
    for (const options of [{ apiKey: "unused" }, { apiKey: "unused", defaultHeaders: { Authorization: null } }]) {
      const { error } = await failure(stack, () => client(options).chat.completions.create(hello));
      expect(error).to.be.instanceOf(OpenAI.PermissionDeniedError);
      expect((error as Error).message).to.match(/^403 Missing or invalid API key\. .*Authorization: Bearer <key>.*x-api-key/);
    }
  });

  it("raises RateLimitError insufficient_quota ONCE when the quota is spent: the SDK does not retry it", async () => {
    const sdk = client({ apiKey: stack.apiKeys.spent }); // the SDK's default maxRetries (2) retries any other 429
    await sdk.chat.completions.create(hello);
    const { error, requests } = await failure(stack, () => sdk.chat.completions.create(hello));
    expect(error).to.be.instanceOf(OpenAI.RateLimitError);
    const limited = error as InstanceType<typeof OpenAI.RateLimitError>;
    expect(limited.code).to.equal("insufficient_quota");
    expect(limited.type).to.equal("insufficient_quota");
    expect(requests).to.equal(1);
  });

  it("retries a throttled request after Retry-After and then succeeds", async () => {
    const sdk = client({ apiKey: stack.apiKeys.tight });
    await sdk.chat.completions.create(hello); // takes the only token
    const before = stack.gateway.received;
    const completion = await sdk.chat.completions.create(hello);
    expect(completion.object).to.equal("chat.completion");
    expect(stack.gateway.received - before).to.equal(2);
  });

  it("raises PermissionDeniedError naming the method and path for a route the API does not have", async () => {
    const { error, requests } = await failure(stack, () => client({ apiKey: stack.apiKeys.open }).images.generate({ model: "dall-e-3", prompt: "x" }));
    expect(error).to.be.instanceOf(OpenAI.PermissionDeniedError);
    expect((error as InstanceType<typeof OpenAI.PermissionDeniedError>).code).to.equal("unknown_url");
    expect((error as Error).message).to.include("POST /beta/v1/images/generations");
    expect(requests).to.equal(1);
  });

  it("behaves the same for the official Python SDK (skipped when python3 cannot import openai)", async function () {
    if (!pythonSdkAvailable()) {
      console.log("      skipped: python3 with the openai package is not installed (pip install openai)");
      this.skip();
    }
    this.timeout(60_000);
    const before = stack.gateway.received;
    const { stdout } = await run("python3", [path.join(__dirname, "openai_sdk_check.py")], {
      env: { ...process.env, METERED_BASE_URL: `${stack.baseUrl}/v1`, METERED_KEYS: JSON.stringify(stack.apiKeys) },
    });
    const seen = JSON.parse(stdout) as Record<string, { class: string; status: number; code: string; type: string; message: string }> & { content: string };
    expect(seen.content).to.equal("Hello! You said: Hello from Python");
    expect(seen.wrong_key).to.include({ class: "PermissionDeniedError", status: 403, code: "invalid_api_key" });
    expect(seen.wrong_key.message).to.include("Authorization: Bearer <key>");
    expect(seen.quota).to.include({ class: "RateLimitError", status: 429, code: "insufficient_quota", type: "insufficient_quota" });
    expect(seen.unknown_route).to.include({ class: "PermissionDeniedError", status: 403, code: "unknown_url" });
    expect(seen.unknown_route.message).to.include("POST /beta/v1/images/generations");
    // 1 completion + 1 wrong key + 2 on the quota key + 1 unknown route: no retry of the spent quota.
    expect(stack.gateway.received - before).to.equal(5);
  });
});
