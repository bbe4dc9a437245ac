/**
 * Fixes for the issue-13 review (/work/review-13/findings.md): refused paid built-in tools (R13-2), refused ids of
 * stored objects in the shared OpenAI project (R13-4), refused costlier service tiers (R13-6), the embeddings usage
 * plausibility bound (R13-5), the prepaid "unknowable input" predicate (R13-3) and the per-item split-secret guard
 * (R13-7).
 */
import { expect } from "chai";
import { PassThrough } from "node:stream";
import { ApiError, BadRequestError } from "../../functions/ai-chat/errors";
import { SplitSecretGuard, StreamText } from "../../functions/ai-chat/chat-stream";
import { isPlausibleEmbeddingsUsage, parseEmbeddingsRequest, type EmbeddingsRequest } from "../../functions/ai-chat/embeddings";
import { estimateResponsesInputTokens, parseResponsesRequest, unknowableInput, type ResponsesRequest } from "../../functions/ai-chat/responses";
import { relayResponsesStream } from "../../functions/ai-chat/responses-stream";
import type { StreamWriter } from "../../functions/ai-chat/responder";
import { MAX_TOKEN_BYTES, TokenTally, imageTokens } from "../../functions/ai-chat/usage";
import { parseChatCompletionRequest } from "../../functions/ai-chat/validate";
import { SecretRedactor } from "../../functions/shared/secret-redactor";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const MAX = 1024 * 1024;
const MODEL = "gpt-4o-mini";

function refusal(parse: (raw: Buffer) => unknown, body: unknown): BadRequestError {
  try {
    parse(Buffer.from(JSON.stringify(body)));
  } catch (err) {
    expect(err).to.be.instanceOf(BadRequestError);
    return err as BadRequestError;
  }
  return expect.fail(`accepted ${JSON.stringify(body).slice(0, 200)}`);
}
const responses = (raw: Buffer) => parseResponsesRequest(raw, MAX, "application/json");
const chat = (raw: Buffer) => parseChatCompletionRequest(raw, MAX, "application/json");
const refusedResponses = (fields: Record<string, unknown>) => refusal(responses, { model: MODEL, input: "hi", ...fields });
const refusedChat = (fields: Record<string, unknown>) => refusal(chat, { model: MODEL, messages: [{ role: "user", content: "hi" }], ...fields });
const accepts = (parse: (raw: Buffer) => unknown, body: unknown) => expect(() => parse(Buffer.from(JSON.stringify(body)))).to.not.throw();

describe("review 13 fixes", () => {
  describe("R13-2: paid built-in tools are refused", () => {
    it("refuses every Responses tool type except function and custom, naming the tool and why", () => {
      const builtIns = [
        { type: "web_search" },
        { type: "web_search_preview" },
        { type: "file_search", vector_store_ids: ["vs_someone_elses"] },
        { type: "code_interpreter", container: "cntr_someone_elses" },
        { type: "image_generation" },
        { type: "mcp", server_label: "x", server_url: "https://attacker.example", require_approval: "never" },
        { type: "computer_use_preview", display_width: 1024, display_height: 768, environment: "browser" },
        { type: "local_shell" },
        { type: "a_built_in_added_next_month" },
      ];
      for (const tool of builtIns) {
        const err = refusedResponses({ tools: [{ type: "function", name: "f", parameters: {} }, tool], max_tool_calls: 1000 });
        expect(err.param, tool.type).to.equal("tools[1].type");
        expect(err.code).to.equal("unsupported_parameter");
        expect(err.type).to.equal("invalid_request_error");
        expect(err.message).to.include(tool.type).and.include("billed per call");
      }
      expect(refusedResponses({ tools: [{ name: "no type" }] }).param).to.equal("tools[0].type");
    });

    it("accepts function and custom tools with max_tool_calls", () => {
      accepts(responses, {
        model: MODEL,
        input: "hi",
        tools: [{ type: "function", name: "f", parameters: {} }, { type: "custom", name: "c" }],
        tool_choice: { type: "allowed_tools", mode: "auto", tools: [{ type: "function", name: "f" }] },
        max_tool_calls: 3,
      });
      accepts(responses, { model: MODEL, input: "hi", tool_choice: "required" });
      accepts(responses, { model: MODEL, input: "hi", tool_choice: { type: "custom", name: "c" } });
    });

    it("refuses a tool_choice naming a built-in, directly or among allowed_tools", () => {
      for (const choice of [{ type: "web_search_preview" }, { type: "mcp", server_label: "x" }, { type: "allowed_tools", mode: "auto", tools: [{ type: "function", name: "f" }, { type: "image_generation" }] }]) {
        const err = refusedResponses({ tool_choice: choice });
        expect(err.param).to.equal("tool_choice");
        expect(err.code).to.equal("unsupported_parameter");
      }
    });

    it("refuses web_search_options on chat completions (search models bill per call)", () => {
      const err = refusedChat({ web_search_options: {} });
      expect(err).to.deep.include({ param: "web_search_options", code: "unsupported_parameter" });
      expect(err.message).to.include("billed per call");
      accepts(chat, { model: MODEL, messages: [{ role: "user", content: "hi" }], web_search_options: null });
    });
  });

  describe("R13-4: ids of stored objects in the shared project are refused", () => {
    it("refuses item_reference items, also written without a type", () => {
      const message = { role: "user", content: "hi" };
      let err = refusedResponses({ input: [message, message, message, { type: "item_reference", id: "msg_alices" }] });
      expect(err).to.deep.include({ param: "input[3]", code: "unsupported_parameter" });
      expect(err.message).to.include("shared OpenAI project");
      err = refusedResponses({ input: [{ id: "msg_alices" }] });
      expect(err.param).to.equal("input[0]");
    });

    it("refuses file_id on input_file and input_image parts, on tool outputs and on screenshots", () => {
      const cases: Array<[unknown, string]> = [
        [{ role: "user", content: [{ type: "input_text", text: "read" }, { type: "input_file", file_id: "file-abc" }] }, "input[0].content[1].file_id"],
        [{ role: "user", content: [{ type: "input_image", file_id: "file-abc", detail: "auto" }] }, "input[0].content[0].file_id"],
        [{ type: "function_call_output", call_id: "c", output: [{ type: "input_file", file_id: "file-abc" }] }, "input[0].output[0].file_id"],
        [{ type: "computer_call_output", call_id: "c", output: { type: "computer_screenshot", file_id: "file-abc" } }, "input[0].output.file_id"],
      ];
      for (const [item, param] of cases) {
        const err = refusedResponses({ input: [item] });
        expect(err).to.deep.include({ param, code: "unsupported_parameter" });
      }
      accepts(responses, { model: MODEL, input: [{ role: "user", content: [{ type: "input_image", image_url: "https://example.com/a.png", file_id: null }] }] });
    });

    it("refuses a stored prompt template", () => {
      const err = refusedResponses({ prompt: { id: "pmpt_operator", variables: { x: "y" } } });
      expect(err).to.deep.include({ param: "prompt", code: "unsupported_parameter" });
    });

    it("refuses chat file parts by file_id, accepting inline file data", () => {
      const messages = [{ role: "user", content: [{ type: "text", text: "read" }, { type: "file", file: { file_id: "file-abc" } }] }];
      expect(refusedChat({ messages })).to.deep.include({ param: "messages[0].content[1].file.file_id", code: "unsupported_parameter" });
      accepts(chat, { model: MODEL, messages: [{ role: "user", content: [{ type: "file", file: { filename: "a.pdf", file_data: "data:application/pdf;base64,JVBERi0=" } }] }] });
    });
  });

  describe("R13-6: service tiers that cost more per token are refused", () => {
    it("accepts auto, default, flex and null on both routes, refuses priority, scale and others", () => {
      for (const tier of ["auto", "default", "flex", null]) {
        accepts(responses, { model: MODEL, input: "hi", service_tier: tier });
        accepts(chat, { model: MODEL, messages: [{ role: "user", content: "hi" }], service_tier: tier });
      }
      for (const tier of ["priority", "scale", "PRIORITY", 1]) {
        expect(refusedResponses({ service_tier: tier }).param).to.equal("service_tier");
        const err = refusedChat({ service_tier: tier });
        expect(err.param).to.equal("service_tier");
        expect(err.message).to.include("priority");
      }
    });
  });

  describe("R13-5: embeddings usage plausibility", () => {
    const request = (input: EmbeddingsRequest["input"]) => parseEmbeddingsRequest(Buffer.from(JSON.stringify({ model: "text-embedding-3-small", input })), MAX, undefined).request;
    const usage = (prompt: number) => ({ prompt_tokens: prompt, completion_tokens: 0, total_tokens: prompt });

    it("does not believe 1 token for 2048 long inputs, nor fewer tokens than inputs or token ids", () => {
      const many = request(Array.from({ length: 2048 }, (_, i) => `${i} `.padEnd(500, "x")));
      expect(isPlausibleEmbeddingsUsage(usage(1), many)).to.equal(false);
      expect(isPlausibleEmbeddingsUsage(usage(2047), many)).to.equal(false);
      const bytes = 2048 * 500;
      expect(isPlausibleEmbeddingsUsage(usage(Math.ceil(bytes / MAX_TOKEN_BYTES)), many)).to.equal(true);
      const long = request("y".repeat(10 * MAX_TOKEN_BYTES));
      expect(isPlausibleEmbeddingsUsage(usage(9), long)).to.equal(false);
      expect(isPlausibleEmbeddingsUsage(usage(10), long)).to.equal(true);
      expect(isPlausibleEmbeddingsUsage(usage(4), request([1, 2, 3, 4, 5]))).to.equal(false);
      expect(isPlausibleEmbeddingsUsage(usage(5), request([1, 2, 3, 4, 5]))).to.equal(true);
      expect(isPlausibleEmbeddingsUsage(usage(5), request([[1, 2, 3], [4, 5, 6]]))).to.equal(false);
      expect(isPlausibleEmbeddingsUsage(usage(6), request([[1, 2, 3], [4, 5, 6]]))).to.equal(true);
    });

    it("believes a real count for short text", () => {
      expect(isPlausibleEmbeddingsUsage(usage(2), request("hello world"))).to.equal(true);
      expect(isPlausibleEmbeddingsUsage(usage(2), request(["hello", "world"]))).to.equal(true);
    });
  });

  describe("R13-3: inputs whose size the tokenizer cannot know", () => {
    const parsed = (input: unknown): ResponsesRequest => responses(Buffer.from(JSON.stringify({ model: MODEL, input }))).request;

    it("names an input_file by file_url, in a message or a tool output", () => {
      const pdf = { type: "input_file", file_url: "https://example.com/300-pages.pdf" };
      expect(unknowableInput(parsed([{ role: "user", content: "x" }, { role: "user", content: [{ type: "input_text", text: "read" }, pdf] }]))).to.equal("input[1].content[1].file_url");
      expect(unknowableInput(parsed([{ type: "function_call_output", call_id: "c", output: [pdf] }]))).to.equal("input[0].output[0].file_url");
    });

    it("names nothing for text, inline files and images", () => {
      expect(unknowableInput(parsed("hello"))).to.equal(undefined);
      const inline = { type: "input_file", filename: "a.pdf", file_data: "data:application/pdf;base64,JVBERi0=" };
      const image = { type: "input_image", image_url: "https://example.com/a.png", detail: "auto" };
      expect(unknowableInput(parsed([{ role: "user", content: [{ type: "input_text", text: "hi" }, inline, image] }]))).to.equal(undefined);
    });

    it("counts a computer screenshot by URL as the largest image, not as the URL's text", () => {
      const request = parsed([{ type: "computer_call_output", call_id: "c", output: { type: "computer_screenshot", image_url: "https://example.com/s.png" } }]);
      expect(estimateResponsesInputTokens(request, MODEL)).to.be.at.least(imageTokens({ url: "https://example.com/s.png" }, MODEL));
    });
  });

  describe("R13-7: a secret split across deltas of one item, with another item's delta between them", () => {
    const SECRET = "sk-test-review13-split-secret-0123456789";
    registerSecret(SECRET);
    const half = Math.floor(SECRET.length / 2);

    it("is held and refused per text key by the guard", () => {
      const guard = new SplitSecretGuard(new SecretRedactor([SECRET]));
      const seen = new StreamText();
      const step = (key: string, text: string) => {
        seen.beginEvent();
        seen.append(key, text);
        return guard.pass(`<${text}>`, seen.eventText, seen.eventTexts);
      };
      expect(step("0:content", SECRET.slice(0, half))).to.equal("");
      expect(step("1:content", "zz"), "held while choice 0 ends like a secret").to.equal("");
      expect(step("0:content", SECRET.slice(half))).to.equal(undefined);
    });

    it("releases the hold once the item's next text shows no secret", () => {
      const guard = new SplitSecretGuard(new SecretRedactor([SECRET]));
      const seen = new StreamText();
      const step = (key: string, text: string) => {
        seen.beginEvent();
        seen.append(key, text);
        return guard.pass(`<${text}>`, seen.eventText, seen.eventTexts);
      };
      expect(step("0", SECRET.slice(0, half))).to.equal("");
      expect(step("1", "zz")).to.equal("");
      expect(step("0", " harmless")).to.equal(`<${SECRET.slice(0, half)}><zz>< harmless>`);
    });

    it("never lets a responses stream reassemble the key in one item", async () => {
      const event = (type: string, sequence: number, fields: Record<string, unknown>) => `event: ${type}\ndata: ${JSON.stringify({ type, sequence_number: sequence, ...fields })}\n\n`;
      const delta = (index: number, text: string, sequence: number) =>
        event("response.output_text.delta", sequence, { item_id: `msg_${index}`, output_index: index, content_index: 0, delta: text });
      const upstream = new PassThrough();
      let written = "";
      const writer: StreamWriter = { write: async (text) => void (written += text), end: async () => undefined };
      const relay = relayResponsesStream({
        upstream,
        redactor: new SecretRedactor([SECRET]),
        start: () => writer,
        clientGone: new AbortController().signal,
        idleTimeoutMs: 2000,
        clock: Date.now,
        estimateInput: () => 5,
        newTally: () => new TokenTally("o200k_base"),
      });
      upstream.end(
        event("response.created", 0, { response: { id: "resp_1", object: "response", status: "in_progress" } }) +
          delta(0, SECRET.slice(0, half), 1) +
          delta(1, "zz", 2) +
          delta(0, SECRET.slice(half), 3) +
          event("response.completed", 4, { response: { id: "resp_1", object: "response", status: "completed", usage: { input_tokens: 5, output_tokens: 9, total_tokens: 14 } } }),
      );
      const outcome = await relay;
      recordForScan("review-13 split secret", [written, outcome.content]);
      const perItem: Record<string, string> = {};
      for (const line of written.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = JSON.parse(line.slice(6)) as { output_index?: number; delta?: string };
        if (typeof data.delta === "string") perItem[String(data.output_index)] = (perItem[String(data.output_index)] ?? "") + data.delta;
      }
      expect(perItem["0"] ?? "").to.not.include(SECRET.slice(0, half));
      expect(outcome.streamError).to.equal("upstream_echoed_secret");
    });
  });
});

// Keeps ApiError referenced for readers comparing with the other parse tests.
void ApiError;
