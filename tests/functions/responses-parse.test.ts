import { expect } from "chai";
import { ApiError, BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError } from "../../functions/ai-chat/errors";
import {
  estimateResponsesInputTokens,
  estimateResponsesUsage,
  extractResponsesUsage,
  parseResponsesRequest,
  responsesOutputTextBytes,
  type ResponsesRequest,
} from "../../functions/ai-chat/responses";
import { MAX_REPORTED_TOKENS, imageTokens } from "../../functions/ai-chat/usage";
import type { RequestFacts } from "../../functions/ai-chat/validate";

const MAX = 1024 * 1024;
const parse = (body: string | Buffer, contentType?: string, facts?: RequestFacts) =>
  parseResponsesRequest(typeof body === "string" ? Buffer.from(body) : body, MAX, contentType, facts);

function rejection(body: string | Buffer, contentType?: string): ApiError {
  try {
    parse(body, contentType);
  } catch (err) {
    expect(err).to.be.instanceOf(ApiError);
    return err as ApiError;
  }
  return expect.fail(`accepted ${String(body).slice(0, 200)}`);
}

function expectBadRequest(body: unknown, param: string | null): BadRequestError {
  const err = rejection(typeof body === "string" ? body : JSON.stringify(body));
  expect(err).to.be.instanceOf(BadRequestError);
  expect(err.param).to.equal(param);
  return err as BadRequestError;
}

describe("parseResponsesRequest", () => {
  it("accepts a string input, an item list, or no input, and keeps unknown fields and the exact text", () => {
    const text = '{"model":"gpt-4o-mini","input":"hi","x_custom":{"a":1}}';
    const parsed = parse(text, "application/json; charset=utf-8");
    expect(parsed.text).to.equal(text);
    expect(parsed.request.x_custom).to.deep.equal({ a: 1 });
    parse(JSON.stringify({ model: "m", input: [{ role: "user", content: "hi" }, { type: "message", role: "user", content: [{ type: "input_text", text: "x" }] }, { type: "function_call_output", call_id: "c", output: "42" }] }));
    parse(JSON.stringify({ model: "m", previous_response_id: "resp_1", instructions: null, store: false, stream: true, max_output_tokens: 5 }));
  });

  it("shares chat's body rules: 415 for other content types, 413 over the limit, 400 invalid_json", () => {
    expect(rejection('{"model":"m"}', "text/plain")).to.be.instanceOf(UnsupportedMediaTypeError);
    expect(() => parseResponsesRequest(Buffer.from(JSON.stringify({ model: "m", input: "x".repeat(2000) })), 1000, undefined)).to.throw(PayloadTooLargeError);
    for (const body of ["", "{", "[]", "null", '"s"']) {
      const err = expectBadRequest(body, null);
      expect(err.code).to.equal("invalid_json");
    }
  });

  it("names the field that is wrong in `param`", () => {
    expectBadRequest({ input: "x" }, "model");
    expectBadRequest({ model: "" }, "model");
    expectBadRequest({ model: "m".repeat(257) }, "model");
    expectBadRequest({ model: "m", input: 3 }, "input");
    expectBadRequest({ model: "m", input: { role: "user" } }, "input");
    expectBadRequest({ model: "m", input: ["hi"] }, "input[0]");
    expectBadRequest({ model: "m", input: [{ role: "user", content: "a" }, { role: "user", content: 5 }] }, "input[1].content");
    expectBadRequest({ model: "m", input: [{ role: "user", content: [{ text: "no type" }] }] }, "input[0].content");
    expectBadRequest({ model: "m", input: [{ type: 7 }] }, "input[0].type");
    expectBadRequest({ model: "m", instructions: 3 }, "instructions");
    expectBadRequest({ model: "m", stream: "yes" }, "stream");
    expectBadRequest({ model: "m", store: 1 }, "store");
    expectBadRequest({ model: "m", max_output_tokens: 0 }, "max_output_tokens");
    expectBadRequest({ model: "m", max_output_tokens: 1.5 }, "max_output_tokens");
    expectBadRequest({ model: "m", previous_response_id: 123 }, "previous_response_id");
    expectBadRequest({ model: "m", previous_response_id: { id: "resp_1" } }, "previous_response_id");
    expectBadRequest({ model: "m", tools: {} }, "tools");
    expectBadRequest({ model: "m", stream_options: { include_obfuscation: false } }, "stream_options");
  });

  it("refuses background responses and conversations, naming the parameter", () => {
    expectBadRequest({ model: "m", input: "x", background: true }, "background");
    expectBadRequest({ model: "m", input: "x", background: "yes" }, "background");
    expectBadRequest({ model: "m", input: "x", conversation: "conv_123" }, "conversation");
    expectBadRequest({ model: "m", input: "x", conversation: { id: "conv_123" } }, "conversation");
    parse(JSON.stringify({ model: "m", input: "x", background: false, conversation: null }));
  });

  it("reports the model as soon as the body parses, even when a later check fails", () => {
    const facts: RequestFacts = {};
    expect(() => parse(JSON.stringify({ model: "gpt-4o", background: true }), undefined, facts)).to.throw(BadRequestError);
    expect(facts.model).to.equal("gpt-4o");
  });

  it("answers hostile bodies with a clear 400 or 413: a 1 MB word, 20,000 nested arrays, huge arrays", () => {
    const word = "a".repeat(1024 * 1024);
    expect(() => parseResponsesRequest(Buffer.from(JSON.stringify({ model: "m", input: word })), MAX, undefined)).to.throw(PayloadTooLargeError);
    const ok = parseResponsesRequest(Buffer.from(JSON.stringify({ model: "m", input: word })), 2 * MAX, undefined);
    expect(estimateResponsesInputTokens(ok.request, "gpt-4o")).to.be.greaterThan(1000);

    const nested = `{"model":"m","input":${"[".repeat(20000)}${"]".repeat(20000)}}`;
    expectBadRequest(nested, "input[0]");
    const nestedContent = `{"model":"m","input":[{"role":"user","content":${"[".repeat(20000)}${"]".repeat(20000)}}]}`;
    expectBadRequest(nestedContent, "input[0].content");
    expectBadRequest(`{"model":"m","input":"x","tools":[${"[".repeat(20000)}${"]".repeat(20000)}]}`, "tools[0].type");
    const deepTools = `{"model":"m","input":"x","tools":[{"type":"function","name":"f","parameters":${"[".repeat(20000)}${"]".repeat(20000)}}]}`;
    const parsed = parse(deepTools);
    expect(estimateResponsesInputTokens(parsed.request, "gpt-4o")).to.be.greaterThan(0);

    const many = JSON.stringify({ model: "m", input: Array.from({ length: 100_000 }, () => 1) });
    expectBadRequest(many, "input[0]");
  });
});

describe("estimateResponsesInputTokens", () => {
  const model = "gpt-4o";
  const estimate = (request: Partial<ResponsesRequest>) => estimateResponsesInputTokens({ model, ...request }, model);

  it("is non-negative and grows with the instructions, the input and the tools", () => {
    const base = estimate({});
    expect(base).to.be.at.least(0);
    expect(estimate({ input: "hello there" })).to.be.greaterThan(base);
    expect(estimate({ input: "hello there ".repeat(100) })).to.be.greaterThan(estimate({ input: "hello there" }) + 150);
    expect(estimate({ input: "hi", instructions: "Answer in French, tersely. ".repeat(20) })).to.be.greaterThan(estimate({ input: "hi" }) + 100);
    const tool = { type: "function", name: "get_weather", description: "Weather for a city", parameters: { type: "object", properties: { city: { type: "string" } } } };
    expect(estimate({ input: "hi", tools: [tool] })).to.be.greaterThan(estimate({ input: "hi" }) + 15);
  });

  it("counts message text, refusals, function calls, their outputs and reasoning summaries", () => {
    const text = "the quick brown fox jumps over the lazy dog ".repeat(20);
    const base = estimate({ input: [] });
    for (const item of [
      { role: "user", content: text },
      { type: "message", role: "user", content: [{ type: "input_text", text }] },
      { type: "message", role: "assistant", content: [{ type: "output_text", text }] },
      { type: "message", role: "assistant", content: [{ type: "refusal", refusal: text }] },
      { type: "function_call", call_id: "c", name: "f", arguments: JSON.stringify({ q: text }) },
      { type: "function_call_output", call_id: "c", output: text },
      { type: "reasoning", id: "rs_1", summary: [{ type: "summary_text", text }] },
    ]) {
      expect(estimate({ input: [item] }), JSON.stringify(item).slice(0, 80)).to.be.greaterThan(base + 150);
    }
  });

  it("counts an image by the vision rules, whatever text is attached to the part", () => {
    const image = { type: "input_image", image_url: "https://example.com/cat.png", detail: "high", text: "" };
    const withImage = estimate({ input: [{ role: "user", content: [image] }] });
    const without = estimate({ input: [{ role: "user", content: [] }] });
    expect(withImage - without).to.equal(imageTokens({ url: image.image_url, detail: "high" }, model));
    expect(withImage - without).to.be.greaterThan(1000);
    const low = estimate({ input: [{ role: "user", content: [{ ...image, detail: "low" }] }] });
    expect(low - without).to.equal(85);
  });

  it("counts an inline file by its size", () => {
    const data = Buffer.alloc(40_000, 7).toString("base64");
    const withFile = estimate({ input: [{ role: "user", content: [{ type: "input_file", filename: "a.pdf", file_data: `data:application/pdf;base64,${data}` }] }] });
    expect(withFile - estimate({ input: [{ role: "user", content: [] }] })).to.equal(10_000);
  });
});

describe("extractResponsesUsage", () => {
  const body = (usage: unknown) => ({ object: "response", usage });
  const good = { input_tokens: 12, output_tokens: 30, total_tokens: 42, input_tokens_details: { cached_tokens: 4 }, output_tokens_details: { reasoning_tokens: 10 } };

  it("maps input to prompt and output to completion, with cached and reasoning details, and recomputes the total", () => {
    expect(extractResponsesUsage(body(good))).to.deep.equal({ prompt_tokens: 12, completion_tokens: 30, total_tokens: 42, cached_tokens: 4, reasoning_tokens: 10 });
    expect(extractResponsesUsage(body({ ...good, total_tokens: 0 }))?.total_tokens).to.equal(42);
  });

  it("refuses strings, negatives, fractions and huge numbers, as extractUsage does", () => {
    for (const bad of ["12", -1, 1.5, MAX_REPORTED_TOKENS + 1, Number.MAX_SAFE_INTEGER + 2, null, true]) {
      expect(extractResponsesUsage(body({ ...good, input_tokens: bad })), String(bad)).to.equal(undefined);
      expect(extractResponsesUsage(body({ ...good, output_tokens: bad })), String(bad)).to.equal(undefined);
    }
    expect(extractResponsesUsage(body({ prompt_tokens: 1, completion_tokens: 2 }))).to.equal(undefined);
    expect(extractResponsesUsage({ object: "response" })).to.equal(undefined);
    expect(extractResponsesUsage("usage")).to.equal(undefined);
  });

  it("drops details that are invalid or larger than their part", () => {
    const usage = extractResponsesUsage(body({ ...good, input_tokens_details: { cached_tokens: 13 }, output_tokens_details: { reasoning_tokens: "10" } }));
    expect(usage).to.deep.equal({ prompt_tokens: 12, completion_tokens: 30, total_tokens: 42 });
  });
});

describe("responsesOutputTextBytes and estimateResponsesUsage", () => {
  const answer = {
    object: "response",
    output: [
      { type: "reasoning", id: "rs", summary: [{ type: "summary_text", text: "thinking" }] },
      { type: "message", role: "assistant", content: [{ type: "output_text", text: "héllo", annotations: [] }, { type: "refusal", refusal: "no" }] },
      { type: "function_call", name: "f", arguments: '{"a":1}', call_id: "c" },
      { type: "image_generation_call", id: "ig", result: "A".repeat(10_000) },
    ],
  };

  it("counts the bytes of generated text, not of binary results", () => {
    expect(responsesOutputTextBytes(answer)).to.equal(Buffer.byteLength("thinkinghéllonof{\"a\":1}"));
    expect(responsesOutputTextBytes({ output: "x" })).to.equal(0);
    expect(responsesOutputTextBytes(null)).to.equal(0);
  });

  it("estimates the input from the request and the output from the answer's text", () => {
    const usage = estimateResponsesUsage({ model: "gpt-4o", input: "hello" }, answer, "gpt-4o");
    expect(usage.prompt_tokens).to.equal(estimateResponsesInputTokens({ model: "gpt-4o", input: "hello" }, "gpt-4o"));
    expect(usage.completion_tokens).to.be.within(5, 30);
    expect(usage.total_tokens).to.equal(usage.prompt_tokens + usage.completion_tokens);
    const longer = estimateResponsesUsage({ model: "gpt-4o", input: "hello" }, { output: [{ type: "message", content: [{ type: "output_text", text: "word ".repeat(500) }] }] }, "gpt-4o");
    expect(longer.completion_tokens).to.be.greaterThan(400);
  });
});
