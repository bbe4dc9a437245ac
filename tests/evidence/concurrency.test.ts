import { expect } from "chai";
import { execFile } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import { useLocalStack } from "../helpers/local-project";

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, "../..");

describe("1,000 requests at concurrency 50 through the local stack", () => {
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

    const events = local.stack.store!.all();
    expect(events).to.have.length(TOTAL);
    expect(new Set(events.map((e) => e.transaction_id)).size).to.equal(TOTAL);
    const fromEvents: typeof expected = {};
    for (const event of events) {
      const sum = (fromEvents[event.user_id!] ??= { requests: 0, prompt: 0, completion: 0 });
      sum.requests += 1;
      sum.prompt += event.metadata!.prompt_tokens as number;
      sum.completion += event.metadata!.completion_tokens as number;
    }
    expect(fromEvents).to.deep.equal(expected);

    const { stdout } = await run(process.execPath, [path.join(ROOT, "node_modules/ts-node/dist/bin.js"), "--transpile-only", path.join(ROOT, "scripts/usage.ts"), "--json", "--stack", "test", "--project-dir", local.projectDir], { cwd: ROOT });
    const report = JSON.parse(stdout) as Array<{ customer: string; requests: number; prompt_tokens: number; completion_tokens: number }>;
    const fromReport = Object.fromEntries(report.map((r) => [r.customer, { requests: r.requests, prompt: r.prompt_tokens, completion: r.completion_tokens }]));
    expect(fromReport).to.deep.equal(expected);
  });
});
