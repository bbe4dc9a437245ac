import { expect } from "chai";
import {
  environmentBytes,
  forwarderEnvironment,
  functionEnvironment,
  functionPlans,
  holdStaleAfterMs,
  plannedCustomersTableName,
  plannedEnvironment,
  plannedLedgerTableName,
  sanitizeStackName,
} from "../../infra/function-env";
import { billingCurrencies, MAX_QUOTA_OFFSET, parseStackConfig, StackConfigError, type QuotaPeriod } from "../../infra/stack-config";

const PLAN = { rateLimit: 5, burstLimit: 10 };
const parse = (values: Record<string, unknown>, stack = "dev") => parseStackConfig({ plans: { starter: PLAN }, ...values }, { forDeploy: false, stack });
const refusal = (values: Record<string, unknown>): string => {
  try {
    parse(values);
  } catch (err) {
    expect(err).to.be.instanceOf(StackConfigError);
    return (err as Error).message;
  }
  throw new Error(`accepted ${JSON.stringify(values)}`);
};
const withPrices = (plan: Record<string, unknown>) => ({ plans: { starter: { ...PLAN, ...plan } } });

describe("stack config (infra/stack-config.ts)", () => {
  describe("prices per 1M tokens, per model, in integer micro-units", () => {
    it("parses a pasted price list exactly, numbers or decimal strings, with the plan's currency", () => {
      const config = parse(
        withPrices({ currency: "EUR", prices: { "gpt-4o-mini": { input: 0.15, cachedInput: 0.075, output: 0.6 }, "gpt-4o": { input: "2.50", cachedInput: "1.25", output: "10.00" }, o1: { input: 15, output: 60, reasoning: 60 } } }),
      );
      expect(config.plans.starter.currency).to.equal("eur");
      expect(config.plans.starter.prices).to.deep.equal({
        "gpt-4o-mini": { input: 150_000, cachedInput: 75_000, output: 600_000 },
        "gpt-4o": { input: 2_500_000, cachedInput: 1_250_000, output: 10_000_000 },
        o1: { input: 15_000_000, output: 60_000_000, reasoning: 60_000_000 },
      });
      expect(Number.isInteger(config.plans.starter.prices!["gpt-4o-mini"].cachedInput)).to.equal(true);
    });

    it("defaults the currency to usd and leaves plans without prices unbilled", () => {
      const config = parseStackConfig({ plans: { paid: { ...PLAN, prices: { m: { input: 1, output: 2 } } }, free: PLAN } }, { forDeploy: false });
      expect(config.plans.paid.currency).to.equal("usd");
      expect(config.plans.free).to.deep.equal({ ...PLAN, billing: "postpaid" });
    });

    it("refuses the old {inputPer1k, outputPer1k, currency} shape and shows the new one", () => {
      const message = refusal(withPrices({ prices: { inputPer1k: 0.0003, outputPer1k: 0.0012, currency: "usd" } }));
      expect(message).to.match(/"metered-ai-api:plans\.starter\.prices".*old \{inputPer1k, outputPer1k, currency\} shape/);
      expect(message).to.include("prices: {gpt-4o-mini: {input: 0.15, cachedInput: 0.075, output: 0.60}}");
    });

    it("refuses more than 6 decimal places, naming the field", () => {
      expect(refusal(withPrices({ prices: { "gpt-4o-mini": { input: 0.1500001, output: 0.6 } } }))).to.match(/plans\.starter\.prices\.gpt-4o-mini\.input.*more than 6 decimal places/);
    });

    it("refuses a model in `models` that has no price, naming the model", () => {
      expect(refusal(withPrices({ models: ["gpt-4o-mini", "gpt-4o"], prices: { "gpt-4o-mini": { input: 0.15, output: 0.6 } } }))).to.match(
        /"metered-ai-api:plans\.starter\.prices": has no price for "gpt-4o"/,
      );
    });

    it("refuses typos: a misspelt price field, plan field or quota field never prices anything at zero", () => {
      expect(refusal(withPrices({ prices: { "gpt-4o-mini": { input: 0.15, ouput: 0.6 } } }))).to.match(/plans\.starter\.prices\.gpt-4o-mini\.ouput.*not a price field/);
      expect(refusal(withPrices({ price: { "gpt-4o-mini": { input: 0.15, output: 0.6 } } }))).to.match(/plans\.starter\.price".*not a plan field/);
      expect(refusal(withPrices({ quota: { limit: 5, period: "DAY", ofset: 0 } }))).to.match(/plans\.starter\.quota\.ofset.*not a quota field/);
    });

    it("refuses a bad currency, a currency without prices, an empty price list and negative prices", () => {
      expect(refusal(withPrices({ currency: "dollars", prices: { m: { input: 1, output: 1 } } }))).to.match(/plans\.starter\.currency.*three-letter/);
      expect(refusal(withPrices({ currency: "usd" }))).to.match(/plans\.starter\.currency.*applies to prices/);
      expect(refusal(withPrices({ prices: {} }))).to.match(/plans\.starter\.prices.*names no model/);
      expect(refusal(withPrices({ prices: { m: { input: -1, output: 1 } } }))).to.match(/plans\.starter\.prices\.m\.input.*non-negative/);
    });

    it("gives the function each plan's models and prices; a billing plan without `models` may call its priced models", () => {
      const config = parseStackConfig(
        { plans: { listed: { ...PLAN, models: ["a"], prices: { a: { input: 1, output: 2 }, b: { input: 3, output: 4 } } }, priced: { ...PLAN, prices: { a: { input: 1, output: 2 } } }, open: PLAN, limited: { ...PLAN, models: ["x"] } } },
        { forDeploy: false },
      );
      expect(functionPlans(config.plans)).to.deep.equal({
        listed: { models: ["a"], pricing: { currency: "usd", prices: { a: { input: 1_000_000, output: 2_000_000 }, b: { input: 3_000_000, output: 4_000_000 } } }, billing: "postpaid" },
        priced: { models: ["a"], pricing: { currency: "usd", prices: { a: { input: 1_000_000, output: 2_000_000 } } }, billing: "postpaid" },
        open: { billing: "postpaid" },
        limited: { models: ["x"], billing: "postpaid" },
      });
    });
  });

  describe("quota offsets", () => {
    const quota = (period: string, offset: number) => withPrices({ quota: { limit: 100, period, offset } });
    for (const [period, max] of Object.entries(MAX_QUOTA_OFFSET) as Array<[QuotaPeriod, number]>) {
      it(`accepts 0-${max} for ${period} and refuses ${max + 1} and -1`, () => {
        expect(parse(quota(period, max)).plans.starter.quota).to.deep.equal({ limit: 100, period, offset: max });
        expect(parse(quota(period, 0)).plans.starter.quota!.offset).to.equal(0);
        expect(refusal(quota(period, max + 1))).to.match(new RegExp(`plans\\.starter\\.quota\\.offset.*for period ${period}`));
        expect(refusal(quota(period, -1))).to.match(/plans\.starter\.quota\.offset/);
      });
    }
    it("knows API Gateway's ranges: DAY 0, WEEK 0-6, MONTH 0-27", () => {
      expect(MAX_QUOTA_OFFSET).to.deep.equal({ DAY: 0, WEEK: 6, MONTH: 27 });
    });
  });

  describe("URLs the function sends secrets to", () => {
    for (const key of ["upstreamBaseUrl", "moesifBaseUri"]) {
      it(`${key}: https anywhere, plain http only on loopback`, () => {
        for (const ok of ["https://api.openai.com/v1", "http://127.0.0.1:11434/v1", "http://localhost:8000/v1", "http://[::1]:8000", "http://127.8.9.10"]) {
          expect(parse({ [key]: ok })[key as "upstreamBaseUrl"], ok).to.equal(ok.replace(/\/+$/, ""));
        }
        for (const bad of ["http://192.168.1.5:8000/v1", "http://api.example.com", "http://localhost.example.com", "http://127.0.0.1.nip.io", "ftp://127.0.0.1", "not a url"]) {
          expect(refusal({ [key]: bad }), bad).to.include(`"metered-ai-api:${key}"`);
        }
      });
    }
    it("requires https for the Stripe webhook, even on loopback", () => {
      expect(refusal({ moesifStripeWebhookUrl: "http://127.0.0.1/hook" })).to.match(/moesifStripeWebhookUrl.*https/);
    });
  });

  describe("timeouts", () => {
    it("defaults to a 300 s function (the streamed integration's timeout), 120 s buffered answers and 60 s stream idle gaps", () => {
      const config = parse({});
      expect([config.upstreamTimeoutMs, config.upstreamIdleTimeoutMs, config.meteringTimeoutMs, config.lambdaTimeoutSeconds]).to.deep.equal([120_000, 60_000, 1_000, 300]);
    });
    it("refuses a buffered deadline that leaves less than the 2 s margin under the function timeout or the 5-minute idle timeout", () => {
      // 295,000 + 1,000 (customers) + 1,000 (ledger) + 1,000 (Moesif) + 2,000 margin = 300,000.
      expect(parse({ upstreamTimeoutMs: 295_000 }).upstreamTimeoutMs).to.equal(295_000);
      expect(refusal({ upstreamTimeoutMs: 295_001 })).to.match(/upstreamTimeoutMs.*300001 ms exceeds API Gateway's 5-minute idle timeout/);
      expect(refusal({ lambdaTimeoutSeconds: 20 })).to.match(/upstreamTimeoutMs.*exceeds lambdaTimeoutSeconds \(20000 ms\)/);
      expect(parse({ lambdaTimeoutSeconds: 29, upstreamTimeoutMs: 24_000, upstreamIdleTimeoutMs: 20_000 }).lambdaTimeoutSeconds).to.equal(29);
    });
    it("counts the ledger write and the direct Moesif send that stands in for it one after the other", () => {
      expect(parse({}).ledgerTimeoutMs).to.equal(1_000);
      expect(parse({ upstreamTimeoutMs: 290_000, ledgerTimeoutMs: 4_000, meteringTimeoutMs: 3_000 }).ledgerTimeoutMs).to.equal(4_000);
      expect(refusal({ upstreamTimeoutMs: 290_000, ledgerTimeoutMs: 4_001, meteringTimeoutMs: 3_000 })).to.match(/upstreamTimeoutMs.*ledgerTimeoutMs.*300001 ms exceeds/);
      expect(refusal({ lambdaTimeoutSeconds: 60, upstreamTimeoutMs: 30_000, upstreamIdleTimeoutMs: 50_000, ledgerTimeoutMs: 6_001 })).to.match(/upstreamIdleTimeoutMs.*ledgerTimeoutMs.*lambdaTimeoutSeconds/);
      expect(refusal({ ledgerTimeoutMs: 0 })).to.match(/ledgerTimeoutMs.*1 to 10000/);
    });
    it("counts one customers-table call (the settlement or usage counters after the answer) in the same sum", () => {
      const config = parse({});
      expect([config.customersTimeoutMs, config.customerCacheTtlMs]).to.deep.equal([1_000, 30_000]);
      // 290,000 + 6,000 (customers) + 1,000 (ledger) + 1,000 (Moesif) + 2,000 margin = 300,000.
      expect(parse({ upstreamTimeoutMs: 290_000, customersTimeoutMs: 6_000 }).customersTimeoutMs).to.equal(6_000);
      expect(refusal({ upstreamTimeoutMs: 290_000, customersTimeoutMs: 6_001 })).to.match(/"metered-ai-api:upstreamTimeoutMs".*customersTimeoutMs.*300001 ms exceeds API Gateway's 5-minute idle timeout/);
      expect(refusal({ lambdaTimeoutSeconds: 60, upstreamTimeoutMs: 50_000, customersTimeoutMs: 6_001 })).to.match(/upstreamTimeoutMs.*exceeds lambdaTimeoutSeconds \(60000 ms\)/);
      expect(refusal({ lambdaTimeoutSeconds: 60, upstreamTimeoutMs: 30_000, upstreamIdleTimeoutMs: 50_000, customersTimeoutMs: 6_001 })).to.match(/upstreamIdleTimeoutMs.*customersTimeoutMs.*lambdaTimeoutSeconds/);
    });
    it("refuses customers-table timeouts and cache lifetimes out of range, naming the key", () => {
      expect(refusal({ customersTimeoutMs: 0 })).to.match(/"metered-ai-api:customersTimeoutMs": must be an integer from 1 to 10000 \(got 0\)/);
      expect(refusal({ customersTimeoutMs: 10_001 })).to.match(/"metered-ai-api:customersTimeoutMs".*1 to 10000/);
      expect(refusal({ customersTimeoutMs: "1.5" })).to.match(/"metered-ai-api:customersTimeoutMs"/);
      expect(refusal({ customerCacheTtlMs: 0 })).to.match(/"metered-ai-api:customerCacheTtlMs": must be an integer from 1 to 3600000/);
      expect(refusal({ customerCacheTtlMs: 3_600_001 })).to.match(/"metered-ai-api:customerCacheTtlMs"/);
      expect(parse({ customerCacheTtlMs: "5000", customersTimeoutMs: "250" })).to.include({ customerCacheTtlMs: 5_000, customersTimeoutMs: 250 });
    });
    it("refuses a stream idle gap at or past API Gateway's idle timeout or the function timeout", () => {
      expect(refusal({ upstreamIdleTimeoutMs: 299_000 })).to.match(/upstreamIdleTimeoutMs.*5-minute idle timeout/);
      expect(refusal({ lambdaTimeoutSeconds: 60, upstreamTimeoutMs: 30_000, upstreamIdleTimeoutMs: 58_000 })).to.match(/upstreamIdleTimeoutMs.*lambdaTimeoutSeconds/);
    });
  });


  describe("the function's 4 KB environment", () => {
    it("measures what Lambda measures: the JSON-serialised variables map, quotes escaped", () => {
      const variables = { A: '{"k":"v"}', B: "é" };
      expect(environmentBytes(variables)).to.equal(Buffer.byteLength(JSON.stringify(variables), "utf8"));
      expect(environmentBytes(variables)).to.equal('{"A":"{\\"k\\":\\"v\\"}","B":"é"}'.length + 1);
    });

    it("does not grow with the number of customers: 1,000 customers plan the same environment as one", () => {
      const customers = (n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`customer-${String(i).padStart(4, "0")}`, { plan: "starter", stripeCustomerId: `cus_${"X".repeat(14)}${i}` }]));
      const one = plannedEnvironment(parse({ customers: customers(1) }), "dev");
      const thousand = plannedEnvironment(parse({ customers: customers(1_000) }), "dev");
      expect(thousand).to.deep.equal(one);
      expect(one).to.not.have.property("CUSTOMERS");
      expect(environmentBytes(one)).to.be.below(4096);
    });

    it("still refuses an environment over 4096 bytes, naming the URL that makes it so", () => {
      const long = `https://${"a".repeat(3_400)}.example.com/v1`;
      expect(refusal({ upstreamBaseUrl: long })).to.match(/"metered-ai-api:upstreamBaseUrl": makes the function's environment \d+ bytes .*Lambda allows 4096/);
      expect(refusal({ moesifBaseUri: long })).to.match(/"metered-ai-api:moesifBaseUri": makes the function's environment/);
    });

    it("holds no secret: the upstream key, the Moesif application id and the Stripe webhook secret are parameter names, sized for at preview", () => {
      const vars = functionEnvironment(parse({}), "prod");
      expect(vars).to.include({ PLANS_FILE: "plans.json", CUSTOMERS_TIMEOUT_MS: "1000", CUSTOMER_CACHE_TTL_MS: "30000" });
      for (const name of ["UPSTREAM_API_KEY", "MOESIF_APPLICATION_ID", "STRIPE_WEBHOOK_SECRET", "PLANS", "CUSTOMERS"]) expect(vars).to.not.have.property(name);
      const planned = plannedEnvironment(parse({}), "prod");
      expect(planned.UPSTREAM_API_KEY_PARAMETER).to.equal("metered-ai-api-param-upstream-api-key-xxxxxxx");
      expect(planned.MOESIF_APPLICATION_ID_PARAMETER).to.equal("metered-ai-api-param-moesif-application-id-xxxxxxx");
      expect(planned.STRIPE_WEBHOOK_SECRET_PARAMETER).to.equal("metered-ai-api-param-stripe-webhook-secret-xxxxxxx");
      expect(planned.CUSTOMERS_TABLE).to.equal(plannedCustomersTableName()).and.equal("customers-table-xxxxxxx");
      expect(planned.SECRETS_VERSION).to.equal("99999.99999.99999");
    });
  });

  describe("the usage ledger and Stripe billing", () => {
    const billing = { plans: { paid: { ...PLAN, prices: { m: { input: 1, output: 2 } } }, euro: { ...PLAN, currency: "eur", prices: { m: { input: 1, output: 2 } } }, free: PLAN } };

    it("defaults to Moesif reporting to Stripe, a deletion-protected ledger and an unreserved forwarder", () => {
      expect(parse({})).to.include({ stripeBilling: "moesif", ledgerDeletionProtection: true, ledgerTimeoutMs: 1_000, forwarderReservedConcurrency: -1 });
      expect(parse({ ledgerDeletionProtection: "false", forwarderReservedConcurrency: "5" })).to.include({ ledgerDeletionProtection: false, forwarderReservedConcurrency: 5 });
    });

    it("refuses one Stripe customer id for two customers (a credit purchase could land on either)", () => {
      const customers = { acme: { plan: "paid", stripeCustomerId: "cus_shared" }, globex: { plan: "paid", stripeCustomerId: "cus_shared" } };
      expect(refusal({ ...billing, customers })).to.match(/"metered-ai-api:customers\.globex\.stripeCustomerId": cus_shared is already customer "acme"'s/);
      expect(Object.keys(parse({ ...billing, customers: { ...customers, globex: { plan: "paid", stripeCustomerId: "cus_globex" } } }).customers)).to.deep.equal(["acme", "globex"]);
    });

    it("accepts only moesif or meters, never both", () => {
      expect(parse({ stripeBilling: "meters" }).stripeBilling).to.equal("meters");
      expect(refusal({ stripeBilling: "both" })).to.match(/"metered-ai-api:stripeBilling": must be "moesif".*or "meters"/);
    });

    it("with meters, requires a Stripe customer id for every customer on a plan with prices, and only for those", () => {
      const customers = { acme: { plan: "paid", stripeCustomerId: "cus_acme" }, hobby: { plan: "free" }, nostripe: { plan: "euro" } };
      expect(refusal({ ...billing, customers, stripeBilling: "meters" })).to.match(/"metered-ai-api:customers\.nostripe\.stripeCustomerId": is required with stripeBilling: meters, because plan "euro" bills/);
      // The same customers pass while Moesif reports to Stripe, and meters pass once that customer is gone.
      expect(parse({ ...billing, customers }).customers.nostripe).to.deep.equal({ plan: "euro" });
      const { nostripe: _left, ...rest } = customers;
      expect(Object.keys(parse({ ...billing, customers: rest, stripeBilling: "meters" }).customers)).to.deep.equal(["acme", "hobby"]);
    });

    it("lists one currency per billing plan currency, for one Stripe price each", () => {
      expect(billingCurrencies(parse(billing).plans)).to.deep.equal(["eur", "usd"]);
      expect(billingCurrencies(parse({}).plans)).to.deep.equal([]);
    });

    it("refuses a forwarder concurrency of 0, which would stop every delivery", () => {
      expect(refusal({ forwarderReservedConcurrency: 0 })).to.match(/forwarderReservedConcurrency.*0 would stop every delivery/);
    });

    it("tells the function its ledger timeout and billing route, and sizes LEDGER_TABLE for the generated table name", () => {
      const config = parse({ ledgerTimeoutMs: 750, stripeBilling: "meters" });
      expect(functionEnvironment(config, "dev")).to.include({ LEDGER_TIMEOUT_MS: "750", STRIPE_BILLING: "meters" });
      expect(plannedEnvironment(config, "dev").LEDGER_TABLE).to.equal(plannedLedgerTableName()).and.equal("usage-ledger-table-xxxxxxx");
      expect(forwarderEnvironment(config)).to.deep.equal({
        MOESIF_BASE_URI: "https://api.moesif.net",
        STRIPE_BILLING: "meters",
        FORWARDER_SWEEP_GRACE_MS: "60000",
        HOLD_STALE_AFTER_MS: "360000",
        CUSTOMERS_TIMEOUT_MS: "1000",
        LOG_LEVEL: "info",
      });
    });
  });

  describe("prepaid plans and customer status", () => {
    const priced = { prices: { "gpt-4o-mini": { input: 0.15, output: 0.6 } } };

    it("defaults every plan to postpaid without an output cap, and accepts prepaid plans with prices and a cap", () => {
      expect(parse({}).plans.starter).to.deep.equal({ ...PLAN, billing: "postpaid" });
      const prepaid = parse(withPrices({ ...priced, billing: "prepaid", maxOutputTokens: 2048 })).plans.starter;
      expect(prepaid).to.include({ billing: "prepaid", maxOutputTokens: 2048, currency: "usd" });
      expect(parse(withPrices({ ...priced, billing: "prepaid" })).plans.starter.maxOutputTokens).to.equal(undefined);
      expect(parse(withPrices({ maxOutputTokens: 1_000_000 })).plans.starter.maxOutputTokens).to.equal(1_000_000);
    });

    it("refuses a prepaid plan without prices, an unknown billing mode and an output cap out of 1..1,000,000", () => {
      expect(refusal(withPrices({ billing: "prepaid" }))).to.match(/"metered-ai-api:plans\.starter\.billing": prepaid needs prices/);
      expect(refusal(withPrices({ ...priced, billing: "credits" }))).to.match(/"metered-ai-api:plans\.starter\.billing": must be "postpaid" or "prepaid" \(got "credits"\)/);
      for (const bad of [0, -1, 1_000_001, 1.5, "4096"]) {
        expect(refusal(withPrices({ ...priced, billing: "prepaid", maxOutputTokens: bad })), String(bad)).to.match(/"metered-ai-api:plans\.starter\.maxOutputTokens": must be an integer from 1 to 1000000/);
      }
    });

    it("gives the function billing always, and the cap and quota when the stack config sets them", () => {
      const config = parse({
        plans: {
          payg: { ...PLAN, ...priced, billing: "prepaid", quota: { limit: 100, period: "WEEK", offset: 2 } },
          capped: { ...PLAN, maxOutputTokens: 512 },
          free: PLAN,
        },
      });
      expect(functionPlans(config.plans)).to.deep.equal({
        payg: {
          models: ["gpt-4o-mini"],
          pricing: { currency: "usd", prices: { "gpt-4o-mini": { input: 150_000, output: 600_000 } } },
          billing: "prepaid",
          quota: { limit: 100, period: "WEEK", offset: 2 },
        },
        capped: { billing: "postpaid", maxOutputTokens: 512 },
        free: { billing: "postpaid" },
      });
    });

    it("keeps a customer's status only when set, and refuses one that is not active or suspended", () => {
      const customers = { a: { plan: "starter" }, b: { plan: "starter", status: "suspended" }, c: { plan: "starter", status: "active" } };
      expect(parse({ customers }).customers).to.deep.equal({ a: { plan: "starter" }, b: { plan: "starter", status: "suspended" }, c: { plan: "starter", status: "active" } });
      expect(refusal({ customers: { a: { plan: "starter", status: "blocked" } } })).to.match(/"metered-ai-api:customers\.a\.status": must be "active" or "suspended" \(got "blocked"\)/);
    });

    it("refuses a misspelt customer field instead of dropping it (a lost Stripe id would never be credited)", () => {
      expect(refusal({ customers: { a: { plan: "starter", stripeCustomerID: "cus_1" } } })).to.match(/"metered-ai-api:customers\.a\.stripeCustomerID": is not a customer field/);
    });

    it("with meters, needs Stripe customer ids and metered prices for postpaid priced plans only: prepaid usage is paid from credits", () => {
      const plans = { payg: { ...PLAN, ...priced, billing: "prepaid", currency: "eur" }, paid: { ...PLAN, ...priced } };
      const config = parse({ plans, customers: { a: { plan: "payg" }, b: { plan: "paid", stripeCustomerId: "cus_b" } }, stripeBilling: "meters" });
      expect(billingCurrencies(config.plans)).to.deep.equal(["usd"]);
      expect(refusal({ plans, customers: { b: { plan: "paid" } }, stripeBilling: "meters" })).to.match(/customers\.b\.stripeCustomerId.*is required with stripeBilling: meters/);
    });

    it("treats a hold as stale once the longest invocation plus a minute has passed", () => {
      expect(holdStaleAfterMs({ lambdaTimeoutSeconds: 300 })).to.equal(360_000);
      expect(holdStaleAfterMs({ lambdaTimeoutSeconds: 900 })).to.equal(960_000);
      expect(forwarderEnvironment(parse({ lambdaTimeoutSeconds: 120, upstreamTimeoutMs: 60_000 })).HOLD_STALE_AFTER_MS).to.equal("180000");
    });
  });

  describe("reserved names", () => {
    it("refuses a plan or customer named like an Object property instead of silently dropping it", () => {
      for (const name of ["__proto__", "constructor", "toString", "hasOwnProperty"]) {
        expect(refusal({ plans: JSON.parse(`{"${name}": {"rateLimit": 1, "burstLimit": 1}}`) }), name).to.match(new RegExp(`plans\\.${name}.*reserved`));
        expect(refusal({ customers: JSON.parse(`{"${name}": {"plan": "pro"}}`) }), name).to.match(new RegExp(`customers\\.${name}.*reserved`));
      }
    });
  });

  describe("names derived from the stack", () => {
    it("sanitises stack names for Lambda, IAM and SSM: my.stack → my-stack", () => {
      expect(sanitizeStackName("my.stack")).to.equal("my-stack");
      expect(sanitizeStackName("prod_eu-1")).to.equal("prod_eu-1");
    });
  });

  describe("operations settings", () => {
    it("defaults reserved concurrency to unreserved, the stage ceiling to 10000/5000 and manages the account role", () => {
      const config = parse({});
      expect(config).to.include({ reservedConcurrency: -1, stageThrottleRateLimit: 10_000, stageThrottleBurstLimit: 5_000, manageApiGatewayAccount: true });
    });
    it("refuses a reserved concurrency of 0 and a stage ceiling below a plan's limits", () => {
      expect(refusal({ reservedConcurrency: 0 })).to.match(/reservedConcurrency.*0 would stop every invocation/);
      expect(refusal({ stageThrottleRateLimit: 4 })).to.match(/stageThrottleRateLimit.*below plan "starter"'s rateLimit 5/);
      expect(refusal({ stageThrottleBurstLimit: 9 })).to.match(/stageThrottleBurstLimit.*below plan "starter"'s burstLimit 10/);
    });
    it("caps request bodies at 4 MiB, which base64 encoding still fits into Lambda's 6 MB event", () => {
      expect(parse({ maxRequestBytes: 4 * 1024 * 1024 }).maxRequestBytes).to.equal(4_194_304);
      expect(Math.ceil((4 * 1024 * 1024) / 3) * 4).to.be.lessThan(6 * 1024 * 1024 - 64 * 1024);
      expect(refusal({ maxRequestBytes: 4 * 1024 * 1024 + 1 })).to.match(/maxRequestBytes/);
    });
  });
});
