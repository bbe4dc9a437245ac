import { expect } from "chai";
import { execFile } from "node:child_process";
import http from "node:http";
import path from "node:path";
import { promisify } from "node:util";
import OpenAI from "openai";
import { startLocalStack, type LocalStack } from "../../scripts/local/stack";
import { rawRequest, tempProject, useLocalStack } from "../helpers/local-project";
import { recordForScan, registerSecret } from "../helpers/secret-scan";
import { eventsSince, expectedCost, functionStreams, meteredEvent, pythonSdkAvailable, upstreamStream, waitFor } from "./streaming-helpers";

/** One roomy customer; the upstream may stay silent for 1 s between chunks (the smallest allowed). */
const STREAM_STACK_YAML = `
config:
  metered-ai-api:stageName: beta
  metered-ai-api:upstreamIdleTimeoutMs: 1000
  metered-ai-api:plans:
    open:
      rateLimit: 10000
      burstLimit: 5000
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
  metered-ai-api:customers:
    open: { plan: open, stripeCustomerId: cus_open }
`;

type Mock = Record<string, unknown>;
const run = promisify(execFile);

let counter = 0;
/** A prompt no other test sends: the model server's records and the collector's events are found by it. */
const uniquePrompt = (label: string) => `${label} #${++counter} ${Date.now()}`;

describe("streaming through the local stack (real SDK clients, real servers on loopback)", function () {
  before(() => {
    expect(functionStreams(), "functions/ai-chat's handler must be a streaming handler").to.equal(true);
  });
  const local = useLocalStack("streaming", {}, STREAM_STACK_YAML);
  let stack: LocalStack;
  const client = () => new OpenAI({ baseURL: `${stack.baseUrl}/v1`, apiKey: stack.apiKeys.open, maxRetries: 0 });
  before(() => {
    stack = local.stack;
  });

  /** Streams a chat completion with the openai SDK; returns the chunks, the request id and the upstream's record. */
  async function sdkStream(label: string, extra: Record<string, unknown> = {}, mock: Mock = {}) {
    const said = uniquePrompt(label);
    const { data: stream, response } = await client()
      .chat.completions.create({ model: "gpt-4o-mini", messages: [{ role: "user", content: said }], stream: true, ...extra, ...({ mock } as object) })
      .withResponse();
    const chunks: OpenAI.Chat.Completions.ChatCompletionChunk[] = [];
    let error: unknown;
    try {
      for await (const chunk of stream) chunks.push(chunk);
    } catch (err) {
      error = err;
    }
    const requestId = response.headers.get("x-amzn-requestid")!;
    return { said, chunks, error, requestId, response, content: chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("") };
  }

  it("still answers a non-streamed request whole: Content-Length, no chunking, the same JSON as before", async () => {
    const said = uniquePrompt("buffered");
    const response = await rawRequest(`${stack.baseUrl}/v1/chat/completions`, {
      headers: { "content-type": "application/json", "x-api-key": stack.apiKeys.open },
      body: Buffer.from(JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: said }] })),
    });
    expect(response.status).to.equal(200);
    expect(response.headers["transfer-encoding"]).to.equal(undefined);
    expect(response.headers["content-length"]).to.equal(String(Buffer.byteLength(response.body)));
    expect(response.headers["content-type"]).to.match(/^application\/json/);
    const body = JSON.parse(response.body) as { object: string; choices: Array<{ message: { content: string } }> };
    expect(body.object).to.equal("chat.completion");
    expect(body.choices[0].message.content).to.equal(`Hello! You said: ${said}`);
  });

  describe("the official openai SDK", () => {
    it("streams text/event-stream with stream_options.include_usage: content and metered usage equal the upstream's", async () => {
      const run = await sdkStream("usage", { stream_options: { include_usage: true } }, { words: 40 });
      expect(run.error).to.equal(undefined);
      expect(run.response.status).to.equal(200);
      expect(run.response.headers.get("content-type")).to.match(/^text\/event-stream/);
      const upstream = upstreamStream(stack, run.said);
      expect(run.content).to.equal(upstream.content);
      expect(run.chunks.filter((c) => c.choices[0]?.delta?.content).length).to.equal(40);
      // The usage chunk reaches the client as the upstream sent it: empty choices, the upstream's counts.
      const last = run.chunks[run.chunks.length - 1];
      expect(last.choices).to.deep.equal([]);
      expect(last.usage).to.include(upstream.usage);
      const events = await meteredEvent(stack, run.requestId);
      expect(events).to.have.length(1);
      expect(events[0].metadata).to.include({ ...upstream.usage, usage_estimated: false, billed: true, cost_micros: expectedCost(upstream.usage) });
    });

    it("streams without include_usage: the client gets no usage chunk, and the function still meters the upstream's usage", async () => {
      const run = await sdkStream("no-usage", {}, { words: 25 });
      expect(run.error).to.equal(undefined);
      const upstream = upstreamStream(stack, run.said);
      expect(run.content).to.equal(upstream.content);
      expect(run.chunks.every((c) => c.choices.length > 0 && c.usage == null)).to.equal(true);
      // The function asked the upstream for usage itself, so the metered counts are the upstream's, not estimates.
      expect(upstream.usageChunkSent).to.equal(true);
      const events = await meteredEvent(stack, run.requestId);
      expect(events).to.have.length(1);
      expect(events[0].metadata).to.include({ ...upstream.usage, usage_estimated: false, billed: true });
    });

    it("works with the SDK's .stream() helper: final content and usage equal the upstream's", async () => {
      const said = uniquePrompt("helper");
      const before = stack.store!.all().length;
      const runner = client().chat.completions.stream({ model: "gpt-4o-mini", messages: [{ role: "user", content: said }], stream_options: { include_usage: true } });
      const deltas: string[] = [];
      runner.on("content", (delta) => deltas.push(delta));
      const final = await runner.finalChatCompletion();
      const upstream = upstreamStream(stack, said);
      expect(final.choices[0].message.content).to.equal(upstream.content);
      expect(deltas.join("")).to.equal(upstream.content);
      expect(final.usage).to.include(upstream.usage);
      const events = await eventsSince(stack, before);
      expect(events).to.have.length(1);
      expect(events[0].metadata).to.include({ ...upstream.usage, usage_estimated: false });
    });

    it("streams a tool call: the arguments arrive in pieces and concatenate to the upstream's; usage is metered", async () => {
      const tools = [{ type: "function" as const, function: { name: "lookup_order", description: "Finds an order", parameters: { type: "object", properties: { text: { type: "string" } } } } }];
      const run = await sdkStream("tool", { tools, stream_options: { include_usage: true } }, { tool_call: true });
      expect(run.error).to.equal(undefined);
      const upstream = upstreamStream(stack, run.said);
      const calls = run.chunks.flatMap((c) => c.choices[0]?.delta?.tool_calls ?? []);
      expect(calls[0].function?.name).to.equal("lookup_order");
      expect(calls.filter((c) => c.function?.arguments).length).to.be.greaterThan(1);
      expect(calls.map((c) => c.function?.arguments ?? "").join("")).to.equal(upstream.toolArguments);
      expect(JSON.parse(upstream.toolArguments)).to.deep.include({ text: run.said });
      expect(run.chunks.find((c) => c.choices[0]?.finish_reason)?.choices[0].finish_reason).to.equal("tool_calls");
      const events = await meteredEvent(stack, run.requestId);
      expect(events).to.have.length(1);
      expect(events[0].metadata).to.include({ ...upstream.usage, usage_estimated: false, billed: true });
    });
  });

  describe("framework clients", () => {
    it("Vercel AI SDK streamText with @ai-sdk/openai-compatible: text arrives, usage is metered", async () => {
      const { streamText } = await import("ai");
      const { createOpenAICompatible } = await import("@ai-sdk/openai-compatible");
      const provider = createOpenAICompatible({ name: "metered", baseURL: `${stack.baseUrl}/v1`, apiKey: stack.apiKeys.open, includeUsage: true });
      const said = uniquePrompt("vercel");
      const before = stack.store!.all().length;
      const result = streamText({ model: provider("gpt-4o-mini"), prompt: said, maxRetries: 0 });
      const parts: string[] = [];
      for await (const part of result.textStream) parts.push(part);
      const upstream = upstreamStream(stack, said);
      expect(parts.length).to.be.greaterThan(1);
      expect(parts.join("")).to.equal(upstream.content);
      const usage = await result.usage;
      expect({ input: usage.inputTokens, output: usage.outputTokens }).to.deep.equal({ input: upstream.usage.prompt_tokens, output: upstream.usage.completion_tokens });
      const events = await eventsSince(stack, before);
      expect(events).to.have.length(1);
      expect(events[0].metadata).to.include({ ...upstream.usage, usage_estimated: false, billed: true });
    });

    it("LangChain ChatOpenAI.stream(): text arrives, usage is metered", async () => {
      const { ChatOpenAI } = await import("@langchain/openai");
      const model = new ChatOpenAI({ model: "gpt-4o-mini", apiKey: stack.apiKeys.open, maxRetries: 0, configuration: { baseURL: `${stack.baseUrl}/v1` } });
      const said = uniquePrompt("langchain");
      const before = stack.store!.all().length;
      const texts: string[] = [];
      let usage: { input_tokens: number; output_tokens: number } | undefined;
      for await (const chunk of await model.stream(said)) {
        if (typeof chunk.content === "string") texts.push(chunk.content);
        if (chunk.usage_metadata) usage = chunk.usage_metadata;
      }
      const upstream = upstreamStream(stack, said);
      expect(texts.filter(Boolean).length).to.be.greaterThan(1);
      expect(texts.join("")).to.equal(upstream.content);
      expect(usage).to.include({ input_tokens: upstream.usage.prompt_tokens, output_tokens: upstream.usage.completion_tokens });
      const events = await eventsSince(stack, before);
      expect(events).to.have.length(1);
      expect(events[0].metadata).to.include({ ...upstream.usage, usage_estimated: false, billed: true });
    });
  });

  describe("the official Python SDK (skipped when python3 cannot import openai)", () => {
    it("streams with include_usage, and raises APIError for an upstream reset mid-stream", async function () {
      if (!pythonSdkAvailable()) {
        console.log("      skipped: python3 with the openai package is not installed (pip install openai)");
        this.skip();
      }
      this.timeout(60_000);
      const said = uniquePrompt("python");
      const { stdout } = await run("python3", [path.join(__dirname, "openai_stream_check.py")], {
        env: { ...process.env, METERED_BASE_URL: `${stack.baseUrl}/v1`, METERED_KEY: stack.apiKeys.open, PROMPT: said },
      });
      const seen = JSON.parse(stdout) as { request_id: string; content: string; chunks: number; usage: Record<string, number>; partial: string; error: { class: string; message: string } | null };
      const upstream = upstreamStream(stack, said);
      expect(seen.content).to.equal(upstream.content);
      expect(seen.chunks).to.equal(30);
      expect(seen.usage).to.deep.equal(upstream.usage);
      const events = await meteredEvent(stack, seen.request_id);
      expect(events).to.have.length(1);
      expect(events[0].metadata).to.include({ ...upstream.usage, usage_estimated: false, billed: true });
      const reset = upstreamStream(stack, `${said} reset`);
      expect(seen.partial).to.equal(reset.content);
      expect(seen.error?.class).to.equal("APIError");
    });
  });

  describe("faults", () => {
    it("a client that disconnects after 5 chunks: the upstream sees its request aborted, and billed completion tokens match what it sent (±2, > 0)", async () => {
      const said = uniquePrompt("disconnect");
      const controller = new AbortController();
      const { data: stream, response } = await client()
        .chat.completions.create(
          { model: "gpt-4o-mini", messages: [{ role: "user", content: said }], stream: true, stream_options: { include_usage: true }, ...({ mock: { words: 400, chunk_delay_ms: 20 } } as object) },
          { signal: controller.signal },
        )
        .withResponse();
      let received = 0;
      await (async () => {
        for await (const chunk of stream) {
          if (chunk.choices[0]?.delta?.content && ++received === 5) controller.abort();
        }
      })().catch((err: unknown) => expect(err).to.be.instanceOf(OpenAI.APIUserAbortError));
      const upstream = upstreamStream(stack, said);
      await waitFor("the upstream to see its request aborted", () => (upstream.aborted ? true : undefined));
      expect(upstream.finished).to.equal(false);
      const events = await meteredEvent(stack, response.headers.get("x-amzn-requestid")!);
      expect(events).to.have.length(1);
      const completion = events[0].metadata!.completion_tokens as number;
      expect(completion).to.be.greaterThan(0);
      expect(Math.abs(completion - upstream.completionTokensSent)).to.be.at.most(2);
      expect(upstream.completionTokensSent).to.be.lessThan(upstream.usage.completion_tokens);
      expect(events[0].metadata!.billed).to.equal(true);
    });

    it("a raw HTTP client that goes away after 3 chunks: the same, without an SDK in between", async () => {
      const said = uniquePrompt("raw-disconnect");
      const body = JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: said }], stream: true, mock: { words: 400, chunk_delay_ms: 20 } });
      const requestId = await new Promise<string>((resolve, reject) => {
        const req = http.request(`${stack.baseUrl}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json", "x-api-key": stack.apiKeys.open }, agent: false }, (res) => {
          let events = 0;
          res.on("data", (c: Buffer) => {
            events += c.toString("utf8").split("\n\n").length - 1;
            if (events >= 3) {
              req.destroy();
              resolve(String(res.headers["x-amzn-requestid"]));
            }
          });
        });
        req.on("error", () => undefined);
        req.on("close", () => reject(new Error("closed before 3 chunks")));
        req.end(body);
      });
      const upstream = upstreamStream(stack, said);
      await waitFor("the upstream to see its request aborted", () => (upstream.aborted ? true : undefined));
      const events = await meteredEvent(stack, requestId);
      expect(events).to.have.length(1);
      const completion = events[0].metadata!.completion_tokens as number;
      expect(completion).to.be.greaterThan(0);
      expect(Math.abs(completion - upstream.completionTokensSent)).to.be.at.most(2);
    });

    it("an upstream reset mid-stream: the client gets the words sent so far and an error, and exactly those are metered", async () => {
      const run = await sdkStream("reset", { stream_options: { include_usage: true } }, { words: 30, fail_after_chunks: 8 });
      const upstream = upstreamStream(stack, run.said);
      expect(upstream.finished).to.equal(false);
      expect(run.content).to.equal(upstream.content);
      expect(run.content.split(" ")).to.have.length(7); // role chunk + 7 words
      expect(run.error).to.be.instanceOf(OpenAI.APIError);
      const events = await meteredEvent(stack, run.requestId);
      expect(events).to.have.length(1);
      expect(events[0].metadata).to.include({ completion_tokens: upstream.completionTokensSent, usage_estimated: true });
      expect(events[0].metadata!.prompt_tokens).to.equal(upstream.usage.prompt_tokens);
    });

    it("an upstream that goes silent mid-stream: the function gives up after upstreamIdleTimeoutMs, aborts it, and meters what was sent", async () => {
      const run = await sdkStream("stall", { stream_options: { include_usage: true } }, { words: 30, stall_after_chunks: 6 });
      const upstream = upstreamStream(stack, run.said);
      expect(run.content).to.equal(upstream.content);
      expect(run.error).to.be.instanceOf(OpenAI.APIError);
      await waitFor("the upstream to see its request aborted", () => (upstream.aborted ? true : undefined));
      const events = await meteredEvent(stack, run.requestId);
      expect(events).to.have.length(1);
      expect(events[0].metadata).to.include({ completion_tokens: upstream.completionTokensSent, usage_estimated: true });
    });

    it("an upstream that sends no usage chunk: usage is estimated with the upstream's own tokenizer, so it is exact here", async () => {
      const run = await sdkStream("omit-usage", { stream_options: { include_usage: true } }, { words: 50, omit_usage: true });
      expect(run.error).to.equal(undefined);
      const upstream = upstreamStream(stack, run.said);
      expect(upstream.usageChunkSent).to.equal(false);
      expect(run.content).to.equal(upstream.content);
      const events = await meteredEvent(stack, run.requestId);
      expect(events).to.have.length(1);
      expect(events[0].metadata).to.include({ ...upstream.usage, usage_estimated: true, billed: true, cost_micros: expectedCost(upstream.usage) });
    });
  });
});

describe("UPSTREAM_BASE_URL: streaming from another OpenAI-compatible server (an Ollama-style stream)", function () {
  let project: ReturnType<typeof tempProject>;
  let stack: LocalStack;
  let server: http.Server;
  const bodies: Array<Record<string, unknown>> = [];
  const USAGE = { prompt_tokens: 11, completion_tokens: 3, total_tokens: 14 };

  before(async function () {
    expect(functionStreams(), "functions/ai-chat's handler must be a streaming handler").to.equal(true);
    // What Ollama's /v1/chat/completions streams: no usage: null on the chunks, the usage chunk only when asked.
    server = http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        const body = JSON.parse(Buffer.concat(chunks).toString("utf8")) as Record<string, unknown>;
        bodies.push(body);
        res.writeHead(200, { "Content-Type": "text/event-stream" });
        const chunk = (delta: Record<string, unknown>, finish: string | null) =>
          `data: ${JSON.stringify({ id: "chatcmpl-42", object: "chat.completion.chunk", created: 1, model: "llama3.2", system_fingerprint: "fp_ollama", choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`;
        res.write(chunk({ role: "assistant", content: "Ol" }, null));
        res.write(chunk({ role: "assistant", content: "la" }, null));
        res.write(chunk({ role: "assistant", content: "ma" }, null));
        res.write(chunk({ role: "assistant", content: "" }, "stop"));
        if ((body.stream_options as { include_usage?: boolean } | undefined)?.include_usage) {
          res.write(`data: ${JSON.stringify({ id: "chatcmpl-42", object: "chat.completion.chunk", created: 1, model: "llama3.2", choices: [], usage: USAGE })}\n\n`);
        }
        res.end("data: [DONE]\n\n");
      });
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const port = (server.address() as import("node:net").AddressInfo).port;
    project = tempProject(STREAM_STACK_YAML.replace("gpt-4o-mini: { input: 0.15, output: 0.6 }", "gpt-4o-mini: { input: 0.15, output: 0.6 }\n        llama3.2: { input: 0.15, output: 0.6 }"));
    stack = await startLocalStack({ stack: "test", projectDir: project.dir, dataDir: project.dataDir, port: 0, env: { UPSTREAM_BASE_URL: `http://127.0.0.1:${port}/v1` }, write: () => undefined, keepRawPayloads: "all" });
    registerSecret(...Object.values(stack.apiKeys));
  });
  after(async () => {
    recordForScan("streaming external collector", stack?.collector?.rawPayloads ?? []);
    await stack?.stop();
    server?.close();
    project?.remove();
  });

  it("relays its stream to the SDK and meters its usage chunk; mock directives never reach it", async () => {
    const client = new OpenAI({ baseURL: `${stack.baseUrl}/v1`, apiKey: stack.apiKeys.open, maxRetries: 0 });
    const { data: stream, response } = await client.chat.completions
      .create({ model: "llama3.2", messages: [{ role: "user", content: "Hi" }], stream: true, ...({ mock: { words: 5 } } as object) })
      .withResponse();
    let content = "";
    for await (const chunk of stream) content += chunk.choices[0]?.delta?.content ?? "";
    expect(content).to.equal("Ollama");
    expect(bodies).to.have.length(1);
    expect(bodies[0]).to.not.have.property("mock");
    const events = await meteredEvent(stack, response.headers.get("x-amzn-requestid")!);
    expect(events).to.have.length(1);
    expect(events[0].metadata).to.include({ ...USAGE, usage_estimated: false, billed: true, model: "llama3.2" });
  });
});
