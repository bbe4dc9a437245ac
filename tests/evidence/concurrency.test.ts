import { expect } from "chai";
import { execFile } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import { useLocalStack } from "../helpers/local-project";
import { waitFor } from "../local/streaming-helpers";

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, "../..");

describe("1,000 requests at concurrency 50 through the local stack, and a collector outage", () => {
  const local = useLocalStack("concurrency", { LOG_LEVEL: "warn" });

  it("meters every request exactly once, and per-customer token sums equal the upstream's usage and the usage report", async () => {
    const TOTAL = 1000;
    const CONCURRENCY = 50;
    const customers = ["pro", "pro2", "starter"];
    const expected: Record<string, { requests: number; prompt: number; completion: number }> = {};
    let next = 0;
    const worker = async () => {
      while (next < TOTAL) {
        const i = next++;
        const customer = customers[i % customers.length];
        const response = await fetch(`${local.stack.baseUrl}/v1/chat/completions`, {
          method: "POST",
          headers: { "content-type": "application/json", "x-api-key": local.stack.apiKeys[customer] },
          // Varying text so token counts differ per request.
          body: JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: `request ${i} ${"word ".repeat(i % 17)}` }] }),
        });
        expect(response.status).to.equal(200);
        const body = (await response.json()) as { usage: { prompt_tokens: number; completion_tokens: number } };
        const sum = (expected[customer] ??= { requests: 0, prompt: 0, completion: 0 });
        sum.requests += 1;
        sum.prompt += body.usage.prompt_tokens;
        sum.completion += body.usage.completion_tokens;
      }
    };
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));

    // The function meters once its answer is out: wait for the last events rather than race them.
    await waitFor("every metering event", () => (local.stack.store!.all().length >= TOTAL ? true : undefined));
    const events = local.stack.store!.all();
    expect(events).to.have.length(TOTAL);
    expect(new Set(events.map((e) => e.transaction_id)).size).to.equal(TOTAL);
    const fromEvents: typeof expected = {};
    const costFromEvents: Record<string, number | null> = {};
    for (const event of events) {
      const sum = (fromEvents[event.user_id!] ??= { requests: 0, prompt: 0, completion: 0 });
      sum.requests += 1;
      sum.prompt += event.metadata!.prompt_tokens as number;
      sum.completion += event.metadata!.completion_tokens as number;
      expect(event.metadata!.total_tokens).to.equal((event.metadata!.prompt_tokens as number) + (event.metadata!.completion_tokens as number));
      expect(event.metadata!.billed).to.equal(true);
      const cost = event.metadata!.cost_micros as number | null;
      costFromEvents[event.user_id!] = cost === null ? (costFromEvents[event.user_id!] ?? null) : (costFromEvents[event.user_id!] ?? 0) + cost;
    }
    expect(fromEvents).to.deep.equal(expected);

    const report = await usageReport(local.projectDir);
    const fromReport = Object.fromEntries(report.map((r) => [r.customer, { requests: r.requests, prompt: r.prompt_tokens, completion: r.completion_tokens }]));
    expect(fromReport).to.deep.equal(expected);
    // The report sums what each event was billed, to the micro-unit.
    expect(Object.fromEntries(report.map((r) => [r.customer, r.cost_micros]))).to.deep.equal(costFromEvents);
  });

  it("meters every request exactly once across a collector outage, once the collector recovers", async () => {
    const OUTAGE_REQUESTS = 300;
    const collector = local.stack.collector!;
    const before = new Set(local.stack.store!.all().map((e) => e.transaction_id));
    const payloadsBefore = collector.rawPayloads.length + collector.rawPayloadsDropped;
    collector.mode = "error";
    const send = async (i: number) => {
      const response = await fetch(`${local.stack.baseUrl}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", "x-api-key": local.stack.apiKeys.pro },
        body: JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: `outage ${i}` }] }),
      });
      expect(response.status).to.equal(200);
      return response.headers.get("x-request-id");
    };
    let next = 0;
    const ids: Array<string | null> = [];
    await Promise.all(Array.from({ length: 30 }, async () => {
      while (next < OUTAGE_REQUESTS) ids.push(await send(next++));
    }));
    expect(local.stack.store!.all().length).to.equal(before.size);

    collector.mode = "ok";
    // The meter waits out its back-off (2 s after the first failure), then each request carries up to 99 deferred
    // events along with its own.
    let extra = 0;
    for (let i = 0; i < 100 && local.stack.store!.all().length < before.size + OUTAGE_REQUESTS + extra; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      const id = await send(OUTAGE_REQUESTS + extra++);
      // Its own event goes out after its answer (the deferred ones with it): wait for it, unless the meter is still
      // backing off and keeps it for later.
      await waitFor("the request's event", () => (local.stack.store!.all().some((e) => e.metadata?.request_id === id) ? true : undefined), 1000).catch(() => undefined);
    }

    // The last request's own event follows its answer: wait for it rather than race it.
    await waitFor("the last request's event", () => (local.stack.store!.all().length >= before.size + OUTAGE_REQUESTS + extra ? true : undefined)).catch(() => undefined);
    const added = local.stack.store!.all().filter((e) => !before.has(e.transaction_id));
    expect(added).to.have.length(OUTAGE_REQUESTS + extra);
    expect(ids.filter((id) => id)).to.have.length(OUTAGE_REQUESTS);
    // Exactly once on the wire too, not only after the store's de-duplication.
    const arrivals = collector.rawPayloads.slice(payloadsBefore - collector.rawPayloadsDropped).flatMap((p) => {
      const parsed = JSON.parse(p) as { transaction_id: string } | Array<{ transaction_id: string }>;
      return (Array.isArray(parsed) ? parsed : [parsed]).map((e) => e.transaction_id);
    });
    expect(arrivals).to.have.length(new Set(arrivals).size);
    expect(new Set(arrivals)).to.deep.equal(new Set(added.map((e) => e.transaction_id)));
  });
});

/** `npm run usage -- --json` for a project directory, as a user runs it. */
async function usageReport(projectDir: string): Promise<Array<{ customer: string; requests: number; prompt_tokens: number; completion_tokens: number; cost_micros: number | null }>> {
  const { stdout } = await run(process.execPath, [path.join(ROOT, "node_modules/ts-node/dist/bin.js"), "--transpile-only", path.join(ROOT, "scripts/usage.ts"), "--json", "--stack", "test", "--project-dir", projectDir], { cwd: ROOT });
  return JSON.parse(stdout) as Awaited<ReturnType<typeof usageReport>>;
}
