import { expect } from "chai";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { loadFunctionConfig } from "../../functions/ai-chat/config";
import { handleRequest } from "../../functions/ai-chat/core";
import { chatBody } from "../helpers/events";
import { FakeUpstream, fakeDeps, jsonResponse, proxyRequest, testEnv } from "../helpers/fakes";

const PRICED = { starter: { models: ["gpt-4o-mini"], pricing: { currency: "eur", prices: { "gpt-4o-mini": { input: 150_000, output: 600_000 } } } }, pro: {} };

describe("loadFunctionConfig: plans and prices", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "plans-file-"));
  const cwd = process.cwd();
  after(() => {
    process.chdir(cwd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("reads per-model prices from PLANS", () => {
    const config = loadFunctionConfig(testEnv({ PLANS: JSON.stringify(PRICED) }));
    expect(config.problems).to.deep.equal([]);
    expect(config.plans.starter.pricing).to.deep.equal(PRICED.starter.pricing);
    expect(config.plans.pro.pricing).to.equal(undefined);
  });

  it("reads PLANS_FILE relative to the working directory when PLANS is not set", () => {
    fs.writeFileSync(path.join(dir, "plans.json"), JSON.stringify(PRICED));
    process.chdir(dir);
    try {
      const config = loadFunctionConfig(testEnv({ PLANS: undefined, PLANS_FILE: "plans.json" }));
      expect(config.problems).to.deep.equal([]);
      expect(config.plans.starter.pricing?.currency).to.equal("eur");
    } finally {
      process.chdir(cwd);
    }
  });

  it("answers 500 service_misconfigured, naming the file in the log only, when PLANS_FILE is missing", async () => {
    const logs: string[] = [];
    const config = loadFunctionConfig(testEnv({ PLANS: undefined, PLANS_FILE: path.join(dir, "absent.json") }));
    expect(config.problems[0]).to.match(/PLANS_FILE .*absent\.json.* cannot be read: ENOENT/);
    const upstream = new FakeUpstream(() => jsonResponse(200, {}));
    const response = await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ config, logs, upstream }));
    expect(response.statusCode).to.equal(500);
    expect(JSON.parse(response.body).error.code).to.equal("service_misconfigured");
    expect(response.body).to.not.include("absent.json");
    expect(logs.some((l) => l.includes("absent.json"))).to.equal(true);
    expect(upstream.requests).to.have.length(0);
  });

  const invalid: Array<[string, unknown]> = [
    ["a fractional price", { p: { pricing: { currency: "usd", prices: { m: { input: 0.15, output: 1 } } } } }],
    ["a negative price", { p: { pricing: { currency: "usd", prices: { m: { input: -1, output: 1 } } } } }],
    ["a price as a string", { p: { pricing: { currency: "usd", prices: { m: { input: "150000", output: 1 } } } } }],
    ["a misspelt price field", { p: { pricing: { currency: "usd", prices: { m: { input: 1, ouput: 1 } } } } }],
    ["a missing output price", { p: { pricing: { currency: "usd", prices: { m: { input: 1 } } } } }],
    ["an upper-case currency", { p: { pricing: { currency: "USD", prices: {} } } }],
    ["a misspelt plan field", { p: { pricng: { currency: "usd", prices: {} } } }],
    ["models that are not strings", { p: { models: [1] } }],
    ["JSON that is not an object", []],
  ];
  for (const [name, plans] of invalid) {
    it(`reports ${name} as a configuration problem`, () => {
      const config = loadFunctionConfig(testEnv({ PLANS: JSON.stringify(plans), CUSTOMERS: "{}" }));
      expect(config.problems).to.have.length(1);
      expect(config.problems[0]).to.match(/^PLANS/);
    });
  }

  it("reads secret parameter names and the mock-forwarding switch", () => {
    const config = loadFunctionConfig(
      testEnv({ UPSTREAM_API_KEY_PARAMETER: "/svc/upstream", MOESIF_APPLICATION_ID_PARAMETER: " /svc/moesif ", STRIPE_WEBHOOK_SECRET_PARAMETER: "/svc/whsec", FORWARD_MOCK_DIRECTIVES: "true" }),
    );
    expect(config.secretParameters).to.deep.equal({ upstreamApiKey: "/svc/upstream", moesifApplicationId: "/svc/moesif", stripeWebhookSecret: "/svc/whsec" });
    expect(config.forwardMockDirectives).to.equal(true);
    expect(loadFunctionConfig(testEnv()).forwardMockDirectives).to.equal(false);
  });
});

describe("loadFunctionConfig: usage ledger", () => {
  it("has no ledger, a 1000 ms write budget and Moesif billing by default", () => {
    const config = loadFunctionConfig(testEnv());
    expect(config.problems).to.deep.equal([]);
    expect(config.ledger).to.deep.equal({ table: undefined, timeoutMs: 1000 });
    expect(config.stripeBilling).to.equal("moesif");
  });

  it("reads LEDGER_TABLE, LEDGER_TIMEOUT_MS and STRIPE_BILLING", () => {
    const config = loadFunctionConfig(testEnv({ LEDGER_TABLE: " usage-ledger-abc123 ", LEDGER_TIMEOUT_MS: "250", STRIPE_BILLING: "meters" }));
    expect(config.problems).to.deep.equal([]);
    expect(config.ledger).to.deep.equal({ table: "usage-ledger-abc123", timeoutMs: 250 });
    expect(config.stripeBilling).to.equal("meters");
  });

  for (const raw of ["0", "-5", "1.5", "soon"]) {
    it(`reports LEDGER_TIMEOUT_MS="${raw}" as a configuration problem`, () => {
      const config = loadFunctionConfig(testEnv({ LEDGER_TABLE: "usage-ledger", LEDGER_TIMEOUT_MS: raw }));
      expect(config.problems).to.deep.equal([`LEDGER_TIMEOUT_MS must be a positive integer, got "${raw}"`]);
      expect(config.ledger.timeoutMs).to.equal(1000);
    });
  }

  for (const raw of ["both", "Meters", "stripe"]) {
    it(`reports STRIPE_BILLING="${raw}" as a configuration problem, never billing through Stripe for it`, () => {
      const config = loadFunctionConfig(testEnv({ STRIPE_BILLING: raw }));
      expect(config.problems).to.deep.equal([`STRIPE_BILLING must be "moesif" or "meters", got "${raw}"`]);
      expect(config.stripeBilling).to.equal("moesif");
    });
  }

  it("answers 500 service_misconfigured while STRIPE_BILLING is wrong", async () => {
    const config = loadFunctionConfig(testEnv({ STRIPE_BILLING: "both" }));
    const upstream = new FakeUpstream(() => jsonResponse(200, {}));
    const response = await handleRequest(proxyRequest({ json: chatBody() }), fakeDeps({ config, upstream }));
    expect(response.statusCode).to.equal(500);
    expect(JSON.parse(response.body).error.code).to.equal("service_misconfigured");
    expect(upstream.requests).to.have.length(0);
  });
});

describe("loadFunctionConfig: customers table and prepaid plans", () => {
  const PREPAID = { credits: { billing: "prepaid", maxOutputTokens: 2048, pricing: PRICED.starter.pricing, quota: { limit: 1000, period: "WEEK", offset: 1 } } };

  it("reads CUSTOMERS_TABLE, its timeout and cache TTL, and ignores CUSTOMERS once there is a table", () => {
    const config = loadFunctionConfig(testEnv({ CUSTOMERS_TABLE: " customers-abc ", CUSTOMERS_TIMEOUT_MS: "700", CUSTOMER_CACHE_TTL_MS: "15000" }));
    expect(config.problems).to.deep.equal([]);
    expect(config.customerStore).to.deep.equal({ table: "customers-abc", timeoutMs: 700, cacheTtlMs: 15_000 });
    expect(config.customers).to.deep.equal({});
    expect(loadFunctionConfig(testEnv()).customerStore).to.deep.equal({ table: undefined, timeoutMs: 1000, cacheTtlMs: 30_000 });
  });

  it("reads billing, maxOutputTokens and quota of a plan", () => {
    const config = loadFunctionConfig(testEnv({ CUSTOMERS_TABLE: "customers", PLANS: JSON.stringify({ ...PREPAID, free: { quota: { limit: 10, period: "DAY" } } }) }));
    expect(config.problems).to.deep.equal([]);
    expect(config.plans.credits).to.deep.include({ billing: "prepaid", maxOutputTokens: 2048, quota: { limit: 1000, period: "WEEK", offset: 1 } });
    expect(config.plans.free).to.deep.equal({ quota: { limit: 10, period: "DAY", offset: 0 } });
  });

  it("reports a prepaid plan without CUSTOMERS_TABLE as a configuration problem", () => {
    const config = loadFunctionConfig(testEnv({ PLANS: JSON.stringify(PREPAID), CUSTOMERS: "{}" }));
    expect(config.problems).to.deep.equal(["plan credits is prepaid, which needs CUSTOMERS_TABLE (the balances live in the customers table)"]);
  });

  it("reads STRIPE_WEBHOOK_SECRET as the webhook's direct secret", () => {
    expect(loadFunctionConfig(testEnv({ STRIPE_WEBHOOK_SECRET: " whsec_local " })).stripeWebhookSecret).to.equal("whsec_local");
  });

  const invalid: Array<[string, unknown, RegExp]> = [
    ["a prepaid plan without pricing", { p: { billing: "prepaid" } }, /plan p: is prepaid, so it needs pricing/],
    ["an unknown billing mode", { p: { billing: "monthly" } }, /plan p: billing: must be "postpaid" or "prepaid"/],
    ["a maxOutputTokens of 0", { p: { maxOutputTokens: 0 } }, /maxOutputTokens: must be an integer from 1 to 1000000/],
    ["a fractional maxOutputTokens", { p: { maxOutputTokens: 10.5 } }, /maxOutputTokens/],
    ["a maxOutputTokens above a million", { p: { maxOutputTokens: 1_000_001 } }, /maxOutputTokens/],
    ["a quota period API Gateway does not know", { p: { quota: { limit: 1, period: "YEAR" } } }, /quota\.period: must be one of DAY, WEEK, MONTH/],
    ["a WEEK quota offset above 6", { p: { quota: { limit: 1, period: "WEEK", offset: 7 } } }, /quota\.offset: must be an integer from 0 to 6 for WEEK/],
    ["a quota without a limit", { p: { quota: { period: "DAY" } } }, /quota\.limit/],
    ["a misspelt quota field", { p: { quota: { limit: 1, period: "DAY", ofset: 0 } } }, /unknown field "ofset"/],
    ["a misspelt billing field", { p: { biling: "prepaid" } }, /unknown field "biling" \(use models, pricing, billing, maxOutputTokens, quota\)/],
  ];
  for (const [name, plans, problem] of invalid) {
    it(`reports ${name} as a configuration problem`, () => {
      const config = loadFunctionConfig(testEnv({ CUSTOMERS_TABLE: "customers", PLANS: JSON.stringify(plans) }));
      expect(config.problems).to.have.length(1);
      expect(config.problems[0]).to.match(problem);
    });
  }
});
