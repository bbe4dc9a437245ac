import { expect } from "chai";
import OpenAI from "openai";
import { countTokens } from "../../functions/ai-chat/usage";
import { UpstreamServer } from "../../scripts/local/upstream-server";
import { waitFor } from "./streaming-helpers";

const KEY = "model-server-key";

describe("the built-in model server's streams (OpenAI's format, read by the official SDK)", () => {
  let server: UpstreamServer;
  let n = 0;
  const sdk = () => new OpenAI({ baseURL: server.url, apiKey: KEY, maxRetries: 0 });
  before(async () => {
    server = await new UpstreamServer({ apiKey: KEY }).start();
  });
  after(() => server.stop());

  async function collect(extra: Record<string, unknown>, mock: Record<string, unknown> = {}, signal?: AbortSignal) {
    const said = `model server ${++n}`;
    const stream = await sdk().chat.completions.create(
      { model: "gpt-4o-mini", messages: [{ role: "user", content: said }], stream: true, ...extra, ...({ mock } as object) },
      { signal },
    );
    const chunks: OpenAI.Chat.Completions.ChatCompletionChunk[] = [];
    let error: unknown;
    try {
      for await (const chunk of stream) chunks.push(chunk);
    } catch (err) {
      error = err;
    }
    const record = server.streams.find((s) => s.said === said)!;
    return { chunks, error, record, content: chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("") };
  }

  it("streams a role chunk, one chunk per word, a finish chunk and, when asked, the usage chunk; other chunks carry usage: null", async () => {
    const { chunks, error, record, content } = await collect({ stream_options: { include_usage: true } }, { words: 12 });
    expect(error).to.equal(undefined);
    expect(content).to.equal("word1 word2 word3 word4 word5 word6 word7 word8 word9 word10 word11 word12");
    expect(chunks[0].choices[0].delta.role).to.equal("assistant");
    expect(chunks).to.have.length(1 + 12 + 1 + 1);
    expect(chunks[13].choices[0].finish_reason).to.equal("stop");
    expect(chunks.slice(0, 14).every((c) => c.usage === null)).to.equal(true);
    const usage = chunks[14];
    expect(usage.choices).to.deep.equal([]);
    expect(usage.usage).to.deep.equal(record.usage);
    expect(record.usage.completion_tokens).to.equal(countTokens(content, "o200k_base"));
    expect(record).to.include({ chunks: 15, content, finished: true, aborted: false, usageChunkSent: true });
    expect(record.completionTokensSent).to.equal(record.usage.completion_tokens);
  });

  it("sends no usage field and no usage chunk without stream_options.include_usage", async () => {
    const { chunks, record } = await collect({}, { words: 3 });
    expect(chunks.every((c) => !("usage" in c) && c.choices.length === 1)).to.equal(true);
    expect(record.usageChunkSent).to.equal(false);
  });

  it("omits the usage chunk on mock.omit_usage even when include_usage is asked", async () => {
    const { chunks, record } = await collect({ stream_options: { include_usage: true } }, { omit_usage: true });
    expect(chunks.every((c) => c.choices.length === 1 && c.usage === null)).to.equal(true);
    expect(record).to.include({ usageChunkSent: false, finished: true });
  });

  it("streams a deterministic tool call with its JSON arguments split across chunks", async () => {
    const tools = [{ type: "function" as const, function: { name: "get_weather", parameters: { type: "object" } } }];
    const { chunks, record, content } = await collect({ tools, stream_options: { include_usage: true } }, { tool_call: true });
    const calls = chunks.flatMap((c) => c.choices[0]?.delta?.tool_calls ?? []);
    expect(calls[0]).to.deep.include({ index: 0, type: "function" });
    expect(calls[0].function?.name).to.equal("get_weather");
    expect(calls.filter((c) => c.function?.arguments).length).to.be.greaterThan(2);
    const args = calls.map((c) => c.function?.arguments ?? "").join("");
    expect(JSON.parse(args)).to.deep.equal({ text: record.said, words: 3 });
    expect(content).to.equal("");
    expect(chunks.find((c) => c.choices[0]?.finish_reason)!.choices[0].finish_reason).to.equal("tool_calls");
    expect(record.usage.completion_tokens).to.equal(countTokens("get_weather", "o200k_base") + countTokens(args, "o200k_base"));
  });

  it("calls a tool when tool_choice requires one, without a directive", async () => {
    const tools = [{ type: "function" as const, function: { name: "first" } }, { type: "function" as const, function: { name: "second" } }];
    const named = await collect({ tools, tool_choice: { type: "function", function: { name: "second" } } });
    expect(named.chunks.flatMap((c) => c.choices[0]?.delta?.tool_calls ?? [])[0].function?.name).to.equal("second");
    const required = await collect({ tools, tool_choice: "required" });
    expect(required.chunks.flatMap((c) => c.choices[0]?.delta?.tool_calls ?? [])[0].function?.name).to.equal("first");
    const plain = await collect({ tools });
    expect(plain.chunks.flatMap((c) => c.choices[0]?.delta?.tool_calls ?? [])).to.deep.equal([]);
  });

  it("resets the connection after fail_after_chunks: the client errors, the record says what was sent", async () => {
    const { chunks, error, record } = await collect({}, { words: 20, fail_after_chunks: 4 });
    expect(error).to.be.instanceOf(Error);
    expect(chunks).to.have.length(4);
    expect(record).to.include({ chunks: 4, content: "word1 word2 word3", reset: true, finished: false, aborted: false });
    expect(record.completionTokensSent).to.equal(countTokens("word1 word2 word3", "o200k_base"));
  });

  it("records a client that aborts mid-stream: aborted, and only the words it had written", async () => {
    const controller = new AbortController();
    const said = `model server ${++n}`;
    const stream = await sdk().chat.completions.create(
      { model: "gpt-4o-mini", messages: [{ role: "user", content: said }], stream: true, ...({ mock: { words: 500, chunk_delay_ms: 10 } } as object) },
      { signal: controller.signal },
    );
    let words = 0;
    await (async () => {
      for await (const chunk of stream) if (chunk.choices[0]?.delta?.content && ++words === 3) controller.abort();
    })().catch(() => undefined);
    const record = server.streams.find((s) => s.said === said)!;
    await waitFor("the server to see the abort", () => (record.aborted ? true : undefined));
    expect(record.finished).to.equal(false);
    expect(record.content.split(" ").length).to.be.within(3, 5);
    expect(record.completionTokensSent).to.be.greaterThan(0).and.lessThan(record.usage.completion_tokens);
  });

  it("goes silent after stall_after_chunks, keeping the connection open", async () => {
    const controller = new AbortController();
    const said = `model server ${++n}`;
    const stream = await sdk().chat.completions.create(
      { model: "gpt-4o-mini", messages: [{ role: "user", content: said }], stream: true, ...({ mock: { words: 10, stall_after_chunks: 3 } } as object) },
      { signal: controller.signal },
    );
    const record = server.streams.find((s) => s.said === said)!;
    await waitFor("three chunks", () => (record.chunks === 3 ? true : undefined));
    const seen: string[] = [];
    const reading = (async () => {
      for await (const chunk of stream) seen.push(chunk.choices[0]?.delta?.content ?? "");
    })().catch((err: unknown) => err);
    await waitFor("the client to read them", () => (seen.length === 3 ? true : undefined));
    expect(record).to.include({ finished: false, aborted: false });
    controller.abort();
    await reading; // the SDK ends the iteration quietly on its own abort
    await waitFor("the server to see the abort", () => (record.aborted ? true : undefined));
    expect(record.chunks).to.equal(3);
  });

  it("sends `data: not-json` after garbage_after_chunks, which the SDK refuses to parse", async () => {
    const { chunks, error } = await collect({}, { garbage_after_chunks: 2 });
    expect(chunks).to.have.length(2);
    expect(error).to.be.instanceOf(SyntaxError);
  });

  it("still answers non-streamed requests as before", async () => {
    const completion = await sdk().chat.completions.create({ model: "gpt-4o-mini", messages: [{ role: "user", content: "plain" }] });
    expect(completion.choices[0].message.content).to.equal("Hello! You said: plain");
  });
});
