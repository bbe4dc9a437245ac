import { expect } from "chai";
import { execFile } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import type { CustomerAccount } from "../../functions/shared/customer-port";
import type { LedgerItem } from "../../functions/shared/ledger-schema";
import { createLedgerDocumentClient } from "../../functions/shared/ledger-store";
import { buildSummary, DEFAULT_LIMITS, type DashboardSource, type DashboardSummary, type SummaryInput } from "../../scripts/local/dashboard/data";
import { createDashboardHandler, startDashboardServer, type DashboardServer } from "../../scripts/local/dashboard/server";
import { ledgerEnv } from "../../scripts/local/ledger-db";
import { ledgerUsage, usageReport, type UsageReportRow } from "../../scripts/usage";
import { ledgerItems, useLocalStack, waitUntil } from "../helpers/local-project";
import { recordForScan } from "../helpers/secret-scan";

const exec = promisify(execFile);
const ROOT = path.resolve(__dirname, "../..");
const TS_NODE = [path.join(ROOT, "node_modules/ts-node/dist/bin.js"), "--transpile-only"];
const CLEAN_ENV = { MOESIF_APPLICATION_ID: "", STRIPE_API_BASE: "", STRIPE_API_KEY: "", AWS_ENDPOINT_URL_DYNAMODB: "", AWS_ENDPOINT_URL: "", LOCAL_DATA_DIR: "" };

const HOUR = 3_600_000;
const NOW = Date.UTC(2026, 10, 28, 10, 30);

/** A ledger item with the fields the dashboard reads; the rest as a real item has them. */
function ledgerItem(id: string, fields: Partial<LedgerItem>): LedgerItem {
  const created = fields.created_at ?? NOW;
  return {
    transaction_id: id,
    created_at: created,
    request_id: `req-${id}`,
    method: "POST",
    route: "/v1/chat/completions",
    status: 200,
    started_at: created - 120,
    finished_at: created - 20,
    prompt_tokens: 0,
    completion_tokens: 0,
    cached_tokens: 0,
    reasoning_tokens: 0,
    usage_estimated: false,
    billed: true,
    streamed: false,
    client_disconnected: false,
    moesif_event: JSON.stringify({ request: { body: { messages: [{ role: "user", content: "a prompt that must never show" }] } } }),
    moesif_state: "delivered",
    ...fields,
    total_tokens: (fields.prompt_tokens ?? 0) + (fields.completion_tokens ?? 0),
  };
}

function account(customerId: string, plan: string, balanceMicros: number, currency?: string): CustomerAccount {
  return {
    customer: { apiKeyId: `key-${customerId}`, customerId, plan, status: "active" },
    balance: { customerId, currency, balanceMicros, reservedMicros: 0, holds: {} },
  };
}

describe("usage dashboard summary (GET /_dashboard/api/summary)", function () {
  describe("from a known set of ledger items", () => {
    const items = [
      ledgerItem("a1", { customer_id: "alice", plan: "metered", model: "gpt-4o-mini", created_at: NOW - 80 * 60_000, prompt_tokens: 10, completion_tokens: 20, cost_micros: 100, currency: "usd" }),
      ledgerItem("a2", { customer_id: "alice", plan: "metered", model: "gpt-4o-mini", created_at: NOW - 40 * 60_000, prompt_tokens: 1, completion_tokens: 2, cost_micros: 5, currency: "usd", usage_estimated: true }),
      ledgerItem("a3", { customer_id: "alice", plan: "metered", model: "gpt-4o", created_at: NOW - 25 * 60_000, prompt_tokens: 3, completion_tokens: 4, cost_micros: 7, currency: "usd" }),
      ledgerItem("a4", { customer_id: "alice", plan: "metered", model: "gpt-4o", created_at: NOW - 20 * 60_000, status: 400, billed: false }),
      ledgerItem("b1", { customer_id: "bob", plan: "credits", model: "gpt-4o-mini", created_at: NOW - 11 * HOUR, prompt_tokens: 100, completion_tokens: 200, cost_micros: 1000, currency: "usd", moesif_state: "pending", stripe_state: undefined }),
      ledgerItem("b2", { customer_id: "bob", plan: "credits", model: "gpt-4o-mini", created_at: NOW - 3 * 24 * HOUR, prompt_tokens: 7, completion_tokens: 8, cost_micros: 9, currency: "usd", moesif_state: "failed", moesif_error: "HTTP 400" }),
    ];
    const input = (bucket: "hour" | "day"): SummaryInput => ({
      bucket,
      now: NOW,
      limits: DEFAULT_LIMITS,
      source: "test",
      items,
      backlog: items.filter((i) => i.moesif_state !== "delivered"),
      scanned: items.length,
      truncated: false,
      backlogTruncated: false,
      accounts: [account("alice", "metered", 0), account("bob", "credits", 4_000_000, "usd"), account("carol", "metered", 0)],
      counters: new Map([
        ["alice", 4],
        ["bob", 9],
      ]),
      plans: {
        metered: { billing: "postpaid", currency: "usd", quota: { limit: 50, period: "DAY", offset: 0 } },
        credits: { billing: "prepaid", currency: "usd" },
      },
    });

    it("gives per-customer totals that are the sums of npm run usage's rows for the same items", () => {
      const summary = buildSummary(input("hour"));
      expect(summary.usage).to.deep.equal(usageReport(ledgerUsage(items)));
      const alice = summary.customers.find((c) => c.customer === "alice")!;
      expect(alice).to.deep.include({ plan: "metered", billing: "postpaid", requests: 4, billed_requests: 3, prompt_tokens: 14, completion_tokens: 26, estimated_requests: 1, cost_micros: { usd: 112 }, cost: { usd: "0.000112" } });
      const bob = summary.customers.find((c) => c.customer === "bob")!;
      expect(bob).to.deep.include({ plan: "credits", billing: "prepaid", requests: 2, prompt_tokens: 107, completion_tokens: 208, cost_micros: { usd: 1009 } });
    });

    it("lists every customer of the customers table, with quota use against the plan's quota and a balance only when prepaid", () => {
      const { customers } = buildSummary(input("hour"));
      expect(customers.map((c) => c.customer)).to.deep.equal(["alice", "bob", "carol"]);
      expect(customers[0].quota).to.deep.equal({ limit: 50, period: "DAY", period_start: "2026-11-28", used: 4 });
      expect(customers[0]).to.include({ balance_micros: null, balance: null });
      expect(customers[1].quota).to.deep.equal({ limit: null, period: "MONTH", period_start: "2026-11-01", used: 9 });
      expect(customers[1]).to.include({ balance_micros: 4_000_000, balance: "4.000000", currency: "usd" });
      expect(customers[2]).to.deep.include({ requests: 0, cost_micros: {}, quota: { limit: 50, period: "DAY", period_start: "2026-11-28", used: null } });
    });

    it("puts input and output tokens and cost into UTC hour buckets, and into day buckets when asked", () => {
      const hourly = buildSummary(input("hour"));
      // The last 48 hours: from the hour holding 10:30 two days ago to the current one.
      expect(hourly.series.buckets).to.have.length(48 + 1);
      expect(hourly.series.buckets[0]).to.equal("2026-11-26T10:00:00.000Z");
      expect(hourly.series.buckets.at(-1)).to.equal("2026-11-28T10:00:00.000Z");
      const alice = hourly.series.customers.find((s) => s.customer === "alice")!;
      const at = (iso: string) => hourly.series.buckets.indexOf(iso);
      // 09:10 and 09:50 share the 09:00 bucket; 10:05 (billed) and 10:10 (refused: no tokens) the 10:00 one.
      expect(alice.prompt_tokens[at("2026-11-28T09:00:00.000Z")]).to.equal(11);
      expect(alice.completion_tokens[at("2026-11-28T09:00:00.000Z")]).to.equal(22);
      expect(alice.prompt_tokens[at("2026-11-28T10:00:00.000Z")]).to.equal(3);
      expect(alice.completion_tokens[at("2026-11-28T10:00:00.000Z")]).to.equal(4);
      expect(alice.cost_micros.usd[at("2026-11-28T10:00:00.000Z")]).to.equal(7);
      expect(alice.requests[at("2026-11-28T10:00:00.000Z")]).to.equal(2);
      expect(alice.requests.reduce((a, b) => a + b)).to.equal(4);

      const daily = buildSummary(input("day"));
      expect(daily.series.buckets).to.deep.equal(["2026-11-21", "2026-11-22", "2026-11-23", "2026-11-24", "2026-11-25", "2026-11-26", "2026-11-27", "2026-11-28"].map((d) => `${d}T00:00:00.000Z`));
      const bob = daily.series.customers.find((s) => s.customer === "bob")!;
      // 3 days ago, and 23:30 yesterday (11 hours before 10:30).
      expect(bob.prompt_tokens).to.deep.equal([0, 0, 0, 0, 7, 0, 100, 0]);
      expect(bob.completion_tokens).to.deep.equal([0, 0, 0, 0, 8, 0, 200, 0]);
      expect(daily.series.customers.find((s) => s.customer === "alice")!.prompt_tokens.at(-1)).to.equal(14);
    });

    it("lists the latest requests newest first, with latency and the estimated flag, and no body", () => {
      const { latest } = buildSummary(input("hour"));
      expect(latest.map((r) => r.status)).to.deep.equal([400, 200, 200, 200, 200, 200]);
      expect(latest[2]).to.deep.equal({
        time: new Date(NOW - 40 * 60_000).toISOString(),
        customer: "alice",
        method: "POST",
        route: "/v1/chat/completions",
        model: "gpt-4o-mini",
        status: 200,
        prompt_tokens: 1,
        completion_tokens: 2,
        latency_ms: 100,
        estimated: true,
        streamed: false,
        billed: true,
        cost_micros: 5,
        currency: "usd",
      });
      expect(JSON.stringify(buildSummary(input("hour")))).not.to.include("a prompt that must never show");
    });

    it("reports delivery health per sink as npm run reconcile computes it", () => {
      const { delivery } = buildSummary(input("hour"));
      expect(delivery.moesif).to.deep.include({ delivered: 4, pending: 1, failed: 1, backlog_truncated: false });
      expect(delivery.moesif.oldest_undelivered).to.deep.equal({ transaction_id: "b2", created_at: new Date(NOW - 3 * 24 * HOUR).toISOString(), state: "failed", error: "HTTP 400" });
      expect(delivery.stripe).to.deep.include({ delivered: 0, pending: 0, failed: 0, not_owed: 6 });
    });

    it("says when a refresh was cut short", () => {
      expect(buildSummary({ ...input("hour"), truncated: true }).window).to.include({ truncated: true, max_items: 10_000 });
      expect(buildSummary({ ...input("hour"), truncated: true }).window.note).to.match(/^Partial/);
    });
  });

  describe("from requests through the local stack", function () {
    this.timeout(120_000);
    const MARKER = "dashboard-marker-7f3a: a prompt the page must never show";
    const YAML = `
config:
  metered-ai-api:stageName: beta
  metered-ai-api:logBodies: true
  metered-ai-api:plans:
    metered:
      rateLimit: 1000
      burstLimit: 1000
      quota: { limit: 50, period: DAY }
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
        gpt-4o: { input: 2.5, output: 10 }
    credits:
      rateLimit: 1000
      burstLimit: 1000
      billing: prepaid
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
  metered-ai-api:customers:
    acme: { plan: metered, stripeCustomerId: cus_acme }
    initech: { plan: credits, stripeCustomerId: cus_initech }
    idle: { plan: metered }
`;
    const local = useLocalStack("dashboard-data", {}, YAML);
    const answered: Record<string, { requests: number; prompt: number; completion: number }> = {};
    const sent: Record<string, number> = {};
    let server: DashboardServer;
    let source: DashboardSource;
    let summary: DashboardSummary;
    let summaryText: string;
    let items: LedgerItem[];

    async function chat(customer: string, model: string, text: string): Promise<number> {
      const response = await fetch(`${local.stack.baseUrl}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${local.stack.apiKeys[customer]}` },
        body: JSON.stringify({ model, messages: [{ role: "user", content: text }] }),
      });
      const body = (await response.json()) as { usage?: { prompt_tokens: number; completion_tokens: number } };
      sent[customer] = (sent[customer] ?? 0) + 1;
      if (response.status === 200) {
        const into = (answered[customer] ??= { requests: 0, prompt: 0, completion: 0 });
        into.requests += 1;
        into.prompt += body.usage!.prompt_tokens;
        into.completion += body.usage!.completion_tokens;
      }
      return response.status;
    }

    before(async () => {
      await local.stack.customers.store.credit({ customerId: "initech", currency: "usd", creditId: "test:dashboard", micros: 2_000_000, source: "cli", now: Date.now() });
      const requests: Array<[string, string, string]> = [
        ["acme", "gpt-4o-mini", `${MARKER} one`],
        ["acme", "gpt-4o", `${MARKER} two two`],
        ["acme", "gpt-4o", "three three three"],
        ["initech", "gpt-4o-mini", `${MARKER} four`],
        ["initech", "gpt-4o-mini", "five five five five five"],
      ];
      for (const [customer, model, text] of requests) expect(await chat(customer, model, text)).to.equal(200);
      // A refused request (a model the prepaid plan does not price: 404): a ledger item without tokens or cost.
      expect(await chat("initech", "gpt-4o", "six")).to.equal(404);
      await waitUntil("every ledger item", async () => ((await ledgerItems(local.stack)).length === requests.length + 1 ? true : undefined));
      await local.stack.drain();
      items = await ledgerItems(local.stack);

      const doc = createLedgerDocumentClient(ledgerEnv(local.stack.ledger.endpoint));
      source = { ledger: { doc, table: local.stack.ledger.table }, customers: local.stack.customers.store, plans: local.stack.config.plans, description: "local test stack" };
      server = await startDashboardServer(createDashboardHandler(source, { minRefreshMs: 0 }));
      const response = await fetch(`${server.url}api/summary?bucket=hour`);
      expect(response.status).to.equal(200);
      summaryText = await response.text();
      summary = JSON.parse(summaryText) as DashboardSummary;
    });

    after(async () => {
      if (summaryText) recordForScan("dashboard summary", [summaryText]);
      await server?.stop();
      source?.ledger.doc.destroy();
    });

    it("sums each customer's requests and tokens to what the API answered", () => {
      const byCustomer = Object.fromEntries(summary.customers.filter((c) => c.billed_requests > 0).map((c) => [c.customer, { requests: c.billed_requests, prompt: c.prompt_tokens, completion: c.completion_tokens }]));
      expect(byCustomer).to.deep.equal(answered);
      expect(summary.customers.find((c) => c.customer === "initech")).to.include({ requests: 3, billed_requests: 2 });
      const acmeCost = items.filter((i) => i.customer_id === "acme").reduce((n, i) => n + (i.cost_micros ?? 0), 0);
      expect(acmeCost).to.be.greaterThan(0);
      expect(summary.customers.find((c) => c.customer === "acme")!.cost_micros).to.deep.equal({ usd: acmeCost });
    });

    it("has usage rows equal to npm run usage -- --json on the same ledger", async () => {
      const { stdout } = await exec(process.execPath, [...TS_NODE, path.join(ROOT, "scripts/usage.ts"), "--json", "--data-dir", local.dataDir], { cwd: ROOT, env: { ...process.env, ...CLEAN_ENV } });
      const cli = JSON.parse(stdout) as UsageReportRow[];
      expect(cli.length).to.be.greaterThan(0);
      expect(summary.usage).to.deep.equal(cli);
      expect(summary.window).to.include({ items: items.length, truncated: false });
    });

    it("shows quota used from the period's request counter, and the prepaid balance after the charges", () => {
      const acme = summary.customers.find((c) => c.customer === "acme")!;
      expect(acme.quota).to.deep.include({ limit: 50, period: "DAY", period_start: new Date().toISOString().slice(0, 10), used: sent.acme });
      expect(acme.balance_micros).to.equal(null);
      const initech = summary.customers.find((c) => c.customer === "initech")!;
      const charged = items.filter((i) => i.customer_id === "initech").reduce((n, i) => n + (i.charged_micros ?? 0), 0);
      expect(charged).to.be.greaterThan(0);
      expect(initech).to.include({ billing: "prepaid", balance_micros: 2_000_000 - charged, currency: "usd" });
      expect(summary.customers.find((c) => c.customer === "idle")).to.deep.include({ requests: 0, plan: "metered" });
    });

    it("lists the latest requests and, once the forwarder drained, every item delivered to both sinks", () => {
      expect(summary.latest).to.have.length(items.length);
      expect(summary.latest.map((r) => r.time)).to.deep.equal([...summary.latest.map((r) => r.time)].sort().reverse());
      expect(summary.latest.filter((r) => r.status === 404)).to.have.length(1);
      expect(summary.delivery.moesif).to.deep.include({ delivered: items.length, pending: 0, failed: 0 });
      expect(summary.delivery.moesif.oldest_undelivered).to.equal(undefined);
      // Stripe meters bill postpaid usage only: acme's three billed requests; prepaid and the refused request owe it nothing.
      expect(summary.delivery.stripe).to.deep.include({ delivered: 3, pending: 0, failed: 0, not_owed: items.length - 3 });
    });

    it("never carries an API key, a secret or prompt text, though the ledger holds the prompt (logBodies)", () => {
      expect(items.some((i) => i.moesif_event.includes("dashboard-marker-7f3a"))).to.equal(true);
      expect(summaryText).not.to.include("dashboard-marker-7f3a");
      expect(summaryText).not.to.include("moesif_event");
      for (const key of Object.values(local.stack.apiKeys)) expect(summaryText).not.to.include(key);
      expect(summaryText).not.to.include(local.stack.stripeWebhook.secret);
    });

    it("counts a request made after a refresh in the next one", async () => {
      expect(await chat("acme", "gpt-4o-mini", "seven")).to.equal(200);
      await waitUntil("the new ledger item", async () => ((await ledgerItems(local.stack)).length === items.length + 1 ? true : undefined));
      const next = (await (await fetch(`${server.url}api/summary?bucket=day`)).json()) as DashboardSummary;
      expect(next.bucket).to.equal("day");
      expect(next.customers.find((c) => c.customer === "acme")!.billed_requests).to.equal(answered.acme.requests);
      expect(next.series.customers.find((s) => s.customer === "acme")!.requests.at(-1)).to.equal(sent.acme);
    });

    it("answers errors in the API's shape: an unknown bucket, a non-loopback Host, a write", async () => {
      const bad = await fetch(`${server.url}api/summary?bucket=week`);
      expect(bad.status).to.equal(400);
      expect(await bad.json()).to.deep.equal({ error: { message: "bucket must be one of hour, day", type: "invalid_request_error", param: null, code: "invalid_bucket" } });
      const rebinding = await new Promise<number>((resolve, reject) => {
        const req = require("node:http").request(`${server.url}api/summary`, { headers: { host: "evil.example:8788" } }, (res: import("node:http").IncomingMessage) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        });
        req.on("error", reject);
        req.end();
      });
      expect(rebinding).to.equal(403);
      expect((await fetch(`${server.url}api/summary`, { method: "POST" })).status).to.equal(405);
    });

    it("serves the page and Chart.js from this origin only, under a Content-Security-Policy of 'self'", async () => {
      const page = await fetch(server.url);
      expect(page.status).to.equal(200);
      expect(page.headers.get("content-security-policy")).to.match(/^default-src 'self'/);
      const html = await page.text();
      expect(html).not.to.match(/https?:\/\//);
      const chart = await fetch(`${server.url}vendor/chart.umd.min.js`);
      expect(chart.status).to.equal(200);
      expect(await chart.text()).to.include("Chart.js v4");
      recordForScan("dashboard page", [html]);
    });
  });
});
