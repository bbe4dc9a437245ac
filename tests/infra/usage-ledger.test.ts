import { expect } from "chai";
import fs from "node:fs";
import path from "node:path";
import * as pulumi from "@pulumi/pulumi";
import { LEDGER_KEY, LEDGER_TABLE_SCHEMA, STRIPE_METER_EVENT_NAME, UNDELIVERED_INDEX } from "../../functions/shared/ledger-schema";
import { FORWARDER_SWEEP_GRACE_MS } from "../../infra/function-env";
import { MAX_UNIT_AMOUNT_DECIMAL_PLACES, METER_SETTINGS, microUnitAmountDecimal, minorUnitDigits } from "../../infra/stripe-meters";
import { DEAD_LETTER_RETENTION_SECONDS, forwarderPolicy, STREAM_FILTER_PATTERN, SWEEP_SCHEDULE } from "../../infra/usage-ledger";
import { isSecretInput, plainState, promiseOf, unsecret, type Recorded } from "../helpers/pulumi-mocks";
import { recordForScan } from "../helpers/secret-scan";
import {
  baseConfig,
  finder,
  MOESIF_APP_ID,
  PLANS,
  PROJECT,
  programFailure,
  runProgram,
  SECRET_KEYS,
  stackOutputs,
  STRIPE_KEY,
  STRIPE_METER_KEY,
  UPSTREAM_SECRET,
  withConfig,
  type Program,
} from "./program-harness";

const TABLE = "aws:dynamodb/table:Table";
const FUNCTION = "aws:lambda/function:Function";
const POLICY = "aws:iam/rolePolicy:RolePolicy";
const PARAMETER = "aws:ssm/parameter:Parameter";
const METER = "stripe:index/meter:Meter";
const PRODUCT = "stripe:index/product:Product";
const PRICE = "stripe:index/price:Price";

interface Statement {
  Effect: string;
  Action: string | string[];
  Resource: string | string[];
}
const list = (value: string | string[]): string[] => (Array.isArray(value) ? value : [value]);
/** Every (action, resource) pair a policy document allows. */
const grants = (policy: string): Array<[string, string]> =>
  (JSON.parse(policy).Statement as Statement[]).flatMap((s) => {
    expect(s.Effect).to.equal("Allow");
    return list(s.Action).flatMap((action) => list(s.Resource).map((resource) => [action, resource] as [string, string]));
  });

/** Meters mode with plans in three currencies (one of them zero-decimal) and a restricted meter-event key. */
const METER_PLANS = {
  ...PLANS,
  euro: { rateLimit: 2, burstLimit: 5, currency: "eur", prices: { "gpt-4o-mini": { input: 0.14, output: 0.55 } } },
  yen: { rateLimit: 2, burstLimit: 5, currency: "JPY", prices: { "gpt-4o-mini": { input: 23, output: 90 } } },
};
const METER_CUSTOMERS = {
  acme: { plan: "starter", stripeCustomerId: "cus_acme" },
  globex: { plan: "pro", stripeCustomerId: "cus_globex" },
  initech: { plan: "euro", stripeCustomerId: "cus_initech" },
  tyrell: { plan: "yen", stripeCustomerId: "cus_tyrell" },
  hobbyist: { plan: "free" },
};
const metersConfig = (change: Record<string, string | undefined> = {}) =>
  withConfig({
    [`${PROJECT}:stripeBilling`]: "meters",
    [`${PROJECT}:stripeMeterApiKey`]: STRIPE_METER_KEY,
    [`${PROJECT}:plans`]: JSON.stringify(METER_PLANS),
    [`${PROJECT}:customers`]: JSON.stringify(METER_CUSTOMERS),
    ...change,
  });

describe("usage ledger and forwarder (infra/index.ts under mocks)", function () {
  this.timeout(60_000);
  let program: Program;
  let created: Recorded[];
  let find: ReturnType<typeof finder>;
  const table = () => find.named(TABLE, "usage-ledger-table");
  const customersTable = () => find.named(TABLE, "customers-table");
  const forwarder = () => find.named(FUNCTION, "usage-ledger-forwarder");
  const chat = () => find.named(FUNCTION, "metered-ai-api-fn");
  const forwarderVariables = () => forwarder().inputs.environment.variables as Record<string, string>;
  const queue = () => find.one("aws:sqs/queue:Queue");

  before(async () => {
    ({ program, created } = await runProgram(baseConfig));
    find = finder(created);
  });

  describe("the ledger table", () => {
    it("is on-demand, keyed by the transaction id, with the sparse backlog index the contract names", () => {
      const inputs = table().inputs;
      expect(inputs).to.include({ billingMode: "PAY_PER_REQUEST", hashKey: LEDGER_KEY });
      expect(inputs.rangeKey).to.equal(undefined);
      expect(inputs.attributes).to.deep.equal(LEDGER_TABLE_SCHEMA.attributeDefinitions.map((a) => ({ name: a.AttributeName, type: a.AttributeType })));
      expect(inputs.globalSecondaryIndexes).to.deep.equal([
        {
          name: UNDELIVERED_INDEX,
          keySchemas: [
            { attributeName: "undelivered", keyType: "HASH" },
            { attributeName: "due_at", keyType: "RANGE" },
          ],
          projectionType: "ALL",
        },
      ]);
      expect(inputs.readCapacity).to.equal(undefined);
    });

    it("keeps point-in-time recovery on, streams new images and encrypts with DynamoDB's default key", () => {
      const inputs = table().inputs;
      expect(inputs.pointInTimeRecovery).to.deep.equal({ enabled: true });
      expect(inputs).to.include({ streamEnabled: true, streamViewType: "NEW_IMAGE" });
      // No block: the AWS owned key, which needs no KMS grant in any function's role.
      expect(inputs.serverSideEncryption).to.equal(undefined);
      expect(inputs.name, "auto-named").to.equal(undefined);
    });

    it("is deletion-protected by default and not when ledgerDeletionProtection is false", async () => {
      expect(table().inputs.deletionProtectionEnabled).to.equal(true);
      const { created: unprotected } = await runProgram(withConfig({ [`${PROJECT}:ledgerDeletionProtection`]: "false" }));
      expect(finder(unprotected).named(TABLE, "usage-ledger-table").inputs.deletionProtectionEnabled).to.equal(false);
    });

    it("exports its name and ARN, and gives the chat function its name with the ledger timeout and billing route", async () => {
      expect(await promiseOf(program.ledgerTableName)).to.equal(table().state.name).and.match(/^usage-ledger-table-[0-9a-f]{7}$/);
      expect(await promiseOf(program.ledgerTableArn)).to.equal(`arn:aws:dynamodb:us-east-1:123456789012:table/${table().state.name}`);
      const vars = chat().inputs.environment.variables;
      expect(vars).to.include({ LEDGER_TABLE: table().state.name, LEDGER_TIMEOUT_MS: "1000", STRIPE_BILLING: "moesif" });
    });
  });

  describe("the forwarder", () => {
    it("runs nodejs22.x from its own bundle, with its own role and log group, for up to 60 s, unreserved by default", async () => {
      const fn = forwarder();
      expect(fn.inputs).to.include({ runtime: "nodejs22.x", handler: "index.handler", timeout: 55, memorySize: 256, reservedConcurrentExecutions: -1 });
      expect(fn.inputs.architectures).to.deep.equal(["arm64"]);
      const roles = new Set(find.ofType(FUNCTION).map((f) => f.inputs.role));
      expect(roles.size, "every function has its own role").to.equal(3);
      const logGroup = find.named("aws:cloudwatch/logGroup:LogGroup", "usage-ledger-forwarder-logs");
      expect(logGroup.inputs).to.include({ namePrefix: "/aws/lambda/metered-ai-api-dev-usage-forwarder-", retentionInDays: 14 });
      expect(fn.inputs.loggingConfig.logGroup).to.equal(logGroup.state.name);
      expect(await promiseOf(program.forwarderFunctionName)).to.equal(fn.state.name);
      expect(await promiseOf(program.forwarderLogGroupName)).to.equal(logGroup.state.name);

      const assets = await (fn.inputs.code as unknown as { assets: Promise<Record<string, unknown>> }).assets;
      const dir = await (assets["."] as unknown as { path: Promise<string> }).path;
      expect(dir).to.match(/usage-forwarder$/);
      expect(fs.readdirSync(dir)).to.deep.equal(["index.js"]);
      expect(fs.statSync(path.join(dir, "index.js")).size).to.be.greaterThan(10_000);
    });

    it("reserves the configured concurrency", async () => {
      const { created: reserved } = await runProgram(withConfig({ [`${PROJECT}:forwarderReservedConcurrency`]: "5" }));
      expect(finder(reserved).named(FUNCTION, "usage-ledger-forwarder").inputs.reservedConcurrentExecutions).to.equal(5);
    });

    it("is told both tables, Moesif and its own Moesif parameter, a 60 s sweep grace, when a reservation is stale, and no secret value", () => {
      const vars = forwarderVariables();
      const parameters = find.ofType(PARAMETER).filter((p) => p.name.startsWith("usage-ledger-param-"));
      expect(parameters.map((p) => p.name)).to.deep.equal(["usage-ledger-param-moesif-application-id"]);
      expect(unsecret(parameters[0].inputs.value)).to.equal(MOESIF_APP_ID);
      expect(isSecretInput(parameters[0].inputs.value)).to.equal(true);
      expect(vars).to.deep.equal({
        MOESIF_BASE_URI: "https://api.moesif.net",
        STRIPE_BILLING: "moesif",
        FORWARDER_SWEEP_GRACE_MS: String(FORWARDER_SWEEP_GRACE_MS),
        // The function's 300 s timeout plus a minute: a younger hold may belong to a request still running.
        HOLD_STALE_AFTER_MS: "360000",
        CUSTOMERS_TIMEOUT_MS: "1000",
        LOG_LEVEL: "info",
        LEDGER_TABLE: table().state.name,
        CUSTOMERS_TABLE: customersTable().state.name,
        MOESIF_APPLICATION_ID_PARAMETER: parameters[0].state.name,
        SECRETS_VERSION: "1",
      });
      expect(FORWARDER_SWEEP_GRACE_MS).to.equal(60_000);
      expect(isSecretInput(forwarder().inputs.environment)).to.equal(false);
    });
  });

  describe("its triggers", () => {
    const mapping = () => find.one("aws:lambda/eventSourceMapping:EventSourceMapping");

    it("reads the table's stream from LATEST in batches of up to 100 gathered for at most 1 s, INSERTs only", () => {
      const inputs = mapping().inputs;
      expect(inputs.eventSourceArn).to.equal(table().state.streamArn).and.match(/\/stream\//);
      expect(inputs.functionName).to.equal(forwarder().state.arn);
      expect(inputs).to.include({ startingPosition: "LATEST", batchSize: 100, maximumBatchingWindowInSeconds: 1 });
      expect(inputs.filterCriteria.filters).to.have.length(1);
      expect(JSON.parse(inputs.filterCriteria.filters[0].pattern)).to.deep.equal({ eventName: ["INSERT"] });
      expect(inputs.filterCriteria.filters[0].pattern).to.equal(STREAM_FILTER_PATTERN);
    });

    it("reports partial batch failures, bisects a failing batch, bounds retries and age, and sends what it gives up on to the DLQ", () => {
      const inputs = mapping().inputs;
      expect(inputs.functionResponseTypes).to.deep.equal(["ReportBatchItemFailures"]);
      expect(inputs).to.include({ bisectBatchOnFunctionError: true, maximumRetryAttempts: 5, maximumRecordAgeInSeconds: 3600 });
      expect(inputs.destinationConfig).to.deep.equal({ onFailure: { destinationArn: queue().state.arn } });
    });

    it("is created only after the forwarder's policy exists (Lambda checks the stream and queue permissions then)", () => {
      expect(mapping().options.dependencies).to.include(find.named(POLICY, "usage-ledger-forwarder-policy").urn);
    });

    it("keeps the dead letters encrypted for 14 days and exports the queue's URL", async () => {
      expect(queue().inputs).to.include({ sqsManagedSseEnabled: true, messageRetentionSeconds: DEAD_LETTER_RETENTION_SECONDS });
      expect(DEAD_LETTER_RETENTION_SECONDS).to.equal(1_209_600);
      expect(await promiseOf(program.forwarderDeadLetterQueueUrl)).to.equal(queue().state.url);
    });

    it("sweeps the backlog every minute, invoked only by its own rule, never retried or queued past the next sweep", () => {
      const rule = find.one("aws:cloudwatch/eventRule:EventRule");
      expect(rule.inputs.scheduleExpression).to.equal("rate(1 minute)").and.equal(SWEEP_SCHEDULE);
      const target = find.one("aws:cloudwatch/eventTarget:EventTarget");
      expect(target.inputs).to.include({ rule: rule.state.name, arn: forwarder().state.arn });
      const permission = find.named("aws:lambda/permission:Permission", "usage-ledger-sweep-permission");
      expect(permission.inputs).to.deep.equal({ action: "lambda:InvokeFunction", function: forwarder().state.name, principal: "events.amazonaws.com", sourceArn: rule.state.arn });
      expect(target.options.dependencies).to.include(permission.urn);
      const forwarderPermissions = find.ofType("aws:lambda/permission:Permission").filter((p) => p.inputs.function === forwarder().state.name);
      expect(forwarderPermissions).to.have.length(1);
      expect(find.one("aws:lambda/functionEventInvokeConfig:FunctionEventInvokeConfig").inputs).to.include({
        functionName: forwarder().state.name,
        maximumRetryAttempts: 0,
        maximumEventAgeInSeconds: 60,
      });
    });
  });

  describe("least privilege", () => {
    const policies = () => find.ofType(POLICY);

    it("grants no `*` action or resource in any policy the program writes", () => {
      expect(policies()).to.have.length(3);
      for (const policy of policies()) {
        for (const [action, resource] of grants(policy.inputs.policy)) {
          expect(action, policy.name).to.not.equal("*");
          expect(action, policy.name).to.not.match(/:\*$|\*/);
          expect(resource, policy.name).to.not.equal("*");
          expect(resource, policy.name).to.match(/^arn:aws:[a-z0-9-]+:us-east-1:123456789012:/);
          // The only wildcard: the log streams of one log group.
          if (resource.includes("*")) expect(resource, policy.name).to.match(/^arn:aws:logs:us-east-1:123456789012:log-group:[^*]+:\*$/);
        }
      }
    });

    it("lets the chat function only PutItem into the ledger table: no read, update, delete, index or stream", () => {
      const dynamo = grants(find.named(POLICY, "metered-ai-api-policy").inputs.policy).filter(([action, resource]) => action.startsWith("dynamodb:") && resource.startsWith(table().state.arn));
      expect(dynamo).to.deep.equal([["dynamodb:PutItem", table().state.arn]]);
      expect(grants(find.named(POLICY, "metered-ai-api-authorizer-policy").inputs.policy).filter(([action]) => !action.startsWith("logs:"))).to.deep.equal([]);
    });

    it("lets the forwarder do exactly what it needs, each on its own ARN", () => {
      const t = table().state;
      const logGroup = find.named("aws:cloudwatch/logGroup:LogGroup", "usage-ledger-forwarder-logs").state.arn;
      const parameter = find.named(PARAMETER, "usage-ledger-param-moesif-application-id").state.arn;
      expect(grants(find.named(POLICY, "usage-ledger-forwarder-policy").inputs.policy)).to.have.deep.members([
        ["logs:CreateLogStream", `${logGroup}:*`],
        ["logs:PutLogEvents", `${logGroup}:*`],
        ["dynamodb:Query", `${t.arn}/index/${UNDELIVERED_INDEX}`],
        ["dynamodb:UpdateItem", t.arn],
        ["dynamodb:DescribeStream", t.streamArn],
        ["dynamodb:GetRecords", t.streamArn],
        ["dynamodb:GetShardIterator", t.streamArn],
        ["dynamodb:ListStreams", t.streamArn],
        ["sqs:SendMessage", queue().state.arn],
        ["ssm:GetParameters", parameter],
        ["ssm:GetParameter", parameter],
        // The stale-reservation sweep: the ledger item of a hold's transaction, and the customers table.
        ["dynamodb:GetItem", t.arn],
        ["dynamodb:Scan", customersTable().state.arn],
        ["dynamodb:UpdateItem", customersTable().state.arn],
        ["dynamodb:GetItem", customersTable().state.arn],
      ]);
      // Not the chat function's parameters: the forwarder has its own copy of the Moesif id and nothing of the upstream's.
      const chatParameters = find.ofType(PARAMETER).filter((p) => p.name.startsWith("metered-ai-api-param-")).map((p) => p.state.arn);
      for (const arn of chatParameters) expect(find.named(POLICY, "usage-ledger-forwarder-policy").inputs.policy).to.not.include(arn);
    });

    it("writes the forwarder's policy for any ARNs given, SSM only when it has parameters", () => {
      const args = { logGroupArn: "arn:aws:logs:r:1:log-group:g", tableArn: "arn:aws:dynamodb:r:1:table/t", streamArn: "arn:aws:dynamodb:r:1:table/t/stream/s", deadLetterQueueArn: "arn:aws:sqs:r:1:q" };
      const without = JSON.parse(forwarderPolicy({ ...args, parameterArns: [] })).Statement as Statement[];
      expect(without.flatMap((s) => list(s.Action)).filter((a) => a.startsWith("ssm:"))).to.deep.equal([]);
      expect(without.find((s) => list(s.Action).includes("dynamodb:Query"))!.Resource).to.equal("arn:aws:dynamodb:r:1:table/t/index/undelivered");
    });
  });

  describe("stripeBilling: moesif (the default)", () => {
    it("creates no Stripe meter, product or price and exports none", async () => {
      for (const type of [METER, PRODUCT, PRICE]) expect(find.ofType(type), type).to.have.length(0);
      expect(program.stripeMeterId).to.equal(undefined);
      expect(program.stripeProductId).to.equal(undefined);
      expect(program.stripePriceIds).to.equal(undefined);
      expect(forwarderVariables()).to.not.have.property("STRIPE_API_KEY_PARAMETER");
      expect(find.named("stripe:index/webhookEndpoint:WebhookEndpoint", "moesif-stripe-endpoint")).to.not.equal(undefined);
    });
  });

  describe("stripeBilling: meters", () => {
    let meters: { program: Program; created: Recorded[] };
    let m: ReturnType<typeof finder>;
    before(async () => {
      meters = await runProgram(metersConfig());
      m = finder(meters.created);
    });

    it("creates the meter the forwarder's events match: ai_usage_cost, summed per Stripe customer id, value in `value`", async () => {
      const meter = m.one(METER);
      expect(meter.inputs).to.deep.equal({
        displayName: "AI usage cost (micro-units)",
        eventName: STRIPE_METER_EVENT_NAME,
        defaultAggregation: { formula: "sum" },
        customerMapping: { eventPayloadKey: "stripe_customer_id", type: "by_id" },
        valueSettings: { eventPayloadKey: "value" },
      });
      expect(METER_SETTINGS.eventName).to.equal("ai_usage_cost");
      expect(await promiseOf(meters.program.stripeMeterId!)).to.equal(meter.id).and.match(/^mtr_/);
    });

    it("creates one product with a readable invoice line and a unit label within Stripe's 12 characters", async () => {
      const product = m.one(PRODUCT);
      expect(product.inputs).to.include({ name: "AI usage", unitLabel: "micro-unit" });
      expect(product.inputs.unitLabel.length).to.be.at.most(12);
      expect(product.inputs.description).to.match(/one millionth of the invoice currency/);
      expect(await promiseOf(meters.program.stripeProductId!)).to.equal(product.id);
    });

    it("creates one metered monthly price per plan currency on that meter, one unit = one micro-unit", async () => {
      const prices = Object.fromEntries(m.ofType(PRICE).map((p) => [p.inputs.currency, p]));
      expect(Object.keys(prices).sort()).to.deep.equal(["eur", "jpy", "usd"]);
      const expected = { usd: 0.0001, eur: 0.0001, jpy: 0.000001 };
      for (const [currency, unitAmountDecimal] of Object.entries(expected)) {
        const inputs = prices[currency].inputs;
        expect(inputs, currency).to.include({ product: m.one(PRODUCT).id, currency, billingScheme: "per_unit", unitAmountDecimal });
        expect(inputs.unitAmount, currency).to.equal(undefined);
        expect(inputs.recurring, currency).to.deep.equal({ interval: "month", intervalCount: 1, usageType: "metered", aggregateUsage: "sum", meter: m.one(METER).id });
        expect(inputs.nickname, currency).to.equal(`AI usage, ${currency.toUpperCase()}: 1 unit = 0.000001 ${currency.toUpperCase()}`);
        expect(inputs.transformQuantity, currency).to.equal(undefined);
      }
      expect(await promiseOf(meters.program.stripePriceIds!)).to.deep.equal(Object.fromEntries(Object.entries(prices).map(([currency, p]) => [currency, (p as Recorded).id])));
    });

    it("retains every Stripe object on delete, as the provider does anyway (meters and prices cannot be deleted)", () => {
      for (const resource of [m.one(METER), m.one(PRODUCT), ...m.ofType(PRICE)]) expect(resource.options.retainOnDelete, resource.name).to.equal(true);
    });

    it("leaves every Stripe input unchanged when model prices change, and only adds a price for a new currency", async () => {
      const changedPrices = { ...METER_PLANS, starter: { ...METER_PLANS.starter, prices: { "gpt-4o-mini": { input: 0.2, output: 0.8 } } } };
      const repriced = finder((await runProgram(metersConfig({ [`${PROJECT}:plans`]: JSON.stringify(changedPrices) }))).created);
      const stripeInputs = (f: ReturnType<typeof finder>) => Object.fromEntries([METER, PRODUCT, PRICE].flatMap((type) => f.ofType(type).map((r) => [r.name, r.inputs])));
      expect(stripeInputs(repriced)).to.deep.equal(stripeInputs(m));

      const withGbp = { ...METER_PLANS, pound: { rateLimit: 1, burstLimit: 1, currency: "gbp", prices: { "gpt-4o-mini": { input: 0.12, output: 0.5 } } } };
      const grown = finder((await runProgram(metersConfig({ [`${PROJECT}:plans`]: JSON.stringify(withGbp) }))).created);
      const before = stripeInputs(m);
      const after = stripeInputs(grown);
      expect(Object.keys(after).filter((name) => !(name in before))).to.deep.equal(["stripe-meters-price-gbp"]);
      for (const [name, inputs] of Object.entries(before)) expect(after[name], name).to.deep.equal(inputs);
    });

    it("tells both functions the billing route and gives the forwarder the meter-event key in its own SSM parameter", () => {
      expect(m.named(FUNCTION, "metered-ai-api-fn").inputs.environment.variables.STRIPE_BILLING).to.equal("meters");
      const vars = m.named(FUNCTION, "usage-ledger-forwarder").inputs.environment.variables;
      const parameter = m.named(PARAMETER, "usage-ledger-param-stripe-api-key");
      expect(vars).to.include({ STRIPE_BILLING: "meters", STRIPE_API_KEY_PARAMETER: parameter.state.name });
      expect(parameter.inputs.type).to.equal("SecureString");
      expect(isSecretInput(parameter.inputs.value)).to.equal(true);
      expect(unsecret(parameter.inputs.value)).to.equal(STRIPE_METER_KEY);
      expect(JSON.stringify(vars)).to.not.include(STRIPE_METER_KEY);
      const readable = grants(m.named(POLICY, "usage-ledger-forwarder-policy").inputs.policy).filter(([action]) => action === "ssm:GetParameters").map(([, arn]) => arn);
      expect(readable).to.have.members([parameter.state.arn, m.named(PARAMETER, "usage-ledger-param-moesif-application-id").state.arn]);
      expect(vars.SECRETS_VERSION).to.equal("1.1");
    });

    it("falls back to the Stripe provider's key when no stripeMeterApiKey is set", async () => {
      const fallback = finder((await runProgram(metersConfig({ [`${PROJECT}:stripeMeterApiKey`]: undefined }))).created);
      expect(unsecret(fallback.named(PARAMETER, "usage-ledger-param-stripe-api-key").inputs.value)).to.equal(STRIPE_KEY);
    });

    it("keeps every secret out of the plain-text state and the plain outputs", async () => {
      const outputs = stackOutputs(meters.program);
      expect(outputs.map(([name]) => name)).to.include.members(["ledgerTableName", "ledgerTableArn", "forwarderFunctionName", "forwarderDeadLetterQueueUrl", "stripeMeterId", "stripeProductId", "stripePriceIds"]);
      for (const [name, output] of outputs) {
        if (await pulumi.isSecret(output)) continue;
        const text = JSON.stringify(await promiseOf(output));
        recordForScan(`stack output ${name} (meters)`, [text]);
        for (const secret of [STRIPE_METER_KEY, STRIPE_KEY, MOESIF_APP_ID, UPSTREAM_SECRET]) expect(text, name).to.not.include(secret);
      }
      const states = meters.created.map((r) => JSON.stringify(plainState(r)));
      recordForScan("resource state (meters)", states);
      for (const state of states) for (const secret of [STRIPE_METER_KEY, STRIPE_KEY, MOESIF_APP_ID, UPSTREAM_SECRET]) expect(state).to.not.include(secret);
      // The scan sees the parameter: its value is in the state, only as a secret.
      expect(JSON.stringify(m.named(PARAMETER, "usage-ledger-param-stripe-api-key").state)).to.include(STRIPE_METER_KEY);
    });

    it("refuses, at preview, a customer on a priced plan without a Stripe customer id", async () => {
      const customers = { ...METER_CUSTOMERS, initech: { plan: "euro" } };
      expect(await programFailure(metersConfig({ [`${PROJECT}:customers`]: JSON.stringify(customers) }))).to.match(
        /Invalid stack config "metered-ai-api:customers\.initech\.stripeCustomerId": is required with stripeBilling: meters/,
      );
    });

    it("refuses to run without any Stripe key for the forwarder", async () => {
      const message = await programFailure(metersConfig({ [`${PROJECT}:stripeMeterApiKey`]: undefined, "stripe:apiKey": undefined }));
      expect(message).to.match(/stripeMeterApiKey.*is required with stripeBilling: meters.*pulumi config set --secret stripeMeterApiKey/);
    });

    it("refuses a stripeMeterApiKey stored in plain text", async () => {
      const plain = SECRET_KEYS.filter((key) => key !== `${PROJECT}:stripeMeterApiKey`);
      const message = await programFailure(metersConfig(), plain);
      expect(message).to.match(/stripeMeterApiKey.*plain text.*--secret/);
      expect(message).to.not.include(STRIPE_METER_KEY);
    });
  });
});

describe("one Stripe price unit = one micro-unit (infra/stripe-meters.ts)", () => {
  it("prices a micro-unit in the currency's minor unit: 0.0001 cents, 0.000001 yen, 0.001 fils", () => {
    expect(microUnitAmountDecimal("usd")).to.equal("0.0001");
    expect(microUnitAmountDecimal("EUR")).to.equal("0.0001");
    expect(microUnitAmountDecimal("jpy")).to.equal("0.000001");
    expect(microUnitAmountDecimal("krw")).to.equal("0.000001");
    expect(microUnitAmountDecimal("kwd")).to.equal("0.001");
    // ISK: zero-decimal in Stripe's words, but its API amounts stay in hundredths.
    expect(microUnitAmountDecimal("isk")).to.equal("0.0001");
  });

  it("always makes 1,000,000 units exactly one currency unit, within Stripe's 12 decimal places", () => {
    for (const currency of ["usd", "eur", "gbp", "jpy", "vnd", "xof", "bhd", "tnd", "isk", "chf"]) {
      const decimal = microUnitAmountDecimal(currency);
      const places = decimal.split(".")[1].length;
      expect(places, currency).to.be.at.most(MAX_UNIT_AMOUNT_DECIMAL_PLACES);
      // 10^6 units × 10^-places minor units = 10^(6 - places) minor units = one major unit.
      expect(6 - places, currency).to.equal(minorUnitDigits(currency));
      expect(Number(decimal) * 1_000_000 * 10 ** -minorUnitDigits(currency), currency).to.be.closeTo(1, 1e-12);
    }
  });
});
