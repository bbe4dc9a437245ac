import { expect } from "chai";
import { countTokens, encodingForModel, estimatePromptTokens, extractUsage } from "../../functions/ai-chat/usage";

describe("usage", () => {
  it("reads usage from a completion, filling a missing total", () => {
    expect(extractUsage({ usage: { prompt_tokens: 9, completion_tokens: 12, total_tokens: 21 } })).to.deep.equal({ prompt_tokens: 9, completion_tokens: 12, total_tokens: 21 });
    expect(extractUsage({ usage: { prompt_tokens: 2, completion_tokens: 3 } })?.total_tokens).to.equal(5);
  });

  it("treats absent or malformed usage as missing", () => {
    for (const body of [{}, { usage: null }, { usage: { prompt_tokens: -1, completion_tokens: 1 } }, { usage: { prompt_tokens: "9", completion_tokens: 1 } }, null, "x"]) {
      expect(extractUsage(body)).to.equal(undefined);
    }
  });

  it("picks OpenAI's encoding per model family", () => {
    expect(encodingForModel("gpt-4o-mini")).to.equal("o200k_base");
    expect(encodingForModel("gpt-4.1")).to.equal("o200k_base");
    expect(encodingForModel("gpt-4")).to.equal("cl100k_base");
    expect(encodingForModel("gpt-3.5-turbo")).to.equal("cl100k_base");
    expect(encodingForModel("openai/gpt-4-turbo")).to.equal("cl100k_base");
    expect(encodingForModel("llama3")).to.equal("o200k_base");
  });

  it("matches OpenAI's documented count for the cookbook example", () => {
    // OpenAI cookbook "How to count tokens with tiktoken": this conversation is 129 prompt tokens for gpt-3.5-turbo/gpt-4.
    const messages = [
      { role: "system", content: "You are a helpful, pattern-following assistant that translates corporate jargon into plain English." },
      { role: "system", name: "example_user", content: "New synergies will help drive top-line growth." },
      { role: "system", name: "example_assistant", content: "Things working well together will increase revenue." },
      { role: "system", name: "example_user", content: "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage." },
      { role: "system", name: "example_assistant", content: "Let's talk later when we're less busy about how to do better." },
      { role: "user", content: "This late pivot means we don't have time to boil the ocean for the client deliverable." },
    ];
    expect(estimatePromptTokens(messages, "gpt-4")).to.equal(129);
  });

  it("counts special-token text as plain text instead of throwing", () => {
    expect(countTokens("<|endoftext|>", "o200k_base")).to.be.greaterThan(1);
  });
});
