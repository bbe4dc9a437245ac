import { expect } from "chai";
import type { LedgerItem, SinkName } from "../../functions/shared/ledger-schema";
import type { LocalStack } from "../../scripts/local/stack";
import { reconcileLocal } from "../../scripts/reconcile";
import { ledgerItems, useLocalStack, waitUntil } from "../helpers/local-project";

/**
 * Evidence for issue #11: each billing sink down for a while, in each way a sink goes down, while callers keep being
 * served; then back. The forwarder's own sweep loop (every 50 ms here) must re-drive everything pending once the
 * sink answers again, and the sink must end up with every item exactly once.
 */
const MODES = ["refuse", "error", "rate_limited", "hang"] as const;
type Mode = (typeof MODES)[number];

const WHAT: Record<Mode, string> = {
  refuse: "refuses connections",
  error: "answers 500",
  rate_limited: "answers 429 with Retry-After",
  hang: "never answers",
};

const CUSTOMERS = ["starter", "pro", "pro2"];

/** What a caller sees of an answer, without the per-request ids and times. */
interface Answer {
  status: number;
  type?: string;
  choices?: unknown;
  usage?: unknown;
  error?: unknown;
}

describe("usage ledger: a billing sink down for a while, then back (evidence)", function () {
  this.timeout(180_000);
  // A short sink timeout keeps the hanging mode quick; the sweep runs every 50 ms.
  const local = useLocalStack("ledger-outage", { FORWARDER_INTERVAL_MS: "50", SINK_TIMEOUT_MS: "400", LOG_LEVEL: "info" });

  const bodies = CUSTOMERS.flatMap((customer, c) => [
    { customer, body: { model: "gpt-4o-mini", messages: [{ role: "user", content: `outage request ${c} one` }] } },
    { customer, body: { model: "gpt-4o-mini", messages: [{ role: "user", content: `outage request ${c} two two` }], max_tokens: 5 } },
    // An error answer: it still gets a ledger item and a Moesif event (no Stripe event: nothing billed).
    { customer, body: { model: "gpt-4o-mini", messages: [] } },
  ]);

  async function send(stack: LocalStack, customer: string, body: unknown): Promise<Answer> {
    const response = await fetch(`${stack.baseUrl}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-api-key": stack.apiKeys[customer] },
      body: JSON.stringify(body),
    });
    const json = (await response.json()) as { object?: string; choices?: unknown; usage?: unknown; error?: unknown };
    return { status: response.status, type: json.object, choices: json.choices, usage: json.usage, error: json.error };
  }

  let baseline: Answer[];
  before(async () => {
    // The answers with both sinks up: what callers must keep getting while a sink is down.
    baseline = [];
    for (const { customer, body } of bodies) baseline.push(await send(local.stack, customer, body));
    expect(baseline.filter((a) => a.status === 200)).to.have.length(CUSTOMERS.length * 2);
    await local.stack.drain();
  });

  const unavailableLines = (sink: SinkName) => local.logs.filter((line) => line.includes('"message":"sink_unavailable"') && line.includes(`"sink":"${sink}"`)).length;

  function setMode(stack: LocalStack, sink: SinkName, mode: Mode | "ok"): void {
    if (sink === "moesif") {
      stack.collector!.mode = mode;
      stack.collector!.retryAfterSeconds = 1;
    } else {
      stack.stripe!.mode = mode;
      stack.stripe!.retryAfterSeconds = 1;
    }
  }

  /** Transaction id → times the sink holds it (the built-in sinks' own stores). */
  function sinkCounts(stack: LocalStack, sink: SinkName): Map<string, number> {
    const counts = new Map<string, number>();
    const ids = sink === "moesif" ? stack.store!.acknowledged().map((e) => e.transaction_id) : stack.stripe!.events().map((e) => e.identifier);
    for (const id of ids) counts.set(id, (counts.get(id) ?? 0) + 1);
    return counts;
  }

  const owes = (item: LedgerItem, sink: SinkName) => item[`${sink}_state`] !== undefined;

  for (const sink of ["moesif", "stripe"] as const) {
    for (const mode of MODES) {
      it(`${sink === "moesif" ? "Moesif" : "Stripe"} ${WHAT[mode]}: callers get the same answers, and afterwards it has every item exactly once`, async () => {
        const { stack } = local;
        const other: SinkName = sink === "moesif" ? "stripe" : "moesif";
        const before = new Set((await ledgerItems(stack)).map((i) => i.transaction_id));
        const failuresBefore = unavailableLines(sink);

        // Down.
        setMode(stack, sink, mode);
        const answers: Answer[] = [];
        for (const { customer, body } of bodies) answers.push(await send(stack, customer, body));
        expect(answers).to.deep.equal(baseline);

        const fresh = await waitUntil("the outage's ledger items", async () => {
          const items = (await ledgerItems(stack)).filter((i) => !before.has(i.transaction_id));
          return items.length === bodies.length ? items : undefined;
        });
        // The forwarder found the sink down (at least twice: it keeps retrying), and the other sink was not held up.
        await waitUntil(`the forwarder to find ${sink} down twice`, () => (unavailableLines(sink) >= failuresBefore + 2 ? true : undefined));
        await waitUntil(`${other} to get the outage's items meanwhile`, async () => {
          const items = (await ledgerItems(stack)).filter((i) => !before.has(i.transaction_id) && owes(i, other));
          return items.length > 0 && items.every((i) => i[`${other}_state`] === "delivered") ? true : undefined;
        });
        if (mode === "rate_limited") {
          // The sink's Retry-After (1 s) is what the forwarder waits, not its own back-off schedule.
          const lines = local.logs.filter((line) => line.includes('"message":"sink_unavailable"') && line.includes(`"sink":"${sink}"`)).slice(failuresBefore);
          expect(lines.map((line) => (JSON.parse(line) as { retry_in_ms: number }).retry_in_ms)).to.satisfy((waits: number[]) => waits.every((ms) => ms === 1000));
        }
        const during = (await ledgerItems(stack)).filter((i) => !before.has(i.transaction_id) && owes(i, sink));
        expect(during.length, `items owing ${sink}`).to.be.greaterThan(0);
        expect(during.map((i) => i[`${sink}_state`])).to.satisfy((states: string[]) => states.every((s) => s === "pending"));
        const counts = sinkCounts(stack, sink);
        expect(during.filter((i) => counts.has(i.transaction_id)), `${sink} has none of them yet`).to.have.length(0);

        // Back: the sweep loop alone (no drain) re-drives the backlog.
        setMode(stack, sink, "ok");
        await waitUntil(`every outage item delivered to ${sink}`, async () => {
          const items = (await ledgerItems(stack)).filter((i) => !before.has(i.transaction_id) && owes(i, sink));
          return items.every((i) => i[`${sink}_state`] === "delivered") ? true : undefined;
        }, 60_000);

        const after = sinkCounts(stack, sink);
        const owed = fresh.filter((i) => owes(i, sink));
        for (const item of owed) expect(after.get(item.transaction_id), `${sink} copies of ${item.transaction_id}`).to.equal(1);
        // Sink totals = ledger totals, for everything so far (earlier outages included).
        const all = await ledgerItems(stack);
        if (sink === "stripe") {
          const ledgerTotals: Record<string, number> = {};
          for (const i of all.filter((x) => x.stripe_state !== undefined)) ledgerTotals[i.stripe_customer_id!] = (ledgerTotals[i.stripe_customer_id!] ?? 0) + i.cost_micros!;
          expect(stack.stripe!.totals()).to.deep.equal(ledgerTotals);
        } else {
          expect([...after.keys()].sort()).to.deep.equal(all.map((i) => i.transaction_id).sort());
        }
        expect([...after.values()].every((n) => n === 1)).to.equal(true);

        const report = await reconcileLocal(local.dataDir, {});
        expect(report.differences, JSON.stringify(report.differences)).to.deep.equal([]);
        expect(report.ok).to.equal(true);
      });
    }
  }
});
