import { expect } from "chai";
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { STRIPE_METER_EVENT_NAME, type LedgerItem } from "../../functions/shared/ledger-schema";
import { LedgerDb } from "../../scripts/local/ledger-db";
import { startLocalStack, type LocalStack } from "../../scripts/local/stack";
import { SqliteStore } from "../../scripts/local/sqlite-store";
import { LOCAL_STRIPE_API_KEY, StripeServer } from "../../scripts/local/stripe-server";
import { StripeStore } from "../../scripts/local/stripe-store";
import { reconcileAws, STRIPE_SETTLE_MS, type ReconcileReport } from "../../scripts/reconcile";
import { ledgerUsage, usageReport, type UsageReportRow } from "../../scripts/usage";
import { ledgerItems, tempProject, waitUntil } from "../helpers/local-project";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const exec = promisify(execFile);
const ROOT = path.resolve(__dirname, "../..");
const TS_NODE = [path.join(ROOT, "node_modules/ts-node/dist/bin.js"), "--transpile-only"];
/** The scripts' view must not depend on the developer's shell: built-in sinks, no AWS region or Stripe key. */
const CLEAN_ENV = { MOESIF_APPLICATION_ID: "", STRIPE_API_BASE: "", STRIPE_API_KEY: "", AWS_ENDPOINT_URL_DYNAMODB: "", AWS_ENDPOINT_URL: "" };

/** Runs `scripts/<name>.ts` as `npm run <name>` does; resolves with its exit code and output whatever the code. */
async function script(name: "usage" | "reconcile", args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await exec(process.execPath, [...TS_NODE, path.join(ROOT, "scripts", `${name}.ts`), ...args], { cwd: ROOT, env: { ...process.env, ...CLEAN_ENV, ...env } });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const failure = err as { code: number; stdout: string; stderr: string };
    return { code: failure.code, stdout: failure.stdout, stderr: failure.stderr };
  }
}

describe("npm run usage and npm run reconcile, from the ledger", function () {
  this.timeout(120_000);
  const project = tempProject();
  const logs: string[] = [];
  let stack: LocalStack | undefined;
  /** customer/model → what the answers said. */
  const answered: Record<string, { requests: number; prompt: number; completion: number }> = {};
  let itemsWhileRunning: LedgerItem[];
  let usageWhileRunning: UsageReportRow[];

  const running = () => {
    if (!stack) throw new Error("the stack is not running");
    return stack;
  };

  async function chat(customer: string, body: unknown): Promise<number> {
    const response = await fetch(`${running().baseUrl}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-api-key": running().apiKeys[customer] },
      body: JSON.stringify(body),
    });
    const json = (await response.json()) as { usage?: { prompt_tokens: number; completion_tokens: number } };
    if (response.status === 200) {
      const key = `${customer}/${(body as { model: string }).model}`;
      answered[key] ??= { requests: 0, prompt: 0, completion: 0 };
      answered[key].requests += 1;
      answered[key].prompt += json.usage!.prompt_tokens;
      answered[key].completion += json.usage!.completion_tokens;
    }
    return response.status;
  }

  before(async () => {
    stack = await startLocalStack({ stack: "test", projectDir: project.dir, dataDir: project.dataDir, port: 0, env: { FORWARDER_INTERVAL_MS: "50", SINK_TIMEOUT_MS: "500" }, write: (l) => logs.push(l) });
    registerSecret(...Object.values(stack.apiKeys), LOCAL_STRIPE_API_KEY);
    const requests: Array<[string, string, string]> = [
      ["pro", "gpt-4o", "one"],
      ["pro", "gpt-4o", "two two"],
      ["pro", "gpt-3.5-turbo", "three three three"],
      ["pro2", "gpt-4o-mini", "four"],
      ["starter", "gpt-4o-mini", "five five"],
    ];
    for (const [customer, model, text] of requests) expect(await chat(customer, { model, messages: [{ role: "user", content: text }] })).to.equal(200);
    // An error: a ledger item (and Moesif event) with no tokens and no cost, on the customer's model line.
    expect(await chat("pro", { model: "gpt-4o", messages: [] })).to.equal(400);
    await waitUntil("every ledger item", async () => ((await ledgerItems(running())).length === requests.length + 1 ? true : undefined));
    await running().drain();
    itemsWhileRunning = await ledgerItems(running());
  });

  after(async () => {
    recordForScan("ledger-reports logs", logs);
    await stack?.stop();
    project.remove();
  });

  it("npm run usage -- --json reads the running stack's ledger: per customer and model, what the answers said", async () => {
    const { code, stdout } = await script("usage", ["--json", "--data-dir", project.dataDir]);
    expect(code).to.equal(0);
    usageWhileRunning = JSON.parse(stdout) as UsageReportRow[];
    expect(usageWhileRunning).to.deep.equal(usageReport(ledgerUsage(itemsWhileRunning)));
    const fromReport = Object.fromEntries(usageWhileRunning.map((r) => [`${r.customer}/${r.model}`, { requests: r.billed_requests, prompt: r.prompt_tokens, completion: r.completion_tokens }]));
    expect(fromReport).to.deep.equal(answered);
    const pro = usageWhileRunning.find((r) => r.customer === "pro" && r.model === "gpt-4o")!;
    expect(pro).to.include({ requests: 3, billed_requests: 2, currency: "usd" });
    expect(pro.cost_micros).to.equal(itemsWhileRunning.filter((i) => i.customer_id === "pro" && i.model === "gpt-4o").reduce((n, i) => n + (i.cost_micros ?? 0), 0));
    expect(pro.cost).to.equal(pro.cost_micros! / 1_000_000);
  });

  it("npm run usage prints the same as a table", async () => {
    const { code, stdout } = await script("usage", ["--data-dir", project.dataDir]);
    expect(code).to.equal(0);
    const lines = stdout.trim().split("\n");
    expect(lines[0].split(/\s+/)).to.deep.equal(["customer", "model", "requests", "billed", "prompt", "completion", "total", "estimated", "cost"]);
    expect(lines).to.have.length(2 + usageWhileRunning.length);
    const pro = usageWhileRunning.find((r) => r.customer === "pro" && r.model === "gpt-4o")!;
    expect(lines.find((l) => /^pro\s+gpt-4o\s/.test(l))).to.match(new RegExp(`\\s${(pro.cost_micros! / 1e6).toFixed(6)} usd$`));
  });

  it("npm run reconcile finds no difference while npm start runs, and exits 0", async () => {
    const json = await script("reconcile", ["--json", "--data-dir", project.dataDir]);
    expect(json.code, json.stderr).to.equal(0);
    const report = JSON.parse(json.stdout) as ReconcileReport;
    expect(report).to.include({ ok: true, mode: "local" });
    expect(report.differences).to.deep.equal([]);
    expect(report.ledger.items).to.equal(itemsWhileRunning.length);
    expect(report.ledger.where).to.match(/^running npm start/);
    expect(report.moesif.rows.find((r) => r.customer === "pro" && r.meter === "requests")).to.deep.equal({ customer: "pro", meter: "requests", ledger: 4, sink: 4, difference: 0 });
    // Stripe: the billed items only, per Stripe customer (the error costs nothing and is not there).
    const stripeLedger = (customer: string) => itemsWhileRunning.filter((i) => i.stripe_customer_id === customer && i.billed).reduce((n, i) => n + i.cost_micros!, 0);
    expect(report.stripe.rows).to.deep.equal(
      ["cus_pro", "cus_pro2", "cus_starter"].map((c) => ({ customer: c, meter: STRIPE_METER_EVENT_NAME, ledger: stripeLedger(c), sink: stripeLedger(c), difference: 0 })),
    );

    const text = await script("reconcile", ["--data-dir", project.dataDir]);
    expect(text.code).to.equal(0);
    expect(text.stdout).to.match(/delivery marks: 0 pending, 0 failed/);
    expect(text.stdout.trim().split("\n").pop()).to.equal("no differences");
  });

  it("npm run reconcile names what a sink is missing and the items still pending, and exits 1", async () => {
    const stack = running();
    stack.collector!.mode = "error";
    const before = new Set(itemsWhileRunning.map((i) => i.transaction_id));
    expect(await chat("pro2", { model: "gpt-4o-mini", messages: [{ role: "user", content: "during the outage" }] })).to.equal(200);
    const [fresh] = await waitUntil("the new item, delivered to Stripe and not to Moesif", async () => {
      const items = (await ledgerItems(stack)).filter((i) => !before.has(i.transaction_id));
      return items.length === 1 && items[0].stripe_state === "delivered" ? items : undefined;
    });
    expect(fresh.moesif_state).to.equal("pending");

    const json = await script("reconcile", ["--json", "--data-dir", project.dataDir]);
    expect(json.code).to.equal(1);
    const report = JSON.parse(json.stdout) as ReconcileReport;
    expect(report.ok).to.equal(false);
    const kinds = report.differences.map((d) => `${d.sink}:${d.kind}`);
    expect(kinds).to.include.members(["moesif:total", "moesif:pending", "moesif:missing"]);
    expect(kinds.filter((k) => k.startsWith("stripe:"))).to.deep.equal([]);
    expect(report.differences.find((d) => d.kind === "total" && d.meter === "requests")).to.include({ customer: "pro2", ledger: 2, sink_total: 1, difference: -1 });
    expect(report.differences.find((d) => d.kind === "pending")).to.deep.include({ count: 1, oldest: { transaction_id: fresh.transaction_id, created_at: new Date(fresh.created_at).toISOString(), state: "pending" } });
    expect(report.differences.find((d) => d.kind === "missing")).to.deep.include({ count: 1, transaction_ids: [fresh.transaction_id] });

    const text = await script("reconcile", ["--data-dir", project.dataDir]);
    expect(text.code).to.equal(1);
    expect(text.stdout).to.include(`Moesif: 1 item(s) pending, not yet delivered (oldest ${new Date(fresh.created_at).toISOString()}, ${fresh.transaction_id})`);
    expect(text.stdout).to.include("Moesif pro2 requests: ledger 2, Moesif 1 (-1)");

    stack.collector!.mode = "ok";
    await stack.drain();
    expect((await script("reconcile", ["--data-dir", project.dataDir])).code).to.equal(0);
  });

  describe("after npm start has stopped", () => {
    before(async () => {
      itemsWhileRunning = await ledgerItems(running());
      const rows = await script("usage", ["--json", "--data-dir", project.dataDir]);
      usageWhileRunning = JSON.parse(rows.stdout) as UsageReportRow[];
      await stack!.stop();
      stack = undefined;
    });

    it("npm run usage reads the same ledger files with a private dynalite", async () => {
      expect(fs.existsSync(path.join(project.dataDir, "ledger.json"))).to.equal(false);
      const { code, stdout } = await script("usage", ["--json", "--data-dir", project.dataDir]);
      expect(code).to.equal(0);
      expect(JSON.parse(stdout)).to.deep.equal(usageWhileRunning);
    });

    it("npm run reconcile still finds no difference (exit 0), reading the sinks' files", async () => {
      const { code, stdout } = await script("reconcile", ["--json", "--data-dir", project.dataDir]);
      expect(code).to.equal(0);
      const report = JSON.parse(stdout) as ReconcileReport;
      expect(report.ledger).to.deep.include({ items: itemsWhileRunning.length });
      expect(report.ledger.where).to.match(/^private dynalite/);
      expect(report.differences).to.deep.equal([]);
    });

    it("npm run reconcile reports events the sinks have and the ledger does not (exit 1)", async () => {
      const usageDb = new SqliteStore(path.join(project.dataDir, "usage.db"));
      const stripeDb = new StripeStore(path.join(project.dataDir, "stripe.db"));
      try {
        usageDb.add([{ transaction_id: "tx-not-in-ledger", user_id: "pro", metadata: { prompt_tokens: 3, completion_tokens: 4, cost_micros: 7, currency: "usd" } }]);
        stripeDb.add({ identifier: "tx-not-in-ledger", event_name: STRIPE_METER_EVENT_NAME, stripe_customer_id: "cus_pro", value: 7, timestamp: Math.floor(itemsWhileRunning[0].started_at / 1000), api: "v2" });
      } finally {
        usageDb.close();
        stripeDb.close();
      }
      const { code, stdout } = await script("reconcile", ["--json", "--data-dir", project.dataDir]);
      expect(code).to.equal(1);
      const report = JSON.parse(stdout) as ReconcileReport;
      const summary = report.differences.map((d) => (d.kind === "total" ? `${d.sink} ${d.customer} ${d.meter} ${d.difference}` : `${d.sink} ${d.kind}`));
      expect(summary).to.have.members([
        "moesif pro completion_tokens 4",
        "moesif pro cost_micros:usd 7",
        "moesif pro prompt_tokens 3",
        "moesif pro requests 1",
        "moesif unexpected",
        `stripe cus_pro ${STRIPE_METER_EVENT_NAME} 7`,
      ]);
    });

    it("says there is nothing to read for a data dir without a ledger (exit 1 for usage, 2 for reconcile)", async () => {
      const empty = fs.mkdtempSync(path.join(os.tmpdir(), "no-ledger-"));
      try {
        const usage = await script("usage", ["--data-dir", empty]);
        expect(usage.code).to.equal(1);
        expect(usage.stderr.trim()).to.match(/^npm run usage: no ledger yet: .* does not exist \(run npm start and send a request\)$/);
        const reconcile = await script("reconcile", ["--data-dir", empty]);
        expect(reconcile.code).to.equal(2);
        expect(reconcile.stderr.trim()).to.match(/^npm run reconcile: no ledger yet: /);
      } finally {
        fs.rmSync(empty, { recursive: true, force: true });
      }
    });

    describe("--stack <name> (a deployed stack; pulumi and AWS stood in for)", () => {
      let bin: string;
      let ledger: LedgerDb;
      let stripe: StripeServer;
      before(async () => {
        // A `pulumi` on PATH that answers `pulumi stack output --json -s <stack>` for stack "deployed" only.
        bin = fs.mkdtempSync(path.join(os.tmpdir(), "fake-pulumi-"));
        const outputs = JSON.stringify({ ledgerTableName: "usage-ledger", ledgerTableArn: "arn:aws:dynamodb:eu-west-1:000000000000:table/usage-ledger", stripeWebhookSecret: "[secret]" });
        fs.writeFileSync(
          path.join(bin, "pulumi"),
          `#!/bin/sh\nif [ "$5" = "deployed" ]; then echo '${outputs}'; else echo "error: no stack named '$5' found" >&2; exit 255; fi\n`,
          { mode: 0o755 },
        );
        // "DynamoDB": the local ledger files, served; "Stripe": the local meter events, served.
        ledger = await LedgerDb.start(project.dataDir);
        stripe = await new StripeServer({ apiKey: "sk_test_reconcile_aws_0001", dbFile: path.join(project.dataDir, "stripe.db") }).start();
        registerSecret("sk_test_reconcile_aws_0001");
      });
      after(async () => {
        await stripe.stop();
        await ledger.stop();
        fs.rmSync(bin, { recursive: true, force: true });
      });
      const aws = (extra: NodeJS.ProcessEnv = {}) => ({
        PATH: `${bin}${path.delimiter}${process.env.PATH}`,
        AWS_ENDPOINT_URL_DYNAMODB: ledger.endpoint,
        AWS_ACCESS_KEY_ID: "local",
        AWS_SECRET_ACCESS_KEY: "local",
        AWS_REGION: "",
        AWS_DEFAULT_REGION: "",
        ...extra,
      });

      it("reads the table named by the stack's ledgerTableName output and compares delivery marks; Stripe not read without STRIPE_API_KEY", async () => {
        const { code, stdout, stderr } = await script("reconcile", ["--json", "--stack", "deployed"], aws());
        expect(code, stderr).to.equal(0);
        const report = JSON.parse(stdout) as ReconcileReport;
        expect(report.mode).to.equal("aws");
        expect(report.ledger).to.deep.equal({ table: "usage-ledger", where: "DynamoDB eu-west-1", items: itemsWhileRunning.length });
        expect(report.moesif.compared).to.equal(false);
        expect(report.moesif.source).to.match(/management key/);
        expect(report.stripe.compared).to.equal(false);
        expect(report.stripe.source).to.equal("not read: STRIPE_API_KEY is not set (delivery marks only)");
        expect(report.differences).to.deep.equal([]);
      });

      it("with STRIPE_API_KEY, compares Stripe's summaries for requests older than Stripe's settling time", async () => {
        const { code, stdout, stderr } = await script("reconcile", ["--json", "--stack", "deployed"], aws({ STRIPE_API_KEY: "sk_test_reconcile_aws_0001", STRIPE_API_BASE: stripe.url }));
        expect(code, stderr).to.equal(0);
        const report = JSON.parse(stdout) as ReconcileReport;
        // Every request here is minutes old at most: too recent to compare, and said so.
        expect(report.stripe.source).to.match(/too recent for Stripe's summaries/);
        expect(report.notes.join("\n")).to.match(/Stripe totals cover requests started before/);
        expect(stdout).to.not.include("sk_test_reconcile_aws_0001");
      });

      it("compares Stripe's meter event summaries per Stripe customer once the requests are older than that", async () => {
        const later = Date.now() + STRIPE_SETTLE_MS + 120_000;
        const report = await reconcileAws("deployed", project.dir, { ...process.env, ...CLEAN_ENV, ...aws({ STRIPE_API_KEY: "sk_test_reconcile_aws_0001", STRIPE_API_BASE: stripe.url }) }, later);
        expect(report.stripe.compared).to.equal(true);
        const stripeLedger = (customer: string) => itemsWhileRunning.filter((i) => i.stripe_customer_id === customer && i.billed).reduce((n, i) => n + i.cost_micros!, 0);
        // cus_pro's Stripe total holds the event added behind the ledger's back above: the one difference.
        expect(report.stripe.rows).to.deep.equal([
          { customer: "cus_pro", meter: STRIPE_METER_EVENT_NAME, ledger: stripeLedger("cus_pro"), sink: stripeLedger("cus_pro") + 7, difference: 7 },
          { customer: "cus_pro2", meter: STRIPE_METER_EVENT_NAME, ledger: stripeLedger("cus_pro2"), sink: stripeLedger("cus_pro2"), difference: 0 },
          { customer: "cus_starter", meter: STRIPE_METER_EVENT_NAME, ledger: stripeLedger("cus_starter"), sink: stripeLedger("cus_starter"), difference: 0 },
        ]);
        expect(report.differences.map((d) => d.message)).to.deep.equal([`Stripe cus_pro ${STRIPE_METER_EVENT_NAME}: ledger ${stripeLedger("cus_pro")}, Stripe ${stripeLedger("cus_pro") + 7} (+7)`]);
      });

      it("exits 2 with one line when the stack has no outputs", async () => {
        const { code, stdout, stderr } = await script("reconcile", ["--stack", "nope"], aws());
        expect(code).to.equal(2);
        expect(stdout).to.equal("");
        expect(stderr.trim()).to.equal("npm run reconcile: cannot read the outputs of stack nope (pulumi stack output --json -s nope): error: no stack named 'nope' found");
      });
    });
  });
});
