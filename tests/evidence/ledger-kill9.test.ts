import { expect } from "chai";
import { execFile, spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { STRIPE_METER_EVENT_NAME, type LedgerItem } from "../../functions/shared/ledger-schema";
import { ledgerLockFile, openLocalLedger, readLockFile, type LocalLedger } from "../../scripts/local/ledger-db";
import { SqliteStore } from "../../scripts/local/sqlite-store";
import { StripeStore } from "../../scripts/local/stripe-store";
import type { ReconcileReport } from "../../scripts/reconcile";
import { tempProject, waitUntil } from "../helpers/local-project";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, "../..");
const TS_NODE = [path.join(ROOT, "node_modules/ts-node/dist/bin.js"), "--transpile-only"];
/** Sinks from the environment would take the events elsewhere: the children use the built-in ones. */
const BUILT_IN_SINKS = { MOESIF_APPLICATION_ID: "", MOESIF_BASE_URI: "", STRIPE_API_BASE: "", STRIPE_API_KEY: "", STRIPE_BILLING: "" };

interface Started {
  child: ChildProcessWithoutNullStreams;
  url: string;
  output: () => string;
}

async function scan(ledger: LocalLedger): Promise<LedgerItem[]> {
  const items: LedgerItem[] = [];
  for await (const item of ledger.store.scanAll()) items.push(item);
  return items;
}

describe("usage ledger: kill -9 of npm start in the middle of forwarding, then npm start again (evidence)", function () {
  this.timeout(180_000);
  const project = tempProject();
  const children: ChildProcessWithoutNullStreams[] = [];
  const outputs: string[] = [];

  after(() => {
    for (const child of children) child.kill("SIGKILL");
    recordForScan("ledger-kill9 npm start logs", outputs);
    project.remove();
  });

  /** `npm start` as a user runs it (ts-node), on the test project and data dir, until its banner is out. */
  async function start(env: Record<string, string>): Promise<Started> {
    const child = spawn(process.execPath, [...TS_NODE, path.join(ROOT, "scripts/start.ts"), "--stack", "test", "--project-dir", project.dir, "--data-dir", project.dataDir], {
      cwd: ROOT,
      env: { ...process.env, ...BUILT_IN_SINKS, PORT: "0", LOG_LEVEL: "warn", FORWARDER_INTERVAL_MS: "100", ...env },
    });
    children.push(child);
    let output = "";
    child.stderr.on("data", (chunk: Buffer) => (output += chunk.toString()));
    const url = await new Promise<string>((resolve, reject) => {
      child.stdout.on("data", (chunk: Buffer) => {
        output += chunk.toString();
        const match = /API \(stage beta\)\s+(\S+)/.exec(output);
        if (match && output.includes("Ctrl-C stops")) resolve(match[1]);
      });
      child.once("exit", (code) => reject(new Error(`npm start exited early with ${code}: ${output}`)));
    });
    // The banner shows the customers' keys by design; what follows it (log lines) must never hold one.
    return { child, url, output: () => output.slice(output.indexOf("Ctrl-C stops.")) };
  }

  it("loses no ledger item and counts none twice: every item reaches both sinks exactly once, and npm run reconcile exits 0", async () => {
    // Run 1: the collector stores each batch at once but answers 1.5 s later, so the forwarder is always mid-delivery.
    const first = await start({ LOCAL_SINK_DELAY_MS: "1500" });
    const keys = JSON.parse(fs.readFileSync(path.join(project.dataDir, "api-keys.json"), "utf8")) as Record<string, string>;
    registerSecret(...Object.values(keys));
    const customers = ["starter", "pro", "pro2"];

    // Callers keep sending while the stack is killed: some of their requests fail with it, and that is fine.
    let stopSending = false;
    let answered = 0;
    const senders = Array.from({ length: 6 }, async (_, w) => {
      for (let i = 0; !stopSending && i < 40; i++) {
        const customer = customers[(w + i) % customers.length];
        try {
          const response = await fetch(`${first.url}/v1/chat/completions`, {
            method: "POST",
            headers: { "content-type": "application/json", "x-api-key": keys[customer] },
            body: JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: `kill9 ${w} ${i}` }] }),
          });
          await response.arrayBuffer();
          if (response.status === 200) answered += 1;
        } catch {
          return;
        }
      }
    });

    // Kill once the collector holds events whose items the ledger still shows pending for Moesif: the sink has them,
    // the forwarder has not heard back. A restart must send them again, and the sink must not count them twice.
    const usageDb = new SqliteStore(path.join(project.dataDir, "usage.db"));
    let atKill: Set<string>;
    try {
      const ledger = await openLocalLedger(project.dataDir);
      expect(ledger.shared, "the test reads the running stack's ledger").to.equal(true);
      try {
        atKill = await waitUntil("events the collector stored while their items are still pending", async () => {
          if (answered < 10) return undefined;
          const stored = new Set(usageDb.acknowledged().map((e) => e.transaction_id));
          const inWindow = (await scan(ledger)).filter((i) => i.moesif_state === "pending" && stored.has(i.transaction_id));
          return inWindow.length > 0 ? new Set(inWindow.map((i) => i.transaction_id)) : undefined;
        });
      } finally {
        await ledger.close();
      }
      first.child.kill("SIGKILL");
      stopSending = true;
      const [, signal] = await new Promise<[number | null, string | null]>((resolve) => first.child.once("exit", (code, sig) => resolve([code, sig])));
      expect(signal).to.equal("SIGKILL");
      outputs.push(first.output());
      await Promise.all(senders);
      // What a kill -9 leaves behind: a ledger.json naming a dead process.
      expect(readLockFile(project.dataDir)?.pid).to.equal(first.child.pid);

      // Run 2: same data dir, sinks answering at once.
      const second = await start({ LOG_LEVEL: "info" });
      expect(readLockFile(project.dataDir)?.pid, "ledger.json replaced").to.equal(second.child.pid);
      const reopened = await openLocalLedger(project.dataDir);
      let items: LedgerItem[];
      try {
        expect(reopened.shared).to.equal(true);
        let owed: LedgerItem | undefined;
        await waitUntil("the backlog to empty after the restart", async () => {
          [owed] = await reopened.store.backlog({ now: Date.now(), graceMs: 0, limit: 1 });
          return owed ? undefined : true;
        }, 90_000).catch(async (err: Error) => {
          const { moesif_event: _event, ...item } = owed ?? ({} as LedgerItem);
          const { GetCommand } = await import("@aws-sdk/lib-dynamodb");
          const row = await reopened.doc.send(new GetCommand({ TableName: reopened.table, Key: { transaction_id: item.transaction_id } }));
          const { moesif_event: _e2, ...tableRow } = (row.Item ?? {}) as LedgerItem;
          const backlog = await reopened.store.backlog({ now: Date.now(), graceMs: 0, limit: 1000 });
          throw new Error(`${err.message}; still owed (index): ${JSON.stringify(item)}; table row: ${JSON.stringify(tableRow)}; backlog size ${backlog.length}; npm start said: ${second.output()}`);
        });
        items = await scan(reopened);
      } finally {
        await reopened.close();
      }

      expect(items.length).to.be.at.least(10);
      for (const item of items) {
        expect(item.moesif_state, item.transaction_id).to.equal("delivered");
        expect(item.stripe_state, item.transaction_id).to.equal("delivered");
        expect(item.undelivered, item.transaction_id).to.equal(undefined);
      }
      // The items the collector had before the kill were sent again (they are marked delivered now, which happens
      // only on an acknowledgement) and are still there once.
      for (const id of atKill) expect(items.find((i) => i.transaction_id === id)?.moesif_state).to.equal("delivered");

      const events = usageDb.acknowledged();
      expect(events.map((e) => e.transaction_id).sort()).to.deep.equal(items.map((i) => i.transaction_id).sort());

      const stripe = new StripeStore(path.join(project.dataDir, "stripe.db"));
      try {
        const ledgerCost: Record<string, number> = {};
        for (const item of items) ledgerCost[item.stripe_customer_id!] = (ledgerCost[item.stripe_customer_id!] ?? 0) + item.cost_micros!;
        expect(stripe.totals(STRIPE_METER_EVENT_NAME)).to.deep.equal(ledgerCost);
        expect(stripe.events().map((e) => e.identifier).sort()).to.deep.equal(items.map((i) => i.transaction_id).sort());
      } finally {
        stripe.close();
      }

      const { stdout } = await run(process.execPath, [...TS_NODE, path.join(ROOT, "scripts/reconcile.ts"), "--json", "--data-dir", project.dataDir], { cwd: ROOT, env: { ...process.env, ...BUILT_IN_SINKS } });
      const report = JSON.parse(stdout) as ReconcileReport;
      expect(report.differences).to.deep.equal([]);
      expect(report.ledger.items).to.equal(items.length);

      const exited = new Promise<number | null>((resolve) => second.child.once("exit", (code) => resolve(code)));
      second.child.kill("SIGTERM");
      expect(await exited).to.equal(0);
      outputs.push(second.output());
      expect(fs.existsSync(ledgerLockFile(project.dataDir)), "a clean stop removes ledger.json").to.equal(false);
    } finally {
      usageDb.close();
    }
  });
});
