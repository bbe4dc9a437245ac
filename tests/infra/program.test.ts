import { expect } from "chai";
import fs from "node:fs";
import path from "node:path";
import * as pulumi from "@pulumi/pulumi";
import { ROUTES as CORE_ROUTES } from "../../functions/ai-chat/core";
import { environmentBytes, functionPlans, PLANS_FILE, plannedEnvironment } from "../../infra/function-env";
import { GATEWAY_RESPONSES, KEEPS_STATUS } from "../../infra/gateway-responses";
import { ACCESS_LOG_FORMAT, AUTHORIZER_STAGE_VARIABLE, deploymentTrigger, logWritePolicy, ROUTES, secretsVersion } from "../../infra/metered-ai-api";
import { STRIPE_CREDIT_EVENTS } from "../../infra/stripe-credits-webhook";
import { MOESIF_STRIPE_EVENTS } from "../../infra/moesif-stripe-webhook";
import { parseStackConfig } from "../../infra/stack-config";
import { isSecretInput, MOCK_CREDITS_WEBHOOK_SECRET, MOCK_WEBHOOK_SECRET, mockApiKeyValue, plainState, promiseOf, redactSecrets, unsecret, type Recorded } from "../helpers/pulumi-mocks";
import { recordForScan } from "../helpers/secret-scan";
import {
  baseConfig,
  CUSTOMERS,
  finder,
  MOESIF_APP_ID,
  PLANS,
  PROJECT,
  runProgram,
  stackOutputs,
  STRIPE_KEY,
  UPSTREAM_SECRET,
  WEBHOOK_URL,
  withConfig,
  type Program,
} from "./program-harness";

describe("Pulumi program (infra/index.ts under mocks)", function () {
  this.timeout(60_000);
  let program: Program;
  let created: Recorded[];
  let ofType: (type: string) => Recorded[];
  let named: (type: string, name: string) => Recorded;
  let one: (type: string) => Recorded;
  const chatFn = () => named("aws:lambda/function:Function", "metered-ai-api-fn");
  const authorizerFn = () => named("aws:lambda/function:Function", "metered-ai-api-authorizer");
  const variables = () => chatFn().inputs.environment.variables as Record<string, string>;
  // The chat function's parameters (the forwarder has its own, see usage-ledger.test.ts).
  const chatParameters = () => ofType("aws:ssm/parameter:Parameter").filter((p) => p.name.startsWith("metered-ai-api-param-"));

  before(async () => {
    ({ program, created } = await runProgram(baseConfig));
    ({ ofType, named, one } = finder(created));
  });

  describe("API and routes", () => {
    it("creates a REGIONAL REST API that takes the key from the authorizer and passes bodies as binary", () => {
      const api = one("aws:apigateway/restApi:RestApi").inputs;
      expect(api.endpointConfiguration.types).to.equal("REGIONAL");
      expect(api.apiKeySource).to.equal("AUTHORIZER");
      expect(api.binaryMediaTypes).to.deep.equal(["*/*"]);
    });

    it("guards every route but Stripe's webhook with the REQUEST authorizer and still requires an API key on it", () => {
      const authorizer = one("aws:apigateway/authorizer:Authorizer");
      const methods = ofType("aws:apigateway/method:Method");
      expect(methods.map((m) => `${m.inputs.httpMethod} ${m.name}`).sort()).to.deep.equal([
        "DELETE metered-ai-api-method-delete-v1-responses-by-id",
        "GET metered-ai-api-method-get-v1-models",
        "GET metered-ai-api-method-get-v1-models-by-model",
        "GET metered-ai-api-method-get-v1-responses-by-id",
        "GET metered-ai-api-method-get-v1-responses-by-id-input_items",
        "GET metered-ai-api-method-get-v1-usage",
        "POST metered-ai-api-method-post-ai-chat",
        "POST metered-ai-api-method-post-stripe-webhook",
        "POST metered-ai-api-method-post-v1-chat-completions",
        "POST metered-ai-api-method-post-v1-embeddings",
        "POST metered-ai-api-method-post-v1-responses",
        "POST metered-ai-api-method-post-v1-responses-by-id-cancel",
      ]);
      for (const method of methods.filter((m) => m.name !== "metered-ai-api-method-post-stripe-webhook")) {
        expect(method.inputs, method.name).to.include({ authorization: "CUSTOM", authorizerId: authorizer.id, apiKeyRequired: true });
      }
      const paths = ofType("aws:apigateway/resource:Resource").map((r) => r.inputs.pathPart).sort();
      expect(paths).to.deep.equal(["ai-chat", "cancel", "chat", "completions", "embeddings", "input_items", "models", "responses", "stripe", "usage", "v1", "webhook", "{id}", "{model}"]);
    });

    it("serves GET /v1/usage with the caller's key, like the chat routes", () => {
      const usage = named("aws:apigateway/method:Method", "metered-ai-api-method-get-v1-usage").inputs;
      const resource = named("aws:apigateway/resource:Resource", "metered-ai-api-res-v1-usage");
      expect(usage).to.include({ httpMethod: "GET", authorization: "CUSTOM", apiKeyRequired: true, resourceId: resource.id });
      expect(resource.inputs.parentId).to.equal(named("aws:apigateway/resource:Resource", "metered-ai-api-res-v1").id);
    });

    it("serves POST /stripe/webhook with no API key and no authorizer: Stripe signs its requests instead", () => {
      const webhook = named("aws:apigateway/method:Method", "metered-ai-api-method-post-stripe-webhook").inputs;
      expect(webhook).to.include({ httpMethod: "POST", authorization: "NONE", apiKeyRequired: false });
      expect(webhook.authorizerId).to.equal(undefined);
      const resource = named("aws:apigateway/resource:Resource", "metered-ai-api-res-stripe-webhook");
      expect(webhook.resourceId).to.equal(resource.id);
      expect(resource.inputs).to.include({ pathPart: "webhook", parentId: named("aws:apigateway/resource:Resource", "metered-ai-api-res-stripe").id });
      expect(named("aws:apigateway/resource:Resource", "metered-ai-api-res-stripe").inputs.parentId).to.equal("root-id");
      expect(ROUTES.filter((r) => !r.apiKeyRequired).map((r) => `${r.method} ${r.path}`)).to.deep.equal(["POST /stripe/webhook"]);
      // Still streamed to the same function, like every route.
      const integration = named("aws:apigateway/integration:Integration", "metered-ai-api-integration-post-stripe-webhook").inputs;
      expect(integration).to.include({ type: "AWS_PROXY", uri: chatFn().state.responseStreamingInvokeArn });
    });

    it("wires an uncached REQUEST authorizer whose identity source every request carries", () => {
      const authorizer = one("aws:apigateway/authorizer:Authorizer").inputs;
      expect(authorizer).to.include({ type: "REQUEST", authorizerResultTtlInSeconds: 0, identitySource: `stageVariables.${AUTHORIZER_STAGE_VARIABLE}` });
      expect(authorizer.authorizerUri).to.equal(authorizerFn().state.invokeArn);
      expect(authorizer.authorizerCredentials).to.equal(undefined);
      const stage = one("aws:apigateway/stage:Stage").inputs;
      expect(stage.variables[AUTHORIZER_STAGE_VARIABLE]).to.be.a("string").and.not.equal("");
    });

    it("runs the authorizer as its own small function with its own role and log group, invocable only by this API's authorizer", () => {
      const fn = authorizerFn();
      expect(fn.inputs).to.include({ runtime: "nodejs22.x", handler: "index.handler", memorySize: 128 });
      expect(fn.inputs.role).to.not.equal(chatFn().inputs.role);
      expect(fn.inputs.loggingConfig.logGroup).to.match(/^\/aws\/lambda\/metered-ai-api-dev-authorizer-/);
      expect(fn.inputs.loggingConfig).to.include({ logFormat: "JSON", systemLogLevel: "WARN" });
      const policy = JSON.parse(named("aws:iam/rolePolicy:RolePolicy", "metered-ai-api-authorizer-policy").inputs.policy);
      expect(policy.Statement).to.have.length(1);
      expect(policy.Statement[0].Resource).to.equal(`arn:aws:logs:us-east-1:123456789012:log-group:${fn.inputs.loggingConfig.logGroup}:*`);
      const permission = named("aws:lambda/permission:Permission", "metered-ai-api-authorizer-permission").inputs;
      const api = one("aws:apigateway/restApi:RestApi").state;
      expect(permission).to.include({ function: fn.state.name, principal: "apigateway.amazonaws.com" });
      expect(permission.sourceArn).to.equal(`${api.executionArn}/authorizers/${one("aws:apigateway/authorizer:Authorizer").id}`);
    });

    it("integrates every method as a streamed AWS_PROXY integration with the function's response-streaming ARN", () => {
      const integrations = ofType("aws:apigateway/integration:Integration");
      expect(integrations).to.have.length(ROUTES.length).and.have.length(12);
      for (const integration of integrations) {
        expect(integration.inputs).to.include({
          type: "AWS_PROXY",
          integrationHttpMethod: "POST",
          responseTransferMode: "STREAM",
          timeoutMilliseconds: 300_000,
          uri: chatFn().state.responseStreamingInvokeArn,
        });
        expect(integration.inputs.uri).to.match(/\/2021-11-15\/functions\/.*\/response-streaming-invocations$/);
      }
    });

    it("keeps the integration timeout equal to the function's timeout", async () => {
      const { created: longer } = await runProgram({ ...baseConfig, [`${PROJECT}:lambdaTimeoutSeconds`]: "900" });
      const timeouts = longer.filter((r) => r.type === "aws:apigateway/integration:Integration").map((r) => r.inputs.timeoutMilliseconds);
      expect(timeouts).to.deep.equal(ROUTES.map(() => 900_000));
      expect(longer.find((r) => r.type === "aws:lambda/function:Function" && r.inputs.handler === "index.handler" && r.inputs.timeout === 900)).to.not.equal(undefined);
    });

    it("scopes each Lambda permission to this API, stage, method and path", () => {
      const api = one("aws:apigateway/restApi:RestApi").state;
      const arns = ofType("aws:lambda/permission:Permission")
        .filter((p) => p.inputs.function === chatFn().state.name)
        .map((p) => p.inputs.sourceArn)
        .sort();
      const base = `${api.executionArn}/beta`;
      expect(arns).to.deep.equal(
        [
          `${base}/DELETE/v1/responses/*`,
          `${base}/GET/v1/models`,
          `${base}/GET/v1/models/*`,
          `${base}/GET/v1/responses/*`,
          `${base}/GET/v1/responses/*/input_items`,
          `${base}/GET/v1/usage`,
          `${base}/POST/ai-chat`,
          `${base}/POST/stripe/webhook`,
          `${base}/POST/v1/chat/completions`,
          `${base}/POST/v1/embeddings`,
          `${base}/POST/v1/responses`,
          `${base}/POST/v1/responses/*/cancel`,
        ].sort(),
      );
      // A wildcard only where the path has a parameter: API Gateway invokes with the request's own path
      // (…/GET/v1/responses/resp_123), which a literal `{id}` in the source ARN would never match.
      for (const arn of arns) expect(arn).to.not.match(/[{}]/);
      expect(arns.filter((arn) => arn.includes("*"))).to.have.length(5);
    });

    it("builds one resource per path segment, shared by the routes below it, with {id} and {model} as path parameters", () => {
      const resource = (name: string) => named("aws:apigateway/resource:Resource", `metered-ai-api-res${name}`);
      expect(resource("-v1-responses").inputs).to.include({ pathPart: "responses", parentId: resource("-v1").id });
      expect(resource("-v1-responses-by-id").inputs).to.include({ pathPart: "{id}", parentId: resource("-v1-responses").id });
      expect(resource("-v1-responses-by-id-input_items").inputs).to.include({ pathPart: "input_items", parentId: resource("-v1-responses-by-id").id });
      expect(resource("-v1-responses-by-id-cancel").inputs).to.include({ pathPart: "cancel", parentId: resource("-v1-responses-by-id").id });
      expect(resource("-v1-models-by-model").inputs).to.include({ pathPart: "{model}", parentId: resource("-v1-models").id });
      // GET and DELETE of one response share its resource.
      const method = (name: string) => named("aws:apigateway/method:Method", `metered-ai-api-method-${name}`).inputs;
      expect(method("get-v1-responses-by-id").resourceId).to.equal(resource("-v1-responses-by-id").id);
      expect(method("delete-v1-responses-by-id")).to.include({ httpMethod: "DELETE", resourceId: resource("-v1-responses-by-id").id, authorization: "CUSTOM", apiKeyRequired: true });
      // Routes that existed before keep their logical names (an update in place, no replacement).
      for (const name of ["-v1", "-v1-models", "-v1-usage", "-v1-chat", "-v1-chat-completions", "-ai-chat", "-stripe-webhook"]) expect(resource(name)).to.not.equal(undefined);
    });

    it("creates the responses table with its hash key and TTL on expires_at, and tells the function its name", () => {
      const table = named("aws:dynamodb/table:Table", "responses-table");
      expect(table.inputs).to.deep.include({ billingMode: "PAY_PER_REQUEST", hashKey: "response_id", ttl: { attributeName: "expires_at", enabled: true } });
      expect(table.inputs.attributes).to.deep.equal([{ name: "response_id", type: "S" }]);
      expect(variables().RESPONSES_TABLE).to.equal(table.state.name).and.match(/^responses-table-[0-9a-f]{7}$/);
    });

    it("serves exactly the routes the function routes", () => {
      expect(CORE_ROUTES.map((r) => `${r.method} ${r.route}`)).to.deep.equal(ROUTES.map((r) => `${r.method} ${r.path}`));
    });
  });

  describe("gateway responses", () => {
    it("customises every response in the table, keeping API Gateway's status for DEFAULT_4XX/5XX", () => {
      const responses = ofType("aws:apigateway/response:Response");
      expect(responses.map((r) => r.inputs.responseType).sort()).to.deep.equal(GATEWAY_RESPONSES.map((s) => s.responseType).sort());
      for (const spec of GATEWAY_RESPONSES) {
        const response = responses.find((r) => r.inputs.responseType === spec.responseType)!.inputs;
        expect(response.restApiId).to.equal(one("aws:apigateway/restApi:RestApi").id);
        if (KEEPS_STATUS.has(spec.responseType)) expect(response.statusCode, spec.responseType).to.equal(undefined);
        else expect(response.statusCode, spec.responseType).to.equal(String(spec.statusCode));
      }
    });

    it("answers in OpenAI's error shape: each template is valid JSON once API Gateway substitutes the method and path", () => {
      for (const response of ofType("aws:apigateway/response:Response")) {
        const template: string = response.inputs.responseTemplates["application/json"];
        const body = JSON.parse(template.split("$context.httpMethod").join("POST").split("$context.path").join("/beta/v1/embeddings"));
        expect(Object.keys(body.error).sort(), response.inputs.responseType).to.deep.equal(["code", "message", "param", "type"]);
        expect(template).to.not.match(/\$(?!context\.(httpMethod|path)\b)/);
      }
      const unknownRoute = ofType("aws:apigateway/response:Response").find((r) => r.inputs.responseType === "MISSING_AUTHENTICATION_TOKEN")!.inputs;
      expect(unknownRoute.responseTemplates["application/json"]).to.include("$context.path");
    });

    it("sends Retry-After when throttled and x-should-retry: false when the quota is spent", () => {
      const byType = Object.fromEntries(ofType("aws:apigateway/response:Response").map((r) => [r.inputs.responseType, r.inputs]));
      expect(byType.THROTTLED).to.include({ statusCode: "429" });
      expect(byType.THROTTLED.responseParameters).to.deep.equal({ "gatewayresponse.header.Retry-After": "'1'" });
      expect(JSON.parse(byType.THROTTLED.responseTemplates["application/json"]).error.code).to.equal("rate_limit_exceeded");
      expect(byType.QUOTA_EXCEEDED.responseParameters).to.deep.equal({ "gatewayresponse.header.x-should-retry": "'false'" });
      expect(JSON.parse(byType.QUOTA_EXCEEDED.responseTemplates["application/json"]).error.code).to.equal("insufficient_quota");
      expect(JSON.parse(byType.INVALID_API_KEY.responseTemplates["application/json"]).error).to.include({ code: "invalid_api_key" });
      expect(JSON.parse(byType.INVALID_API_KEY.responseTemplates["application/json"]).error.message).to.match(/Authorization: Bearer/);
    });
  });

  describe("deployment", () => {
    const tracked = [
      "aws:apigateway/restApi:RestApi",
      "aws:apigateway/resource:Resource",
      "aws:apigateway/method:Method",
      "aws:apigateway/integration:Integration",
      "aws:apigateway/authorizer:Authorizer",
      "aws:apigateway/response:Response",
    ];
    const snapshotOf = (resources: Recorded[]) => Object.fromEntries(resources.filter((r) => tracked.includes(r.type)).map((r) => [r.name, r.inputs]));

    it("derives the redeploy trigger from the inputs of every method, integration, resource, authorizer, gateway response and the API", () => {
      const deployment = one("aws:apigateway/deployment:Deployment");
      expect(deployment.inputs.triggers.redeployment).to.equal(deploymentTrigger(snapshotOf(created)));
    });

    it("changes the trigger when any single input of any of them changes, and not when nothing does", () => {
      const snapshot = snapshotOf(created);
      const base = deploymentTrigger(snapshot);
      expect(deploymentTrigger(JSON.parse(JSON.stringify(snapshot)))).to.equal(base);
      let variants = 0;
      for (const [name, inputs] of Object.entries(snapshot)) {
        for (const field of Object.keys(inputs as object)) {
          const changed = JSON.parse(JSON.stringify(snapshot));
          changed[name][field] = typeof changed[name][field] === "number" ? changed[name][field] + 1 : { edited: changed[name][field] };
          expect(deploymentTrigger(changed), `${name}.${field}`).to.not.equal(base);
          variants++;
        }
        const removed = { ...snapshot };
        delete removed[name];
        expect(deploymentTrigger(removed), `without ${name}`).to.not.equal(base);
      }
      expect(variants).to.be.greaterThan(60);
    });

    it("deploys only after every method, integration, gateway response, the authorizer and every Lambda permission exist", () => {
      const deployment = one("aws:apigateway/deployment:Deployment");
      // The API's own permissions (the forwarder's sweep permission is not part of any deployment).
      const apiPermission = (r: Recorded) => r.type === "aws:lambda/permission:Permission" && r.inputs.principal === "apigateway.amazonaws.com";
      const mustPrecede = created.filter((r) => tracked.slice(1).includes(r.type) || apiPermission(r));
      expect(mustPrecede.length).to.be.greaterThan(20);
      for (const resource of mustPrecede) expect(deployment.options.dependencies, resource.name).to.include(resource.urn);
    });
  });

  describe("stage", () => {
    it("writes JSON access logs to their own log group with the configured retention, never the key itself", () => {
      const stage = one("aws:apigateway/stage:Stage").inputs;
      const accessLogs = named("aws:cloudwatch/logGroup:LogGroup", "metered-ai-api-access-logs");
      expect(accessLogs.inputs.retentionInDays).to.equal(14);
      expect(stage.accessLogSettings).to.deep.equal({ destinationArn: accessLogs.state.arn, format: ACCESS_LOG_FORMAT });
      const line = JSON.parse(ACCESS_LOG_FORMAT.replace(/\$context\.error\.messageString/g, '"Forbidden"').replace(/\$context\.[A-Za-z.]+/g, "x"));
      expect(line).to.have.property("requestId");
      expect(line).to.have.property("apiKeyId");
      expect(ACCESS_LOG_FORMAT).to.not.match(/\$context\.identity\.apiKey(?!Id)/);
    });

    it("sets the region's API Gateway CloudWatch role before the stage enables logging, and keeps it on destroy", () => {
      const account = one("aws:apigateway/account:Account");
      const role = named("aws:iam/role:Role", "metered-ai-api-apigateway-cloudwatch-role");
      expect(JSON.parse(role.inputs.assumeRolePolicy).Statement[0].Principal).to.deep.equal({ Service: "apigateway.amazonaws.com" });
      const attachment = one("aws:iam/rolePolicyAttachment:RolePolicyAttachment");
      expect(attachment.inputs.policyArn).to.equal("arn:aws:iam::aws:policy/service-role/AmazonAPIGatewayPushToCloudWatchLogs");
      expect(account.inputs.cloudwatchRoleArn).to.equal(role.state.arn);
      for (const retained of [account, role, attachment]) expect(retained.options.retainOnDelete, retained.name).to.equal(true);
      expect(one("aws:apigateway/stage:Stage").options.dependencies).to.include(account.urn);
    });

    it("throttles the whole stage at the configured ceiling", () => {
      const settings = one("aws:apigateway/methodSettings:MethodSettings").inputs;
      expect(settings).to.include({ methodPath: "*/*", stageName: "beta" });
      expect(settings.settings).to.deep.equal({ throttlingRateLimit: 10000, throttlingBurstLimit: 5000 });
    });
  });

  describe("function", () => {
    it("deploys nodejs22.x on arm64, unreserved by default, logging to its retained log group", () => {
      const fn = chatFn();
      expect(fn.inputs).to.include({ runtime: "nodejs22.x", handler: "index.handler", memorySize: 512, timeout: 300, reservedConcurrentExecutions: -1 });
      expect(fn.inputs.architectures).to.deep.equal(["arm64"]);
      const logGroup = named("aws:cloudwatch/logGroup:LogGroup", "metered-ai-api-fn-logs");
      expect(logGroup.inputs).to.include({ namePrefix: "/aws/lambda/metered-ai-api-dev-ai-chat-", retentionInDays: 14 });
      expect(fn.inputs.loggingConfig.logGroup).to.equal(logGroup.state.name);
    });

    it("keeps its three secrets in auto-named SSM SecureString parameters, so stacks of one name never collide", () => {
      const parameters = Object.fromEntries(chatParameters().map((p) => [p.name, p]));
      expect(Object.keys(parameters).sort()).to.deep.equal([
        "metered-ai-api-param-moesif-application-id",
        "metered-ai-api-param-stripe-webhook-secret",
        "metered-ai-api-param-upstream-api-key",
      ]);
      for (const parameter of Object.values(parameters)) {
        expect(parameter.inputs.type).to.equal("SecureString");
        expect(parameter.inputs.name, "auto-named").to.equal(undefined);
      }
      const upstream = parameters["metered-ai-api-param-upstream-api-key"].inputs;
      expect(isSecretInput(upstream.value)).to.equal(true);
      expect(unsecret(upstream.value)).to.equal(UPSTREAM_SECRET);
      expect(unsecret(parameters["metered-ai-api-param-moesif-application-id"].inputs.value)).to.equal(MOESIF_APP_ID);
    });

    it("gives the function the parameters' names and no secret value: its environment is plain", () => {
      const environment = chatFn().inputs.environment;
      expect(isSecretInput(environment)).to.equal(false);
      const vars = variables();
      const names = Object.fromEntries(chatParameters().map((p) => [p.name, p.state.name]));
      expect(vars.UPSTREAM_API_KEY_PARAMETER).to.equal(names["metered-ai-api-param-upstream-api-key"]).and.match(/^metered-ai-api-param-upstream-api-key-[0-9a-f]{7}$/);
      expect(vars.MOESIF_APPLICATION_ID_PARAMETER).to.equal(names["metered-ai-api-param-moesif-application-id"]);
      expect(vars.STRIPE_WEBHOOK_SECRET_PARAMETER).to.equal(names["metered-ai-api-param-stripe-webhook-secret"]);
      expect(vars).to.not.have.any.keys("UPSTREAM_API_KEY", "MOESIF_APPLICATION_ID", "STRIPE_WEBHOOK_SECRET", "PLANS", "CUSTOMERS");
      const text = JSON.stringify(vars);
      for (const secret of [UPSTREAM_SECRET, MOESIF_APP_ID, STRIPE_KEY, MOCK_WEBHOOK_SECRET, MOCK_CREDITS_WEBHOOK_SECRET]) expect(text).to.not.include(secret);
    });

    it("puts the parameters' versions in the environment, so a rotated secret replaces warm containers", () => {
      const versions = chatParameters().map((p) => p.state.version);
      expect(versions).to.deep.equal([1, 1, 1]);
      expect(variables().SECRETS_VERSION).to.equal("1.1.1");
      expect(secretsVersion([3, 1])).to.not.equal(secretsVersion([4, 1]));
    });

    it("lets the role read exactly those three parameters, write its own log group, put ledger items and use the customers table, nothing else", () => {
      const policy = JSON.parse(named("aws:iam/rolePolicy:RolePolicy", "metered-ai-api-policy").inputs.policy);
      const parameterArns = chatParameters().map((p) => p.state.arn).sort();
      expect(parameterArns).to.have.length(3);
      for (const arn of parameterArns) expect(arn).to.match(/^arn:aws:ssm:us-east-1:123456789012:parameter\/metered-ai-api-param-[a-z-]+-[0-9a-f]{7}$/);
      const logGroup = named("aws:cloudwatch/logGroup:LogGroup", "metered-ai-api-fn-logs");
      expect(policy.Statement).to.have.length(7);
      expect(policy.Statement[0]).to.deep.equal({ Effect: "Allow", Action: ["logs:CreateLogStream", "logs:PutLogEvents"], Resource: `${logGroup.state.arn}:*` });
      expect(policy.Statement[1]).to.deep.include({ Effect: "Allow", Action: ["ssm:GetParameters", "ssm:GetParameter"] });
      expect([...policy.Statement[1].Resource].sort()).to.deep.equal(parameterArns);
      expect(policy.Statement[2]).to.deep.equal({ Effect: "Allow", Action: ["dynamodb:PutItem"], Resource: named("aws:dynamodb/table:Table", "usage-ledger-table").state.arn });
      // The customers table's three statements: see customers.test.ts.
      const customersArn = named("aws:dynamodb/table:Table", "customers-table").state.arn;
      for (const statement of policy.Statement.slice(3, 6)) expect(String(statement.Resource).startsWith(customersArn)).to.equal(true);
      // The responses table: exactly the three commands the owner store sends, on that table only.
      expect(policy.Statement[6]).to.deep.equal({
        Effect: "Allow",
        Action: ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"],
        Resource: named("aws:dynamodb/table:Table", "responses-table").state.arn,
      });
      expect(JSON.stringify(policy)).to.not.include("kms:");
      expect(ofType("aws:iam/rolePolicyAttachment:RolePolicyAttachment").map((a) => a.inputs.policyArn)).to.not.include("arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole");
    });

    it("tells the function its customers table, store timeout and cache lifetime instead of a CUSTOMERS list, and points PLANS_FILE at plans.json", () => {
      const vars = variables();
      expect(vars).to.not.have.property("CUSTOMERS");
      expect(vars).to.include({
        CUSTOMERS_TABLE: named("aws:dynamodb/table:Table", "customers-table").state.name,
        CUSTOMERS_TIMEOUT_MS: "1000",
        CUSTOMER_CACHE_TTL_MS: "30000",
        PLANS_FILE,
      });
      expect(vars.CUSTOMERS_TABLE).to.match(/^customers-table-[0-9a-f]{7}$/);
    });

    it("writes plans.json, in the function's format with prices in micro-units, into the bundle it deploys", async () => {
      const code = chatFn().inputs.code as pulumi.asset.AssetArchive;
      const assets = (await (code as unknown as { assets: Promise<Record<string, pulumi.asset.FileArchive>> }).assets) as Record<string, pulumi.asset.FileArchive>;
      const dir = await (assets["."] as unknown as { path: Promise<string> }).path;
      expect(fs.existsSync(path.join(dir, "index.js"))).to.equal(true);
      const plans = JSON.parse(fs.readFileSync(path.join(dir, PLANS_FILE), "utf8"));
      expect(plans).to.deep.equal(functionPlans(parseStackConfig({ plans: PLANS }, { forDeploy: false }).plans));
      expect(plans.starter).to.deep.equal({
        models: ["gpt-4o-mini"],
        pricing: { currency: "usd", prices: { "gpt-4o-mini": { input: 150_000, cachedInput: 75_000, output: 600_000 } } },
        billing: "postpaid",
        quota: { limit: 1000, period: "MONTH", offset: 0 },
      });
      expect(plans.pro).to.deep.equal({
        models: ["gpt-4o"],
        pricing: { currency: "usd", prices: { "gpt-4o": { input: 2_500_000, output: 10_000_000 } } },
        billing: "postpaid",
        quota: { limit: 100000, period: "WEEK", offset: 1 },
      });
      expect(plans.free).to.deep.equal({ billing: "postpaid" });
    });

    it("measures the environment at preview as deployed: JSON bytes, generated names at their longest, the largest secrets version", () => {
      const vars = variables();
      const deployed = environmentBytes(vars);
      expect(deployed).to.equal(Buffer.byteLength(JSON.stringify(vars), "utf8"));
      const planned = plannedEnvironment(parseStackConfig({ plans: PLANS, customers: CUSTOMERS, moesifStripeWebhookUrl: WEBHOOK_URL, logRetentionDays: 14 }, { forDeploy: true, stack: "dev" }), "dev");
      // Exact but for SECRETS_VERSION, which the plan sizes for the largest versions ("99999.99999.99999"; here "1.1.1"),
      // and the generated table names, planned at Pulumi's longest auto-name.
      expect(environmentBytes({ ...planned, SECRETS_VERSION: vars.SECRETS_VERSION })).to.equal(deployed);
      expect(environmentBytes(planned)).to.be.greaterThan(deployed);
      expect(deployed).to.be.at.most(4096);
    });
  });

  describe("usage plans and keys", () => {
    it("creates one usage plan per plan with its throttle and quota, on the stage", () => {
      const plans = ofType("aws:apigateway/usagePlan:UsagePlan");
      const byName = Object.fromEntries(plans.map((p) => [p.name, p.inputs]));
      expect(byName["metered-ai-api-plan-starter"].throttleSettings).to.deep.equal({ rateLimit: 2, burstLimit: 5 });
      expect(byName["metered-ai-api-plan-starter"].quotaSettings).to.deep.equal({ limit: 1000, period: "MONTH", offset: 0 });
      expect(byName["metered-ai-api-plan-pro"].quotaSettings).to.deep.equal({ limit: 100000, period: "WEEK", offset: 1 });
      expect(byName["metered-ai-api-plan-free"].quotaSettings).to.equal(undefined);
      const apiId = one("aws:apigateway/restApi:RestApi").id;
      for (const plan of plans) expect(plan.inputs.apiStages).to.deep.equal([{ apiId, stage: "beta" }]);
    });

    it("puts each customer's API key on its plan, deleting the old association before creating a new one", () => {
      const keyId = (customer: string) => named("aws:apigateway/apiKey:ApiKey", `metered-ai-api-key-${customer}`).id;
      const links = ofType("aws:apigateway/usagePlanKey:UsagePlanKey");
      expect(links.map((k) => [k.inputs.keyId, k.inputs.usagePlanId])).to.have.deep.members([
        [keyId("acme"), "metered-ai-api-plan-starter-id"],
        [keyId("globex"), "metered-ai-api-plan-pro-id"],
      ]);
      for (const link of links) {
        expect(link.options.deleteBeforeReplace, link.name).to.equal(true);
        expect(link.inputs.keyType).to.equal("API_KEY");
      }
    });

    it("keeps key values secret in the state: the ApiKey's and the UsagePlanKey's `value`", () => {
      for (const resource of [...ofType("aws:apigateway/apiKey:ApiKey"), ...ofType("aws:apigateway/usagePlanKey:UsagePlanKey")]) {
        expect(resource.state.value, resource.name).to.match(/^[A-Za-z0-9]{40}$/);
        expect(resource.options.additionalSecretOutputs, resource.name).to.include("value");
      }
    });

    it("replaces only the association when a customer changes plan: the key's inputs stay identical", async () => {
      const moved = await runProgram(withConfig({ [`${PROJECT}:customers`]: JSON.stringify({ ...CUSTOMERS, acme: { plan: "pro", stripeCustomerId: "cus_acme" } }) }));
      const before = finder(created);
      const after = finder(moved.created);
      const key = "metered-ai-api-key-acme";
      expect(after.named("aws:apigateway/apiKey:ApiKey", key).inputs).to.deep.equal(before.named("aws:apigateway/apiKey:ApiKey", key).inputs);
      const link = "metered-ai-api-plan-key-acme";
      const [oldLink, newLink] = [before.named("aws:apigateway/usagePlanKey:UsagePlanKey", link), after.named("aws:apigateway/usagePlanKey:UsagePlanKey", link)];
      // keyId, keyType and usagePlanId are ForceNew in terraform-provider-aws (usage_plan_key.go): a change replaces.
      const changed = Object.keys(newLink.inputs).filter((field) => JSON.stringify(newLink.inputs[field]) !== JSON.stringify(oldLink.inputs[field]));
      expect(changed).to.deep.equal(["usagePlanId"]);
      expect(newLink.inputs.usagePlanId).to.equal("metered-ai-api-plan-pro-id");
      expect(newLink.options.deleteBeforeReplace).to.equal(true);
    });
  });

  describe("stack outputs and the secret scan", () => {
    it("exports the URLs, ids, names and secrets, with key values and the webhook secret kept secret", async () => {
      const api = one("aws:apigateway/restApi:RestApi").state;
      const base = `https://${api.executionArn.split(":").pop()}.execute-api.us-east-1.amazonaws.com/beta`;
      expect(await promiseOf(program.invokeUrl)).to.equal(base);
      expect(await promiseOf(program.aiChatUrl)).to.equal(`${base}/ai-chat`);
      expect(await promiseOf(program.openaiBaseUrl)).to.equal(`${base}/v1`);
      const keyIds = await promiseOf(program.apiKeyIds);
      expect(Object.keys(keyIds)).to.have.members(["acme", "globex"]);
      expect(await promiseOf(program.usagePlanIds)).to.deep.equal({ starter: "metered-ai-api-plan-starter-id", pro: "metered-ai-api-plan-pro-id", free: "metered-ai-api-plan-free-id" });
      expect(await pulumi.isSecret(program.apiKeys)).to.equal(true);
      expect(await promiseOf(program.apiKeys)).to.deep.equal({ acme: mockApiKeyValue("metered-ai-api-key-acme"), globex: mockApiKeyValue("metered-ai-api-key-globex") });
      expect(await pulumi.isSecret(program.stripeWebhookSecret)).to.equal(true);
      expect(await promiseOf(program.functionName)).to.equal(chatFn().state.name);
      expect(await promiseOf(program.authorizerFunctionName)).to.equal(authorizerFn().state.name);
      expect(await promiseOf(program.accessLogGroupName)).to.equal(named("aws:cloudwatch/logGroup:LogGroup", "metered-ai-api-access-logs").state.name);
      expect(await promiseOf(program.functionLogGroupName)).to.equal(chatFn().inputs.loggingConfig.logGroup);
      expect(await promiseOf(program.stripeWebhookEndpointId)).to.equal(named("stripe:index/webhookEndpoint:WebhookEndpoint", "moesif-stripe-endpoint").id).and.match(/^we_/);
    });

    it("outputs the responses table's name and ARN", async () => {
      const table = named("aws:dynamodb/table:Table", "responses-table");
      expect(await promiseOf(program.responsesTableName)).to.equal(table.state.name);
      expect(await promiseOf(program.responsesTableArn)).to.equal(table.state.arn);
    });

    it("hands the whole plain-text state and every non-secret output to the secret scan", async () => {
      const outputs = stackOutputs(program);
      expect(outputs.map(([name]) => name)).to.include.members(["invokeUrl", "apiKeys", "apiKeyIds", "usagePlanIds", "functionName", "stripeWebhookSecret"]);
      for (const [name, output] of outputs) {
        if (await pulumi.isSecret(output)) continue;
        recordForScan(`stack output ${name}`, [JSON.stringify(await promiseOf(output))]);
      }
      const states = created.map((r) => JSON.stringify(plainState(r)));
      recordForScan("resource state", states);
      // The scan sees the state: every key value is there unless marked secret.
      const keyValues = ofType("aws:apigateway/apiKey:ApiKey").map((k) => k.state.value as string);
      expect(created.map((r) => JSON.stringify(redactSecrets(r.state))).join("\n")).to.include(keyValues[0]);
      for (const value of [...keyValues, UPSTREAM_SECRET, MOESIF_APP_ID, STRIPE_KEY, MOCK_WEBHOOK_SECRET, MOCK_CREDITS_WEBHOOK_SECRET]) {
        for (const state of states) expect(state).to.not.include(value);
      }
    });
  });

  it("points a Stripe webhook at Moesif with the explicit customer, subscription and invoice events", () => {
    const endpoint = named("stripe:index/webhookEndpoint:WebhookEndpoint", "moesif-stripe-endpoint");
    expect(endpoint.inputs.url).to.equal(WEBHOOK_URL);
    expect(endpoint.inputs.enabledEvents).to.deep.equal([...MOESIF_STRIPE_EVENTS]);
    for (const event of endpoint.inputs.enabledEvents) expect(event).to.not.include("*");
  });

  it("writes a log policy scoped to one log group", () => {
    const policy = JSON.parse(logWritePolicy("arn:aws:logs:us-east-1:1:log-group:/aws/lambda/x"));
    expect(policy.Statement).to.deep.equal([{ Effect: "Allow", Action: ["logs:CreateLogStream", "logs:PutLogEvents"], Resource: "arn:aws:logs:us-east-1:1:log-group:/aws/lambda/x:*" }]);
  });

  describe("settings from the stack config", () => {
    it("reserves concurrency, throttles the stage and leaves the region's API Gateway account alone when told to", async () => {
      const { created: custom } = await runProgram(
        withConfig({
          [`${PROJECT}:reservedConcurrency`]: "50",
          [`${PROJECT}:stageThrottleRateLimit`]: "200",
          [`${PROJECT}:stageThrottleBurstLimit`]: "100",
          [`${PROJECT}:manageApiGatewayAccount`]: "false",
        }),
      );
      const find = finder(custom);
      expect(find.named("aws:lambda/function:Function", "metered-ai-api-fn").inputs.reservedConcurrentExecutions).to.equal(50);
      expect(find.one("aws:apigateway/methodSettings:MethodSettings").inputs.settings).to.deep.equal({ throttlingRateLimit: 200, throttlingBurstLimit: 100 });
      expect(find.ofType("aws:apigateway/account:Account")).to.have.length(0);
      expect(find.ofType("aws:iam/rolePolicyAttachment:RolePolicyAttachment")).to.have.length(0);
    });

    it("names resources validly for a stack called my.stack, and leaves unique-per-account names to auto-naming", async () => {
      const { created: dotted } = await runProgram(baseConfig, "my.stack");
      const find = finder(dotted);
      for (const fn of find.ofType("aws:lambda/function:Function")) {
        expect(fn.inputs.name, fn.name).to.equal(undefined);
        expect(fn.state.name).to.match(/^[A-Za-z0-9_-]{1,64}$/);
      }
      for (const role of find.ofType("aws:iam/role:Role")) expect(role.inputs.name, role.name).to.equal(undefined);
      for (const group of find.ofType("aws:cloudwatch/logGroup:LogGroup")) {
        expect(group.inputs.name, group.name).to.equal(undefined);
        expect(group.inputs.namePrefix).to.match(/^[A-Za-z0-9_\-/.#]+$/).and.include("my-stack");
      }
      for (const parameter of find.ofType("aws:ssm/parameter:Parameter")) expect(parameter.inputs.name).to.equal(undefined);
      const names = dotted.filter((r) => typeof r.inputs?.name === "string").map((r) => r.inputs.name as string);
      expect(names.length).to.be.greaterThan(5);
      for (const name of names) expect(name).to.not.include("my.stack");
      const vars = find.named("aws:lambda/function:Function", "metered-ai-api-fn").inputs.environment.variables;
      expect(vars.UPSTREAM_API_KEY_PARAMETER).to.match(/^metered-ai-api-param-upstream-api-key-[0-9a-f]{7}$/);
    });
  });

  describe("bad config fails the program with a message naming the key", () => {
    const cases: Array<[string, Record<string, string | undefined>, RegExp]> = [
      ["a customer on an unknown plan", { [`${PROJECT}:customers`]: JSON.stringify({ acme: { plan: "gold" } }) }, /metered-ai-api:customers\.acme\.plan.*unknown plan "gold"/],
      ["a quota period that is not DAY/WEEK/MONTH", { [`${PROJECT}:plans`]: JSON.stringify({ starter: { rateLimit: 1, burstLimit: 1, quota: { limit: 5, period: "YEAR" } } }) }, /plans\.starter\.quota\.period.*DAY, WEEK or MONTH/],
      ["a WEEK quota offset above 6", { [`${PROJECT}:plans`]: JSON.stringify({ starter: { rateLimit: 1, burstLimit: 1, quota: { limit: 5, period: "WEEK", offset: 7 } } }) }, /plans\.starter\.quota\.offset.*0 to 6/],
      ["a missing webhook URL", { [`${PROJECT}:moesifStripeWebhookUrl`]: undefined }, /moesifStripeWebhookUrl.*required/],
      ["a non-positive rate limit", { [`${PROJECT}:plans`]: JSON.stringify({ starter: { rateLimit: 0, burstLimit: 1 } }) }, /plans\.starter\.rateLimit.*positive/],
      ["no plans", { [`${PROJECT}:plans`]: undefined }, /metered-ai-api:plans/],
      ["a missing upstream key", { [`${PROJECT}:upstreamApiKey`]: undefined }, /upstreamApiKey.*pulumi config set --secret/],
      ["a missing Moesif application id", { [`${PROJECT}:moesifApplicationId`]: undefined }, /moesifApplicationId.*pulumi config set --secret/],
      ["an http webhook URL", { [`${PROJECT}:moesifStripeWebhookUrl`]: "http://insecure.example" }, /moesifStripeWebhookUrl.*https/],
      ["an http upstream that is not loopback", { [`${PROJECT}:upstreamBaseUrl`]: "http://10.0.0.5:8000/v1" }, /upstreamBaseUrl.*https:\/\//],
      ["the old price shape", { [`${PROJECT}:plans`]: JSON.stringify({ starter: { rateLimit: 1, burstLimit: 1, prices: { inputPer1k: 0.0003, outputPer1k: 0.0012, currency: "usd" } } }) }, /plans\.starter\.prices.*old.*gpt-4o-mini: \{input: 0\.15/],
      ["a listed model without a price", { [`${PROJECT}:plans`]: JSON.stringify({ starter: { rateLimit: 1, burstLimit: 1, models: ["gpt-4o", "gpt-4o-mini"], prices: { "gpt-4o-mini": { input: 0.15, output: 0.6 } } } }) }, /plans\.starter\.prices.*no price for "gpt-4o"/],
      ["a buffered deadline past API Gateway's 5-minute stream idle timeout", { [`${PROJECT}:upstreamTimeoutMs`]: "298000", [`${PROJECT}:lambdaTimeoutSeconds`]: "900" }, /upstreamTimeoutMs.*303000 ms exceeds API Gateway's 5-minute idle timeout/],
      ["a prepaid plan without prices", { [`${PROJECT}:plans`]: JSON.stringify({ starter: { rateLimit: 1, burstLimit: 1, billing: "prepaid" } }) }, /plans\.starter\.billing.*prepaid needs prices/],
      ["an output cap of 0", { [`${PROJECT}:plans`]: JSON.stringify({ ...PLANS, free: { rateLimit: 1, burstLimit: 1, maxOutputTokens: 0 } }) }, /plans\.free\.maxOutputTokens.*1 to 1000000/],
      ["a customer status that is neither active nor suspended", { [`${PROJECT}:customers`]: JSON.stringify({ acme: { plan: "starter", status: "paused" } }) }, /customers\.acme\.status.*"active" or "suspended"/],
      ["a customers-table timeout above 10 s", { [`${PROJECT}:customersTimeoutMs`]: "10001" }, /customersTimeoutMs.*1 to 10000/],
      ["a customer cache lifetime of 0", { [`${PROJECT}:customerCacheTtlMs`]: "0" }, /customerCacheTtlMs.*1 to 3600000/],
      ["an unknown architecture", { [`${PROJECT}:lambdaArchitecture`]: "sparc" }, /lambdaArchitecture/],
    ];
    for (const [name, change, message] of cases) {
      it(`rejects ${name}`, async () => {
        let failure: unknown;
        try {
          await runProgram(withConfig(change));
        } catch (err) {
          failure = err;
        }
        expect(failure, "the program accepted bad config").to.be.instanceOf(Error);
        expect((failure as Error).message).to.match(message);
      });
    }
  });
});
