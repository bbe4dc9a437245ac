import { expect } from "chai";
import fs from "node:fs";
import path from "node:path";
import { PutCommand } from "@aws-sdk/lib-dynamodb";
import puppeteer, { type Browser, type HTTPRequest, type Page } from "puppeteer-core";
import type { LedgerItem } from "../../functions/shared/ledger-schema";
import { createLedgerDocumentClient } from "../../functions/shared/ledger-store";
import type { DashboardSummary } from "../../scripts/local/dashboard/data";
import { createDashboardHandler, startDashboardServer, type DashboardServer } from "../../scripts/local/dashboard/server";
import { ledgerEnv } from "../../scripts/local/ledger-db";
import { ledgerItems, useLocalStack, waitUntil } from "../helpers/local-project";
import { recordForScan } from "../helpers/secret-scan";

const ROOT = path.resolve(__dirname, "../..");
/** Debian's package (`apt-get install chromium`) installs /usr/bin/chromium; CHROMIUM_PATH names another (and only it). */
const CHROMIUM_CANDIDATES = process.env.CHROMIUM_PATH ? [process.env.CHROMIUM_PATH] : ["/usr/bin/chromium", "/usr/bin/chromium-browser"];

/** What the page's script sees, typed here without the DOM library (tsconfig has none): Chart.js and the canvas. */
interface ChartLike {
  data: { labels: string[]; datasets: Array<{ label: string; data: number[] }> };
}
interface PageGlobals {
  Chart: { getChart(canvas: unknown): ChartLike };
  document: { body: { getAttribute(name: string): string | null } };
}
interface CanvasLike {
  width: number;
  height: number;
  getContext(kind: "2d"): { getImageData(x: number, y: number, w: number, h: number): { data: ArrayLike<number> } };
}

/** Three customers: a postpaid plan with a quota, a bigger one, and a prepaid plan (a balance to show). */
const YAML = `
config:
  metered-ai-api:stageName: beta
  metered-ai-api:plans:
    starter:
      rateLimit: 1000
      burstLimit: 1000
      quota: { limit: 1000, period: MONTH }
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
    pro:
      rateLimit: 1000
      burstLimit: 1000
      quota: { limit: 100000, period: MONTH }
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
    acme: { plan: pro, stripeCustomerId: cus_acme }
    globex: { plan: starter, stripeCustomerId: cus_globex }
    initech: { plan: credits, stripeCustomerId: cus_initech }
`;

/**
 * Earlier traffic, written straight to the ledger as the request path writes items (delivered to both sinks), so the
 * hourly chart has a history to draw: deterministic token counts, one item per customer every few hours.
 */
function history(now: number): LedgerItem[] {
  const items: LedgerItem[] = [];
  const customers = [
    { id: "acme", plan: "pro", model: "gpt-4o", input: 2.5, output: 10, every: 3, stripe: "cus_acme" },
    { id: "globex", plan: "starter", model: "gpt-4o-mini", input: 0.15, output: 0.6, every: 2, stripe: "cus_globex" },
    { id: "initech", plan: "credits", model: "gpt-4o-mini", input: 0.15, output: 0.6, every: 5, stripe: "cus_initech" },
  ];
  for (let hour = 40; hour >= 1; hour -= 1) {
    customers.forEach((c, n) => {
      if (hour % c.every !== 0) return;
      const created = now - hour * 3_600_000 + n * 60_000;
      const prompt = 400 + ((hour * 37 + n * 101) % 900);
      const completion = 150 + ((hour * 53 + n * 71) % 700);
      const cost = Math.round(prompt * c.input + completion * c.output);
      items.push({
        transaction_id: `history-${c.id}-${hour}`,
        created_at: created,
        request_id: `history-${c.id}-${hour}`,
        method: "POST",
        route: "/v1/chat/completions",
        status: 200,
        started_at: created - 900,
        finished_at: created,
        customer_id: c.id,
        stripe_customer_id: c.stripe,
        plan: c.plan,
        model: c.model,
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        cached_tokens: 0,
        reasoning_tokens: 0,
        usage_estimated: false,
        billed: true,
        cost_micros: cost,
        currency: "usd",
        billing_mode: c.plan === "credits" ? "prepaid" : "postpaid",
        streamed: hour % 2 === 0,
        client_disconnected: false,
        moesif_event: "{}",
        moesif_state: "delivered",
        ...(c.plan === "credits" ? {} : { stripe_state: "delivered" as const }),
      });
    });
  }
  return items;
}

/** The text a table cell shows for an integer (the page groups digits: 12,345). */
const int = (n: number) => n.toLocaleString("en-US");

describe("usage dashboard in a headless Chromium", function () {
  this.timeout(120_000);
  const local = useLocalStack("dashboard-browser", {}, YAML);
  const executablePath = CHROMIUM_CANDIDATES.find((p) => fs.existsSync(p));
  let browser: Browser | undefined;
  let page: Page;
  let server: DashboardServer;
  let doc: ReturnType<typeof createLedgerDocumentClient> | undefined;
  const consoleErrors: string[] = [];
  const refused: string[] = [];
  const failed: string[] = [];
  const summaries: string[] = [];

  before(async function () {
    if (!executablePath) {
      console.log(`      skipped: no Chromium at ${CHROMIUM_CANDIDATES.join(" or ")} (install Debian's package: apt-get install chromium; or set CHROMIUM_PATH)`);
      this.skip();
    }
    await local.stack.customers.store.credit({ customerId: "initech", currency: "usd", creditId: "test:browser", micros: 5_000_000, source: "cli", now: Date.now() });
    const requests: Array<[string, string, string]> = [
      ["acme", "gpt-4o", "one"],
      ["acme", "gpt-4o-mini", "two two"],
      ["globex", "gpt-4o-mini", "three three three"],
      ["initech", "gpt-4o-mini", "four four four four"],
      ["initech", "gpt-4o-mini", "five"],
    ];
    for (const [customer, model, text] of requests) {
      const response = await fetch(`${local.stack.baseUrl}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", "x-api-key": local.stack.apiKeys[customer] },
        body: JSON.stringify({ model, messages: [{ role: "user", content: text }] }),
      });
      expect(response.status).to.equal(200);
    }
    await waitUntil("every ledger item", async () => ((await ledgerItems(local.stack)).length === requests.length ? true : undefined));
    await local.stack.drain();

    doc = createLedgerDocumentClient(ledgerEnv(local.stack.ledger.endpoint));
    for (const item of history(Date.now())) await doc.send(new PutCommand({ TableName: local.stack.ledger.table, Item: item }));
    const source = { ledger: { doc, table: local.stack.ledger.table }, customers: local.stack.customers.store, plans: local.stack.config.plans, description: "local test stack" };
    server = await startDashboardServer(createDashboardHandler(source, { minRefreshMs: 0, pageRefreshMs: 1000 }));

    browser = await puppeteer.launch({
      executablePath,
      headless: true,
      // Root in a container: Chromium's sandbox needs user namespaces it does not get here.
      args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run", "--no-default-browser-check"],
    });
    page = await browser.newPage();
    await page.setViewport({ width: 1280, height: 1100 });
    page.on("console", (message) => {
      if (message.type() === "error") consoleErrors.push(message.text());
    });
    page.on("pageerror", (err) => consoleErrors.push(String(err)));
    page.on("requestfailed", (request) => failed.push(`${request.url()}: ${request.failure()?.errorText ?? "failed"}`));
    page.on("response", (response) => {
      if (response.status() >= 400) failed.push(`${response.url()}: HTTP ${response.status()}`);
      if (response.url().includes("/api/summary")) void response.text().then((t) => summaries.push(t), () => undefined);
    });
    await page.setRequestInterception(true);
    page.on("request", (request: HTTPRequest) => {
      // Nothing but the dashboard's own loopback origin (data: URLs never reach the network).
      const url = new URL(request.url());
      if (url.protocol === "data:" || url.origin === new URL(server.url).origin) return void request.continue();
      refused.push(request.url());
      return void request.abort("blockedbyclient");
    });
    await page.goto(server.url, { waitUntil: "networkidle0" });
    await page.waitForSelector("#customers tbody tr[data-customer]");
  });

  after(async () => {
    recordForScan("dashboard browser summaries", summaries);
    await browser?.close();
    await server?.stop();
    doc?.destroy();
  });

  async function summary(bucket: "hour" | "day"): Promise<DashboardSummary> {
    return (await (await fetch(`${server.url}api/summary?bucket=${bucket}`)).json()) as DashboardSummary;
  }

  it("loads with no console error, no failed request and no request leaving 127.0.0.1", () => {
    expect(consoleErrors).to.deep.equal([]);
    expect(failed).to.deep.equal([]);
    expect(refused).to.deep.equal([]);
  });

  it("shows the same numbers in the customers table as the JSON endpoint", async () => {
    const json = await summary("hour");
    const rows = await page.$$eval("#customers tbody tr[data-customer]", (trs) =>
      trs.map((tr) => Object.fromEntries([...tr.querySelectorAll("td[data-field]")].map((td) => [td.getAttribute("data-field"), td.textContent]))),
    );
    expect(rows.map((r) => r.customer)).to.deep.equal(json.customers.map((c) => c.customer));
    expect(json.customers.map((c) => c.customer)).to.deep.equal(["acme", "globex", "initech"]);
    for (const c of json.customers) {
      const row = rows.find((r) => r.customer === c.customer)!;
      expect(row).to.deep.include({ plan: c.plan, billing: c.billing, requests: int(c.requests), prompt_tokens: int(c.prompt_tokens), completion_tokens: int(c.completion_tokens), cost: `${c.cost.usd} usd` });
      expect(c.prompt_tokens).to.be.greaterThan(1000);
    }
    const [acme, globex, initech] = json.customers;
    expect(rows[0].quota).to.equal(`${int(acme.quota.used!)} / 100,000 per month`);
    expect(rows[1].quota).to.equal(`${int(globex.quota.used!)} / 1,000 per month`);
    expect(rows[0].balance).to.equal("-");
    expect(initech.balance_micros).to.be.within(1, 5_000_000 - 1);
    expect(rows[2].balance).to.equal(`${initech.balance} usd`);
    const latestRows = await page.$$eval("#latest tbody tr", (trs) => trs.length);
    expect(latestRows).to.equal(json.latest.length);
    const moesif = await page.$eval('[data-sink="moesif"] [data-field="delivered"]', (dd) => dd.textContent);
    expect(moesif).to.equal(`${json.delivery.moesif.delivered} (window)`);
  });

  it("draws the token chart with the endpoint's series, input and output apart", async () => {
    const json = await summary("hour");
    const drawn = await page.$eval("#tokens-chart", (canvas) => {
      const c = canvas as unknown as CanvasLike;
      const pixels = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let painted = 0;
      for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted += 1;
      const chart = (globalThis as unknown as PageGlobals).Chart.getChart(c);
      return { painted, labels: chart.data.labels.length, datasets: chart.data.datasets.map((d) => ({ label: d.label, sum: d.data.reduce((a, b) => a + b, 0) })) };
    });
    expect(drawn.painted).to.be.greaterThan(1000);
    expect(drawn.labels).to.equal(json.series.buckets.length);
    // Every item is within the hourly chart's 48 hours, so each customer's bars add up to its table row.
    for (const c of json.customers) {
      expect(drawn.datasets).to.deep.include({ label: `${c.customer} input`, sum: c.prompt_tokens });
      expect(drawn.datasets).to.deep.include({ label: `${c.customer} output`, sum: c.completion_tokens });
    }
  });

  it("switches the chart to daily buckets and back", async () => {
    const daily = await summary("day");
    await page.click("#bucket-day");
    await page.waitForSelector('body[data-bucket="day"]');
    const labels = await page.$eval("#tokens-chart", (canvas) => (globalThis as unknown as PageGlobals).Chart.getChart(canvas).data.labels);
    expect(labels).to.have.length(daily.series.buckets.length);
    expect(labels.at(-1)).to.equal(daily.series.buckets.at(-1)!.slice(0, 10));
    expect(await page.$eval("#bucket-day", (b) => b.getAttribute("aria-pressed"))).to.equal("true");
    await page.click("#bucket-hour");
    await page.waitForSelector('body[data-bucket="hour"]');
    expect(consoleErrors).to.deep.equal([]);
  });

  it("refreshes by itself and says when", async () => {
    const first = await page.$eval("body", (b) => b.getAttribute("data-generated-at"));
    await page.waitForFunction((before) => (globalThis as unknown as PageGlobals).document.body.getAttribute("data-generated-at") !== before, { timeout: 10_000 }, first);
    expect(await page.$eval("#refreshed", (p) => p.textContent)).to.match(/^refreshed .* every 1 s$/);
  });

  it("writes a screenshot for the README (.local/dashboard.png; docs/dashboard.png with UPDATE_SCREENSHOT=1)", async () => {
    await page.waitForSelector('body[data-bucket="hour"]');
    const targets = [path.join(ROOT, ".local", "dashboard.png"), path.join(ROOT, "docs", "dashboard.png")];
    for (const file of targets) fs.mkdirSync(path.dirname(file), { recursive: true });
    await page.screenshot({ path: targets[0] as `${string}.png`, fullPage: true });
    // docs/dashboard.png (the README's picture) is tracked: refreshed only on request, so `npm test` leaves the tree clean.
    if (process.env.UPDATE_SCREENSHOT === "1") fs.copyFileSync(targets[0], targets[1]);
    const png = fs.readFileSync(targets[0]);
    expect(png.subarray(1, 4).toString("latin1")).to.equal("PNG");
    expect(png.length).to.be.greaterThan(20_000);
    // The page as rendered must not show a key either.
    const text = await page.$eval("body", (b) => b.innerText);
    for (const key of Object.values(local.stack.apiKeys)) expect(text).not.to.include(key);
    recordForScan("dashboard page text", [text]);
  });
});
