import { createHash } from "node:crypto";
import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import { customersByKeyId, functionPlans, ROUTES, type RouteSpec } from "./function-env";
import type { CustomerConfig, PlanConfig } from "./stack-config";

export { ROUTES, type RouteSpec } from "./function-env";

/** API Gateway's own limit for a REST integration unless raised by a quota request. */
export const INTEGRATION_TIMEOUT_MS = 29_000;

export interface MeteredAiApiArgs {
  /** Deployed function code: a directory archive with `index.js` exporting `handler`. */
  code: pulumi.Input<pulumi.asset.Archive>;
  /** Stage name in the invoke URL. @default "beta" */
  stageName?: string;
  /** Usage plans by name: throttle, quota and allowed models. */
  plans: Record<string, PlanConfig>;
  /** Customers by id; each gets an API key on its plan. */
  customers: Record<string, CustomerConfig>;
  /**
   * Function environment besides CUSTOMERS and PLANS (which the component writes from the keys it creates).
   * Secret values stay secret: the whole environment becomes a secret output.
   */
  environment: pulumi.Input<Record<string, pulumi.Input<string>>>;
  /** @default 512 */
  memoryMb?: number;
  /** @default 29 */
  timeoutSeconds?: number;
  /** @default "arm64" */
  architecture?: "arm64" | "x86_64";
  /** CloudWatch retention for the function's log group. @default 30 */
  logRetentionDays?: number;
}

/**
 * The metered API: the ai-chat Lambda, a REGIONAL REST API whose every method requires an API key, a stage, one
 * usage plan per plan and one API key per customer.
 */
export class MeteredAiApi extends pulumi.ComponentResource {
  /** Stage base URL, e.g. `https://abc.execute-api.us-east-1.amazonaws.com/beta`. */
  public readonly invokeUrl: pulumi.Output<string>;
  public readonly functionName: pulumi.Output<string>;
  public readonly restApiId: pulumi.Output<string>;
  /** Customer id → API key id. */
  public readonly apiKeyIds: pulumi.Output<Record<string, string>>;
  /** Customer id → API key value (secret). */
  public readonly apiKeyValues: pulumi.Output<Record<string, string>>;
  /** Plan name → usage plan id. */
  public readonly usagePlanIds: pulumi.Output<Record<string, string>>;

  constructor(name: string, args: MeteredAiApiArgs, opts?: pulumi.ComponentResourceOptions) {
    super("metered-ai-api:index:MeteredAiApi", name, {}, opts);
    const parent = { parent: this };
    const stageName = args.stageName ?? "beta";
    const functionName = `${name}-${pulumi.getStack()}-ai-chat`.slice(0, 64);

    // Keys first: the function's CUSTOMERS map is keyed by the ids API Gateway assigns them.
    const apiKeys = Object.entries(args.customers).map(([customerId, customer]) => ({
      customerId,
      customer,
      key: new aws.apigateway.ApiKey(`${name}-key-${customerId}`, { name: `${name}-${pulumi.getStack()}-${customerId}`, enabled: true, description: `metered-ai-api customer ${customerId}` }, parent),
    }));

    const logGroup = new aws.cloudwatch.LogGroup(`${name}-logs`, { name: `/aws/lambda/${functionName}`, retentionInDays: args.logRetentionDays ?? 30 }, parent);
    const role = new aws.iam.Role(`${name}-role`, { assumeRolePolicy: lambdaAssumeRolePolicy() }, parent);
    // Basic execution only, scoped to this function's log group (the managed AWSLambdaBasicExecutionRole allows "*").
    const rolePolicy = new aws.iam.RolePolicy(`${name}-logs-policy`, { role: role.id, policy: logGroup.arn.apply(logWritePolicy) }, parent);

    const environment = pulumi
      .all([args.environment, pulumi.all(apiKeys.map(({ key }) => key.id))])
      .apply(([env, ids]) => ({
        ...env,
        CUSTOMERS: JSON.stringify(customersByKeyId(apiKeys.map(({ customerId, customer }, i) => ({ keyId: ids[i], customerId, customer })))),
        PLANS: JSON.stringify(functionPlans(args.plans)),
      }));

    const fn = new aws.lambda.Function(
      `${name}-fn`,
      {
        name: functionName,
        runtime: aws.lambda.Runtime.NodeJS22dX,
        architectures: [args.architecture ?? "arm64"],
        handler: "index.handler",
        code: args.code,
        role: role.arn,
        memorySize: args.memoryMb ?? 512,
        timeout: args.timeoutSeconds ?? 29,
        environment: { variables: environment },
        loggingConfig: { logFormat: "Text", logGroup: logGroup.name },
      },
      { parent: this, dependsOn: [rolePolicy, logGroup] },
    );

    const api = new aws.apigateway.RestApi(
      `${name}-api`,
      { name: `${name}-${pulumi.getStack()}`, endpointConfiguration: { types: "REGIONAL" }, apiKeySource: "HEADER" },
      parent,
    );

    // One Resource per path segment, shared by routes (/v1 is the parent of /v1/chat and /v1/models).
    const resources = new Map<string, aws.apigateway.Resource>();
    const resourceFor = (path: string): pulumi.Output<string> => {
      if (path === "") return api.rootResourceId;
      const existing = resources.get(path);
      if (existing) return existing.id;
      const slash = path.lastIndexOf("/");
      const resource = new aws.apigateway.Resource(
        `${name}-res${path.replace(/\//g, "-")}`,
        { restApi: api.id, parentId: resourceFor(path.slice(0, slash)), pathPart: path.slice(slash + 1) },
        parent,
      );
      resources.set(path, resource);
      return resource.id;
    };

    const methods: aws.apigateway.Method[] = [];
    const integrations: aws.apigateway.Integration[] = [];
    for (const route of ROUTES) {
      const slug = `${route.method.toLowerCase()}${route.path.replace(/\//g, "-")}`;
      const resourceId = resourceFor(route.path);
      const method = new aws.apigateway.Method(
        `${name}-method-${slug}`,
        { restApi: api.id, resourceId, httpMethod: route.method, authorization: "NONE", apiKeyRequired: true },
        parent,
      );
      const integration = new aws.apigateway.Integration(
        `${name}-integration-${slug}`,
        {
          restApi: api.id,
          resourceId,
          httpMethod: method.httpMethod,
          type: "AWS_PROXY",
          // Lambda proxy integrations are always invoked with POST, whatever the route's method.
          integrationHttpMethod: "POST",
          uri: fn.invokeArn,
          timeoutMilliseconds: INTEGRATION_TIMEOUT_MS,
        },
        parent,
      );
      methods.push(method);
      integrations.push(integration);
      // Scoped to this API, this stage and this method + path: nothing else may invoke the function.
      new aws.lambda.Permission(
        `${name}-permission-${slug}`,
        {
          action: "lambda:InvokeFunction",
          function: fn.name,
          principal: "apigateway.amazonaws.com",
          sourceArn: pulumi.interpolate`${api.executionArn}/${stageName}/${route.method}${route.path}`,
        },
        parent,
      );
    }

    // A REST API serves a snapshot taken by a Deployment; without a trigger that changes with the routes,
    // `pulumi up` would update methods and integrations that the stage never serves.
    const deployment = new aws.apigateway.Deployment(
      `${name}-deployment`,
      { restApi: api.id, description: "metered-ai-api", triggers: { redeployment: fn.invokeArn.apply((arn) => deploymentTrigger(ROUTES, arn)) } },
      { parent: this, dependsOn: [...methods, ...integrations] },
    );
    const stage = new aws.apigateway.Stage(`${name}-stage`, { restApi: api.id, deployment: deployment.id, stageName }, parent);

    const usagePlans = Object.entries(args.plans).map(([planName, plan]) => ({
      planName,
      usagePlan: new aws.apigateway.UsagePlan(
        `${name}-plan-${planName}`,
        {
          name: `${name}-${pulumi.getStack()}-${planName}`,
          apiStages: [{ apiId: api.id, stage: stage.stageName }],
          throttleSettings: { rateLimit: plan.rateLimit, burstLimit: plan.burstLimit },
          ...(plan.quota ? { quotaSettings: { limit: plan.quota.limit, period: plan.quota.period, offset: plan.quota.offset } } : {}),
        },
        parent,
      ),
    }));
    const planIdByName = new Map(usagePlans.map(({ planName, usagePlan }) => [planName, usagePlan.id]));
    for (const { customerId, customer, key } of apiKeys) {
      new aws.apigateway.UsagePlanKey(`${name}-plan-key-${customerId}`, { keyId: key.id, keyType: "API_KEY", usagePlanId: planIdByName.get(customer.plan)! }, parent);
    }

    this.invokeUrl = stage.invokeUrl;
    this.functionName = fn.name;
    this.restApiId = api.id;
    this.apiKeyIds = recordOf(apiKeys.map(({ customerId, key }) => [customerId, key.id]));
    // Mocks (and some providers) do not mark ApiKey.value secret; never rely on that.
    this.apiKeyValues = pulumi.secret(recordOf(apiKeys.map(({ customerId, key }) => [customerId, key.value])));
    this.usagePlanIds = recordOf(usagePlans.map(({ planName, usagePlan }) => [planName, usagePlan.id]));
    this.registerOutputs({
      invokeUrl: this.invokeUrl,
      functionName: this.functionName,
      restApiId: this.restApiId,
      apiKeyIds: this.apiKeyIds,
      apiKeyValues: this.apiKeyValues,
      usagePlanIds: this.usagePlanIds,
    });
  }
}

function recordOf(entries: Array<[string, pulumi.Output<string>]>): pulumi.Output<Record<string, string>> {
  return pulumi.all(entries.map(([, value]) => value)).apply((values) => Object.fromEntries(entries.map(([k], i) => [k, values[i]])));
}

/** Trust policy letting Lambda assume the function's role. */
export function lambdaAssumeRolePolicy(): string {
  return JSON.stringify({
    Version: "2012-10-17",
    Statement: [{ Effect: "Allow", Principal: { Service: "lambda.amazonaws.com" }, Action: "sts:AssumeRole" }],
  });
}

/** Lets the function write to its own log group and nothing else. */
export function logWritePolicy(logGroupArn: string): string {
  return JSON.stringify({
    Version: "2012-10-17",
    Statement: [{ Effect: "Allow", Action: ["logs:CreateLogStream", "logs:PutLogEvents"], Resource: `${logGroupArn}:*` }],
  });
}

/**
 * A hash of everything the deployed snapshot depends on: each route's path and method, its key requirement and
 * integration, and the function it invokes. Same routes and function → same hash → no redeployment.
 */
export function deploymentTrigger(routes: readonly RouteSpec[], functionInvokeArn: string): string {
  const spec = routes.map((r) => ({ ...r, apiKeyRequired: true, authorization: "NONE", integration: "AWS_PROXY", timeout: INTEGRATION_TIMEOUT_MS }));
  return createHash("sha256").update(JSON.stringify({ spec, functionInvokeArn })).digest("hex");
}
