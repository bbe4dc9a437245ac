import { expect } from "chai";
import { execFile, spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import type { AccountBalance } from "../../functions/shared/customer-port";
import { createCustomerStoreFromEnv } from "../../functions/shared/customer-store";
import type { LedgerItem } from "../../functions/shared/ledger-schema";
import { openLocalLedger } from "../../scripts/local/ledger-db";
import type { CreditsRow } from "../../scripts/credits";
import { tempProject, waitUntil } from "../helpers/local-project";
import { recordForScan, registerSecret } from "../helpers/secret-scan";
import { chat, chatBody, PREPAID_STACK_YAML, sum, type Outcome } from "./prepaid-fixture";

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, "../..");
const TS_NODE = [path.join(ROOT, "node_modules/ts-node/dist/bin.js"), "--transpile-only"];
/** Sinks from the environment would take the events elsewhere: the children use the built-in ones. */
const BUILT_IN_SINKS = { MOESIF_APPLICATION_ID: "", MOESIF_BASE_URI: "", STRIPE_API_BASE: "", STRIPE_API_KEY: "", STRIPE_BILLING: "" };
const CUSTOMER = "buyer";
/** The streams open at the kill: a chunk every 1.5 s, so each is mid-answer for ~15 s. */
const SLOW = { stream: true, mock: { chunk_delay_ms: 1500 } };

interface Started {
  child: ChildProcessWithoutNullStreams;
  url: string;
  /** What the process printed after its banner (log lines). */
  output: () => string;
}

describe("prepaid credits: kill -9 of npm start with reservations open, then npm start again (evidence)", function () {
  this.timeout(180_000);
  const project = tempProject(PREPAID_STACK_YAML);
  const children: ChildProcessWithoutNullStreams[] = [];
  const outputs: string[] = [];
  let keys: Record<string, string> = {};
  let current: Started | undefined;
  /** Everything added to the customer's balance through the credits command. */
  let credited = 0;

  after(() => {
    for (const child of children) child.kill("SIGKILL");
    recordForScan("prepaid-kill9 npm start logs", outputs);
    project.remove();
  });

  /** `npm start` as a user runs it (ts-node), on the test project and data dir, until its banner is out. */
  async function start(): Promise<Started> {
    const child = spawn(process.execPath, [...TS_NODE, path.join(ROOT, "scripts/start.ts"), "--stack", "test", "--project-dir", project.dir, "--data-dir", project.dataDir], {
      cwd: ROOT,
      // An hour: no hold of a live request is ever stale here, so only the restart's orphan rule (holds made before
      // this process started belong to a dead one) settles anything.
      env: { ...process.env, ...BUILT_IN_SINKS, PORT: "0", LOG_LEVEL: "info", FORWARDER_INTERVAL_MS: "100", HOLD_STALE_AFTER_MS: "3600000" },
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
    keys = JSON.parse(fs.readFileSync(path.join(project.dataDir, "api-keys.json"), "utf8")) as Record<string, string>;
    registerSecret(...Object.values(keys));
    // The banner shows the customers' keys by design; what follows it (log lines) must never hold one.
    return { child, url, output: () => output.slice(output.indexOf("Ctrl-C stops.")) };
  }

  async function kill9(started: Started): Promise<void> {
    const exited = new Promise<string | null>((resolve) => started.child.once("exit", (_code, signal) => resolve(signal)));
    started.child.kill("SIGKILL");
    expect(await exited).to.equal("SIGKILL");
    outputs.push(started.output());
  }

  /** `npm run credits -- <args>` against the test project's data (a running npm start's, or a private dynalite). */
  async function credits(...args: string[]): Promise<unknown> {
    const { stdout } = await run(process.execPath, [...TS_NODE, path.join(ROOT, "scripts/credits.ts"), ...args, "--json", "--project-dir", project.dir, "--data-dir", project.dataDir], {
      cwd: ROOT,
      env: { ...process.env, STACK: "test" },
    });
    return JSON.parse(stdout);
  }

  async function row(): Promise<CreditsRow> {
    const rows = (await credits()) as CreditsRow[];
    return rows.find((r) => r.customer === CUSTOMER)!;
  }

  interface View {
    account: AccountBalance;
    items: LedgerItem[];
    /** Read through the running npm start (true) or a private dynalite on its files (false). */
    shared: boolean;
  }

  /**
   * Opens the test project's data with openLocalLedger (the running npm start's dynalite, or a private one when none
   * runs) for as long as `use` runs; `read` gives the customer's account and ledger items.
   */
  async function withData<T>(use: (read: () => Promise<View>) => Promise<T>): Promise<T> {
    const ledger = await openLocalLedger(project.dataDir);
    const store = createCustomerStoreFromEnv(ledger.customersEnv, { timeoutMs: 10_000 });
    try {
      return await use(async () => {
        const items: LedgerItem[] = [];
        for await (const item of ledger.store.scanAll()) if (item.customer_id === CUSTOMER) items.push(item);
        return { account: await store.getBalance(CUSTOMER), items, shared: ledger.shared };
      });
    } finally {
      store.destroy();
      await ledger.close();
    }
  }

  const readOnce = () => withData((read) => read());

  /**
   * Opens `count` slow streams and waits until each holds a reservation and has delivered its first words to its
   * caller; their promises settle (reject, mostly) when the stack dies.
   */
  async function openStreams(started: Started, said: string, count: number): Promise<Array<Promise<Outcome | Error>>> {
    const talking = new Set<number>();
    const streams = Array.from({ length: count }, (_, i) =>
      chat(started.url, keys[CUSTOMER], chatBody(said, SLOW), { onContent: () => talking.add(i) }).catch((err: Error) => err),
    );
    await withData((read) =>
      waitUntil(`${count} streams holding a reservation and past their first words`, async () => {
        const { account } = await read();
        return Object.keys(account.holds).length === count && talking.size === count ? true : undefined;
      }),
    );
    return streams;
  }

  /** Waits for the restarted stack's forwarder to settle every hold; returns the account and ledger then. */
  function swept(): Promise<View> {
    return withData((read) =>
      waitUntil("the restarted stack's sweep to settle the holds left by the dead one", async () => {
        const state = await read();
        return state.account.reservedMicros === 0 ? state : undefined;
      }, 60_000),
    );
  }

  const linesOf = (output: string, message: string) =>
    output
      .split("\n")
      .filter((line) => line.includes(`"message":"${message}"`))
      .map((line) => JSON.parse(line) as Record<string, unknown>);

  it("holds open at the kill survive it, and the next npm start releases them in full (no ledger item: nothing was billed)", async () => {
    const first = await start();
    const added = (await credits("add", CUSTOMER, "0.01")) as { balance_micros: number; amount_micros: number };
    credited += added.amount_micros;
    expect(added.balance_micros).to.equal(credited);

    const streams = await openStreams(first, "held when the stack dies", 4);
    const before = await row();
    expect(before.holds).to.equal(4);
    expect(before.reserved_micros).to.be.above(0);
    expect(before.balance_micros).to.equal(credited - before.reserved_micros);

    await kill9(first);
    current = undefined;
    await Promise.all(streams);

    // After the kill, nothing serves the data: the command reads it through a private dynalite, holds and all.
    const dead = await row();
    expect(dead, "the holds are still there after the kill").to.include({ holds: 4, reserved_micros: before.reserved_micros, balance_micros: before.balance_micros });
    const afterKill = await readOnce();
    expect(afterKill.shared).to.equal(false);
    expect(afterKill.items.filter((i) => i.billed), "the dead requests never wrote a ledger item").to.deep.equal([]);

    current = await start();
    const { account, items } = await swept();
    const billed = items.filter((i) => i.billed);
    console.log(`      run 1: credited ${credited}, ${before.reserved_micros} held by 4 streams at the kill, balance after the restart's sweep ${account.balanceMicros}`);
    expect(billed).to.deep.equal([]);
    expect(account.balanceMicros, "released in full").to.equal(credited);
    expect(account.holds).to.deep.equal({});
    expect(await row()).to.include({ balance_micros: credited, reserved_micros: 0, holds: 0 });

    await waitUntil("the sweep's log lines", () => (linesOf(current!.output(), "stale_holds_sweep").length > 0 ? true : undefined));
    const released = linesOf(current.output(), "stale_hold_released");
    expect(released.map((l) => l.customer_id)).to.deep.equal([CUSTOMER, CUSTOMER, CUSTOMER, CUSTOMER]);
    expect(released.every((l) => l.charged_micros === 0)).to.equal(true);
    expect(linesOf(current.output(), "stale_hold_settled")).to.deep.equal([]);
  });

  it("requests completed before the kill stay charged at their ledger cost; the holds open at the kill are released, and the balance = credited − Σ billed cost", async () => {
    const started = current!;
    expect(started, "the stack the first test restarted").to.not.equal(undefined);
    const added = (await credits("add", CUSTOMER, "0.005")) as { balance_micros: number; amount_micros: number };
    credited += added.amount_micros;

    // Three buffered answers and one whole stream, finished (settled, in the ledger) before the kill.
    const done = [
      ...(await Promise.all([1, 2, 3].map((i) => chat(started.url, keys[CUSTOMER], chatBody(`finished before the kill ${i}`))))),
      await chat(started.url, keys[CUSTOMER], chatBody("streamed before the kill", { stream: true })),
    ];
    for (const outcome of done) expect(outcome.status, JSON.stringify(outcome)).to.equal(200);
    const finished = await withData((read) =>
      waitUntil("the finished requests' ledger items and no hold", async () => {
        const state = await read();
        const mine = state.items.filter((i) => done.some((o) => o.requestId === i.request_id));
        return mine.length === done.length && state.account.reservedMicros === 0 ? { ...state, mine } : undefined;
      }),
    );
    for (const item of finished.mine) expect(item).to.include({ billed: true, billing_mode: "prepaid", settlement: "settled", shortfall_micros: 0 });
    const spent = sum(finished.mine, "cost_micros");
    expect(spent).to.be.above(0);
    expect(finished.account.balanceMicros).to.equal(credited - spent);

    const streams = await openStreams(started, "cut off by the kill", 3);
    const { account: held } = await readOnce();
    expect(held.reservedMicros).to.be.above(0);
    expect(held.balanceMicros).to.equal(credited - spent - held.reservedMicros);

    await kill9(started);
    current = undefined;
    await Promise.all(streams);

    // The kill left the three holds and the four billed items; no item for the three cut-off streams.
    const dead = await readOnce();
    expect(dead.shared).to.equal(false);
    expect(Object.keys(dead.account.holds)).to.have.length(3);
    expect(dead.account).to.include({ reservedMicros: held.reservedMicros, balanceMicros: held.balanceMicros });
    expect(dead.items.filter((i) => i.billed).map((i) => i.request_id).sort()).to.deep.equal(done.map((o) => o.requestId).sort());

    current = await start();
    const { account, items } = await swept();
    const billed = items.filter((i) => i.billed);
    console.log(`      run 2: credited ${credited}, ${billed.length} billed items costing ${sum(billed, "cost_micros")}, ${held.reservedMicros} held by 3 streams at the kill, balance after the restart's sweep ${account.balanceMicros}`);
    expect(account.balanceMicros, "credited − Σ billed cost").to.equal(credited - sum(billed, "cost_micros"));
    expect(sum(billed, "charged_micros")).to.equal(sum(billed, "cost_micros"));
    expect(account.holds).to.deep.equal({});
    expect(await row()).to.include({ balance_micros: credited - sum(billed, "cost_micros"), reserved_micros: 0, holds: 0 });

    await waitUntil("the sweep's log lines", () => (linesOf(current!.output(), "stale_holds_sweep").length > 0 ? true : undefined));
    expect(linesOf(current.output(), "stale_hold_released")).to.have.length(3);
    expect(linesOf(current.output(), "stale_hold_settled")).to.deep.equal([]);

    const exited = new Promise<number | null>((resolve) => current!.child.once("exit", (code) => resolve(code)));
    current.child.kill("SIGTERM");
    expect(await exited).to.equal(0);
    outputs.push(current.output());
    current = undefined;
  });
});
