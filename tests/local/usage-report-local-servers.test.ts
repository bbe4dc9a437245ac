import { expect } from "chai";
import { estimateRequestTokens } from "../../functions/ai-chat/usage";
import { MoesifCollector } from "../../scripts/local/moesif-collector";
import { MAX_COUNTED_PROMPT_BYTES, UpstreamServer } from "../../scripts/local/upstream-server";

/** The local stand-ins that feed `npm run usage`: what they keep in memory while `npm start` runs for days. */
describe("local collector and model server under a long npm start", () => {
  const post = (url: string, body: unknown, headers: Record<string, string> = {}) =>
    fetch(url, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify(body) });

  it("keeps only the most recent raw payloads and request heads, while the store keeps every event", async () => {
    const collector = await new MoesifCollector({ keepRawPayloads: { count: 10, chars: 1024 * 1024 } }).start();
    try {
      for (let i = 0; i < 15; i++) expect((await post(`${collector.url}/v1/events`, { transaction_id: `tx-${i}` })).status).to.equal(201);

      expect(collector.rawPayloads).to.have.length(10);
      expect(JSON.parse(collector.rawPayloads[0]).transaction_id).to.equal("tx-5");
      expect(collector.rawPayloadsDropped).to.equal(5);
      expect(collector.requests).to.have.length(10);
      expect(collector.events()).to.have.length(15);
    } finally {
      await collector.stop();
    }
  });

  it("bounds the raw payloads it keeps by characters too", async () => {
    const collector = await new MoesifCollector({ keepRawPayloads: { count: 1000, chars: 10_000 } }).start();
    try {
      for (let i = 0; i < 5; i++) await post(`${collector.url}/v1/events`, { transaction_id: `tx-${i}`, pad: "p".repeat(4000) });
      expect(collector.rawPayloads.join("").length).to.be.at.most(10_000);
      expect(collector.rawPayloadsDropped).to.equal(3);
    } finally {
      await collector.stop();
    }
  });

  it("keeps every payload when asked to (the suite's secret scan)", async () => {
    const collector = await new MoesifCollector({ keepRawPayloads: "all" }).start();
    try {
      for (let i = 0; i < 5; i++) await post(`${collector.url}/v1/events`, { transaction_id: `tx-${i}`, pad: "p".repeat(4000) });
      expect(collector.rawPayloads).to.have.length(5);
      expect(collector.rawPayloadsDropped).to.equal(0);
    } finally {
      await collector.stop();
    }
  });

  it("keeps only the most recent requests the model server received, bodies cut at 64 KiB", async () => {
    const upstream = await new UpstreamServer({ keepReceived: 3 }).start();
    try {
      for (let i = 0; i < 5; i++) {
        const body = { model: "gpt-4o-mini", messages: [{ role: "user", content: `${i} ${"z".repeat(100_000)}` }] };
        expect((await post(`${upstream.url}/chat/completions`, body)).status).to.equal(200);
      }
      expect(upstream.received).to.have.length(3);
      expect(upstream.received[0].body).to.have.length(64 * 1024);
      expect(upstream.received[0].body).to.include('"content":"2 ');
    } finally {
      await upstream.stop();
    }
  });

  it("reports a prompt far over the exactly counted size with the function's bounded estimator, never below its exact count", async () => {
    const upstream = await new UpstreamServer().start();
    try {
      for (const content of ["a".repeat(1024 * 1024), "The quick brown fox jumps over the lazy dog. ".repeat(24_000)]) {
        const messages = [{ role: "user", content }];

        const response = await post(`${upstream.url}/chat/completions`, { model: "gpt-4o-mini", messages });
        const { usage } = (await response.json()) as { usage: { prompt_tokens: number } };

        // The function's own estimate, whose budget (megabytes) counts all of this exactly.
        const exact = estimateRequestTokens({ messages }, "gpt-4o-mini");
        expect(usage.prompt_tokens).to.be.at.least(exact);
        expect(usage.prompt_tokens).to.be.at.most(exact * 2 + 10);
      }
    } finally {
      await upstream.stop();
    }
  });

  it("reports exactly the function's estimate for a prompt within the exactly counted size", async () => {
    const upstream = await new UpstreamServer().start();
    try {
      const messages = [{ role: "system", content: "Be terse." }, { role: "user", content: "Hello, how are you today?" }];
      const response = await post(`${upstream.url}/chat/completions`, { model: "gpt-4o-mini", messages });
      const { usage } = (await response.json()) as { usage: { prompt_tokens: number } };
      expect(usage.prompt_tokens).to.equal(estimateRequestTokens({ messages }, "gpt-4o-mini"));
    } finally {
      await upstream.stop();
    }
  });
});
