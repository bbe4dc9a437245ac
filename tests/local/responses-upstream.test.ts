import { createOpenAI } from "@ai-sdk/openai";
import { generateText, jsonSchema, streamText, tool } from "ai";
import { expect } from "chai";
import OpenAI from "openai";
import { countTokens, encodingForModel } from "../../functions/ai-chat/usage";
import { DEFAULT_EMBEDDING_DIMENSIONS, UpstreamServer } from "../../scripts/local/upstream-server";
import { rawRequest } from "../helpers/local-project";

const KEY = "model-server-key";

/** The Responses API's event sequence for one text answer of `words` words, as OpenAI streams it. */
function textEventTypes(words: number, last = "response.completed"): string[] {
  return [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    ...Array.from({ length: words }, () => "response.output_text.delta"),
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    last,
  ];
}

describe("the built-in model server's Responses API, embeddings and model routes (read by the official SDK and the Vercel AI SDK)", () => {
  let server: UpstreamServer;
  const sdk = () => new OpenAI({ baseURL: server.url, apiKey: KEY, maxRetries: 0 });
  const vercel = () => createOpenAI({ baseURL: server.url, apiKey: KEY });
  const tokens = (text: string, model = "gpt-4o-mini") => countTokens(text, encodingForModel(model));
  /** The request log's lines for the routes below /v1, e.g. "GET /v1/responses/resp_mock_1". */
  const asked = () => server.received.map((r) => `${r.method} ${r.url}`);

  before(async () => {
    server = await new UpstreamServer({ apiKey: KEY }).start();
  });
  after(() => server.stop());

  describe("POST /responses with the openai SDK", () => {
    it("answers a completed Response whose text echoes the input and whose usage the tokenizer counts", async () => {
      const response = await sdk().responses.create({ model: "gpt-4o-mini", input: "Hi there" });
      expect(response.id).to.match(/^resp_mock_[0-9a-f]{8}_\d+$/);
      expect(response.object).to.equal("response");
      expect(response.status).to.equal("completed");
      expect(response.output_text).to.equal("Hello! You said: Hi there");
      const output = tokens("Hello! You said: Hi there");
      expect(response.usage).to.deep.equal({
        input_tokens: response.usage!.input_tokens,
        input_tokens_details: { cached_tokens: 0 },
        output_tokens: output,
        output_tokens_details: { reasoning_tokens: 0 },
        total_tokens: response.usage!.input_tokens + output,
      });
      expect(response.usage!.input_tokens).to.be.greaterThan(tokens("Hi there"));
    });

    it("counts instructions as input and reports them on the response", async () => {
      const plain = await sdk().responses.create({ model: "gpt-4o-mini", input: "Count me" });
      const instructed = await sdk().responses.create({ model: "gpt-4o-mini", input: "Count me", instructions: "Answer in one long sentence please" });
      expect(instructed.instructions).to.equal("Answer in one long sentence please");
      expect(instructed.usage!.input_tokens).to.be.greaterThan(plain.usage!.input_tokens + tokens("Answer in one long sentence please") - 1);
    });

    it("reports mock cached and reasoning tokens in the usage details, reasoning counted as output", async () => {
      const response = await sdk().responses.create({ model: "gpt-4o-mini", input: "Think", ...({ mock: { cached_tokens: 3, reasoning_tokens: 7 } } as object) });
      expect(response.usage!.input_tokens_details.cached_tokens).to.equal(3);
      expect(response.usage!.output_tokens_details.reasoning_tokens).to.equal(7);
      expect(response.usage!.output_tokens).to.equal(tokens("Hello! You said: Think") + 7);
    });

    it("streams OpenAI's typed events with sequence numbers and event lines, usage in response.completed equal to the plain answer's", async () => {
      const plain = await sdk().responses.create({ model: "gpt-4o-mini", input: "stream me please" });
      const stream = await sdk().responses.create({ model: "gpt-4o-mini", input: "stream me please", stream: true });
      const events: OpenAI.Responses.ResponseStreamEvent[] = [];
      for await (const event of stream) events.push(event);
      expect(events.map((e) => e.type)).to.deep.equal(textEventTypes(6));
      expect(events.map((e) => e.sequence_number)).to.deep.equal(events.map((_, i) => i));
      const deltas = events.filter((e): e is OpenAI.Responses.ResponseTextDeltaEvent => e.type === "response.output_text.delta").map((e) => e.delta);
      expect(deltas.join("")).to.equal("Hello! You said: stream me please");
      const created = events[0] as OpenAI.Responses.ResponseCreatedEvent;
      expect(created.response.status).to.equal("in_progress");
      expect(created.response.usage).to.equal(null);
      const completed = events[events.length - 1] as OpenAI.Responses.ResponseCompletedEvent;
      expect(completed.response.id).to.equal(created.response.id);
      expect(completed.response.usage).to.deep.equal(plain.usage);

      const record = server.streams.find((s) => s.id === created.response.id)!;
      expect(record).to.include({ api: "responses", said: "stream me please", finished: true, usageChunkSent: true, chunks: events.length });
      expect(record.usage).to.deep.equal({ prompt_tokens: plain.usage!.input_tokens, completion_tokens: plain.usage!.output_tokens, total_tokens: plain.usage!.total_tokens });

      // On the wire: each data line follows an `event:` line naming the same type.
      const raw = await rawRequest(`${server.url}/responses`, {
        headers: { authorization: `Bearer ${KEY}`, "content-type": "application/json" },
        body: Buffer.from(JSON.stringify({ model: "gpt-4o-mini", input: "raw", stream: true })),
      });
      const blocks = raw.body.split("\n\n").filter(Boolean);
      for (const block of blocks) {
        const [eventLine, dataLine] = block.split("\n");
        expect(eventLine).to.equal(`event: ${(JSON.parse(dataLine.slice("data: ".length)) as { type: string }).type}`);
      }
      expect(blocks).to.have.length(textEventTypes(4).length);
    });

    it("collects a streamed answer with the SDK's responses.stream helper", async () => {
      const stream = sdk().responses.stream({ model: "gpt-4o-mini", input: "helper" });
      const final = await stream.finalResponse();
      expect(final.output_text).to.equal("Hello! You said: helper");
      expect(final.status).to.equal("completed");
    });

    it("cuts the answer at max_output_tokens: status incomplete, reason max_output_tokens, response.incomplete last when streamed", async () => {
      const response = await sdk().responses.create({ model: "gpt-4o-mini", input: "long", max_output_tokens: 16, ...({ mock: { words: 50 } } as object) });
      expect(response.status).to.equal("incomplete");
      expect(response.incomplete_details).to.deep.equal({ reason: "max_output_tokens" });
      expect(response.usage!.output_tokens).to.be.at.most(16).and.greaterThan(0);
      expect(response.usage!.output_tokens).to.equal(tokens(response.output_text));
      expect(response.output_text).to.match(/^word1 word2/);

      const stream = await sdk().responses.create({ model: "gpt-4o-mini", input: "long", max_output_tokens: 16, stream: true, ...({ mock: { words: 50 } } as object) });
      const types: string[] = [];
      for await (const event of stream) types.push(event.type);
      expect(types[types.length - 1]).to.equal("response.incomplete");

      const roomy = await sdk().responses.create({ model: "gpt-4o-mini", input: "long", max_output_tokens: 4096, ...({ mock: { words: 50 } } as object) });
      expect(roomy.status).to.equal("completed");
    });

    it("calls the first function tool when tool_choice requires one, streaming its arguments", async () => {
      const tools: OpenAI.Responses.FunctionTool[] = [{ type: "function", name: "lookup", parameters: { type: "object", properties: {} }, strict: false }];
      const response = await sdk().responses.create({ model: "gpt-4o-mini", input: "find this", tools, tool_choice: "required" });
      const call = response.output[0] as OpenAI.Responses.ResponseFunctionToolCall;
      expect(call).to.include({ type: "function_call", name: "lookup" });
      expect(JSON.parse(call.arguments)).to.deep.equal({ text: "find this", words: 2 });

      const stream = await sdk().responses.create({ model: "gpt-4o-mini", input: "find this", tools, tool_choice: "required", stream: true });
      const events: OpenAI.Responses.ResponseStreamEvent[] = [];
      for await (const event of stream) events.push(event);
      const args = events.filter((e): e is OpenAI.Responses.ResponseFunctionCallArgumentsDeltaEvent => e.type === "response.function_call_arguments.delta").map((e) => e.delta);
      expect(args.join("")).to.equal(call.arguments);
      expect(events[events.length - 1].type).to.equal("response.completed");
    });
  });

  describe("stored responses with the openai SDK", () => {
    it("retrieves, lists the input items of, refuses to cancel, and deletes a stored response; then it is not found", async () => {
      const created = await sdk().responses.create({ model: "gpt-4o-mini", input: [{ role: "user", content: "first" }, { role: "user", content: "second" }] });
      const retrieved = await sdk().responses.retrieve(created.id);
      expect(retrieved.output_text).to.equal("Hello! You said: second");
      expect(retrieved.usage).to.deep.equal(created.usage);

      const items: OpenAI.Responses.ResponseItem[] = [];
      for await (const item of sdk().responses.inputItems.list(created.id, { order: "asc" })) items.push(item);
      expect(items.map((i) => (i as OpenAI.Responses.ResponseInputMessageItem).content)).to.deep.equal([
        [{ type: "input_text", text: "first" }],
        [{ type: "input_text", text: "second" }],
      ]);
      const newestFirst = await sdk().responses.inputItems.list(created.id, { limit: 1 });
      expect(newestFirst.data.map((i) => i.id)).to.deep.equal([items[1].id]);
      expect(newestFirst.has_more).to.equal(true);

      const cancel = await sdk().responses.cancel(created.id).catch((err: unknown) => err);
      expect(cancel).to.be.instanceOf(OpenAI.BadRequestError);
      expect((cancel as InstanceType<typeof OpenAI.BadRequestError>).error).to.deep.equal({ message: "Cannot cancel a synchronous response.", type: "invalid_request_error", param: null, code: null });

      const deleted = await rawRequest(`${server.url}/responses/${created.id}`, { method: "DELETE", headers: { authorization: `Bearer ${KEY}` } });
      expect(JSON.parse(deleted.body)).to.deep.equal({ id: created.id, object: "response.deleted", deleted: true });
      const gone = await sdk().responses.retrieve(created.id).catch((err: unknown) => err);
      expect(gone).to.be.instanceOf(OpenAI.NotFoundError);
      expect((gone as InstanceType<typeof OpenAI.NotFoundError>).error).to.deep.equal({ message: `Response with id '${created.id}' not found.`, type: "invalid_request_error", param: null, code: null });
      // The SDK's delete of an unknown id is the same 404.
      expect(await sdk().responses.delete(created.id).catch((err: unknown) => err)).to.be.instanceOf(OpenAI.NotFoundError);
    });

    it("resolves the SDK's own delete call on a stored response", async () => {
      const created = await sdk().responses.create({ model: "gpt-4o-mini", input: "delete me" });
      await sdk().responses.delete(created.id);
      expect(server.responses.has(created.id)).to.equal(false);
    });

    it("counts a previous response's input and output as input, refuses an unknown one, and keeps store:false responses out", async () => {
      const first = await sdk().responses.create({ model: "gpt-4o-mini", input: "one" });
      const alone = await sdk().responses.create({ model: "gpt-4o-mini", input: "two" });
      const second = await sdk().responses.create({ model: "gpt-4o-mini", input: "two", previous_response_id: first.id });
      expect(second.previous_response_id).to.equal(first.id);
      expect(second.usage!.input_tokens).to.equal(alone.usage!.input_tokens + first.usage!.total_tokens);

      const unknown = await sdk().responses.create({ model: "gpt-4o-mini", input: "x", previous_response_id: "resp_nobody" }).catch((err: unknown) => err);
      expect(unknown).to.be.instanceOf(OpenAI.BadRequestError);
      expect((unknown as InstanceType<typeof OpenAI.BadRequestError>).error).to.deep.equal({
        message: "Previous response with id 'resp_nobody' not found.",
        type: "invalid_request_error",
        param: "previous_response_id",
        code: "previous_response_not_found",
      });

      const unstored = await sdk().responses.create({ model: "gpt-4o-mini", input: "ephemeral", store: false });
      expect((unstored as unknown as { store: boolean }).store).to.equal(false);
      expect(server.responses.has(unstored.id)).to.equal(false);
      expect(await sdk().responses.retrieve(unstored.id).catch((err: unknown) => err)).to.be.instanceOf(OpenAI.NotFoundError);
      expect(await sdk().responses.create({ model: "gpt-4o-mini", input: "y", previous_response_id: unstored.id }).catch((err: unknown) => err)).to.be.instanceOf(OpenAI.BadRequestError);
    });

    it("decodes a percent-encoded id and logs every request it was asked", async () => {
      const before = server.received.length;
      const answer = await rawRequest(`${server.url}/responses/${encodeURIComponent("resp/../odd id")}`, { method: "GET", headers: { authorization: `Bearer ${KEY}` } });
      expect(answer.status).to.equal(404);
      expect(JSON.parse(answer.body).error.message).to.equal("Response with id 'resp/../odd id' not found.");
      expect(asked().slice(before)).to.deep.equal([`GET /v1/responses/${encodeURIComponent("resp/../odd id")}`]);
    });
  });

  describe("mock directives on /responses", () => {
    it("answers a directed error status with Retry-After, and raw bodies, as chat does", async () => {
      const failed = await sdk().responses.create({ model: "gpt-4o-mini", input: "x", ...({ mock: { status: 503, retry_after: "7" } } as object) }).catch((err: unknown) => err);
      expect(failed).to.be.instanceOf(OpenAI.InternalServerError);
      expect((failed as InstanceType<typeof OpenAI.APIError>).status).to.equal(503);
      expect((failed as InstanceType<typeof OpenAI.APIError>).headers?.get("retry-after")).to.equal("7");
      const raw = await rawRequest(`${server.url}/responses`, {
        headers: { authorization: `Bearer ${KEY}` },
        body: Buffer.from(JSON.stringify({ model: "gpt-4o-mini", input: "x", mock: { raw: "not json", status: 200 } })),
      });
      expect(raw.body).to.equal("not json");
    });

    it("leaves usage out with omit_usage, plain and streamed", async () => {
      const plain = await sdk().responses.create({ model: "gpt-4o-mini", input: "x", ...({ mock: { omit_usage: true } } as object) });
      expect(plain.usage).to.equal(undefined);
      const stream = await sdk().responses.create({ model: "gpt-4o-mini", input: "omitted usage", stream: true, ...({ mock: { omit_usage: true } } as object) });
      const events: OpenAI.Responses.ResponseStreamEvent[] = [];
      for await (const event of stream) events.push(event);
      expect((events[events.length - 1] as OpenAI.Responses.ResponseCompletedEvent).response.usage).to.equal(undefined);
      expect(server.streams.find((s) => s.said === "omitted usage")!.usageChunkSent).to.equal(false);
    });

    it("resets the connection after fail_after_chunks events, recording what it sent", async () => {
      const stream = await sdk().responses.create({ model: "gpt-4o-mini", input: "cut short", stream: true, ...({ mock: { words: 20, fail_after_chunks: 6 } } as object) });
      const types: string[] = [];
      const error = await (async () => {
        for await (const event of stream) types.push(event.type);
      })().catch((err: unknown) => err);
      expect(error).to.be.instanceOf(Error);
      expect(types).to.deep.equal(textEventTypes(20).slice(0, 6));
      const record = server.streams.find((s) => s.said === "cut short")!;
      expect(record).to.include({ reset: true, finished: false, chunks: 6, content: "word1 word2" });
      expect(record.completionTokensSent).to.equal(tokens("word1 word2"));
    });

    it("sends garbage after garbage_after_chunks events, then carries on", async () => {
      const raw = await rawRequest(`${server.url}/responses`, {
        headers: { authorization: `Bearer ${KEY}` },
        body: Buffer.from(JSON.stringify({ model: "gpt-4o-mini", input: "garbage", stream: true, mock: { garbage_after_chunks: 2 } })),
      });
      const blocks = raw.body.split("\n\n").filter(Boolean);
      expect(blocks[2]).to.equal("data: not-json");
      expect(blocks[blocks.length - 1]).to.match(/^event: response\.completed\n/);
    });
  });

  describe("POST /embeddings with the openai SDK", () => {
    it("answers unit vectors of the requested dimensions, the same for float and the SDK's default base64", async () => {
      const float = await sdk().embeddings.create({ model: "text-embedding-3-small", input: ["alpha beta", "gamma"], encoding_format: "float" });
      const base64 = await sdk().embeddings.create({ model: "text-embedding-3-small", input: ["alpha beta", "gamma"] });
      expect(server.received[server.received.length - 1].body).to.include('"encoding_format":"base64"');
      expect(float.data.map((d) => d.index)).to.deep.equal([0, 1]);
      expect(float.data[0].embedding).to.have.length(DEFAULT_EMBEDDING_DIMENSIONS);
      expect(base64.data.map((d) => Array.from(d.embedding))).to.deep.equal(float.data.map((d) => d.embedding));
      const norm = Math.sqrt(float.data[0].embedding.reduce((sum, v) => sum + v * v, 0));
      expect(norm).to.be.closeTo(1, 1e-6);
      expect(float.data[0].embedding).to.not.deep.equal(float.data[1].embedding);
      const expected = tokens("alpha beta", "text-embedding-3-small") + tokens("gamma", "text-embedding-3-small");
      expect(float.usage).to.deep.equal({ prompt_tokens: expected, total_tokens: expected });
      expect(float.model).to.equal("text-embedding-3-small");
    });

    it("honours dimensions, counts token-array inputs by their length and refuses invalid input with OpenAI's 400", async () => {
      const wide = await sdk().embeddings.create({ model: "text-embedding-3-small", input: "x", dimensions: 64, encoding_format: "float" });
      expect(wide.data[0].embedding).to.have.length(64);
      const tokenArrays = await sdk().embeddings.create({ model: "text-embedding-3-small", input: [[1, 2, 3], [4, 5]], encoding_format: "float" });
      expect(tokenArrays.usage.prompt_tokens).to.equal(5);
      const refused = await sdk().embeddings.create({ model: "text-embedding-3-small", input: [] as string[] }).catch((err: unknown) => err);
      expect(refused).to.be.instanceOf(OpenAI.BadRequestError);
      expect((refused as InstanceType<typeof OpenAI.BadRequestError>).error).to.include({ param: "input", type: "invalid_request_error" });
    });
  });

  describe("GET /models/{model} with the openai SDK", () => {
    it("answers a model it serves and OpenAI's 404 model_not_found for another", async () => {
      expect(await sdk().models.retrieve("gpt-4o-mini")).to.deep.equal({ id: "gpt-4o-mini", object: "model", created: 1700000000, owned_by: "mock" });
      const missing = await sdk().models.retrieve("no-such-model").catch((err: unknown) => err);
      expect(missing).to.be.instanceOf(OpenAI.NotFoundError);
      expect((missing as InstanceType<typeof OpenAI.NotFoundError>).error).to.deep.equal({ message: "The model 'no-such-model' does not exist", type: "invalid_request_error", param: "model", code: "model_not_found" });
    });
  });

  describe("the Vercel AI SDK's default OpenAI provider (Responses API)", () => {
    it("generateText reads the text, the usage and the response id", async () => {
      const result = await generateText({ model: vercel()("gpt-4o-mini"), prompt: "Hello from Vercel" });
      expect(result.text).to.equal("Hello! You said: Hello from Vercel");
      expect(result.finishReason).to.equal("stop");
      const stored = server.responses.get(result.response.id)!;
      const usage = stored.response.usage as { input_tokens: number; output_tokens: number };
      expect(result.usage.inputTokens).to.equal(usage.input_tokens);
      expect(result.usage.outputTokens).to.equal(usage.output_tokens);
      expect(asked()).to.include("POST /v1/responses");
    });

    it("streamText streams the words without an error part and reports the stream's usage", async () => {
      const result = streamText({ model: vercel()("gpt-4o-mini"), prompt: "streamed via Vercel", maxRetries: 0 });
      const parts: Array<{ type: string }> = [];
      for await (const part of result.fullStream) parts.push(part);
      expect(parts.filter((p) => p.type === "error")).to.deep.equal([]);
      expect(await result.text).to.equal("Hello! You said: streamed via Vercel");
      const record = server.streams.find((s) => s.said === "streamed via Vercel")!;
      const usage = await result.usage;
      expect(usage.inputTokens).to.equal(record.usage.prompt_tokens);
      expect(usage.outputTokens).to.equal(record.usage.completion_tokens);
      expect(await result.finishReason).to.equal("stop");
    });

    it("reports an answer cut at max_output_tokens as finish reason length, and reads a tool call", async () => {
      // The provider sends only what it knows: a fetch wrapper adds the mock directive to the body.
      const withMock = (mock: Record<string, unknown>): typeof fetch => (input, init) =>
        fetch(input, { ...init, body: JSON.stringify({ ...(JSON.parse(String(init?.body)) as object), mock }) });
      const long = createOpenAI({ baseURL: server.url, apiKey: KEY, fetch: withMock({ words: 50 }) });
      const cut = await generateText({ model: long("gpt-4o-mini"), prompt: "long", maxOutputTokens: 16, maxRetries: 0 });
      expect(cut.finishReason).to.equal("length");
      expect(cut.text).to.match(/^word1 word2 /);
      expect(server.received[server.received.length - 1].body).to.include('"max_output_tokens":16');
      const called = await generateText({
        model: vercel()("gpt-4o-mini"),
        prompt: "call the tool",
        tools: { lookup: tool({ description: "looks up", inputSchema: jsonSchema<{ text: string; words: number }>({ type: "object", properties: { text: { type: "string" }, words: { type: "number" } } }) }) },
        toolChoice: "required",
      });
      expect(called.toolCalls.map((c) => [c.toolName, c.input])).to.deep.equal([["lookup", { text: "call the tool", words: 3 }]]);
    });
  });
});
