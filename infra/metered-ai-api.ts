import { createHash } from "node:crypto";
import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import { chatCustomersStatements, keyItemArgs } from "./customers-table";
import { ROUTES, sanitizeStackName, STRIPE_WEBHOOK_PATH, STRIPE_WEBHOOK_SECRET_PARAMETER } from "./function-env";
import { chatResponsesStatements } from "./responses-table";
import { GATEWAY_RESPONSES, gatewayResponseParameters, gatewayResponseTemplate, KEEPS_STATUS } from "./gateway-responses";
import { type CustomerConfig, type PlanConfig } from "./stack-config";
import { StripeCreditsWebhook } from "./stripe-credits-webhook";

export { ROUTES, type RouteSpec } from "./function-env";

/**
 * The stage variable the authorizer names as its identity source. Why not "no identity source": the AWS provider
 * defaults `identitySource` to `method.request.header.Authorization` (terraform-provider-aws
 * internal/service/apigateway/authorizer.go, `Default: "method.request.header.Authorization"`) and the API refuses
 * an empty one (hashicorp/terraform-provider-aws#12069), so "none" cannot be expressed. A header source would make
 * API Gateway answer 401 without calling the authorizer whenever that header is missing ("If a specified identify
 * source is missing, null, or empty, API Gateway returns a 401 Unauthorized response without calling the authorizer
 * Lambda function", API Gateway developer guide, configure-api-gateway-lambda-authorization-with-console), which
 * would lock out x-api-key-only or Bearer-only clients. A stage variable the stage always sets is present on every
 * request. With caching disabled (TTL 0, below) it is only checked, never used as a cache key; caching must stay
 * off, or every caller would share one cached key.
 */
export const AUTHORIZER_STAGE_VARIABLE = "apiKeyAuthorizer";

/**
 * The stage's access log line (JSON; API Gateway requires `$context.requestId`). Only the API key's id, never the
 * key (`$context.identity.apiKey`). Caller-controlled strings (user agent, raw path) are left out: API Gateway
 * substitutes them unescaped, and one quote would break the line's JSON; `$context.error.messageString` is the
 * quoted form API Gateway provides for exactly this reason.
 */
export const ACCESS_LOG_FORMAT =
  "{" +
  [
    `"requestId":"$context.requestId"`,
    `"extendedRequestId":"$context.extendedRequestId"`,
    `"requestTimeEpoch":"$context.requestTimeEpoch"`,
    `"ip":"$context.identity.sourceIp"`,
    `"httpMethod":"$context.httpMethod"`,
    `"resourcePath":"$context.resourcePath"`,
    `"status":"$context.status"`,
    `"protocol":"$context.protocol"`,
    `"responseLength":"$context.responseLength"`,
    `"apiKeyId":"$context.identity.apiKeyId"`,
    `"errorType":"$context.error.responseType"`,
    `"errorMessage":$context.error.messageString`,
    `"authorizerLatencyMs":"$context.authorizer.latency"`,
    `"integrationLatencyMs":"$context.integration.latency"`,
    `"integrationStatus":"$context.integration.status"`,
    `"responseLatencyMs":"$context.responseLatency"`,
  ].join(",") +
  "}";

/** One SSM SecureString parameter the function may read. */
export interface SecretParameterArgs {
  /** The function's environment variable that receives the parameter's (auto-generated) name. */
  envVar: string;
  /** Part of the parameter's logical name, e.g. `upstream-api-key`. */
  slug: string;
  value: pulumi.Input<string>;
  description?: string;
}

export interface MeteredAiApiArgs {
  /** Deployed function code: a directory archive with `index.js` exporting `handler` (and `plans.json`). */
  code: pulumi.Input<pulumi.asset.Archive>;
  /** The API key authorizer's code: a directory archive with `index.js` exporting `handler`. */
  authorizerCode: pulumi.Input<pulumi.asset.Archive>;
  /** Stage name in the invoke URL. @default "beta" */
  stageName?: string;
  /** Usage plans by name: throttle, quota and allowed models. */
  plans: Record<string, PlanConfig>;
  /** Customers by id; each gets an API key on its plan (and, with `customersTable`, its key item there). */
  customers: Record<string, CustomerConfig>;
  /**
   * Function environment besides the generated names the component adds (tables, SSM parameters). Plain strings
   * only: secrets go in `secretParameters`, so the environment never holds one.
   */
  environment: Record<string, string>;
  /** SSM SecureString parameters created for the function, which its role may read (and nothing else). */
  secretParameters?: SecretParameterArgs[];
  /**
   * The usage ledger the function writes each request's usage to (`LEDGER_TABLE`); its role may PutItem there and do
   * nothing else with it. Absent: no ledger, the function meters through the direct Moesif send only.
   */
  ledger?: { tableName: pulumi.Input<string>; tableArn: pulumi.Input<string> };
  /**
   * The customers table (`CUSTOMERS_TABLE`): the component writes each customer's key item there, and the function
   * may read key and account items, update account items and query the Stripe customer index (`chatCustomersStatements`).
   */
  customersTable?: { tableName: pulumi.Input<string>; tableArn: pulumi.Input<string> };
  /**
   * The responses table (`RESPONSES_TABLE`): who created each stored Responses API response; the function may
   * Get/Put/UpdateItem there (`chatResponsesStatements`). Absent: the function keeps owners in memory per instance.
   */
  responsesTable?: { tableName: pulumi.Input<string>; tableArn: pulumi.Input<string> };
  /**
   * Creates the Stripe webhook endpoint for credit purchases at `<stage>/stripe/webhook` and gives the function its
   * signing secret as an SSM parameter (STRIPE_WEBHOOK_SECRET_PARAMETER). Needs the Stripe provider's key.
   */
  stripeCreditsWebhook?: { events?: readonly string[] };
  /** @default 512 */
  memoryMb?: number;
  /** Function timeout, also the (streamed) integration's. @default 300 */
  timeoutSeconds?: number;
  /** @default "arm64" */
  architecture?: "arm64" | "x86_64";
  /** CloudWatch retention of the function's, the authorizer's and the access log groups. @default 30 */
  logRetentionDays?: number;
  /** Reserved concurrency of the function; -1 leaves it unreserved. @default -1 */
  reservedConcurrency?: number;
  /** Stage-wide default method throttle, a ceiling above the plans. @default { rateLimit: 10000, burstLimit: 5000 } */
  stageThrottle?: { rateLimit: number; burstLimit: number };
  /**
   * Set the region's API Gateway CloudWatch role (access logs need it). The setting is region-wide and has no
   * delete; the role and the setting are retained on `pulumi destroy`. @default true
   */
  manageApiGatewayAccount?: boolean;
}

/**
 * The metered API: the ai-chat Lambda (secrets from SSM), a REQUEST authorizer that accepts the key as
 * `x-api-key` or `Authorization: Bearer`, a REGIONAL REST API whose every method but Stripe's webhook requires an API
 * key, OpenAI-shaped gateway responses, a stage with JSON access logs and a throttle ceiling, one usage plan per plan,
 * one API key per customer with its key item in the customers table, and the Stripe webhook endpoint for credits.
 */
export class MeteredAiApi extends pulumi.ComponentResource {
  /** Stage base URL, e.g. `https://abc.execute-api.us-east-1.amazonaws.com/beta`. */
  public readonly invokeUrl: pulumi.Output<string>;
  public readonly functionName: pulumi.Output<string>;
  public readonly functionLogGroupName: pulumi.Output<string>;
  public readonly authorizerFunctionName: pulumi.Output<string>;
  public readonly accessLogGroupName: pulumi.Output<string>;
  public readonly restApiId: pulumi.Output<string>;
  /** Customer id → API key id. */
  public readonly apiKeyIds: pulumi.Output<Record<string, string>>;
  /** Customer id → API key value (secret). */
  public readonly apiKeyValues: pulumi.Output<Record<string, string>>;
  /** The function's environment variable → the SSM parameter it names (names only, never values). */
  public readonly parameterNames: pulumi.Output<Record<string, string>>;
  /** Plan name → usage plan id. */
  public readonly usagePlanIds: pulumi.Output<Record<string, string>>;
  /** With `stripeCreditsWebhook`: the URL Stripe posts credit purchases to, and the endpoint's id. */
  public readonly stripeCreditsWebhookUrl?: pulumi.Output<string>;
  public readonly stripeCreditsWebhookEndpointId?: pulumi.Output<string>;

  constructor(name: string, args: MeteredAiApiArgs, opts?: pulumi.ComponentResourceOptions) {
    super("metered-ai-api:index:MeteredAiApi", name, {}, opts);
    const parent = { parent: this };
    const stageName = args.stageName ?? "beta";
    const timeoutSeconds = args.timeoutSeconds ?? 300;
    const retentionInDays = args.logRetentionDays ?? 30;
    // Human-readable names where AWS does not require them to be unique (API, plans, keys). Names AWS does require
    // unique per account and region (functions, roles, log groups) are left to Pulumi's auto-naming, so two
    // backends with a stack of the same name cannot collide.
    const label = `${name}-${sanitizeStackName(pulumi.getStack())}`;

    // One API key per customer; which customer and plan it belongs to is the key's item in the customers table.
    const apiKeys = Object.entries(args.customers).map(([customerId, customer]) => ({
      customerId,
      customer,
      key: new aws.apigateway.ApiKey(
        `${name}-key-${customerId}`,
        { name: `${label}-${customerId}`, enabled: true, description: `metered-ai-api customer ${customerId}` },
        parent,
      ),
    }));
    // Exactly keyItem(apiKeyId, customerId, customer): see infra/customers-table.ts for how the provider writes, reads
    // back and updates it.
    const customersTable = args.customersTable;
    const keyItems = customersTable
      ? apiKeys.map(({ customerId, customer, key }) => new aws.dynamodb.TableItem(`${name}-customer-${customerId}`, keyItemArgs(customersTable.tableName, key.id, customerId, customer), parent))
      : [];

    // Everything a deployment snapshots is tracked here with the exact args its resource is built from; the
    // deployment trigger hashes them, so any edit to a method, integration, resource, authorizer, gateway response or
    // API setting redeploys, without a hand-maintained list.
    const snapshot: Record<string, pulumi.Input<unknown>> = {};
    const tracked = <T>(logicalName: string, resourceArgs: T): T => {
      snapshot[logicalName] = resourceArgs as pulumi.Input<unknown>;
      return resourceArgs;
    };

    // The REST API comes before the function: the credits webhook's URL is built from its id, and that webhook's
    // signing secret is one of the function's parameters (the stage, which depends on the function, cannot be used).
    const apiName = `${name}-api`;
    const api = new aws.apigateway.RestApi(
      apiName,
      tracked(apiName, {
        name: label,
        endpointConfiguration: { types: "REGIONAL" },
        // The key comes from the authorizer's usageIdentifierKey, so it may arrive as `x-api-key` or as
        // `Authorization: Bearer` ("AUTHORIZER: You have a Lambda authorizer return the API key as part of the
        // authorization response", API Gateway developer guide, api-gateway-api-key-source).
        apiKeySource: "AUTHORIZER",
        // Every body reaches the function base64-encoded and byte-exact (so invalid UTF-8 is seen and refused, not
        // replaced). Answers are unaffected: a proxy result with isBase64Encoded false is sent as the text it is
        // (the developer guide's lambda-proxy-binary-media example with binary media types "*/*" returns
        // "<h1>This is text</h1>" without isBase64Encoded).
        binaryMediaTypes: ["*/*"],
      }),
      parent,
    );

    let creditsWebhook: StripeCreditsWebhook | undefined;
    if (args.stripeCreditsWebhook) {
      const region = aws.getRegionOutput({}, { parent: this });
      const partition = aws.getPartitionOutput({}, { parent: this });
      creditsWebhook = new StripeCreditsWebhook(
        `${name}-stripe-credits`,
        { restApiId: api.id, region: region.region, dnsSuffix: partition.dnsSuffix, stageName, path: STRIPE_WEBHOOK_PATH, events: args.stripeCreditsWebhook.events },
        parent,
      );
    }
    const secretParameters: SecretParameterArgs[] = [
      ...(args.secretParameters ?? []),
      ...(creditsWebhook ? [{ ...STRIPE_WEBHOOK_SECRET_PARAMETER, value: creditsWebhook.signingSecret }] : []),
    ];
    const parameters = secretParameters.map(
      (p) =>
        // No `name`: auto-named, so stacks of one name in one account and region never collide.
        new aws.ssm.Parameter(`${name}-param-${p.slug}`, { type: aws.ssm.ParameterType.SecureString, value: p.value, description: p.description }, parent),
    );

    // --- the ai-chat function ---
    const logGroup = new aws.cloudwatch.LogGroup(`${name}-fn-logs`, { namePrefix: `/aws/lambda/${label}-ai-chat-`, retentionInDays }, parent);
    const role = new aws.iam.Role(`${name}-role`, { assumeRolePolicy: lambdaAssumeRolePolicy() }, parent);
    // Its own log group and exactly its parameters; no AWSLambdaBasicExecutionRole (it allows every log group).
    const rolePolicy = new aws.iam.RolePolicy(
      `${name}-policy`,
      {
        role: role.id,
        policy: pulumi
          .all([logGroup.arn, pulumi.all(parameters.map((p) => p.arn)), args.ledger?.tableArn, args.customersTable?.tableArn, args.responsesTable?.tableArn])
          .apply(([logArn, parameterArns, ledgerTableArn, customersTableArn, responsesTableArn]) =>
            functionPolicy(logArn, parameterArns, { ledgerTableArn, customersTableArn, responsesTableArn }),
          ),
      },
      parent,
    );
    // SECRETS_VERSION changes whenever a parameter's value does (SSM bumps its version), so a rotated secret reaches
    // every container: the configuration update replaces the warm ones, which cache the secrets for their life.
    // No customer is in it: the function looks keys up in the customers table, so its size does not grow with them.
    const environment = pulumi
      .all([pulumi.all(parameters.map((p) => p.version)), pulumi.all(parameters.map((p) => p.name)), args.ledger?.tableName, args.customersTable?.tableName, args.responsesTable?.tableName])
      .apply(([versions, names, ledgerTable, customersTable, responsesTable]) => ({
        ...args.environment,
        ...(ledgerTable ? { LEDGER_TABLE: ledgerTable } : {}),
        ...(customersTable ? { CUSTOMERS_TABLE: customersTable } : {}),
        ...(responsesTable ? { RESPONSES_TABLE: responsesTable } : {}),
        ...Object.fromEntries(secretParameters.map((p, i) => [p.envVar, names[i]])),
        ...(parameters.length > 0 ? { SECRETS_VERSION: secretsVersion(versions) } : {}),
      }));
    const fn = new aws.lambda.Function(
      `${name}-fn`,
      {
        description: `metered-ai-api chat proxy (${label})`,
        runtime: aws.lambda.Runtime.NodeJS22dX,
        architectures: [args.architecture ?? "arm64"],
        handler: "index.handler",
        code: args.code,
        role: role.arn,
        memorySize: args.memoryMb ?? 512,
        timeout: timeoutSeconds,
        reservedConcurrentExecutions: args.reservedConcurrency ?? -1,
        environment: { variables: environment },
        loggingConfig: { logFormat: "Text", logGroup: logGroup.name },
      },
      // After the key items: a function that looks customers up in the table (the first deployment, or the upgrade
      // from the CUSTOMERS variable) never serves before every key of the stack config is there.
      { parent: this, dependsOn: [rolePolicy, logGroup, ...parameters, ...keyItems] },
    );

    // --- the API key authorizer ---
    const authorizerLogGroup = new aws.cloudwatch.LogGroup(`${name}-authorizer-logs`, { namePrefix: `/aws/lambda/${label}-authorizer-`, retentionInDays }, parent);
    const authorizerRole = new aws.iam.Role(`${name}-authorizer-role`, { assumeRolePolicy: lambdaAssumeRolePolicy() }, parent);
    const authorizerPolicy = new aws.iam.RolePolicy(`${name}-authorizer-policy`, { role: authorizerRole.id, policy: authorizerLogGroup.arn.apply(logWritePolicy) }, parent);
    const authorizerFn = new aws.lambda.Function(
      `${name}-authorizer`,
      {
        description: `metered-ai-api API key authorizer (${label})`,
        runtime: aws.lambda.Runtime.NodeJS22dX,
        architectures: ["arm64"],
        handler: "index.handler",
        code: args.authorizerCode,
        role: authorizerRole.arn,
        // No I/O, no dependencies: the smallest size is enough, and it runs once per request.
        memorySize: 128,
        timeout: 5,
        // It logs nothing itself; WARN drops the START/REPORT lines Lambda writes per invocation at INFO ("By default,
        // Lambda sets the system log level to INFO ... sends start and report log messages", Lambda developer guide,
        // monitoring-cloudwatchlogs-log-level). Log-level filtering requires the JSON format.
        loggingConfig: { logFormat: "JSON", systemLogLevel: "WARN", applicationLogLevel: "WARN", logGroup: authorizerLogGroup.name },
      },
      { parent: this, dependsOn: [authorizerPolicy, authorizerLogGroup] },
    );

    const authorizerName = `${name}-authorizer-key`;
    const authorizer = new aws.apigateway.Authorizer(
      authorizerName,
      tracked(authorizerName, {
        restApi: api.id,
        name: `${label}-api-key`,
        type: "REQUEST",
        authorizerUri: authorizerFn.invokeArn,
        identitySource: `stageVariables.${AUTHORIZER_STAGE_VARIABLE}`,
        authorizerResultTtlInSeconds: 0,
      }),
      parent,
    );
    // Only this API's authorizer may invoke the authorizer function.
    const authorizerPermission = new aws.lambda.Permission(
      `${name}-authorizer-permission`,
      {
        action: "lambda:InvokeFunction",
        function: authorizerFn.name,
        principal: "apigateway.amazonaws.com",
        sourceArn: pulumi.interpolate`${api.executionArn}/authorizers/${authorizer.id}`,
      },
      parent,
    );

    // One Resource per path segment, shared by routes (/v1 is the parent of /v1/chat and /v1/models).
    const resources = new Map<string, aws.apigateway.Resource>();
    const resourceFor = (path: string): pulumi.Output<string> => {
      if (path === "") return api.rootResourceId;
      const existing = resources.get(path);
      if (existing) return existing.id;
      const slash = path.lastIndexOf("/");
      const resourceName = `${name}-res${routeSlug(path)}`;
      const resource = new aws.apigateway.Resource(
        resourceName,
        tracked(resourceName, { restApi: api.id, parentId: resourceFor(path.slice(0, slash)), pathPart: path.slice(slash + 1) }),
        parent,
      );
      resources.set(path, resource);
      return resource.id;
    };

    const snapshotParts: pulumi.Resource[] = [authorizer];
    const permissions: pulumi.Resource[] = [authorizerPermission];
    for (const route of ROUTES) {
      const slug = `${route.method.toLowerCase()}${routeSlug(route.path)}`;
      const resourceId = resourceFor(route.path);
      const methodName = `${name}-method-${slug}`;
      const method = new aws.apigateway.Method(
        methodName,
        tracked(
          methodName,
          route.apiKeyRequired
            ? {
                restApi: api.id,
                resourceId,
                httpMethod: route.method,
                authorization: "CUSTOM",
                authorizerId: authorizer.id,
                // The authorizer finds the key; API Gateway still checks it against the usage plans (throttle, quota).
                apiKeyRequired: true,
              }
            : {
                // Stripe's webhook: Stripe sends no API key; the function verifies Stripe's signature on the raw body
                // instead, and answers 400 to anything unsigned. Only the stage-wide throttle applies.
                restApi: api.id,
                resourceId,
                httpMethod: route.method,
                authorization: "NONE",
                apiKeyRequired: false,
              },
        ),
        parent,
      );
      const integrationName = `${name}-integration-${slug}`;
      const integration = new aws.apigateway.Integration(
        integrationName,
        tracked(integrationName, {
          restApi: api.id,
          resourceId,
          httpMethod: method.httpMethod,
          type: "AWS_PROXY",
          // Lambda proxy integrations are always invoked with POST, whatever the route's method.
          integrationHttpMethod: "POST",
          // Every route streams (InvokeWithResponseStream): `stream: true` answers flow chunk by chunk past API
          // Gateway's 29 s buffered limit, and buffered answers are one write of the same stream
          // (https://docs.aws.amazon.com/apigateway/latest/developerguide/response-transfer-mode-lambda.html).
          responseTransferMode: "STREAM",
          uri: fn.responseStreamingInvokeArn,
          // The integration waits as long as the function may run (at most 900 s in STREAM mode).
          timeoutMilliseconds: Math.min(timeoutSeconds * 1000, 900_000),
        }),
        parent,
      );
      snapshotParts.push(method, integration);
      // Scoped to this API, this stage and this method + path: nothing else may invoke the function.
      permissions.push(
        new aws.lambda.Permission(
          `${name}-permission-${slug}`,
          {
            action: "lambda:InvokeFunction",
            function: fn.name,
            principal: "apigateway.amazonaws.com",
            sourceArn: pulumi.interpolate`${api.executionArn}/${stageName}/${route.method}${permissionPath(route.path)}`,
          },
          parent,
        ),
      );
    }

    // API Gateway's own answers (bad key, unknown route, throttle, quota, …) in OpenAI's error shape.
    for (const spec of GATEWAY_RESPONSES) {
      const responseName = `${name}-response-${spec.responseType.toLowerCase().replace(/_/g, "-")}`;
      snapshotParts.push(
        new aws.apigateway.Response(
          responseName,
          tracked(responseName, {
            restApiId: api.id,
            responseType: spec.responseType,
            // DEFAULT_4XX/5XX keep API Gateway's status: setting theirs would change every other 4XX/5XX response's
            // status too (developer guide, supported-gateway-response-types).
            ...(KEEPS_STATUS.has(spec.responseType) ? {} : { statusCode: String(spec.statusCode) }),
            responseTemplates: { "application/json": gatewayResponseTemplate(spec) },
            responseParameters: gatewayResponseParameters(spec),
          }),
          parent,
        ),
      );
    }

    // A REST API serves a snapshot taken by a Deployment; gateway responses, too, take effect only when deployed.
    // Removing a route changes this hash as well: the new deployment (without the route) goes live on the stage
    // before Pulumi deletes the route's method, integration and permission (deletes run after every create and
    // update), so no deployed route is ever left without its permission. Depending on the permissions means a new
    // route is never served before it may invoke the function.
    const deployment = new aws.apigateway.Deployment(
      `${name}-deployment`,
      { restApi: api.id, description: "metered-ai-api", triggers: { redeployment: pulumi.output(snapshot).apply(deploymentTrigger) } },
      { parent: this, dependsOn: [...resources.values(), ...snapshotParts, ...permissions] },
    );

    // --- access logs: the region's API Gateway CloudWatch role must be set first ---
    const accountDependencies: pulumi.Resource[] = [];
    if (args.manageApiGatewayAccount ?? true) {
      // Region-wide settings with no delete (terraform-provider-aws account.go: "There is no API for deleting
      // account or resetting it"); retained so that destroying this stack never leaves the region pointing at a
      // deleted role, which would break logging for every other API in the region.
      const retained = { parent: this, retainOnDelete: true };
      const cloudwatchRole = new aws.iam.Role(`${name}-apigateway-cloudwatch-role`, { assumeRolePolicy: apiGatewayAssumeRolePolicy() }, retained);
      const attachment = new aws.iam.RolePolicyAttachment(
        `${name}-apigateway-cloudwatch-policy`,
        { role: cloudwatchRole.name, policyArn: aws.iam.ManagedPolicy.AmazonAPIGatewayPushToCloudWatchLogs },
        retained,
      );
      accountDependencies.push(new aws.apigateway.Account(`${name}-apigateway-account`, { cloudwatchRoleArn: cloudwatchRole.arn }, { ...retained, dependsOn: [attachment] }));
    }
    const accessLogGroup = new aws.cloudwatch.LogGroup(`${name}-access-logs`, { namePrefix: `/aws/apigateway/${label}-access-`, retentionInDays }, parent);
    const stage = new aws.apigateway.Stage(
      `${name}-stage`,
      {
        restApi: api.id,
        deployment: deployment.id,
        stageName,
        variables: { [AUTHORIZER_STAGE_VARIABLE]: "on" },
        accessLogSettings: { destinationArn: accessLogGroup.arn, format: ACCESS_LOG_FORMAT },
      },
      { parent: this, dependsOn: accountDependencies },
    );
    const throttle = args.stageThrottle ?? { rateLimit: 10_000, burstLimit: 5_000 };
    // Every method of the stage ("*/*"): all callers together never exceed this, whatever their plans allow.
    new aws.apigateway.MethodSettings(
      `${name}-stage-throttle`,
      { restApi: api.id, stageName: stage.stageName, methodPath: "*/*", settings: { throttlingRateLimit: throttle.rateLimit, throttlingBurstLimit: throttle.burstLimit } },
      parent,
    );

    const usagePlans = Object.entries(args.plans).map(([planName, plan]) => ({
      planName,
      usagePlan: new aws.apigateway.UsagePlan(
        `${name}-plan-${planName}`,
        {
          name: `${label}-${planName}`,
          apiStages: [{ apiId: api.id, stage: stage.stageName }],
          throttleSettings: { rateLimit: plan.rateLimit, burstLimit: plan.burstLimit },
          ...(plan.quota ? { quotaSettings: { limit: plan.quota.limit, period: plan.quota.period, offset: plan.quota.offset } } : {}),
        },
        parent,
      ),
    }));
    const planIdByName = new Map(usagePlans.map(({ planName, usagePlan }) => [planName, usagePlan.id]));
    for (const { customerId, customer, key } of apiKeys) {
      new aws.apigateway.UsagePlanKey(
        `${name}-plan-key-${customerId}`,
        { keyId: key.id, keyType: "API_KEY", usagePlanId: planIdByName.get(customer.plan)! },
        {
          parent: this,
          // keyId, keyType and usagePlanId are ForceNew (terraform-provider-aws usage_plan_key.go schema): a plan
          // change replaces this association. Created first (Pulumi's default), the new one would put the key on a
          // second usage plan of the same stage, which API Gateway refuses; so delete the old one first. The key
          // itself (aws.apigateway.ApiKey) does not depend on the plan and is untouched.
          deleteBeforeReplace: true,
          // `value` is the key itself, a computed output the provider does not mark sensitive (usage_plan_key.go:
          // `value` is Computed only, unlike ApiKey's), so the state would hold every key in plain text.
          additionalSecretOutputs: ["value"],
        },
      );
    }

    this.invokeUrl = stage.invokeUrl;
    this.functionName = fn.name;
    this.functionLogGroupName = logGroup.name;
    this.authorizerFunctionName = authorizerFn.name;
    this.accessLogGroupName = accessLogGroup.name;
    this.restApiId = api.id;
    this.apiKeyIds = recordOf(apiKeys.map(({ customerId, key }) => [customerId, key.id]));
    // Mocks (and some providers) do not mark ApiKey.value secret; never rely on that.
    this.apiKeyValues = pulumi.secret(recordOf(apiKeys.map(({ customerId, key }) => [customerId, key.value])));
    this.usagePlanIds = recordOf(usagePlans.map(({ planName, usagePlan }) => [planName, usagePlan.id]));
    this.parameterNames = recordOf(secretParameters.map((p, i) => [p.envVar, parameters[i].name]));
    this.stripeCreditsWebhookUrl = creditsWebhook?.url;
    this.stripeCreditsWebhookEndpointId = creditsWebhook?.endpointId;
    this.registerOutputs({
      parameterNames: this.parameterNames,
      invokeUrl: this.invokeUrl,
      functionName: this.functionName,
      functionLogGroupName: this.functionLogGroupName,
      authorizerFunctionName: this.authorizerFunctionName,
      accessLogGroupName: this.accessLogGroupName,
      restApiId: this.restApiId,
      apiKeyIds: this.apiKeyIds,
      apiKeyValues: this.apiKeyValues,
      usagePlanIds: this.usagePlanIds,
      stripeCreditsWebhookUrl: this.stripeCreditsWebhookUrl,
      stripeCreditsWebhookEndpointId: this.stripeCreditsWebhookEndpointId,
    });
  }
}

/** The parameters' versions as one short value, e.g. `3.1`. */
export function secretsVersion(versions: ReadonlyArray<number | undefined>): string {
  return versions.map((v) => String(v ?? 0)).join(".");
}

function recordOf(entries: Array<[string, pulumi.Output<string>]>): pulumi.Output<Record<string, string>> {
  return pulumi.all(entries.map(([, value]) => value)).apply((values) => Object.fromEntries(entries.map(([k], i) => [k, values[i]])));
}

/** Trust policy letting Lambda assume a function's role. */
export function lambdaAssumeRolePolicy(): string {
  return JSON.stringify({
    Version: "2012-10-17",
    Statement: [{ Effect: "Allow", Principal: { Service: "lambda.amazonaws.com" }, Action: "sts:AssumeRole" }],
  });
}

/** Trust policy for the role API Gateway uses to write logs. */
export function apiGatewayAssumeRolePolicy(): string {
  return JSON.stringify({
    Version: "2012-10-17",
    Statement: [{ Effect: "Allow", Principal: { Service: "apigateway.amazonaws.com" }, Action: "sts:AssumeRole" }],
  });
}

/**
 * A function's permissions: write to its own log group, read exactly the given SSM parameters, with a ledger put
 * items into the ledger table (nothing else there: no read, no update, no delete, and not its indexes), and with a
 * customers table what `chatCustomersStatements` lists (key and account items read, account items updated, the
 * Stripe customer index queried), and with a responses table what `chatResponsesStatements` lists. No kms:Decrypt: SecureStrings use the AWS managed key, which "grants Decrypt
 * permission to all IAM principals in the AWS account" (Systems Manager user guide, ps-restrict-decryption), so
 * ssm:GetParameters is the whole grant; the tables use DynamoDB's default encryption (an AWS owned key), which needs
 * no grant either.
 */
export function functionPolicy(logGroupArn: string, parameterArns: string[], options: { ledgerTableArn?: string; customersTableArn?: string; responsesTableArn?: string } = {}): string {
  const statements: object[] = [{ Effect: "Allow", Action: ["logs:CreateLogStream", "logs:PutLogEvents"], Resource: `${logGroupArn}:*` }];
  if (parameterArns.length > 0) statements.push({ Effect: "Allow", Action: ["ssm:GetParameters", "ssm:GetParameter"], Resource: [...parameterArns] });
  if (options.ledgerTableArn) statements.push({ Effect: "Allow", Action: ["dynamodb:PutItem"], Resource: options.ledgerTableArn });
  if (options.customersTableArn) statements.push(...chatCustomersStatements(options.customersTableArn));
  if (options.responsesTableArn) statements.push(...chatResponsesStatements(options.responsesTableArn));
  return JSON.stringify({ Version: "2012-10-17", Statement: statements });
}

/**
 * A route's path in Pulumi resource names: `/v1/responses/{id}/cancel` → `-v1-responses-by-id-cancel`. Paths without
 * parameters keep the names they always had (`-v1-chat-completions`), so existing stacks update in place.
 */
export function routeSlug(path: string): string {
  return path.replace(/\{([^}]+)\}/g, "by-$1").replace(/\//g, "-");
}

/**
 * A route's path in the Lambda permission's source ARN. API Gateway invokes with the ARN of the request as made
 * (`…/beta/GET/v1/responses/resp_123`), not of the resource template, so each path parameter is a `*` there
 * ("execute-api:/stage/METHOD/resource-path"; the AWS console itself writes `*` for path parameters:
 * https://docs.aws.amazon.com/apigateway/latest/developerguide/arn-format-reference.html). A literal `{id}` would
 * match no request, and API Gateway would answer 500 "Invalid permissions on Lambda function".
 */
export function permissionPath(path: string): string {
  return path.replace(/\{[^}]+\}/g, "*");
}

/** Lets a function write to its own log group and nothing else (the authorizer's whole policy). */
export function logWritePolicy(logGroupArn: string): string {
  return functionPolicy(logGroupArn, []);
}

/**
 * A hash of everything a deployment snapshots: the resolved args of every tracked resource (routes, methods,
 * integrations, the authorizer, gateway responses, API settings), keyed by logical name, in a canonical key order.
 * Same inputs → same hash → no redeployment; any changed input → a new deployment.
 */
export function deploymentTrigger(snapshot: Record<string, unknown>): string {
  return createHash("sha256").update(canonicalJson(snapshot)).digest("hex");
}

function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value && typeof value === "object") {
    const entries = Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined);
    return `{${entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(",")}}`;
  }
  return JSON.stringify(value) ?? "null";
}
