import { expect } from "chai";
import OpenAI from "openai";
import { costOf } from "../../functions/shared/pricing";
import { useLocalStack } from "../helpers/local-project";
import { expectedCost, functionStreams, upstreamStream, waitFor } from "../local/streaming-helpers";

describe("100 streams at concurrency 25 through the local stack", function () {
  before(function () {
    expect(functionStreams(), "functions/ai-chat's handler must be a streaming handler").to.equal(true);
  });
  const local = useLocalStack("streaming-concurrency", { LOG_LEVEL: "warn" });

  it("delivers every stream whole and meters each exactly once, with the upstream's usage", async function () {
    this.timeout(60_000);
    const TOTAL = 100;
    const CONCURRENCY = 25;
    const customers = ["pro", "pro2", "starter"];
    const runs: Array<{ said: string; customer: string; content: string; requestId: string }> = [];
    let next = 0;
    const worker = async () => {
      while (next < TOTAL) {
        const i = next++;
        const customer = customers[i % customers.length];
        const said = `stream ${i} ${"word ".repeat(i % 13)}`.trim();
        const client = new OpenAI({ baseURL: `${local.stack.baseUrl}/v1`, apiKey: local.stack.apiKeys[customer], maxRetries: 0 });
        // Half ask for the usage chunk, half leave it to the function; answers of 10 to 49 words, paced 0-2 ms.
        const { data: stream, response } = await client.chat.completions
          .create({
            model: "gpt-4o-mini",
            messages: [{ role: "user", content: said }],
            stream: true,
            ...(i % 2 === 0 ? { stream_options: { include_usage: true } } : {}),
            ...({ mock: { words: 10 + (i % 40), chunk_delay_ms: i % 3 } } as object),
          })
          .withResponse();
        let content = "";
        for await (const chunk of stream) content += chunk.choices[0]?.delta?.content ?? "";
        runs.push({ said, customer, content, requestId: response.headers.get("x-amzn-requestid")! });
      }
    };
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    expect(runs).to.have.length(TOTAL);

    await waitFor("100 metering events", () => (local.stack.store!.all().length >= TOTAL ? true : undefined), 30_000);
    const events = local.stack.store!.all();
    expect(events).to.have.length(TOTAL);
    for (const run of runs) {
      const upstream = upstreamStream(local.stack, run.said);
      expect(run.content, run.said).to.equal(upstream.content);
      expect(upstream.finished, run.said).to.equal(true);
      const mine = events.filter((e) => e.metadata?.request_id === run.requestId);
      expect(mine, run.said).to.have.length(1);
      expect(mine[0].user_id).to.equal(run.customer);
      // EVIDENCE_STACK_YAML's gpt-4o-mini prices: starter 0.15 / 0.6, pro 0.25 / 1.0 USD per million tokens.
      const cost = run.customer === "starter" ? expectedCost(upstream.usage) : costOf(upstream.usage, { input: 250_000, output: 1_000_000 });
      expect(mine[0].metadata, run.said).to.include({ ...upstream.usage, usage_estimated: false, billed: true, cost_micros: cost });
    }
  });
});
