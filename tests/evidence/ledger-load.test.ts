import { expect } from "chai";
import { execFile } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import type { ReconcileReport } from "../../scripts/reconcile";
import { ledgerItems, useLocalStack, waitUntil } from "../helpers/local-project";

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, "../..");
const TS_NODE = [path.join(ROOT, "node_modules/ts-node/dist/bin.js"), "--transpile-only"];

const REQUESTS = 1000;
const CONCURRENCY = 50;
const PLAN_MODELS: Record<string, string[]> = { starter: ["gpt-4o-mini"], pro: ["gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo"], pro2: ["gpt-4o-mini", "gpt-3.5-turbo"] };

describe("usage ledger under load: 1,000 requests at concurrency 50 (evidence)", function () {
  this.timeout(300_000);
  const local = useLocalStack("ledger-load", { LOG_LEVEL: "warn", FORWARDER_INTERVAL_MS: "200" });

  it("records 1,000 ledger items, delivers 1,000 Moesif events, Stripe totals equal the ledger's cost per customer, and npm run reconcile exits 0", async () => {
    const { stack } = local;
    const customers = Object.keys(PLAN_MODELS);
    const statuses: number[] = [];
    let next = 0;
    const worker = async () => {
      while (next < REQUESTS) {
        const i = next++;
        const customer = customers[i % customers.length];
        const models = PLAN_MODELS[customer];
        const response = await fetch(`${stack.baseUrl}/v1/chat/completions`, {
          method: "POST",
          headers: { "content-type": "application/json", "x-api-key": stack.apiKeys[customer] },
          body: JSON.stringify({ model: models[i % models.length], messages: [{ role: "user", content: `load ${i} ${"word ".repeat(i % 7)}` }] }),
        });
        await response.arrayBuffer();
        statuses.push(response.status);
      }
    };
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    expect(statuses.filter((s) => s === 200)).to.have.length(REQUESTS);

    const items = await waitUntil("1,000 ledger items", async () => {
      const all = await ledgerItems(stack);
      return all.length >= REQUESTS ? all : undefined;
    }, 60_000);
    expect(items).to.have.length(REQUESTS);
    expect(new Set(items.map((i) => i.transaction_id)).size).to.equal(REQUESTS);
    // The forwarder's loop delivers the backlog on its own.
    await waitUntil("the backlog to empty", async () => ((await stack.ledger.store.backlog({ now: Date.now(), graceMs: 0, limit: 1 })).length === 0 ? true : undefined), 120_000);

    const events = stack.store!.acknowledged();
    expect(events).to.have.length(REQUESTS);
    expect(new Set(events.map((e) => e.transaction_id))).to.deep.equal(new Set(items.map((i) => i.transaction_id)));

    const ledgerCost: Record<string, number> = {};
    for (const item of items) {
      expect(item.billed && (item.cost_micros ?? 0) > 0, `item ${item.transaction_id} is billed with a cost`).to.equal(true);
      ledgerCost[item.stripe_customer_id!] = (ledgerCost[item.stripe_customer_id!] ?? 0) + item.cost_micros!;
    }
    expect(Object.keys(ledgerCost).sort()).to.deep.equal(["cus_pro", "cus_pro2", "cus_starter"]);
    expect(stack.stripe!.totals()).to.deep.equal(ledgerCost);
    expect(stack.stripe!.events()).to.have.length(REQUESTS);

    // The script, as a user runs it, against the running stack's data dir.
    const { stdout } = await run(process.execPath, [...TS_NODE, path.join(ROOT, "scripts/reconcile.ts"), "--json", "--data-dir", local.dataDir], { cwd: ROOT, env: { ...process.env, MOESIF_APPLICATION_ID: "", STRIPE_API_BASE: "" } });
    const report = JSON.parse(stdout) as ReconcileReport;
    expect(report.differences).to.deep.equal([]);
    expect(report.ok).to.equal(true);
    expect(report.ledger.items).to.equal(REQUESTS);
    expect(report.moesif.compared && report.stripe.compared).to.equal(true);
    const stripeRows = Object.fromEntries(report.stripe.rows.map((r) => [r.customer, [r.ledger, r.sink]]));
    expect(stripeRows).to.deep.equal(Object.fromEntries(Object.entries(ledgerCost).map(([c, v]) => [c, [v, v]])));
    expect(report.moesif.rows.filter((r) => r.meter === "requests").reduce((n, r) => n + r.sink, 0)).to.equal(REQUESTS);
  });
});
