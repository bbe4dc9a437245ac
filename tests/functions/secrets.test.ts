import { expect } from "chai";
import { execFileSync } from "node:child_process";
import http from "node:http";
import path from "node:path";
import Stripe from "stripe";
import { createDeps, createHandler } from "../../functions/ai-chat/index";
import { invokeStreaming } from "../helpers/invoke-streaming";
import { createLogger } from "../../functions/ai-chat/logger";
import { ParameterStoreSecrets, type ParameterReader } from "../../functions/ai-chat/secrets";
import { LoopbackServer, readBody, sendJson } from "../../scripts/local/loopback";
import { MoesifCollector } from "../../scripts/local/moesif-collector";
import { UpstreamServer } from "../../scripts/local/upstream-server";
import { chatBody, createApiGatewayEvent, createContext } from "../helpers/events";
import { CUSTOMERS, PLANS } from "../helpers/fakes";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const SSM_UPSTREAM_KEY = "sk-from-ssm-0123456789abcdefXYZ";
const SSM_APP_ID = "moesif-app-id-from-ssm-4242";
const SSM_WEBHOOK_SECRET = "whsec_from_ssm_0123456789abcdef";
const CALLER_KEY = "caller-key-for-ssm-tests-0123456789";
registerSecret(SSM_UPSTREAM_KEY, SSM_APP_ID, CALLER_KEY, SSM_WEBHOOK_SECRET);

/** Speaks SSM's JSON 1.1 protocol (`X-Amz-Target: AmazonSSM.GetParameters`) for a few SecureStrings. */
class SsmServer extends LoopbackServer {
  readonly requests: Array<{ target?: string; authorization?: string; body: { Names?: string[]; WithDecryption?: boolean } }> = [];
  failure?: { status: number; type: string };

  constructor(private readonly parameters: Record<string, string>) {
    super({});
  }

  get url(): string {
    return this.origin;
  }

  protected handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    void readBody(req).then((raw) => {
      const body = JSON.parse(raw.toString("utf8") || "{}") as { Names?: string[]; WithDecryption?: boolean };
      this.requests.push({ target: req.headers["x-amz-target"] as string | undefined, authorization: req.headers.authorization, body });
      const headers = { "Content-Type": "application/x-amz-json-1.1" };
      if (this.failure) return sendJson(res, this.failure.status, { __type: this.failure.type, message: "User is not authorized to perform: ssm:GetParameters" }, headers);
      if (req.headers["x-amz-target"] !== "AmazonSSM.GetParameters") return sendJson(res, 400, { __type: "UnknownOperationException" }, headers);
      const names = body.Names ?? [];
      sendJson(
        res,
        200,
        {
          Parameters: names.filter((n) => n in this.parameters).map((n) => ({ Name: n, Type: "SecureString", Value: this.parameters[n], Version: 1 })),
          InvalidParameters: names.filter((n) => !(n in this.parameters)),
        },
        headers,
      );
    });
  }
}

describe("secrets from SSM Parameter Store (over the wire)", () => {
  let ssm: SsmServer;
  let upstream: UpstreamServer;
  let collector: MoesifCollector;
  let logs: string[];

  beforeEach(async () => {
    logs = [];
    ssm = await new SsmServer({ "/metered/upstream-key": SSM_UPSTREAM_KEY, "/metered/moesif-app-id": SSM_APP_ID, "/metered/stripe-webhook-secret": SSM_WEBHOOK_SECRET }).start();
    upstream = await new UpstreamServer({ apiKey: SSM_UPSTREAM_KEY }).start();
    collector = await new MoesifCollector({ applicationId: SSM_APP_ID }).start();
  });
  afterEach(async () => {
    recordForScan("ssm test logs", logs);
    recordForScan("ssm test collector", collector.rawPayloads);
    await Promise.all([ssm.stop(), upstream.stop(), collector.stop()]);
  });

  const makeHandler = (env: Record<string, string | undefined> = {}) =>
    createHandler(() =>
      createDeps(
        {
          UPSTREAM_BASE_URL: upstream.url,
          UPSTREAM_API_KEY_PARAMETER: "/metered/upstream-key",
          MOESIF_APPLICATION_ID_PARAMETER: "/metered/moesif-app-id",
          MOESIF_BASE_URI: collector.url,
          METERING_TIMEOUT_MS: "500",
          CUSTOMERS: JSON.stringify(CUSTOMERS),
          PLANS: JSON.stringify(PLANS),
          AWS_REGION: "us-east-1",
          AWS_ENDPOINT_URL_SSM: ssm.url,
          AWS_ACCESS_KEY_ID: "AKIDLOCALTEST",
          AWS_SECRET_ACCESS_KEY: "local-test-secret-access-key",
          ...env,
        },
        { write: (line) => logs.push(line) },
      ),
    );

  const invoke = async (handler: ReturnType<typeof createHandler>) => {
    const result = await invokeStreaming(handler, createApiGatewayEvent({ apiKey: CALLER_KEY, body: chatBody() }), createContext());
    recordForScan("ssm test response", [result.body]);
    return { result, json: JSON.parse(result.body) };
  };

  it("reads both secrets with one decrypting GetParameters call on the first request and caches them", async () => {
    const handler = makeHandler();
    const first = await invoke(handler);
    const second = await invoke(handler);

    expect(first.result.statusCode).to.equal(200);
    expect(second.result.statusCode).to.equal(200);
    expect(ssm.requests).to.have.length(1);
    expect(ssm.requests[0].target).to.equal("AmazonSSM.GetParameters");
    expect(ssm.requests[0].authorization).to.match(/^AWS4-HMAC-SHA256 Credential=AKIDLOCALTEST\//);
    expect(ssm.requests[0].body.WithDecryption).to.equal(true);
    expect(ssm.requests[0].body.Names).to.have.members(["/metered/upstream-key", "/metered/moesif-app-id"]);
    expect(upstream.received.map((r) => r.headers.authorization)).to.deep.equal([`Bearer ${SSM_UPSTREAM_KEY}`, `Bearer ${SSM_UPSTREAM_KEY}`]);
    expect(collector.events()).to.have.length(2);
    expect(collector.requests[0].headers["x-moesif-application-id"]).to.equal(SSM_APP_ID);
    expect(logs.join("\n")).to.not.include(SSM_UPSTREAM_KEY);
  });

  it("redacts the key read from SSM when the upstream echoes it", async () => {
    upstream.override = (_req, res) => {
      sendJson(res, 200, { id: `chatcmpl-${SSM_UPSTREAM_KEY}`, object: "chat.completion", choices: [{ index: 0, message: { role: "assistant", content: "hi" } }], usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 } });
    };
    const { result } = await invoke(makeHandler());
    expect(result.statusCode).to.equal(200);
    expect([result.body, ...logs, ...collector.rawPayloads].join("\n")).to.not.include(SSM_UPSTREAM_KEY);
  });

  it("answers 500 service_misconfigured when SSM refuses, logs why without a value, and does not retry at once", async () => {
    ssm.failure = { status: 400, type: "AccessDeniedException" };
    const handler = makeHandler();
    const first = await invoke(handler);
    const second = await invoke(handler);

    for (const { result, json } of [first, second]) {
      expect(result.statusCode).to.equal(500);
      expect(json.error).to.include({ type: "server_error", code: "service_misconfigured" });
    }
    expect(ssm.requests).to.have.length(1);
    expect(upstream.received).to.have.length(0);
    const failure = logs.find((l) => l.includes('"secrets_unavailable"'));
    expect(failure).to.include("AccessDenied").and.to.include("/metered/upstream-key");
  });

  it("answers 500 and names the parameter in the log when it does not exist", async () => {
    const { result } = await invoke(makeHandler({ UPSTREAM_API_KEY_PARAMETER: "/metered/absent" }));
    expect(result.statusCode).to.equal(500);
    expect(logs.find((l) => l.includes('"secrets_unavailable"'))).to.include("/metered/absent");
  });

  it("verifies Stripe webhooks with the signing secret read from SSM in the same call, never logging it", async () => {
    const handler = makeHandler({ STRIPE_WEBHOOK_SECRET_PARAMETER: "/metered/stripe-webhook-secret" });
    const payload = JSON.stringify({ id: "evt_ssm_1", object: "event", type: "customer.created", data: { object: { id: "cus_1", object: "customer" } } });
    const deliver = async (secret: string) => {
      const event = createApiGatewayEvent({ resource: "/stripe/webhook", apiKeyId: null, body: payload, headers: { "Stripe-Signature": Stripe.webhooks.generateTestHeaderString({ payload, secret }) } });
      const result = await invokeStreaming(handler, event, createContext());
      recordForScan("ssm test webhook", [result.body]);
      return result;
    };

    const signed = await deliver(SSM_WEBHOOK_SECRET);
    const forged = await deliver("whsec_not_the_one_in_ssm");

    expect(signed.statusCode).to.equal(200);
    expect(JSON.parse(signed.body)).to.include({ received: true, credited: false });
    expect(forged.statusCode).to.equal(400);
    expect(ssm.requests).to.have.length(1);
    expect(ssm.requests[0].body.Names).to.have.members(["/metered/upstream-key", "/metered/moesif-app-id", "/metered/stripe-webhook-secret"]);
    expect(collector.events()).to.have.length(0);
    expect(logs.join("\n")).to.not.include(SSM_WEBHOOK_SECRET);
  });

  it("keeps serving with UPSTREAM_API_KEY given directly, without calling SSM", async () => {
    const handler = makeHandler({ UPSTREAM_API_KEY_PARAMETER: undefined, MOESIF_APPLICATION_ID_PARAMETER: undefined, UPSTREAM_API_KEY: SSM_UPSTREAM_KEY, MOESIF_APPLICATION_ID: SSM_APP_ID });
    const { result } = await invoke(handler);
    expect(result.statusCode).to.equal(200);
    expect(ssm.requests).to.have.length(0);
    expect(collector.events()).to.have.length(1);
  });

  it("does not load the AWS SDK in a function configured without parameters", () => {
    const script = `
      require(${JSON.stringify(require.resolve("ts-node/register/transpile-only"))});
      const { createDeps } = require(${JSON.stringify(path.resolve(__dirname, "../../functions/ai-chat/index.ts"))});
      createDeps({ UPSTREAM_API_KEY: "k", CUSTOMERS: "{}", LOG_LEVEL: "error" }, { write: () => {} });
      process.stdout.write(String(Object.keys(require.cache).some((f) => f.includes("@aws-sdk"))));`;
    expect(execFileSync(process.execPath, ["-e", script], { cwd: path.resolve(__dirname, "../..") }).toString()).to.equal("false");
  });
});

describe("ParameterStoreSecrets", () => {
  const log = createLogger({ level: "error", write: () => undefined });
  const parameters = { upstreamApiKey: "/k" };

  it("retries a failed read only after the back-off, and shares one read between concurrent requests", async () => {
    let now = 0;
    let calls = 0;
    let fail = true;
    const reader: ParameterReader = {
      read: async () => {
        calls += 1;
        if (fail) throw new Error("ThrottlingException");
        return { "/k": "value-from-ssm" };
      },
    };
    const secrets = new ParameterStoreSecrets({ direct: {}, parameters, reader, log, retryAfterMs: 5000, clock: () => now });

    await secrets.resolve().then(() => expect.fail("resolved"), () => undefined);
    now = 4999;
    await secrets.resolve().then(() => expect.fail("resolved"), () => undefined);
    expect(calls).to.equal(1);

    now = 5000;
    fail = false;
    const [a, b] = await Promise.all([secrets.resolve(), secrets.resolve()]);
    expect(calls).to.equal(2);
    expect(a.upstreamApiKey).to.equal("value-from-ssm");
    expect(b).to.equal(a);
    expect(secrets.current().upstreamApiKey).to.equal("value-from-ssm");
  });

  it("lets a named parameter win over a direct value", async () => {
    const reader: ParameterReader = { read: async () => ({ "/k": "from-ssm" }) };
    const secrets = new ParameterStoreSecrets({ direct: { upstreamApiKey: "direct", moesifApplicationId: "direct-app" }, parameters, reader, log });
    expect(secrets.current()).to.deep.equal({ upstreamApiKey: undefined, moesifApplicationId: "direct-app", stripeWebhookSecret: undefined });
    expect(await secrets.resolve()).to.deep.equal({ upstreamApiKey: "from-ssm", moesifApplicationId: "direct-app", stripeWebhookSecret: undefined });
  });
});

describe("DeferredMeter", () => {
  it("meters a request answered before any secret was needed (403) once the application id resolves", async () => {
    const ssm = await new SsmServer({ "/metered/moesif-app-id": SSM_APP_ID }).start();
    const collector = await new MoesifCollector({ applicationId: SSM_APP_ID }).start();
    try {
      const handler = createHandler(() =>
        createDeps({
          UPSTREAM_API_KEY: "sk-direct-key-for-deferred-meter",
          MOESIF_APPLICATION_ID_PARAMETER: "/metered/moesif-app-id",
          MOESIF_BASE_URI: collector.url,
          CUSTOMERS: JSON.stringify(CUSTOMERS),
          AWS_REGION: "us-east-1",
          AWS_ENDPOINT_URL_SSM: ssm.url,
          AWS_ACCESS_KEY_ID: "AKIDLOCALTEST",
          AWS_SECRET_ACCESS_KEY: "local-test-secret-access-key",
          LOG_LEVEL: "error",
        }, { write: () => undefined }),
      );
      const result = await invokeStreaming(handler, createApiGatewayEvent({ apiKey: CALLER_KEY, apiKeyId: "key-id-nobody", body: chatBody() }), createContext());
      expect(result.statusCode).to.equal(403);
      expect(collector.events()).to.have.length(1);
      expect((collector.events()[0].response as { status: number }).status).to.equal(403);
    } finally {
      await Promise.all([ssm.stop(), collector.stop()]);
    }
  });
});
