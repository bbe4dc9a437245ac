import { expect } from "chai";
import { environmentBytes, forwarderEnvironment, functionEnvironment, functionPlans, plannedEnvironment, plannedLedgerTableName, sanitizeStackName } from "../../infra/function-env";
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
      expect(config.plans.free).to.deep.equal(PLAN);
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
        listed: { models: ["a"], pricing: { currency: "usd", prices: { a: { input: 1_000_000, output: 2_000_000 }, b: { input: 3_000_000, output: 4_000_000 } } } },
        priced: { models: ["a"], pricing: { currency: "usd", prices: { a: { input: 1_000_000, output: 2_000_000 } } } },
        open: {},
        limited: { models: ["x"] },
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
      expect(parse({ upstreamTimeoutMs: 296_000 }).upstreamTimeoutMs).to.equal(296_000);
      expect(refusal({ upstreamTimeoutMs: 296_001 })).to.match(/upstreamTimeoutMs.*300001 ms exceeds API Gateway's 5-minute idle timeout/);
      expect(refusal({ lambdaTimeoutSeconds: 20 })).to.match(/upstreamTimeoutMs.*exceeds lambdaTimeoutSeconds \(20000 ms\)/);
      expect(parse({ lambdaTimeoutSeconds: 29, upstreamTimeoutMs: 25_000, upstreamIdleTimeoutMs: 20_000 }).lambdaTimeoutSeconds).to.equal(29);
    });
    it("counts the ledger write and the direct Moesif send that stands in for it one after the other", () => {
      expect(parse({}).ledgerTimeoutMs).to.equal(1_000);
      expect(parse({ upstreamTimeoutMs: 290_000, ledgerTimeoutMs: 5_000, meteringTimeoutMs: 3_000 }).ledgerTimeoutMs).to.equal(5_000);
      expect(refusal({ upstreamTimeoutMs: 290_000, ledgerTimeoutMs: 5_001, meteringTimeoutMs: 3_000 })).to.match(/upstreamTimeoutMs.*ledgerTimeoutMs.*300001 ms exceeds/);
      expect(refusal({ lambdaTimeoutSeconds: 60, upstreamTimeoutMs: 30_000, upstreamIdleTimeoutMs: 50_000, ledgerTimeoutMs: 7_001 })).to.match(/upstreamIdleTimeoutMs.*ledgerTimeoutMs.*lambdaTimeoutSeconds/);
      expect(refusal({ ledgerTimeoutMs: 0 })).to.match(/ledgerTimeoutMs.*1 to 10000/);
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

    it("refuses customers whose escaped JSON overflows 4096 bytes even when the raw lengths would fit", () => {
      // Adding raw lengths (the old check: names + CUSTOMERS + PLANS, no quotes, no escapes) undercounts each
      // customer by the escapes of its 14 quotes. Find a customer count where the two disagree.
      const customers = (n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`c${String(i).padStart(3, "0")}`, { plan: "starter", stripeCustomerId: "cus_0123456789" }]));
      const rawSum = (vars: Record<string, string>) => Object.entries(vars).reduce((sum, [k, v]) => sum + k.length + v.length, 0);
      const planned = (n: number) => plannedEnvironment({ ...parse({}), customers: customers(n) }, "dev");
      const n = Array.from({ length: 200 }, (_, i) => i + 1).find((count) => environmentBytes(planned(count)) > 4096)!;
      const vars = planned(n);
      expect(environmentBytes(vars)).to.be.greaterThan(4096);
      expect(rawSum(vars), "the raw sum would have let it through").to.be.at.most(4096);
      expect(refusal({ customers: customers(n) })).to.match(new RegExp(`"metered-ai-api:customers": ${n} customers make the function's environment ${environmentBytes(vars)} bytes`));
      expect(parse({ customers: customers(n - 1) }).customers).to.have.property("c000");
    });

    it("holds no secret: the upstream key and the Moesif application id are parameter names, sized for at preview", () => {
      const vars = functionEnvironment(parse({}), "prod");
      expect(vars).to.include({ PLANS_FILE: "plans.json" });
      for (const name of ["UPSTREAM_API_KEY", "MOESIF_APPLICATION_ID", "PLANS"]) expect(vars).to.not.have.property(name);
      const planned = plannedEnvironment(parse({}), "prod");
      expect(planned.UPSTREAM_API_KEY_PARAMETER).to.equal("metered-ai-api-param-upstream-api-key-xxxxxxx");
      expect(planned.MOESIF_APPLICATION_ID_PARAMETER).to.equal("metered-ai-api-param-moesif-application-id-xxxxxxx");
    });
  });

  describe("the usage ledger and Stripe billing", () => {
    const billing = { plans: { paid: { ...PLAN, prices: { m: { input: 1, output: 2 } } }, euro: { ...PLAN, currency: "eur", prices: { m: { input: 1, output: 2 } } }, free: PLAN } };

    it("defaults to Moesif reporting to Stripe, a deletion-protected ledger and an unreserved forwarder", () => {
      expect(parse({})).to.include({ stripeBilling: "moesif", ledgerDeletionProtection: true, ledgerTimeoutMs: 1_000, forwarderReservedConcurrency: -1 });
      expect(parse({ ledgerDeletionProtection: "false", forwarderReservedConcurrency: "5" })).to.include({ ledgerDeletionProtection: false, forwarderReservedConcurrency: 5 });
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
      expect(forwarderEnvironment(config)).to.deep.equal({ MOESIF_BASE_URI: "https://api.moesif.net", STRIPE_BILLING: "meters", FORWARDER_SWEEP_GRACE_MS: "60000", LOG_LEVEL: "info" });
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
