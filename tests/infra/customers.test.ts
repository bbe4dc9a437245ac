import { expect } from "chai";
import fs from "node:fs";
import path from "node:path";
import { marshall, unmarshall } from "@aws-sdk/util-dynamodb";
import * as pulumi from "@pulumi/pulumi";
import { loadFunctionConfig } from "../../functions/ai-chat/config";
import { CUSTOMERS_TABLE_SCHEMA, keyItem, STRIPE_CUSTOMER_INDEX, type CustomerStatus } from "../../functions/shared/customer-schema";
import { keyItemAttributeNames, keyItemJson } from "../../infra/customers-table";
import { environmentBytes, ROUTES, STRIPE_WEBHOOK_PATH } from "../../infra/function-env";
import { STRIPE_CREDIT_EVENTS } from "../../infra/stripe-credits-webhook";
import { isSecretInput, MOCK_CREDITS_WEBHOOK_SECRET, plainState, promiseOf, unsecret, type Recorded } from "../helpers/pulumi-mocks";
import { recordForScan } from "../helpers/secret-scan";
import { baseConfig, CUSTOMERS, finder, MOESIF_APP_ID, PROJECT, runProgram, stackOutputs, STRIPE_KEY, UPSTREAM_SECRET, withConfig, type Program } from "./program-harness";

const TABLE = "aws:dynamodb/table:Table";
const ITEM = "aws:dynamodb/tableItem:TableItem";
const FUNCTION = "aws:lambda/function:Function";
const POLICY = "aws:iam/rolePolicy:RolePolicy";
const PARAMETER = "aws:ssm/parameter:Parameter";
const ENDPOINT = "stripe:index/webhookEndpoint:WebhookEndpoint";
const API_KEY = "aws:apigateway/apiKey:ApiKey";

/**
 * Every `checkout.session.*` event and `invoice.paid` of Stripe API version 2024-04-10, the version the Stripe
 * provider pins (pulumi-stripe 0.0.28 → lukasaron/terraform-provider-stripe → stripe-go v78.12.0, api_version.go:
 * "2024-04-10"), copied verbatim from that tag's event.go:48-51 and :107; and the two charge events the webhook
 * logs for a manual debit (`EventTypeChargeRefunded` "charge.refunded", `EventTypeChargeDisputeCreated`
 * "charge.dispute.created", in stripe-go's event.go EventType list since long before that version).
 */
const STRIPE_2024_04_10_CREDIT_CANDIDATES = [
  "charge.dispute.created",
  "charge.refunded",
  "checkout.session.async_payment_failed",
  "checkout.session.async_payment_succeeded",
  "checkout.session.completed",
  "checkout.session.expired",
  "invoice.paid",
];

interface Statement {
  Effect: string;
  Action: string | string[];
  Resource: string | string[];
  Condition?: Record<string, Record<string, string | string[]>>;
}
const list = <T>(value: T | T[]): T[] => (Array.isArray(value) ? value : [value]);
const statementsOf = (policy: string): Statement[] => JSON.parse(policy).Statement as Statement[];

/**
 * Whether a policy allows one DynamoDB request, as IAM evaluates the parts this program uses: exact actions and
 * resources, and a `ForAllValues:StringLike` condition on `dynamodb:LeadingKeys` (every partition key of the request
 * must match one pattern; `*` matches any run of characters). Any other condition operator fails the test, so the
 * evaluator never silently approves something it does not understand.
 */
function allows(policy: string, action: string, resource: string, leadingKeys: string[] = []): boolean {
  return statementsOf(policy).some((statement) => {
    if (statement.Effect !== "Allow" || !list(statement.Action).includes(action) || !list(statement.Resource).includes(resource)) return false;
    for (const [operator, conditions] of Object.entries(statement.Condition ?? {})) {
      expect(operator, "condition operator").to.equal("ForAllValues:StringLike");
      for (const [key, patterns] of Object.entries(conditions)) {
        expect(key).to.equal("dynamodb:LeadingKeys");
        const matchers = list(patterns).map((p) => new RegExp(`^${p.split("*").map((part) => part.replace(/[.+?^${}()|[\]\\]/g, "\\$&")).join(".*")}$`));
        if (!leadingKeys.every((value) => matchers.some((m) => m.test(value)))) return false;
      }
    }
    return true;
  });
}

describe("customers table, key items and the Stripe credits webhook (infra/index.ts under mocks)", function () {
  this.timeout(120_000);
  let program: Program;
  let created: Recorded[];
  let find: ReturnType<typeof finder>;
  const table = () => find.named(TABLE, "customers-table");
  const ledgerTable = () => find.named(TABLE, "usage-ledger-table");
  const chat = () => find.named(FUNCTION, "metered-ai-api-fn");
  const forwarder = () => find.named(FUNCTION, "usage-ledger-forwarder");
  const keyId = (f: ReturnType<typeof finder>, customer: string) => f.named(API_KEY, `metered-ai-api-key-${customer}`).id;

  before(async () => {
    ({ program, created } = await runProgram(baseConfig));
    find = finder(created);
  });

  describe("the table", () => {
    it("is on demand, keyed by pk alone, with the stripe_customer index the contract names", () => {
      const inputs = table().inputs;
      expect(inputs).to.include({ billingMode: "PAY_PER_REQUEST", hashKey: "pk" });
      expect(inputs.rangeKey).to.equal(undefined);
      expect(inputs.attributes).to.deep.equal([
        { name: "pk", type: "S" },
        { name: "stripe_customer_id", type: "S" },
      ]);
      expect(inputs.attributes).to.deep.equal(CUSTOMERS_TABLE_SCHEMA.attributeDefinitions.map((a) => ({ name: a.AttributeName, type: a.AttributeType })));
      expect(inputs.globalSecondaryIndexes).to.deep.equal([{ name: STRIPE_CUSTOMER_INDEX, keySchemas: [{ attributeName: "stripe_customer_id", keyType: "HASH" }], projectionType: "ALL" }]);
      expect(inputs.readCapacity).to.equal(undefined);
      expect(inputs.streamEnabled).to.equal(undefined);
    });

    it("keeps point-in-time recovery on, uses DynamoDB's default encryption and is auto-named", () => {
      const inputs = table().inputs;
      expect(inputs.pointInTimeRecovery).to.deep.equal({ enabled: true });
      expect(inputs.serverSideEncryption).to.equal(undefined);
      expect(inputs.name).to.equal(undefined);
      expect(table().state.name).to.match(/^customers-table-[0-9a-f]{7}$/);
    });

    it("is deletion-protected exactly when the ledger is (ledgerDeletionProtection)", async () => {
      expect(table().inputs.deletionProtectionEnabled).to.equal(true);
      const { created: unprotected } = await runProgram(withConfig({ [`${PROJECT}:ledgerDeletionProtection`]: "false" }));
      expect(finder(unprotected).named(TABLE, "customers-table").inputs.deletionProtectionEnabled).to.equal(false);
    });

    it("exports its name and ARN", async () => {
      expect(await promiseOf(program.customersTableName)).to.equal(table().state.name);
      expect(await promiseOf(program.customersTableArn)).to.equal(`arn:aws:dynamodb:us-east-1:123456789012:table/${table().state.name}`);
    });
  });

  describe("key items", () => {
    it("writes one item per customer, in the customers table, keyed by pk", () => {
      const items = find.ofType(ITEM);
      expect(items.map((i) => i.name).sort()).to.deep.equal(Object.keys(CUSTOMERS).map((c) => `metered-ai-api-customer-${c}`).sort());
      for (const item of items) expect(item.inputs).to.include({ tableName: table().state.name, hashKey: "pk" });
    });

    it("writes exactly keyItem(apiKeyId, customerId, customer) as DynamoDB JSON, nothing more", () => {
      for (const [customerId, customer] of Object.entries(CUSTOMERS)) {
        const item = find.named(ITEM, `metered-ai-api-customer-${customerId}`);
        const id = keyId(find, customerId);
        const written = JSON.parse(item.inputs.item as string);
        expect(written).to.deep.equal(marshall(keyItem(id, customerId, customer)));
        expect(unmarshall(written)).to.deep.equal({ pk: `key#${id}`, api_key_id: id, customer_id: customerId, plan: customer.plan, stripe_customer_id: customer.stripeCustomerId, status: "active" });
        // Every attribute is a string (S): what a consistent GetItem reads back, so a refresh shows no drift.
        for (const value of Object.values(written)) expect(Object.keys(value as object)).to.deep.equal(["S"]);
        expect(item.id).to.equal(`${table().state.name},key#${id}`);
      }
    });

    it("updates the function only once every key item is written, so it never looks a configured key up in vain", () => {
      for (const item of find.ofType(ITEM)) expect(chat().options.dependencies, item.name).to.include(item.urn);
    });

    it("writes no account item: a pulumi up can never reset a balance", () => {
      for (const item of find.ofType(ITEM)) expect(unmarshall(JSON.parse(item.inputs.item)).pk).to.match(/^key#/);
    });

    it("leaves stripe_customer_id out for a customer without one (the index stays sparse) and writes a suspended status", async () => {
      const customers = { acme: { plan: "starter", status: "suspended" }, globex: { plan: "pro", stripeCustomerId: "cus_globex", status: "active" } };
      const f = finder((await runProgram(withConfig({ [`${PROJECT}:customers`]: JSON.stringify(customers) }))).created);
      const acme = unmarshall(JSON.parse(f.named(ITEM, "metered-ai-api-customer-acme").inputs.item));
      expect(acme).to.deep.equal({ pk: `key#${keyId(f, "acme")}`, api_key_id: keyId(f, "acme"), customer_id: "acme", plan: "starter", status: "suspended" as CustomerStatus });
      expect(acme).to.not.have.property("stripe_customer_id");
    });

    it("changes only the item's attributes when a customer moves plan, and drops the item with the customer", async () => {
      const moved = finder((await runProgram(withConfig({ [`${PROJECT}:customers`]: JSON.stringify({ acme: { plan: "pro", stripeCustomerId: "cus_acme" } }) }))).created);
      const before = find.named(ITEM, "metered-ai-api-customer-acme").inputs;
      const after = moved.named(ITEM, "metered-ai-api-customer-acme").inputs;
      // table_name and hash_key are ForceNew, item updates in place (terraform-provider-aws table_item.go).
      expect({ tableName: after.tableName, hashKey: after.hashKey }).to.deep.equal({ tableName: before.tableName, hashKey: before.hashKey });
      expect(unmarshall(JSON.parse(after.item))).to.deep.equal({ ...unmarshall(JSON.parse(before.item)), plan: "pro" });
      expect(moved.ofType(ITEM).map((i) => i.name)).to.deep.equal(["metered-ai-api-customer-acme"]);
    });

    it("uses attribute names that stay distinct with everything but letters removed, as the provider compares them", () => {
      const names = keyItemAttributeNames(keyItem("abcdefghij", "c", { plan: "p", stripeCustomerId: "cus_1" }));
      expect(new Set(names).size).to.equal(names.length);
      expect(JSON.parse(keyItemJson("abcdefghij", "c", { plan: "p" }))).to.deep.equal({ pk: { S: "key#abcdefghij" }, api_key_id: { S: "abcdefghij" }, customer_id: { S: "c" }, plan: { S: "p" }, status: { S: "active" } });
    });
  });

  describe("prepaid plans", () => {
    it("writes a plans.json the function accepts, with billing, the output cap and the quota, and the function's environment names the table", async () => {
      const plans = {
        payg: { rateLimit: 5, burstLimit: 10, billing: "prepaid", maxOutputTokens: 2048, quota: { limit: 500, period: "DAY" }, prices: { "gpt-4o-mini": { input: 0.15, output: 0.6 } } },
        free: { rateLimit: 1, burstLimit: 1 },
      };
      const f = finder((await runProgram(withConfig({ [`${PROJECT}:plans`]: JSON.stringify(plans), [`${PROJECT}:customers`]: JSON.stringify({ acme: { plan: "payg", stripeCustomerId: "cus_acme" } }) }))).created);
      const fn = f.named(FUNCTION, "metered-ai-api-fn");
      const assets = await (fn.inputs.code as unknown as { assets: Promise<Record<string, unknown>> }).assets;
      const dir = await (assets["."] as unknown as { path: Promise<string> }).path;
      const written = JSON.parse(fs.readFileSync(path.join(dir, "plans.json"), "utf8"));
      expect(written.payg).to.deep.include({ billing: "prepaid", maxOutputTokens: 2048, quota: { limit: 500, period: "DAY", offset: 0 } });
      expect(written.free).to.deep.equal({ billing: "postpaid" });
      // The function's own reader (functions/ai-chat/config.ts), on the deployed variables: no problem reported.
      const config = loadFunctionConfig({ ...fn.inputs.environment.variables, PLANS: JSON.stringify(written) });
      expect(config.problems).to.deep.equal([]);
      expect(config.plans.payg).to.include({ billing: "prepaid", maxOutputTokens: 2048 });
      expect(unmarshall(JSON.parse(f.named(ITEM, "metered-ai-api-customer-acme").inputs.item)).plan).to.equal("payg");
    });
  });

  describe("1,000 customers", () => {
    it("builds, with one key and one key item each, and the function's environment is the same as with one customer", async () => {
      const many = Object.fromEntries(Array.from({ length: 1_000 }, (_, i) => [`customer-${String(i).padStart(4, "0")}`, { plan: i % 2 ? "pro" : "starter", stripeCustomerId: `cus_${String(i).padStart(14, "0")}` }]));
      const large = finder((await runProgram(withConfig({ [`${PROJECT}:customers`]: JSON.stringify(many) }))).created);
      const single = finder((await runProgram(withConfig({ [`${PROJECT}:customers`]: JSON.stringify({ acme: CUSTOMERS.acme }) }))).created);
      expect(large.ofType(API_KEY)).to.have.length(1_000);
      expect(large.ofType(ITEM)).to.have.length(1_000);
      expect(large.ofType("aws:apigateway/usagePlanKey:UsagePlanKey")).to.have.length(1_000);
      const last = unmarshall(JSON.parse(large.named(ITEM, "metered-ai-api-customer-customer-0999").inputs.item));
      expect(last).to.include({ customer_id: "customer-0999", plan: "pro", stripe_customer_id: "cus_00000000000999" });

      const largeEnv = large.named(FUNCTION, "metered-ai-api-fn").inputs.environment.variables as Record<string, string>;
      const singleEnv = single.named(FUNCTION, "metered-ai-api-fn").inputs.environment.variables as Record<string, string>;
      expect(largeEnv).to.deep.equal(singleEnv);
      expect(environmentBytes(largeEnv)).to.equal(environmentBytes(singleEnv)).and.be.below(4096);
      expect(largeEnv).to.not.have.property("CUSTOMERS");
    });
  });

  describe("the Stripe credits webhook", () => {
    const endpoint = () => find.named(ENDPOINT, "metered-ai-api-stripe-credits-endpoint");
    const secretParameter = () => find.named(PARAMETER, "metered-ai-api-param-stripe-webhook-secret");

    it("posts to the stage's /stripe/webhook route, built from the REST API's id, the region and the stage", async () => {
      const url = endpoint().inputs.url as string;
      expect(url).to.equal(`${await promiseOf(program.invokeUrl)}${STRIPE_WEBHOOK_PATH}`);
      expect(url).to.equal(`https://${find.one("aws:apigateway/restApi:RestApi").id}.execute-api.us-east-1.amazonaws.com/beta/stripe/webhook`);
      expect(await promiseOf(program.stripeCreditsWebhookUrl)).to.equal(url);
      expect(await promiseOf(program.stripeCreditsWebhookEndpointId)).to.equal(endpoint().id).and.match(/^we_/);
      expect(ROUTES.find((r) => r.path === STRIPE_WEBHOOK_PATH)).to.deep.equal({ path: "/stripe/webhook", method: "POST", apiKeyRequired: false });
    });

    it("depends on the REST API, not on the function, its stage or deployment (no dependency cycle)", () => {
      const dependencies = endpoint().options.dependencies;
      expect(endpoint().options.parent).to.match(/StripeCreditsWebhook::metered-ai-api-stripe-credits$/);
      for (const urn of [chat().urn, find.one("aws:apigateway/stage:Stage").urn, find.one("aws:apigateway/deployment:Deployment").urn]) expect(dependencies).to.not.include(urn);
      expect(dependencies).to.include(find.one("aws:apigateway/restApi:RestApi").urn);
      // And the function waits for the parameter holding the endpoint's secret.
      expect(chat().options.dependencies).to.include(secretParameter().urn);
    });

    it("enables exactly the credit events, each one known to the Stripe API version the provider pins", () => {
      expect(endpoint().inputs.enabledEvents).to.deep.equal(["checkout.session.completed", "checkout.session.async_payment_succeeded", "invoice.paid", "charge.refunded", "charge.dispute.created"]);
      expect(endpoint().inputs.enabledEvents).to.deep.equal([...STRIPE_CREDIT_EVENTS]);
      for (const event of STRIPE_CREDIT_EVENTS) expect(STRIPE_2024_04_10_CREDIT_CANDIDATES, event).to.include(event);
      expect(endpoint().inputs.description).to.match(/credits/i);
    });

    it("stores its signing secret only in an SSM SecureString whose name the function gets as STRIPE_WEBHOOK_SECRET_PARAMETER", () => {
      const parameter = secretParameter();
      expect(parameter.inputs.type).to.equal("SecureString");
      expect(parameter.inputs.name, "auto-named").to.equal(undefined);
      expect(isSecretInput(parameter.inputs.value)).to.equal(true);
      expect(unsecret(parameter.inputs.value)).to.equal(MOCK_CREDITS_WEBHOOK_SECRET).and.equal(endpoint().state.secret);
      const vars = chat().inputs.environment.variables as Record<string, string>;
      expect(vars.STRIPE_WEBHOOK_SECRET_PARAMETER).to.equal(parameter.state.name).and.match(/^metered-ai-api-param-stripe-webhook-secret-[0-9a-f]{7}$/);
      expect(JSON.stringify(vars)).to.not.include(MOCK_CREDITS_WEBHOOK_SECRET);
      expect(allows(find.named(POLICY, "metered-ai-api-policy").inputs.policy, "ssm:GetParameters", parameter.state.arn)).to.equal(true);
      // The forwarder never reads it.
      expect(find.named(POLICY, "usage-ledger-forwarder-policy").inputs.policy).to.not.include(parameter.state.arn);
    });

    it("counts that parameter in SECRETS_VERSION, so a new secret replaces warm containers", () => {
      const order = ["metered-ai-api-param-upstream-api-key", "metered-ai-api-param-moesif-application-id", "metered-ai-api-param-stripe-webhook-secret"];
      expect(order.map((name) => find.named(PARAMETER, name).state.version).join(".")).to.equal(chat().inputs.environment.variables.SECRETS_VERSION);
    });

    it("never holds the secret in plain text: not in the state, the outputs or the environment", async () => {
      expect(endpoint().options.additionalSecretOutputs).to.include("secret");
      for (const resource of [endpoint(), secretParameter()]) expect(JSON.stringify(plainState(resource)), resource.name).to.not.include(MOCK_CREDITS_WEBHOOK_SECRET);
      const states = created.map((r) => JSON.stringify(plainState(r)));
      recordForScan("resource state (customers)", states);
      for (const state of states) for (const secret of [MOCK_CREDITS_WEBHOOK_SECRET, UPSTREAM_SECRET, MOESIF_APP_ID, STRIPE_KEY]) expect(state).to.not.include(secret);
      const outputs = stackOutputs(program);
      expect(outputs.map(([name]) => name)).to.include.members(["customersTableName", "customersTableArn", "stripeCreditsWebhookUrl", "stripeCreditsWebhookEndpointId", "stripeCreditsWebhookSecretParameter"]);
      for (const [name, output] of outputs) {
        if (await pulumi.isSecret(output)) continue;
        const text = JSON.stringify(await promiseOf(output));
        recordForScan(`stack output ${name} (customers)`, [text]);
        expect(text, name).to.not.include(MOCK_CREDITS_WEBHOOK_SECRET);
      }
      expect(await promiseOf(program.stripeCreditsWebhookSecretParameter)).to.equal(secretParameter().state.name);
    });
  });

  describe("least privilege on the customers table", () => {
    const chatPolicy = () => find.named(POLICY, "metered-ai-api-policy").inputs.policy as string;
    const forwarderPolicy = () => find.named(POLICY, "usage-ledger-forwarder-policy").inputs.policy as string;
    const onTable = (policy: string) => statementsOf(policy).filter((s) => list(s.Resource).some((r) => r.startsWith(table().state.arn)));

    it("grants the chat function GetItem on key and account items, UpdateItem on account items and Query on the index, nothing else", () => {
      const arn = table().state.arn;
      expect(onTable(chatPolicy())).to.deep.equal([
        { Effect: "Allow", Action: ["dynamodb:GetItem"], Resource: arn, Condition: { "ForAllValues:StringLike": { "dynamodb:LeadingKeys": ["key#*", "account#*"] } } },
        { Effect: "Allow", Action: ["dynamodb:UpdateItem"], Resource: arn, Condition: { "ForAllValues:StringLike": { "dynamodb:LeadingKeys": ["account#*"] } } },
        { Effect: "Allow", Action: ["dynamodb:Query"], Resource: `${arn}/index/stripe_customer` },
      ]);
    });

    it("lets the chat function read a key, change an account, and never change a key item, scan, put or delete", () => {
      const policy = chatPolicy();
      const arn = table().state.arn;
      expect(allows(policy, "dynamodb:GetItem", arn, ["key#abcdefghij"])).to.equal(true);
      expect(allows(policy, "dynamodb:GetItem", arn, ["account#acme"])).to.equal(true);
      expect(allows(policy, "dynamodb:UpdateItem", arn, ["account#acme"])).to.equal(true);
      expect(allows(policy, "dynamodb:UpdateItem", arn, ["key#abcdefghij"])).to.equal(false);
      expect(allows(policy, "dynamodb:GetItem", arn, ["other#x"])).to.equal(false);
      expect(allows(policy, "dynamodb:Query", `${arn}/index/stripe_customer`)).to.equal(true);
      expect(allows(policy, "dynamodb:Query", arn)).to.equal(false);
      for (const action of ["dynamodb:Scan", "dynamodb:PutItem", "dynamodb:DeleteItem", "dynamodb:BatchWriteItem"]) expect(allows(policy, action, arn, ["account#acme"]), action).to.equal(false);
    });

    it("grants the forwarder Scan on the table, UpdateItem and GetItem on account items, GetItem on the ledger, and no key item write", () => {
      const policy = forwarderPolicy();
      const arn = table().state.arn;
      expect(onTable(policy)).to.deep.equal([
        { Effect: "Allow", Action: ["dynamodb:Scan"], Resource: arn },
        { Effect: "Allow", Action: ["dynamodb:UpdateItem", "dynamodb:GetItem"], Resource: arn, Condition: { "ForAllValues:StringLike": { "dynamodb:LeadingKeys": ["account#*"] } } },
      ]);
      expect(allows(policy, "dynamodb:Scan", arn)).to.equal(true);
      expect(allows(policy, "dynamodb:UpdateItem", arn, ["account#acme"])).to.equal(true);
      expect(allows(policy, "dynamodb:UpdateItem", arn, ["key#abcdefghij"])).to.equal(false);
      expect(allows(policy, "dynamodb:GetItem", ledgerTable().state.arn)).to.equal(true);
      expect(allows(policy, "dynamodb:PutItem", arn, ["account#acme"])).to.equal(false);
      expect(allows(policy, "dynamodb:DeleteItem", arn, ["account#acme"])).to.equal(false);
    });

    it("names no `*` action or resource: the only wildcards are the partition-key patterns and log streams", () => {
      for (const policy of [chatPolicy(), forwarderPolicy()]) {
        for (const statement of statementsOf(policy)) {
          for (const action of list(statement.Action)) expect(action).to.not.include("*");
          for (const resource of list(statement.Resource)) if (resource.includes("*")) expect(resource).to.match(/^arn:aws:logs:[^*]+:\*$/);
        }
      }
    });

    it("gives the forwarder the customers table and a stale-hold age of the function's timeout plus a minute", async () => {
      expect(forwarder().inputs.environment.variables).to.include({ CUSTOMERS_TABLE: table().state.name, HOLD_STALE_AFTER_MS: "360000", CUSTOMERS_TIMEOUT_MS: "1000" });
      const longer = finder((await runProgram(withConfig({ [`${PROJECT}:lambdaTimeoutSeconds`]: "900" }))).created);
      expect(longer.named(FUNCTION, "usage-ledger-forwarder").inputs.environment.variables.HOLD_STALE_AFTER_MS).to.equal("960000");
    });
  });
});
