import { expect } from "chai";
import * as pulumi from "@pulumi/pulumi";
import { MOESIF_STRIPE_EVENTS } from "../../infra/moesif-stripe-webhook";
import { deploymentTrigger, logWritePolicy, ROUTES } from "../../infra/metered-ai-api";
import { isSecretInput, promiseOf, recordingMocks, unsecret, type Recorded } from "../helpers/pulumi-mocks";
import { recordForScan, registerSecret } from "../helpers/secret-scan";
import { ROUTES as CORE_ROUTES } from "../../functions/ai-chat/core";

const PROJECT = "metered-ai-api";
const UPSTREAM_SECRET = "sk-upstream-secret-for-infra-tests";
const WEBHOOK_URL = "https://api.moesif.net/example/stripe/webhook";
const STRIPE_KEY = "sk_test_stripe_secret_for_infra_tests";
registerSecret(UPSTREAM_SECRET, STRIPE_KEY, "moesif-app-id-secret");

const baseConfig: Record<string, string> = {
  [`${PROJECT}:upstreamApiKey`]: UPSTREAM_SECRET,
  [`${PROJECT}:moesifApplicationId`]: "moesif-app-id-secret",
  [`${PROJECT}:moesifStripeWebhookUrl`]: WEBHOOK_URL,
  [`${PROJECT}:stageName`]: "beta",
  "stripe:apiKey": STRIPE_KEY,
  [`${PROJECT}:logRetentionDays`]: "14",
  [`${PROJECT}:plans`]: JSON.stringify({
    starter: { rateLimit: 2, burstLimit: 5, quota: { limit: 1000, period: "MONTH" }, models: ["gpt-4o-mini"] },
    pro: { rateLimit: 20, burstLimit: 40, quota: { limit: 100000, period: "WEEK", offset: 1 } },
  }),
  [`${PROJECT}:customers`]: JSON.stringify({
    acme: { plan: "starter", stripeCustomerId: "cus_acme" },
    globex: { plan: "pro", stripeCustomerId: "cus_globex" },
  }),
};

type Program = typeof import("../../infra/index");

/** Runs the program under mocks with the given config; returns its module and the resources it registered. */
async function runProgram(config: Record<string, string>): Promise<{ program: Program; created: Recorded[] }> {
  const created: Recorded[] = [];
  await pulumi.runtime.setMocks(recordingMocks(created), PROJECT, "dev", false);
  pulumi.runtime.setAllConfig(config, [`${PROJECT}:upstreamApiKey`, `${PROJECT}:moesifApplicationId`]);
  delete require.cache[require.resolve("../../infra/index")];
  const program = (await import("../../infra/index")) as Program;
  await promiseOf(program.invokeUrl);
  await promiseOf(program.stripeWebhookEndpointId);
  return { program, created };
}

describe("Pulumi program (infra/index.ts under mocks)", () => {
  let program: Program;
  let created: Recorded[];
  const ofType = (type: string) => created.filter((r) => r.type === type);
  const one = (type: string) => {
    const found = ofType(type);
    expect(found, type).to.have.length(1);
    return found[0];
  };

  before(async () => {
    ({ program, created } = await runProgram(baseConfig));
  });

  it("creates a REGIONAL REST API with the three routes, each requiring an API key", () => {
    expect(one("aws:apigateway/restApi:RestApi").inputs.endpointConfiguration.types).to.equal("REGIONAL");
    const methods = ofType("aws:apigateway/method:Method");
    expect(methods.map((m) => m.inputs.httpMethod).sort()).to.deep.equal(["GET", "POST", "POST"]);
    for (const method of methods) {
      expect(method.inputs.apiKeyRequired, method.name).to.equal(true);
      expect(method.inputs.authorization).to.equal("NONE");
    }
    const paths = ofType("aws:apigateway/resource:Resource").map((r) => r.inputs.pathPart).sort();
    expect(paths).to.deep.equal(["ai-chat", "chat", "completions", "models", "v1"]);
  });

  it("integrates every method as AWS_PROXY with the function's invoke ARN", () => {
    const fnArn = "arn:aws:lambda:us-east-1:123456789012:function:metered-ai-api-dev-ai-chat";
    const integrations = ofType("aws:apigateway/integration:Integration");
    expect(integrations).to.have.length(3);
    for (const integration of integrations) {
      expect(integration.inputs).to.include({ type: "AWS_PROXY", integrationHttpMethod: "POST", timeoutMilliseconds: 29000 });
      expect(integration.inputs.uri).to.equal(`arn:aws:apigateway:us-east-1:lambda:path/2015-03-31/functions/${fnArn}/invocations`);
    }
  });

  it("scopes each Lambda permission to this API, stage, method and path", () => {
    const arns = ofType("aws:lambda/permission:Permission").map((p) => p.inputs.sourceArn).sort();
    const base = "arn:aws:execute-api:us-east-1:123456789012:metered-ai-api-api-id/beta";
    expect(arns).to.deep.equal([`${base}/GET/v1/models`, `${base}/POST/ai-chat`, `${base}/POST/v1/chat/completions`]);
    for (const permission of ofType("aws:lambda/permission:Permission")) {
      expect(permission.inputs.principal).to.equal("apigateway.amazonaws.com");
      expect(permission.inputs.sourceArn).to.not.include("*");
    }
  });

  it("deploys nodejs22.x on arm64 with a retained log group and a role limited to that log group", () => {
    const fn = one("aws:lambda/function:Function");
    expect(fn.inputs).to.include({ runtime: "nodejs22.x", handler: "index.handler", memorySize: 512, timeout: 29 });
    expect(fn.inputs.architectures).to.deep.equal(["arm64"]);
    const logGroup = one("aws:cloudwatch/logGroup:LogGroup");
    expect(logGroup.inputs).to.include({ name: "/aws/lambda/metered-ai-api-dev-ai-chat", retentionInDays: 14 });
    expect(fn.inputs.loggingConfig.logGroup).to.equal(logGroup.inputs.name);
    const policy = JSON.parse(one("aws:iam/rolePolicy:RolePolicy").inputs.policy);
    for (const statement of policy.Statement) {
      expect(statement.Resource).to.not.equal("*");
      for (const action of statement.Action) expect(action).to.not.include("*");
    }
    expect(ofType("aws:iam/rolePolicyAttachment:RolePolicyAttachment")).to.have.length(0);
  });

  it("keeps the function environment secret and keys CUSTOMERS by the created API key ids", () => {
    const environment = one("aws:lambda/function:Function").inputs.environment;
    expect(isSecretInput(environment)).to.equal(true);
    const variables = unsecret(environment).variables;
    expect(variables.UPSTREAM_API_KEY).to.equal(UPSTREAM_SECRET);
    expect(JSON.parse(variables.CUSTOMERS)).to.deep.equal({
      "metered-ai-api-key-acme-id": { customerId: "acme", plan: "starter", stripeCustomerId: "cus_acme" },
      "metered-ai-api-key-globex-id": { customerId: "globex", plan: "pro", stripeCustomerId: "cus_globex" },
    });
    expect(JSON.parse(variables.PLANS)).to.deep.equal({ starter: { models: ["gpt-4o-mini"] }, pro: {} });
  });

  it("creates one usage plan per plan with its throttle and quota, on the stage", () => {
    const plans = ofType("aws:apigateway/usagePlan:UsagePlan");
    const byName = Object.fromEntries(plans.map((p) => [p.name, p.inputs]));
    expect(byName["metered-ai-api-plan-starter"].throttleSettings).to.deep.equal({ rateLimit: 2, burstLimit: 5 });
    expect(byName["metered-ai-api-plan-starter"].quotaSettings).to.deep.equal({ limit: 1000, period: "MONTH", offset: 0 });
    expect(byName["metered-ai-api-plan-pro"].quotaSettings).to.deep.equal({ limit: 100000, period: "WEEK", offset: 1 });
    for (const plan of plans) expect(plan.inputs.apiStages).to.deep.equal([{ apiId: "metered-ai-api-api-id", stage: "beta" }]);
  });

  it("puts each customer's API key on its plan", () => {
    const links = ofType("aws:apigateway/usagePlanKey:UsagePlanKey").map((k) => [k.inputs.keyId, k.inputs.usagePlanId]);
    expect(links).to.have.deep.members([
      ["metered-ai-api-key-acme-id", "metered-ai-api-plan-starter-id"],
      ["metered-ai-api-key-globex-id", "metered-ai-api-plan-pro-id"],
    ]);
  });

  it("points a Stripe webhook at Moesif with the explicit customer, subscription and invoice events", () => {
    const endpoint = one("stripe:index/webhookEndpoint:WebhookEndpoint");
    expect(endpoint.inputs.url).to.equal(WEBHOOK_URL);
    expect(endpoint.inputs.enabledEvents).to.deep.equal([...MOESIF_STRIPE_EVENTS]);
    for (const event of endpoint.inputs.enabledEvents) expect(event).to.not.include("*");
    expect(endpoint.inputs.enabledEvents).to.include.members(["customer.created", "customer.subscription.updated", "invoice.paid"]);
  });

  it("exports the URLs, key ids and plan ids, with key values and the webhook secret kept secret", async () => {
    expect(await promiseOf(program.invokeUrl)).to.equal("https://metered-ai-api-api-id.execute-api.us-east-1.amazonaws.com/beta");
    expect(await promiseOf(program.aiChatUrl)).to.match(/\/beta\/ai-chat$/);
    expect(await promiseOf(program.openaiBaseUrl)).to.match(/\/beta\/v1$/);
    expect(await promiseOf(program.apiKeyIds)).to.deep.equal({ acme: "metered-ai-api-key-acme-id", globex: "metered-ai-api-key-globex-id" });
    expect(await promiseOf(program.usagePlanIds)).to.deep.equal({ starter: "metered-ai-api-plan-starter-id", pro: "metered-ai-api-plan-pro-id" });
    expect(await pulumi.isSecret(program.apiKeys)).to.equal(true);
    expect(await promiseOf(program.apiKeys)).to.deep.equal({ acme: "key-value-metered-ai-api-key-acme", globex: "key-value-metered-ai-api-key-globex" });
    expect(await pulumi.isSecret(program.stripeWebhookSecret)).to.equal(true);
    expect(await promiseOf(program.stripeWebhookEndpointId)).to.equal("moesif-stripe-endpoint-id");
  });

  it("keeps secrets out of every non-secret output and resource input but the function environment", async () => {
    const plainOutputs = [program.invokeUrl, program.aiChatUrl, program.openaiBaseUrl, program.apiKeyIds, program.usagePlanIds, program.functionName, program.stripeWebhookEndpointId];
    for (const output of plainOutputs) expect(await pulumi.isSecret(output as pulumi.Output<unknown>)).to.equal(false);
    const values = await Promise.all(plainOutputs.map((o) => promiseOf(o as pulumi.Output<unknown>)));
    recordForScan("stack outputs", values.map((v) => JSON.stringify(v)));
    recordForScan("resource inputs", created.filter((r) => r.type !== "aws:lambda/function:Function").map((r) => JSON.stringify(r.inputs)));
  });

  it("serves exactly the routes the function routes", () => {
    expect(CORE_ROUTES.map((r) => `${r.method} ${r.route}`)).to.deep.equal(ROUTES.map((r) => `${r.method} ${r.path}`));
  });

  it("redeploys when the routes or the function change, and not otherwise", () => {
    const deployment = one("aws:apigateway/deployment:Deployment");
    const arn = ofType("aws:apigateway/integration:Integration")[0].inputs.uri;
    expect(deployment.inputs.triggers.redeployment).to.equal(deploymentTrigger(ROUTES, arn));
    expect(deploymentTrigger(ROUTES, arn)).to.equal(deploymentTrigger([...ROUTES.map((r) => ({ ...r }))], arn));
    expect(deploymentTrigger([...ROUTES, { path: "/v1/embeddings", method: "POST" }], arn)).to.not.equal(deploymentTrigger(ROUTES, arn));
    expect(deploymentTrigger(ROUTES.map((r) => (r.path === "/ai-chat" ? { ...r, method: "GET" as const } : r)), arn)).to.not.equal(deploymentTrigger(ROUTES, arn));
    expect(deploymentTrigger(ROUTES, `${arn}-v2`)).to.not.equal(deploymentTrigger(ROUTES, arn));
  });

  it("writes a log policy scoped to one log group", () => {
    const policy = JSON.parse(logWritePolicy("arn:aws:logs:us-east-1:1:log-group:/aws/lambda/x"));
    expect(policy.Statement[0].Resource).to.equal("arn:aws:logs:us-east-1:1:log-group:/aws/lambda/x:*");
  });

  describe("bad config fails the program with a message naming the key", () => {
    const cases: Array<[string, Record<string, string | undefined>, RegExp]> = [
      ["a customer on an unknown plan", { [`${PROJECT}:customers`]: JSON.stringify({ acme: { plan: "gold" } }) }, /metered-ai-api:customers\.acme\.plan.*unknown plan "gold"/],
      ["a quota period that is not DAY/WEEK/MONTH", { [`${PROJECT}:plans`]: JSON.stringify({ starter: { rateLimit: 1, burstLimit: 1, quota: { limit: 5, period: "YEAR" } } }) }, /plans\.starter\.quota\.period.*DAY, WEEK or MONTH/],
      ["a missing webhook URL", { [`${PROJECT}:moesifStripeWebhookUrl`]: undefined }, /moesifStripeWebhookUrl.*required/],
      ["a non-positive rate limit", { [`${PROJECT}:plans`]: JSON.stringify({ starter: { rateLimit: 0, burstLimit: 1 } }) }, /plans\.starter\.rateLimit.*positive/],
      ["a non-positive burst limit", { [`${PROJECT}:plans`]: JSON.stringify({ starter: { rateLimit: 1, burstLimit: -2 } }) }, /plans\.starter\.burstLimit.*positive/],
      ["a non-positive quota limit", { [`${PROJECT}:plans`]: JSON.stringify({ starter: { rateLimit: 1, burstLimit: 1, quota: { limit: 0, period: "DAY" } } }) }, /plans\.starter\.quota\.limit.*positive/],
      ["no plans", { [`${PROJECT}:plans`]: undefined }, /metered-ai-api:plans/],
      ["a missing upstream key", { [`${PROJECT}:upstreamApiKey`]: undefined }, /upstreamApiKey.*pulumi config set --secret/],
      ["an http webhook URL", { [`${PROJECT}:moesifStripeWebhookUrl`]: "http://insecure.example" }, /moesifStripeWebhookUrl.*https/],
      ["more customers than the Lambda environment can hold", { [`${PROJECT}:customers`]: JSON.stringify(Object.fromEntries(Array.from({ length: 40 }, (_, i) => [`customer-${i}`, { plan: "pro", stripeCustomerId: `cus_${"X".repeat(14)}` }]))) }, /metered-ai-api:customers.*40 customers need \d+ bytes/],
      ["an unknown architecture", { [`${PROJECT}:lambdaArchitecture`]: "sparc" }, /lambdaArchitecture/],
    ];
    for (const [name, change, message] of cases) {
      it(`rejects ${name}`, async () => {
        const config: Record<string, string> = { ...baseConfig };
        for (const [key, value] of Object.entries(change)) {
          if (value === undefined) delete config[key];
          else config[key] = value;
        }
        let failure: unknown;
        try {
          await runProgram(config);
        } catch (err) {
          failure = err;
        }
        expect(failure, "the program accepted bad config").to.be.instanceOf(Error);
        expect((failure as Error).message).to.match(message);
      });
    }
  });
});
