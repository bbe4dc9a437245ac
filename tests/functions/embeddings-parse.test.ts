import { expect } from "chai";
import { ApiError, BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError } from "../../functions/ai-chat/errors";
import { MAX_EMBEDDING_INPUTS, estimateEmbeddingsInputTokens, extractEmbeddingsUsage, parseEmbeddingsRequest } from "../../functions/ai-chat/embeddings";
import { MAX_REPORTED_TOKENS, countTokens } from "../../functions/ai-chat/usage";
import type { RequestFacts } from "../../functions/ai-chat/validate";

const MAX = 1024 * 1024;
const parse = (body: string, contentType?: string, facts?: RequestFacts) => parseEmbeddingsRequest(Buffer.from(body), MAX, contentType, facts);

function rejection(body: string, contentType?: string): ApiError {
  try {
    parse(body, contentType);
  } catch (err) {
    expect(err).to.be.instanceOf(ApiError);
    return err as ApiError;
  }
  return expect.fail(`accepted ${body.slice(0, 200)}`);
}

function expectBadRequest(body: unknown, param: string | null): void {
  const err = rejection(typeof body === "string" ? body : JSON.stringify(body));
  expect(err).to.be.instanceOf(BadRequestError);
  expect(err.param).to.equal(param);
}

describe("parseEmbeddingsRequest", () => {
  it("accepts every input form OpenAI documents and keeps the exact text", () => {
    for (const input of ["hello", ["a", "b"], [1, 2, 3], [[1, 2], [3]]]) {
      const text = JSON.stringify({ model: "text-embedding-3-small", input, encoding_format: "base64", dimensions: 256, user: "u" });
      expect(parse(text).text).to.equal(text);
    }
  });

  it("shares chat's body rules: 415, 413, 400 invalid_json", () => {
    expect(rejection('{"model":"m","input":"x"}', "application/x-www-form-urlencoded")).to.be.instanceOf(UnsupportedMediaTypeError);
    expect(() => parseEmbeddingsRequest(Buffer.from(JSON.stringify({ model: "m", input: "x".repeat(100) })), 50, undefined)).to.throw(PayloadTooLargeError);
    for (const body of ["", "{", "[1]", "null"]) expectBadRequest(body, null);
  });

  it("names the field that is wrong in `param`", () => {
    expectBadRequest({ input: "x" }, "model");
    expectBadRequest({ model: 5, input: "x" }, "model");
    expectBadRequest({ model: "m" }, "input");
    expectBadRequest({ model: "m", input: "" }, "input");
    expectBadRequest({ model: "m", input: [] }, "input");
    expectBadRequest({ model: "m", input: {} }, "input");
    expectBadRequest({ model: "m", input: [true] }, "input");
    expectBadRequest({ model: "m", input: ["a", ""] }, "input[1]");
    expectBadRequest({ model: "m", input: ["a", 1] }, "input[1]");
    expectBadRequest({ model: "m", input: [1, -2] }, "input[1]");
    expectBadRequest({ model: "m", input: [1, 2.5] }, "input[1]");
    expectBadRequest({ model: "m", input: [[1], []] }, "input[1]");
    expectBadRequest({ model: "m", input: [[1], ["a"]] }, "input[1]");
    expectBadRequest({ model: "m", input: "x", encoding_format: "int8" }, "encoding_format");
    expectBadRequest({ model: "m", input: "x", dimensions: 0 }, "dimensions");
    expectBadRequest({ model: "m", input: "x", dimensions: "256" }, "dimensions");
  });

  it("allows at most 2048 inputs", () => {
    parse(JSON.stringify({ model: "m", input: Array.from({ length: MAX_EMBEDDING_INPUTS }, () => "a") }));
    expectBadRequest({ model: "m", input: Array.from({ length: MAX_EMBEDDING_INPUTS + 1 }, () => "a") }, "input");
    expectBadRequest({ model: "m", input: Array.from({ length: 200_000 }, () => 1) }, "input");
  });

  it("answers 20,000 nested arrays with a 400 at once, and reports the model first", () => {
    const facts: RequestFacts = {};
    expect(() => parse(`{"model":"text-embedding-3-small","input":${"[".repeat(20000)}${"]".repeat(20000)}}`, undefined, facts)).to.throw(BadRequestError);
    expect(facts.model).to.equal("text-embedding-3-small");
  });
});

describe("estimateEmbeddingsInputTokens", () => {
  const model = "text-embedding-3-small";
  it("tokenizes strings and counts token-id arrays by their length", () => {
    expect(estimateEmbeddingsInputTokens({ model, input: "hello world" }, model)).to.equal(countTokens("hello world", "cl100k_base"));
    expect(estimateEmbeddingsInputTokens({ model, input: ["hello world", "hello world"] }, model)).to.equal(2 * countTokens("hello world", "cl100k_base"));
    expect(estimateEmbeddingsInputTokens({ model, input: [5, 6, 7] }, model)).to.equal(3);
    expect(estimateEmbeddingsInputTokens({ model, input: [[5, 6], [7, 8, 9]] }, model)).to.equal(5);
  });

  it("grows with the input, and a 1 MB single word is counted quickly and large", () => {
    expect(estimateEmbeddingsInputTokens({ model, input: "word ".repeat(1000) }, model)).to.be.greaterThan(estimateEmbeddingsInputTokens({ model, input: "word" }, model));
    expect(estimateEmbeddingsInputTokens({ model, input: "a".repeat(1024 * 1024) }, model)).to.be.greaterThan(1000);
  });
});

describe("extractEmbeddingsUsage", () => {
  it("reads prompt_tokens, completion 0, total recomputed", () => {
    expect(extractEmbeddingsUsage({ object: "list", data: [], usage: { prompt_tokens: 8, total_tokens: 99 } })).to.deep.equal({ prompt_tokens: 8, completion_tokens: 0, total_tokens: 8 });
  });

  it("refuses strings, negatives, fractions and huge numbers", () => {
    for (const bad of ["8", -1, 0.5, MAX_REPORTED_TOKENS + 1, null]) {
      expect(extractEmbeddingsUsage({ usage: { prompt_tokens: bad, total_tokens: 8 } }), String(bad)).to.equal(undefined);
    }
    expect(extractEmbeddingsUsage({ data: [] })).to.equal(undefined);
  });
});
