/**
 * Issue 13 in the Pulumi program: the Responses API, embeddings and model routes (API Gateway resource templates with
 * path parameters) and the responses table (who created each stored response). program.test.ts checks the whole
 * program; this file checks what issue 13 relies on at deploy time, derived from ROUTES rather than from a list, so a
 * route added later is held to the same rules.
 *
 * Deploy-time facts these tests stand on:
 * - A path parameter is a resource whose `pathPart` is `{name}` (CreateResource takes any last segment; `{proxy+}` is
 *   the greedy form, e.g. node_modules/@pulumi/aws/apigateway/method.d.ts:44). API Gateway passes the matched value
 *   as `event.pathParameters.<name>` and `event.resource` is the template, which is what functions/ai-chat routes on.
 * - API Gateway refuses a second, differently named variable child under one parent: "A sibling ({id}) of this
 *   resource already has a variable path part -- only one is allowed" (BadRequestException; "This is by design",
 *   AWS's answer in amazon-archives/aws-apigateway-importer#202; also serverless/serverless#3075).
 * - A Pulumi resource's identity is its URN (stack, project, parent type chain, type, logical name): a new logical name
 *   is a different resource, created and the old one deleted, unless the new one lists the old URN in `aliases`
 *   (@pulumi/pulumi 3.248 resource.d.ts:193 `aliases?: Input<URN | Alias>[]`;
 *   https://www.pulumi.com/docs/iac/concepts/options/aliases/). The routes that existed before issue 13 keep their
 *   logical names, so no alias is needed and `pulumi up` on an existing stack leaves them in place.
 * - DynamoDB TTL in @pulumi/aws 7.48 (terraform-provider-aws `ttl { attribute_name, enabled }`): `ttl: { attributeName,
 *   enabled }` (node_modules/@pulumi/aws/types/input.d.ts `interface TableTtl`, "attributeName ... Required if
 *   `enabled` is `true`"; dynamodb/table.d.ts Basic Example). The TTL attribute is NOT declared in `attributes`: only
 *   key attributes (table and index keys) may be, the API refuses others (aws_dynamodb_table docs, "Only define
 *   attributes on the table object that are going to be used as: Table hash key or range key, LSI or GSI hash key or
 *   range key").
 */
import { expect } from "chai";
import { RESPONSE_OWNERS_KEY, RESPONSE_OWNERS_TTL_ATTRIBUTE } from "../../functions/shared/response-owners";
import { deploymentTrigger, permissionPath, ROUTES, routeSlug } from "../../infra/metered-ai-api";
import { environmentBytes } from "../../infra/function-env";
import { type Recorded } from "../helpers/pulumi-mocks";
import { baseConfig, finder, PROJECT, runProgram } from "./program-harness";

const RESOURCE = "aws:apigateway/resource:Resource";
const METHOD = "aws:apigateway/method:Method";
const INTEGRATION = "aws:apigateway/integration:Integration";
const PERMISSION = "aws:lambda/permission:Permission";
const TABLE = "aws:dynamodb/table:Table";
const COMPONENT = "metered-ai-api:index:MeteredAiApi";

/** Every path prefix of a route (`/v1/responses/{id}` → `/v1`, `/v1/responses`, `/v1/responses/{id}`). */
const prefixes = (path: string): string[] => {
  const segments = path.split("/").slice(1);
  return segments.map((_, i) => `/${segments.slice(0, i + 1).join("/")}`);
};

describe("Pulumi program: issue 13 routes and the responses table (infra/index.ts under mocks)", function () {
  this.timeout(60_000);
  let created: Recorded[];
  let ofType: (type: string) => Recorded[];
  let named: (type: string, name: string) => Recorded;
  const chatFn = () => named("aws:lambda/function:Function", "metered-ai-api-fn");
  const resourceOf = (path: string) => named(RESOURCE, `metered-ai-api-res${routeSlug(path)}`);

  before(async () => {
    ({ created } = await runProgram(baseConfig));
    ({ ofType, named } = finder(created));
  });

  describe("routes", () => {
    it("serves the seven new routes next to the five it had, in the lead's order", () => {
      expect(ROUTES.map((r) => `${r.method} ${r.path}`)).to.deep.equal([
        "POST /ai-chat",
        "POST /v1/chat/completions",
        "GET /v1/models",
        "GET /v1/usage",
        "POST /v1/responses",
        "GET /v1/responses/{id}",
        "DELETE /v1/responses/{id}",
        "GET /v1/responses/{id}/input_items",
        "POST /v1/responses/{id}/cancel",
        "POST /v1/embeddings",
        "GET /v1/models/{model}",
        "POST /stripe/webhook",
      ]);
    });

    it("keeps the logical names and URNs the routes had before issue 13, so an existing stack updates them in place", () => {
      // Pinned literally (the names the program gave these routes before routeSlug existed): renaming any of them
      // would make `pulumi up` create a new resource and delete the deployed one, unless it carried an alias.
      const existing: Array<[string, string]> = [
        [RESOURCE, "metered-ai-api-res-ai-chat"],
        [RESOURCE, "metered-ai-api-res-v1"],
        [RESOURCE, "metered-ai-api-res-v1-chat"],
        [RESOURCE, "metered-ai-api-res-v1-chat-completions"],
        [RESOURCE, "metered-ai-api-res-v1-models"],
        [RESOURCE, "metered-ai-api-res-v1-usage"],
        [RESOURCE, "metered-ai-api-res-stripe"],
        [RESOURCE, "metered-ai-api-res-stripe-webhook"],
        ...["post-ai-chat", "post-v1-chat-completions", "get-v1-models", "get-v1-usage", "post-stripe-webhook"].flatMap((slug): Array<[string, string]> => [
          [METHOD, `metered-ai-api-method-${slug}`],
          [INTEGRATION, `metered-ai-api-integration-${slug}`],
          [PERMISSION, `metered-ai-api-permission-${slug}`],
        ]),
      ];
      for (const [type, name] of existing) {
        expect(named(type, name).urn, name).to.equal(`urn:pulumi:dev::${PROJECT}::${COMPONENT}$${type}::${name}`);
      }
      // Their inputs did not change either: same paths, and the permissions' source ARNs have no wildcard.
      expect(resourceOf("/v1/models").inputs).to.include({ pathPart: "models", parentId: resourceOf("/v1").id });
      expect(named(PERMISSION, "metered-ai-api-permission-get-v1-models").inputs.sourceArn).to.match(/\/beta\/GET\/v1\/models$/);
      // Path parameters never reach a logical name as braces (`by-id`), which keeps names stable and readable.
      for (const resource of created) expect(resource.name, resource.name).to.not.match(/[{}]/);
    });

    it("builds exactly one resource per distinct path prefix, each under its parent's resource, with {id} and {model} path parts", () => {
      const paths = [...new Set(ROUTES.flatMap((r) => prefixes(r.path)))];
      expect(paths).to.include.members(["/v1/responses", "/v1/responses/{id}", "/v1/responses/{id}/input_items", "/v1/responses/{id}/cancel", "/v1/models/{model}", "/v1/embeddings"]);
      expect(ofType(RESOURCE)).to.have.length(paths.length);
      for (const path of paths) {
        const parent = path.slice(0, path.lastIndexOf("/"));
        const resource = resourceOf(path);
        expect(resource.inputs, path).to.include({ pathPart: path.split("/").pop(), parentId: parent === "" ? "root-id" : resourceOf(parent).id });
        expect(resource.inputs.restApi).to.equal(named("aws:apigateway/restApi:RestApi", "metered-ai-api-api").id);
      }
      expect(resourceOf("/v1/responses/{id}").inputs.pathPart).to.equal("{id}");
      expect(resourceOf("/v1/models/{model}").inputs.pathPart).to.equal("{model}");
    });

    it("never puts two differently named path parameters under one parent, which API Gateway refuses", () => {
      const variableChildren = new Map<string, Set<string>>();
      for (const resource of ofType(RESOURCE)) {
        if (!/^\{.+\}$/.test(resource.inputs.pathPart)) continue;
        const set = variableChildren.get(resource.inputs.parentId) ?? new Set<string>();
        set.add(resource.inputs.pathPart);
        variableChildren.set(resource.inputs.parentId, set);
      }
      expect(variableChildren.size).to.equal(2);
      for (const [parent, names] of variableChildren) expect([...names], parent).to.have.length(1);
    });

    it("gives each of the 12 routes its method on its resource, with the REQUEST authorizer and a required API key, except Stripe's webhook", () => {
      const authorizer = named("aws:apigateway/authorizer:Authorizer", "metered-ai-api-authorizer-key");
      expect(ROUTES).to.have.length(12);
      expect(ofType(METHOD)).to.have.length(12);
      for (const route of ROUTES) {
        const slug = `${route.method.toLowerCase()}${routeSlug(route.path)}`;
        const method = named(METHOD, `metered-ai-api-method-${slug}`).inputs;
        expect(method, slug).to.include({ httpMethod: route.method, resourceId: resourceOf(route.path).id });
        if (route.apiKeyRequired) expect(method, slug).to.include({ authorization: "CUSTOM", authorizerId: authorizer.id, apiKeyRequired: true });
        else expect(method, slug).to.include({ authorization: "NONE", apiKeyRequired: false });
      }
      expect(ROUTES.filter((r) => !r.apiKeyRequired).map((r) => r.path)).to.deep.equal(["/stripe/webhook"]);
      // GET and DELETE of one stored response are two methods of one resource.
      expect(named(METHOD, "metered-ai-api-method-delete-v1-responses-by-id").inputs.resourceId).to.equal(named(METHOD, "metered-ai-api-method-get-v1-responses-by-id").inputs.resourceId);
    });

    it("integrates each route as a streamed Lambda proxy on the same resource and method, with the same timeout as every other route", () => {
      const timeouts = new Set<number>();
      for (const route of ROUTES) {
        const slug = `${route.method.toLowerCase()}${routeSlug(route.path)}`;
        const integration = named(INTEGRATION, `metered-ai-api-integration-${slug}`).inputs;
        expect(integration, slug).to.include({
          httpMethod: route.method,
          resourceId: resourceOf(route.path).id,
          type: "AWS_PROXY",
          integrationHttpMethod: "POST",
          responseTransferMode: "STREAM",
          uri: chatFn().state.responseStreamingInvokeArn,
        });
        timeouts.add(integration.timeoutMilliseconds);
      }
      expect([...timeouts]).to.deep.equal([chatFn().inputs.timeout * 1000]);
    });

    it("lets API Gateway invoke the function for a real request on each parameterised route (the source ARN has * for the parameter)", () => {
      const api = named("aws:apigateway/restApi:RestApi", "metered-ai-api-api").state;
      // The ARN API Gateway invokes with: the request's own path, never the template.
      const requests: Array<[string, string]> = [
        ["GET /v1/responses/{id}", "GET/v1/responses/resp_0123abcd"],
        ["DELETE /v1/responses/{id}", "DELETE/v1/responses/resp_0123abcd"],
        ["GET /v1/responses/{id}/input_items", "GET/v1/responses/resp_0123abcd/input_items"],
        ["POST /v1/responses/{id}/cancel", "POST/v1/responses/resp_0123abcd/cancel"],
        ["GET /v1/models/{model}", "GET/v1/models/gpt-4o-mini"],
      ];
      // Lambda matches source ARNs like IAM's StringLike: `*` is any run of characters.
      const glob = (pattern: string) => new RegExp(`^${pattern.split("*").map((part) => part.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join(".*")}$`);
      for (const [route, request] of requests) {
        const [method, path] = route.split(" ");
        const permission = named(PERMISSION, `metered-ai-api-permission-${method.toLowerCase()}${routeSlug(path)}`).inputs;
        expect(permission.sourceArn, route).to.equal(`${api.executionArn}/beta/${method}${permissionPath(path)}`);
        expect(glob(permission.sourceArn).test(`${api.executionArn}/beta/${request}`), route).to.equal(true);
        // Scoped to its method: the same path with another method is not this permission's.
        expect(glob(permission.sourceArn).test(`${api.executionArn}/beta/PUT${request.slice(request.indexOf("/"))}`), route).to.equal(false);
      }
    });

    it("redeploys the stage for the new routes: the trigger covers their resources, methods and integrations", () => {
      const deployment = named("aws:apigateway/deployment:Deployment", "metered-ai-api-deployment");
      const tracked = ["aws:apigateway/restApi:RestApi", RESOURCE, METHOD, INTEGRATION, "aws:apigateway/authorizer:Authorizer", "aws:apigateway/response:Response"];
      const snapshot = Object.fromEntries(created.filter((r) => tracked.includes(r.type)).map((r) => [r.name, r.inputs]));
      expect(deployment.inputs.triggers.redeployment).to.equal(deploymentTrigger(snapshot));
      // The API as it was before issue 13 (no new route's parts) had another trigger: an existing stack redeploys.
      const isNew = (name: string) => /-(v1-responses|v1-embeddings|v1-models-by-model)/.test(name);
      const before = Object.fromEntries(Object.entries(snapshot).filter(([name]) => !isNew(name)));
      expect(Object.keys(snapshot).length - Object.keys(before).length).to.equal(6 + 7 + 7);
      expect(deploymentTrigger(before)).to.not.equal(deployment.inputs.triggers.redeployment);
      // And the stage is never pointed at a deployment taken before the new routes' parts exist.
      const parts = created.filter((r) => [RESOURCE, METHOD, INTEGRATION, PERMISSION].includes(r.type) && isNew(r.name));
      expect(parts).to.have.length(6 + 7 + 7 + 7);
      for (const part of parts) expect(deployment.options.dependencies, part.name).to.include(part.urn);
    });
  });

  describe("the responses table", () => {
    const table = () => named(TABLE, "responses-table");

    it("is on-demand, keyed by response_id alone, with TTL on expires_at", () => {
      expect(table().inputs).to.deep.include({
        billingMode: "PAY_PER_REQUEST",
        hashKey: RESPONSE_OWNERS_KEY,
        ttl: { attributeName: RESPONSE_OWNERS_TTL_ATTRIBUTE, enabled: true },
      });
      expect([RESPONSE_OWNERS_KEY, RESPONSE_OWNERS_TTL_ATTRIBUTE]).to.deep.equal(["response_id", "expires_at"]);
      // Only the key attribute is declared (declaring expires_at would be refused); no range key, no index, no stream.
      expect(table().inputs.attributes).to.deep.equal([{ name: "response_id", type: "S" }]);
      expect(table().inputs).to.not.have.any.keys("rangeKey", "globalSecondaryIndexes", "localSecondaryIndexes", "streamEnabled", "readCapacity", "writeCapacity");
      expect(table().urn).to.equal(`urn:pulumi:dev::${PROJECT}::metered-ai-api:index:ResponsesTable$${TABLE}::responses-table`);
    });

    it("uses DynamoDB's default encryption and keeps no backups or deletion protection, unlike the billing tables", () => {
      // An ownership index, not a billing record: losing it makes stored responses "not found" for everyone, which
      // never hands one customer's response to another. The billing tables (ledgerDeletionProtection, default true)
      // keep theirs, so the base config shows the difference.
      expect(table().inputs).to.not.have.any.keys("serverSideEncryption", "pointInTimeRecovery", "deletionProtectionEnabled");
      expect(named(TABLE, "customers-table").inputs.deletionProtectionEnabled).to.equal(true);
    });

    it("is named to the chat function in RESPONSES_TABLE, with no RESPONSES_TIMEOUT_MS: its calls share CUSTOMERS_TIMEOUT_MS", () => {
      const vars = chatFn().inputs.environment.variables as Record<string, string>;
      expect(vars.RESPONSES_TABLE).to.equal(table().state.name).and.match(/^responses-table-[0-9a-f]{7}$/);
      // The function bounds each responses-table call by RESPONSES_TIMEOUT_MS, else CUSTOMERS_TIMEOUT_MS's value
      // (functions/ai-chat/config.ts); the stack's customersTimeoutMs is counted in the timeout sum it checks.
      expect(vars).to.not.have.property("RESPONSES_TIMEOUT_MS");
      expect(vars.CUSTOMERS_TIMEOUT_MS).to.equal("1000");
      expect(environmentBytes(vars)).to.be.at.most(4096);
      // No other function is told of it.
      for (const fn of ofType("aws:lambda/function:Function").filter((f) => f.name !== "metered-ai-api-fn")) {
        expect(JSON.stringify(fn.inputs.environment ?? {}), fn.name).to.not.include("responses-table");
      }
    });

    it("may be read and written by the chat function only, with exactly GetItem, PutItem and UpdateItem on that table", () => {
      const arn = table().state.arn as string;
      const grants: Array<{ policy: string; statement: { Action: string[] | string; Resource: string | string[] } }> = [];
      for (const policy of [...ofType("aws:iam/rolePolicy:RolePolicy"), ...ofType("aws:iam/policy:Policy")]) {
        for (const statement of JSON.parse(policy.inputs.policy).Statement) {
          const resources = ([] as string[]).concat(statement.Resource);
          if (resources.some((r) => r === "*" || r.startsWith(arn))) grants.push({ policy: policy.name, statement });
          // No statement reaches it through a wildcard over the account's tables either.
          for (const resource of resources) expect(resource, policy.name).to.not.match(/:table\/\*$|^arn:aws:dynamodb:[^:]*:[^:]*:\*$/);
        }
      }
      expect(grants).to.deep.equal([
        { policy: "metered-ai-api-policy", statement: { Effect: "Allow", Action: ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"], Resource: arn } },
      ]);
      // Not its indexes or streams (it has none), not DeleteItem, Scan or Query.
      const actions = JSON.stringify(grants);
      for (const forbidden of ["DeleteItem", "Scan", "Query", "BatchWriteItem", "dynamodb:*"]) expect(actions).to.not.include(forbidden);
      // And no managed policy hands out DynamoDB at large.
      for (const attachment of ofType("aws:iam/rolePolicyAttachment:RolePolicyAttachment")) expect(String(attachment.inputs.policyArn), attachment.name).to.not.match(/DynamoDB/i);
    });
  });
});
